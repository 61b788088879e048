//! The markdown result table (stdout, and BENCHMARKS.md with `--write`).

use crate::baseline::Baseline;
use crate::ceilings::KafkaCeiling;
use crate::ceilings::PgCeiling;
use crate::debezium::Debezium;
use crate::drain::Drain;
use crate::env::Env;
use crate::events::payload_jsonb_text;
use crate::host::{code_version, machine};
use crate::keys::KeySpread;
use crate::latency::Latency;
use crate::million::BinDrain;
use crate::opts::Opts;
use crate::profile::sql_check;
use crate::say;
use crate::snapshot::HeldSnapshot;
use crate::wake::Wake;
use crate::wake::WakeVariant;
use anyhow::Result;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Default)]
pub(crate) struct Results {
    pub(crate) drain: Option<Drain>,
    /// With `--pin-phases` pinning the drain: the same drain on shared cores, the reference of
    /// the phases that run shared (burst, held snapshot, Debezium, baseline).
    pub(crate) drain_shared: Option<Drain>,
    pub(crate) delete: Option<Drain>,
    pub(crate) million: Option<Drain>,
    pub(crate) million_bin: Option<BinDrain>,
    pub(crate) profile: Option<Drain>,
    pub(crate) burst: Option<Drain>,
    pub(crate) kafka: Option<KafkaCeiling>,
    pub(crate) pg_done: Option<PgCeiling>,
    pub(crate) pg_delete: Option<PgCeiling>,
    pub(crate) lat1k: Option<Latency>,
    pub(crate) lat10k: Option<Latency>,
    pub(crate) wake: Option<Wake>,
    pub(crate) baseline: Option<Baseline>,
    pub(crate) keys: Option<KeySpread>,
    /// (rate the writers reached with a relay running, latency paced at 90 % of it).
    pub(crate) lat_max: Option<(f64, Latency)>,
    pub(crate) snapshot: Option<HeldSnapshot>,
    pub(crate) debezium: Option<Debezium>,
    pub(crate) errors: Vec<String>,
}

impl Results {
    /// The MarkDone drain the shared phases compare with: on shared cores when the drain ran
    /// pinned and again shared (`drain_shared`), else the drain.
    fn reference_drain(&self) -> Option<&Drain> {
        self.drain_shared.as_ref().or(self.drain.as_ref())
    }
}

pub(crate) fn num(x: f64) -> String {
    let s = format!("{:.0}", x.round());
    let neg = s.starts_with('-');
    let digits: Vec<char> = s.trim_start_matches('-').chars().collect();
    let mut out = String::new();
    for (i, c) in digits.iter().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(*c);
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

pub(crate) fn verdict(ok: bool) -> String {
    if ok {
        "met".into()
    } else {
        "**missed**".into()
    }
}

pub(crate) fn table(env: &Env, header: &[(String, String)], r: &Results) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut row = |a: &str, b: String, c: &str, d: String| {
        rows.push([a.to_string(), b, c.to_string(), d]);
    };
    for (k, v) in header {
        row(k, v.clone(), "", String::new());
    }
    let ceiling = |pg: &Option<PgCeiling>| -> Option<f64> {
        match (&r.kafka, pg) {
            (Some(k), Some(p)) => Some(k.rate.min(p.rate)),
            _ => None,
        }
    };
    for (name, d, pg) in [
        ("Drain, default settings (MarkDone)", &r.drain, &r.pg_done),
        ("Drain, `OnDelivery::Delete`", &r.delete, &r.pg_delete),
    ] {
        if let Some(d) = d {
            row(
                name,
                format!(
                    "**{} events/s** ({} events in {:.2} s)",
                    num(d.rate),
                    num(d.n as f64),
                    d.secs
                ),
                "≥ 50,000 events/s",
                verdict(d.rate >= 50_000.0),
            );
            if let Some(c) = ceiling(pg) {
                row(
                    &format!("{name} / min(Kafka, PG ceiling)"),
                    format!("**{:.2}** ({} / {})", d.rate / c, num(d.rate), num(c)),
                    "≥ 0.8",
                    verdict(d.rate / c >= 0.8),
                );
            }
        }
    }
    if let Some(k) = &r.kafka {
        row(
            "Ceiling (a) Kafka: raw idempotent FutureProducer, same records, 10k in flight",
            format!(
                "{} msg/s ({} in {:.2} s, {} errors)",
                num(k.rate),
                num(k.n as f64),
                k.secs,
                k.errors
            ),
            "",
            String::new(),
        );
    }
    for (name, p) in [
        (
            "Ceiling (b) Postgres: relay's reserve + confirm SQL, 2 sessions (MarkDone)",
            &r.pg_done,
        ),
        (
            "Ceiling (b) Postgres: relay's reserve + confirm SQL, 2 sessions (Delete)",
            &r.pg_delete,
        ),
    ] {
        if let Some(p) = p {
            row(
                name,
                format!(
                    "{} rows/s ({} rows in {:.2} s); per {}-row batch (the relay's batch_size): reserve {:.1} ms (first 10 batches {:.1}, last 10 {:.1}), fence {:.1} ms, confirm + commit {:.1} ms. `relay_sql()` checked against the running relay: {}. EXPLAIN ANALYZE of the reservation: {}",
                    num(p.rate),
                    num(p.n as f64),
                    p.secs,
                    num(p.batch_size as f64),
                    p.reserve_ms,
                    p.first_reserve_ms,
                    p.last_reserve_ms,
                    p.fence_ms,
                    p.confirm_ms,
                    p.sql_check,
                    p.explain.join("; ")
                ),
                "",
                String::new(),
            );
        }
    }
    if let Some(d) = &r.drain_shared {
        row(
            "Drain, default settings (MarkDone), on shared cores (the reference of the burst, the held snapshot, Debezium and the baseline)",
            format!(
                "{} events/s ({} events in {:.2} s); CPU {}",
                num(d.rate),
                num(d.n as f64),
                d.secs,
                d.cpu.render()
            ),
            "",
            String::new(),
        );
    }
    if let Some(d) = &r.drain {
        row(
            "RSS of the bench process during the MarkDone drain",
            format!(
                "VmHWM {:.1} MB, VmRSS at end {:.1} MB",
                d.hwm_mb, d.rss_end_mb
            ),
            "≤ 64 MB",
            verdict(d.hwm_mb <= 64.0),
        );
        row(
            "CPU during the MarkDone drain (/proc)",
            d.cpu.render(),
            "",
            String::new(),
        );
    }
    if let Some(d) = &r.delete {
        row(
            "CPU during the Delete drain (/proc)",
            d.cpu.render(),
            "",
            String::new(),
        );
    }
    if let Some(b) = &r.burst {
        let reference = r
            .reference_drain()
            .map(|d| format!(" ({:.2}× the MarkDone drain)", b.rate / d.rate))
            .unwrap_or_default();
        row(
            "Burst: the same backlog committed in one transaction while the relay runs (its statements were planned on a near-empty table)",
            format!(
                "{} events/s{reference}; {} events in {:.2} s; CPU {}",
                num(b.rate),
                num(b.n as f64),
                b.secs,
                b.cpu.render()
            ),
            "≥ 50,000 events/s",
            verdict(b.rate >= 50_000.0),
        );
    }
    if let Some(d) = &r.profile {
        if let Some(p) = &d.profile {
            let phases: Vec<String> = p
                .phases
                .iter()
                .map(|(k, v)| format!("{k} {v:.0}%"))
                .collect();
            let waits: Vec<String> = p
                .waits
                .iter()
                .filter(|(_, v)| *v >= 1.0)
                .take(6)
                .map(|(k, v)| format!("{k} {v:.0}%"))
                .collect();
            row(
                "Profiled MarkDone drain (pg_stat_activity sampled every 10 ms): time of the relay's batch sessions",
                format!(
                    "{} events/s while sampled; {}; active waits: {}; fence connection active in {:.0} % of samples; {} samples. `relay_sql()` vs the relay's SQL: {}",
                    num(d.rate),
                    phases.join(" · "),
                    waits.join(" · "),
                    p.fence_active_pct,
                    p.samples,
                    sql_check(p)
                ),
                "",
                String::new(),
            );
        }
    }
    for (name, l, p50t, p99t) in [
        (
            "Commit → ack latency at 1k events/s",
            &r.lat1k,
            Some(3.0),
            15.0,
        ),
        (
            "Commit → ack latency at 10k events/s",
            &r.lat10k,
            None,
            50.0,
        ),
    ] {
        if let Some(l) = l {
            let target = match p50t {
                Some(p) => format!("p50 ≤ {p} ms, p99 ≤ {p99t} ms"),
                None => format!("p99 ≤ {p99t} ms"),
            };
            let ok = p50t.is_none_or(|t| l.p50 <= t)
                && l.p99 <= p99t
                && l.missing == 0
                && l.achieved >= 0.95 * l.target_rate;
            row(
                name,
                format!(
                    "p50 **{:.2} ms**, p99 **{:.2} ms**, max {:.1} ms; achieved {} events/s from {} writers (single-event autocommit INSERTs, paced), {} events measured, {} unacked, {} lagged; {:.1} events per relay batch; {:.0} % of writer commits NOTIFYed (relay idle-waiting); CPU {}",
                    l.p50,
                    l.p99,
                    l.max,
                    num(l.achieved),
                    l.writers,
                    num(l.n as f64),
                    l.missing,
                    l.lagged,
                    l.delivered as f64 / l.batches.max(1) as f64,
                    100.0 * l.notifications as f64 / (l.achieved * l.secs).max(1.0),
                    l.cpu.render()
                ),
                &target,
                verdict(ok),
            );
        }
    }
    if let Some(k) = &r.keys {
        for run in &k.runs {
            let name = format!(
                "Drain, keys over {} (MarkDone) / the uniform drain",
                run.keys
            );
            let target = run.target.map_or(String::new(), |t| format!("≥ {t} ×"));
            match (run.median(), run.last()) {
                (Some(median), Some(d)) => {
                    let ratios: Vec<String> =
                        run.ratios.iter().map(|r| format!("{r:.2}")).collect();
                    let uniform: Vec<String> = k.uniform.iter().map(|u| num(u.rate)).collect();
                    row(
                        &name,
                        format!(
                            "**{:.2} ×** (median of {} rounds, each to the uniform drain at its start: {} ×; uniform {} events/s; last round {} events/s, {} events in {:.2} s{})",
                            median,
                            run.ratios.len(),
                            ratios.join(", "),
                            uniform.join(", "),
                            num(d.rate),
                            num(d.n as f64),
                            d.secs,
                            k.drain_phase.map_or(String::new(), |early| format!(
                                "; {:.2} × the drain phase's {} events/s",
                                d.rate / early,
                                num(early)
                            ))
                        ),
                        &target,
                        run.target.map_or(String::new(), |t| verdict(median >= t)),
                    );
                }
                _ => row(
                    &name,
                    format!("ERROR: {}", run.error().unwrap_or("no round ran")),
                    &target,
                    verdict(false),
                ),
            }
        }
    }
    if let Some((probe, l)) = &r.lat_max {
        row(
            "Commit → ack latency at the highest rate the writers reach",
            format!(
                "32 writers reached {} tx/s with a relay running; paced at 90 %: {}",
                num(*probe),
                latency_cell(l)
            ),
            "",
            String::new(),
        );
    }
    if let Some(s) = &r.snapshot {
        let d = &s.drain;
        // The first tenth includes the relay's start (connections, prepared statements).
        let slowest = d
            .segment_rates
            .iter()
            .skip(1)
            .copied()
            .fold(f64::INFINITY, f64::min);
        let (ratio, target_ok) = match r.reference_drain() {
            Some(normal) => (
                format!(
                    " = **{:.2} ×** the normal drain, slowest tenth after the first {:.2} ×",
                    d.rate / normal.rate,
                    slowest / normal.rate
                ),
                verdict(slowest / normal.rate >= 0.5),
            ),
            None => (
                " (run `drain` too for the ratio)".to_string(),
                String::new(),
            ),
        };
        row(
            "Drain while a repeatable-read snapshot is held (taken after loading, released at the end)",
            format!(
                "{} events/s ({} events in {:.2} s){ratio}; per tenth: {}",
                num(d.rate),
                num(d.n as f64),
                d.secs,
                d.segment_rates.iter().map(|v| num(*v)).collect::<Vec<_>>().join(", ")
            ),
            "≥ 0.5 × the normal drain throughout",
            target_ok,
        );
        let l = &s.latency;
        let worst = l.per_sec_p99.iter().copied().fold(0.0, f64::max);
        row(
            &format!(
                "Commit → ack at 1k/s while a snapshot is held {:.0} s",
                l.secs
            ),
            format!("{}; worst per-second p99 {:.1} ms", latency_cell(l), worst),
            "p99 ≤ 1 s",
            verdict(l.p99 <= 1_000.0 && l.missing == 0),
        );
    }
    if let Some(z) = &r.debezium {
        row(
            "Debezium 3.6.1 (Connect standalone, pgoutput, outbox event router): the backlog committed in one transaction, commit → last record in Kafka",
            format!(
                "{} events/s ({} events in {:.2} s; first record after {:.2} s)",
                num(z.drain_rate),
                num(z.n as f64),
                z.drain_secs,
                z.first_secs
            ),
            "",
            String::new(),
        );
        for (name, ours) in [
            ("MarkDone drain", r.reference_drain()),
            ("burst", r.burst.as_ref()),
        ] {
            if let Some(d) = ours {
                let ratio = d.rate / z.drain_rate;
                row(
                    &format!("Ours ({name}) / Debezium's drain"),
                    format!("**{ratio:.2} ×** ({} / {})", num(d.rate), num(z.drain_rate)),
                    "≥ 2 ×",
                    verdict(ratio >= 2.0),
                );
            }
        }
        row(
            "Debezium commit → record read from Kafka at 1k/s (4 writers, consumer with fetch.wait.max.ms 5)",
            format!(
                "p50 **{:.2} ms**, p99 **{:.2} ms**, max {:.1} ms; {} measured, {} missing; achieved {} events/s",
                z.p50,
                z.p99,
                z.max,
                num(z.measured as f64),
                z.missing,
                num(z.achieved)
            ),
            "",
            String::new(),
        );
        if let Some(l) = &r.lat1k {
            let ratio = l.p99 / z.p99;
            row(
                "Our commit → ack p99 at 1k/s / Debezium's commit → record read",
                format!("**{ratio:.2}** ({:.2} ms / {:.2} ms)", l.p99, z.p99),
                "≤ 0.2",
                verdict(ratio <= 0.2),
            );
            let ratio = l.read.p99 / z.p99;
            row(
                "Like for like: our commit → record read p99 at 1k/s / Debezium's",
                format!("**{ratio:.2}** ({:.2} ms / {:.2} ms)", l.read.p99, z.p99),
                "≤ 0.2",
                verdict(ratio <= 0.2),
            );
        }
    }
    if let Some(w) = &r.wake {
        for writers in [8usize, 32] {
            let off = w.mean(WakeVariant::TriggerOff, writers);
            let on = w.mean(WakeVariant::TriggerOn, writers);
            let cost = 1.0 - on / off;
            row(
                &format!("Wake path cost to writers, {writers} writers (no relay)"),
                format!(
                    "trigger off {}{} tx/s, on {}{} tx/s → **{:+.1} %** (medians of {} rounds [range]; single-row autocommit inserts; CPU idle {:.0} % / {:.0} %)",
                    num(off),
                    w.range(WakeVariant::TriggerOff, writers),
                    num(on),
                    w.range(WakeVariant::TriggerOn, writers),
                    -100.0 * cost,
                    env.opts.wake_rounds,
                    w.idle(WakeVariant::TriggerOff, writers),
                    w.idle(WakeVariant::TriggerOn, writers)
                ),
                "cost ≤ 10 %",
                verdict(cost <= 0.10),
            );
        }
        for writers in [8usize, 32] {
            let off = w.mean(WakeVariant::TriggerOff, writers);
            let idle = w.mean(WakeVariant::IdleRelay, writers);
            let run = w.mean(WakeVariant::RelayRunning, writers);
            row(
                &format!("Extra, {writers} writers: relay idle-waiting (simulated: its advisory lock held + a LISTENer) / a real relay running and draining the inserts"),
                format!(
                    "idle-waiting {} tx/s ({:+.1} % vs trigger off; {} notifications); relay running {} tx/s ({:+.1} %, the relay competes for the 2 cores)",
                    num(idle),
                    -100.0 * (1.0 - idle / off),
                    num(*w.notifications.get(&writers).unwrap_or(&0) as f64),
                    num(run),
                    -100.0 * (1.0 - run / off),
                ),
                "",
                String::new(),
            );
        }
    }
    if let Some(b) = &r.baseline {
        let speedup = r
            .reference_drain()
            .map(|d| format!("; drain is {}× faster", num(d.rate / b.rate.max(1e-9))))
            .unwrap_or_default();
        row(
            "Baseline: original Go algorithm (every 5 s ≤ 100 events, one UPDATE each)",
            format!(
                "{:.1} events/s ({} events in {:.0} s){speedup}",
                b.rate, b.delivered, b.secs
            ),
            "",
            String::new(),
        );
    }
    if let Some(m) = &r.million_bin {
        million_bin_rows(&mut row, m);
    }
    if let Some(m) = &r.million {
        let (cell, flat) = rss_over_drain(&m.rss_samples, m.hwm_mb, m.n);
        row(
            &format!(
                "Long drain ({}): VmRSS sampled every tenth",
                if env.opts.no_recorder {
                    "no metrics recorder, `--no-recorder`"
                } else {
                    "Prometheus recorder installed as the binary does but without its upkeep task, nobody scraping"
                }
            ),
            cell,
            "≤ 64 MB, flat (< 4 bytes per event)",
            verdict(flat),
        );
        row(
            "Long drain: rate",
            format!(
                "{} events/s overall ({} events); per tenth: {}",
                num(m.rate),
                num(m.n as f64),
                rates(&m.segment_rates)
            ),
            "",
            String::new(),
        );
    }
    for e in &r.errors {
        row("ERROR", e.clone(), "", String::new());
    }
    let mut s = String::from("| Measure | Result | Target | Met |\n|---|---|---|---|\n");
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}

pub(crate) const MARK_BEGIN: &str = "<!-- bench-table:begin -->";
pub(crate) const MARK_END: &str = "<!-- bench-table:end -->";

pub(crate) fn write_benchmarks_md(table: &str) -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let block = format!("{MARK_BEGIN}\n{table}{MARK_END}");
    let new = match (old.find(MARK_BEGIN), old.find(MARK_END)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{}{}", &old[..a], block, &old[b + MARK_END.len()..])
        }
        _ => format!("{old}\n## Latest run\n\n{block}\n"),
    };
    std::fs::write(&path, new)?;
    say!("table written to {}", path.display());
    Ok(())
}

/// The table's first rows: machine, date, settings and the machine's load during the run.
pub(crate) fn header(
    env: &Env,
    opts: &Opts,
    date: String,
    load_start: f64,
    total: f64,
) -> Vec<(String, String)> {
    let (model, cores, mem) = machine();
    let load = env.load.lock().unwrap();
    let busy = if load.foreign_max > 0 {
        format!(
            "**busy**: up to {} other cargo/rustc processes seen at phase starts (e.g. {})",
            load.foreign_max,
            load.foreign_examples.join(", ")
        )
    } else {
        "no other cargo/rustc processes seen at phase starts".to_string()
    };
    vec![
        (
            "Machine".to_string(),
            format!("{model}, {cores} cores, {mem:.1} GiB RAM; Postgres, the broker (when local), the relay and the harness share the cores"),
        ),
        ("Date".to_string(), date),
        (
            "Settings".to_string(),
            format!(
                "{} mode; code: {}; {}; Kafka: {}, {} partitions per topic; relay defaults{} ({}, idempotent, acks=all, Notify); backlog {} events of {} bytes of JSON over {} aggregates, loaded then ANALYZE + CHECKPOINT",
                if opts.short { "short" } else { "full" },
                code_version(),
                env.pg_desc,
                env.broker_desc(),
                opts.partitions,
                match (
                    opts.batch_size,
                    opts.batches_in_flight,
                    opts.per_aggregate,
                    opts.kafka_properties.is_empty()
                        && opts.pg_settings.is_empty()
                        && !opts.prompt_producer,
                ) {
                    (None, None, None, true) => String::new(),
                    (b, f, a, _) => format!(
                        " **except batch_size={} max_batches_in_flight={} max_in_flight_per_aggregate={} prompt_producer={} kafka properties {:?} Postgres settings {:?}** (flags)",
                        b.map_or("default".into(), |v| v.to_string()),
                        f.map_or("default".into(), |v| v.to_string()),
                        a.map_or("default".into(), |v| v.to_string()),
                        opts.prompt_producer,
                        opts.kafka_properties,
                        opts.pg_settings
                    ),
                },
                relay_defaults(),
                num(opts.n as f64),
                payload_jsonb_text(12_345).len(),
                num(opts.aggregates as f64),
            ),
        ),
        (
            "Machine load".to_string(),
            format!(
                "1-min load average {:.2} at start, {:.2}–{:.2} at phase starts; cores busy with other work in the 2 s before each phase: {}; {busy}; total run {:.0} s{}",
                load_start,
                load.min,
                load.max,
                load.busy
                    .iter()
                    .map(|(p, b)| format!("{p} {b:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                total,
                if load.waited > 1.0 {
                    format!(" (of which {:.0} s waiting for quiet, `--wait-idle`)", load.waited)
                } else {
                    String::new()
                }
            ),
        ),
    ]
}

/// The result cell of a latency row.
fn latency_cell(l: &Latency) -> String {
    format!(
        "p50 **{:.2} ms**, p99 **{:.2} ms**, max {:.1} ms; read back from Kafka (commit → record read, as Debezium's row): p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} of {} not read; achieved {} events/s from {} writers (single-event autocommit INSERTs, paced), {} events measured, {} unacked, {} lagged; {:.1} events per relay batch; CPU {}",
        l.p50,
        l.p99,
        l.max,
        l.read.p50,
        l.read.p99,
        l.read.max,
        l.read.missing,
        num((l.read.n + l.read.missing) as f64),
        num(l.achieved),
        l.writers,
        num(l.n as f64),
        l.missing,
        l.lagged,
        l.delivered as f64 / l.batches.max(1) as f64,
        l.cpu.render()
    )
}

/// "31,000, 42,000, …": events per second of each tenth.
fn rates(r: &[f64]) -> String {
    r.iter().map(|v| num(*v)).collect::<Vec<_>>().join(", ")
}

/// The RSS cell of a long drain (VmRSS samples at every tenth, MB; VmHWM, MB; `n` events) and
/// whether it is flat: at most 64 MB, at most 8 MB between samples, and under 4 bytes per event
/// from the first tenth to the last (a per-event leak shows at 1M events as ≥ 4 MB).
fn rss_over_drain(samples: &[f64], hwm_mb: f64, n: usize) -> (String, bool) {
    let lo = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = samples.iter().copied().fold(0.0, f64::max);
    // From the first tenth to the last: nine tenths of the events.
    let growth_mb = match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let per_event = growth_mb * 1024.0 * 1024.0 / (n as f64 * 0.9).max(1.0);
    let cell = format!(
        "min {lo:.1} MB, max {hi:.1} MB (VmHWM {hwm_mb:.1} MB) over {} samples [{}]; last − first sample {growth_mb:+.1} MB = {per_event:+.1} bytes per event",
        samples.len(),
        samples.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(", "),
    );
    let flat =
        !samples.is_empty() && hi <= 64.0 && hwm_mb <= 64.0 && hi - lo <= 8.0 && per_event < 4.0;
    (cell, flat)
}

/// The rows of `million-bin`: the child's RSS, the rate, and the end (scrape, SIGTERM, exit).
fn million_bin_rows(row: &mut impl FnMut(&str, String, &str, String), m: &BinDrain) {
    let (cell, flat) = rss_over_drain(&m.rss_samples, m.hwm_mb, m.n);
    row(
        "Long drain by the `outbox-relay` binary (child process, `run --metrics-addr 127.0.0.1:PORT`, nobody scraping): the child's VmRSS sampled every tenth",
        cell,
        "≤ 64 MB, flat (< 4 bytes per event)",
        verdict(flat),
    );
    row(
        "Long drain by the binary: rate",
        format!(
            "{} events/s overall ({} events in {:.1} s, from the spawn to the last row done); per tenth: {}; the child's CPU {:.1} s = {:.0} µs per event; 1-min load average at the tenths {:.1}–{:.1}",
            num(m.rate),
            num(m.n as f64),
            m.secs,
            rates(&m.segment_rates),
            m.cpu_secs,
            m.cpu_secs * 1e6 / m.n.max(1) as f64,
            m.load.iter().copied().fold(f64::INFINITY, f64::min),
            m.load.iter().copied().fold(0.0, f64::max),
        ),
        "",
        String::new(),
    );
    let ok = m.scraped_delivered == m.n as f64 && m.exit_ok;
    row(
        "Long drain by the binary: one scrape of `/metrics` after the drain, then SIGTERM",
        format!(
            "outbox_events_delivered_total {} (of {}); {} {:.2} s after SIGTERM; {} WARN/ERROR lines in its log",
            num(m.scraped_delivered),
            num(m.n as f64),
            m.exit,
            m.stop_secs,
            m.log_problems
        ),
        "= N; exit status 0",
        verdict(ok),
    );
}

/// The relay's defaults the Settings row names, read from the relay (`Settings::default()` and
/// its producer configuration), not restated.
fn relay_defaults() -> String {
    let d = outbox::Settings::default();
    let linger = outbox::testing::relay_producer_config("")
        .get("linger.ms")
        .unwrap_or("librdkafka's default")
        .to_string();
    format!(
        "batch {}, {} batches in flight, max_in_flight {}, max_in_flight_per_aggregate {}, linger.ms {linger}",
        num(d.batch_size as f64),
        d.max_batches_in_flight,
        num(d.max_in_flight as f64),
        num(d.max_in_flight_per_aggregate as f64),
    )
}
