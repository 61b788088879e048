//! The report stage: the one sink for what the relay did — delivery acks and failures on the
//! subscribers' streams, the counters behind [`Outbox::stats`](crate::Outbox::stats), the
//! `metrics` counters and gauges, and the log lines.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::delivery::{DeliveryAck, DeliveryEvent, DeliveryFailure};
use crate::text::printable;

use super::producer::{ClientProblem, KafkaState};
use super::publish::Outcome;
use super::reserve::Reserved;
use super::retry::FailureKind;

/// Counters kept by the relay; read them with [`Outbox::stats`](crate::Outbox::stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) delivered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) confirm_failures: AtomicU64,
    pub(crate) reserve_failures: AtomicU64,
    pub(crate) batches: AtomicU64,
    /// The LISTEN connection: up or down, reconnects, and why it is down.
    pub(crate) listener: Arc<SessionState>,
    /// The waker: whether it holds the wake lock, and why it cannot take it while wanted.
    pub(crate) waker: Arc<SessionState>,
    pub(crate) in_flight: AtomicI64,
    /// Aggregates found held back behind another transaction's lock lately, left out of the
    /// reservations (see `Pipeline::leave_out`, `LeftOut::held`, `scan::held_shown_for`).
    pub(crate) left_out: AtomicU64,
    /// Who holds the locks those aggregates wait for, as the last full scan that found them
    /// named them (`reserve.sql` column 19), and when; cleared when none is counted.
    pub(crate) held_back_by: Mutex<Option<(String, std::time::Instant)>>,
    /// Unix time in milliseconds of the last confirmed delivery, 0 if none.
    pub(crate) last_delivery_ms: AtomicI64,
    pub(crate) running: AtomicBool,
    /// The pipeline's Postgres problem, if any (see [`PostgresState`]).
    pub(crate) postgres: Mutex<PostgresState>,
    /// The `table` label of the relay's metrics.
    pub(crate) table: TableLabel,
}

/// The LISTEN connection (or the waker's session) as `stats()` and health see it.
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    /// Whether it LISTENs now (`stats().listener_connected`).
    pub(crate) connected: AtomicBool,
    /// Re-established connections (`stats().listener_reconnects`).
    pub(crate) reconnects: AtomicU64,
    /// Why it is down: the last failure to connect or LISTEN, or how its session ended, as
    /// [`problem_text`] puts it; `None` while it is up.
    problem: Mutex<Option<String>>,
}

impl SessionState {
    /// It LISTENs.
    pub(crate) fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
        *self.problem_state() = None;
    }

    /// It is down: `what` happened (e.g. "LISTEN failed"), with the error `e` if there is one.
    pub(crate) fn down(&self, what: &str, e: Option<&crate::Error>) {
        self.connected.store(false, Ordering::Relaxed);
        *self.problem_state() = Some(match e {
            Some(e) => format!("{what}: {}", problem_text(e)),
            None => what.to_string(),
        });
    }

    /// No problem to report any more (it is not wanted for now), though it is not up.
    pub(crate) fn clear(&self) {
        *self.problem_state() = None;
    }

    /// Why it is down (see the field).
    pub(crate) fn problem(&self) -> Option<String> {
        if self.connected.load(Ordering::Relaxed) {
            return None;
        }
        self.problem_state().clone()
    }

    fn problem_state(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.problem.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The label every relay metric carries, `table="<outbox table>"`: relays of one process on
/// different tables keep series of their own (unlabelled, the gauges of one overwrote the
/// other's).
#[derive(Debug, Clone)]
pub(crate) struct TableLabel(metrics::SharedString);

impl TableLabel {
    pub(crate) fn new(table: &str) -> Self {
        TableLabel(metrics::SharedString::from_shared(Arc::<str>::from(table)))
    }

    /// The label's value (a shared string: cloning it copies no bytes).
    pub(crate) fn get(&self) -> metrics::SharedString {
        self.0.clone()
    }
}

impl Default for TableLabel {
    fn default() -> Self {
        TableLabel::new(crate::config::DEFAULT_TABLE)
    }
}

/// The pipeline's failing Postgres round trips (reservation, fence, confirm) since the last
/// success: cleared by a confirmed batch, or by a reservation that found nothing unless a batch
/// failed recently (a batch that cannot be confirmed leaves its aggregates fenced, so the
/// reservations in between find nothing: they do not show that batches work) — all but the
/// sign of a pooler, which only time clears (see [`SESSIONS_MOVED_SHOWN`]).
#[derive(Debug, Default)]
pub(crate) struct PostgresState {
    /// The last failure (see [`problem_text`]) and since when failures have lasted.
    problem: Option<ClientProblem>,
    /// When a fence or confirm last failed.
    batch_failed_at: Option<std::time::Instant>,
    /// When a failure last said a session's prepared statement was gone.
    sessions_moved_at: Option<std::time::Instant>,
}

impl PostgresState {
    /// Whether a failure of the last [`SESSIONS_MOVED_SHOWN`] said a session's prepared
    /// statement was gone.
    fn sessions_moved(&self) -> bool {
        self.sessions_moved_at
            .is_some_and(|at| at.elapsed() < SESSIONS_MOVED_SHOWN)
    }

    /// The state once the pipeline's round trips work again: the pooler's sign stays.
    fn cleared(&self) -> PostgresState {
        PostgresState {
            sessions_moved_at: self.sessions_moved_at,
            ..PostgresState::default()
        }
    }
}

/// How long health names sessions moved by a pooler after the last failure that said so (see
/// [`Counters::sessions_moved`]): a transaction pooler lets some batches through, and an empty
/// reservation says nothing about it, so neither may clear it (found by a breaker helper:
/// health went 200 between failures while the backlog stood).
const SESSIONS_MOVED_SHOWN: Duration = Duration::from_secs(60);

/// Longest problem text, in bytes.
const PROBLEM_TEXT_MAX: usize = 512;

impl Counters {
    /// Counters of a relay on `table` (the label of its metrics).
    pub(crate) fn for_table(table: &str) -> Counters {
        Counters {
            table: TableLabel::new(table),
            ..Counters::default()
        }
    }

    /// Who holds the locks the left-out aggregates wait for (see [`Counters::held_back_by`]),
    /// with "(as of N s ago)" once the scan that named them is a second old or more: its
    /// transactions' ages are as of that scan, and full scans can come tens of seconds apart
    /// behind a large pile (a breaker read 15 s where the transaction had been open 49 s).
    pub(crate) fn held_back_by(&self) -> Option<String> {
        let held = self
            .held_back_by
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.as_ref().map(|(who, at)| match at.elapsed().as_secs() {
            0 => who.clone(),
            ago => format!("{who} (as of {ago} s ago)"),
        })
    }

    /// The pipeline's Postgres problem, if any.
    pub(crate) fn postgres_problem(&self) -> Option<ClientProblem> {
        self.postgres_state().problem.clone()
    }

    /// Whether a failure of the last [`SESSIONS_MOVED_SHOWN`] said a session's prepared
    /// statement was gone ([`crate::Error::lost_prepared_statement`]): its session went
    /// through a pooler to another server connection.
    pub(crate) fn sessions_moved(&self) -> bool {
        self.postgres_state().sessions_moved()
    }

    fn postgres_state(&self) -> std::sync::MutexGuard<'_, PostgresState> {
        self.postgres.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `e` as health shows it: for a server error its severity, SQLSTATE and message — not its
/// detail, which can quote a row's values (`Failing row contains (…)`) on an endpoint that
/// usually has no authentication — printable, at most [`PROBLEM_TEXT_MAX`] bytes.
fn problem_text(e: &crate::Error) -> String {
    let text = match e.as_db_error() {
        Some(db) => format!("postgres: {}", crate::error::PgBrief(db)),
        None => e.to_string(),
    };
    let mut text = printable(&text).to_string();
    if text.len() > PROBLEM_TEXT_MAX {
        let mut end = PROBLEM_TEXT_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Where every stage reports to.
pub(crate) struct Reporter {
    counters: Arc<Counters>,
    kafka: Arc<KafkaState>,
    acks: Option<broadcast::Sender<DeliveryEvent>>,
}

/// One sample of `outbox_commit_to_ack_seconds` for a delivered `row`: its age when it was read
/// plus `acked_after`, the time from then to the recorded delivery.
fn record_commit_to_ack(table: &TableLabel, row: &Reserved, acked_after: Duration) {
    if let Some(age) = row.age_at_reserve {
        metrics::histogram!("outbox_commit_to_ack_seconds", "table" => table.get())
            .record(age + acked_after.as_secs_f64());
    }
}

impl Reporter {
    pub(crate) fn new(
        counters: Arc<Counters>,
        kafka: Arc<KafkaState>,
        acks: Option<broadcast::Sender<DeliveryEvent>>,
    ) -> Self {
        Reporter {
            counters,
            kafka,
            acks,
        }
    }

    /// The producer became fatal and was replaced (`streak`: rebuilds since the last delivery).
    /// `which`: the producers replaced (labels from [`super::producer::LABELS`]).
    pub(crate) fn producer_rebuilt(&self, which: &[&'static str], fatal: &str, streak: u32) {
        for &producer in which {
            metrics::counter!("outbox_producer_rebuilds_total", "producer" => producer, "table" => self.table())
                .increment(1);
        }
        tracing::error!(
            producer = %which.join(" and "),
            fatal = %printable(fatal),
            streak,
            "outbox relay: a Kafka producer became fatal; rebuilt it (its unacknowledged events are retried, no attempt counted)"
        );
    }

    /// The `table` label's value of the relay's metrics (see [`TableLabel`]).
    pub(crate) fn table(&self) -> metrics::SharedString {
        self.counters.table.get()
    }

    /// The `table` label of the relay's metrics.
    pub(crate) fn table_label(&self) -> TableLabel {
        self.counters.table.clone()
    }

    /// The relay purged its pipelining producer (see `Producers::purge_pipe`).
    pub(crate) fn pipelining_purged(&self) {
        metrics::counter!("outbox_pipelining_purges_total", "table" => self.table()).increment(1);
    }

    pub(crate) fn running(&self, running: bool) {
        self.counters.running.store(running, Ordering::Relaxed);
    }

    pub(crate) fn batch_reserved(&self, rows: &[Reserved]) {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("outbox_batches_total", "table" => self.table()).increment(1);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
            tracing::debug!(event_ids = ?ids, "outbox batch reserved");
        }
    }

    pub(crate) fn reserve_failed(&self, e: &crate::Error, delay: Duration) {
        self.counters
            .reserve_failures
            .fetch_add(1, Ordering::Relaxed);
        self.postgres_failed(e, false);
        tracing::warn!(error = %e, ?delay, "outbox relay: reservation failed; retrying");
    }

    pub(crate) fn fence_failed(&self, e: &crate::Error) {
        self.postgres_failed(e, true);
        tracing::warn!(error = %e, "outbox relay: cannot fence the batch; releasing it");
    }

    /// Records `e` as the pipeline's Postgres problem (keeping since when they have lasted);
    /// `batch`: a fence or confirm failed (else a reservation).
    fn postgres_failed(&self, e: &crate::Error, batch: bool) {
        let mut state = self.counters.postgres_state();
        ClientProblem::note(&mut state.problem, problem_text(e));
        if e.lost_prepared_statement() {
            // Logged when it starts, and again once it had stopped for a while.
            if !state.sessions_moved() {
                tracing::error!(error = %e, "outbox relay: a Postgres session lost its prepared statements (the relay replaces the session): {}", crate::pg::POOLER_PROBLEM);
            }
            state.sessions_moved_at = Some(std::time::Instant::now());
        }
        if batch {
            state.batch_failed_at = Some(std::time::Instant::now());
        }
    }

    /// A batch was confirmed: the pipeline's Postgres round trips work.
    fn batch_succeeded(&self) {
        let mut state = self.counters.postgres_state();
        *state = state.cleared();
    }

    /// A reservation found nothing to reserve: the problem is over unless a fence or confirm
    /// failed within `quiet` (the caller gives twice the fence's lifetime: while a failed
    /// batch's fence lasts its aggregates are not reserved, so an empty reservation shows
    /// nothing about batches).
    pub(crate) fn reservation_empty(&self, quiet: Duration) {
        let mut state = self.counters.postgres_state();
        if state.batch_failed_at.is_none_or(|at| at.elapsed() > quiet) {
            *state = state.cleared();
        }
    }

    /// A message was handed to the producer (`+1`) or left the relay's hands (`-1`).
    pub(crate) fn in_flight(&self, delta: i64) {
        let now = self.counters.in_flight.fetch_add(delta, Ordering::Relaxed) + delta;
        metrics::gauge!("outbox_in_flight_messages", "table" => self.table()).set(now as f64);
    }

    /// The reservations now leave out `n` aggregates (held back behind rows another
    /// transaction has locked); with none, who held the locks is forgotten.
    pub(crate) fn left_out(&self, n: usize) {
        self.counters.left_out.store(n as u64, Ordering::Relaxed);
        metrics::gauge!("outbox_left_out_aggregates", "table" => self.table()).set(n as f64);
        if n == 0 {
            self.held_back_by(None);
        }
    }

    /// Who holds the locks the left-out aggregates wait for (see [`Counters::held_back_by`]).
    pub(crate) fn held_back_by(&self, who: Option<String>) {
        *self
            .counters
            .held_back_by
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            who.map(|who| (who, std::time::Instant::now()));
    }

    /// A confirmed batch: every settled row, then the batch's delivery figures.
    /// `acked_after`: time from the rows' arrival (when their ages were read) to the
    /// confirmation; a row's commit-to-ack time is its age then plus this.
    pub(crate) fn batch_confirmed(
        &self,
        rows: &[Reserved],
        outcomes: &[Outcome],
        acked_after: Duration,
    ) {
        self.batch_succeeded();
        let now = Utc::now();
        let mut delivered = 0;
        for (row, outcome) in rows.iter().zip(outcomes) {
            if self.announce(row, outcome, now) {
                delivered += 1;
                record_commit_to_ack(&self.counters.table, row, acked_after);
            }
        }
        self.count_delivered(delivered, now);
    }

    /// One row's outcome recorded from a late delivery report; `acked_after` as for
    /// [`batch_confirmed`](Self::batch_confirmed) (late deliveries are the slow ones: without
    /// their samples the histogram's tail would hide every outage).
    pub(crate) fn settled_late(&self, row: &Reserved, outcome: &Outcome, acked_after: Duration) {
        let now = Utc::now();
        if self.announce(row, outcome, now) {
            record_commit_to_ack(&self.counters.table, row, acked_after);
            self.count_delivered(1, now);
        }
    }

    /// Acks, failure counters and logs of one row's recorded outcome; returns whether it was a
    /// delivery (counted by the caller).
    fn announce(&self, row: &Reserved, outcome: &Outcome, at: DateTime<Utc>) -> bool {
        match outcome {
            Outcome::Delivered { partition, offset } => {
                self.send(|| {
                    DeliveryEvent::Delivered(DeliveryAck {
                        event_id: row.id,
                        seq: row.seq,
                        aggregate_id: row.aggregate_id.clone(),
                        topic: row.topic.clone(),
                        event_type: row.event_type.clone(),
                        partition: *partition,
                        offset: *offset,
                        delivered_at: at,
                    })
                });
                true
            }
            Outcome::Failed(f) => {
                self.failed(row, f);
                false
            }
            Outcome::NotSent | Outcome::Held => false,
        }
    }

    fn count_delivered(&self, n: u64, at: DateTime<Utc>) {
        if n == 0 {
            return;
        }
        self.kafka.delivered();
        self.counters.delivered.fetch_add(n, Ordering::Relaxed);
        self.counters
            .last_delivery_ms
            .fetch_max(at.timestamp_millis(), Ordering::Relaxed);
        metrics::counter!("outbox_events_delivered_total", "table" => self.table()).increment(n);
    }

    fn failed(&self, row: &Reserved, f: &super::retry::Failure) {
        let attempts = row.attempts + i32::from(f.charged());
        let (event, error) = (&row.id, printable(&f.error));
        let (aggregate_id, topic) = (printable(&row.aggregate_id), printable(&row.topic));
        let (metric, message) = match f.kind {
            FailureKind::SharedBatch => ("outbox_delivery_failures_total", "outbox delivery failed: the broker refused the record batch the event shared; will send it alone (no attempt counted)"),
            FailureKind::Unconfirmed => ("outbox_delivery_failures_total", "outbox delivery unconfirmed: Kafka acknowledged the event without an offset; will send it again (no attempt counted)"),
            FailureKind::Cluster => ("outbox_kafka_unavailable_total", "outbox delivery failed: Kafka unavailable; will retry (no attempt counted)"),
            FailureKind::Event => ("outbox_delivery_failures_total", "outbox delivery failed; will retry"),
            FailureKind::Dead => ("outbox_dead_letters_total", "outbox event dead-lettered"),
        };
        metrics::counter!(metric, "table" => self.table()).increment(1);
        if f.dead() {
            self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            tracing::error!(event_id = %event, %aggregate_id, %topic, attempts, %error, "{message}");
        } else {
            self.counters.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event_id = %event, %aggregate_id, %topic, attempts, %error, "{message}");
        }
        self.send(|| {
            DeliveryEvent::Failed(DeliveryFailure {
                event_id: row.id,
                aggregate_id: row.aggregate_id.clone(),
                topic: row.topic.clone(),
                error: f.error.clone(),
                kafka_code: f.code,
                attempts,
                dead_letter: f.dead(),
            })
        });
    }

    /// Sends to the subscribers, building the item only when someone listens.
    fn send(&self, item: impl FnOnce() -> DeliveryEvent) {
        if let Some(tx) = self.acks.as_ref().filter(|tx| tx.receiver_count() > 0) {
            let _ = tx.send(item());
        }
    }

    pub(crate) fn confirm_failed(&self, e: &crate::Error, delivered: usize) {
        let streak = self
            .counters
            .confirm_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        metrics::counter!("outbox_confirm_failures_total", "table" => self.table()).increment(1);
        self.postgres_failed(e, true);
        tracing::error!(
            confirm_failures_total = streak,
            error = %e,
            delivered,
            "outbox relay: confirming the batch failed; its acknowledged events stay pending and will be published again (duplicates keep their event_id)"
        );
    }

    /// `topics`: the topics of the held events, each once. Named in the warning, with the
    /// Kafka problem known now: a topic the cluster does not have (yet) first shows as late
    /// reports, since the producer keeps such messages queued while it waits for the topic's
    /// metadata (`topic.metadata.propagation.max.ms`), and a new user saw only "late".
    pub(crate) fn held(&self, held: usize, topics: &[&str]) {
        let kafka_problem = self.kafka.current().map(|p| p.error);
        tracing::warn!(
            held,
            topics = ?topics,
            kafka_problem,
            "outbox relay: delivery reports late; holding those events until they arrive (a topic missing from the cluster, an unreachable partition leader, or a slow broker)"
        );
    }

    pub(crate) fn late_unrecordable(&self, e: &crate::Error) {
        tracing::warn!(error = %e, "outbox relay: cannot record late delivery reports; the held events will be published again");
    }

    pub(crate) fn batch_panicked(&self, e: &tokio::task::JoinError) {
        tracing::error!(error = %e, "outbox relay: batch task panicked");
    }

    pub(crate) fn listener_state(&self) -> Arc<SessionState> {
        self.counters.listener.clone()
    }

    pub(crate) fn waker_state(&self) -> Arc<SessionState> {
        self.counters.waker.clone()
    }
}

/// Describes the relay's metrics and registers its counters at zero, so that `rate(…)` alerts
/// have a series to evaluate before the first event (a counter otherwise appears only when it
/// first increases).
pub(crate) fn register_metrics(table: &TableLabel) {
    register_counters(table);
    describe_gauges();
}

/// The counters, each at zero; the rebuilds once per producer label.
fn register_counters(table: &TableLabel) {
    use metrics::{describe_counter, Unit};
    let counters = [
        (
            "outbox_events_delivered_total",
            "Events Kafka acknowledged and the relay confirmed.",
        ),
        (
            "outbox_delivery_failures_total",
            "Failed delivery attempts that will be retried.",
        ),
        (
            "outbox_dead_letters_total",
            "Events that became dead letters.",
        ),
        (
            "outbox_confirm_failures_total",
            "Batches whose confirmation in Postgres failed (their events are published again).",
        ),
        ("outbox_batches_total", "Batches reserved."),
        (
            "outbox_relay_panics_total",
            "Times the relay panicked and stopped (a bug to report; the relay does not run again in this process).",
        ),
        (
            "outbox_kafka_unavailable_total",
            "Failed delivery attempts caused by the cluster (unreachable, no leader, not enough replicas, authentication, timeout), not by the event: retried without counting an attempt.",
        ),
        (
            "outbox_acks_without_offset_total",
            "Delivery reports of success without an offset (librdkafka inferred the delivery from a later request's success, or from a duplicate's answer): nothing proves the event is in Kafka, so it is sent again (a duplicate at worst); each is also counted in outbox_delivery_failures_total.",
        ),
        (
            "outbox_order_anomalies_total",
            "Events acknowledged although an earlier event of their pipelined run failed (ruled out by the pipelining producer's settings; any is a bug to report).",
        ),
        (
            "outbox_pipelining_purges_total",
            "Times the pipelining producer was purged because a held message's delivery report was overdue; each is followed by a pause of pipelining (5 s, doubling while purges follow each other with no pipelined delivery between them, at most 60 s) during which every aggregate's events go one at a time.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, Unit::Count, help);
        metrics::counter!(name, "table" => table.get()).increment(0);
    }
    describe_counter!(
        "outbox_producer_rebuilds_total",
        Unit::Count,
        "Times a Kafka producer became fatal and was replaced, by producer: main, prompt (linger.ms 0, for batches that caught up), pipelining (an aggregate's events back to back)."
    );
    for producer in super::producer::LABELS {
        metrics::counter!("outbox_producer_rebuilds_total", "producer" => producer, "table" => table.get())
            .increment(0);
    }
}

/// The gauges and the histogram (they have no value before the relay sets one).
fn describe_gauges() {
    use metrics::{describe_gauge, describe_histogram, Unit};
    let gauges = [
        (
            "outbox_backlog_events",
            Unit::Count,
            "Pending events (every 10 s).",
        ),
        (
            "outbox_retrying_events",
            Unit::Count,
            "Pending events waiting for a retry.",
        ),
        (
            "outbox_dead_letter_events",
            Unit::Count,
            "Dead letters in the table.",
        ),
        (
            "outbox_oldest_pending_age_seconds",
            Unit::Seconds,
            "Age of the oldest pending event.",
        ),
        (
            "outbox_legacy_reservations",
            Unit::Count,
            "Rows with a live reservation of another relay (the original Go relay still running).",
        ),
        (
            "outbox_in_flight_messages",
            Unit::Count,
            "Messages sent, not yet acknowledged.",
        ),
        (
            "outbox_reservation_candidates_limit",
            Unit::Count,
            "Candidates a reservation may take: batch_size, or less after one missed its deadline (1, then doubling while reservations answer within half of postgres_timeout, below the size that missed for a minute).",
        ),
        (
            "outbox_left_out_aggregates",
            Unit::Count,
            "Aggregates the relay leaves out of its reservations, a second at a time, because their next event is held back behind a row another transaction has locked (each counted until this relay publishes it again, or until 5 s, or two full scans' spacing if longer, after a scan last found it so; at most one scan's candidates: a lower bound).",
        ),
        (
            "outbox_oldest_transaction_age_seconds",
            Unit::Seconds,
            "Age of the transaction holding the oldest snapshot in the database (0 when none, or when it is another role's session and the relay's role lacks pg_read_all_stats).",
        ),
    ];
    for (name, unit, help) in gauges {
        describe_gauge!(name, unit, help);
    }
    describe_histogram!(
        "outbox_commit_to_ack_seconds",
        Unit::Seconds,
        "From the writer's transaction start to the confirmed delivery."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_moved_are_named_for_a_minute_after_the_last_sign() {
        let counters = Counters::default();
        assert!(!counters.sessions_moved());
        counters.postgres.lock().unwrap().sessions_moved_at = Some(std::time::Instant::now());
        assert!(counters.sessions_moved(), "just now");
        {
            // A confirmed batch or an empty reservation clears the rest, not this.
            let mut state = counters.postgres.lock().unwrap();
            ClientProblem::note(&mut state.problem, "postgres: ERROR 26000".into());
            *state = state.cleared();
            assert!(state.problem.is_none());
        }
        assert!(
            counters.sessions_moved(),
            "kept by a batch that went through"
        );
        let then = std::time::Instant::now()
            .checked_sub(SESSIONS_MOVED_SHOWN + Duration::from_secs(1))
            .expect("the clock is older than a minute");
        counters.postgres.lock().unwrap().sessions_moved_at = Some(then);
        assert!(!counters.sessions_moved(), "over a minute ago");
    }

    #[test]
    fn who_holds_the_locks_says_how_old_the_scan_that_named_them_is() {
        let counters = Counters::default();
        assert_eq!(counters.held_back_by(), None);
        let who = "pid 7 (application 'psql', idle in transaction, transaction open 15 s)";
        *counters.held_back_by.lock().unwrap() = Some((who.to_owned(), std::time::Instant::now()));
        assert_eq!(
            counters.held_back_by().as_deref(),
            Some(who),
            "a fresh scan's figures"
        );
        let then = std::time::Instant::now()
            .checked_sub(Duration::from_secs(34))
            .expect("the clock is older than 34 s");
        *counters.held_back_by.lock().unwrap() = Some((who.to_owned(), then));
        assert_eq!(
            counters.held_back_by().as_deref(),
            Some(format!("{who} (as of 34 s ago)").as_str()),
            "the ages are the scan's, 34 s ago"
        );
    }
}
