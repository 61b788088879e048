//! The relay's Kafka producer, replaceable: librdkafka's client context that records what the
//! client reports about the cluster (authentication failures, all brokers down, fatal errors,
//! which never appear on a message, whose own error then reads only "Message timed out"), and
//! the producer slot that is rebuilt when the idempotent producer becomes fatal (librdkafka's
//! "Fatal producer errors": the instance cannot be used again and must be recreated).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};

use crate::text::printable;

/// The `producer` label of `outbox_producer_rebuilds_total` (and the rebuild log) for the main
/// producer.
pub(crate) const MAIN: &str = "main";
/// The label for the prompt producer (`linger.ms` 0, for batches that caught up).
pub(crate) const PROMPT: &str = "prompt";
/// The label for the pipelining producer (an aggregate's events back to back).
pub(crate) const PIPELINING: &str = "pipelining";
/// Every label, each registered at 0.
pub(crate) const LABELS: [&str; 3] = [MAIN, PROMPT, PIPELINING];

/// The relay's producer type.
pub(crate) type RelayProducer = FutureProducer<RelayContext>;

/// A problem the Kafka client reported about the cluster (not about one message), or one of the
/// pipeline's Postgres round trips (`report::PostgresState`): the last error and since when
/// such errors have lasted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientProblem {
    /// librdkafka's error and the broker's or client's reason, e.g. "Local: Authentication
    /// failure: SASL authentication error: … invalid credentials …".
    pub(crate) error: String,
    /// When it was first reported (since the last delivery).
    pub(crate) since: DateTime<Utc>,
}

/// What the Kafka side of the relay reports to health and stats.
#[derive(Debug, Default)]
pub(crate) struct KafkaState {
    /// The last problem the Kafka client reported (error callback, fatal producer) since the
    /// last confirmed delivery.
    client: Mutex<Option<ClientProblem>>,
    /// The last delivery that failed because the cluster was unavailable, since the last
    /// confirmed delivery.
    delivery: Mutex<Option<ClientProblem>>,
    /// Held messages whose delivery reports are overdue, and since when some have been.
    overdue: Mutex<Option<(usize, DateTime<Utc>)>>,
    /// Times the producer was rebuilt after a fatal error.
    pub(crate) rebuilds: AtomicU64,
    /// Times the pipelining producer was purged (see [`Producers::purge_pipe`]).
    pub(crate) pipe_purges: AtomicU64,
    /// The newest generation of pipelining producer the relay purged (0: none): librdkafka makes
    /// a gapless producer whose messages were purged in flight fatal, which is then no problem
    /// (see [`RelayContext::purged_by_the_relay`]).
    purged_pipe: AtomicU64,
    /// Failed attempts that charged no attempt (the cluster was unavailable).
    pub(crate) unavailable: AtomicU64,
    /// Such failures since the last delivery (sets their retry delay).
    streak: std::sync::atomic::AtomicU32,
    /// Per kind of client error: when it was last logged, and how many were left out since
    /// (see [`KafkaState::log_client_error`]).
    logged: Mutex<HashMap<String, (std::time::Instant, u64)>>,
}

/// How often a kind of Kafka client error is logged at most (see
/// [`KafkaState::log_client_error`]).
const CLIENT_ERROR_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Sets `slot` to `error`, keeping the time of a problem already there.
fn record(slot: &Mutex<Option<ClientProblem>>, error: String) {
    ClientProblem::note(&mut slot.lock().unwrap_or_else(|e| e.into_inner()), error);
}

impl ClientProblem {
    /// Makes `error` the problem in `slot`, keeping since when the problems have lasted.
    pub(crate) fn note(slot: &mut Option<ClientProblem>, error: String) {
        let since = slot.as_ref().map_or_else(Utc::now, |p| p.since);
        *slot = Some(ClientProblem { error, since });
    }
}

fn read(slot: &Mutex<Option<ClientProblem>>) -> Option<ClientProblem> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl KafkaState {
    /// Records a problem the Kafka client reported.
    pub(crate) fn problem(&self, error: String) {
        record(&self.client, error);
    }

    /// Records a delivery that failed because the cluster was unavailable (`error`: librdkafka's
    /// error of the message).
    pub(crate) fn unavailable(&self, error: String) {
        self.unavailable.fetch_add(1, Ordering::Relaxed);
        self.streak.fetch_add(1, Ordering::Relaxed);
        record(&self.delivery, error);
    }

    /// Counts `n` held messages as overdue until the returned guard says they settled: the
    /// cluster took them but did not acknowledge them by their batch's end, e.g. too few
    /// in-sync replicas for `acks=all`, where librdkafka retries quietly until
    /// `message.timeout.ms`. Health names it while any is overdue; charges nothing.
    pub(crate) fn overdue(self: &Arc<Self>, n: usize) -> Overdue {
        let mut o = self.overdue.lock().unwrap_or_else(|e| e.into_inner());
        let (count, since) = o.unwrap_or((0, Utc::now()));
        *o = Some((count + n, since));
        Overdue {
            state: self.clone(),
            left: n,
        }
    }

    /// `n` overdue messages settled; `unacknowledged`: without an acknowledgement (purged,
    /// cancelled, or their hold ended with the report still missing) and with nothing else
    /// recorded about them. Such an end is not a delivery: the overdue problem then stays, as a
    /// delivery problem, until a delivery clears it — dropped with the count, health was clear
    /// between a held batch's end and the next batch's overdue reports while nothing was
    /// delivered (CI, a two-of-three-replicas outage).
    fn overdue_settled(&self, n: usize, unacknowledged: bool) {
        let mut o = self.overdue.lock().unwrap_or_else(|e| e.into_inner());
        let since = o.map(|(_, since)| since);
        *o = match *o {
            Some((count, since)) if count > n => Some((count - n, since)),
            _ => None,
        };
        drop(o);
        if let (true, true, Some(since)) = (unacknowledged, n > 0, since) {
            let mut slot = self.delivery.lock().unwrap_or_else(|e| e.into_inner());
            let since = slot.as_ref().map_or(since, |p| p.since.min(since));
            *slot = Some(ClientProblem {
                error: format!(
                    "{n} held message(s) ended without an acknowledgement from Kafka (purged, or their hold of publish_timeout + 1 s ended); the events are sent again"
                ),
                since,
            });
        }
    }

    fn overdue_problem(&self) -> Option<ClientProblem> {
        let o = *self.overdue.lock().unwrap_or_else(|e| e.into_inner());
        o.map(|(count, since)| ClientProblem {
            error: format!(
                "{count} delivery report(s) overdue: Kafka has not acknowledged them by their batch's end (batch_timeout); the events are held until it does (at most publish_timeout + 1 s)"
            ),
            since,
        })
    }

    /// Whether a client error of kind `key` (its code) is to be logged at `now`, and how many
    /// of its kind were left out since it last was: the first of a kind is, then one every
    /// [`CLIENT_ERROR_LOG_EVERY`]. Every producer of the relay reports each broker's failure, and
    /// librdkafka reports it again at every reconnect attempt: with Kafka down the log got about
    /// 8 lines a second (found by a new user). Health names the problem throughout.
    fn log_client_error(&self, key: &str, now: std::time::Instant) -> Option<u64> {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        match logged.get_mut(key) {
            Some((at, left_out)) if now.duration_since(*at) < CLIENT_ERROR_LOG_EVERY => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                // Kinds without a code are keyed by their text: bounded all the same.
                if logged.len() >= 64 {
                    logged.clear();
                }
                logged.insert(key.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// Failures of the cluster since the last delivery.
    pub(crate) fn streak(&self) -> u32 {
        self.streak.load(Ordering::Relaxed)
    }

    /// Nothing is pending in the table (read by `health()`): every event was delivered — by
    /// this relay or another — so this relay's past delivery failures no longer describe the
    /// cluster, unless it still holds messages whose reports are overdue. Cleared, the failure
    /// slot stops an idle relay from reporting an outage that ended while another relay
    /// delivered (found by a breaker helper: two relays, the one with nothing left to send
    /// stayed unhealthy for good). The client's own errors (a refused login, every broker
    /// down) stay until a delivery.
    pub(crate) fn nothing_pending(&self) {
        if self
            .overdue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            *self.delivery.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// A delivery was acknowledged: the cluster works.
    pub(crate) fn delivered(&self) {
        self.streak.store(0, Ordering::Relaxed);
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.delivery.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// What the client last reported, if anything since the last delivery: the cause of
    /// deliveries that fail with only "Message timed out".
    pub(crate) fn client_problem(&self) -> Option<ClientProblem> {
        read(&self.client)
    }

    /// The current problem, if any: the client's report, else the last failed delivery's error,
    /// else the overdue reports; `since` is the earliest of those present.
    pub(crate) fn current(&self) -> Option<ClientProblem> {
        // The first one's text (the most specific), since the earliest.
        [
            read(&self.client),
            read(&self.delivery),
            self.overdue_problem(),
        ]
        .into_iter()
        .flatten()
        .reduce(|first, other| ClientProblem {
            error: first.error,
            since: first.since.min(other.since),
        })
    }
}

/// Held messages counted as overdue (see [`KafkaState::overdue`]); those not yet settled are
/// settled when it is dropped.
pub(crate) struct Overdue {
    state: Arc<KafkaState>,
    left: usize,
}

impl Overdue {
    /// One of the held messages got its report; `unacknowledged`: it ended without an
    /// acknowledgement and nothing else was recorded about it (see
    /// [`KafkaState::overdue_settled`]).
    pub(crate) fn settled_one(&mut self, unacknowledged: bool) {
        if self.left > 0 {
            self.left -= 1;
            self.state.overdue_settled(1, unacknowledged);
        }
    }

    /// The hold ended: the reports still missing are unacknowledged, unless the relay is
    /// stopping (`stopping`: its purges are no sign of a problem).
    pub(crate) fn hold_ended(mut self, stopping: bool) {
        let left = std::mem::take(&mut self.left);
        self.state.overdue_settled(left, !stopping);
    }
}

impl Drop for Overdue {
    fn drop(&mut self) {
        self.state.overdue_settled(self.left, false);
    }
}

/// librdkafka's client context of the relay's producers: logs and records global errors.
#[derive(Clone)]
pub(crate) struct RelayContext {
    state: Arc<KafkaState>,
    /// The generation of the pipelining producer this context belongs to; `None` for the others.
    pipe: Option<u64>,
}

impl RelayContext {
    /// Whether this is a pipelining producer the relay purged itself (on an overdue report, or
    /// at stop). With `enable.gapless.guarantee` librdkafka raises a fatal error ("Local:
    /// Gap-less ordering would not be guaranteed if proceeding: … Purged in flight") for the
    /// messages purged in flight; that producer is discarded anyway and its events are sent
    /// again, so the error is expected: logged at INFO (librdkafka's FATAL line was an ERROR and
    /// its error event a WARN "Kafka client error", 2-7 times per chaos run, where nothing was
    /// wrong beyond what the purge's own warning says), and never the cluster's problem.
    fn purged_by_the_relay(&self) -> bool {
        self.pipe
            .is_some_and(|g| g <= self.state.purged_pipe.load(Ordering::Relaxed))
    }
}

/// Global errors that mean the cluster cannot be used (rather than one connection dropped,
/// which librdkafka also reports and recovers from by itself).
fn is_cluster_problem(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        AllBrokersDown
            | Authentication
            | SaslAuthenticationFailed
            | UnsupportedSASLMechanism
            | SSL
            | Resolve
            | Fatal
            | ClusterAuthorizationFailed
            | TopicAuthorizationFailed
    )
}

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        use RDKafkaLogLevel::*;
        // The pipelining producer sets `enable.gapless.guarantee` on purpose (see
        // `Producers::pipe`); librdkafka warns that it is experimental at each creation.
        if fac == "CONFWARN" && log_message.contains("enable.gapless.guarantee is experimental") {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}");
            return;
        }
        // A broker connection's failure is also raised as an error with the same text, which
        // `error` logs (classified, once): logged here too, every failure showed up twice
        // (found by a new user).
        if fac == "FAIL" {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}");
            return;
        }
        if fac == "FATAL" && self.purged_by_the_relay() {
            tracing::info!(target: "librdkafka", "librdkafka: {fac} {log_message} (expected: the relay purged this pipelining producer and discards it)");
            return;
        }
        // Otherwise as rdkafka's default: librdkafka's syslog level as the log level.
        match level {
            Emerg | Alert | Critical | Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
            Notice | Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka's reasons name brokers, mechanisms and states, never the credentials.
        let text = printable(&format!("{error}: {reason}")).to_string();
        let code = error.rdkafka_error_code();
        if self.purged_by_the_relay() {
            tracing::info!(error = %text, "outbox relay: an error of the pipelining producer the relay purged (expected: librdkafka makes a gapless producer whose messages were purged in flight fatal; it is discarded and its events are sent again)");
            return;
        }
        let kind = code.map_or_else(|| text.clone(), |c| format!("{c:?}"));
        let log = (self.state).log_client_error(&kind, std::time::Instant::now());
        match code {
            Some(code) if is_cluster_problem(code) => {
                if let Some(repeats_not_logged) = log {
                    tracing::error!(error = %text, repeats_not_logged, "outbox relay: Kafka client error (each kind logged every 30 s at most)");
                }
                // "All broker connections are down" follows every other cause (a refused login,
                // a failed TLS handshake): it must not hide it.
                if code != RDKafkaErrorCode::AllBrokersDown || self.state.client_problem().is_none()
                {
                    self.state.problem(text);
                }
            }
            _ => {
                if let Some(repeats_not_logged) = log {
                    tracing::warn!(error = %text, repeats_not_logged, "outbox relay: Kafka client error (each kind logged every 30 s at most)");
                }
            }
        }
    }
}

/// Clears a kick's "running" flag when dropped, on a panic too (see [`Producers::kick`]).
struct Kicking<'a>(&'a AtomicBool);

impl Drop for Kicking<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

/// The longest a kick keeps a producer "flushing" (see [`Producers::kick`]).
const MAX_KICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a kick keeps a producer "flushing" at most: its `linger.ms` (the longest its
/// messages would wait anyway), up to [`MAX_KICK`]; `None` when it does not linger. Shorter was
/// not enough: a producer still without a producer id or the topic's metadata (a fresh
/// pipelining producer) sends nothing until it has them, and a kick over by then left its
/// first messages to the linger.
fn kick_duration(config: &ClientConfig) -> Option<std::time::Duration> {
    let linger = (config.get("linger.ms"))
        .or_else(|| config.get("queue.buffering.max.ms"))
        .and_then(|ms| ms.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms > 0.0)?;
    // At least 1 ms: `rd_kafka_flush` takes whole milliseconds, and 0 returns before a broker
    // thread looks.
    Some(
        std::time::Duration::from_secs_f64(linger / 1000.0)
            .clamp(std::time::Duration::from_millis(1), MAX_KICK),
    )
}

/// Raises librdkafka's "flushing" state of `producer` for at most `within` (until its queue and
/// in-flight requests are empty), which makes its broker threads send what `linger.ms` would
/// hold back. Blocks: call it on a blocking thread.
#[allow(unsafe_code)]
fn send_now(producer: &RelayProducer, within: std::time::Duration) {
    let ms = i32::try_from(within.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `native_ptr` is the producer's live `rd_kafka_t`, which `producer` keeps alive for
    // the call; `rd_kafka_flush` may be called from any thread (librdkafka's API is thread-safe).
    // With rdkafka's event-based delivery reports it only waits for the message count to reach
    // zero (`rd_kafka_curr_msgs_wait_zero`) and serves no queue, so no callback runs here.
    // Its result (timed out, or not) says nothing the relay needs: reports come as usual.
    let _ = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms) };
}

/// Drops a replaced producer on a blocking thread: dropping purges and flushes for up to 500 ms,
/// which must not stall the runtime's async threads.
pub(crate) fn retire(old: RelayProducer) {
    drop(tokio::task::spawn_blocking(move || drop(old)));
}

/// The pipelining producer's `message.timeout.ms` is this many times the main producer's (plus a
/// minute): far beyond the point where the relay purges that producer itself (`publish_timeout`
/// after the batch's cutoff).
pub(crate) const PIPE_MESSAGE_TIMEOUT_FACTOR: u64 = 3;

/// How long runs go one event at a time (on the main producer, warm) after a purge of the
/// pipelining producer, when the last purge was followed by a pipelined delivery (or none came
/// before): a fresh pipelining producer first needs metadata and a producer id, and on a slow
/// broker, or while the cluster cannot hand out producer ids, it would be purged again before its
/// first message was acknowledged — a livelock that one event at a time does not have. Each purge
/// with no pipelined delivery since the previous one doubles the pause, up to [`PIPE_PAUSE_MAX`]
/// (see [`pipe_pause`]): a broker that stays slow gets the long pause, and one blip (a leader
/// election, a broker restart) costs hot aggregates seconds of one-at-a-time sending, not a
/// minute (found by a breaker helper: 5,000 events of a few aggregates took 42–48 s to drain
/// after 7.5 s of broker errors, most of it the fixed 60 s pause this replaces).
pub(crate) const PIPE_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// The longest pause of pipelining after purges in a row (see [`PIPE_PAUSE`]).
pub(crate) const PIPE_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// The pause of pipelining after the `purges`-th purge in a row without a pipelined delivery in
/// between (1 for the first): [`PIPE_PAUSE`], doubling, at most [`PIPE_PAUSE_MAX`].
pub(crate) fn pipe_pause(purges: u32) -> std::time::Duration {
    super::timing::doubling(PIPE_PAUSE, purges, PIPE_PAUSE_MAX)
}

/// The pauses of pipelining after purges (see [`PIPE_PAUSE`]).
#[derive(Default)]
struct PipePause {
    /// Until when runs go one event at a time.
    until: Option<std::time::Instant>,
    /// Purges since the last pipelined delivery of a producer created after the last purge.
    purges: u32,
    /// The generation of the last pipelining producer purged: a late delivery report of it (a
    /// message acknowledged just before the purge) says nothing of a fresh producer.
    purged: u64,
}

/// The current producer and its generation (incremented by each rebuild).
struct Current {
    generation: u64,
    producer: RelayProducer,
    /// This generation's prompt producer (see [`Producers::get`]), created when the relay starts
    /// ([`Producers::warm`]) or else when first needed.
    prompt: Option<RelayProducer>,
}

/// The relay's producer, rebuilt from its configuration when it becomes fatal.
pub(crate) struct Producers {
    config: ClientConfig,
    /// The prompt producer's configuration: the main one's with `linger.ms` 0; `None` when the
    /// main producer does not linger anyway.
    prompt_config: Option<ClientConfig>,
    /// Set when the prompt producer could not be created: the main producer sends everything.
    prompt_refused: std::sync::atomic::AtomicBool,
    context: RelayContext,
    current: RwLock<Current>,
    /// A second producer, created when first needed, that sends one message at a time (see
    /// [`Producers::solo`]).
    solo: tokio::sync::Mutex<Option<RelayProducer>>,
    /// A third producer, created when first needed, for an aggregate's events sent back to back
    /// (see [`Producers::pipe`]), with its generation.
    pipe: Mutex<Option<(u64, RelayProducer)>>,
    pipe_generation: AtomicU64,
    /// Until when runs go one event at a time after a purge (see [`Producers::purge_pipe`]).
    pipe_pause: Mutex<PipePause>,
    /// How long a kick holds each producer (see [`kick_duration`]); `None`: no kicks.
    kick_for: Option<std::time::Duration>,
    /// A kick runs (on a blocking thread), and one was asked for since it started.
    kicking: AtomicBool,
    kick_again: AtomicBool,
}

impl std::fmt::Debug for Producers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration holds credentials: never shown.
        f.debug_struct("Producers").finish_non_exhaustive()
    }
}

impl Producers {
    /// Creates the first producer from `config`; `prompt_config` is the prompt producer's (see
    /// [`Producers::get`]), `None` when `config` does not linger.
    ///
    /// # Errors
    /// librdkafka's error when the configuration is refused.
    pub(crate) fn new(
        config: ClientConfig,
        prompt_config: Option<ClientConfig>,
    ) -> KafkaResult<Producers> {
        let context = RelayContext {
            state: Arc::new(KafkaState::default()),
            pipe: None,
        };
        let producer = config.create_with_context(context.clone())?;
        let kick_for = kick_duration(&config);
        Ok(Producers {
            config,
            prompt_config,
            prompt_refused: std::sync::atomic::AtomicBool::new(false),
            context,
            current: RwLock::new(Current {
                generation: 0,
                producer,
                prompt: None,
            }),
            solo: tokio::sync::Mutex::new(None),
            pipe: Mutex::new(None),
            pipe_generation: AtomicU64::new(0),
            pipe_pause: Mutex::new(PipePause::default()),
            kick_for,
            kicking: AtomicBool::new(false),
            kick_again: AtomicBool::new(false),
        })
    }

    /// The generation of the producer for an aggregate's events sent back to back (pipelined),
    /// created when first needed, and again after [`Producers::replace_pipe`] (when librdkafka
    /// made it fatal: `Ctx::check_pipe_fatal`) and [`Producers::purge_pipe`]. Messages go to it
    /// only through [`Producers::send_pipe`]. Besides the main producer's properties it has
    /// `enable.gapless.guarantee=true` — a permanent error of one record batch makes the producer
    /// fatal and fails every later message, where the plain idempotent producer would bump its
    /// epoch and write the later messages after the failed one, out of order — unlimited
    /// retries (a temporary error that ran out of retries would leave the same gap, and gapless
    /// does not cover it) and a `message.timeout.ms` of [`PIPE_MESSAGE_TIMEOUT_FACTOR`] × the
    /// main producer's plus a minute, so that librdkafka never times out one of its messages
    /// while the relay still waits (a message that times out in librdkafka's queue leaves a gap
    /// that `enable.gapless.guarantee` does not cover either: the next one may be written without
    /// it; librdkafka's INTRODUCTION.md, "Idempotent Producer"). The relay purges it instead
    /// when a held message's report is overdue (`batch::watch_pipes`).
    ///
    /// # Errors
    /// librdkafka's error when the producer cannot be created.
    pub(crate) fn pipe(&self) -> KafkaResult<u64> {
        let mut slot = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, _)) = slot.as_ref() {
            return Ok(*generation);
        }
        let mut config = self.config.clone();
        let timeout_ms: u64 = config
            .get("message.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(30_000);
        config
            .set("enable.gapless.guarantee", "true")
            .set("message.send.max.retries", i32::MAX.to_string())
            .set(
                "message.timeout.ms",
                (timeout_ms * PIPE_MESSAGE_TIMEOUT_FACTOR + 60_000)
                    .min(i32::MAX as u64)
                    .to_string(),
            );
        let generation = self.pipe_generation.load(Ordering::Relaxed) + 1;
        let context = RelayContext {
            state: self.context.state.clone(),
            pipe: Some(generation),
        };
        let producer: RelayProducer = config.create_with_context(context)?;
        self.pipe_generation.store(generation, Ordering::Relaxed);
        *slot = Some((generation, producer));
        Ok(generation)
    }

    /// Hands `record` to the pipelining producer of `generation`, under the lock that
    /// [`Producers::purge_pipe`] and [`Producers::replace_pipe`] take before they purge or retire
    /// it: once that producer is purged, nothing more is queued on it (a message queued after a
    /// purge would be sent with a sequence number past the purged ones, and librdkafka would
    /// bump the epoch and write it without them). When that producer was replaced the record is
    /// refused as `PurgeQueue` (not sent). (The same shape as rdkafka's `send_result`.)
    #[allow(clippy::result_large_err)]
    pub(crate) fn send_pipe<'a>(
        &self,
        generation: u64,
        record: FutureRecord<'a, str, [u8]>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, str, [u8]>)> {
        let slot = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some((g, producer)) if *g == generation => producer.send_result(record),
            _ => Err((
                KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue),
                record,
            )),
        }
    }

    /// The fatal error of the pipelining producer of `generation`, if librdkafka made it fatal:
    /// its code and text.
    pub(crate) fn pipe_fatal_error(&self, generation: u64) -> Option<(RDKafkaErrorCode, String)> {
        let slot = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        let (g, producer) = slot.as_ref()?;
        if *g != generation {
            return None;
        }
        let (code, reason) = producer.client().fatal_error()?;
        Some((code, printable(&format!("{code}: {reason}")).to_string()))
    }

    /// Retires the pipelining producer of `generation` (unless it was already replaced), counted
    /// as a rebuild; the next [`Producers::pipe`] creates a fresh one. Whether it was replaced.
    pub(crate) fn replace_pipe(&self, generation: u64) -> bool {
        let Some(old) = self.take_pipe(generation) else {
            return false;
        };
        retire(old);
        self.context.state.rebuilds.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The relay is about to purge every producer (at stop): a fatal error of the pipelining
    /// producer is then expected (see [`RelayContext::purged_by_the_relay`]).
    pub(crate) fn purging_all(&self) {
        if let Some((generation, _)) = *self.pipe.lock().unwrap_or_else(|e| e.into_inner()) {
            (self.context.state.purged_pipe).fetch_max(generation, Ordering::Relaxed);
        }
    }

    /// Takes the pipelining producer of `generation` out of its slot (under the lock
    /// [`Producers::send_pipe`] sends under), unless it was already replaced.
    fn take_pipe(&self, generation: u64) -> Option<RelayProducer> {
        let mut slot = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some((g, _)) if *g == generation => slot.take().map(|(_, p)| p),
            _ => None,
        }
    }

    /// Whether pipelining is paused after a purge (see [`PIPE_PAUSE`]).
    pub(crate) fn pipe_paused(&self) -> bool {
        let pause = self.pipe_pause.lock().unwrap_or_else(|e| e.into_inner());
        pause.until.is_some_and(|t| std::time::Instant::now() < t)
    }

    /// A message of the pipelining producer of `generation` was acknowledged: when that producer
    /// was created after the last purge, pipelining works again and the next purge's pause is the
    /// first one (see [`pipe_pause`]).
    pub(crate) fn pipe_delivered(&self, generation: u64) {
        let mut pause = self.pipe_pause.lock().unwrap_or_else(|e| e.into_inner());
        if generation > pause.purged {
            pause.purges = 0;
        }
    }

    /// Purges every message of the pipelining producer of `generation` (queued: reported
    /// `PurgeQueue`, never sent; in flight: `PurgeInflight`, possibly written) and retires it;
    /// the next [`Producers::pipe`] creates a fresh one (a new producer id: the purged messages'
    /// sequence numbers are gone), after a pause (see [`PIPE_PAUSE`]). Does nothing when that
    /// producer was already replaced; whether it purged.
    pub(crate) fn purge_pipe(&self, generation: u64) -> bool {
        let Some(old) = self.take_pipe(generation) else {
            return false;
        };
        let (pause, purges) = {
            let mut state = self.pipe_pause.lock().unwrap_or_else(|e| e.into_inner());
            state.purged = state.purged.max(generation);
            state.purges = state.purges.saturating_add(1);
            let (purges, pause) = (state.purges, pipe_pause(state.purges));
            state.until = Some(std::time::Instant::now() + pause);
            (pause, purges)
        };
        self.context
            .state
            .pipe_purges
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
            purges_in_a_row = purges,
            "outbox relay: purging the pipelining producer: a held message's delivery report is overdue; sending each aggregate's events one at a time for a while"
        );
        self.context
            .state
            .purged_pipe
            .fetch_max(generation, Ordering::Relaxed);
        drop(tokio::task::spawn_blocking(move || {
            old.purge(PurgeConfig::default().queue().inflight());
            drop(old);
        }));
        true
    }

    /// The producer for sending a message alone (created when first needed, replaced when
    /// librdkafka made it fatal), behind a lock held while it is checked or created. It puts one
    /// message in each record batch (`batch.num.messages=1`), so a message sent through it is
    /// the only one in its record batch whoever else sends (the main producer batches the
    /// messages of one partition together, and the broker refuses a whole batch when it exceeds
    /// the topic's `max.message.bytes`).
    ///
    /// # Errors
    /// librdkafka's error when the producer cannot be created.
    pub(crate) async fn solo(
        &self,
    ) -> KafkaResult<tokio::sync::MutexGuard<'_, Option<RelayProducer>>> {
        let mut guard = self.solo.lock().await;
        if let Some((code, reason)) = guard.as_ref().and_then(|p| p.client().fatal_error()) {
            tracing::warn!(error = %printable(&format!("{code}: {reason}")), "outbox relay: the solo producer became fatal; replacing it");
            if let Some(old) = guard.take() {
                retire(old);
            }
        }
        if guard.is_none() {
            // One message per record batch whatever else is queued: a message held past its
            // batch's cutoff may still wait in this producer when the next one comes.
            let mut config = self.config.clone();
            config.set("batch.num.messages", "1");
            *guard = Some(config.create_with_context(self.context.clone())?);
        }
        Ok(guard)
    }

    /// Every producer in use: the current one and, once created, the prompt, solo and
    /// pipelining producers (for the flush and purge at stop).
    pub(crate) async fn all(&self) -> Vec<RelayProducer> {
        let mut all = {
            let c = self.current.read().unwrap_or_else(|e| e.into_inner());
            let mut all = vec![c.producer.clone()];
            all.extend(c.prompt.clone());
            all
        };
        all.extend(self.solo.lock().await.clone());
        all.extend((self.pipe.lock().unwrap_or_else(|e| e.into_inner()).clone()).map(|(_, p)| p));
        all
    }

    /// Tells the lingering producers to send what they hold now: called when a batch that
    /// caught up (its scan found fewer rows than it could take) has handed over everything it
    /// can for now and waits for reports (`publish::publish`). Nothing more will join those
    /// messages' produce requests, so waiting out `linger.ms` would only delay them: at 1k
    /// events/s against one broker the 5 ms linger was two thirds of the commit → ack p50
    /// (15 → 3.5–5.8 ms; BENCHMARKS.md, "The kick"). A backlog's batches keep the linger, which
    /// fills their requests.
    ///
    /// How: librdkafka treats `linger.ms` as elapsed while the application is in
    /// `rd_kafka_flush()` ("flushing"; `rdkafka_broker.c`, `rd_kafka_toppar_producer_serve`),
    /// and wakes the broker threads when the call starts. So a blocking thread calls it on each
    /// lingering producer with a timeout of at most the linger ([`kick_duration`]) — it returns
    /// early once that producer's messages are all acknowledged. (rdkafka's own `flush` calls it with timeout 0 in a loop,
    /// which can end before a broker thread looks.) Kicks asked for while one runs make one
    /// more, after it.
    pub(crate) fn kick(self: &Arc<Self>) {
        let Some(within) = self.kick_for else {
            return;
        };
        self.kick_again.store(true, Ordering::SeqCst);
        if self.kicking.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::clone(self);
        drop(tokio::task::spawn_blocking(move || {
            // Whatever happens here (a panic), the next kick may start a task.
            let _done = Kicking(&me.kicking);
            loop {
                me.kick_again.store(false, Ordering::SeqCst);
                // All at once: each call holds its producer until its messages are acknowledged.
                let producers = me.lingering();
                std::thread::scope(|s| {
                    let (first, others) = match producers.split_first() {
                        Some(split) => split,
                        None => return,
                    };
                    for producer in others {
                        // A thread that cannot be started: that producer is kicked after.
                        let spawned = std::thread::Builder::new()
                            .name("outbox-kick".into())
                            .spawn_scoped(s, move || send_now(producer, within));
                        if spawned.is_err() {
                            send_now(producer, within);
                        }
                    }
                    send_now(first, within);
                });
                me.kicking.store(false, Ordering::SeqCst);
                // A kick asked for after the producers were flagged, and not taken by a new task.
                if !me.kick_again.load(Ordering::SeqCst) || me.kicking.swap(true, Ordering::SeqCst)
                {
                    break;
                }
            }
        }));
    }

    /// The producers with a `linger.ms` (all but the prompt one) that hold messages.
    fn lingering(&self) -> Vec<RelayProducer> {
        let mut all = self.all_lingering();
        all.retain(|p| p.in_flight_count() > 0);
        all
    }

    /// The producers with a `linger.ms` (all but the prompt one).
    fn all_lingering(&self) -> Vec<RelayProducer> {
        let mut all = vec![(self.current.read().unwrap_or_else(|e| e.into_inner()))
            .producer
            .clone()];
        all.extend(self.solo.try_lock().ok().and_then(|s| s.clone()));
        all.extend((self.pipe.lock().unwrap_or_else(|e| e.into_inner()).clone()).map(|(_, p)| p));
        all
    }

    /// The shared state behind health and stats.
    pub(crate) fn state(&self) -> &Arc<KafkaState> {
        &self.context.state
    }

    /// The current generation and a producer for a batch's single sends: with `prompt`, the
    /// prompt producer (`linger.ms` 0, created when the relay starts), else the main one (the
    /// configured `linger.ms`). A batch whose reservation's scan found fewer candidates than its
    /// limit has caught up (`reserve::Scan::caught_up`): no more rows were available for its
    /// messages to wait for in librdkafka's queue, so lingering would only delay them (at 1k
    /// events/s against one broker, the 5 ms linger cost 8–10 ms of commit → ack p50:
    /// BENCHMARKS.md, "The prompt producer"), while a backlog's batches keep the linger that
    /// fills produce requests. (An aggregate's run of events sent back to back goes to the
    /// pipelining producer, which keeps the configured linger either way.) The two never hold the same aggregate's messages at
    /// once: an aggregate's next event is sent only after the previous one's report (or on the
    /// pipelining producer), and a later batch only after the fence is gone. A fatal one is
    /// replaced alone ([`Producers::rebuild`]). When the prompt producer cannot be created, the
    /// main producer sends everything (logged once).
    pub(crate) fn get(&self, prompt: bool) -> (u64, RelayProducer) {
        let wants_prompt =
            prompt && self.prompt_config.is_some() && !self.prompt_refused.load(Ordering::Relaxed);
        let generation = {
            let c = self.current.read().unwrap_or_else(|e| e.into_inner());
            match &c.prompt {
                Some(p) if wants_prompt => return (c.generation, p.clone()),
                _ if !wants_prompt => return (c.generation, c.producer.clone()),
                _ => c.generation,
            }
        };
        // Created outside the lock (librdkafka starts its threads, loads certificates), so that
        // sends to the main producer do not wait for it; installed unless a rebuild or another
        // caller came first.
        let config = self.prompt_config.as_ref().expect("checked above");
        let created: KafkaResult<RelayProducer> = config.create_with_context(self.context.clone());
        let mut c = self.current.write().unwrap_or_else(|e| e.into_inner());
        match created {
            Ok(p) if c.generation == generation && c.prompt.is_none() => {
                c.prompt = Some(p.clone());
                (c.generation, p)
            }
            Ok(p) => {
                retire(p);
                let current = c.prompt.clone().unwrap_or_else(|| c.producer.clone());
                (c.generation, current)
            }
            Err(e) => {
                if !self.prompt_refused.swap(true, Ordering::Relaxed) {
                    // librdkafka's text may echo a property's value: secrets are redacted.
                    let text =
                        crate::config::redact_config_error(&e.to_string(), config.config_map());
                    tracing::warn!(error = %printable(&text), "outbox relay: cannot create the prompt producer (linger.ms 0); the main producer sends every batch from now on");
                }
                (c.generation, c.producer.clone())
            }
        }
    }

    /// Creates the prompt producer (if it is configured) and, with `pipe`, the pipelining
    /// producer, unless they exist (a blocking call: librdkafka starts its threads), so that they
    /// have connected and hold a producer id before the first batch that caught up and the first
    /// run of an aggregate's events. A fresh producer sends nothing before it has its producer
    /// id, and librdkafka asks again only every 500 ms after a refusal (a broker that has no block
    /// of producer ids yet answers `COORDINATOR_LOAD_IN_PROGRESS`: KAFKA-14417): a first run
    /// created on demand could then outlast the caught-up batch's kick ([`MAX_KICK`]) and wait
    /// out `linger.ms` (CI saw a run of 4 events arrive after the 8 s linger on the 3-node
    /// cluster). A pipelining producer that cannot be created here is tried again by the first
    /// run.
    pub(crate) fn warm(&self, pipe: bool) {
        if self.prompt_config.is_some() {
            let _warm = self.get(true);
        }
        if pipe {
            let _warm = self.pipe();
        }
    }

    /// The current generation's fatal error, if librdkafka marked its main or prompt producer
    /// fatal: the generation, which producer ([`MAIN`] or [`PROMPT`]) and librdkafka's code and
    /// text.
    pub(crate) fn fatal_error(&self) -> Option<(u64, &'static str, String)> {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        let fatal = (c.producer.client().fatal_error().map(|f| (MAIN, f)))
            .or_else(|| Some((PROMPT, c.prompt.as_ref()?.client().fatal_error()?)));
        fatal.map(|(which, (code, reason))| {
            (
                c.generation,
                which,
                printable(&format!("{code}: {reason}")).to_string(),
            )
        })
    }

    /// Replaces whichever producer of `generation` librdkafka made fatal with a new one (a prompt
    /// producer that cannot be created is left to the next batch that caught up) — unless
    /// another caller already did — and [`retire`]s it: the other one, healthy, keeps its
    /// messages in flight (retiring it would purge them, and re-send what may already be
    /// written). Which were replaced (labels [`MAIN`], [`PROMPT`]), `None` when another caller
    /// already did. Each producer replaced counts one rebuild (as in
    /// `outbox_producer_rebuilds_total`).
    ///
    /// # Errors
    /// librdkafka's error when a new main producer cannot be created; the old one stays.
    pub(crate) fn rebuild(&self, generation: u64) -> KafkaResult<Option<&'static [&'static str]>> {
        let mut c = self.current.write().unwrap_or_else(|e| e.into_inner());
        if c.generation != generation {
            return Ok(None);
        }
        let prompt_fatal = (c.prompt.as_ref()).is_some_and(|p| p.client().fatal_error().is_some());
        let main = c.producer.client().fatal_error().is_some() || !prompt_fatal;
        if main {
            let fresh: RelayProducer = self.config.create_with_context(self.context.clone())?;
            retire(std::mem::replace(&mut c.producer, fresh));
        }
        if prompt_fatal {
            retire(c.prompt.take().expect("checked above"));
            let config = self.prompt_config.as_ref().expect("it existed");
            c.prompt = config.create_with_context(self.context.clone()).ok();
        }
        c.generation += 1;
        let replaced: &'static [&'static str] = match (main, prompt_fatal) {
            (true, true) => &[MAIN, PROMPT],
            (false, true) => &[PROMPT],
            _ => &[MAIN],
        };
        let count = u64::try_from(replaced.len()).unwrap_or(u64::MAX);
        self.context
            .state
            .rebuilds
            .fetch_add(count, Ordering::Relaxed);
        Ok(Some(replaced))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelining_pauses_double_while_purges_follow_each_other() {
        let secs: Vec<u64> = (1..=7).map(|n| pipe_pause(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(pipe_pause(u32::MAX), PIPE_PAUSE_MAX);
    }

    /// The pause after a purge is the first one again only once a pipelining producer created
    /// after that purge delivered; a late report of the purged producer does not count.
    #[tokio::test]
    async fn only_a_fresh_pipelining_producer_s_delivery_ends_the_doubling() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("enable.idempotence", "true");
        let producers = Producers::new(config, None).expect("producers");
        let pause = |p: &Producers| p.pipe_pause.lock().unwrap().purges;
        let first = producers.pipe().expect("pipelining producer");
        producers.purge_pipe(first);
        assert!(producers.pipe_paused());
        assert_eq!(pause(&producers), 1);
        let second = producers.pipe().expect("a fresh one");
        assert!(second > first);
        producers.purge_pipe(second);
        assert_eq!(
            pause(&producers),
            2,
            "purged again with nothing delivered: doubled"
        );
        // The purged producers' late reports say nothing of the next one.
        producers.pipe_delivered(first);
        producers.pipe_delivered(second);
        assert_eq!(pause(&producers), 2);
        // Purging a generation already replaced changes nothing.
        producers.purge_pipe(first);
        assert_eq!(pause(&producers), 2);
        let third = producers.pipe().expect("a fresh one");
        producers.pipe_delivered(third);
        assert_eq!(pause(&producers), 0);
        producers.purge_pipe(third);
        assert_eq!(
            pause(&producers),
            1,
            "after a delivery, the first pause again"
        );
    }

    #[test]
    fn overdue_reports_ending_unacknowledged_stay_a_problem_until_a_delivery() {
        let state = Arc::new(KafkaState::default());
        let mut held = state.overdue(2);
        let since = state
            .current()
            .expect("overdue reports are a problem")
            .since;
        // One is acknowledged late: the other is still overdue.
        held.settled_one(false);
        assert!(state.current().is_some());
        // The hold ends with the other's report missing: not a delivery, the problem stays,
        // since the same time.
        held.hold_ended(false);
        let p = state.current().expect("a hold that ended unacknowledged");
        assert_eq!(p.since, since);
        assert!(
            p.error.contains("without an acknowledgement"),
            "{}",
            p.error
        );
        // Only a delivery clears it.
        state.delivered();
        assert!(state.current().is_none());

        // Purged and settled one by one, without a report recording anything: the same.
        let mut held = state.overdue(1);
        held.settled_one(true);
        drop(held);
        assert!(state.current().is_some());
        state.delivered();

        // Every report came (or the relay is stopping): nothing left behind.
        let mut held = state.overdue(1);
        held.settled_one(false);
        held.hold_ended(false);
        assert!(state.current().is_none());
        state.overdue(3).hold_ended(true);
        assert!(state.current().is_none());
        drop(state.overdue(3));
        assert!(state.current().is_none());
    }

    #[test]
    fn a_kind_of_client_error_is_logged_every_30_s_with_how_many_were_left_out() {
        let state = KafkaState::default();
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        assert_eq!(state.log_client_error("AllBrokersDown", at(0)), Some(0));
        assert_eq!(
            state.log_client_error("AllBrokersDown", at(0)),
            None,
            "the other producer's"
        );
        assert_eq!(
            state.log_client_error("BrokerTransportFailure", at(1)),
            Some(0),
            "another kind"
        );
        for s in 1..30 {
            assert_eq!(state.log_client_error("AllBrokersDown", at(s)), None);
        }
        assert_eq!(state.log_client_error("AllBrokersDown", at(30)), Some(30));
        assert_eq!(state.log_client_error("AllBrokersDown", at(31)), None);
        assert_eq!(state.log_client_error("AllBrokersDown", at(61)), Some(1));
    }
}
