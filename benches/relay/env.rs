//! The run's environment: Postgres (throwaway or `DATABASE_URL`), Kafka, tables, topics, relays.

use crate::events::payload_jsonb_text;
use crate::events::payload_value;
use crate::events::Keys;
use crate::host;
use crate::host::foreign_processes;
use crate::host::loadavg;
use crate::host::machine;
use crate::host::read_stat;
use crate::host::system_ticks;
use crate::opts::{Opts, Phase};
use crate::say;
use crate::tansu::Tansu;
use crate::tansu::{start_tansu, tansu_version};
use anyhow::bail;
use anyhow::Context as _;
use anyhow::Result;
use outbox::testing::TestPostgres;
use outbox::Outbox;
use rdkafka::admin::AdminClient;
use rdkafka::admin::AdminOptions;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use rdkafka::consumer::Consumer as _;
use rdkafka::ClientConfig;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::NoTls;

pub(crate) struct Env {
    pub(crate) opts: Opts,
    pub(crate) pg: tokio_postgres::Config,
    /// The same database as a URL, for a child `outbox-relay` (`DATABASE_URL`; never printed).
    pub(crate) pg_url: String,
    pub(crate) _server: Option<TestPostgres>,
    pub(crate) pg_desc: String,
    pub(crate) brokers: String,
    pub(crate) tansu: Option<Tansu>,
    pub(crate) run_id: String,
    /// Postmaster pid, when the server runs on this machine (for the CPU split).
    pub(crate) postmaster: Option<i32>,
    /// `--pin-postgres`: Postgres' CPUs and the others'; whether they are pinned now.
    pub(crate) pin: Option<(Vec<usize>, Vec<usize>)>,
    pub(crate) pinned: Mutex<bool>,
    pub(crate) clk_tck: f64,
    pub(crate) cores: usize,
    pub(crate) load: Mutex<LoadLog>,
}

#[derive(Default)]
pub(crate) struct LoadLog {
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) foreign_max: usize,
    pub(crate) foreign_examples: Vec<String>,
    /// (phase, cores busy in the 2 s before it).
    pub(crate) busy: Vec<(String, f64)>,
    pub(crate) waited: f64,
}

impl Env {
    pub(crate) async fn connect(&self, app: &str) -> Result<Client> {
        let mut cfg = self.pg.clone();
        cfg.application_name(app);
        let (client, conn) = cfg.connect(NoTls).await.context("connecting to Postgres")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The keys of the backlogs and writers: uniform over `--aggregates`.
    pub(crate) fn keys(&self) -> Keys {
        Keys::Uniform(self.opts.aggregates)
    }

    /// Pids of the local broker processes: tansu's, or `--broker-pid`.
    pub(crate) fn broker_pids(&self) -> Vec<i32> {
        match self.tansu.as_ref().and_then(|t| t.pid) {
            Some(pid) => vec![pid],
            None => self.opts.broker_pids.clone(),
        }
    }

    /// The broker as the table names it.
    pub(crate) fn broker_desc(&self) -> String {
        match (&self.opts.broker, &self.tansu) {
            (Some(d), _) => d.clone(),
            (None, Some(_)) => format!("{} on loopback (memory storage)", tansu_version()),
            (None, None) => "KAFKA_BROKERS (external; `--broker` describes it)".into(),
        }
    }

    pub(crate) fn name(&self, phase: &str) -> String {
        format!("bench_{}_{}", self.run_id, phase)
    }

    pub(crate) fn topic(&self, phase: &str) -> String {
        format!("bench-{}-{}", self.run_id, phase)
    }

    /// Notes the machine's load at the start of a phase (other engineers may be running tests).
    pub(crate) async fn note_load(&self, phase: &str) {
        // Busy cores over 2 s before the phase (our own servers are idle between phases); with
        // `--wait-idle SECS`, wait up to SECS for the machine to quieten first.
        let waited = Instant::now();
        let mut busy;
        loop {
            let (b0, t0) = system_ticks();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (b1, t1) = system_ticks();
            busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64 * self.cores as f64;
            if busy < 0.25 || waited.elapsed().as_secs_f64() >= self.opts.wait_idle {
                break;
            }
        }
        let load = loadavg();
        let foreign = foreign_processes();
        let mut l = self.load.lock().unwrap();
        if l.max == 0.0 {
            l.min = load;
        }
        l.min = l.min.min(load);
        l.max = l.max.max(load);
        l.foreign_max = l.foreign_max.max(foreign.len());
        for f in foreign {
            if l.foreign_examples.len() < 4 && !l.foreign_examples.contains(&f) {
                l.foreign_examples.push(f);
            }
        }
        l.busy.push((phase.to_string(), busy));
        l.waited += waited.elapsed().as_secs_f64() - 2.0;
        say!(
            "phase {phase}: load average {load:.2}, {busy:.2} cores busy before it{}",
            if waited.elapsed() > Duration::from_secs(3) {
                format!(
                    " (waited {:.0} s for quiet)",
                    waited.elapsed().as_secs_f64()
                )
            } else {
                String::new()
            }
        );
    }

    pub(crate) async fn fresh_table(&self, phase: &str) -> Result<String> {
        let t = self.name(phase);
        let c = self.connect("bench-admin").await?;
        c.batch_execute(&format!(
            "drop table if exists {t}; drop function if exists {t}_outbox_wake()"
        ))
        .await?;
        outbox::migrate_table(&c, &t, &t).await?;
        Ok(t)
    }

    pub(crate) async fn drop_table(&self, t: &str) {
        // OUTBOX_BENCH_KEEP_TABLES=1 keeps them for inspection (with DATABASE_URL).
        if std::env::var_os("OUTBOX_BENCH_KEEP_TABLES").is_some() {
            return;
        }
        if let Ok(c) = self.connect("bench-admin").await {
            let _ = c
                .batch_execute(&format!(
                    "drop table if exists {t}; drop function if exists {t}_outbox_wake()"
                ))
                .await;
        }
    }

    pub(crate) async fn create_topic(&self, phase: &str) -> Result<String> {
        let topic = self.topic(phase);
        outbox::testing::create_topic(&self.brokers, &topic, self.opts.partitions)
            .await
            .with_context(|| format!("creating topic {topic}"))?;
        Ok(topic)
    }

    /// Frees the broker's memory (tansu keeps records in memory); errors are ignored.
    pub(crate) async fn delete_topic(&self, topic: &str) {
        let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("log_level", "3")
            .create();
        if let Ok(admin) = admin {
            let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
            let _ = admin.delete_topics(&[topic], &opts).await;
        }
    }

    pub(crate) fn outbox(&self, table: &str) -> outbox::OutboxBuilder {
        let mut b = Outbox::builder()
            .postgres(self.pg.clone())
            .kafka_brokers(self.brokers.clone())
            .table(table)
            .channel(table);
        if let Some(n) = self.opts.batch_size {
            b = b.batch_size(n);
        }
        if let Some(n) = self.opts.batches_in_flight {
            b = b.max_batches_in_flight(n);
        }
        if let Some(n) = self.opts.per_aggregate {
            b = b.max_in_flight_per_aggregate(n);
        }
        for (k, v) in &self.opts.kafka_properties {
            b = b.kafka_property(k, v);
        }
        b.prompt_producer(self.opts.prompt_producer)
    }
}

/// Records in `topic` (sum of the partitions' high watermarks); blocks for one ListOffsets
/// round trip per partition.
pub(crate) fn records(consumer: &BaseConsumer, topic: &str, partitions: i32) -> Result<i64> {
    let mut sum = 0;
    for p in 0..partitions {
        let (lo, hi) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        sum += hi - lo;
    }
    Ok(sum)
}

pub(crate) async fn setup(opts: Opts) -> Result<Env> {
    let (server, pg, pg_url, pg_kind) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            let cfg: tokio_postgres::Config = url.parse().context("DATABASE_URL")?;
            (None, cfg, url, "DATABASE_URL")
        }
        _ => {
            say!("starting a throwaway Postgres (fsync on)");
            let mut builder = TestPostgres::builder()
                .fsync(true)
                // Lets the profiled drain read the relay's full SQL from pg_stat_activity.
                .setting("track_activity_query_size", "16384");
            if opts.runs(Phase::Debezium) {
                // Debezium's connector decodes the WAL (pgoutput).
                builder = builder
                    .setting("wal_level", "logical")
                    .setting("max_wal_senders", "4")
                    .setting("max_replication_slots", "4");
            }
            for (k, v) in &opts.pg_settings {
                builder = builder.setting(k, v);
            }
            let server = builder.start().await?;
            let (cfg, url) = (server.config(), server.url());
            (Some(server), cfg, url, "TestPostgres")
        }
    };
    let (brokers, tansu) = match std::env::var("KAFKA_BROKERS") {
        Ok(b) if !b.is_empty() => (b, None),
        _ => {
            say!("starting tansu (memory storage)");
            let (b, t) = start_tansu()?;
            (b, Some(t))
        }
    };
    let run_id = format!(
        "{:x}",
        (std::process::id() as u64 ^ std::time::UNIX_EPOCH.elapsed()?.as_secs()) & 0xff_ffff
    );
    let clk_tck = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let (_, cores, _) = machine();
    let mut env = Env {
        opts,
        pg,
        pg_url,
        _server: server,
        pg_desc: String::new(),
        brokers,
        tansu,
        run_id,
        postmaster: None,
        pin: None,
        pinned: Mutex::new(false),
        clk_tck,
        cores,
        load: Mutex::new(LoadLog::default()),
    };
    let c = env.connect("bench-admin").await?;
    let row = c
        .query_one(
            "select current_setting('server_version'), current_setting('fsync'),
                    current_setting('synchronous_commit'), current_setting('shared_buffers'),
                    current_setting('max_wal_size'), pg_backend_pid(), current_setting('wal_level')",
            &[],
        )
        .await?;
    let (ver, fsync, sc, sb, wal): (String, String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let pid: i32 = row.get(5);
    let wal_level: String = row.get(6);
    env.postmaster = read_stat(&PathBuf::from(format!("/proc/{pid}/stat"))).map(|s| s.1);
    env.pg_desc = format!(
        "Postgres {ver} ({pg_kind}; fsync={fsync}, synchronous_commit={sc}, shared_buffers={sb}, max_wal_size={wal}, wal_level={wal_level})"
    );
    if let Some(list) = env.opts.pin_postgres.clone() {
        let words = pin_cpus(&mut env, &list)?;
        env.pg_desc += &words;
    }
    // The payload the raw producer sends must be what the relay sends (jsonb text).
    let sample: String = c
        .query_one(
            "select $1::text::jsonb::text",
            &[&payload_value(12_345).to_string()],
        )
        .await?
        .get(0);
    if sample != payload_jsonb_text(12_345) {
        bail!(
            "jsonb text mismatch: {sample:?} vs {:?}",
            payload_jsonb_text(12_345)
        );
    }
    say!(
        "{}; Kafka {}; payload {} bytes",
        env.pg_desc,
        env.brokers,
        sample.len()
    );
    Ok(env)
}

/// `--pin-postgres`: checks the CPU list and keeps it (see [`Env::pin_for`]). Returns the
/// Settings row's words for it.
fn pin_cpus(env: &mut Env, list: &str) -> Result<String> {
    let pg = host::cpu_list(list)?;
    let allowed = host::allowed_cpus()?;
    let rest: Vec<usize> = allowed
        .iter()
        .copied()
        .filter(|c| !pg.contains(c))
        .collect();
    if rest.is_empty() || pg.iter().any(|c| !allowed.contains(c)) {
        bail!("--pin-postgres {list}: needs CPUs of {allowed:?} with at least one left over");
    }
    env.postmaster
        .context("--pin-postgres: the postmaster's pid is unknown")?;
    let words = format!(
        "; pinned (`--pin-postgres`): Postgres on CPU {}, the relay, the harness and the broker on CPU {}{}",
        cpu_words(&pg),
        cpu_words(&rest),
        match &env.opts.pin_phases {
            Some(phases) => format!(
                ", during the phases {} only (the others on every core)",
                phases
                    .iter()
                    .map(|p| format!("{p:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => String::new(),
        }
    );
    env.pin = Some((pg, rest));
    Ok(words)
}

fn cpu_words(c: &[usize]) -> String {
    c.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl Env {
    /// Before `phase`: with `--pin-postgres`, the postmaster and its processes (backends forked
    /// later inherit it) on Postgres' CPUs, this process (every thread; threads and children
    /// started later inherit it) and the broker's processes on the others — or, for a phase
    /// `--pin-phases` leaves out, all of them back on every allowed CPU.
    pub(crate) fn pin_for(&self, phase: Phase) -> Result<()> {
        self.set_pinned(self.opts.pinned(phase))
    }

    /// Pins (`want`) or unpins as [`pin_for`](Self::pin_for) does; nothing without
    /// `--pin-postgres`.
    pub(crate) fn set_pinned(&self, want: bool) -> Result<()> {
        let Some((pg, rest)) = &self.pin else {
            return Ok(());
        };
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if *pinned == want {
            return Ok(());
        }
        let mut all: Vec<usize> = pg.iter().chain(rest).copied().collect();
        all.sort_unstable();
        let (pg_cpus, rest_cpus) = if want { (pg, rest) } else { (&all, &all) };
        let postmaster = self
            .postmaster
            .context("--pin-postgres: the postmaster's pid is unknown")?;
        let mut n = 0;
        for (pid, path) in host::all_pids() {
            let ppid = read_stat(&path.join("stat")).map(|s| s.1);
            if pid == postmaster || ppid == Some(postmaster) {
                // A backend may exit between the listing and the call.
                if host::pin(pid, pg_cpus).is_ok() {
                    n += 1;
                }
            }
        }
        host::pin(std::process::id() as i32, rest_cpus)?;
        for pid in self.broker_pids() {
            host::pin(pid, rest_cpus)?;
        }
        *pinned = want;
        if want {
            say!(
                "pinned Postgres ({n} processes) to CPU {}, this process and the broker to CPU {}",
                cpu_words(pg),
                cpu_words(rest)
            );
        } else {
            say!(
                "unpinned: Postgres ({n} processes), this process and the broker on CPU {}",
                cpu_words(&all)
            );
        }
        Ok(())
    }
}
