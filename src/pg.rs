//! Postgres connections: configuration plus the TLS connector, and the task that drives each
//! connection.

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Config, Connection};

/// How Postgres connections are encrypted.
#[derive(Clone)]
pub(crate) enum Tls {
    /// Plain TCP or Unix socket.
    None,
    /// TLS through rustls (feature `postgres-rustls`).
    #[cfg(feature = "postgres-rustls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::None => "none",
            #[cfg(feature = "postgres-rustls")]
            Tls::Rustls(_) => "rustls",
        })
    }
}

/// Connection settings shared by every connection the crate opens.
#[derive(Clone)]
pub(crate) struct Pg {
    pub(crate) config: Config,
    pub(crate) tls: Tls,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `tokio_postgres::Config`'s Debug redacts the password.
        f.debug_struct("Pg")
            .field("config", &self.config)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Drives a connection, calling `on_notification` for every NOTIFY (the bare connection future
/// would drop them); returns the error that ended it, if any.
async fn drive<S, T>(
    mut connection: Connection<S, T>,
    on_notification: Option<Box<dyn Fn() + Send>>,
) -> Option<tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(m) = messages.next().await {
        match m {
            Ok(AsyncMessage::Notification(_)) => {
                if let Some(f) = &on_notification {
                    f();
                }
            }
            Ok(AsyncMessage::Notice(n)) => {
                tracing::debug!(notice = %n.message(), "postgres notice")
            }
            Ok(_) => {}
            Err(e) => return Some(e),
        }
    }
    None
}

impl Pg {
    pub(crate) fn plain(config: Config) -> Self {
        Pg {
            config,
            tls: Tls::None,
        }
    }

    /// Connects with `application_name = outbox-relay-<role>`; the connection runs on a task
    /// whose handle is returned (it ends when the client is dropped or the connection fails).
    pub(crate) async fn connect_driven(
        &self,
        role: &str,
        on_notification: Option<Box<dyn Fn() + Send>>,
    ) -> Result<(Client, JoinHandle<Option<tokio_postgres::Error>>), tokio_postgres::Error> {
        let mut cfg = self.config.clone();
        cfg.application_name(format!("outbox-relay-{role}"));
        match &self.tls {
            Tls::None => {
                let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                Ok((client, tokio::spawn(drive(conn, on_notification))))
            }
            #[cfg(feature = "postgres-rustls")]
            Tls::Rustls(tls) => {
                let (client, conn) = cfg.connect(tls.clone()).await?;
                Ok((client, tokio::spawn(drive(conn, on_notification))))
            }
        }
    }

    /// Connects for queries only (notifications are not expected and dropped).
    pub(crate) async fn connect(&self, role: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, task) = self.connect_driven(role, None).await?;
        let role = role.to_string();
        tokio::spawn(async move {
            if let Ok(Some(e)) = task.await {
                tracing::debug!(role, error = %crate::error::PgErrorDisplay(&e), "postgres connection ended");
            }
        });
        Ok(client)
    }
}
