//! Cancel requests sent the way libpq sends them.
//!
//! A cancel request takes a connection of its own: the client sends the session's key and the
//! server closes the connection once it has processed the request. tokio-postgres'
//! `CancelToken::cancel_query` half-closes its side right after writing; PgBouncer before 1.21
//! reads that as the client leaving (`client unexpected eof`) and drops a request it has not
//! forwarded yet — it forwards on a new server connection, so it nearly always has not. libpq
//! (`PQcancel`) sends and then waits for the server to close; so does this module, by handing
//! tokio-postgres a stream whose shutdown waits for the end of the stream instead.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;
use tokio_postgres::{CancelToken, Config};

use super::Tls;

/// A connection to a Postgres server.
enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(unix)]
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(unix)]
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(unix)]
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(unix)]
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// `S` whose shutdown sends nothing and waits until the peer closes the connection (or
/// resets it).
struct AwaitClose<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for AwaitClose<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AwaitClose<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 64];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Sends `token`'s cancel request to `config`'s server `server` (an index into its servers: the
/// session's, see `Pg::server_of_last_connect`), over `tls`, and returns once the server closed
/// the connection. A host name is resolved again, and the first of its addresses that accepts
/// gets the request — as at connect time, unless that address changed since (a server that does
/// not know the key ignores it). Unbounded: the caller puts a deadline on it.
///
/// # Errors
/// Connecting, the TLS handshake, or writing the request failed.
pub(super) fn send(
    config: &Config,
    server: usize,
    tls: Tls,
    token: CancelToken,
) -> futures::future::BoxFuture<'static, Result<(), Box<dyn std::error::Error + Send + Sync>>> {
    let one = super::single_host(config, server % super::host_count(config));
    Box::pin(send_to(one, tls, token))
}

async fn send_to(
    one: Config,
    tls: Tls,
    token: CancelToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let port = one.get_ports().first().copied().unwrap_or(5432);
    let (stream, hostname): (Stream, String) =
        match (one.get_hostaddrs().first(), one.get_hosts().first()) {
            (Some(addr), host) => {
                let s = TcpStream::connect((*addr, port)).await?;
                s.set_nodelay(true)?;
                let name = match host {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => addr.to_string(),
                };
                (Stream::Tcp(s), name)
            }
            (None, Some(Host::Tcp(h))) => {
                let s = TcpStream::connect((h.as_str(), port)).await?;
                s.set_nodelay(true)?;
                (Stream::Tcp(s), h.clone())
            }
            #[cfg(unix)]
            (None, Some(Host::Unix(dir))) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                (
                    Stream::Unix(tokio::net::UnixStream::connect(path).await?),
                    String::new(),
                )
            }
            (None, None) => return Err("the connection string names no server".into()),
        };
    let stream = AwaitClose(stream);
    match tls {
        Tls::None => {
            let _ = hostname;
            token
                .cancel_query_raw(stream, tokio_postgres::NoTls)
                .await?
        }
        #[cfg(feature = "postgres-rustls")]
        Tls::Rustls(make) => {
            use tokio_postgres::tls::MakeTlsConnect;
            let connect = MakeTlsConnect::<AwaitClose<Stream>>::make_tls_connect(
                &mut make.clone(),
                &hostname,
            )?;
            token.cancel_query_raw(stream, connect).await?
        }
    }
    Ok(())
}
