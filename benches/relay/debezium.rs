//! Debezium side by side: Kafka Connect standalone with Debezium's Postgres connector (pgoutput)
//! and its outbox event router SMT (benches/debezium/run), on the same Postgres and broker:
//! the drain of the same backlog, and commit → record in Kafka at 1k/s.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rdkafka::consumer::BaseConsumer;
use rdkafka::ClientConfig;

use crate::env::{records, Env};
use crate::events::new_event;
use crate::latency::{percentiles, read_back};
use crate::say;

/// Debezium's figures of one run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Debezium {
    pub(crate) n: usize,
    /// From the backlog's commit to its first record in Kafka.
    pub(crate) first_secs: f64,
    /// From the backlog's commit to its last record in Kafka.
    pub(crate) drain_secs: f64,
    pub(crate) drain_rate: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) measured: usize,
    pub(crate) missing: usize,
    pub(crate) achieved: f64,
}

/// Connect standalone, killed (with its JVM: the script `exec`s java) when dropped.
struct Connect {
    child: Child,
    dir: PathBuf,
}

impl Drop for Connect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/debezium/run")
}

fn start_connect(env: &Env, table: &str, dir: &std::path::Path) -> Result<Connect> {
    let log = std::fs::File::create(dir.join("connect.log"))?;
    let host = env
        .pg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = env.pg.get_ports().first().copied().unwrap_or(5432);
    let password = env
        .pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let child = Command::new(script())
        .arg("connect")
        .arg(dir)
        .env("KAFKA_BROKERS", &env.brokers)
        .env("PGHOST", host)
        .env("PGPORT", port.to_string())
        .env("PGUSER", env.pg.get_user().unwrap_or("postgres"))
        .env("PGPASSWORD", password)
        .env("PGDATABASE", env.pg.get_dbname().unwrap_or("postgres"))
        .env("OUTBOX_TABLE", table)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning benches/debezium/run connect")?;
    Ok(Connect {
        child,
        dir: dir.to_path_buf(),
    })
}

/// Waits until the connector's replication slot is active (Connect up and streaming).
async fn wait_streaming(env: &Env, connect: &mut Connect, table: &str) -> Result<()> {
    let c = env.connect("bench-admin").await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let active: Option<bool> = c
            .query_opt(
                "select active from pg_replication_slots where slot_name = $1",
                &[&format!("dbz_{table}")],
            )
            .await?
            .map(|r| r.get(0));
        if active == Some(true) {
            // The connector logs "Streaming requested" a moment after the slot is taken.
            tokio::time::sleep(Duration::from_secs(2)).await;
            return Ok(());
        }
        if let Some(status) = connect.child.try_wait()? {
            bail!(
                "Connect exited ({status}) before streaming; see {}",
                connect.dir.join("connect.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "Connect did not start streaming within 300 s; see {}",
                connect.dir.join("connect.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn drop_slot(env: &Env, table: &str) {
    if let Ok(c) = env.connect("bench-admin").await {
        for _ in 0..50 {
            let r = c
                .execute(
                    "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                      where slot_name = $1 and not active",
                    &[&format!("dbz_{table}")],
                )
                .await;
            if matches!(r, Ok(1)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = c
            .batch_execute(&format!("drop publication if exists dbz_{table}"))
            .await;
    }
}

/// Drain: Connect starts on an empty table and streams (slot and publication created); then the
/// backlog commits in one transaction (pgoutput decodes a transaction once it commits), timed from
/// the commit to the last record in Kafka (high watermarks polled every 20 ms). Then 4 writers insert at 1k/s and a consumer reads the records: the
/// latency is commit → the record read from Kafka (one fetch later than a producer's ack).
pub(crate) async fn debezium(env: &Env) -> Result<Debezium> {
    env.note_load("debezium").await;
    let out = std::process::Command::new(script())
        .arg("fetch")
        .output()
        .context("benches/debezium/run fetch")?;
    if !out.status.success() {
        bail!(
            "benches/debezium/run fetch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let n = env.opts.n;
    let table = env.fresh_table("dbz").await?;
    let topic = env.create_topic("dbz").await?;
    let dir = tempfile::tempdir()?;
    let result = async {
        let mut connect = start_connect(env, &table, dir.path())?;
        wait_streaming(env, &mut connect, &table).await?;
        say!("  debezium: connector streaming; committing {n} events in one transaction");
        let counter: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &env.brokers)
            .set("group.id", format!("bench-dbz-{}", env.run_id))
            .set("log_level", "3")
            .create()?;
        let mut client = env.connect("bench-loader").await?;
        let writer = outbox::Writer::new(&table)?;
        let keys = env.keys();
        let tx = client.transaction().await?;
        for start in (0..n).step_by(5_000) {
            let events: Vec<_> = (start..(start + 5_000).min(n))
                .map(|i| new_event(&topic, i, &keys))
                .collect();
            writer.add_new_events(&tx, &events).await?;
        }
        tx.commit().await?;
        let t0 = Instant::now();
        let mut first = None;
        let deadline = t0 + Duration::from_secs(300 + n as u64 / 200);
        let mut last_say = t0;
        loop {
            let got = records(&counter, &topic, env.opts.partitions)?;
            if got > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if got as usize >= n {
                break;
            }
            if let Some(status) = connect.child.try_wait()? {
                bail!("Connect exited ({status}) after {got} of {n} records");
            }
            if Instant::now() > deadline {
                bail!("Debezium delivered only {got} of {n} records");
            }
            if last_say.elapsed() > Duration::from_secs(10) {
                say!("  debezium: {got}/{n} records in Kafka");
                last_say = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let end = Instant::now();
        let drain_secs = end.duration_since(t0).as_secs_f64().max(1e-3);
        let first = first.unwrap_or(end);
        let mut d = Debezium {
            n,
            first_secs: first.duration_since(t0).as_secs_f64(),
            drain_secs,
            drain_rate: n as f64 / drain_secs,
            ..Default::default()
        };
        say!(
            "  debezium drain: {n} records in {drain_secs:.2} s = {:.0}/s (first record after {:.2} s)",
            d.drain_rate,
            d.first_secs
        );
        latency(env, &table, &topic, &mut d).await?;
        drop(connect);
        Ok::<_, anyhow::Error>(d)
    }
    .await;
    drop_slot(env, &table).await;
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    result
}

/// Commit → record read from Kafka, 4 paced writers at 1k/s for the latency window.
async fn latency(env: &Env, table: &str, topic: &str, d: &mut Debezium) -> Result<()> {
    let rate = 1_000.0;
    let writers = 4usize;
    let (seen, reader) = read_back(env, topic, "id")?;
    // Let the consumer's assignment settle at the end offsets.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warm = env.opts.lat_warmup;
    let secs = env.opts.lat_secs;
    let t0 = Instant::now() + Duration::from_millis(200);
    let measure_from = t0 + Duration::from_secs_f64(warm);
    let end = t0 + Duration::from_secs_f64(warm + secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = env.connect("bench-writer").await?;
        let writer = outbox::Writer::new(table)?;
        let topic = topic.to_string();
        let keys = env.keys();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut k = 0usize;
            loop {
                let seq = k * writers + w;
                let due = t0 + Duration::from_secs_f64(seq as f64 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                let id = writer
                    .add_new_event(&client, new_event(&topic, 10_000_000 + seq, &keys))
                    .await?;
                out.push((id, Instant::now(), due >= measure_from));
                k += 1;
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut commits = Vec::new();
    for t in tasks {
        commits.extend(t.await??);
    }
    let done = Instant::now();
    while seen.lock().unwrap().len() < commits.len() && done.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    let seen = seen.lock().unwrap();
    let mut lat = Vec::new();
    let mut missing = 0;
    for (id, committed, measured) in &commits {
        if !measured {
            continue;
        }
        match seen.get(id) {
            Some(at) => lat.push(at.saturating_duration_since(*committed).as_secs_f64() * 1e3),
            None => missing += 1,
        }
    }
    if lat.is_empty() {
        return Err(anyhow!(
            "no Debezium record of the latency run was read back ({missing} missing)"
        ));
    }
    let measured = commits.iter().filter(|c| c.2).count();
    d.measured = lat.len();
    (d.p50, d.p99, d.max) = percentiles(&mut lat);
    d.missing = missing;
    d.achieved = measured as f64 / secs;
    say!(
        "  debezium latency @1000/s: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} measured, {} missing",
        d.p50,
        d.p99,
        d.max,
        d.measured,
        d.missing
    );
    Ok(())
}
