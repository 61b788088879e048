//! What the relay's batch sessions do, sampled from `pg_stat_activity`; checks that
//! `outbox::testing::relay_sql` is what the relay runs.

use crate::env::Env;
use crate::events::load_backlog;
use crate::say;
use anyhow::Result;
use outbox::testing::relay_sql;
use outbox::testing::RelaySql;
use outbox::OnDelivery;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio_postgres::Client;

#[derive(Debug, Clone, Default)]
pub(crate) struct Profile {
    pub(crate) samples: usize,
    pub(crate) phases: Vec<(String, f64)>,
    pub(crate) waits: Vec<(String, f64)>,
    pub(crate) fence_active_pct: f64,
    pub(crate) reserve_text_ok: Option<bool>,
    pub(crate) confirm_text_ok: Option<bool>,
    pub(crate) fence_text_ok: Option<bool>,
}

/// Samples what the relay's batch sessions are doing (pg_stat_activity every `every`): a
/// perf-free time split of a batch between reserve, publish (transaction open, waiting for
/// Kafka), confirm and commit, how often the fence connection is busy; and checks that the
/// relay runs exactly the SQL `outbox::testing::relay_sql` returns.
pub(crate) async fn sample_batches(
    client: Client,
    stop: Arc<AtomicBool>,
    sql: RelaySql,
    every: Duration,
) -> Result<Profile> {
    let mut phases: HashMap<String, usize> = HashMap::new();
    let mut waits: HashMap<String, usize> = HashMap::new();
    let mut samples = 0usize;
    let mut polls = 0usize;
    let mut fence_active = 0usize;
    let (mut reserve_ok, mut confirm_ok, mut fence_ok) = (None, None, None);
    let check = |slot: &mut Option<bool>, what: &str, seen: &str, ours: &str| {
        let same = seen == ours;
        if !same && slot.is_none() {
            eprintln!(
                "WARNING: the relay's {what} SQL differs from outbox::testing::relay_sql(); fix relay_sql in src/testing.rs. The relay ran:\n{seen}"
            );
        }
        *slot = Some(slot.unwrap_or(true) && same);
    };
    let q = "select application_name, state, \
                    coalesce(wait_event_type || ':' || wait_event, 'CPU'), query \
               from pg_stat_activity \
              where application_name in ('outbox-relay-batch', 'outbox-relay-fence')";
    while !stop.load(Ordering::Relaxed) {
        let rows = client.query(q, &[]).await?;
        polls += 1;
        for r in rows {
            let app: String = r.get(0);
            let state: Option<String> = r.get(1);
            let wait: String = r.get(2);
            let query: String = r.get(3);
            // The statements in src/sql/ open with `--` comment lines: classify by the SQL after
            // them (the texts are still compared whole).
            let head = sql_head(&query);
            let state = state.unwrap_or_default();
            if app == "outbox-relay-fence" {
                if state == "active" {
                    fence_active += 1;
                    if head.starts_with("insert") {
                        check(&mut fence_ok, "fence", &query, &sql.fence);
                    }
                }
                continue;
            }
            let phase = match state.as_str() {
                "idle in transaction" => "publish (tx open: fence + relay + Kafka)",
                "idle" => "idle (between batches)",
                "active" => {
                    if head.starts_with("with win") {
                        // A scan from the first pending row runs another reservation, and one
                        // after a failed scan a third; a relay that keeps up, their light forms.
                        let ours = [&sql.reserve_full, &sql.reserve_windowed]
                            .into_iter()
                            .chain(&sql.light_reserve)
                            .find(|s| **s == query)
                            .unwrap_or(&sql.reserve);
                        check(&mut reserve_ok, "reserve", &query, ours);
                        "reserve SQL"
                    } else if head.starts_with("update")
                        || head.starts_with("with delivered")
                        || head.starts_with("with unfenced")
                    {
                        check(&mut confirm_ok, "confirm", &query, &sql.confirm);
                        "confirm SQL"
                    } else if head == "commit" {
                        "commit"
                    } else if head.starts_with("begin") {
                        "begin"
                    } else {
                        "other SQL"
                    }
                }
                _ => "other",
            };
            samples += 1;
            *phases.entry(phase.to_string()).or_default() += 1;
            if state == "active" {
                *waits.entry(format!("{phase} / {wait}")).or_default() += 1;
            }
        }
        tokio::time::sleep(every).await;
    }
    let total = samples.max(1) as f64;
    let mut p: Vec<(String, f64)> = phases
        .into_iter()
        .map(|(k, v)| (k, 100.0 * v as f64 / total))
        .collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut w: Vec<(String, f64)> = waits
        .into_iter()
        .map(|(k, v)| (k, 100.0 * v as f64 / total))
        .collect();
    w.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Profile {
        samples,
        phases: p,
        waits: w,
        fence_active_pct: 100.0 * fence_active as f64 / polls.max(1) as f64,
        reserve_text_ok: reserve_ok,
        confirm_text_ok: confirm_ok,
        fence_text_ok: fence_ok,
    })
}

/// Runs a relay over a small backlog while sampling pg_stat_activity every millisecond, to check
/// that `outbox::testing::relay_sql` returns exactly the statements the relay runs.
pub(crate) async fn verify_sql(env: &Env, delete: bool) -> Result<Profile> {
    let phase = if delete { "sqldel" } else { "sqldone" };
    let table = env.fresh_table(phase).await?;
    let topic = env.create_topic(phase).await?;
    let n = 5_000;
    load_backlog(env, &table, &topic, n).await?;
    let on_delivery = if delete {
        OnDelivery::Delete
    } else {
        OnDelivery::MarkDone
    };
    let outbox = env
        .outbox(&table)
        .on_delivery(on_delivery)
        .connect()
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_batches(
        env.connect("bench-sampler").await?,
        stop.clone(),
        relay_sql(&table, delete),
        Duration::from_millis(1),
    ));
    let handle = outbox.start()?;
    let t = Instant::now();
    while (outbox.stats().delivered as usize) < n && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let profile = sampler.await??;
    outbox.stop(Duration::from_secs(10)).await?;
    let _ = handle.await;
    drop(outbox);
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    say!(
        "  SQL check ({}): reserve {:?}, confirm {:?}, fence {:?}",
        if delete { "delete" } else { "mark done" },
        profile.reserve_text_ok,
        profile.confirm_text_ok,
        profile.fence_text_ok
    );
    Ok(profile)
}

/// `query` without its leading blank and `--` comment lines.
fn sql_head(query: &str) -> &str {
    let mut rest = query.trim_start();
    while rest.starts_with("--") {
        rest = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
    }
    rest
}

pub(crate) fn sql_check(p: &Profile) -> String {
    let ok = |o: Option<bool>| match o {
        Some(true) => "identical",
        Some(false) => "**differs** (this row is not the relay's SQL)",
        None => "not seen",
    };
    format!(
        "reserve {}, fence {}, confirm {}",
        ok(p.reserve_text_ok),
        ok(p.fence_text_ok),
        ok(p.confirm_text_ok)
    )
}
