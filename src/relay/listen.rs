//! The sources of the wake stage in Postgres: a LISTEN connection drained through
//! `Connection::poll_message`, and the advisory lock by which an idle relay asks writers to
//! NOTIFY. Both run as tasks and hand their [`Wake`]s to [`Wakeups`](super::wake::Wakeups).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::PgErrorDisplay;
use crate::pg::Pg;
use crate::schema::{wake_lock_key, LOCK_CLASS};

use super::wake::Wake;

/// Backoff between reconnects of the listener and the waker: 50 ms doubling to 5 s.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    super::retry::backoff(Duration::from_millis(50), Duration::from_secs(5))
}

/// The LISTEN connection: run it with [`run`](Self::run) on a task; it reconnects with backoff
/// until `token` is cancelled.
pub(crate) struct Listener {
    pub(crate) pg: Pg,
    pub(crate) channel: String,
    pub(crate) wake: mpsc::Sender<Wake>,
    pub(crate) token: CancellationToken,
    /// Counts re-established connections (`stats().listener_reconnects`).
    pub(crate) reconnects: Arc<AtomicU64>,
    /// Whether it LISTENs now (`stats().listener_connected`).
    pub(crate) connected: Arc<AtomicBool>,
}

/// The result of one attempt to connect and LISTEN.
enum Attempt {
    Listening(Client, JoinHandle<Option<tokio_postgres::Error>>),
    /// Failed; `back_off`: wait before the next attempt.
    Failed {
        back_off: bool,
    },
    Stopped,
}

impl Listener {
    pub(crate) async fn run(self) {
        let mut backoff = reconnect_backoff();
        let mut first = true;
        loop {
            let (client, mut drain) = match self.attempt().await {
                Attempt::Listening(client, drain) => (client, drain),
                Attempt::Failed { back_off: false } => continue,
                Attempt::Failed { back_off: true } if self.sleep(backoff.next()).await => continue,
                Attempt::Failed { .. } | Attempt::Stopped => return,
            };
            self.connected.store(true, Ordering::Relaxed);
            if !first {
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    channel = self.channel,
                    "outbox listener reconnected; running a catch-up pass"
                );
            }
            first = false;
            backoff = reconnect_backoff();
            // Coalesced like notifications: a full queue already means "poll".
            let _ = self.wake.try_send(Wake::Listening);
            let ended = tokio::select! {
                _ = self.token.cancelled() => None,
                r = &mut drain => Some(r),
            };
            self.connected.store(false, Ordering::Relaxed);
            drop(client);
            match ended {
                None => return drain.abort(),
                Some(Ok(Some(e))) => {
                    tracing::warn!(error = %PgErrorDisplay(&e), "outbox listener connection lost; reconnecting")
                }
                Some(_) => tracing::warn!("outbox listener connection closed; reconnecting"),
            }
            if !self.sleep(backoff.next()).await {
                return;
            }
        }
    }

    /// Connects and LISTENs; notifications go to the wake stream as they arrive.
    async fn attempt(&self) -> Attempt {
        let forward = self.wake.clone();
        let on_notify: Box<dyn Fn() + Send> = Box::new(move || {
            // Coalesce: a full queue already means "poll".
            let _ = forward.try_send(Wake::Notified);
        });
        // A connect that gets no answer (a blackholed route) gives up at the connect deadline.
        let after = self.pg.connect_deadline();
        let connected = tokio::select! {
            _ = self.token.cancelled() => return Attempt::Stopped,
            r = tokio::time::timeout(after, self.pg.connect_driven("listener", Some(on_notify))) => r
                .map_err(|_| crate::Error::Timeout { what: "connect", after })
                .and_then(|r| r.map_err(crate::Error::Postgres)),
        };
        let (client, drain) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "outbox listener: cannot connect; retrying");
                return Attempt::Failed { back_off: true };
            }
        };
        let listen_sql = format!("listen {}", self.channel);
        let listen = tokio::select! {
            _ = self.token.cancelled() => { drain.abort(); return Attempt::Stopped; }
            r = client.batch_execute(&listen_sql) => r,
        };
        match listen {
            Ok(()) => Attempt::Listening(client, drain),
            Err(e) => {
                tracing::warn!(error = %PgErrorDisplay(&e), "outbox listener: LISTEN failed; reconnecting");
                drain.abort();
                Attempt::Failed { back_off: false }
            }
        }
    }

    /// Sleeps for `delay`; `false` when the relay stops meanwhile.
    async fn sleep(&self, delay: Option<Duration>) -> bool {
        let delay = delay.unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = self.token.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Holds the table's wake lock while `armed` is `true` (the relay is idle), so that writers
/// NOTIFY; sends [`Wake::Armed`] each time the lock is granted.
pub(crate) fn spawn_waker(
    tracker: &TaskTracker,
    pg: Pg,
    table: String,
    mut armed: watch::Receiver<bool>,
    wake: mpsc::Sender<Wake>,
    token: CancellationToken,
) {
    tracker.spawn(async move {
        let key = wake_lock_key(&table);
        let mut client: Option<Client> = None;
        let mut backoff = reconnect_backoff();
        loop {
            // Wait until the relay wants to be woken.
            tokio::select! {
                _ = token.cancelled() => return,
                r = armed.wait_for(|a| *a) => if r.is_err() { return },
            }
            let c = match client.take().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match tokio::select! {
                    _ = token.cancelled() => return,
                    r = pg.connect_bounded("waker") => r,
                } {
                    Ok(c) => c,
                    Err(e) => {
                        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                        tracing::warn!(error = %e, ?delay, "outbox waker: cannot connect; writers will not notify until it can");
                        tokio::select! {
                            _ = token.cancelled() => return,
                            _ = tokio::time::sleep(delay) => continue,
                        }
                    }
                },
            };
            // Queue for the exclusive lock: from this moment writers' shared try-locks fail and
            // they notify; the grant comes once earlier writers have committed.
            let params: [&(dyn postgres_types::ToSql + Sync); 2] = [&LOCK_CLASS, &key];
            let granted = tokio::select! {
                _ = token.cancelled() => return,
                r = c.execute("select pg_advisory_lock($1, $2)", &params) => r,
            };
            if let Err(e) = granted {
                tracing::warn!(error = %PgErrorDisplay(&e), "outbox waker: lock failed; reconnecting");
                continue;
            }
            backoff = reconnect_backoff();
            let _ = wake.try_send(Wake::Armed);
            tokio::select! {
                _ = token.cancelled() => return,
                r = armed.wait_for(|a| !*a) => if r.is_err() { return },
            }
            match c
                .execute("select pg_advisory_unlock($1, $2)", &[&LOCK_CLASS, &key])
                .await
            {
                Ok(_) => client = Some(c),
                Err(e) => tracing::warn!(error = %PgErrorDisplay(&e), "outbox waker: unlock failed; reconnecting"),
            }
        }
    });
}
