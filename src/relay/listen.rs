//! The sources of the wake stage in Postgres: a LISTEN connection drained through
//! `Connection::poll_message`, and the advisory lock by which an idle relay asks writers to
//! NOTIFY. Both run as tasks and hand their [`Wake`]s to [`Wakeups`](super::wake::Wakeups).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::PgErrorDisplay;
use crate::pg::Pg;
use crate::schema::LOCK_CLASS;

use super::report::SessionState;
use super::wake::{handoff_delays, HandoffSender, Wake};

/// Backoff between reconnects of the listener and the waker: 50 ms doubling to 5 s, plus up to
/// as much random jitter (at most about 10 s apart).
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    super::retry::backoff(Duration::from_millis(50), Duration::from_secs(5))
}

/// How often the listener and the waker check, while they wait, that their session still
/// answers (`select 1` within the Postgres timeout): a half-open connection (host gone, route
/// blackholed) sends no error and would otherwise be waited on for good.
pub(crate) const SESSION_PING: Duration = Duration::from_secs(15);

/// A ticker of [`SESSION_PING`] whose first tick is one period away.
fn ping_ticker() -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + SESSION_PING, SESSION_PING);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// `select 1` within `after`.
async fn ping(client: &Client, after: Duration) -> crate::Result<()> {
    crate::pg::bounded("session ping", after, async {
        client
            .batch_execute("select 1")
            .await
            .map_err(crate::Error::Postgres)
    })
    .await
}

/// How a wait on a relay session ended.
enum Ended {
    Stopped,
    /// The connection ended (with its error, if any).
    Closed(Option<tokio_postgres::Error>),
    /// A ping failed or got no answer: the session is dropped.
    Silent(crate::Error),
}

/// Waits on a session until `token` is cancelled, `until` completes (`Ended::Stopped` is
/// then returned as well; the caller knows which), the connection ends or a ping fails.
async fn watch_session(
    client: &Client,
    drive: &mut JoinHandle<Option<tokio_postgres::Error>>,
    token: &CancellationToken,
    after: Duration,
    until: impl std::future::Future<Output = ()>,
) -> Ended {
    let mut pings = ping_ticker();
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ended::Stopped,
            _ = &mut until => return Ended::Stopped,
            r = &mut *drive => return Ended::Closed(r.ok().flatten()),
            _ = pings.tick() => if let Err(e) = ping(client, after).await {
                return Ended::Silent(e);
            },
        }
    }
}

/// The LISTEN connection: run it with [`run`](Self::run) on a task; it reconnects with backoff
/// until `token` is cancelled.
pub(crate) struct Listener {
    pub(crate) pg: Pg,
    pub(crate) channel: String,
    pub(crate) wake: mpsc::Sender<Wake>,
    /// The outbox table, whose handoffs are read (see [`handoff_delays`]).
    pub(crate) table: String,
    /// Due times handed over by a stopping relay.
    pub(crate) handoffs: HandoffSender,
    pub(crate) token: CancellationToken,
    /// Whether it LISTENs now, its reconnects, and why it is down (`stats()`, health).
    pub(crate) state: Arc<SessionState>,
}

/// Clears `stats().listener_connected` when dropped.
struct Listening(Arc<SessionState>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.connected.store(false, Ordering::Relaxed);
    }
}

/// The result of one attempt to connect and LISTEN.
enum Attempt {
    Listening(Client, JoinHandle<Option<tokio_postgres::Error>>),
    /// Failed (connect or LISTEN); the next attempt waits for the backoff — a LISTEN that
    /// fails fails again at once (on a standby: 25006), and reconnecting without a pause forked
    /// a new server backend every few milliseconds.
    Failed,
    Stopped,
}

impl Listener {
    pub(crate) async fn run(self) {
        // However the task ends — stopped, or unwinding from a panic that stops the relay (see
        // `supervise`) — it no longer listens.
        let _listening = Listening(self.state.clone());
        let mut backoff = reconnect_backoff();
        let mut first = true;
        loop {
            let (client, mut drain) = match self.attempt().await {
                Attempt::Listening(client, drain) => (client, drain),
                Attempt::Failed if self.sleep(backoff.next()).await => continue,
                Attempt::Failed | Attempt::Stopped => return,
            };
            self.state.up();
            if !first {
                self.state.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    channel = self.channel,
                    "outbox listener reconnected; running a catch-up pass"
                );
            }
            first = false;
            #[cfg(feature = "testing")]
            if crate::testing::faults::take_panic(
                &self.table,
                crate::testing::faults::PanicAt::Listener,
            ) {
                panic!("injected by outbox::testing::faults::panic_the_listener_of");
            }
            backoff = reconnect_backoff();
            // Coalesced like notifications: a full queue already means "poll".
            let _ = self.wake.try_send(Wake::Listening);
            let ended = watch_session(
                &client,
                &mut drain,
                &self.token,
                self.pg.timeout,
                futures::future::pending(),
            )
            .await;
            drop(client);
            drain.abort();
            match ended {
                Ended::Stopped => return,
                Ended::Closed(Some(e)) => {
                    tracing::warn!(error = %PgErrorDisplay(&e), "outbox listener connection lost; reconnecting");
                    self.state
                        .down("its connection was lost", Some(&crate::Error::Postgres(e)));
                }
                Ended::Closed(None) => {
                    tracing::warn!("outbox listener connection closed; reconnecting");
                    self.state.down("the server closed its connection", None);
                }
                Ended::Silent(e) => {
                    tracing::warn!(error = %e, "outbox listener session does not answer; dropping it and reconnecting");
                    self.state.down("its session stopped answering", Some(&e));
                }
            }
            if !self.sleep(backoff.next()).await {
                return;
            }
        }
    }

    /// Connects and LISTENs; notifications go to the wake stream as they arrive.
    async fn attempt(&self) -> Attempt {
        let forward = self.wake.clone();
        let handoffs = self.handoffs.clone();
        let table = self.table.clone();
        let on_notify: crate::pg::OnNotification = Box::new(move |payload| {
            // A stopping relay's handoff: the rows it last wrote turn due then.
            let now = tokio::time::Instant::now();
            for delay in handoff_delays(payload, &table) {
                handoffs.at(now + delay);
            }
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
                self.state.down("cannot connect", Some(&e));
                return Attempt::Failed;
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
                self.state
                    .down("LISTEN failed", Some(&crate::Error::Postgres(e)));
                Attempt::Failed
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
/// NOTIFY; sends [`Wake::Armed`] each time the lock is granted (a catch-up poll). The session
/// is supervised like the listener's: when it ends (terminated backend, `idle_session_timeout`,
/// lost connection) or stops answering its pings while the lock is held, it is replaced, the
/// lock taken again and a catch-up poll requested. Run it with [`spawn`](Self::spawn).
pub(crate) struct Waker {
    pub(crate) pg: Pg,
    /// The table's wake lock key (`schema::wake_lock_key`).
    pub(crate) key: i32,
    pub(crate) armed: watch::Receiver<bool>,
    pub(crate) wake: mpsc::Sender<Wake>,
    pub(crate) token: CancellationToken,
    /// Why it cannot take the wake lock while the relay wants it (health's `waker_problem`);
    /// `connected` is whether it holds the lock.
    pub(crate) state: Arc<SessionState>,
}

/// A waker session: its client, the task driving its connection, and its server's index in the
/// connection string (for a cancel request).
type Session = (Client, JoinHandle<Option<tokio_postgres::Error>>, usize);

/// How long a lock request waits without failing before the waker counts as queued (behind
/// writers' transactions or another idle relay), no longer failing: a refusal comes back at
/// once.
const QUEUED_AFTER: Duration = Duration::from_millis(200);

/// How long a stopping waker waits for the cancel of its queued lock request (each of the
/// request and the statement's end).
const STOP_CANCEL_WAIT: Duration = Duration::from_secs(2);

impl Waker {
    /// Runs it on a supervised task of `tracker`.
    pub(crate) fn spawn(self, tracker: &TaskTracker, panics: &Arc<super::supervise::Panics>) {
        tracker.spawn(super::supervise::supervised(panics, "waker", self.run()));
    }

    async fn run(mut self) {
        let mut session: Option<Session> = None;
        let mut backoff = reconnect_backoff();
        loop {
            // Wait until the relay wants to be woken; while it is busy the lock is not wanted,
            // and a failure to take it is no longer a problem.
            if !*self.armed.borrow() {
                self.state.clear();
            }
            tokio::select! {
                _ = self.token.cancelled() => return,
                r = self.armed.wait_for(|a| *a) => if r.is_err() { return },
            }
            let (client, mut drive, server) = match session.take().filter(|(c, ..)| !c.is_closed())
            {
                Some(s) => s,
                None => match self.connect().await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) if self.failed("cannot connect", &e, &mut backoff).await => {
                        continue
                    }
                    Some(Err(_)) | None => return,
                },
            };
            match self.take_lock(&client, server).await {
                Some(Ok(_)) => {}
                // After a pause: an error that comes back at once (a role that may not run
                // `pg_advisory_lock`) reconnected about 100 times a second (a breaker helper).
                Some(Err(e)) => {
                    drive.abort();
                    let e = crate::Error::Postgres(e);
                    if self
                        .failed("cannot take the wake lock", &e, &mut backoff)
                        .await
                    {
                        continue;
                    }
                    return;
                }
                None => return,
            }
            self.state.up();
            backoff = reconnect_backoff();
            let _ = self.wake.try_send(Wake::Armed);
            let mut disarmed = self.armed.clone();
            let until = async move {
                let _ = disarmed.wait_for(|a| !*a).await;
            };
            let after = self.pg.timeout;
            match watch_session(&client, &mut drive, &self.token, after, until).await {
                Ended::Stopped if self.token.is_cancelled() => return,
                Ended::Stopped => {}
                lost => {
                    self.lost(lost);
                    drive.abort();
                    continue;
                }
            }
            if self.unlock(&client).await {
                session = Some((client, drive, server));
            } else {
                drive.abort();
            }
        }
    }

    /// Queues for the exclusive wake lock on `client` (on the connection string's server
    /// `server`) and waits for it: from the request on, writers' shared try-locks fail and they
    /// notify; the grant comes once earlier writers have committed. `None` when the relay stops
    /// meanwhile, after the request was cancelled.
    async fn take_lock(
        &self,
        client: &Client,
        server: usize,
    ) -> Option<Result<u64, tokio_postgres::Error>> {
        let params: [&(dyn postgres_types::ToSql + Sync); 2] = [&LOCK_CLASS, &self.key];
        let lock = client.execute("select pg_advisory_lock($1, $2)", &params);
        tokio::pin!(lock);
        let queued = tokio::time::sleep(QUEUED_AFTER);
        tokio::pin!(queued);
        let mut waiting = false;
        loop {
            tokio::select! {
                _ = self.token.cancelled() => {
                    // Dropped alone, the session's backend would stay queued for the lock (it
                    // notices a closed client only when it next writes): until every writer
                    // transaction holding the shared lock ended — 29 s seen by a new user, and
                    // a relay restarted in a loop would pile them up against max_connections.
                    self.pg
                        .cancel_statement(client, server, "waker lock", STOP_CANCEL_WAIT)
                        .await;
                    return None;
                }
                r = &mut lock => return Some(r),
                // Queued behind writers' transactions (or another idle relay) for a while
                // without failing: writers NOTIFY while it waits, so an earlier failure is no
                // longer a problem (a breaker helper saw /health 503 for 58.8 s, until the
                // writer committed, after the queued session was terminated once).
                _ = &mut queued, if !waiting => {
                    waiting = true;
                    self.state.clear();
                }
            }
        }
    }

    /// A failure to connect or to take the lock (`what`, e.g. "cannot connect"): logged,
    /// recorded for health's `waker_problem`, then a pause of the backoff's next delay;
    /// `false` when the relay stops meanwhile.
    async fn failed(
        &self,
        what: &str,
        e: &crate::Error,
        backoff: &mut impl Iterator<Item = Duration>,
    ) -> bool {
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tracing::warn!(error = %e, ?delay, "outbox waker: {what}; writers will not notify until it can (the relay polls meanwhile); retrying");
        self.state.down(what, Some(e));
        self.pause(delay).await
    }

    /// Connects within the connect deadline; `None` when the relay stops meanwhile.
    async fn connect(&self) -> Option<crate::Result<Session>> {
        let after = self.pg.connect_deadline();
        tokio::select! {
            _ = self.token.cancelled() => None,
            r = tokio::time::timeout(after, self.pg.connect_driven("waker", None)) => Some(r
                .map_err(|_| crate::Error::Timeout { what: "connect", after })
                .and_then(|r| r.map_err(crate::Error::Postgres))
                .map(|(client, drive)| (client, drive, self.pg.server_of_last_connect()))),
        }
    }

    fn lost(&self, ended: Ended) {
        match ended {
            Ended::Closed(Some(e)) => {
                tracing::warn!(error = %PgErrorDisplay(&e), "outbox waker session lost; reconnecting, then a catch-up poll")
            }
            Ended::Silent(e) => {
                tracing::warn!(error = %e, "outbox waker session does not answer; dropping it and reconnecting")
            }
            _ => tracing::warn!("outbox waker session closed; reconnecting, then a catch-up poll"),
        }
    }

    /// Releases the lock within the Postgres timeout; `false` when the session must be dropped.
    async fn unlock(&self, client: &Client) -> bool {
        let params: [&(dyn postgres_types::ToSql + Sync); 2] = [&LOCK_CLASS, &self.key];
        let unlock = client.execute("select pg_advisory_unlock($1, $2)", &params);
        tokio::select! {
            _ = self.token.cancelled() => false,
            r = tokio::time::timeout(self.pg.timeout, unlock) => match r {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::warn!(error = %PgErrorDisplay(&e), "outbox waker: unlock failed; reconnecting");
                    false
                }
                Err(_) => {
                    tracing::warn!(after = ?self.pg.timeout, "outbox waker: unlock got no answer; reconnecting");
                    false
                }
            },
        }
    }

    /// Sleeps for `delay`, or until the relay no longer wants the lock (busy again: the failure
    /// is then no problem, and the next wait clears it); `false` when the relay stops meanwhile.
    async fn pause(&self, delay: Duration) -> bool {
        let mut armed = self.armed.clone();
        tokio::select! {
            _ = self.token.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
            _ = armed.wait_for(|a| !*a) => true,
        }
    }
}
