//! The `Outbox` handle: lifecycle, enqueue, find, subscribe.

use futures::FutureExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::admin::{Admin, OutboxStatus, RequeueFilter};
use crate::config::{OnDelivery, OutboxBuilder, Settings};
use crate::delivery::{DeliveryStream, Hub};
use crate::error::{Error, Result};
use crate::event::{Event, EventFilter, NewEvent};
use crate::pg::Pg;
use crate::relay::timing::{Stop, STOP_OVERRUN};
use crate::relay::{Counters, Producers, Relay};
use crate::store::{AdminSql, RelaySql, WriterSql};
use crate::writer::Writer;

/// The message of a panic's payload (a `&str` or a `String`, as `panic!` makes them).
pub(crate) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(panic) => panic.downcast_ref::<&str>().map_or_else(
            || "a panic without a message".to_string(),
            |s| (*s).to_string(),
        ),
    }
}

/// How long, at most, a panicked relay's producers get to have what they hold acknowledged
/// before it is purged (or `shutdown_timeout`, if shorter).
const PANIC_FLUSH: Duration = Duration::from_secs(5);

/// The outbox: enqueue events, run the relay, watch deliveries. Cheap to clone (an `Arc`).
///
/// Build it with [`Outbox::builder`]. The relay runs with [`run`](Self::run) or
/// [`start`](Self::start) and stops when the cancellation token is cancelled or
/// [`stop`](Self::stop) is called; a stopped relay cannot run again (build a new `Outbox`).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    relay_sql: Arc<RelaySql>,
    writer_sql: Arc<WriterSql>,
    pg: Pg,
    producers: Arc<Producers>,
    admin: Admin,
    hub: Hub,
    stop: Arc<Stop>,
    tracker: TaskTracker,
    started: AtomicBool,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("table", &self.inner.settings.table)
            .field("channel", &self.inner.settings.channel)
            .finish_non_exhaustive()
    }
}

/// A snapshot of the relay's counters since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Events delivered and confirmed.
    pub delivered: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Events that became dead letters.
    pub dead_lettered: u64,
    /// Batches whose confirmation failed (their acknowledged events are published again).
    pub confirm_failures: u64,
    /// Reservations that failed (Postgres unreachable, …).
    pub reserve_failures: u64,
    /// Batches reserved.
    pub batches: u64,
    /// Times the LISTEN connection was re-established after a loss.
    pub listener_reconnects: u64,
    /// Whether the LISTEN connection is up now.
    pub listener_connected: bool,
    /// Messages handed to the producer and not yet reported.
    pub in_flight: i64,
    /// When the last delivery was confirmed.
    pub last_delivery: Option<DateTime<Utc>>,
    /// Whether the relay is running.
    pub running: bool,
    /// Failed attempts caused by the cluster (unreachable, no leader, not enough replicas,
    /// authentication, timeout), not by the event: retried without counting an attempt (also
    /// counted in `retried`).
    pub kafka_unavailable: u64,
    /// Kafka producers that became fatal and were replaced (main, prompt or pipelining; two
    /// replaced at once count two): `outbox_producer_rebuilds_total` summed over its labels.
    pub producer_rebuilds: u64,
    /// Times the pipelining producer was purged because a held message's delivery report was
    /// overdue (`outbox_pipelining_purges_total`); after each, every aggregate's events go one
    /// at a time for 5–60 s (see the README's failure policy).
    pub pipelining_purges: u64,
    /// Aggregates the relay leaves out of its reservations because their next event is held
    /// back behind a row another transaction has locked (`select … for update`, an uncommitted
    /// `update`): each for a second at a time while the lock lasts, so that the other
    /// aggregates' events are reserved; counted until this relay publishes it again, or until
    /// 5 s (twice the spacing of full scans if longer: seconds behind tens of thousands of locked
    /// aggregates) after a scan last found it held back. A lower bound: a scan names at most
    /// `batch_size` of them, and events held back that do not fill a scan are not counted (see
    /// [`Health::oldest_pending_age`]). Not counted: rows in another relay's batch
    /// (`outbox_left_out_aggregates`; see the README's failure policy). Non-zero for long: end
    /// the session [`Health::held_back_by`] names.
    pub left_out_aggregates: u64,
}

/// The relay's health, from [`Outbox::health`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// Whether the relay is running.
    pub running: bool,
    /// Whether the LISTEN connection is up (`None` in [`WakeMode::PollOnly`](crate::WakeMode)).
    pub listener_connected: Option<bool>,
    /// Why the LISTEN connection is down, while it is: the last failure to connect or to
    /// LISTEN, or how its session ended, with the server's severity, SQLSTATE and message (e.g.
    /// "LISTEN failed: postgres: ERROR 25006 cannot execute LISTEN during recovery (the session
    /// is read-only: the server is a hot standby …)"), at most about 530 bytes; `None` while it
    /// is up, before its first attempt ended, and in `PollOnly`.
    pub listener_problem: Option<String>,
    /// Why the idle relay cannot take its table's wake lock, while that lasts: the last failure
    /// to connect or to take it (e.g. "cannot take the wake lock: postgres: ERROR 42501:
    /// permission denied for function pg_advisory_lock"). Writers NOTIFY only while an idle
    /// relay holds it, so until then the relay finds new events by polling (`poll_interval`), as
    /// with the LISTEN connection down. `None` when it holds the lock, while its request waits
    /// behind writers' transactions or another idle relay (writers NOTIFY meanwhile), while the
    /// relay is busy (the lock is not wanted), and in `PollOnly`.
    pub waker_problem: Option<String>,
    /// When the last delivery was confirmed.
    pub last_delivery: Option<DateTime<Utc>>,
    /// Pending events.
    pub backlog: i64,
    /// Age of the oldest pending event.
    pub oldest_pending_age: Option<Duration>,
    /// Dead letters.
    pub dead_letters: i64,
    /// Rows reserved by another relay, such as the original Go package's, within its lease
    /// (see [`OutboxStatus::legacy_reservations`](crate::OutboxStatus::legacy_reservations)).
    /// Any makes the relay unhealthy: two relays must not share a table.
    pub legacy_reservations: i64,
    /// The transaction holding the oldest snapshot in the database (it keeps dead rows from
    /// being cleaned up and slows reservations); see [`OutboxStatus::oldest_transaction`].
    /// Informational: it does not make the relay unhealthy.
    pub oldest_transaction: Option<crate::OldestTransaction>,
    /// Who holds the row locks that events are held back behind while their aggregates are
    /// left out of the reservations ([`RelayStats::left_out_aggregates`] > 0): up to three
    /// sessions, oldest transaction first, each `pid N (application 'name', state, transaction
    /// open S s)` (or "a prepared transaction (pg_prepared_xacts)"), as the last full scan that
    /// found them named them, followed by `(as of N s ago)` once that scan is a second old or
    /// more (the ages are that scan's); `None` when nothing is left out, and behind another
    /// relay's batch.
    /// The session to commit, roll back or end (`pg_terminate_backend`): a session idle in
    /// transaction after `select … for update` holds no snapshot, so
    /// [`oldest_transaction`](Self::oldest_transaction) may not name it. Informational: it does
    /// not make the relay unhealthy (the held-back events' age does).
    pub held_back_by: Option<String>,
    /// What is wrong with Kafka since the last confirmed delivery, if anything: the Kafka
    /// client's own report (e.g. "Local: Authentication failure: SASL authentication error: …",
    /// "Local: All broker connections are down", a fatal producer error), the last delivery
    /// that failed because the cluster was unavailable, or held messages whose reports are
    /// overdue or never came. Cleared by the next delivery; a failed delivery also once nothing
    /// is pending in the table (another relay delivered everything) and this relay holds
    /// nothing overdue.
    pub kafka_problem: Option<String>,
    /// Since when `kafka_problem` has lasted; unhealthy once longer than `max_pending_age`.
    pub kafka_problem_since: Option<DateTime<Utc>>,
    /// Kafka producers that became fatal and were replaced since the relay started (as
    /// [`RelayStats::producer_rebuilds`]).
    pub producer_rebuilds: u64,
    /// The relay pipeline's last Postgres error (a reservation, fence or confirm that failed:
    /// e.g. "permission denied for table events", "cannot execute SELECT FOR UPDATE in a
    /// read-only transaction", a timeout): the server's severity, SQLSTATE and message (not its
    /// detail, which can quote a row; the log line has it), at most 512 bytes. Cleared by the
    /// next confirmed batch, or by a reservation that found nothing pending unless a fence or
    /// confirm failed within twice the fence's lifetime (`batch_timeout` + `publish_timeout` +
    /// 1 s).
    pub postgres_problem: Option<String>,
    /// Since when `postgres_problem` has lasted; unhealthy once longer than `max_pending_age`.
    pub postgres_problem_since: Option<DateTime<Utc>>,
    /// The relay's sessions go through a pooler that moves them between server connections:
    /// within the last minute, a round trip of the pipeline failed because a session's
    /// prepared statement was gone (SQLSTATE 26000, or 42P05: the sign `connect()`'s pooler
    /// check reads), as with PgBouncer switched to `pool_mode = transaction` after `connect()`.
    /// Little or nothing can be delivered so: unhealthy at once, and for 60 s after the last
    /// such failure (the relay replaces each such session; `DEALLOCATE ALL` run in one of its
    /// sessions, by a trigger say, looks the same).
    pub sessions_pooled_by_transaction: bool,
}

impl Health {
    /// Healthy: running, listener connected (when used), no pending event older than
    /// `max_pending_age`, no Kafka or Postgres problem lasting longer than `max_pending_age`,
    /// and no row reserved by another relay (a Go relay still running against the table, see
    /// [`legacy_reservations`](Self::legacy_reservations)). Dead letters alone do not make the
    /// relay unhealthy (alert on them separately). Which of these fail: [`Health::reasons`].
    pub fn is_healthy(&self, max_pending_age: Duration) -> bool {
        self.reasons(max_pending_age).is_empty()
    }

    /// Why the relay is unhealthy with `max_pending_age` (empty when healthy): one short
    /// sentence per failed condition of [`is_healthy`](Self::is_healthy), in its order, e.g.
    /// `"the oldest pending event is 312 s old (limit 300 s)"`, `"a Postgres problem has lasted
    /// 75 s (limit 60 s)"`; the problems' texts are in their own fields.
    pub fn reasons(&self, max_pending_age: Duration) -> Vec<String> {
        let limit = max_pending_age.as_secs_f64();
        // A `since` in the future (the clock went back) counts as just begun.
        let lasted = |since: &Option<DateTime<Utc>>| {
            since
                .and_then(|since| (Utc::now() - since).to_std().ok())
                .filter(|lasted| *lasted > max_pending_age)
        };
        let mut reasons = Vec::new();
        if !self.running {
            reasons.push("the relay is not running".to_string());
        }
        if self.listener_connected == Some(false) {
            reasons.push(match &self.listener_problem {
                Some(why) => format!("the LISTEN connection is down ({why})"),
                None => "the LISTEN connection is down".to_string(),
            });
        }
        if let Some(why) = &self.waker_problem {
            reasons.push(format!(
                "the relay cannot take its wake lock, so writers do not NOTIFY ({why})"
            ));
        }
        if let Some(age) = self.oldest_pending_age.filter(|a| *a > max_pending_age) {
            // The usual cause at 3 a.m. is not a stuck relay: say so when it may be.
            let dead = match self.dead_letters {
                0 => String::new(),
                n => format!(
                    "; {n} dead letter(s): under the block-aggregate policy their aggregates' later events wait for `requeue`"
                ),
            };
            reasons.push(format!(
                "the oldest pending event is {:.0} s old (limit {limit:.0} s){dead}",
                age.as_secs_f64()
            ));
        }
        if self.legacy_reservations > 0 {
            reasons.push(format!(
                "{} rows are reserved by another relay (a Go relay still running?)",
                self.legacy_reservations
            ));
        }
        if let Some(l) = lasted(&self.kafka_problem_since) {
            reasons.push(format!(
                "a Kafka problem has lasted {:.0} s (limit {limit:.0} s)",
                l.as_secs_f64()
            ));
        }
        if self.sessions_pooled_by_transaction {
            reasons.push("the relay's Postgres sessions lost their prepared statements (SQLSTATE 26000) within the last minute: a pooler in transaction or statement pooling is in front of the relay (point it at Postgres or at a session-pooling port), or DEALLOCATE ran in its sessions".to_string());
        }
        if let Some(l) = lasted(&self.postgres_problem_since) {
            reasons.push(format!(
                "a Postgres problem has lasted {:.0} s (limit {limit:.0} s)",
                l.as_secs_f64()
            ));
        }
        reasons
    }
}

impl Outbox {
    /// A builder with every default; see [`OutboxBuilder`].
    pub fn builder() -> OutboxBuilder {
        OutboxBuilder::default()
    }

    pub(crate) async fn connect(builder: OutboxBuilder) -> Result<Outbox> {
        let (pg, producers) = builder.validate()?;
        let settings = Arc::new(builder.settings);
        // Before any session parameter is sent: refuse a pooler that breaks sessions.
        pg.check_session_semantics().await?;
        if builder.migrate {
            // A session of its own: index builds may exceed the admin session's statement_timeout.
            let client = pg.connect_bounded("migrate").await?;
            crate::pg::bounded(
                "migrate",
                pg.timeout * crate::admin::MIGRATE_TIMEOUT_FACTOR,
                crate::schema::migrate_table(&client, &settings.table, &settings.channel),
            )
            .await?;
        }
        let admin = pg.connect_bounded("admin").await?;
        crate::pg::bounded(
            "schema check",
            pg.timeout,
            crate::schema::check(&admin, &settings.table, &settings.channel),
        )
        .await?;
        // Plans on a table Postgres never analyzed are quadratic in the batch (see the function).
        let analyzed = crate::pg::bounded(
            "analyze",
            pg.timeout,
            crate::schema::analyze_if_never_analyzed(&admin, &settings.table),
        )
        .await;
        match analyzed {
            Ok(true) => {
                tracing::info!(table = %settings.table, "outbox: the table had never been analyzed (the planner would take a batch's candidates for one row); analyzed it")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(table = %settings.table, error = %e, "outbox: the table has never been analyzed and ANALYZE failed; reservations may be slow until autovacuum analyzes it (or run ANALYZE as its owner)")
            }
        }
        let counters = Arc::new(Counters::for_table(&settings.table));
        let relay_sql = Arc::new(RelaySql::new(
            &settings.table,
            settings.dead_letter_policy == crate::DeadLetterPolicy::BlockAggregate,
            settings.on_delivery == OnDelivery::Delete,
            settings.batch_size,
        ));
        let writer_sql = Arc::new(WriterSql::new(&settings.table));
        let admin_sql = Arc::new(AdminSql::new(&settings.table, &settings.channel));
        let token = match builder.token {
            Some(t) => t.child_token(),
            None => CancellationToken::new(),
        };
        let hub = Hub::new(settings.ack_buffer);
        let stop = Arc::new(Stop::new(token, settings.shutdown_timeout));
        let admin = Admin::from_parts(admin_sql, pg.clone(), admin);
        Ok(Outbox {
            inner: Arc::new(Inner {
                settings,
                relay_sql,
                writer_sql,
                pg,
                producers: Arc::new(producers),
                admin,
                hub,
                stop,
                tracker: TaskTracker::new(),
                started: AtomicBool::new(false),
                counters,
            }),
        })
    }

    /// A writer for this outbox's table (cheap to clone, holds no connection).
    pub fn writer(&self) -> Writer {
        Writer::from_sql(self.inner.writer_sql.clone())
    }

    /// Inserts one event into this outbox's table inside the caller's transaction; see
    /// [`Writer::add_new_event`].
    ///
    /// # Errors
    /// As [`Writer::add_new_event`].
    pub async fn add_new_event<C: GenericClient>(
        &self,
        client: &C,
        event: impl AsRef<NewEvent>,
    ) -> Result<Uuid> {
        self.writer().add_new_event(client, event).await
    }

    /// Inserts many events in one statement; see [`Writer::add_new_events`].
    ///
    /// # Errors
    /// As [`Writer::add_new_events`].
    pub async fn add_new_events<C: GenericClient>(
        &self,
        client: &C,
        events: &[NewEvent],
    ) -> Result<Vec<Uuid>> {
        self.writer().add_new_events(client, events).await
    }

    /// Finds events matching `filter`; see [`Admin::find`].
    ///
    /// # Errors
    /// As [`Admin::find`].
    pub async fn find(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        self.inner.admin.find(filter).await
    }

    /// Requeues dead letters; see [`Admin::requeue`].
    ///
    /// # Errors
    /// As [`Admin::requeue`].
    pub async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        self.inner.admin.requeue(filter).await
    }

    /// The backlog; see [`Admin::status`].
    ///
    /// # Errors
    /// As [`Admin::status`].
    pub async fn status(&self) -> Result<OutboxStatus> {
        self.inner.admin.status().await
    }

    /// The Postgres-only operator handle of this outbox (cheap to clone).
    pub fn admin(&self) -> Admin {
        self.inner.admin.clone()
    }

    /// A stream of delivery acknowledgements and failures from now on; see [`DeliveryStream`].
    /// Subscribing after the relay stopped gives a stream that ends at once.
    pub fn subscribe(&self) -> DeliveryStream {
        self.inner.hub.subscribe()
    }

    /// The relay's cancellation token: cancelling it stops the relay gracefully. It is a child
    /// of the token given to the builder, if any.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.stop.token().clone()
    }

    /// Runs the relay until the cancellation token is cancelled, then stops gracefully: no more
    /// reservations; in-flight deliveries are awaited (up to `batch_timeout`), the producer is
    /// flushed (within `shutdown_timeout` or `stop`'s timeout), acknowledged events are
    /// confirmed, unsent reservations are released, and the delivery streams end.
    ///
    /// # Errors
    /// [`Error::AlreadyStarted`] when the relay already ran or is running;
    /// [`Error::ProducerFailed`] when the Kafka producer kept failing (see its docs);
    /// [`Error::Panicked`] when the relay panicked (a bug).
    ///
    /// # Cancel safety
    /// Dropping this future abandons the relay mid-batch: reserved rows are released when their
    /// connections close, and acknowledged but unconfirmed events are published again. Stop it
    /// with the token instead.
    pub async fn run(&self) -> Result<()> {
        self.claim_relay()?;
        self.run_claimed().await
    }

    /// Spawns [`run`](Self::run) on the current Tokio runtime.
    ///
    /// # Errors
    /// [`Error::AlreadyStarted`] when the relay already ran, is running, or was started before (a second
    /// `start` fails at once, not inside the spawned task).
    pub fn start(&self) -> Result<tokio::task::JoinHandle<Result<()>>> {
        self.claim_relay()?;
        let this = self.clone();
        Ok(tokio::spawn(async move { this.run_claimed().await }))
    }

    /// Marks the relay as started; only the first caller gets `Ok`.
    fn claim_relay(&self) -> Result<()> {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyStarted);
        }
        Ok(())
    }

    async fn run_claimed(&self) -> Result<()> {
        let relay = Relay {
            settings: self.inner.settings.clone(),
            sql: self.inner.relay_sql.clone(),
            pg: self.inner.pg.clone(),
            producers: self.inner.producers.clone(),
            hub: self.inner.hub.clone(),
            stop: self.inner.stop.clone(),
            counters: self.inner.counters.clone(),
        };
        // The panic's handling is tracked too: `stop()` returns only once it is done.
        let run = async {
            match std::panic::AssertUnwindSafe(relay.run())
                .catch_unwind()
                .await
            {
                Ok(result) => result,
                Err(panic) => Err(self.panicked(panic_message(panic)).await),
            }
        };
        self.inner.tracker.track_future(run).await
    }

    /// After the relay panicked (a bug; `message` is the panic's): it no longer runs, and says
    /// so.
    async fn panicked(&self, message: String) -> Error {
        // Health must not stay green over a relay that no longer runs, and its tasks beside the
        // pipeline (the listener; the waker holding the wake lock, so that writers keep
        // notifying; maintenance) stop with it: the token is the relay's own (a child of the
        // caller's).
        self.inner.counters.running.store(false, Ordering::Relaxed);
        self.inner.stop.token().cancel();
        metrics::counter!("outbox_relay_panics_total", "table" => self.inner.counters.table.get())
            .increment(1);
        // Its batches were aborted with the pipeline (they alone count messages in flight, and
        // none is left to count their reports). What the producers still hold is given a few
        // seconds to be acknowledged, as at a stop, then purged, so that no retry of it lands
        // after another relay published the rows again; nothing is in flight for this relay
        // any more; the delivery streams end.
        let within = self.inner.settings.shutdown_timeout.min(PANIC_FLUSH);
        crate::relay::flush_then_purge(&self.inner.producers, within).await;
        self.inner.counters.in_flight.store(0, Ordering::Relaxed);
        metrics::gauge!("outbox_in_flight_messages", "table" => self.inner.counters.table.get())
            .set(0.0);
        self.inner.hub.close();
        tracing::error!(
            panic = %message,
            "outbox relay: the relay panicked and stopped; restart the process (a bug: please report it with this line)"
        );
        Error::Panicked(message)
    }

    /// Stops the relay gracefully (see [`run`](Self::run)) within `timeout`: in-flight sends
    /// end halfway through it, the rest is for confirming and flushing; then what the producer
    /// still holds is purged and late delivery reports get a short grace (together at most
    /// 1.5 s past `timeout`, which this call allows before it gives up waiting). Returns at once
    /// when the relay never ran. When a stop was already requested (by an earlier `stop` or the
    /// cancellation token), that stop's deadline stands.
    ///
    /// # Errors
    /// [`Error::StopTimeout`] when the relay is still stopping after that; it goes on stopping
    /// in the background.
    pub async fn stop(&self, timeout: Duration) -> Result<()> {
        let window = self.inner.stop.request(timeout);
        self.inner.tracker.close();
        if !self.inner.started.load(Ordering::Acquire) {
            self.inner.hub.close();
        }
        tokio::time::timeout_at(window.deadline + STOP_OVERRUN, self.inner.tracker.wait())
            .await
            .map_err(|_| Error::StopTimeout(timeout))
    }

    /// Health of the relay: running, listener connected, last delivery, and the backlog (one
    /// status query). Answers within
    /// [`postgres_timeout`](crate::OutboxBuilder::postgres_timeout) (default 10 s), whatever
    /// state Postgres or the network is in.
    ///
    /// # Errors
    /// [`Error::Postgres`] when the status query fails, [`Error::Timeout`] when Postgres does
    /// not answer within `postgres_timeout` (both are themselves unhealthy).
    pub async fn health(&self) -> Result<Health> {
        let stats = self.stats();
        let status = self.status().await?;
        if status.pending == 0 {
            self.inner.producers.state().nothing_pending();
        }
        let kafka = self.inner.producers.state().current();
        let postgres = self.inner.counters.postgres_problem();
        // The LISTEN connection and the waker run only in `WakeMode::Notify`.
        let notify = self.inner.settings.wake == crate::WakeMode::Notify;
        Ok(Health {
            postgres_problem_since: postgres.as_ref().map(|p| p.since),
            postgres_problem: postgres.map(|p| p.error),
            sessions_pooled_by_transaction: self.inner.counters.sessions_moved(),
            kafka_problem_since: kafka.as_ref().map(|p| p.since),
            kafka_problem: kafka.map(|p| p.error),
            producer_rebuilds: stats.producer_rebuilds,
            running: stats.running,
            listener_connected: notify.then_some(stats.listener_connected),
            listener_problem: notify
                .then(|| self.inner.counters.listener.problem())
                .flatten(),
            waker_problem: notify
                .then(|| self.inner.counters.waker.problem())
                .flatten(),
            last_delivery: stats.last_delivery,
            backlog: status.pending,
            oldest_pending_age: status.oldest_pending_age,
            dead_letters: status.dead_letters,
            held_back_by: (stats.left_out_aggregates > 0)
                .then(|| self.inner.counters.held_back_by())
                .flatten(),
            legacy_reservations: status.legacy_reservations,
            oldest_transaction: status.oldest_transaction,
        })
    }

    /// The relay's counters.
    pub fn stats(&self) -> RelayStats {
        let c = &self.inner.counters;
        let kafka = self.inner.producers.state();
        let last = c.last_delivery_ms.load(Ordering::Relaxed);
        RelayStats {
            delivered: c.delivered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            confirm_failures: c.confirm_failures.load(Ordering::Relaxed),
            reserve_failures: c.reserve_failures.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            listener_reconnects: c.listener.reconnects.load(Ordering::Relaxed),
            listener_connected: c.listener.connected.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            last_delivery: (last > 0)
                .then(|| DateTime::<Utc>::from_timestamp_millis(last))
                .flatten(),
            running: c.running.load(Ordering::Relaxed),
            kafka_unavailable: kafka.unavailable.load(Ordering::Relaxed),
            producer_rebuilds: kafka.rebuilds.load(Ordering::Relaxed),
            pipelining_purges: kafka.pipe_purges.load(Ordering::Relaxed),
            left_out_aggregates: c.left_out.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Health;

    fn health(oldest: u64, dead_letters: i64) -> Health {
        Health {
            running: true,
            listener_connected: Some(true),
            listener_problem: None,
            waker_problem: None,
            last_delivery: None,
            backlog: 3,
            oldest_pending_age: Some(Duration::from_secs(oldest)),
            dead_letters,
            legacy_reservations: 0,
            oldest_transaction: None,
            held_back_by: None,
            kafka_problem: None,
            kafka_problem_since: None,
            producer_rebuilds: 0,
            postgres_problem: None,
            postgres_problem_since: None,
            sessions_pooled_by_transaction: false,
        }
    }

    #[test]
    fn an_old_pending_event_names_the_dead_letters_that_may_hold_it_back() {
        let limit = Duration::from_secs(10);
        assert!(
            health(5, 2).reasons(limit).is_empty(),
            "dead letters alone are healthy"
        );
        assert_eq!(
            health(16, 0).reasons(limit),
            ["the oldest pending event is 16 s old (limit 10 s)"]
        );
        let reasons = health(16, 2).reasons(limit);
        assert!(
            reasons.len() == 1
                && reasons[0].contains("2 dead letter(s)")
                && reasons[0].contains("requeue"),
            "{reasons:?}"
        );
    }

    #[test]
    fn sessions_moved_by_a_pooler_are_unhealthy_at_once() {
        let limit = Duration::from_secs(300);
        let mut h = health(1, 0);
        assert!(h.is_healthy(limit));
        h.sessions_pooled_by_transaction = true;
        h.postgres_problem =
            Some("postgres: ERROR 26000: prepared statement \"s7\" does not exist".into());
        h.postgres_problem_since = Some(chrono::Utc::now());
        let reasons = h.reasons(limit);
        assert!(
            reasons.len() == 1 && reasons[0].contains("transaction or statement pooling"),
            "{reasons:?}"
        );
    }
}
