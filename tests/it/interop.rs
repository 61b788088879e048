//! `add_new_event` inside other libraries' transactions: deadpool-postgres and sqlx.

use std::time::Duration;

use outbox::{NewEvent, Outbox, Writer};
use serde_json::json;

use crate::support::{
    connect_pg, consume_all, create_topic, kafka_brokers, postgres_url, unique_name,
};

async fn setup(prefix: &str) -> (String, String) {
    let table = unique_name(prefix);
    let topic = unique_name(&format!("{prefix}-topic")).replace('_', "-");
    let client = connect_pg().await;
    outbox::migrate_table(&client, &table, &table)
        .await
        .unwrap();
    create_topic(&topic, 1).await;
    (table, topic)
}

/// deadpool-postgres: a pooled client's transaction dereferences to a tokio-postgres
/// `Transaction`; a rolled-back one leaves nothing, a committed one is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_transactions_join_the_outbox() {
    let (table, topic) = setup("dp").await;
    let pg: tokio_postgres::Config = postgres_url().await.parse().unwrap();
    let manager = deadpool_postgres::Manager::new(pg.clone(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .build()
        .unwrap();
    let writer = Writer::new(&table).unwrap();

    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let rolled_back = writer
        .add_new_event(
            &*tx,
            NewEvent::new(&topic, "agg-1", "Gone", json!({"n": 0})),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let kept = writer
        .add_new_event(
            &*tx,
            NewEvent::new(&topic, "agg-1", "Kept", json!({"n": 1})),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // A bare pooled client (autocommit) works too.
    let direct = writer
        .add_new_event(
            &**client,
            NewEvent::new(&topic, "agg-1", "Direct", json!({"n": 2})),
        )
        .await
        .unwrap();

    let outbox = Outbox::builder()
        .postgres(pg)
        .kafka_brokers(kafka_brokers())
        .table(&table)
        .channel(&table)
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let records = consume_all(&kafka_brokers(), &topic, 2, Duration::from_secs(20)).await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.header("event_id").unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![kept.to_string(), direct.to_string()]);
    assert!(!ids.contains(&rolled_back.to_string()));
    outbox.stop(Duration::from_secs(5)).await.unwrap();
    relay.await.unwrap().unwrap();
}

/// sqlx: `Writer::add_new_event_sqlx(&mut *tx, …)` joins a sqlx transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_transactions_join_the_outbox() {
    use sqlx::Connection as _;
    let (table, topic) = setup("sq").await;
    let writer = Writer::new(&table).unwrap();
    let mut conn = sqlx::PgConnection::connect(&postgres_url().await)
        .await
        .unwrap();

    let mut tx = conn.begin().await.unwrap();
    writer
        .add_new_event_sqlx(
            &mut tx,
            NewEvent::new(&topic, "agg-9", "Gone", json!({"n": 0})),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let kept = writer
        .add_new_event_sqlx(
            &mut tx,
            NewEvent::new(&topic, "agg-9", "Kept", json!({"n": 1, "s": "é"})).header("h", "v"),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Validation happens before anything is sent.
    let bad = writer
        .add_new_event_sqlx(
            &mut conn,
            NewEvent::new("bad topic", "agg-9", "X", json!({})),
        )
        .await;
    assert!(matches!(
        bad,
        Err(outbox::Error::InvalidEvent {
            field: "event_topic",
            ..
        })
    ));

    let outbox = Outbox::builder()
        .database_url(&postgres_url().await)
        .kafka_brokers(kafka_brokers())
        .table(&table)
        .channel(&table)
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let records = consume_all(&kafka_brokers(), &topic, 1, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].header("event_id"),
        Some(kept.to_string().as_str())
    );
    assert_eq!(records[0].header("h"), Some("v"));
    assert_eq!(records[0].json(), json!({"n": 1, "s": "é"}));
    assert_eq!(records[0].key_str(), "agg-9");
    outbox.stop(Duration::from_secs(5)).await.unwrap();
    relay.await.unwrap().unwrap();
}
