//! Burst: a backlog committed in one transaction while the relay already runs on a small table.

use crate::drain::Drain;
use crate::env::Env;
use crate::events::new_event;
use crate::host::cpu_snap;
use crate::host::cpu_split;
use crate::host::hwm_mb;
use crate::host::reset_hwm;
use crate::host::rss_mb;
use crate::say;
use anyhow::bail;
use anyhow::Result;
use outbox::NewEvent;
use std::time::Duration;
use std::time::Instant;

/// A backlog that arrives while the relay is already running on a small table: the relay has
/// prepared its statements (and Postgres cached their plans) while the table was tiny, then `n`
/// events commit in one transaction. Measured from that commit until all are delivered.
pub(crate) async fn burst(env: &Env, n: usize) -> Result<Drain> {
    env.note_load("burst").await;
    let table = env.fresh_table("burst").await?;
    let topic = env.create_topic("burst").await?;
    let outbox = env.outbox(&table).connect().await?;
    let handle = outbox.start()?;
    // Trickle: single events, 20 ms apart, so that the relay runs ~30 small batches.
    let client = env.connect("bench-writer").await?;
    let writer = outbox.writer();
    let warm = 30usize;
    for i in 0..warm {
        writer
            .add_new_event(&client, new_event(&topic, n + i, &env.keys()))
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    while (outbox.stats().delivered as usize) < warm && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The burst: n events in one transaction.
    let mut client = client;
    let tx = client.transaction().await?;
    for start in (0..n).step_by(5_000) {
        let events: Vec<NewEvent> = (start..(start + 5_000).min(n))
            .map(|i| new_event(&topic, i, &env.keys()))
            .collect();
        writer.add_new_events(&tx, &events).await?;
    }
    reset_hwm();
    let before = cpu_snap(env).await;
    tx.commit().await?;
    let t0 = Instant::now();
    let target = (warm + n) as u64;
    let deadline = t0 + Duration::from_secs(300 + n as u64 / 500);
    let mut last_say = t0;
    while outbox.stats().delivered < target {
        if handle.is_finished() || Instant::now() > deadline {
            bail!(
                "burst: relay delivered only {} of {n}",
                outbox.stats().delivered as usize - warm
            );
        }
        if last_say.elapsed() > Duration::from_secs(10) {
            say!(
                "  burst: {}/{n} delivered",
                outbox.stats().delivered as usize - warm
            );
            last_say = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = cpu_snap(env).await;
    let hwm = hwm_mb();
    outbox.stop(Duration::from_secs(10)).await?;
    let _ = handle.await;
    let mut cpu = cpu_split(env, &before, &after);
    cpu.events = n;
    drop(outbox);
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    let d = Drain {
        n,
        secs,
        rate: n as f64 / secs,
        hwm_mb: hwm,
        rss_end_mb: rss_mb(),
        cpu,
        ..Default::default()
    };
    say!(
        "  burst: {n} events in {secs:.2} s = {:.0}/s; CPU {}",
        d.rate,
        d.cpu.render()
    );
    Ok(d)
}
