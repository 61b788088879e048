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
        "set by the relay on its pipelining producer only (see max_in_flight_per_aggregate); on the main producer a gap fails the aggregate's event and holds it back, which the relay handles itself",
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

/// The producers' `linger.ms` unless a `kafka_property` sets it: librdkafka's own default (and
/// Apache Kafka's since 4.0, KIP-1030). With 1 ms, a 200k-event backlog drain spent 5–7 × the
/// CPU in librdkafka's threads (and more in the brokers) on small produce requests and ran
/// 25–45 % slower on a 3-node cluster sharing the relay's 2 cores (BENCHMARKS.md, "linger.ms
/// and the per-aggregate window"). Batches that caught up do not wait it out: they kick the
/// producers once their messages are handed over (`Producers::kick`).
pub(crate) const DEFAULT_LINGER_MS: &str = "5";

/// Default byte budget of one batch (`max_batch_bytes`): 16 MiB.
pub(crate) const DEFAULT_MAX_BATCH_BYTES: usize = 16 << 20;

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
        "pas", "pwd", "psw", "secret", "token", "key", "cred", "oauth", "jaas", "private", "auth",
        "cert", "pem", "sasl",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// librdkafka's refusal of a configuration, `text`, with the values of `properties` it may echo
/// redacted: those of every property that may hold a secret (see [`is_secret_property`]), and
/// that of a property librdkafka does not know (misspelt beyond any pattern, `sals.pword`, it
/// may still be a secret), which its error names.
pub(crate) fn redact_config_error<'a>(
    text: &str,
    properties: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> String {
    let mut text = text.to_string();
    for (k, v) in properties {
        let unknown = text.contains(&format!("No such configuration property: \"{k}\""));
        if v.is_empty() || !(is_secret_property(k) || unknown) {
            continue;
        }
        text = if v.chars().count() >= 4 {
            text.replace(v.as_str(), "<redacted>")
        } else {
            // A value of a few characters (`sasl.password=e`) is hidden where it stands as a
            // word, not inside every word that contains it: replacing each "e" left
            // `Cli<redacted>nt config <redacted>rror` (found by the new-user helper).
            replace_words(&text, v, "<redacted>")
        };
    }
    text
}

/// `text` with each occurrence of `word` that no letter or digit touches on either side
/// replaced by `with`.
fn replace_words(text: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let (before, after) = (&rest[..at], &rest[at + word.len()..]);
        let touches = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
        let alone = !touches(before.chars().next_back()) && !touches(after.chars().next());
        out.push_str(before);
        out.push_str(if alone { with } else { word });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// How the relay learns about new events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
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
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[non_exhaustive]
pub enum DeadLetterPolicy {
    /// The aggregate is blocked behind its dead letter until it is requeued (order is kept).
    /// The default.
    #[cfg_attr(feature = "cli", value(name = "block", alias = "block-aggregate"))]
    BlockAggregate,
    /// The aggregate's later events go on; the dead letter is skipped (order is broken there).
    Continue,
}

/// What happens to a row once Kafka acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[non_exhaustive]
pub enum OnDelivery {
    /// Mark it `done` with `published_at`, partition and offset; delete it after `retention`.
    /// The default.
    MarkDone,
    /// Delete it at once (fastest; `find` never sees delivered events).
    Delete,
}

/// The relay's settings: one declaration for [`OutboxBuilder`] (its setters and
/// [`settings`](OutboxBuilder::settings)) and the `outbox-relay` binary (with feature `cli`, each
/// field is a `run` flag and an `OUTBOX_*` environment variable: `batch_size` is
/// `--batch-size` / `OUTBOX_BATCH_SIZE`, durations are written `250ms`, `2s`, `1h`).
///
/// [`Settings::default()`] holds the defaults; nothing is checked until
/// [`connect()`](OutboxBuilder::connect), which lists every invalid setting at once. The setters
/// of [`OutboxBuilder`] document each setting in full.
///
/// ```
/// let mut settings = outbox::Settings::default();
/// settings.batch_size = 500;
/// settings.poll_interval = std::time::Duration::from_millis(250);
/// let builder = outbox::Outbox::builder().settings(settings);
/// # drop(builder);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[non_exhaustive]
pub struct Settings {
    /// Outbox table name (a plain lower-case identifier, 1–48 bytes). In the binary, the global
    /// `--table` / `OUTBOX_TABLE` (every subcommand uses it).
    #[cfg_attr(feature = "cli", arg(skip = DEFAULT_TABLE.to_string()))]
    pub table: String,
    /// NOTIFY channel (a plain lower-case identifier, 1–48 bytes). In the binary, the global
    /// `--channel` / `OUTBOX_CHANNEL`.
    #[cfg_attr(feature = "cli", arg(skip = DEFAULT_CHANNEL.to_string()))]
    pub channel: String,
    /// Events reserved per batch, 1..=50000 (a gated backlog's batch: up to this ×
    /// max_batches_in_flight).
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_BATCH_SIZE", default_value_t = Settings::default().batch_size))]
    pub batch_size: usize,
    /// Byte budget of one batch (payloads and headers as JSON text; a batch always takes at
    /// least one event), 1024..=1073741824.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_MAX_BATCH_BYTES", default_value_t = Settings::default().max_batch_bytes))]
    pub max_batch_bytes: usize,
    /// Messages handed to the producer and not yet acknowledged, over all batches, at most;
    /// 1..=1000000.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_MAX_IN_FLIGHT", default_value_t = Settings::default().max_in_flight))]
    pub max_in_flight: usize,
    /// Consecutive events of one aggregate for one topic sent without waiting for their
    /// acknowledgements, at most, 1..=10000 and at most max_in_flight (1: one at a time, a round
    /// trip per event).
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_MAX_IN_FLIGHT_PER_AGGREGATE", default_value_t = Settings::default().max_in_flight_per_aggregate))]
    pub max_in_flight_per_aggregate: usize,
    /// Batches being published at once, 1..=16; each holds one Postgres connection.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_MAX_BATCHES_IN_FLIGHT", default_value_t = Settings::default().max_batches_in_flight))]
    pub max_batches_in_flight: usize,
    /// Fallback poll period, 10ms..=1h (with NOTIFY only a safety net; polling only: the
    /// latency).
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = shown(Settings::default().poll_interval)))]
    pub poll_interval: Duration,
    /// How long a relay may hold a reserved batch, 1s..=24h; at least publish_timeout +
    /// batch_timeout + 1s.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_LEASE", value_parser = humantime::parse_duration, default_value = shown(Settings::default().lease)))]
    pub lease: Duration,
    /// Producer delivery timeout (librdkafka `message.timeout.ms`), 1s..=10min.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_PUBLISH_TIMEOUT", value_parser = humantime::parse_duration, default_value = shown(Settings::default().publish_timeout)))]
    pub publish_timeout: Duration,
    /// How long a batch waits for its delivery reports before confirming what was acknowledged,
    /// 10ms..=publish_timeout.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_BATCH_TIMEOUT", value_parser = humantime::parse_duration, default_value = shown(Settings::default().batch_timeout)))]
    pub batch_timeout: Duration,
    /// How long a graceful stop may take, 0..=10min.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration, default_value = shown(Settings::default().shutdown_timeout)))]
    pub shutdown_timeout: Duration,
    /// How the relay learns about new events.
    #[cfg_attr(feature = "cli", arg(long = "wake-mode", hide_env_values = true, env = "OUTBOX_WAKE_MODE", value_enum, default_value_t = Settings::default().wake))]
    pub wake: WakeMode,
    /// Failed delivery attempts after which an event becomes a dead letter, 1..=1000.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_MAX_ATTEMPTS", default_value_t = Settings::default().max_attempts))]
    pub max_attempts: u32,
    /// Shortest wait before retrying a failed event (doubling, with jitter), 1ms..=24h.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_RETRY_BACKOFF_MIN", value_parser = humantime::parse_duration, default_value = shown(Settings::default().retry_backoff_min)))]
    pub retry_backoff_min: Duration,
    /// Longest wait before retrying a failed event, retry_backoff_min..=24h.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_RETRY_BACKOFF_MAX", value_parser = humantime::parse_duration, default_value = shown(Settings::default().retry_backoff_max)))]
    pub retry_backoff_max: Duration,
    /// What a dead letter does to its aggregate.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_DEAD_LETTER_POLICY", value_enum, default_value_t = Settings::default().dead_letter_policy))]
    pub dead_letter_policy: DeadLetterPolicy,
    /// What happens to delivered rows.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_ON_DELIVERY", value_enum, default_value_t = Settings::default().on_delivery))]
    pub on_delivery: OnDelivery,
    /// How long delivered rows are kept before the relay deletes them, at least 1s.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_RETENTION", value_parser = humantime::parse_duration, default_value = shown(Settings::default().retention)))]
    pub retention: Duration,
    /// Period of the retention cleanup, 100ms..=24h.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_CLEANUP_INTERVAL", value_parser = humantime::parse_duration, default_value = shown(Settings::default().cleanup_interval)))]
    pub cleanup_interval: Duration,
    /// Rows deleted per retention-cleanup step, 1..=1000000.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_CLEANUP_BATCH", default_value_t = Settings::default().cleanup_batch))]
    pub cleanup_batch: usize,
    /// Capacity of each `subscribe` stream, in events, 1..=1000000 (not a flag: the binary has
    /// no subscribers).
    #[cfg_attr(feature = "cli", arg(skip = Settings::default().ack_buffer))]
    pub ack_buffer: usize,
    /// Deadline of every Postgres call, each round trip of the batch pipeline included, and of
    /// connecting, 100ms..=10min.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_POSTGRES_TIMEOUT", value_parser = humantime::parse_duration, default_value = shown(Settings::default().postgres_timeout)))]
    pub postgres_timeout: Duration,
    /// Publish every record in the CloudEvents format (Kafka protocol binding, binary mode)
    /// with this `ce_source`, a URI-reference of at most 1024 bytes; unset: plain records (see
    /// the builder's `cloudevents_source`).
    #[cfg_attr(
        feature = "cli",
        arg(long, hide_env_values = true, env = "OUTBOX_CLOUDEVENTS_SOURCE")
    )]
    pub cloudevents_source: Option<String>,
    /// Send the single events of a batch that caught up (its scan found fewer rows than it could
    /// take) by a prompt producer with `linger.ms` 0 (see the builder's `prompt_producer`; such a
    /// batch kicks its producers anyway, this saves about half a millisecond more). Off by default;
    /// `--prompt-producer` or `=true`/`=false`, `OUTBOX_PROMPT_PRODUCER=true|false|1|0|yes|no|on|off`.
    #[cfg_attr(feature = "cli", arg(long, hide_env_values = true, env = "OUTBOX_PROMPT_PRODUCER", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = clap::builder::BoolishValueParser::new()))]
    pub prompt_producer: bool,
}

/// A duration as the binary's flags write it (`2s`, `1day`), for their `--help` defaults.
#[cfg(feature = "cli")]
fn shown(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            table: DEFAULT_TABLE.to_string(),
            channel: DEFAULT_CHANNEL.to_string(),
            batch_size: 2000,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_in_flight: 10_000,
            max_in_flight_per_aggregate: 1000,
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
            cloudevents_source: None,
            prompt_producer: false,
        }
    }
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
            settings: Settings::default(),
            migrate: false,
            token: None,
        }
    }
}

impl OutboxBuilder {
    /// Postgres connection string (`postgres://user:pass@host:port/db` or `host=… user=…`).
    /// Required (or [`postgres`](Self::postgres)). The password never appears in errors or logs.
    pub fn database_url(mut self, url: &str) -> Self {
        // With the cause (which option is wrong, never its value): tokio-postgres' `Display`
        // leaves it out.
        self.postgres = Some(
            url.parse()
                .map_err(|e: tokio_postgres::Error| crate::error::PgErrorDisplay(&e).to_string()),
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
    /// `security.protocol`), applied after the relay's defaults. The relay's `linger.ms` is 5 ms
    /// (librdkafka's own default); set `linger.ms` (or its alias `queue.buffering.max.ms`) to
    /// change it. It applies to a backlog's batches (a reservation whose scan found as many
    /// candidates as its limit, or reached its byte budget), to an aggregate's events sent back
    /// to back (the pipelining producer) and to events sent alone (the solo producer), where
    /// lingering fills produce requests (BENCHMARKS.md, "linger.ms and the per-aggregate
    /// window"). With [`prompt_producer`](Self::prompt_producer) on, the other events of a
    /// batch that caught up go to a producer of the same properties with `linger.ms` 0,
    /// whatever this sets. Properties the relay owns (`enable.idempotence`, `acks`,
    /// `message.timeout.ms`, `bootstrap.servers`, `delivery.report.only.error`,
    /// `queuing.strategy`, …) are refused at
    /// `connect()` with the setting to use instead, under every alias (`request.required.acks`,
    /// `delivery.timeout.ms`) and in the `topic.` form (`topic.acks`). `partitioner` accepts only
    /// partitioners that map a key to one partition (default `murmur2_random`, the Java
    /// producer's; `random` is refused). The values of properties whose name suggests a secret
    /// (password, secret, token, key, credential, …; misspelt too) never appear in errors or in
    /// this builder's `Debug`.
    pub fn kafka_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_properties.push((key.into(), value.into()));
        self
    }

    /// Every relay setting at once (table and channel included), replacing what earlier setters
    /// set; the setters below change one each. The `outbox-relay` binary builds its relay this
    /// way from its flags and environment.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
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

    /// Publishes every record in the CloudEvents format (the Kafka protocol binding, binary
    /// content mode) with `source` as its `ce_source` (default: off, plain records). The value
    /// stays the payload; `ce_specversion`, `ce_id` (the event id), `ce_source`, `ce_type`,
    /// `ce_subject` (the aggregate id), `ce_time` (`created_at_tz`, RFC 3339 UTC) and
    /// `content-type: application/json` are added as headers, so a CloudEvents SDK's Kafka
    /// deserializer reads the records as they are. In this mode `ce_*` and `content-type` are
    /// reserved header names (a row's custom header of that name is dropped and counted).
    ///
    /// `source` must be a non-empty URI-reference of at most 1,024 bytes with no whitespace,
    /// controls or non-ASCII characters and no password in its user information
    /// (`https://user:password@…`, which every record would publish), e.g. `/orders`,
    /// `urn:acme:orders`, `https://acme.example/orders`; `connect()` rejects anything else.
    pub fn cloudevents_source(mut self, source: impl Into<String>) -> Self {
        self.settings.cloudevents_source = Some(source.into());
        self
    }

    /// Sends the single events of a batch that caught up — its reservation's scan found fewer
    /// candidates than it could take, so no more of this relay's could join their produce
    /// requests — by a second producer of the same properties with `linger.ms` 0, the *prompt
    /// producer* (created when the relay starts) (default: off; no effect with `linger.ms` 0).
    /// At 1k single-event transactions per second against one broker it cut commit → ack p50
    /// from 13.6–15.1 ms to 4.4–6.0 ms; against three (`acks=all`, brokers sharing the relay's
    /// two cores) p50 18–23 → 12–17 ms, but p99 42–62 → 70–130 ms and about 0.3 of a core more
    /// CPU (BENCHMARKS.md, "The prompt producer"). Since then every batch that caught up kicks
    /// the producers once it has handed its messages over, so that they do not wait out the
    /// linger either way (p50 4.5–4.9 ms with this off: BENCHMARKS.md, "The kick"); the prompt
    /// producer only saves the kick's wake-up of librdkafka's broker threads.
    ///
    /// **Why it is off by default:** that p99 and CPU, and partition increases: each of the
    /// relay's producers refreshes its topic metadata on its own, so when partitions are added
    /// to a live topic an aggregate's events may alternate between its old and new partition
    /// until all of them have seen the new count (about one `topic.metadata.refresh.interval.ms`,
    /// 5 min by default). The main and pipelining producers already can; one more producer makes
    /// it likelier (README, "Adding partitions to a live topic").
    pub fn prompt_producer(mut self, on: bool) -> Self {
        self.settings.prompt_producer = on;
        self
    }

    /// Events reserved per batch, 1..=50,000 (default 2,000).
    ///
    /// Each batch pays fixed costs (the reservation's scan, the fence's commit, the wait for its
    /// last acknowledgement, the confirm's commit) and feeds librdkafka in bursts: against three
    /// `acks=all` brokers on a 2-core machine, 2,000-row batches drained 14–27 % faster than
    /// 1,000-row ones in interleaved runs (fuller produce requests: the brokers' CPU per event fell from 14–16 µs to
    /// 9–10 µs), and 5,000 fell back (BENCHMARKS.md, "Batch size"). Smaller batches confirm
    /// sooner in a backlog; at low rates batches are small whatever the setting.
    ///
    /// A batch of a gated backlog may take up to `batch_size` × `max_batches_in_flight` events,
    /// within the same [`max_batch_bytes`](Self::max_batch_bytes) (see
    /// [`max_batches_in_flight`](Self::max_batches_in_flight)).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.settings.batch_size = n;
        self
    }

    /// Byte budget of one batch: the payloads and headers (as JSON text) of the rows one
    /// reservation takes, 1 KiB..=1 GiB (default 16 MiB). A batch takes rows in `seq` order up to
    /// `batch_size` rows and while their running total stays within this budget, but always at
    /// least one row, so an event larger than the budget is still published (alone). The total is
    /// checked on the values as stored (`pg_column_size`, read without decompressing) and then
    /// as JSON text, so that a reservation never prints more than the rows it may keep (a
    /// `jsonb` that is larger stored than printed fills a batch with less text). It bounds
    /// the relay's memory (about `max_batch_bytes × max_batches_in_flight`, plus the producer's
    /// buffers) and the time a reservation takes to fetch, whatever the events' sizes. The
    /// reservation, fetch included, must complete within
    /// [`postgres_timeout`](Self::postgres_timeout): on a slow link to Postgres keep this budget
    /// (and the largest event) well below `postgres_timeout` × the link's bandwidth.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.settings.max_batch_bytes = bytes;
        self
    }

    /// Most messages handed to the producer and not yet acknowledged, over all batches,
    /// 1..=1,000,000 (default 10,000).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.settings.max_in_flight = n;
        self
    }

    /// Most messages of one aggregate handed to the producer and not yet acknowledged,
    /// 1..=10,000 and at most `max_in_flight` (default 1,000: half a default batch; a gated
    /// backlog's batch of one aggregate, up to `batch_size` × `max_batches_in_flight` events, is
    /// sent as a sliding window of this many).
    /// Above 1, an aggregate's consecutive events for the same topic are sent back to back
    /// (pipelined) on a producer of their own that keeps them in order:
    /// idempotent, with `enable.gapless.guarantee` (a permanent error fails every later message
    /// instead of letting one of them be written after the failed one; librdkafka's
    /// INTRODUCTION.md, "Idempotent Producer") and a librdkafka timeout far past the relay's
    /// own (a message that times out in librdkafka's queue may leave a gap; the relay purges
    /// that producer first, see `publish_timeout`). With 1, each event is sent only after the
    /// previous one of its aggregate was acknowledged: a round trip per event.
    pub fn max_in_flight_per_aggregate(mut self, n: usize) -> Self {
        self.settings.max_in_flight_per_aggregate = n;
        self
    }

    /// Batches being published at once, 1..=16 (default 2); each holds one Postgres connection.
    /// With 2, the next batch is reserved while the previous one is in flight.
    ///
    /// A backlog of few aggregates cannot fill a second slot: an aggregate's later events wait
    /// behind its events in flight (the per-aggregate gate of the reservation, and the fences).
    /// When a reservation finds nothing while a full batch is in flight, the relay reserves no
    /// more until that batch is done (a new event of another aggregate waits that long too), and
    /// the next batch may take `batch_size` × `max_batches_in_flight` events, within one
    /// `max_batch_bytes` (so memory stays within `max_batch_bytes` × `max_batches_in_flight` and
    /// the fetch within `postgres_timeout` as for any batch): a batch's fixed costs (the
    /// reservation's scan, the fence's and the confirm's commits, the wait for the last
    /// acknowledgement) are paid once per that many events. While that batch is in flight the
    /// free slots try again, and once a second batch can run the relay goes back to
    /// `batch_size`.
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
    /// (default 10). Permanent errors (message too large, invalid topic or record, policy)
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

    /// Deadline of every Postgres call, 100 ms..=10 min (default 10 s):
    /// [`Outbox::health`](crate::Outbox::health), `status`, `find`, `requeue`, the schema check
    /// at `connect()`, each backlog-gauge update, retention-cleanup step and table-statistics check, each including
    /// connecting when a new connection is needed; and each round trip of the relay's pipeline
    /// (reservation, fence, confirm + commit, rollback, late confirm; the listener's and waker's
    /// pings every 15 s while they wait). A stuck pipeline connection is dropped and replaced;
    /// a stopping relay cuts them short 500 ms after its stop deadline. It is also the connect
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
    ///
    /// # Errors
    /// [`Error::Config`] listing every problem found, not only the first.
    pub(crate) fn validate(&self) -> Result<(crate::pg::Pg, crate::relay::Producers)> {
        let s = &self.settings;
        let mut problems = Vec::new();
        let pg = self.check_endpoints(&mut problems);
        for (what, name) in [("table", &s.table), ("channel", &s.channel)] {
            if let Err(Error::InvalidIdentifier { reason, .. }) = validate_identifier(what, name) {
                problems.push(format!("{what}: {reason}"));
            }
        }
        problems.extend(s.range_problems());
        let kafka = self.kafka_config(&mut problems);
        // Checked even when other settings are wrong, so that every problem is listed at once.
        let producer = self.create_producer(&kafka, &mut problems);
        match (pg, producer) {
            (Some(config), Some(producer)) if problems.is_empty() => {
                let mut pg = crate::pg::Pg::new(config, self.tls.clone(), s.postgres_timeout);
                pg.lease = Some(s.lease);
                Ok((pg, producer))
            }
            _ => Err(Error::Config(ConfigErrors::new(problems))),
        }
    }

    /// The Postgres configuration if it is set and parsed; a problem for a missing or
    /// unparsable one and for missing Kafka brokers.
    fn check_endpoints(&self, problems: &mut Vec<String>) -> Option<tokio_postgres::Config> {
        let pg = match &self.postgres {
            None => {
                problems.push("postgres: not set; call `database_url` or `postgres` (outbox-relay: --database-url or DATABASE_URL)".to_string());
                None
            }
            Some(Err(e)) => {
                problems.push(format!("database_url: {e}"));
                None
            }
            Some(Ok(c)) => {
                if c.get_target_session_attrs()
                    == tokio_postgres::config::TargetSessionAttrs::ReadOnly
                {
                    problems.push(
                        "database_url: target_session_attrs=read-only: the relay writes (reservations, fences, confirms); leave it out or use read-write"
                            .to_string(),
                    );
                }
                Some(c.clone())
            }
        };
        if matches!(
            self.kafka_brokers.as_deref().map(str::trim),
            None | Some("")
        ) {
            problems.push("kafka_brokers: not set; give `host:port[,host:port…]` (outbox-relay: --kafka-brokers or KAFKA_BROKERS)".to_string());
        }
        if let Some(source) = &self.settings.cloudevents_source {
            if let Err(reason) = crate::cloudevents::check_source(source) {
                problems.push(format!("cloudevents_source: {reason}"));
            }
        }
        pg
    }

    /// The producer's configuration: the relay's own properties, then the user's, each checked
    /// against [`OWNED_PROPERTIES`] and [`KEYED_PARTITIONERS`] (a refused one is a problem and is
    /// not set).
    pub(crate) fn kafka_config(&self, problems: &mut Vec<String>) -> ClientConfig {
        let s = &self.settings;
        let mut kafka = ClientConfig::new();
        kafka
            .set(
                "bootstrap.servers",
                self.kafka_brokers.clone().unwrap_or_default(),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
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
            match user_property(k, v) {
                Ok((key, value)) => {
                    kafka.set(key, value);
                }
                Err(problem) => problems.push(problem),
            }
        }
        if !self.user_sets_linger() {
            kafka.set("linger.ms", DEFAULT_LINGER_MS);
        }
        check_queue_capacity(&kafka, problems);
        kafka
    }

    /// Whether a `kafka_property` sets `linger.ms` (or its alias `queue.buffering.max.ms`): then
    /// the relay does not set [`DEFAULT_LINGER_MS`] (librdkafka would apply the two in no
    /// particular order).
    fn user_sets_linger(&self) -> bool {
        self.kafka_properties.iter().any(|(k, _)| {
            matches!(
                canonical_property(k).as_str(),
                "linger.ms" | "queue.buffering.max.ms"
            )
        })
    }

    /// Creates the producer, so that librdkafka validates property names and values; `None`
    /// and a problem (secrets redacted: librdkafka echoes the offending value) when it refuses.
    fn create_producer(
        &self,
        kafka: &ClientConfig,
        problems: &mut Vec<String>,
    ) -> Option<crate::relay::Producers> {
        // Without brokers, or with another problem already found, the configuration is refused
        // anyway: the properties are then only set on a native configuration, which validates
        // each of them too, without creating a client — whose "No `bootstrap.servers`
        // configured" warning, or its first errors resolving or reaching the brokers (logged at
        // once, found by the new-user helper with a mistyped broker host), would precede the
        // clear error. (librdkafka checks properties against each other only when it creates
        // the client: such a problem is listed once the others are fixed.)
        let created = if self.kafka_brokers.is_none() || !problems.is_empty() {
            kafka.create_native_config().map(|_| None)
        } else {
            let prompt = (self.settings.prompt_producer)
                .then(|| prompt_config(kafka))
                .flatten();
            crate::relay::Producers::new(kafka.clone(), prompt).map(Some)
        };
        created.unwrap_or_else(|e| {
            // librdkafka stops at the first property it refuses: each of the user's properties
            // is tried alone too, so that every one it refuses is listed (found by the new-user
            // helper: of two misspelt properties only the first was named). A problem only
            // their combination has is listed as librdkafka reports it.
            let alone: Vec<String> = (self.kafka_properties.iter())
                .filter_map(|(k, v)| {
                    let (key, value) = user_property(k, v).ok()?;
                    let mut one = ClientConfig::new();
                    one.set(key, value);
                    one.create_native_config().err()
                })
                .map(|e| self.kafka_config_problem(&e))
                .collect();
            if alone.is_empty() {
                problems.push(self.kafka_config_problem(&e));
            } else {
                problems.extend(alone);
            }
            None
        })
    }

    /// A problem for librdkafka's refusal `e` of the Kafka configuration, with the user's
    /// property values redacted (librdkafka echoes the offending value).
    fn kafka_config_problem(&self, e: &rdkafka::error::KafkaError) -> String {
        // librdkafka's description names the property and the value already; rdkafka's
        // `Display` appends both again ("… at build time security.protocol SASL_SSL").
        let text = match e {
            rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) if !desc.is_empty() => {
                format!("Client config error: {desc}")
            }
            e => e.to_string(),
        };
        // librdkafka built without OpenSSL names it, not what to do about it (read before the
        // redaction, which may hide part of that word).
        let hint = if cfg!(feature = "kafka-ssl") || !text.to_ascii_lowercase().contains("openssl")
        {
            ""
        } else {
            " (this build has no TLS: build the crate, or outbox-relay, with the `kafka-ssl` feature — `cargo install --locked --path . --features cli,kafka-ssl` for outbox-relay — which links librdkafka with OpenSSL)"
        };
        let text = redact_config_error(&text, self.kafka_properties.iter().map(|(k, v)| (k, v)));
        format!("kafka_property: {text}{hint}")
    }
}

/// The prompt producer's configuration (see `Producers::get`): `kafka` with `linger.ms` 0 in
/// place of whatever set it (the user's property under either name, or the relay's default);
/// `None` when librdkafka's reading of `kafka` does not linger anyway.
fn prompt_config(kafka: &ClientConfig) -> Option<ClientConfig> {
    let linger: f64 = kafka
        .create_native_config()
        .ok()?
        .get("linger.ms")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if linger <= 0.0 {
        return None;
    }
    let mut prompt = kafka.clone();
    let lingers: Vec<String> = (prompt.config_map().keys())
        .filter(|k| {
            matches!(
                canonical_property(k).as_str(),
                "linger.ms" | "queue.buffering.max.ms"
            )
        })
        .cloned()
        .collect();
    for key in lingers {
        prompt.remove(&key);
    }
    prompt.set("linger.ms", "0");
    Some(prompt)
}

/// librdkafka queues a message only when it fits in `queue.buffering.max.kbytes` (else
/// `QueueFull`, even with the queue empty: `rd_kafka_curr_msgs_add`); an event larger than that
/// but within `message.max.bytes` would wait for room forever and hold its aggregate back. The
/// values are librdkafka's own reading of the configuration (its defaults, hex and octal forms);
/// a configuration it refuses is reported by `create_producer`.
fn check_queue_capacity(kafka: &ClientConfig, problems: &mut Vec<String>) {
    let Ok(native) = kafka.create_native_config() else {
        return;
    };
    let number = |key: &str| native.get(key).ok()?.trim().parse::<u64>().ok();
    let (Some(kbytes), Some(max_bytes)) = (
        number("queue.buffering.max.kbytes"),
        number("message.max.bytes"),
    ) else {
        return;
    };
    if kbytes.saturating_mul(1024) < max_bytes {
        problems.push(format!(
            "kafka_property: `queue.buffering.max.kbytes` ({kbytes} KiB) is below `message.max.bytes` ({max_bytes} bytes): an event between the two could never be queued; raise the first or lower the second"
        ));
    }
}

/// A user's librdkafka property as it is set (`partitioner` in one spelling only, so that no
/// other form can win), or the problem that refuses it: a property the relay owns, or a
/// partitioner that does not map a key to one partition.
fn user_property<'a>(
    key: &'a str,
    value: &'a str,
) -> std::result::Result<(&'a str, &'a str), String> {
    let canonical = canonical_property(key);
    let shown = key.escape_debug();
    if let Some((_, instead)) = OWNED_PROPERTIES.iter().find(|(p, _)| *p == canonical) {
        return Err(format!(
            "kafka_property `{shown}`: set by the relay; {instead}"
        ));
    }
    if canonical != "partitioner" {
        return Ok((key, value));
    }
    if !KEYED_PARTITIONERS.contains(&value.trim()) {
        return Err(format!(
            "kafka_property `{shown}`: `{}` does not map a key to one partition, which per-aggregate order needs; use one of {} (default {DEFAULT_PARTITIONER})",
            value.escape_debug(),
            KEYED_PARTITIONERS.join(", ")
        ));
    }
    Ok(("partitioner", value.trim()))
}

impl Settings {
    /// A sentence for each setting outside its range, and for a lease too short for a batch's
    /// delivery reports.
    fn range_problems(&self) -> Vec<String> {
        let s = self;
        let mut problems = Vec::new();
        let ms = |d: Duration| d.as_millis();
        let count = |n: usize| n as u128;
        // (name, value, lowest, highest, unit)
        #[rustfmt::skip]
        let checks: &[(&str, u128, u128, u128, &str)] = &[
            ("batch_size", count(s.batch_size), 1, 50_000, ""),
            ("max_batch_bytes", count(s.max_batch_bytes), 1 << 10, 1 << 30, " bytes"),
            ("max_in_flight", count(s.max_in_flight), 1, 1_000_000, ""),
            ("max_in_flight_per_aggregate", count(s.max_in_flight_per_aggregate), 1, 10_000, ""),
            ("max_batches_in_flight", count(s.max_batches_in_flight), 1, 16, ""),
            ("poll_interval", ms(s.poll_interval), 10, 3_600_000, " ms"),
            ("lease", ms(s.lease), 1_000, 86_400_000, " ms"),
            ("publish_timeout", ms(s.publish_timeout), 1_000, 600_000, " ms"),
            ("batch_timeout", ms(s.batch_timeout), 10, ms(s.publish_timeout).max(10), " ms"),
            ("shutdown_timeout", ms(s.shutdown_timeout), 0, 600_000, " ms"),
            ("max_attempts", u128::from(s.max_attempts), 1, 1_000, ""),
            ("retry_backoff min", ms(s.retry_backoff_min), 1, 86_400_000, " ms"),
            ("retry_backoff max", ms(s.retry_backoff_max), ms(s.retry_backoff_min).max(1), 86_400_000, " ms"),
            ("retention", ms(s.retention), 1_000, u128::from(u64::MAX), " ms"),
            ("cleanup interval", ms(s.cleanup_interval), 100, 86_400_000, " ms"),
            ("cleanup batch", count(s.cleanup_batch), 1, 1_000_000, ""),
            ("ack_buffer", count(s.ack_buffer), 1, 1_000_000, ""),
            ("postgres_timeout", ms(s.postgres_timeout), 100, 600_000, " ms"),
        ];
        for &(name, v, lo, hi, unit) in checks {
            if v < lo || v > hi {
                problems.push(format!(
                    "{name}: {v}{unit} is out of range {lo}..={hi}{unit}"
                ));
            }
        }
        if s.lease < s.publish_timeout + s.batch_timeout + LEASE_MARGIN {
            problems.push(format!(
                "lease: {:?} must be at least publish_timeout ({:?}) + batch_timeout ({:?}) + {:?}, so that every delivery report of a batch arrives before another relay may take it over",
                s.lease, s.publish_timeout, s.batch_timeout, LEASE_MARGIN
            ));
        }
        if s.max_in_flight_per_aggregate > s.max_in_flight {
            problems.push(format!(
                "max_in_flight_per_aggregate: {} is more than max_in_flight ({}), the relay's limit over all aggregates",
                s.max_in_flight_per_aggregate, s.max_in_flight
            ));
        }
        problems
    }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::Settings;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        settings: Settings,
    }

    /// The binary's defaults are the builder's: each is written from `Settings::default()` into
    /// the flag's default and must parse back to the same value.
    #[test]
    fn flag_defaults_are_the_builder_defaults() {
        let parsed = Flags::try_parse_from(["outbox-relay"]).expect("no flags parse");
        assert_eq!(parsed.settings, Settings::default());
    }

    /// Every flag reaches its field (a sample of each kind: number, duration, enum).
    #[test]
    fn flags_set_their_fields() {
        let parsed = Flags::try_parse_from([
            "outbox-relay",
            "--batch-size",
            "7",
            "--poll-interval",
            "250ms",
            "--dead-letter-policy",
            "continue",
            "--wake-mode",
            "poll-only",
            "--on-delivery",
            "delete",
        ])
        .expect("flags parse");
        let s = parsed.settings;
        assert_eq!(s.batch_size, 7);
        assert_eq!(s.poll_interval, std::time::Duration::from_millis(250));
        assert_eq!(s.dead_letter_policy, super::DeadLetterPolicy::Continue);
        assert_eq!(s.wake, super::WakeMode::PollOnly);
        assert_eq!(s.on_delivery, super::OnDelivery::Delete);
    }
}

#[cfg(test)]
mod producer_config_tests {
    use super::*;

    /// A connection string asking for read-only sessions is refused, with every other problem.
    #[test]
    fn read_only_sessions_are_refused() {
        let mut problems = Vec::new();
        let builder = crate::Outbox::builder()
            .database_url("postgres://u@db1,db2/app?target_session_attrs=read-only");
        assert!(builder.check_endpoints(&mut problems).is_some());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("target_session_attrs=read-only"),
            "{problems:?}"
        );
        assert!(problems[1].contains("kafka_brokers"), "{problems:?}");
        let mut problems = Vec::new();
        let fine = crate::Outbox::builder()
            .database_url("postgres://u@db1,db2/app?target_session_attrs=read-write")
            .kafka_brokers("kafka:9092");
        fine.check_endpoints(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    fn kafka_config_of(builder: OutboxBuilder) -> ClientConfig {
        let mut problems = Vec::new();
        let config = builder
            .kafka_brokers("kafka:9092")
            .kafka_config(&mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        config
    }

    /// The relay's `linger.ms` is the default only where the user set none, under either name:
    /// librdkafka applies a configuration's properties in no particular order, so setting both
    /// `linger.ms` and its alias could let the relay's value win.
    #[test]
    fn linger_is_the_users_under_either_name() {
        let default = kafka_config_of(crate::Outbox::builder());
        assert_eq!(default.get("linger.ms"), Some(DEFAULT_LINGER_MS));
        let alias = kafka_config_of(
            crate::Outbox::builder().kafka_property("queue.buffering.max.ms", "50"),
        );
        assert_eq!(alias.get("linger.ms"), None);
        assert_eq!(alias.get("queue.buffering.max.ms"), Some("50"));
        let own = kafka_config_of(crate::Outbox::builder().kafka_property("linger.ms", "0"));
        assert_eq!(own.get("linger.ms"), Some("0"));
    }

    /// The prompt producer is the main one without linger, whichever name set it; none when the
    /// main producer does not linger.
    #[test]
    fn the_prompt_producer_does_not_linger() {
        let native_linger = |c: &ClientConfig| -> f64 {
            let native = c.create_native_config().unwrap();
            native.get("linger.ms").unwrap().trim().parse().unwrap()
        };
        for builder in [
            crate::Outbox::builder(),
            crate::Outbox::builder().kafka_property("queue.buffering.max.ms", "50"),
            crate::Outbox::builder().kafka_property("linger.ms", "20"),
        ] {
            let main = kafka_config_of(builder);
            assert!(native_linger(&main) > 0.0);
            let prompt = prompt_config(&main).expect("the main producer lingers");
            assert_eq!(native_linger(&prompt), 0.0);
            assert_eq!(prompt.get("queue.buffering.max.ms"), None);
            let mut rest = prompt.config_map().clone();
            rest.remove("linger.ms");
            let mut main_rest = main.config_map().clone();
            main_rest.remove("linger.ms");
            main_rest.remove("queue.buffering.max.ms");
            assert_eq!(rest, main_rest, "only the linger differs");
        }
        let own = kafka_config_of(crate::Outbox::builder().kafka_property("linger.ms", "0"));
        assert!(prompt_config(&own).is_none());
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::redact_config_error;

    fn redact(text: &str, props: &[(&str, &str)]) -> String {
        let props: Vec<(String, String)> = props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        redact_config_error(text, props.iter().map(|(k, v)| (k, v)))
    }

    /// A secret of a few characters is hidden where it stands alone, and the words around it
    /// stay readable (before: `Cli<redacted>nt config <redacted>rror` for `sasl.password=e`).
    #[test]
    fn a_short_secret_is_hidden_as_a_word_not_inside_words() {
        let text = "Client config error: Unsupported value \"e\" for configuration property \"sasl.password\": e";
        let got = redact(text, &[("sasl.password", "e")]);
        assert_eq!(
            got,
            "Client config error: Unsupported value \"<redacted>\" for configuration property \"sasl.password\": <redacted>"
        );
    }

    /// A secret of four characters or more is hidden wherever it appears, inside words too.
    #[test]
    fn a_longer_secret_is_hidden_everywhere() {
        let got = redact(
            "bad value hunter2x and xhunter2",
            &[("sasl.password", "hunter2")],
        );
        assert!(!got.contains("hunter2"), "{got}");
    }

    /// Values of properties that are not secret are left alone.
    #[test]
    fn other_values_stay() {
        let got = redact("value 5 for linger.ms", &[("linger.ms", "5")]);
        assert_eq!(got, "value 5 for linger.ms");
    }
}
