//! The wake path: a LISTEN connection drained through `Connection::poll_message`, and the
//! advisory lock by which an idle relay asks writers to NOTIFY.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pg::Pg;
use crate::schema::{wake_lock_key, LOCK_CLASS};

/// Why the relay should poll now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A NOTIFY arrived.
    Notified,
    /// The listener (re)connected and LISTENs again: notifications sent while it was away are
    /// lost, so the relay runs a catch-up pass.
    Listening,
    /// The idle lock was granted: writers that did not notify have committed; catch up.
    Armed,
}

pub(crate) fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs the LISTEN connection until `token` is cancelled, reconnecting with backoff.
pub(crate) fn spawn_listener(
    tracker: &TaskTracker,
    pg: Pg,
    channel: String,
    wake: mpsc::Sender<Wake>,
    token: CancellationToken,
    reconnects: std::sync::Arc<std::sync::atomic::AtomicU64>,
    connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    tracker.spawn(async move {
        let mut backoff = reconnect_backoff();
        let mut first = true;
        while !token.is_cancelled() {
            let forward = wake.clone();
            let on_notify: Box<dyn Fn() + Send> = Box::new(move || {
                // Coalesce: a full queue already means "poll".
                let _ = forward.try_send(Wake::Notified);
            });
            let attempt = tokio::select! {
                _ = token.cancelled() => return,
                r = tokio::time::timeout(
                    pg.connect_deadline(),
                    pg.connect_driven("listener", Some(on_notify)),
                ) => r.map_err(|_| crate::Error::Timeout { what: "connect", after: pg.connect_deadline() })
                    .and_then(|r| r.map_err(crate::Error::Postgres)),
            };
            let (client, mut drain) = match attempt {
                Ok(pair) => pair,
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, ?delay, "outbox listener: cannot connect; retrying");
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            let listen_sql = format!("listen {channel}");
            let listen = tokio::select! {
                _ = token.cancelled() => { drain.abort(); return; }
                r = client.batch_execute(&listen_sql) => r,
            };
            if let Err(e) = listen {
                tracing::warn!(error = %e, "outbox listener: LISTEN failed; reconnecting");
                drain.abort();
                continue;
            }
            connected.store(true, Ordering::Relaxed);
            if !first {
                reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    channel,
                    "outbox listener reconnected; running a catch-up pass"
                );
            }
            first = false;
            backoff = reconnect_backoff();
            let _ = wake.send(Wake::Listening).await;
            let ended = tokio::select! {
                _ = token.cancelled() => None,
                r = &mut drain => Some(r),
            };
            connected.store(false, Ordering::Relaxed);
            drop(client);
            match ended {
                None => {
                    drain.abort();
                    return;
                }
                Some(Ok(Some(e))) => {
                    tracing::warn!(error = %e, "outbox listener connection lost; reconnecting")
                }
                Some(_) => tracing::warn!("outbox listener connection closed; reconnecting"),
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    });
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
        let mut client: Option<tokio_postgres::Client> = None;
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
                tracing::warn!(error = %e, "outbox waker: lock failed; reconnecting");
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
                Err(e) => tracing::warn!(error = %e, "outbox waker: unlock failed; reconnecting"),
            }
        }
    });
}
