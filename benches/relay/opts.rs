//! Command-line flags (clap) and the sizes of short and full mode.

use anyhow::{anyhow, Result};
use clap::{Parser, ValueEnum};

/// One measured phase; `--only` selects a subset (comma-separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Phase {
    /// Drain of the backlog with default settings (`OnDelivery::MarkDone`).
    Drain,
    /// Drain of the backlog with `OnDelivery::Delete`.
    Delete,
    /// 1M-event drain with VmRSS sampled every 100k and the Prometheus recorder installed,
    /// nobody scraping (full mode only, or `--million N`); runs last.
    Million,
    /// The same long drain (`--million N`) by the `outbox-relay` binary as a child process,
    /// `run --metrics-addr` on a free port, nobody scraping: the child's VmRSS every tenth, one
    /// scrape at the end, SIGTERM and its exit status.
    MillionBin,
    /// Ceiling (a): a raw idempotent producer sending the same records.
    Kafka,
    /// Ceiling (b): the relay's own reserve/fence/confirm SQL without Kafka.
    Pg,
    /// A MarkDone drain while `pg_stat_activity` is sampled.
    Profile,
    /// The backlog committed in one transaction while the relay runs.
    Burst,
    /// Commit → ack latency at 1k/s and 10k/s.
    Latency,
    /// What the wake path (trigger, NOTIFY) costs writers.
    Wake,
    /// The original Go algorithm.
    Baseline,
    /// Drains with keys over 1, 10, 1,000 and 10,000 aggregates and a Zipf(1.1) mix, each as a
    /// ratio to a uniform drain made just before them, in `--key-rounds` rounds (median ratio).
    Keys,
    /// Commit → ack at the highest rate this machine's writers reach with the relay running.
    LatencyMax,
    /// A drain and commit → ack at 1k/s while a snapshot is held (`--snapshot-secs`).
    Snapshot,
    /// Debezium (Kafka Connect standalone, Postgres connector, outbox event router) on the same
    /// Postgres and broker: drain of the same backlog and commit → ack at 1k/s
    /// (benches/debezium/run; the throwaway server then runs with wal_level=logical).
    Debezium,
}

/// Relay benchmark (harness = false). Progress on stderr, the result table on stdout.
#[derive(Debug, Clone, Parser)]
#[command(name = "relay-bench")]
pub(crate) struct Cli {
    /// Short mode (CI smoke run): 40k backlogs, 3 s latency windows, no 1M run. Also set by
    /// `OUTBOX_BENCH=short`.
    #[arg(long, overrides_with = "full")]
    short: bool,
    /// Full mode (the default; overrides `--short` and `OUTBOX_BENCH=short`).
    #[arg(long, overrides_with = "short")]
    full: bool,
    /// Replace the table in BENCHMARKS.md with this run's.
    #[arg(long)]
    pub(crate) write: bool,
    /// Print the reservation's EXPLAIN ANALYZE plans.
    #[arg(long)]
    pub(crate) explain: bool,
    /// Run only these phases (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) only: Option<Vec<Phase>>,
    /// On a shared machine, wait up to SECS before each phase for other load to stop.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub(crate) wait_idle: f64,
    /// Aggregates the backlog's keys are spread over (by a hash of the event's index).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    aggregates: u64,
    /// Relay override: `batch_size` (recorded in the table's Settings row).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Relay override: `max_batches_in_flight` (recorded in the table's Settings row).
    #[arg(long)]
    pub(crate) batches_in_flight: Option<usize>,
    /// Relay override: `max_in_flight_per_aggregate` (1: an aggregate's events one at a time, as
    /// before pipelining; recorded in the table's Settings row).
    #[arg(long)]
    pub(crate) per_aggregate: Option<usize>,
    /// Relay override: `prompt_producer(true)` (recorded in the table's Settings row).
    #[arg(long)]
    pub(crate) prompt_producer: bool,
    /// Extra librdkafka property for the relay, e.g. `linger.ms=0` (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub(crate) kafka_property: Vec<(String, String)>,
    /// Server setting of the throwaway Postgres, e.g. `plan_cache_mode=force_custom_plan`
    /// (repeatable).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_kv)]
    pub(crate) pg_setting: Vec<(String, String)>,
    /// How long the snapshot phase holds its snapshot during the 1k/s latency window (default
    /// 60 s; 10 s in short mode).
    #[arg(long, value_name = "SECS")]
    snapshot_secs: Option<f64>,
    /// Rounds of the `keys` phase (default 3; 1 in short mode): each drains the uniform
    /// reference, then every skewed backlog, and a ratio's verdict is its median over the
    /// rounds (one pair of drains swings ±15 % on a shared 2-core machine).
    #[arg(long, value_name = "N")]
    key_rounds: Option<usize>,
    /// Events of the RSS runs, `million` and `million-bin` (default 1,000,000; 0 in short mode,
    /// which skips them).
    #[arg(long, value_name = "N")]
    million: Option<usize>,
    /// Run the long drain without the Prometheus recorder (the comparison for its RSS).
    #[arg(long)]
    pub(crate) no_recorder: bool,
    /// How the table describes the broker of `KAFKA_BROKERS`, e.g. "Apache Kafka 4.1.1, 1 node
    /// (KRaft) on loopback".
    #[arg(long, value_name = "TEXT")]
    pub(crate) broker: Option<String>,
    /// Pid of a local broker process (repeatable; e.g. each node's `pid` file of
    /// scripts/kafka-cluster), so that the CPU split counts the broker.
    #[arg(long, value_name = "PID")]
    pub(crate) broker_pid: Vec<i32>,
    /// Run Postgres on these CPUs (a `taskset` list, e.g. `0`) and everything else this run
    /// measures — this process (the relay and the harness), its child processes and the
    /// `--broker-pid` processes — on the others: Postgres on cores of its own, as on its own
    /// host, for both the drains and the ceilings. Default: no pinning (all share every core).
    #[arg(long, value_name = "CPUS")]
    pub(crate) pin_postgres: Option<String>,
    /// With `--pin-postgres`: pin only while these phases run (comma-separated; the others run
    /// on shared cores), e.g. `drain,delete,kafka,pg`: the drains against the ceilings with
    /// Postgres on a core of its own, the latencies and Debezium as a single host runs them.
    /// Default: every phase pinned.
    #[arg(long, value_enum, value_delimiter = ',', requires = "pin_postgres")]
    pub(crate) pin_phases: Option<Vec<Phase>>,
    /// Topic partitions.
    #[arg(long, env = "OUTBOX_BENCH_PARTITIONS", default_value_t = 8)]
    pub(crate) partitions: i32,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Filters passed through `cargo bench -- FILTER`; ignored.
    #[arg(hide = true)]
    filter: Vec<String>,
}

fn parse_kv(v: &str) -> Result<(String, String)> {
    let (k, v) = v
        .split_once('=')
        .ok_or_else(|| anyhow!("{v:?} is not name=value"))?;
    Ok((k.to_string(), v.to_string()))
}

/// Flags resolved into the sizes every phase uses.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) short: bool,
    pub(crate) write: bool,
    pub(crate) explain: bool,
    pub(crate) only: Option<Vec<Phase>>,
    /// Backlog of the drain runs and ceilings.
    pub(crate) n: usize,
    pub(crate) aggregates: usize,
    pub(crate) partitions: i32,
    pub(crate) lat_secs: f64,
    pub(crate) lat_warmup: f64,
    pub(crate) wake_secs: f64,
    pub(crate) wake_rounds: usize,
    /// Rounds of the skewed drains, each with its own uniform reference (`--key-rounds`).
    pub(crate) key_rounds: usize,
    pub(crate) baseline_secs: f64,
    pub(crate) million: usize,
    pub(crate) snapshot_secs: f64,
    pub(crate) no_recorder: bool,
    pub(crate) broker: Option<String>,
    pub(crate) broker_pids: Vec<i32>,
    /// `--pin-postgres CPUS`: Postgres on CPUS, the rest on the other CPUs.
    pub(crate) pin_postgres: Option<String>,
    /// `--pin-phases`: the phases run pinned (`None`: all).
    pub(crate) pin_phases: Option<Vec<Phase>>,
    /// `--wait-idle SECS`: at each phase start, wait up to SECS for other load to stop.
    pub(crate) wait_idle: f64,
    /// Relay overrides (`--batch-size`, `--batches-in-flight`); defaults otherwise.
    pub(crate) batch_size: Option<usize>,
    pub(crate) batches_in_flight: Option<usize>,
    pub(crate) per_aggregate: Option<usize>,
    /// `--prompt-producer`: the relay's `prompt_producer(true)`.
    pub(crate) prompt_producer: bool,
    /// `--kafka-property k=v` (repeatable): extra librdkafka properties for the relay.
    pub(crate) kafka_properties: Vec<(String, String)>,
    /// `--pg-setting name=value` (repeatable): server settings of the throwaway Postgres.
    pub(crate) pg_settings: Vec<(String, String)>,
}

impl Opts {
    /// Parses the command line (and `OUTBOX_BENCH`, `OUTBOX_BENCH_PARTITIONS`).
    pub(crate) fn parse() -> Opts {
        let env_short = std::env::var("OUTBOX_BENCH").is_ok_and(|v| v == "short");
        Opts::from_cli(Cli::parse(), env_short)
    }

    fn from_cli(cli: Cli, env_short: bool) -> Opts {
        let short = (env_short || cli.short) && !cli.full;
        let mut o = Opts {
            short,
            write: cli.write,
            explain: cli.explain,
            only: cli.only,
            n: 200_000,
            aggregates: cli.aggregates as usize,
            partitions: cli.partitions,
            lat_secs: 10.0,
            lat_warmup: 1.0,
            wake_secs: 5.0,
            wake_rounds: 3,
            key_rounds: 3,
            baseline_secs: 30.0,
            million: 1_000_000,
            snapshot_secs: 60.0,
            no_recorder: cli.no_recorder,
            broker: cli.broker,
            broker_pids: cli.broker_pid,
            pin_postgres: cli.pin_postgres,
            pin_phases: cli.pin_phases,
            wait_idle: cli.wait_idle,
            batch_size: cli.batch_size,
            batches_in_flight: cli.batches_in_flight,
            per_aggregate: cli.per_aggregate,
            prompt_producer: cli.prompt_producer,
            kafka_properties: cli.kafka_property,
            pg_settings: cli.pg_setting,
        };
        if short {
            o.n = 40_000;
            o.lat_secs = 3.0;
            o.wake_secs = 2.0;
            o.wake_rounds = 1;
            o.key_rounds = 1;
            o.baseline_secs = 10.0;
            o.million = 0;
            o.snapshot_secs = 10.0;
        }
        if let Some(n) = cli.million {
            o.million = n;
        }
        if let Some(s) = cli.snapshot_secs {
            o.snapshot_secs = s;
        }
        if let Some(r) = cli.key_rounds {
            o.key_rounds = r.max(1);
        }
        o
    }

    /// Whether `phase` runs with Postgres pinned (`--pin-postgres`, `--pin-phases`).
    pub(crate) fn pinned(&self, phase: Phase) -> bool {
        self.pin_postgres.is_some() && self.pin_phases.as_ref().is_none_or(|p| p.contains(&phase))
    }

    pub(crate) fn runs(&self, phase: Phase) -> bool {
        if matches!(phase, Phase::Million | Phase::MillionBin) && self.million == 0 {
            return false;
        }
        self.only.as_ref().is_none_or(|o| o.contains(&phase))
    }
}
