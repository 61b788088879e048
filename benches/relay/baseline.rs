//! Baseline: the original Go package's algorithm against the same table and producer settings.

use crate::env::Env;
use crate::events::load_backlog;
use crate::events::producer_config;
use crate::say;
use anyhow::Result;
use rdkafka::message::Header;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureProducer;
use rdkafka::producer::FutureRecord;
use std::time::Duration;
use std::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone, Default)]
pub(crate) struct Baseline {
    pub(crate) secs: f64,
    pub(crate) delivered: usize,
    pub(crate) rate: f64,
}

pub(crate) async fn baseline(env: &Env) -> Result<Baseline> {
    env.note_load("baseline").await;
    let table = env.fresh_table("goalg").await?;
    let topic = env.create_topic("goalg").await?;
    load_backlog(env, &table, &topic, 3_000).await?;
    let producer: FutureProducer = producer_config(&env.brokers).create()?;
    let mut client = env.connect("bench-baseline").await?;
    let secs = env.opts.baseline_secs;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut delivered = 0usize;
    let mut tick = 0u32;
    while t0 + Duration::from_secs(5) * tick < end {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            t0 + Duration::from_secs(5) * tick,
        ))
        .await;
        tick += 1;
        // 1. One transaction: pick ≤ 100 undelivered, unreserved events and reserve them.
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                &format!(
                    "select id, aggregate_id, event_topic, event_type, payload::text from {table}
                      where status <> 'done' and (reserved_to is null or reserved_to < localtimestamp)
                      order by created_at limit 100 for update"
                ),
                &[],
            )
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        tx.execute(
            &format!(
                "update {table} set reserved_to = localtimestamp + interval '1 minute' where id = any($1)"
            ),
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        // 2. Publish them with the relay's producer settings.
        let mut futures = Vec::new();
        for r in &rows {
            let id: Uuid = r.get(0);
            let agg: String = r.get(1);
            let topic: String = r.get(2);
            let ty: String = r.get(3);
            let payload: String = r.get(4);
            let ids = id.hyphenated().to_string();
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "event_id",
                    value: Some(ids.as_str()),
                })
                .insert(Header {
                    key: "event_type",
                    value: Some(ty.as_str()),
                });
            let f = producer
                .send_result(
                    FutureRecord::to(&topic)
                        .key(&agg)
                        .payload(&payload)
                        .headers(headers),
                )
                .map_err(|(e, _)| e)?;
            futures.push((id, f));
        }
        // 3. One UPDATE per delivered event, each in its own transaction.
        for (id, f) in futures {
            if matches!(f.await, Ok(Ok(_))) {
                client
                    .execute(
                        &format!(
                            "update {table} set status = 'done', reserved_to = null where id = $1"
                        ),
                        &[&id],
                    )
                    .await?;
                if Instant::now() <= end {
                    delivered += 1;
                }
            }
        }
    }
    drop(producer);
    env.drop_table(&table).await;
    env.delete_topic(&topic).await;
    let b = Baseline {
        secs,
        delivered,
        rate: delivered as f64 / secs,
    };
    say!(
        "  baseline (Go algorithm): {delivered} events in {secs:.0} s = {:.1}/s",
        b.rate
    );
    Ok(b)
}
