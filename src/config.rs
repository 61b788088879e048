//! The builder and the validated settings.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::error::{ConfigErrors, Error, Result};
use crate::relay::timing::LEASE_MARGIN;
use crate::schema::validate_identifier;

/// Default outbox table name (the original Go package's).
pub const DEFAULT_TABLE: &str = "events";
/// Default NOTIFY channel.
pub const DEFAULT_CHANNEL: &str = "outbox";

/// librdkafka properties the relay owns; setting them through
/// [`kafka_property`](OutboxBuilder::kafka_property) is refused, with the setting to use instead.
/// Names are compared after [`canonical_property`]: every alias and the `topic.` form of a
/// topic-level property are refused too (librdkafka applies whichever it sets last).
const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `kafka_brokers`"),
    ("metadata.broker.list", "use `kafka_brokers`"),
    (
        "enable.idempotence",
        "the relay's per-aggregate order and no-duplicate retries need the idempotent producer; it is always on",
    ),
    (
        "enable.gapless.guarantee",
        "the relay handles gaps itself (a failed event holds its aggregate back); a fatal producer error would stop it",
    ),
    ("acks", "the relay always uses acks=all (required by idempotence)"),
    ("request.required.acks", "the relay always uses acks=all"),
    ("message.timeout.ms", "use `publish_timeout`"),
    ("delivery.timeout.ms", "use `publish_timeout`"),
    (
        "transactional.id",
        "the relay uses the idempotent producer, not Kafka transactions",
    ),
    (
        "delivery.report.only.error",
        "the relay confirms each event from its delivery report",
    ),
    (
        "queuing.strategy",
        "the relay needs FIFO order within a partition",
    ),
    (
        "partitioner_cb",
        "use `partitioner` with a key-hashing partitioner",
    ),
];

/// Default `partitioner`: Kafka's own murmur2 hash of the key (Java producer, Kafka Streams,
/// Debezium), so a key lands on the same partition whichever of them writes it.
pub(crate) const DEFAULT_PARTITIONER: &str = "murmur2_random";

/// `partitioner` values accepted: each maps a key to exactly one partition. `random` does not.
const KEYED_PARTITIONERS: &[&str] = &[
    "murmur2_random",
    "murmur2",
    "consistent_random",
    "consistent",
    "fnv1a_random",
    "fnv1a",
];

/// The name librdkafka resolves a property to, for comparison: trimmed, lower-case, without
/// the `topic.` prefix it accepts on topic-level properties (`topic.acks` is `acks`).
fn canonical_property(key: &str) -> String {
    let k = key.trim().to_ascii_lowercase();
    match k.strip_prefix("topic.") {
        // `topic.metadata.*` are global properties of their own.
        Some(rest) if !rest.starts_with("metadata.") && !rest.starts_with("blacklist") => {
            rest.to_string()
        }
        _ => k,
    }
}

/// Whether a property (set or mistyped) may hold a secret: its value is never shown in errors
/// or `Debug`. Errs on the safe side: any name mentioning a password, secret, token, key,
/// credential or the like counts, including unknown and misspelt names (`sasl.passwrd`).
pub(crate) fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "pass", "pwd", "secret", "token", "key", "cred", "oauth", "jaas", "private", "auth",
        "cert", "pem",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// How the relay learns about new events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WakeMode {
    /// LISTEN on the channel; writers' inserts NOTIFY while a relay waits (milliseconds of
    /// latency), with the poll interval as a safety net. The default.
    Notify,
    /// Poll every `poll_interval` only; writers never NOTIFY (for databases where NOTIFY's
    /// commit-time lock hurts). Latency is up to one poll interval.
    PollOnly,
}

/// What happens to an aggregate's later events when one of its events becomes a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterPolicy {
    /// The aggregate is blocked behind its dead letter until it is requeued (order is kept).
    /// The default.
    BlockAggregate,
    /// The aggregate's later events go on; the dead letter is skipped (order is broken there).
    Continue,
}

/// What happens to a row once Kafka acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnDelivery {
    /// Mark it `done` with `published_at`, partition and offset; delete it after `retention`.
    /// The default.
    MarkDone,
    /// Delete it at once (fastest; `find` never sees delivered events).
    Delete,
}

/// Validated settings, shared by the relay's tasks.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) table: String,
    pub(crate) channel: String,
    pub(crate) batch_size: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) max_batches_in_flight: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) lease: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) batch_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) wake: WakeMode,
    pub(crate) max_attempts: u32,
    pub(crate) retry_backoff_min: Duration,
    pub(crate) retry_backoff_max: Duration,
    pub(crate) dead_letter_policy: DeadLetterPolicy,
    pub(crate) on_delivery: OnDelivery,
    pub(crate) retention: Duration,
    pub(crate) cleanup_interval: Duration,
    pub(crate) cleanup_batch: usize,
    pub(crate) ack_buffer: usize,
    pub(crate) postgres_timeout: Duration,
}

/// Builds an [`Outbox`](crate::Outbox): set what you need, then [`connect`](Self::connect).
///
/// Every setter takes and returns the builder by value. Nothing is checked until `connect()`,
/// which reports every invalid setting at once.
#[must_use = "a builder does nothing until `connect()` is awaited"]
pub struct OutboxBuilder {
    pub(crate) postgres: Option<std::result::Result<tokio_postgres::Config, String>>,
    pub(crate) tls: crate::pg::Tls,
    pub(crate) kafka_brokers: Option<String>,
    pub(crate) kafka_properties: Vec<(String, String)>,
    pub(crate) settings: Settings,
    pub(crate) migrate: bool,
    pub(crate) token: Option<CancellationToken>,
}

/// Shows every setting except secrets: the Postgres password (redacted by `tokio_postgres`) and
/// the value of every Kafka property that may hold one (see `is_secret_property`).
impl std::fmt::Debug for OutboxBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kafka_properties: Vec<(&str, &str)> = self
            .kafka_properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        struct Postgres<'a>(&'a Option<std::result::Result<tokio_postgres::Config, String>>);
        impl std::fmt::Debug for Postgres<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.0 {
                    None => f.write_str("None"),
                    Some(Ok(config)) => config.fmt(f),
                    // The parse error of a connection string may quote part of it.
                    Some(Err(_)) => f.write_str("<invalid connection string>"),
                }
            }
        }
        let postgres = Postgres(&self.postgres);
        f.debug_struct("OutboxBuilder")
            .field("postgres", &postgres)
            .field("tls", &self.tls)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("kafka_properties", &kafka_properties)
            .field("settings", &self.settings)
            .field("migrate", &self.migrate)
            .field("token", &self.token)
            .finish()
    }
}

impl Default for OutboxBuilder {
    fn default() -> Self {
        OutboxBuilder {
            postgres: None,
            tls: crate::pg::Tls::None,
            kafka_brokers: None,
            kafka_properties: Vec::new(),
            settings: Settings {
                table: DEFAULT_TABLE.to_string(),
                channel: DEFAULT_CHANNEL.to_string(),
                batch_size: 1000,
                max_in_flight: 10_000,
                max_batches_in_flight: 2,
                poll_interval: Duration::from_secs(2),
                lease: Duration::from_secs(60),
                publish_timeout: Duration::from_secs(30),
                batch_timeout: Duration::from_secs(2),
                shutdown_timeout: Duration::from_secs(10),
                wake: WakeMode::Notify,
                max_attempts: 10,
                retry_backoff_min: Duration::from_millis(500),
                retry_backoff_max: Duration::from_secs(60),
                dead_letter_policy: DeadLetterPolicy::BlockAggregate,
                on_delivery: OnDelivery::MarkDone,
                retention: Duration::from_secs(24 * 3600),
                cleanup_interval: Duration::from_secs(60),
                cleanup_batch: 10_000,
                ack_buffer: 4096,
                postgres_timeout: crate::pg::DEFAULT_TIMEOUT,
            },
            migrate: false,
            token: None,
        }
    }
}

impl OutboxBuilder {
    /// Postgres connection string (`postgres://user:pass@host:port/db` or `host=… user=…`).
    /// Required (or [`postgres`](Self::postgres)). The password never appears in errors or logs.
    pub fn database_url(mut self, url: &str) -> Self {
        self.postgres = Some(
            url.parse()
                .map_err(|e: tokio_postgres::Error| e.to_string()),
        );
        self
    }

    /// Postgres connection settings as a `tokio_postgres::Config`.
    pub fn postgres(mut self, config: tokio_postgres::Config) -> Self {
        self.postgres = Some(Ok(config));
        self
    }

    /// Encrypt every Postgres connection with rustls (feature `postgres-rustls`). `sslmode` in
    /// the connection string decides whether TLS is required (`require`) or tried (`prefer`, the
    /// default). Build the `rustls::ClientConfig` with the roots you trust, e.g. your CA's
    /// certificate or `webpki-roots`.
    #[cfg(feature = "postgres-rustls")]
    pub fn postgres_tls(mut self, tls: rustls::ClientConfig) -> Self {
        self.tls = crate::pg::Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(tls));
        self
    }

    /// Kafka bootstrap servers, comma-separated `host:port` (librdkafka `bootstrap.servers`).
    /// Required.
    pub fn kafka_brokers(mut self, brokers: impl Into<String>) -> Self {
        self.kafka_brokers = Some(brokers.into());
        self
    }

    /// Any librdkafka producer property (e.g. `linger.ms`, `compression.type`,
    /// `security.protocol`), applied after the relay's defaults. Properties the relay owns
    /// (`enable.idempotence`, `acks`, `message.timeout.ms`, `bootstrap.servers`,
    /// `delivery.report.only.error`, `queuing.strategy`, …) are refused at `connect()` with the
    /// setting to use instead, under every alias (`request.required.acks`,
    /// `delivery.timeout.ms`) and in the `topic.` form (`topic.acks`). `partitioner` accepts only
    /// partitioners that map a key to one partition (default `murmur2_random`, the Java
    /// producer's; `random` is refused). The values of properties whose name suggests a secret
    /// (password, secret, token, key, credential, …; misspelt too) never appear in errors or in
    /// this builder's `Debug`.
    pub fn kafka_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_properties.push((key.into(), value.into()));
        self
    }

    /// Outbox table name (default `events`): a plain lower-case identifier, 1–48 bytes.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.settings.table = table.into();
        self
    }

    /// NOTIFY channel (default `outbox`): a plain lower-case identifier, 1–48 bytes. Must match
    /// the channel the table was migrated with.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.settings.channel = channel.into();
        self
    }

    /// Events reserved per batch, 1..=50,000 (default 1,000).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.settings.batch_size = n;
        self
    }

    /// Most messages handed to the producer and not yet acknowledged, over all batches,
    /// 1..=1,000,000 (default 10,000).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.settings.max_in_flight = n;
        self
    }

    /// Batches being published at once, 1..=16 (default 2); each holds one Postgres connection.
    /// With 2, the next batch is reserved while the previous one is in flight.
    pub fn max_batches_in_flight(mut self, n: usize) -> Self {
        self.settings.max_batches_in_flight = n;
        self
    }

    /// Fallback poll period, 10 ms..=1 h (default 2 s). With [`WakeMode::Notify`] it only bounds
    /// the latency of a missed wake-up; with [`WakeMode::PollOnly`] it is the latency.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.settings.poll_interval = d;
        self
    }

    /// How long a relay may hold a reserved batch, 1 s..=24 h (default 60 s). Must be at least
    /// `publish_timeout + batch_timeout + 1 s`: a batch sends only during its first
    /// `batch_timeout`, and each message has its final delivery report within `publish_timeout`
    /// of being sent, so a hung relay's messages are all settled before Postgres ends its session
    /// (`idle_in_transaction_session_timeout = lease`) and another relay takes the rows. A relay
    /// that dies loses its reservations at once (its session ends).
    pub fn lease(mut self, d: Duration) -> Self {
        self.settings.lease = d;
        self
    }

    /// Producer delivery timeout (librdkafka `message.timeout.ms`), 1 s..=10 min (default 30 s):
    /// a message without an acknowledgement after this long fails and is retried later.
    pub fn publish_timeout(mut self, d: Duration) -> Self {
        self.settings.publish_timeout = d;
        self
    }

    /// How long a batch waits for its delivery reports before confirming what was acknowledged,
    /// 10 ms..=`publish_timeout` (default 2 s). Events still unacknowledged then are held: no
    /// relay sends them again until their report arrives or `publish_timeout` passes, and the
    /// other events of the batch go on.
    pub fn batch_timeout(mut self, d: Duration) -> Self {
        self.settings.batch_timeout = d;
        self
    }

    /// How long a stop through the cancellation token may take, 0..=10 min (default 10 s):
    /// in-flight deliveries are awaited for half of it, then the batches are confirmed and the
    /// producer is flushed for the rest. [`Outbox::stop`](crate::Outbox::stop) takes its own
    /// timeout.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.settings.shutdown_timeout = d;
        self
    }

    /// How the relay learns about new events (default [`WakeMode::Notify`]).
    pub fn wake_mode(mut self, mode: WakeMode) -> Self {
        self.settings.wake = mode;
        self
    }

    /// Failed delivery attempts after which an event becomes a dead letter, 1..=1,000
    /// (default 10). Permanent errors (message too large, invalid topic, authorization, policy)
    /// dead-letter at once.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n;
        self
    }

    /// Exponential backoff with jitter between attempts of one event: from `min` (default
    /// 500 ms), doubling, up to `max` (default 60 s); 1 ms ≤ min ≤ max ≤ 24 h.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.settings.retry_backoff_min = min;
        self.settings.retry_backoff_max = max;
        self
    }

    /// What a dead letter does to its aggregate (default [`DeadLetterPolicy::BlockAggregate`]).
    pub fn dead_letter_policy(mut self, policy: DeadLetterPolicy) -> Self {
        self.settings.dead_letter_policy = policy;
        self
    }

    /// What happens to delivered rows (default [`OnDelivery::MarkDone`]).
    pub fn on_delivery(mut self, on_delivery: OnDelivery) -> Self {
        self.settings.on_delivery = on_delivery;
        self
    }

    /// How long delivered rows are kept before the relay deletes them, ≥ 1 s (default 24 h).
    /// Pending and failed rows are never deleted.
    pub fn retention(mut self, d: Duration) -> Self {
        self.settings.retention = d;
        self
    }

    /// Period of the retention cleanup, 100 ms..=24 h (default 60 s); each run deletes in
    /// batches of `cleanup_batch` rows (1..=1,000,000, default 10,000).
    pub fn cleanup(mut self, interval: Duration, batch: usize) -> Self {
        self.settings.cleanup_interval = interval;
        self.settings.cleanup_batch = batch;
        self
    }

    /// Capacity of each [`subscribe`](crate::Outbox::subscribe) stream, in events,
    /// 1..=1,000,000 (default 4,096). A subscriber that falls further behind is told how many it
    /// missed; the relay never waits for subscribers.
    pub fn ack_buffer(mut self, n: usize) -> Self {
        self.settings.ack_buffer = n;
        self
    }

    /// Deadline of every Postgres call outside the relay's batch pipeline, 100 ms..=10 min
    /// (default 10 s): [`Outbox::health`](crate::Outbox::health), `status`, `find`, `requeue`,
    /// the schema check at `connect()`, each backlog-gauge update and each retention-cleanup
    /// step, each including connecting when a new connection is needed. It is also the connect
    /// timeout of every connection unless the connection string sets `connect_timeout`
    /// (tokio-postgres bounds only the TCP connect with it; the crate bounds the whole startup).
    /// A call that misses it fails with [`Error::Timeout`](crate::Error::Timeout) and its
    /// connection is replaced. Every connection also gets TCP keepalives (15 s idle, 5 s
    /// interval, 3 probes) and `tcp_user_timeout = 30 s` unless the connection string sets
    /// `keepalives*` / `tcp_user_timeout`, so a peer that vanished is detected in about 30 s.
    pub fn postgres_timeout(mut self, d: Duration) -> Self {
        self.settings.postgres_timeout = d;
        self
    }

    /// Run [`migrate`](crate::migrate_table) for the table and channel at `connect()`
    /// (default off: `connect()` then only checks the schema).
    pub fn migrate(mut self, yes: bool) -> Self {
        self.migrate = yes;
        self
    }

    /// Stop the relay when this token is cancelled. The relay uses a child token, so
    /// [`Outbox::stop`](crate::Outbox::stop) does not cancel yours.
    pub fn cancellation_token(mut self, token: CancellationToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Checks every setting; returns the Postgres config and the producer (created, so that
    /// librdkafka validates property names and values; it connects in the background).
    pub(crate) fn validate(&self) -> Result<(crate::pg::Pg, crate::relay::Producers)> {
        let s = &self.settings;
        let mut problems = Vec::new();
        let pg = match &self.postgres {
            None => {
                problems.push("postgres: not set; call `database_url` or `postgres`".to_string());
                None
            }
            Some(Err(e)) => {
                problems.push(format!("database_url: {e}"));
                None
            }
            Some(Ok(c)) => Some(c.clone()),
        };
        match self.kafka_brokers.as_deref().map(str::trim) {
            None | Some("") => {
                problems.push("kafka_brokers: not set; give `host:port[,host:port…]`".to_string())
            }
            Some(_) => {}
        }
        for (what, name) in [("table", &s.table), ("channel", &s.channel)] {
            if let Err(Error::InvalidIdentifier { reason, .. }) = validate_identifier(what, name) {
                problems.push(format!("{what}: {reason}"));
            }
        }
        let mut range = |name: &str, v: u128, lo: u128, hi: u128, unit: &str| {
            if v < lo || v > hi {
                problems.push(format!(
                    "{name}: {v}{unit} is out of range {lo}..={hi}{unit}"
                ));
            }
        };
        range("batch_size", s.batch_size as u128, 1, 50_000, "");
        range("max_in_flight", s.max_in_flight as u128, 1, 1_000_000, "");
        range(
            "max_batches_in_flight",
            s.max_batches_in_flight as u128,
            1,
            16,
            "",
        );
        range(
            "poll_interval",
            s.poll_interval.as_millis(),
            10,
            3_600_000,
            " ms",
        );
        range("lease", s.lease.as_millis(), 1_000, 86_400_000, " ms");
        range(
            "publish_timeout",
            s.publish_timeout.as_millis(),
            1_000,
            600_000,
            " ms",
        );
        range(
            "batch_timeout",
            s.batch_timeout.as_millis(),
            10,
            s.publish_timeout.as_millis().max(10),
            " ms",
        );
        range(
            "shutdown_timeout",
            s.shutdown_timeout.as_millis(),
            0,
            600_000,
            " ms",
        );
        range("max_attempts", u128::from(s.max_attempts), 1, 1_000, "");
        range(
            "retry_backoff min",
            s.retry_backoff_min.as_millis(),
            1,
            86_400_000,
            " ms",
        );
        range(
            "retry_backoff max",
            s.retry_backoff_max.as_millis(),
            s.retry_backoff_min.as_millis().max(1),
            86_400_000,
            " ms",
        );
        range(
            "retention",
            s.retention.as_millis(),
            1_000,
            u128::from(u64::MAX),
            " ms",
        );
        range(
            "cleanup interval",
            s.cleanup_interval.as_millis(),
            100,
            86_400_000,
            " ms",
        );
        range("cleanup batch", s.cleanup_batch as u128, 1, 1_000_000, "");
        range("ack_buffer", s.ack_buffer as u128, 1, 1_000_000, "");
        range(
            "postgres_timeout",
            s.postgres_timeout.as_millis(),
            100,
            600_000,
            " ms",
        );
        if s.lease < s.publish_timeout + s.batch_timeout + LEASE_MARGIN {
            problems.push(format!(
                "lease: {:?} must be at least publish_timeout ({:?}) + batch_timeout ({:?}) + {:?}, so that every delivery report of a batch arrives before another relay may take it over",
                s.lease, s.publish_timeout, s.batch_timeout, LEASE_MARGIN
            ));
        }
        let mut kafka = ClientConfig::new();
        kafka
            .set(
                "bootstrap.servers",
                self.kafka_brokers.clone().unwrap_or_default(),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("partitioner", DEFAULT_PARTITIONER)
            .set("compression.type", "none")
            // Fail a record for a topic the broker does not know well before `publish_timeout`,
            // so that the error names the unknown topic (and is retried with backoff) instead
            // of reading "message timed out". librdkafka's default is 30 s.
            .set(
                "topic.metadata.propagation.max.ms",
                (s.publish_timeout / 2)
                    .min(std::time::Duration::from_secs(5))
                    .as_millis()
                    .to_string(),
            )
            .set(
                "message.timeout.ms",
                s.publish_timeout
                    .as_millis()
                    .min(i32::MAX as u128)
                    .to_string(),
            );
        for (k, v) in &self.kafka_properties {
            let canonical = canonical_property(k);
            let shown = k.escape_debug();
            if let Some((_, instead)) = OWNED_PROPERTIES.iter().find(|(p, _)| *p == canonical) {
                problems.push(format!(
                    "kafka_property `{shown}`: set by the relay; {instead}"
                ));
                continue;
            }
            if canonical == "partitioner" {
                if !KEYED_PARTITIONERS.contains(&v.trim()) {
                    problems.push(format!(
                        "kafka_property `{shown}`: `{}` does not map a key to one partition, which per-aggregate order needs; use one of {} (default {DEFAULT_PARTITIONER})",
                        v.escape_debug(),
                        KEYED_PARTITIONERS.join(", ")
                    ));
                    continue;
                }
                // One spelling only, so that no other form can win.
                kafka.set("partitioner", v.trim());
                continue;
            }
            kafka.set(k, v);
        }
        // librdkafka validates property names and values when a client is created.
        // Checked even when other settings are wrong, so that every problem is listed at once.
        // Without brokers the configuration is refused anyway (listed above): the properties are
        // then only set on a native configuration, which validates them too, without creating a
        // client, whose "No `bootstrap.servers` configured" warning would precede the clear error.
        let created = if self.kafka_brokers.is_none() {
            kafka.create_native_config().map(|_| None)
        } else {
            crate::relay::Producers::new(kafka).map(Some)
        };
        let producer = match created {
            Ok(p) => p,
            Err(e) => {
                // librdkafka echoes the offending value; never echo a secret.
                let mut text = e.to_string();
                for (k, v) in &self.kafka_properties {
                    if is_secret_property(k) && !v.is_empty() {
                        text = text.replace(v.as_str(), "<redacted>");
                    }
                }
                problems.push(format!("kafka_property: {text}"));
                None
            }
        };
        match (pg, producer) {
            (Some(config), Some(producer)) if problems.is_empty() => Ok((
                {
                    let mut pg = crate::pg::Pg::new(config, self.tls.clone(), s.postgres_timeout);
                    pg.lease = Some(s.lease);
                    pg
                },
                producer,
            )),
            _ => Err(Error::Config(ConfigErrors::new(problems))),
        }
    }
}
