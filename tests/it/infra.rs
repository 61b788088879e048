//! Tests of the test infrastructure itself: throwaway Postgres, Apache Kafka / mock Kafka, read-back
//! helpers.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;

use crate::support::{self, ConsumedRecord, MockKafka, TestPostgres};

fn idempotent_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Sends 3 records with the same key (so the same partition) and two headers each.
async fn produce_three(brokers: &str, topic: &str) {
    let producer = idempotent_producer(brokers);
    for i in 0..3 {
        let payload = serde_json::json!({ "n": i, "text": format!("event {i}") }).to_string();
        let id = format!("id-{i}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "event-type",
                value: Some("thing.happened"),
            });
        producer
            .send(
                FutureRecord::to(topic)
                    .key("aggregate-1")
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("delivery to {topic} failed: {e}"));
    }
}

fn check_three(records: &[ConsumedRecord], topic: &str) {
    assert_eq!(records.len(), 3, "records: {records:#?}");
    let partition = records[0].partition;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.topic, topic);
        assert_eq!(r.partition, partition, "same key, same partition");
        assert_eq!(r.key.as_deref(), Some("aggregate-1"));
        assert_eq!(r.json()["n"], i);
        assert_eq!(r.json()["text"], format!("event {i}"));
        assert_eq!(
            r.headers,
            vec![
                ("event-id".to_string(), format!("id-{i}")),
                ("event-type".to_string(), "thing.happened".to_string()),
            ]
        );
        assert_eq!(r.header("event-id"), Some(format!("id-{i}").as_str()));
        assert!(r.timestamp_ms.is_some());
        if i > 0 {
            assert!(r.offset > records[i - 1].offset, "offsets increase");
        }
    }
}

#[tokio::test]
async fn shared_postgres_answers() {
    let client = support::connect_pg().await;
    let row = client.query_one("select 1::int4 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    let max: String = client
        .query_one("show max_connections", &[])
        .await
        .unwrap()
        .get(0);
    if std::env::var("DATABASE_URL").is_err() {
        assert_eq!(max, "200");
    }
}

#[tokio::test]
async fn fresh_database_is_empty_and_usable() {
    let config = support::fresh_database().await;
    let client = outbox::testing::connect(&config).await.unwrap();
    let table = support::unique_name("t");
    client
        .batch_execute(&format!(
            "create table {table} (id int primary key); insert into {table} values (1)"
        ))
        .await
        .unwrap();
    let n = support::count_rows(&client, &table, "").await;
    assert_eq!(n, 1);
}

#[tokio::test]
async fn own_postgres_survives_restart_and_crash() {
    let pg = TestPostgres::builder()
        .max_connections(20)
        .setting("application_name", "it's quoted")
        .start()
        .await
        .unwrap();
    let port = pg.port();
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    let client = pg.connect().await.unwrap();
    client
        .batch_execute("create table t (id int); insert into t values (1), (2)")
        .await
        .unwrap();
    let fsync: String = client.query_one("show fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "off");
    let app: String = client
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "it's quoted");

    pg.restart().await.unwrap();
    assert_eq!(pg.port(), port);
    assert!(
        client.query_one("select 1", &[]).await.is_err(),
        "old session ended"
    );
    let client = pg.connect().await.unwrap();
    let n = rows_in_t(&client).await;
    assert_eq!(n, 2);
    client
        .batch_execute("insert into t values (3)")
        .await
        .unwrap();

    pg.crash().await.unwrap();
    assert!(!pg.is_running());
    assert!(pg.connect().await.is_err(), "server is down");
    pg.start_again().await.unwrap();
    let client = pg.connect().await.unwrap();
    let n = rows_in_t(&client).await;
    assert_eq!(n, 3, "committed rows survive a crash");

    let url = pg.create_database("other").await.unwrap();
    assert!(url.ends_with("/other"));
    outbox::testing::connect(&pg.config_for("other"))
        .await
        .unwrap();

    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!dir.exists(), "directory removed on drop");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server stopped on drop"
    );
}

#[tokio::test]
async fn kafka_roundtrip_with_headers() {
    let brokers = support::kafka_brokers();
    let topic = support::fresh_topic("infra_roundtrip", 3).await;
    produce_three(&brokers, &topic).await;

    let records = support::consume_all(&brokers, &topic, 3, Duration::from_secs(30)).await;
    check_three(&records, &topic);
    support::assert_nothing_more(&brokers, &topic, 3, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn topic_reader_reads_in_steps() {
    let brokers = support::kafka_brokers();
    let topic = support::fresh_topic("infra_reader", 1).await;
    let mut reader = support::TopicReader::connect(&brokers, &topic, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(reader.partitions(), 1);
    reader.assert_idle(Duration::from_millis(300)).await;
    produce_three(&brokers, &topic).await;
    let first = reader.read(2, Duration::from_secs(30)).await;
    let rest = reader.read(5, Duration::from_millis(500)).await;
    assert_eq!(first.len() + rest.len(), 3);
    assert_eq!(reader.received(), 3);
    reader.assert_idle(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn mock_kafka_roundtrip_and_error_injection() {
    let kafka = MockKafka::start(3).unwrap();
    let brokers = kafka.bootstrap_servers();
    let topic = support::unique_name("infra_mock");
    kafka.create_topic(&topic, 2).unwrap();

    // The first two Produce requests fail with a retriable error: the idempotent producer
    // retries and every record is still written exactly once, in order.
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    produce_three(&brokers, &topic).await;

    let records = support::consume_all(&brokers, &topic, 3, Duration::from_secs(30)).await;
    check_three(&records, &topic);
    support::assert_nothing_more(&brokers, &topic, 3, Duration::from_millis(300)).await;

    // with_cluster gives the whole rdkafka MockCluster API, from any thread.
    let servers = kafka.with_cluster(|c| c.bootstrap_servers());
    assert_eq!(servers, brokers);
}

#[test]
fn unique_names_are_valid_identifiers() {
    let a = support::unique_name("Relay-Test: ordering per aggregate, long prefix");
    let b = support::unique_name("Relay-Test: ordering per aggregate, long prefix");
    assert_ne!(a, b);
    for name in [
        &a,
        &b,
        &support::unique_name("9lives"),
        &support::unique_name(""),
    ] {
        assert!(name.len() <= 40, "{name}");
        assert!(name.starts_with(|c: char| c.is_ascii_lowercase()), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
    }
}

/// `select count(*) from t`.
async fn rows_in_t(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0)
}
