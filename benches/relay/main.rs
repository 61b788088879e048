//! Relay benchmark: one invocation measures drain throughput against its ceilings, commit→ack
//! latency, the wake path's cost to writers, the original Go algorithm as a baseline and RSS over
//! a 1M-event drain (in this process, and by the `outbox-relay` binary), against real Postgres (fsync on) and the tansu broker on loopback.
//!
//! ```text
//! cargo bench --bench relay --features testing,cli                   # full mode (≈ 5 min when quiet)
//! cargo bench --bench relay --features testing,cli -- --short        # smoke run (≈ 2 min)
//! OUTBOX_BENCH=short cargo bench --bench relay --features testing,cli
//! cargo bench --bench relay --features testing,cli -- --write        # also update BENCHMARKS.md
//! ```
//!
//! Flags (after `--`; `-- --help` lists them all, parsed by clap in `opts.rs`): `--short`,
//! `--write`, `--only drain,delete,million,kafka,pg,burst,profile,latency,wake,baseline,keys,
//! latency-max,snapshot,debezium,million-bin` (a subset), `--snapshot-secs S`, `--million N`,
//! `--no-recorder`, `--broker TEXT`, `--broker-pid PID`, `--explain` (print the reservation's
//! EXPLAIN ANALYZE plans), `--wait-idle SECS` (on a shared machine, wait up to SECS before each
//! phase for other load to stop), and relay overrides
//! recorded in the table: `--batch-size N`, `--batches-in-flight N`, `--kafka-property key=value`,
//! `--aggregates N` (default 10,000), `--pg-setting name=value` (throwaway server only).
//! Environment: `DATABASE_URL` (use this database instead of a throwaway fsync-on server),
//! `KAFKA_BROKERS` (use this broker instead of starting tansu), `TANSU` (tansu binary),
//! `OUTBOX_BENCH_PARTITIONS` (topic partitions, default 8); for investigation only:
//! `OUTBOX_BENCH_KEEP_TABLES=1` (keep the tables, with `DATABASE_URL`), `OUTBOX_BENCH_DEBUG_CPU=1`
//! (print the CPU split per Postgres process).
//!
//! One module per scenario (`drain`, `keys`, `burst`, `snapshot`, `ceilings`, `profile`,
//! `latency`, `wake`, `baseline`, `million` (also `million-bin`, the binary), `debezium`); the shared harness is `env` (servers, tables, topics), `events` (the records),
//! `host` (load, RSS, CPU split), `report` (the table) and `opts` (flags).
//!
//! Progress goes to stderr, the result table to stdout. BENCHMARKS.md explains every row.

mod baseline;
mod burst;
mod ceilings;
mod debezium;
mod drain;
mod env;
mod events;
mod host;
mod keys;
mod latency;
mod million;
mod opts;
mod profile;
mod report;
mod snapshot;
mod tansu;
mod wake;

use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Result};
use outbox::OnDelivery;

use crate::baseline::baseline;
use crate::burst::burst;
use crate::ceilings::{kafka_ceiling, pg_ceiling};
use crate::debezium::debezium;
use crate::drain::drain;
use crate::env::{setup, Env};
use crate::host::loadavg;
use crate::keys::key_spread;
use crate::latency::{latency, latency_max};
use crate::million::{install_prometheus, million_bin};
use crate::opts::{Opts, Phase};
use crate::report::{header, table, write_benchmarks_md, Results};
use crate::snapshot::held_snapshot;
use crate::wake::wake_cost;

/// The bench's start, for the progress lines' timestamps.
pub(crate) fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Progress to stderr, stamped with the seconds since the start.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("[bench {:>6.1}s] {}", $crate::started().elapsed().as_secs_f64(), format!($($arg)*))
    };
}

async fn run(env: &Env, r: &mut Results) {
    let o = env.opts.clone();
    // Pinned or not as `--pin-phases` says, before the phase's load check and setup.
    macro_rules! pin {
        ($phase:expr) => {
            if let Err(e) = env.pin_for($phase) {
                say!("pinning for {:?} failed: {e:#}", $phase);
                r.errors.push(format!("pinning for {:?}: {e:#}", $phase));
            }
        };
    }
    macro_rules! attempt {
        ($name:expr, $e:expr) => {
            match $e.await {
                Ok(v) => Some(v),
                Err(e) => {
                    say!("phase {} failed: {e:#}", $name);
                    r.errors.push(format!("{}: {e:#}", $name));
                    None
                }
            }
        };
    }
    if o.runs(Phase::Drain) {
        pin!(Phase::Drain);
        say!("drain: {} events, default settings (MarkDone)", o.n);
        r.drain = attempt!(
            "drain",
            drain(env, "drain", o.n, OnDelivery::MarkDone, o.n / 10, false)
        );
    }
    if o.runs(Phase::Delete) {
        pin!(Phase::Delete);
        say!("drain: {} events, OnDelivery::Delete", o.n);
        r.delete = attempt!(
            "delete",
            drain(env, "delete", o.n, OnDelivery::Delete, o.n / 10, false)
        );
    }
    if o.runs(Phase::Kafka) {
        pin!(Phase::Kafka);
        say!("ceiling (a): raw producer, {} records", o.n);
        r.kafka = attempt!("kafka", kafka_ceiling(env, o.n));
    }
    if o.runs(Phase::Pg) {
        pin!(Phase::Pg);
        say!("ceiling (b): reserve + confirm SQL, {} rows, MarkDone", o.n);
        r.pg_done = attempt!("pg", pg_ceiling(env, o.n, false));
        say!("ceiling (b): reserve + confirm SQL, {} rows, Delete", o.n);
        r.pg_delete = attempt!("pg delete", pg_ceiling(env, o.n, true));
    }
    if o.runs(Phase::Drain)
        && o.pin_phases
            .as_ref()
            .is_some_and(|p| p.contains(&Phase::Drain))
    {
        // The drain ran pinned against the pinned ceilings; the phases that run shared compare
        // with the same drain on shared cores.
        if let Err(e) = env.set_pinned(false) {
            r.errors.push(format!("unpinning: {e:#}"));
        }
        say!("drain on shared cores: {} events (MarkDone)", o.n);
        r.drain_shared = attempt!(
            "drain (shared cores)",
            drain(
                env,
                "drainshared",
                o.n,
                OnDelivery::MarkDone,
                o.n / 10,
                false
            )
        );
    }
    if o.runs(Phase::Burst) {
        pin!(Phase::Burst);
        say!("burst: {} events committed while the relay runs", o.n);
        r.burst = attempt!("burst", burst(env, o.n));
    }
    if o.runs(Phase::Profile) {
        pin!(Phase::Profile);
        say!("profiled drain: {} events (MarkDone)", o.n);
        r.profile = attempt!(
            "profile",
            drain(env, "profile", o.n, OnDelivery::MarkDone, o.n / 10, true)
        );
    }
    if o.runs(Phase::Latency) {
        pin!(Phase::Latency);
        say!("latency at 1k/s");
        r.lat1k = attempt!("latency 1k", latency(env, 1_000.0, 4));
        say!("latency at 10k/s");
        r.lat10k = attempt!("latency 10k", latency(env, 10_000.0, 32));
    }
    if o.runs(Phase::Wake) {
        pin!(Phase::Wake);
        say!("wake path cost");
        r.wake = attempt!("wake", wake_cost(env));
    }
    if o.runs(Phase::Baseline) {
        pin!(Phase::Baseline);
        say!("baseline: the original Go algorithm");
        r.baseline = attempt!("baseline", baseline(env));
    }
    if o.runs(Phase::Keys) {
        pin!(Phase::Keys);
        say!("keys: skewed drains against the uniform one");
        r.keys = attempt!("keys", key_spread(env, r.drain.as_ref()));
    }
    if o.runs(Phase::LatencyMax) {
        pin!(Phase::LatencyMax);
        say!("latency at the highest rate the writers reach");
        r.lat_max = attempt!("latency max", latency_max(env));
    }
    if o.runs(Phase::Snapshot) {
        pin!(Phase::Snapshot);
        say!(
            "held snapshot: drain of {} events, then 1k/s for {} s",
            o.n,
            o.snapshot_secs
        );
        r.snapshot = attempt!("snapshot", held_snapshot(env));
    }
    if o.runs(Phase::Debezium) {
        pin!(Phase::Debezium);
        say!("Debezium side by side: drain of {} events, then 1k/s", o.n);
        r.debezium = attempt!("debezium", debezium(env));
    }
    if o.runs(Phase::MillionBin) {
        pin!(Phase::MillionBin);
        say!(
            "drain: {} events by the outbox-relay binary (--metrics-addr, nobody scraping), its RSS every tenth",
            o.million
        );
        r.million_bin = attempt!("million-bin", million_bin(env, o.million));
    }
    if o.runs(Phase::Million) {
        pin!(Phase::Million);
        // Last: the global Prometheus recorder stays installed for the rest of the process.
        say!(
            "drain: {} events, RSS every tenth, {}",
            o.million,
            if o.no_recorder {
                "no metrics recorder (--no-recorder)"
            } else {
                "Prometheus recorder installed, nobody scraping"
            }
        );
        let _recorder = match o.no_recorder {
            true => None,
            false => match install_prometheus() {
                Ok(h) => Some(h),
                Err(e) => {
                    r.errors.push(format!("million: {e:#}"));
                    None
                }
            },
        };
        r.million = attempt!(
            "million",
            drain(
                env,
                "million",
                o.million,
                OnDelivery::MarkDone,
                (o.million / 10).clamp(1, 100_000),
                false
            )
        );
    }
}

fn main() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    started();
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
        let load_start = loadavg();
        let env = setup(opts.clone()).await?;
        let mut results = Results::default();
        let t0 = Instant::now();
        run(&env, &mut results).await;
        let total = t0.elapsed().as_secs_f64();
        let header = header(&env, &opts, date, load_start, total);
        let t = table(&env, &header, &results);
        println!("{t}");
        if opts.write {
            write_benchmarks_md(&t)?;
        }
        if !results.errors.is_empty() {
            bail!("{} phase(s) failed", results.errors.len());
        }
        Ok(())
    })
}
