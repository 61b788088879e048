//! The events every phase writes, and the same records for the raw producer.

use crate::env::Env;
use crate::say;
use anyhow::Result;
use outbox::NewEvent;
use outbox::Writer;
use postgres_types::FromSql;
use postgres_types::Type;
use rdkafka::ClientConfig;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub(crate) fn mix(mut x: u64) -> u64 {
    // splitmix64
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub(crate) fn aggregate(i: usize, aggregates: usize) -> String {
    format!("agg-{:05}", mix(i as u64) % aggregates as u64)
}

/// How the events' keys (aggregate ids) are spread: event `i` always gets the same key, so the
/// relay and the raw producer send the same records.
#[derive(Debug, Clone)]
pub(crate) enum Keys {
    /// Uniformly over `n` aggregates (by a hash of the event's index).
    Uniform(usize),
    /// Zipf-distributed over `n` aggregates: P(rank k) ∝ 1 / k^s; `cdf[k - 1]` = P(rank ≤ k).
    Zipf { n: usize, s: f64, cdf: Arc<[f64]> },
}

impl Keys {
    /// Zipf(s) over `n` aggregates (rank 1 is the hottest).
    pub(crate) fn zipf(n: usize, s: f64) -> Keys {
        let weights: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Keys::Zipf { n, s, cdf }
    }

    /// The key of event `i`.
    pub(crate) fn key(&self, i: usize) -> String {
        match self {
            Keys::Uniform(n) => aggregate(i, *n),
            Keys::Zipf { n, cdf, .. } => {
                // A uniform draw in [0, 1) from the event's index, mapped through the CDF.
                let u = (mix(i as u64 ^ 0x2_1f) >> 11) as f64 / (1u64 << 53) as f64;
                let rank = cdf.partition_point(|c| *c <= u).min(n - 1);
                format!("agg-{rank:05}")
            }
        }
    }

    /// "10,000 aggregates (uniform)" / "a Zipf(1.1) mix of 10,000 aggregates".
    pub(crate) fn describe(&self) -> String {
        match self {
            Keys::Uniform(1) => "1 aggregate".into(),
            Keys::Uniform(n) => format!("{} aggregates (uniform)", crate::report::num(*n as f64)),
            Keys::Zipf { n, s, .. } => {
                format!(
                    "a Zipf({s}) mix of {} aggregates",
                    crate::report::num(*n as f64)
                )
            }
        }
    }
}

pub(crate) fn event_type(i: usize) -> &'static str {
    ["OrderPlaced", "OrderPaid", "OrderShipped"][i % 3]
}

pub(crate) fn payload_fields(i: usize) -> (u64, String, u64) {
    let h = mix(i as u64 ^ 0x5eed);
    (
        1 + h % 9,
        format!("sku-{:05}", (h >> 8) % 100_000),
        100 + (h >> 24) % 10_000,
    )
}

pub(crate) const NOTE: &str = "sample note";

pub(crate) fn payload_value(i: usize) -> serde_json::Value {
    let (qty, sku, price) = payload_fields(i);
    serde_json::json!({"n": i, "qty": qty, "sku": sku, "note": NOTE, "price": price, "currency": "EUR"})
}

/// The payload as the relay publishes it: Postgres' `jsonb` text (keys by length, then bytes).
pub(crate) fn payload_jsonb_text(i: usize) -> String {
    let (qty, sku, price) = payload_fields(i);
    format!(
        "{{\"n\": {i}, \"qty\": {qty}, \"sku\": \"{sku}\", \"note\": \"{NOTE}\", \"price\": {price}, \"currency\": \"EUR\"}}"
    )
}

pub(crate) fn new_event(topic: &str, i: usize, keys: &Keys) -> NewEvent {
    NewEvent::new(topic, keys.key(i), event_type(i), payload_value(i))
}

/// Inserts events `from..from + n` (2 connections, 5,000 rows per statement), then ANALYZE and
/// CHECKPOINT so that neither lands in the measurement.
pub(crate) async fn load_backlog(env: &Env, table: &str, topic: &str, n: usize) -> Result<f64> {
    load_backlog_keys(env, table, topic, n, &env.keys()).await
}

/// [`load_backlog`] with keys spread as `keys` says.
pub(crate) async fn load_backlog_keys(
    env: &Env,
    table: &str,
    topic: &str,
    n: usize,
    keys: &Keys,
) -> Result<f64> {
    let t0 = Instant::now();
    let chunk = 5_000usize;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let client = env.connect("bench-loader").await?;
        let writer = Writer::new(table)?;
        let next = next.clone();
        let topic = topic.to_string();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(chunk as u64, Ordering::Relaxed) as usize;
                if start >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let end = (start + chunk).min(n);
                let events: Vec<NewEvent> =
                    (start..end).map(|i| new_event(&topic, i, &keys)).collect();
                writer.add_new_events(&client, &events).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let c = env.connect("bench-admin").await?;
    c.batch_execute(&format!("analyze {table}; checkpoint"))
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    say!(
        "loaded {n} events into {table} in {secs:.1} s ({:.0}/s incl. analyze + checkpoint)",
        n as f64 / secs
    );
    Ok(secs)
}

pub(crate) fn producer_config(brokers: &str) -> ClientConfig {
    // Exactly the relay's producer settings, from the relay itself.
    let mut c = outbox::testing::relay_producer_config(brokers);
    c.set("log_level", "3");
    c
}

/// JSON bytes read without parsing, like the relay's `RawJson`.
#[allow(dead_code)]
pub(crate) struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}
