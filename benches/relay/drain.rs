//! Drain of a preloaded backlog by one in-process relay (RSS and per-segment rates sampled).

use crate::env::Env;
use crate::events::{load_backlog_keys, Keys};
use crate::host::cpu_snap;
use crate::host::cpu_split;
use crate::host::hwm_mb;
use crate::host::reset_hwm;
use crate::host::rss_mb;
use crate::host::CpuSplit;
use crate::profile::sample_batches;
use crate::profile::Profile;
use crate::say;
use anyhow::bail;
use anyhow::Result;
use outbox::testing::relay_sql;
use outbox::OnDelivery;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub(crate) struct Drain {
    pub(crate) n: usize,
    pub(crate) secs: f64,
    pub(crate) rate: f64,
    pub(crate) hwm_mb: f64,
    pub(crate) rss_end_mb: f64,
    pub(crate) rss_samples: Vec<f64>,
    pub(crate) segment_rates: Vec<f64>,
    pub(crate) cpu: CpuSplit,
    pub(crate) profile: Option<Profile>,
}

/// What a drain run loads and how it is watched.
#[derive(Debug, Clone)]
pub(crate) struct DrainSpec {
    pub(crate) phase: String,
    pub(crate) n: usize,
    pub(crate) on_delivery: OnDelivery,
    /// VmRSS and the rate are sampled every this many deliveries.
    pub(crate) sample_every: usize,
    /// Sample `pg_stat_activity` every 10 ms (the profiled drain).
    pub(crate) profile: bool,
    pub(crate) keys: Keys,
    /// A repeatable-read snapshot is taken on another session after the backlog is loaded and
    /// held until the drain ends (the xmin horizon stays behind every row the relay updates).
    pub(crate) hold_snapshot: bool,
}

impl DrainSpec {
    pub(crate) fn new(env: &Env, phase: &str, n: usize, on_delivery: OnDelivery) -> DrainSpec {
        DrainSpec {
            phase: phase.to_string(),
            n,
            on_delivery,
            sample_every: (n / 10).max(1),
            profile: false,
            keys: env.keys(),
            hold_snapshot: false,
        }
    }
}

pub(crate) async fn drain(
    env: &Env,
    phase: &str,
    n: usize,
    on_delivery: OnDelivery,
    sample_every: usize,
    profile: bool,
) -> Result<Drain> {
    let mut spec = DrainSpec::new(env, phase, n, on_delivery);
    spec.sample_every = sample_every;
    spec.profile = profile;
    drain_with(env, &spec).await
}

pub(crate) async fn drain_with(env: &Env, spec: &DrainSpec) -> Result<Drain> {
    let (phase, n, on_delivery) = (spec.phase.as_str(), spec.n, spec.on_delivery);
    let (sample_every, profile) = (spec.sample_every, spec.profile);
    env.note_load(phase).await;
    let table = env.fresh_table(phase).await?;
    let topic = env.create_topic(phase).await?;
    load_backlog_keys(env, &table, &topic, n, &spec.keys).await?;
    let snapshot = if spec.hold_snapshot {
        let c = env.connect("bench-snapshot").await?;
        c.batch_execute(&format!(
            "begin isolation level repeatable read; select count(*) from {table}"
        ))
        .await?;
        Some(c)
    } else {
        None
    };
    let outbox = env
        .outbox(&table)
        .on_delivery(on_delivery)
        .connect()
        .await?;
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = if profile {
        let client = env.connect("bench-sampler").await?;
        let stop = stop_sampler.clone();
        let delete = on_delivery == OnDelivery::Delete;
        Some(tokio::spawn(sample_batches(
            client,
            stop,
            relay_sql(&table, delete),
            Duration::from_millis(10),
        )))
    } else {
        None
    };
    reset_hwm();
    let before = cpu_snap(env).await;
    let t0 = Instant::now();
    let handle = outbox.start()?;
    let mut samples = Vec::new();
    let mut marks = vec![t0];
    let mut next_mark = sample_every;
    let deadline = t0 + Duration::from_secs(120 + n as u64 / 1_000);
    let mut last_say = t0;
    loop {
        let delivered = outbox.stats().delivered as usize;
        while delivered >= next_mark && next_mark <= n {
            samples.push(rss_mb());
            marks.push(Instant::now());
            next_mark += sample_every;
        }
        if delivered >= n {
            break;
        }
        if handle.is_finished() || Instant::now() > deadline {
            bail!("drain {phase}: relay delivered only {delivered} of {n}");
        }
        if last_say.elapsed() > Duration::from_secs(10) {
            say!(
                "  {phase}: {delivered}/{n} delivered, RSS {:.1} MB",
                rss_mb()
            );
            last_say = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = cpu_snap(env).await;
    if let Some(c) = snapshot {
        c.batch_execute("rollback").await?;
    }
    let hwm = hwm_mb();
    let rss_end = rss_mb();
    stop_sampler.store(true, Ordering::Relaxed);
    let profile = match sampler {
        Some(s) => Some(s.await??),
        None => None,
    };
    outbox.stop(Duration::from_secs(10)).await?;
    let _ = handle.await;
    let mut cpu = cpu_split(env, &before, &after);
    cpu.events = n;
    let c = env.connect("bench-admin").await?;
    let left: i64 = c
        .query_one(
            &format!("select count(*) from {table} where status <> 'done'"),
            &[],
        )
        .await?
        .get(0);
    if left != 0 {
        say!("  WARNING {phase}: {left} rows not done after the drain");
    }
    drop(outbox);
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    let segment_rates = segment_rates(&marks, sample_every);
    let d = Drain {
        n,
        secs,
        rate: n as f64 / secs,
        hwm_mb: hwm,
        rss_end_mb: rss_end,
        rss_samples: samples,
        segment_rates,
        cpu,
        profile,
    };
    say!(
        "  {phase}: {} events in {:.2} s = {:.0}/s; VmHWM {:.1} MB; CPU {}",
        n,
        secs,
        d.rate,
        hwm,
        d.cpu.render()
    );
    Ok(d)
}

/// Events per second between consecutive marks, each `every` events apart.
pub(crate) fn segment_rates(marks: &[Instant], every: usize) -> Vec<f64> {
    marks
        .windows(2)
        .map(|w| every as f64 / w[1].duration_since(w[0]).as_secs_f64())
        .collect()
}
