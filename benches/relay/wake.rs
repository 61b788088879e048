//! What the wake path (statement trigger, advisory lock, NOTIFY) costs writers.

use crate::env::Env;
use crate::events::new_event;
use crate::host::cpu_snap;
use crate::host::cpu_split;
use crate::say;
use anyhow::Result;
use futures::StreamExt;
use outbox::Writer;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio_postgres::AsyncMessage;
use tokio_postgres::Client;
use tokio_postgres::NoTls;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WakeVariant {
    TriggerOff,
    TriggerOn,
    IdleRelay,
    RelayRunning,
}

impl WakeVariant {
    pub(crate) fn label(self) -> &'static str {
        match self {
            WakeVariant::TriggerOff => "trigger off",
            WakeVariant::TriggerOn => "trigger on, no relay",
            WakeVariant::IdleRelay => "trigger on, relay idle-waiting (every commit NOTIFYs)",
            WakeVariant::RelayRunning => "trigger on, relay running and draining",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Wake {
    /// (variant, writers) → tx/s of each round.
    pub(crate) results: HashMap<(WakeVariantKey, usize), Vec<f64>>,
    pub(crate) notifications: HashMap<usize, u64>,
    pub(crate) lock_verified: Option<bool>,
    /// (variant, writers) → share of the 2 cores left idle during the runs.
    pub(crate) idle: HashMap<(WakeVariantKey, usize), Vec<f64>>,
}

pub(crate) type WakeVariantKey = u8;

impl Wake {
    /// Median over the rounds.
    pub(crate) fn mean(&self, v: WakeVariant, w: usize) -> f64 {
        let mut r = self.results.get(&(v as u8, w)).cloned().unwrap_or_default();
        if r.is_empty() {
            return f64::NAN;
        }
        r.sort_by(f64::total_cmp);
        if r.len() % 2 == 1 {
            r[r.len() / 2]
        } else {
            (r[r.len() / 2 - 1] + r[r.len() / 2]) / 2.0
        }
    }

    pub(crate) fn idle(&self, v: WakeVariant, w: usize) -> f64 {
        let r = self.idle.get(&(v as u8, w)).cloned().unwrap_or_default();
        100.0 * r.iter().sum::<f64>() / r.len().max(1) as f64
    }

    pub(crate) fn range(&self, v: WakeVariant, w: usize) -> String {
        let r = self.results.get(&(v as u8, w)).cloned().unwrap_or_default();
        if r.len() < 2 {
            return String::new();
        }
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        format!(" [{lo:.0}–{hi:.0}]")
    }
}

pub(crate) async fn wake_cost(env: &Env) -> Result<Wake> {
    env.note_load("wake").await;
    let table = env.fresh_table("wake").await?;
    let topic = env.create_topic("wake").await?;
    let admin = env.connect("bench-admin").await?;
    let (lock_class, key) = outbox::wake_lock(&table);
    let mut out = Wake::default();

    // Check that the simulated idle relay takes the same lock as a real one.
    {
        let outbox = env.outbox(&table).connect().await?;
        let h = outbox.start()?;
        let t = Instant::now();
        let mut seen = None;
        while t.elapsed() < Duration::from_secs(10) && seen.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let rows = admin
                .query(
                    "select l.classid::int8, l.objid::int8 from pg_locks l
                       join pg_stat_activity a on a.pid = l.pid
                      where a.application_name = 'outbox-relay-waker'
                        and l.locktype = 'advisory' and l.granted",
                    &[],
                )
                .await?;
            if let Some(r) = rows.first() {
                let (c, o): (i64, i64) = (r.get(0), r.get(1));
                seen = Some(c == i64::from(lock_class as u32) && o == i64::from(key as u32));
            }
        }
        outbox.stop(Duration::from_secs(10)).await?;
        let _ = h.await;
        out.lock_verified = seen;
        say!("  wake: simulated idle-relay lock matches the relay's waker lock: {seen:?}");
    }

    let variants = [
        WakeVariant::TriggerOff,
        WakeVariant::TriggerOn,
        WakeVariant::IdleRelay,
        WakeVariant::RelayRunning,
    ];
    let secs = env.opts.wake_secs;
    for round in 0..env.opts.wake_rounds {
        for &writers in &[8usize, 32] {
            let mut clients = Vec::new();
            for _ in 0..writers {
                clients.push(Arc::new(env.connect("bench-writer").await?));
            }
            for &v in &variants {
                admin
                    .batch_execute(&format!(
                        "truncate {table}; alter table {table} {} trigger {table}_outbox_wake; checkpoint",
                        if v == WakeVariant::TriggerOff { "disable" } else { "enable" }
                    ))
                    .await?;
                // The idle relay, simulated: its waker holds the lock (so every writer's
                // try-lock fails and it NOTIFYs) and its listener LISTENs.
                let mut holder = None;
                let mut listener = None;
                let notified = Arc::new(AtomicU64::new(0));
                let mut relay = None;
                match v {
                    WakeVariant::IdleRelay => {
                        let h = env.connect("bench-waker").await?;
                        h.execute("select pg_advisory_lock($1, $2)", &[&lock_class, &key])
                            .await?;
                        holder = Some(h);
                        let mut cfg = env.pg.clone();
                        cfg.application_name("bench-listener");
                        let (lc, mut conn) = cfg.connect(NoTls).await?;
                        let count = notified.clone();
                        let drain = tokio::spawn(async move {
                            let mut m = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                            while let Some(Ok(msg)) = m.next().await {
                                if let AsyncMessage::Notification(_) = msg {
                                    count.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                        lc.batch_execute(&format!("listen {table}")).await?;
                        listener = Some((lc, drain));
                    }
                    WakeVariant::RelayRunning => {
                        let outbox = env.outbox(&table).connect().await?;
                        let h = outbox.start()?;
                        let t = Instant::now();
                        while !outbox.stats().listener_connected
                            && t.elapsed() < Duration::from_secs(10)
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        relay = Some((outbox, h));
                    }
                    _ => {}
                }
                let before = cpu_snap(env).await;
                let rate = insert_storm(env, &table, &topic, &clients, secs).await?;
                let after = cpu_snap(env).await;
                let cpu = cpu_split(env, &before, &after);
                out.idle
                    .entry((v as u8, writers))
                    .or_default()
                    .push(cpu.idle() / (cpu.wall * cpu.cores as f64));
                if let Some((outbox, h)) = relay {
                    outbox.stop(Duration::from_secs(10)).await?;
                    let _ = h.await;
                }
                if let Some(h) = holder {
                    h.execute("select pg_advisory_unlock($1, $2)", &[&lock_class, &key])
                        .await?;
                }
                if let Some((lc, drain)) = listener {
                    drop(lc);
                    drain.abort();
                    *out.notifications.entry(writers).or_default() +=
                        notified.load(Ordering::Relaxed);
                }
                say!(
                    "  wake round {round}, {writers} writers, {}: {rate:.0} tx/s; CPU {}",
                    v.label(),
                    cpu.render()
                );
                out.results
                    .entry((v as u8, writers))
                    .or_default()
                    .push(rate);
            }
        }
    }
    admin
        .batch_execute(&format!(
            "alter table {table} enable trigger {table}_outbox_wake"
        ))
        .await?;
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    Ok(out)
}

/// Single-row insert transactions (autocommit `add_new_event`: one round trip each) from every
/// client as fast as they go for `secs`; returns transactions per second.
pub(crate) async fn insert_storm(
    env: &Env,
    table: &str,
    topic: &str,
    clients: &[Arc<Client>],
    secs: f64,
) -> Result<f64> {
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    let keys = env.keys();
    let mut tasks = Vec::new();
    for (w, c) in clients.iter().enumerate() {
        let c = c.clone();
        let writer = Writer::new(table)?;
        let topic = topic.to_string();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
            let mut n = 0u64;
            let mut i = w * 1_000_000;
            while Instant::now() < end {
                writer
                    .add_new_event(c.as_ref(), new_event(&topic, i, &keys))
                    .await?;
                if Instant::now() <= end {
                    n += 1;
                }
                i += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / secs)
}
