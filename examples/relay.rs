//! A relay configured from the environment, run until SIGINT/SIGTERM:
//! `cargo run --example relay`.
//!
//! The integration tests run it as a child process they can SIGKILL (`tests/it/faults.rs`).
//!
//! Environment:
//! * `DATABASE_URL` (required), `KAFKA_BROKERS` (required);
//! * `OUTBOX_TABLE`, `OUTBOX_CHANNEL` (default `events` / `outbox`; the table must be migrated);
//! * `OUTBOX_LEASE_MS`, `OUTBOX_PUBLISH_TIMEOUT_MS`, `OUTBOX_BATCH_TIMEOUT_MS`,
//!   `OUTBOX_BATCH_SIZE`, `OUTBOX_POLL_MS`, `OUTBOX_STOP_TIMEOUT_MS` (default 10 s);
//! * `OUTBOX_KAFKA_PROPS`: extra librdkafka producer properties, `k=v,k=v`;
//! * `RUST_LOG` (default `warn,outbox=info`; librdkafka's log has target `librdkafka`).
//!
//! It prints `relay: started` once the relay runs and `relay: stopped ...` (the stop's result and
//! the relay's counters) when it stopped, both on stdout.

use std::time::Duration;

use outbox::Outbox;

fn env_ms(name: &str) -> anyhow::Result<Option<Duration>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            let ms: u64 = v
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}"))?;
            Ok(Some(Duration::from_millis(ms)))
        }
        _ => Ok(None),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,outbox=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let database_url =
        std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("DATABASE_URL is not set"))?;
    let brokers =
        std::env::var("KAFKA_BROKERS").map_err(|_| anyhow::anyhow!("KAFKA_BROKERS is not set"))?;

    let mut builder = Outbox::builder()
        .database_url(&database_url)
        .kafka_brokers(brokers);
    if let Ok(table) = std::env::var("OUTBOX_TABLE") {
        builder = builder.table(table);
    }
    if let Ok(channel) = std::env::var("OUTBOX_CHANNEL") {
        builder = builder.channel(channel);
    }
    if let Some(d) = env_ms("OUTBOX_LEASE_MS")? {
        builder = builder.lease(d);
    }
    if let Some(d) = env_ms("OUTBOX_PUBLISH_TIMEOUT_MS")? {
        builder = builder.publish_timeout(d);
    }
    if let Some(d) = env_ms("OUTBOX_BATCH_TIMEOUT_MS")? {
        builder = builder.batch_timeout(d);
    }
    if let Some(d) = env_ms("OUTBOX_POLL_MS")? {
        builder = builder.poll_interval(d);
    }
    if let Ok(n) = std::env::var("OUTBOX_BATCH_SIZE") {
        builder = builder.batch_size(n.trim().parse()?);
    }
    if let Ok(props) = std::env::var("OUTBOX_KAFKA_PROPS") {
        for kv in props.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("OUTBOX_KAFKA_PROPS: `{kv}` is not k=v"))?;
            builder = builder.kafka_property(k.trim(), v.trim());
        }
    }
    let stop_timeout = env_ms("OUTBOX_STOP_TIMEOUT_MS")?.unwrap_or(Duration::from_secs(10));

    let outbox = builder.connect().await?;
    let relay = outbox.start()?;
    println!("relay: started");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let stopped = outbox.stop(stop_timeout).await;
    let joined = tokio::time::timeout(Duration::from_secs(30), relay).await;
    let stats = outbox.stats();
    println!(
        "relay: stopped stop={:?} joined={} in_flight={} delivered={} confirm_failures={}",
        stopped.as_ref().map_err(|e| e.to_string()),
        matches!(joined, Ok(Ok(Ok(())))),
        stats.in_flight,
        stats.delivered,
        stats.confirm_failures
    );
    // Dropping the last handle destroys the producer (librdkafka logs a warning if messages are
    // still queued then).
    drop(outbox);
    Ok(())
}
