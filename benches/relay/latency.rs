//! Commit → ack latency under paced single-event writers (open loop).

use crate::env::Env;
use crate::events::new_event;
use crate::host::cpu_snap;
use crate::host::cpu_split;
use crate::host::CpuSplit;
use crate::say;
use crate::wake::insert_storm;
use anyhow::Result;
use futures::StreamExt;
use outbox::DeliveryEvent;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use tokio_postgres::AsyncMessage;
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Debug, Clone, Default)]
pub(crate) struct Latency {
    pub(crate) target_rate: f64,
    pub(crate) writers: usize,
    pub(crate) achieved: f64,
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) missing: usize,
    pub(crate) lagged: u64,
    pub(crate) ack_before_commit_returned: usize,
    pub(crate) batches: u64,
    pub(crate) delivered: u64,
    pub(crate) notifications: u64,
    pub(crate) cpu: CpuSplit,
    /// Length of the measured window (s).
    pub(crate) secs: f64,
    /// p99 of each second of the window (ms).
    pub(crate) per_sec_p99: Vec<f64>,
    /// Commit → record read back from Kafka (the measure Debezium's row uses).
    pub(crate) read: ReadBack,
}

/// Commit → record read back by a consumer assigned to the topic's end offsets
/// (`fetch.wait.max.ms` 5, as for Debezium's latency): what a downstream consumer sees,
/// without the relay's confirm commit that precedes its ack.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadBack {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// Measured events never read back.
    pub(crate) missing: usize,
}

/// When each event id was first read back.
pub(crate) type Seen = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// Reads `topic` from its end offsets and records when each record's id header (`header`:
/// `event_id` for ours, `id` for Debezium's outbox event router) first arrives.
pub(crate) fn read_back(
    env: &Env,
    topic: &str,
    header: &'static str,
) -> Result<(Seen, tokio::task::JoinHandle<()>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", format!("bench-read-{}-{topic}", env.run_id))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("log_level", "3")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..env.opts.partitions {
        tpl.add_partition_offset(topic, p, Offset::End)?;
    }
    consumer.assign(&tpl)?;
    let seen: Seen = Arc::default();
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = consumer.stream();
            while let Some(Ok(m)) = stream.next().await {
                let now = Instant::now();
                let id = m.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == header)
                        .and_then(|x| x.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|s| Uuid::parse_str(s.trim_matches('"')).ok())
                });
                if let Some(id) = id {
                    seen.lock().unwrap().entry(id).or_insert(now);
                }
            }
        })
    };
    Ok((seen, task))
}

/// p50/p99/max (ms) of `lat`, sorted in place; NaN when empty.
pub(crate) fn percentiles(lat: &mut [f64]) -> (f64, f64, f64) {
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i]
    };
    (
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    )
}

pub(crate) async fn latency(env: &Env, rate: f64, writers: usize) -> Result<Latency> {
    let phase = format!("lat{}", rate as u64);
    latency_with(env, &phase, rate, writers, env.opts.lat_secs, false).await
}

/// Commit → ack at `rate` events/s from `writers` paced writers, measured over `secs` after a
/// warm-up; with `hold_snapshot`, another session holds a repeatable-read snapshot for exactly
/// the measured window.
pub(crate) async fn latency_with(
    env: &Env,
    phase: &str,
    rate: f64,
    writers: usize,
    secs: f64,
    hold_snapshot: bool,
) -> Result<Latency> {
    env.note_load(phase).await;
    let table = env.fresh_table(phase).await?;
    let topic = env.create_topic(phase).await?;
    let outbox = env.outbox(&table).connect().await?;
    let (read, reader) = read_back(env, &topic, "event_id")?;
    let mut acks_stream = outbox.subscribe();
    let handle = outbox.start()?;
    let t_wait = Instant::now();
    while !outbox.stats().listener_connected && t_wait.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lagged = Arc::new(AtomicU64::new(0));
    let acks: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let sub = {
        let acks = acks.clone();
        let lagged = lagged.clone();
        tokio::spawn(async move {
            while let Some(ev) = acks_stream.next().await {
                let now = Instant::now();
                match ev {
                    DeliveryEvent::Delivered(a) => acks.lock().unwrap().push((a.event_id(), now)),
                    DeliveryEvent::Lagged { missed } => {
                        lagged.fetch_add(missed, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
    };
    let warm = env.opts.lat_warmup;
    let stats0 = outbox.stats();
    // Counts the writers' NOTIFYs (they notify only while the relay is idle-waiting).
    let notified = Arc::new(AtomicU64::new(0));
    let (listen_client, listen_task) = {
        let mut cfg = env.pg.clone();
        cfg.application_name("bench-listener");
        let (lc, mut conn) = cfg.connect(NoTls).await?;
        let count = notified.clone();
        let task = tokio::spawn(async move {
            let mut m = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(msg)) = m.next().await {
                if let AsyncMessage::Notification(_) = msg {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        lc.batch_execute(&format!("listen {table}")).await?;
        (lc, task)
    };
    let t0 = Instant::now() + Duration::from_millis(200);
    let end = t0 + Duration::from_secs_f64(warm + secs);
    let measure_from = t0 + Duration::from_secs_f64(warm);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = env.connect("bench-writer").await?;
        let writer = outbox.writer();
        let topic = topic.clone();
        let keys = env.keys();
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<(Uuid, Instant, bool)> = Vec::new();
            let mut k = 0usize;
            loop {
                let seq = k * writers + w;
                let due = t0 + Duration::from_secs_f64(seq as f64 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                // A single-event transaction: the INSERT commits on its own (one round trip, the
                // cheapest write, leaving the 2 cores as much room as possible for the relay).
                let id = writer
                    .add_new_event(&client, new_event(&topic, seq, &keys))
                    .await?;
                out.push((id, Instant::now(), due >= measure_from));
                k += 1;
            }
            // The connection stays open until the CPU snapshot after the window.
            Ok::<_, anyhow::Error>((out, client))
        }));
    }
    // CPU over the measured window only.
    let snapshot = if hold_snapshot {
        Some(env.connect("bench-snapshot").await?)
    } else {
        None
    };
    tokio::time::sleep_until(tokio::time::Instant::from_std(measure_from)).await;
    if let Some(c) = &snapshot {
        c.batch_execute(&format!(
            "begin isolation level repeatable read; select count(*) from {table}"
        ))
        .await?;
    }
    let before = cpu_snap(env).await;
    let stats1 = outbox.stats();
    let n1 = notified.load(Ordering::Relaxed);
    tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
    if let Some(c) = snapshot {
        c.batch_execute("rollback").await?;
    }
    let after = cpu_snap(env).await;
    let stats2 = outbox.stats();
    let notifications = notified.load(Ordering::Relaxed) - n1;
    drop(listen_client);
    listen_task.abort();
    let mut commits = Vec::new();
    for t in tasks {
        let (out, client) = t.await??;
        commits.extend(out);
        drop(client);
    }
    let _ = stats0;
    let writers_done = Instant::now();
    let total = commits.len();
    while (acks.lock().unwrap().len() < total || read.lock().unwrap().len() < total)
        && writers_done.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    outbox.stop(Duration::from_secs(10)).await?;
    let _ = handle.await;
    let _ = sub.await;
    let acked: HashMap<Uuid, Instant> = acks.lock().unwrap().iter().copied().collect();
    let mut lat = Vec::new();
    let mut missing = 0;
    let mut early = 0;
    for (id, committed, measured) in &commits {
        if !measured {
            continue;
        }
        match acked.get(id) {
            Some(at) => {
                if at < committed {
                    early += 1;
                }
                lat.push(at.saturating_duration_since(*committed).as_secs_f64() * 1e3);
            }
            None => missing += 1,
        }
    }
    // p50 per second of the window: shows whether latency drifts as delivered rows accumulate.
    let mut per_sec: Vec<Vec<f64>> = Vec::new();
    for (id, committed, measured) in &commits {
        if let (true, Some(at)) = (*measured, acked.get(id)) {
            let sec = committed.saturating_duration_since(measure_from).as_secs() as usize;
            if per_sec.len() <= sec {
                per_sec.resize(sec + 1, Vec::new());
            }
            per_sec[sec].push(at.saturating_duration_since(*committed).as_secs_f64() * 1e3);
        }
    }
    let per_sec_p99: Vec<f64> = per_sec
        .iter_mut()
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[((0.99 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
        })
        .collect();
    let drift: Vec<String> = per_sec
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2)
                .map_or("-".to_string(), |m| format!("{m:.1}"))
        })
        .collect();
    say!(
        "  latency @{rate}/s: p50 per second of the window (ms): {}",
        drift.join(" ")
    );
    let (p50, p99, max) = percentiles(&mut lat);
    let read = {
        let seen = read.lock().unwrap();
        let mut lat = Vec::new();
        let mut missing = 0;
        for (id, committed, measured) in &commits {
            match (measured, seen.get(id)) {
                (false, _) => {}
                (true, Some(at)) => {
                    lat.push(at.saturating_duration_since(*committed).as_secs_f64() * 1e3)
                }
                (true, None) => missing += 1,
            }
        }
        let n = lat.len();
        let (p50, p99, max) = percentiles(&mut lat);
        ReadBack {
            n,
            p50,
            p99,
            max,
            missing,
        }
    };
    // Writers that cannot keep up fall behind their schedule: the achieved rate is the measured
    // events over the time their commits actually took.
    let measured = commits.iter().filter(|c| c.2).count();
    let last_commit = commits
        .iter()
        .filter(|c| c.2)
        .map(|c| c.1)
        .max()
        .unwrap_or(measure_from);
    let took = last_commit
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(secs);
    let l = Latency {
        target_rate: rate,
        writers,
        achieved: measured as f64 / took,
        n: lat.len(),
        p50,
        p99,
        max,
        missing,
        lagged: lagged.load(Ordering::Relaxed),
        ack_before_commit_returned: early,
        batches: stats2.batches - stats1.batches,
        notifications,
        delivered: stats2.delivered - stats1.delivered,
        cpu: {
            let mut c = cpu_split(env, &before, &after);
            c.events = (stats2.delivered - stats1.delivered) as usize;
            c
        },
        secs,
        per_sec_p99,
        read,
    };
    drop(outbox);
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    say!(
        "  latency @{rate}/s ({writers} writers): achieved {:.0}/s, n={}, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, missing {}, lagged {}, acks before commit returned {}; read back from Kafka: p50 {:.2} ms, p99 {:.2} ms, {} missing; {:.1} events per batch; {:.0} % of commits NOTIFYed; CPU {}",
        l.achieved, l.n, l.p50, l.p99, l.max, l.missing, l.lagged, l.ack_before_commit_returned,
        l.read.p50, l.read.p99, l.read.missing,
        l.delivered as f64 / l.batches.max(1) as f64,
        100.0 * l.notifications as f64 / (l.achieved * l.secs).max(1.0),
        l.cpu.render()
    );
    Ok(l)
}

/// Commit → ack at the highest rate this machine's writers reach: first 32 writers insert
/// single-event transactions as fast as they can for `wake_secs` while a relay drains them;
/// then the usual paced run at 90 % of that rate. Returns (the probed rate, the latency run).
pub(crate) async fn latency_max(env: &Env) -> Result<(f64, Latency)> {
    let phase = "latmaxprobe";
    env.note_load(phase).await;
    let table = env.fresh_table(phase).await?;
    let topic = env.create_topic(phase).await?;
    let outbox = env.outbox(&table).connect().await?;
    let handle = outbox.start()?;
    let mut clients = Vec::new();
    for _ in 0..32 {
        clients.push(Arc::new(env.connect("bench-writer").await?));
    }
    let rate = insert_storm(env, &table, &topic, &clients, env.opts.wake_secs).await?;
    drop(clients);
    outbox.stop(Duration::from_secs(10)).await?;
    let _ = handle.await;
    drop(outbox);
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    say!("  latency max: 32 writers reached {rate:.0} tx/s with a relay running; pacing at 90 %");
    let l = latency_with(
        env,
        "latmax",
        (0.9 * rate).floor().max(1.0),
        32,
        env.opts.lat_secs,
        false,
    )
    .await?;
    Ok((rate, l))
}
