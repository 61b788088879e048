//! `outbox-relay`: run the outbox relay as a process, and operate the outbox table.
//!
//! Configuration comes from flags or the environment (`DATABASE_URL`, `KAFKA_BROKERS`,
//! `OUTBOX_*`); any librdkafka property is passed with `-X key=value`, like kcat.
//!
//! Exit codes (derived in one place, `exit_code`, from the error's predicates): 0 success, 2 bad
//! flags, 3 invalid configuration, 4 Postgres unreachable or the login refused, 5 outbox table
//! missing or not migrated, 1 anything else. An unreachable Kafka does not stop
//! `run`: the relay keeps the events pending, retries, and reports it in its logs and `/health`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox::{
    Admin, DeadLetterPolicy, Error, Event, EventFilter, EventStatus, OnDelivery, Outbox,
    RequeueFilter, WakeMode,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay: Postgres → Kafka"
)]
struct Cli {
    /// Postgres connection string.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Outbox table.
    #[arg(long, env = "OUTBOX_TABLE", default_value = "events", global = true)]
    table: String,
    /// NOTIFY channel.
    #[arg(long, env = "OUTBOX_CHANNEL", default_value = "outbox", global = true)]
    channel: String,
    /// Log format.
    #[arg(
        long,
        env = "OUTBOX_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or upgrade the outbox table (also a table created by the original Go package).
    Migrate,
    /// Run the relay until SIGINT/SIGTERM, then stop gracefully.
    Run(RunArgs),
    /// Backlog per topic: pending, retrying, dead letters, oldest pending age.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Find events (JSON lines on stdout).
    Find(FindArgs),
    /// Requeue dead letters by id, aggregate or topic.
    Requeue(RequeueArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// librdkafka property `key=value` (repeatable), e.g. `-X linger.ms=5`.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    kafka_property: Vec<String>,
    /// Events reserved per batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Messages in flight at most.
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    /// Batches in flight at most.
    #[arg(long, env = "OUTBOX_MAX_BATCHES_IN_FLIGHT")]
    max_batches_in_flight: Option<usize>,
    /// Fallback poll interval (e.g. `2s`, `250ms`).
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    poll_interval: Option<Duration>,
    /// Lease of a reserved batch.
    #[arg(long, env = "OUTBOX_LEASE", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// Producer delivery timeout (message.timeout.ms).
    #[arg(long, env = "OUTBOX_PUBLISH_TIMEOUT", value_parser = humantime::parse_duration)]
    publish_timeout: Option<Duration>,
    /// Wait for delivery reports before confirming a batch.
    #[arg(long, env = "OUTBOX_BATCH_TIMEOUT", value_parser = humantime::parse_duration)]
    batch_timeout: Option<Duration>,
    /// Graceful stop: longest wait for in-flight deliveries.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    shutdown_timeout: Duration,
    /// Failed attempts before an event becomes a dead letter.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
    /// Wake-up mode.
    #[arg(long, env = "OUTBOX_WAKE_MODE", value_enum)]
    wake_mode: Option<WakeArg>,
    /// What a dead letter does to its aggregate.
    #[arg(long, env = "OUTBOX_DEAD_LETTER_POLICY", value_enum)]
    dead_letter_policy: Option<DeadLetterArg>,
    /// What happens to delivered rows.
    #[arg(long, env = "OUTBOX_ON_DELIVERY", value_enum)]
    on_delivery: Option<OnDeliveryArg>,
    /// How long delivered rows are kept.
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Period of the progress log line (0s: off).
    #[arg(long, env = "OUTBOX_PROGRESS_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    progress_interval: Duration,
    /// Run migrations before starting.
    #[arg(long)]
    migrate: bool,
    /// Serve Prometheus metrics at `/metrics` and health at `/health` on this address
    /// (e.g. `127.0.0.1:9464`).
    #[arg(long, env = "OUTBOX_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// `/health` answers 503 when the oldest pending event is older than this.
    #[arg(long, env = "OUTBOX_HEALTH_MAX_PENDING_AGE", value_parser = humantime::parse_duration, default_value = "5m")]
    health_max_pending_age: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WakeArg {
    Notify,
    PollOnly,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeadLetterArg {
    Block,
    Continue,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnDeliveryArg {
    MarkDone,
    Delete,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StatusArg {
    New,
    Done,
    Failed,
}

#[derive(Args, Debug)]
struct FindArgs {
    /// Only this status (repeatable).
    #[arg(long, value_enum)]
    status: Vec<StatusArg>,
    /// Only this aggregate.
    #[arg(long)]
    aggregate: Option<String>,
    /// Only this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only this event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only these ids (repeatable).
    #[arg(long)]
    id: Vec<uuid::Uuid>,
    /// Keyset cursor: only events after this seq.
    #[arg(long)]
    after_seq: Option<i64>,
    /// Page size (1..=10000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(Args, Debug)]
struct RequeueArgs {
    /// Dead letters with these ids (repeatable).
    #[arg(long)]
    id: Vec<uuid::Uuid>,
    /// Dead letters of this aggregate.
    #[arg(long)]
    aggregate: Option<String>,
    /// Dead letters for this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Every dead letter (required when no other selector is given).
    #[arg(long)]
    all: bool,
    /// Show what would be requeued; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = exit_code(&e);
        let message = if code == 4 {
            format!("cannot connect to Postgres: {e}")
        } else {
            e.to_string()
        };
        Failure { code, message }
    }
}

/// The exit code of an error, from its predicates: 3 invalid input, 4 Postgres unreachable (or
/// the login refused), 5 schema problem, 1 anything else.
fn exit_code(e: &Error) -> u8 {
    if e.is_invalid_input() {
        3
    } else if e.is_connection() || matches!(e, Error::Kafka(_)) {
        4
    } else if e.is_schema() {
        5
    } else {
        1
    }
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
        .unwrap_or_else(|_| "info,rdkafka=warn".into());
    // Colours only on a terminal: logs piped to files, journald or collectors stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("outbox-relay: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn pg_config(cli: &Cli) -> Result<tokio_postgres::Config, Failure> {
    let url = cli
        .database_url
        .as_deref()
        .ok_or_else(|| fail(3, "no database: set --database-url or DATABASE_URL"))?;
    url.parse()
        .map_err(|e: tokio_postgres::Error| fail(3, format!("invalid --database-url: {e}")))
}

async fn connect_client(cli: &Cli) -> Result<tokio_postgres::Client, Failure> {
    let cfg = pg_config(cli)?;
    let (client, connection) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| Failure::from(Error::Postgres(e)))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn admin(cli: &Cli) -> Result<Admin, Failure> {
    let cfg = pg_config(cli)?;
    Ok(Admin::connect(cfg, &cli.table).await?)
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Migrate => {
            let client = connect_client(&cli).await?;
            let report = outbox::migrate_table(&client, &cli.table, &cli.channel).await?;
            if let Some(previous) = report.previous_channel() {
                println!(
                    "table {}: notify channel changed from {previous} to {}",
                    cli.table, cli.channel
                );
            }
            if report.applied().is_empty() {
                println!(
                    "table {} is up to date (schema version {})",
                    cli.table,
                    outbox::SCHEMA_VERSION
                );
            } else {
                println!(
                    "table {}: applied migrations {:?}",
                    cli.table,
                    report.applied()
                );
            }
            Ok(())
        }
        Command::Run(args) => run(&cli, args).await,
        Command::Status { json } => {
            let status = admin(&cli).await?.status().await?;
            print_status(&cli.table, &status, *json);
            Ok(())
        }
        Command::Find(args) => {
            let mut f = EventFilter::new()
                .limit(args.limit)
                .ids(args.id.iter().copied());
            for s in &args.status {
                f = f.status(match s {
                    StatusArg::New => EventStatus::New,
                    StatusArg::Done => EventStatus::Done,
                    StatusArg::Failed => EventStatus::Failed,
                });
            }
            if let Some(a) = &args.aggregate {
                f = f.aggregate_id(a);
            }
            if let Some(t) = &args.topic {
                f = f.topic(t);
            }
            if let Some(t) = &args.event_type {
                f = f.event_type(t);
            }
            if let Some(s) = args.after_seq {
                f = f.after_seq(s);
            }
            for e in admin(&cli).await?.find(&f).await? {
                println!("{}", event_json(&e));
            }
            Ok(())
        }
        Command::Requeue(args) => {
            let no_selector =
                args.id.is_empty() && args.aggregate.is_none() && args.topic.is_none();
            if no_selector && !args.all {
                return Err(fail(
                    2,
                    "requeue: give --id, --aggregate or --topic, or --all for every dead letter",
                ));
            }
            let mut filter = RequeueFilter::all().ids(args.id.iter().copied());
            if let Some(a) = &args.aggregate {
                filter = filter.aggregate_id(a);
            }
            if let Some(t) = &args.topic {
                filter = filter.topic(t);
            }
            let admin = admin(&cli).await?;
            if args.dry_run {
                let events = admin.find(&filter.to_event_filter()).await?;
                for e in &events {
                    println!("{}", event_json(e));
                }
                eprintln!("dry run: {} dead letter(s) would be requeued", events.len());
            } else {
                let n = admin.requeue(&filter).await?;
                println!("requeued {n} dead letter(s)");
            }
            Ok(())
        }
    }
}

async fn run(cli: &Cli, args: &RunArgs) -> Result<(), Failure> {
    let token = CancellationToken::new();
    let mut b = Outbox::builder()
        .postgres(pg_config(cli)?)
        .table(&cli.table)
        .channel(&cli.channel)
        .migrate(args.migrate)
        .shutdown_timeout(args.shutdown_timeout)
        .cancellation_token(token.clone());
    if let Some(k) = &args.kafka_brokers {
        b = b.kafka_brokers(k);
    }
    for kv in &args.kafka_property {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| fail(2, format!("-X {kv}: expected key=value")))?;
        b = b.kafka_property(k, v);
    }
    if let Some(n) = args.batch_size {
        b = b.batch_size(n);
    }
    if let Some(n) = args.max_in_flight {
        b = b.max_in_flight(n);
    }
    if let Some(n) = args.max_batches_in_flight {
        b = b.max_batches_in_flight(n);
    }
    if let Some(d) = args.poll_interval {
        b = b.poll_interval(d);
    }
    if let Some(d) = args.lease {
        b = b.lease(d);
    }
    if let Some(d) = args.publish_timeout {
        b = b.publish_timeout(d);
    }
    if let Some(d) = args.batch_timeout {
        b = b.batch_timeout(d);
    }
    if let Some(n) = args.max_attempts {
        b = b.max_attempts(n);
    }
    if let Some(d) = args.retention {
        b = b.retention(d);
    }
    if let Some(w) = args.wake_mode {
        b = b.wake_mode(match w {
            WakeArg::Notify => WakeMode::Notify,
            WakeArg::PollOnly => WakeMode::PollOnly,
        });
    }
    if let Some(p) = args.dead_letter_policy {
        b = b.dead_letter_policy(match p {
            DeadLetterArg::Block => DeadLetterPolicy::BlockAggregate,
            DeadLetterArg::Continue => DeadLetterPolicy::Continue,
        });
    }
    if let Some(o) = args.on_delivery {
        b = b.on_delivery(match o {
            OnDeliveryArg::MarkDone => OnDelivery::MarkDone,
            OnDeliveryArg::Delete => OnDelivery::Delete,
        });
    }
    // Stop gracefully on SIGINT / SIGTERM (also while still connecting).
    {
        let token = token.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received: stopping");
            token.cancel();
        });
    }
    let outbox = b.connect().await?;
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, outbox.clone(), args.health_max_pending_age)?;
    }
    if !args.progress_interval.is_zero() && args.progress_interval < Duration::from_millis(100) {
        return Err(fail(
            3,
            "--progress-interval: at least 100ms (each line runs a status query), or 0s for none",
        ));
    }
    if !args.progress_interval.is_zero() {
        let outbox = outbox.clone();
        let every = args.progress_interval;
        let token = token.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let mut last = 0u64;
            loop {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let stats = outbox.stats();
                let rate = (stats.delivered - last) as f64 / every.as_secs_f64();
                last = stats.delivered;
                match outbox.status().await {
                    Ok(s) => tracing::info!(
                        delivered_per_s = format!("{rate:.0}"),
                        delivered = stats.delivered,
                        backlog = s.pending,
                        oldest_pending_age_s =
                            s.oldest_pending_age.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                        dead_letters = s.dead_letters,
                        listener_connected = stats.listener_connected,
                        "progress"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, delivered = stats.delivered, "progress: status query failed")
                    }
                }
            }
        });
    }
    tracing::info!(table = %cli.table, channel = %cli.channel, "outbox relay running");
    outbox.run().await?;
    Ok(())
}

/// Serves `/metrics` (Prometheus text format) and `/health` (JSON; 200 healthy, 503 not) on a
/// thread of its own.
fn serve_metrics(
    addr: std::net::SocketAddr,
    outbox: Outbox,
    max_pending_age: Duration,
) -> Result<(), Failure> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("outbox_commit_to_ack_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .map_err(|e| fail(1, format!("metrics buckets: {e}")))?
        .install_recorder()
        .map_err(|e| fail(1, format!("metrics recorder: {e}")))?;
    let server = tiny_http::Server::http(addr)
        .map_err(|e| fail(3, format!("--metrics-addr {addr}: {e}")))?;
    let runtime = tokio::runtime::Handle::current();
    tracing::info!(%addr, "serving /metrics and /health");
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let (code, body, content_type) = match request.url() {
                "/metrics" => (200, handle.render(), "text/plain; version=0.0.4"),
                "/health" => {
                    let health = runtime.block_on(outbox.health());
                    match health {
                        Ok(h) => {
                            let healthy = h.is_healthy(max_pending_age);
                            let body = serde_json::json!({
                                "healthy": healthy,
                                "running": h.running,
                                "listener_connected": h.listener_connected,
                                "last_delivery": h.last_delivery,
                                "backlog": h.backlog,
                                "oldest_pending_age_s": h.oldest_pending_age.map(|d| d.as_secs_f64()),
                                "dead_letters": h.dead_letters,
                            });
                            (
                                if healthy { 200 } else { 503 },
                                body.to_string(),
                                "application/json",
                            )
                        }
                        Err(e) => (
                            503,
                            serde_json::json!({"healthy": false, "error": e.to_string()})
                                .to_string(),
                            "application/json",
                        ),
                    }
                }
                _ => (
                    404,
                    "not found: try /metrics or /health\n".to_string(),
                    "text/plain",
                ),
            };
            let header =
                tiny_http::Header::from_bytes("Content-Type", content_type).expect("static header");
            let response = tiny_http::Response::from_string(body)
                .with_status_code(code)
                .with_header(header);
            let _ = request.respond(response);
        }
    });
    Ok(())
}

fn print_status(table: &str, s: &outbox::OutboxStatus, json: bool) {
    let age = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    if json {
        let topics: Vec<_> = s
            .topics
            .iter()
            .map(|t| {
                serde_json::json!({
                    "topic": t.topic, "pending": t.pending, "retrying": t.retrying,
                    "dead_letters": t.dead_letters, "oldest_pending_age_s": age(t.oldest_pending_age),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "table": table, "pending": s.pending, "retrying": s.retrying,
                "dead_letters": s.dead_letters, "oldest_pending_age_s": age(s.oldest_pending_age),
                "open_batches": s.open_batches, "legacy_reservations": s.legacy_reservations,
                "topics": topics,
            })
        );
        return;
    }
    println!(
        "{:<40} {:>10} {:>10} {:>12} {:>18}",
        "TOPIC", "PENDING", "RETRYING", "DEAD", "OLDEST PENDING"
    );
    let fmt_age =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
    for t in &s.topics {
        println!(
            "{:<40} {:>10} {:>10} {:>12} {:>18}",
            t.topic,
            t.pending,
            t.retrying,
            t.dead_letters,
            fmt_age(t.oldest_pending_age)
        );
    }
    println!(
        "{:<40} {:>10} {:>10} {:>12} {:>18}",
        "TOTAL",
        s.pending,
        s.retrying,
        s.dead_letters,
        fmt_age(s.oldest_pending_age)
    );
    println!("open relay batches: {}", s.open_batches);
    if s.legacy_reservations > 0 {
        println!(
            "rows reserved by the original Go relay: {}",
            s.legacy_reservations
        );
    }
}

fn event_json(e: &Event) -> serde_json::Value {
    serde_json::json!({
        "id": e.id(),
        "seq": e.seq(),
        "aggregate_id": e.aggregate_id(),
        "topic": e.topic(),
        "event_type": e.event_type(),
        "payload": e.payload(),
        "headers": e.headers(),
        "status": e.status().as_str(),
        "created_at": e.created_at(),
        "attempts": e.attempts(),
        "last_error": e.last_error(),
        "next_attempt_at": e.next_attempt_at(),
        "published_at": e.published_at(),
        "partition": e.partition(),
        "offset": e.offset(),
    })
}
