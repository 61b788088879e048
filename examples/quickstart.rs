//! Quick start: `cargo run --example quickstart --features testing`
//!
//! With no configuration it starts a throwaway Postgres (from the installed server binaries) and
//! librdkafka's in-process mock Kafka cluster. Set `DATABASE_URL` and/or `KAFKA_BROKERS` to run
//! against real servers (the topic `quickstart-orders` is created when missing).
//!
//! It migrates the outbox table, writes orders and their events in a few transactions (one rolled
//! back), runs the relay, prints each delivery ack and a summary, and stops gracefully.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use outbox::testing::{MockKafka, TestPostgres};
use outbox::{DeliveryEvent, NewEvent, Outbox};
use serde_json::json;

const TOPIC: &str = "quickstart-orders";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,outbox=info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    // Postgres: DATABASE_URL, or a throwaway server.
    let mut _pg = None;
    let database_url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            println!("DATABASE_URL is unset: starting a throwaway Postgres…");
            let pg = TestPostgres::start().await?;
            let url = pg.url();
            _pg = Some(pg);
            url
        }
    };
    // Kafka: KAFKA_BROKERS, or librdkafka's in-process mock cluster.
    let mut _kafka = None;
    let brokers = match std::env::var("KAFKA_BROKERS") {
        Ok(b) => {
            if let Err(e) = outbox::testing::create_topic(&b, TOPIC, 3).await {
                println!("note: creating topic {TOPIC}: {e} (continuing; it may exist already)");
            }
            b
        }
        Err(_) => {
            println!(
                "KAFKA_BROKERS is unset: starting librdkafka's in-process mock Kafka cluster…"
            );
            let kafka = MockKafka::start(1)?;
            kafka.create_topic(TOPIC, 3)?;
            let b = kafka.bootstrap_servers();
            _kafka = Some(kafka);
            b
        }
    };

    let outbox = Outbox::builder()
        .database_url(&database_url)
        .kafka_brokers(&brokers)
        .migrate(true)
        .connect()
        .await?;
    let mut acks = outbox.subscribe();
    let relay = outbox.start()?;

    // The service's own writes: an orders table and its events, in one transaction each.
    let (mut client, connection) =
        tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("create table if not exists quickstart_orders (id text primary key, total int not null)")
        .await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut committed = HashSet::new();
    let started = Instant::now();
    for n in 1..=3 {
        let order = format!("order-{run}-{n}");
        let tx = client.transaction().await?;
        tx.execute(
            "insert into quickstart_orders (id, total) values ($1, $2)",
            &[&order, &(n * 10)],
        )
        .await?;
        let placed = outbox
            .add_new_event(
                &tx,
                NewEvent::new(
                    TOPIC,
                    &order,
                    "OrderPlaced",
                    json!({"order": order, "total": n * 10}),
                ),
            )
            .await?;
        let paid = outbox
            .add_new_event(
                &tx,
                NewEvent::new(TOPIC, &order, "OrderPaid", json!({"order": order}))
                    .header("source", "quickstart"),
            )
            .await?;
        tx.commit().await?;
        committed.extend([placed, paid]);
    }
    // A transaction that rolls back: its event must never be published.
    let rolled_back = {
        let order = format!("order-{run}-rolled-back");
        let tx = client.transaction().await?;
        tx.execute(
            "insert into quickstart_orders (id, total) values ($1, 0)",
            &[&order],
        )
        .await?;
        let id = outbox
            .add_new_event(
                &tx,
                NewEvent::new(TOPIC, &order, "OrderPlaced", json!({"order": order})),
            )
            .await?;
        tx.rollback().await?;
        id
    };
    println!(
        "wrote {} events in 3 committed transactions, 1 event in a rolled-back one",
        committed.len()
    );

    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.intersection(&committed).count() < committed.len() {
        let next = tokio::time::timeout_at(deadline, acks.next()).await;
        match next {
            Ok(Some(DeliveryEvent::Delivered(ack))) => {
                println!(
                    "ack: topic={} partition={} offset={} key={} type={} event_id={}",
                    ack.topic(),
                    ack.partition(),
                    ack.offset(),
                    ack.aggregate_id(),
                    ack.event_type(),
                    ack.event_id()
                );
                // Other rows of the table (from earlier runs, other writers) may be delivered too.
                if committed.contains(&ack.event_id()) || ack.event_id() == rolled_back {
                    seen.insert(ack.event_id());
                }
            }
            Ok(Some(DeliveryEvent::Failed(f))) => {
                println!(
                    "delivery failed (will retry): {} {}",
                    f.event_id(),
                    f.error()
                )
            }
            Ok(Some(other)) => println!("{other:?}"),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    let elapsed = started.elapsed();
    // What the relay knows about a failure, while it still runs (e.g. no broker reachable).
    let problem = if seen.intersection(&committed).count() < committed.len() {
        match outbox.health().await {
            Ok(h) => h.kafka_problem.or(h.postgres_problem),
            Err(e) => Some(e.to_string()),
        }
    } else {
        None
    };
    outbox.stop(Duration::from_secs(10)).await?;
    relay.await??;

    let missing = committed.difference(&seen).count();
    let leaked = seen.contains(&rolled_back);
    println!(
        "summary: {} committed, {} delivered, {} missing, rolled-back event published: {}, {:.0?} from the first write to the last ack",
        committed.len(),
        seen.intersection(&committed).count(),
        missing,
        if leaked { "YES" } else { "no" },
        elapsed
    );
    if missing > 0 || leaked {
        let why = match (&problem, std::env::var("KAFKA_BROKERS")) {
            (Some(p), Ok(b)) => format!(
                "; the relay reports: {p} (KAFKA_BROKERS={b}: is a broker reachable there?)"
            ),
            (Some(p), Err(_)) => format!("; the relay reports: {p}"),
            (None, Ok(b)) => format!(" (KAFKA_BROKERS={b}: is a broker reachable there?)"),
            (None, Err(_)) => String::new(),
        };
        anyhow::bail!(
            "quickstart failed: {missing} events missing within 30 s, rolled-back published: {leaked}{why}"
        );
    }
    Ok(())
}
