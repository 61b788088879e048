//! A service that uses the outbox, and how it tests itself with `outbox::testing`.
//!
//! Run the service once: `cargo run --example order_service --features testing`.
//! Run its tests: `cargo test --example order_service --features testing`.
//!
//! The tests at the bottom read like a user's own: a throwaway Postgres, an embedded Kafka
//! (librdkafka's mock cluster), the real relay, and one assertion that the right events were
//! published in the right order.

use outbox::{NewEvent, Writer};
use serde_json::json;
use uuid::Uuid;

/// The service's own code: placing an order writes the order row and its event in one
/// transaction, so either both happen or neither does.
pub async fn place_order(
    client: &mut tokio_postgres::Client,
    outbox: &Writer,
    order_id: &str,
    total_cents: i64,
) -> anyhow::Result<Uuid> {
    let tx = client.transaction().await?;
    tx.execute(
        "insert into orders (id, total_cents, state) values ($1, $2, 'placed')",
        &[&order_id, &total_cents],
    )
    .await?;
    let event = NewEvent::new(
        "orders",
        order_id,
        "OrderPlaced",
        json!({"order_id": order_id, "total_cents": total_cents}),
    );
    let id = outbox.add_new_event(&tx, event).await?;
    tx.commit().await?;
    Ok(id)
}

/// Cancelling emits a second event for the same aggregate: consumers must see it after
/// `OrderPlaced`.
pub async fn cancel_order(
    client: &mut tokio_postgres::Client,
    outbox: &Writer,
    order_id: &str,
) -> anyhow::Result<Uuid> {
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "update orders set state = 'cancelled' where id = $1 and state = 'placed'",
            &[&order_id],
        )
        .await?;
    anyhow::ensure!(n == 1, "order {order_id} is not placed");
    let id = outbox
        .add_new_event(
            &tx,
            NewEvent::new(
                "orders",
                order_id,
                "OrderCancelled",
                json!({"order_id": order_id}),
            ),
        )
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// The schema the service needs: its own table plus the outbox table.
pub async fn migrate(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .batch_execute(
            "create table if not exists orders (id text primary key, total_cents bigint not null, state text not null)",
        )
        .await?;
    outbox::migrate(client).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let harness = harness::Harness::start().await?;
    let mut client = harness.pg.connect().await?;
    let placed = place_order(&mut client, &harness.writer, "order-1", 1999).await?;
    let cancelled = cancel_order(&mut client, &harness.writer, "order-1").await?;
    let records = outbox::testing::assert_published(
        &harness.kafka.bootstrap_servers(),
        "orders",
        &[placed, cancelled],
        std::time::Duration::from_secs(10),
    )
    .await;
    for r in &records {
        println!(
            "published {} for {} at partition {} offset {}",
            r.header("event_type").unwrap_or("?"),
            r.key_str(),
            r.partition,
            r.offset
        );
    }
    harness.stop().await
}

#[cfg(test)]
mod tests_of_the_service {
    use super::harness::Harness;
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn placing_then_cancelling_publishes_both_events_in_order() -> anyhow::Result<()> {
        let harness = Harness::start().await?;
        let mut client = harness.pg.connect().await?;

        let placed = place_order(&mut client, &harness.writer, "order-7", 500).await?;
        let cancelled = cancel_order(&mut client, &harness.writer, "order-7").await?;

        let records = outbox::testing::assert_published(
            &harness.kafka.bootstrap_servers(),
            "orders",
            &[placed, cancelled],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(records[0].json()["total_cents"], 500);
        assert_eq!(records[1].header("event_type"), Some("OrderCancelled"));
        harness.stop().await
    }

    #[tokio::test]
    async fn a_failed_cancel_publishes_nothing() -> anyhow::Result<()> {
        let harness = Harness::start().await?;
        let mut client = harness.pg.connect().await?;
        let placed = place_order(&mut client, &harness.writer, "order-8", 100).await?;
        cancel_order(&mut client, &harness.writer, "order-8").await?;
        // Cancelling twice fails and rolls back: no second OrderCancelled.
        assert!(cancel_order(&mut client, &harness.writer, "order-8")
            .await
            .is_err());
        outbox::testing::assert_published(
            &harness.kafka.bootstrap_servers(),
            "orders",
            &[placed],
            Duration::from_secs(10),
        )
        .await;
        outbox::testing::assert_nothing_more(
            &harness.kafka.bootstrap_servers(),
            "orders",
            2,
            Duration::from_secs(1),
        )
        .await;
        harness.stop().await
    }
}

/// The few lines a service needs to test itself end to end.
mod harness {
    use outbox::testing::{MockKafka, TestPostgres};
    use outbox::{Outbox, Writer};

    pub struct Harness {
        pub pg: TestPostgres,
        pub kafka: MockKafka,
        pub writer: Writer,
        outbox: Outbox,
    }

    impl Harness {
        pub async fn start() -> anyhow::Result<Harness> {
            let pg = TestPostgres::start().await?;
            let kafka = MockKafka::start(1)?;
            kafka.create_topic("orders", 3)?;
            super::migrate(&pg.connect().await?).await?;
            let outbox = Outbox::builder()
                .postgres(pg.config())
                .kafka_brokers(kafka.bootstrap_servers())
                .connect()
                .await?;
            outbox.start()?;
            Ok(Harness {
                writer: outbox.writer(),
                pg,
                kafka,
                outbox,
            })
        }

        pub async fn stop(self) -> anyhow::Result<()> {
            self.outbox.stop(std::time::Duration::from_secs(5)).await?;
            Ok(())
        }
    }
}
