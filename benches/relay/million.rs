//! RSS over a long drain (1M events by default), nobody scraping `/metrics`: `million` in this
//! process with the Prometheus recorder installed the way `outbox-relay --metrics-addr` installs
//! it (without its upkeep task), `million-bin` the `outbox-relay` binary itself as a child
//! process.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::consumer::BaseConsumer;
use rdkafka::ClientConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::drain::segment_rates;
use crate::env::{records, Env};
use crate::events::load_backlog;
use crate::host::{loadavg, read_stat, status_kb_of};
use crate::say;

/// Installs the global recorder with the binary's buckets (src/bin/outbox-relay.rs,
/// `serve_metrics`); the handle is never rendered. Once per process: every later relay in this
/// process records into it, hence this phase runs last.
pub(crate) fn install_prometheus() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("outbox_commit_to_ack_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the Prometheus recorder")
}

/// What the binary's long drain measured (`million-bin`).
#[derive(Debug, Clone, Default)]
pub(crate) struct BinDrain {
    pub(crate) n: usize,
    /// From the spawn to the n-th confirmed row (as `pg_stat_user_tables` counts them), s.
    pub(crate) secs: f64,
    pub(crate) rate: f64,
    /// The child's VmRSS (MB) at every tenth delivered.
    pub(crate) rss_samples: Vec<f64>,
    /// The child's VmHWM (MB) once the n-th row was confirmed (never reset: its whole life).
    pub(crate) hwm_mb: f64,
    /// Events per second of every tenth (the first includes the process's start).
    pub(crate) segment_rates: Vec<f64>,
    /// The child's CPU (utime + stime) from its start to the n-th row, s.
    pub(crate) cpu_secs: f64,
    /// `outbox_events_delivered_total` in the one scrape of `/metrics` after the drain (summed
    /// over its label sets).
    pub(crate) scraped_delivered: f64,
    /// From SIGTERM to the exit, s, and the exit status.
    pub(crate) stop_secs: f64,
    pub(crate) exit: String,
    pub(crate) exit_ok: bool,
    /// WARN and ERROR lines in the child's log.
    pub(crate) log_problems: usize,
    /// The 1-minute load average at every tenth (other work on the machine during the drain).
    pub(crate) load: Vec<f64>,
}

/// A child `outbox-relay run`, killed (SIGKILL) and reaped when dropped; its stdout and stderr
/// go to files in `dir`.
struct ChildRelay {
    child: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildRelay {
    /// `outbox-relay --table T --channel T run --kafka-brokers B --metrics-addr ADDR` with the
    /// bench's relay overrides, `DATABASE_URL` set and no other configuration inherited.
    fn spawn(env: &Env, table: &str, metrics_addr: &str) -> Result<ChildRelay> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("stderr");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("OUTBOX_") || name == "DATABASE_URL" || name == "KAFKA_BROKERS" {
                cmd.env_remove(&k);
            }
        }
        cmd.env("DATABASE_URL", &env.pg_url)
            .args(["--table", table, "--channel", table, "run"])
            .args([
                "--kafka-brokers",
                &env.brokers,
                "--metrics-addr",
                metrics_addr,
            ]);
        if let Some(n) = env.opts.batch_size {
            cmd.args(["--batch-size", &n.to_string()]);
        }
        if let Some(n) = env.opts.batches_in_flight {
            cmd.args(["--max-batches-in-flight", &n.to_string()]);
        }
        if let Some(n) = env.opts.per_aggregate {
            cmd.args(["--max-in-flight-per-aggregate", &n.to_string()]);
        }
        for (k, v) in &env.opts.kafka_properties {
            cmd.arg("-X").arg(format!("{k}={v}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout"))?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawning outbox-relay")?;
        Ok(ChildRelay {
            child,
            log,
            _dir: dir,
        })
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// A `kB` field of its /proc status, in MB.
    fn status_mb(&self, field: &str) -> f64 {
        status_kb_of(&self.pid(), field) as f64 / 1024.0
    }

    /// Its log so far.
    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The last lines of its log, for error messages.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM (through kill(1)), then waits up to `timeout` for the exit: (seconds, status).
    async fn terminate(&mut self, timeout: Duration) -> Result<(f64, std::process::ExitStatus)> {
        let t0 = Instant::now();
        let sent = Command::new("kill").args(["-TERM", &self.pid()]).status()?;
        if !sent.success() {
            bail!("kill -TERM {} failed: {sent}", self.pid());
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((t0.elapsed().as_secs_f64(), status));
            }
            if t0.elapsed() > timeout {
                bail!(
                    "outbox-relay still running {timeout:?} after SIGTERM; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The long drain as a user runs it: the `outbox-relay` binary (this build's, release under
/// `cargo bench`) as a child process with `--metrics-addr` on a free loopback port and nobody
/// scraping, draining a preloaded backlog of `n` events. Its VmRSS is read from /proc at every
/// tenth delivered; progress is the records in the topic (the partitions' high watermarks, polled
/// every 100 ms: acknowledged by Kafka, at most the batches in flight ahead of the confirms), and
/// the drain ends when exactly `n` rows are `done`. Then one scrape of `/metrics`, SIGTERM, and
/// the exit status.
pub(crate) async fn million_bin(env: &Env, n: usize) -> Result<BinDrain> {
    env.note_load("million-bin").await;
    let table = env.fresh_table("million_bin").await?;
    let topic = env.create_topic("million_bin").await?;
    load_backlog(env, &table, &topic, n).await?;
    let port = outbox::testing::free_port()?;
    let t0 = Instant::now();
    let mut relay = ChildRelay::spawn(env, &table, &format!("127.0.0.1:{port}"))?;
    let result = watch_bin(env, (&table, &topic), n, &mut relay, t0, port).await;
    if result.is_err() {
        say!("  million-bin: child log (tail):\n{}", relay.log_tail());
    }
    drop(relay);
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    result
}

/// Samples the child until `n` rows are `done`, then scrapes once and stops it.
async fn watch_bin(
    env: &Env,
    (table, topic): (&str, &str),
    n: usize,
    relay: &mut ChildRelay,
    t0: Instant,
    port: u16,
) -> Result<BinDrain> {
    let counter: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("log_level", "3")
        .create()?;
    let every = (n / 10).max(1);
    let (mut samples, mut marks, mut next_mark) = (Vec::new(), vec![t0], every);
    let mut load = Vec::new();
    let deadline = t0 + Duration::from_secs(120 + n as u64 / 1_000);
    let mut last_say = t0;
    loop {
        let sent = records(&counter, topic, env.opts.partitions)? as usize;
        while sent >= next_mark && next_mark <= n {
            let rss = relay.status_mb("VmRSS:");
            samples.push(rss);
            marks.push(Instant::now());
            load.push(loadavg());
            say!(
                "  million-bin: {sent}/{n} in Kafka, child VmRSS {rss:.1} MB (RssAnon {:.1} MB), load average {:.2}",
                relay.status_mb("RssAnon:"),
                loadavg()
            );
            next_mark += every;
            last_say = Instant::now();
        }
        if sent >= n {
            break;
        }
        if let Some(status) = relay.child.try_wait()? {
            bail!("outbox-relay exited ({status}) after {sent} of {n} records");
        }
        if Instant::now() > deadline {
            bail!("outbox-relay sent only {sent} of {n} records in time");
        }
        if last_say.elapsed() > Duration::from_secs(10) {
            say!("  million-bin: {sent}/{n} in Kafka");
            last_say = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all_done(env, table, n).await?;
    let secs = t0.elapsed().as_secs_f64();
    let hwm_mb = relay.status_mb("VmHWM:");
    let cpu_secs = read_stat(&PathBuf::from(format!("/proc/{}/stat", relay.pid())))
        .map_or(0.0, |s| s.2 as f64 / env.clk_tck);
    let scraped_delivered = scrape(port, "outbox_events_delivered_total").await?;
    let (stop_secs, status) = relay.terminate(Duration::from_secs(60)).await?;
    let log_problems = relay
        .log()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .inspect(|l| say!("  million-bin log: {l}"))
        .count();
    let d = BinDrain {
        n,
        secs,
        rate: n as f64 / secs,
        rss_samples: samples,
        hwm_mb,
        segment_rates: segment_rates(&marks, every),
        cpu_secs,
        scraped_delivered,
        stop_secs,
        exit: status.to_string(),
        exit_ok: status.success(),
        log_problems,
        load,
    };
    say!(
        "  million-bin: {n} events in {secs:.1} s = {:.0}/s; child VmHWM {hwm_mb:.1} MB; /metrics delivered {scraped_delivered}; SIGTERM → {status} in {stop_secs:.2} s",
        d.rate
    );
    Ok(d)
}

/// Waits up to 30 s, polling every 100 ms, until exactly `n` rows of `table` are `done`.
async fn all_done(env: &Env, table: &str, n: usize) -> Result<()> {
    let c = env.connect("bench-progress").await?;
    let t0 = Instant::now();
    loop {
        let done: i64 = c
            .query_one(
                &format!("select count(*) from {table} where status = 'done'"),
                &[],
            )
            .await?
            .get(0);
        if done as usize == n {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{done} of {n} rows done 30 s after the topic held {n} records");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One `GET /metrics` on 127.0.0.1:`port`: the sum of `metric`'s samples.
async fn scrape(port: u16, metric: &str) -> Result<f64> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .context("GET /metrics: no answer within 10 s")??;
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "GET /metrics: {}",
            text.lines().next().unwrap_or("empty answer")
        );
    }
    let values: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    if values.is_empty() {
        bail!("GET /metrics: no {metric}");
    }
    Ok(values.iter().sum())
}
