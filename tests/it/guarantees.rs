//! Delivery guarantees under concurrency and faults (scenarios S3–S6, S10 (b), S11 of
//! `shared/SCENARIOS.md`), against real Postgres and Apache Kafka (the 3-node cluster of
//! `scripts/test`); librdkafka's mock cluster (`MockKafka`) only where a Kafka fault must be
//! injected.
//!
//! Every test uses its own table, channel and topic (`unique_name`), so they run in parallel.
//! Records are read back with a real consumer (`TopicReader`); absence is asserted with short
//! read windows (`assert_idle`), never with sleeps alone.
//!
//! Broker facts these tests rely on (Apache Kafka 4.1 with librdkafka 2.12):
//! * `auto.create.topics.enable=false` on the test cluster: a topic that was never created stays
//!   missing (S6).
//! * The broker enforces the topic config `max.message.bytes` on whole record batches (S5's
//!   broker-limit variant sets 100,000 and sends a 200 kB event, which the producer's own
//!   1,000,000-byte `message.max.bytes` lets through); the mock cluster enforces no topic config.
//! * The mock cluster creates topics only from Metadata requests that allow auto-creation, never
//!   from Produce; an injected Produce error applies to every partition of the next request.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use outbox::testing::faults::{Fault, FaultProxy};
use outbox::{
    DeadLetterPolicy, DeliveryEvent, DeliveryFailure, DeliveryStream, Error, Event, EventFilter,
    EventStatus, NewEvent, OnDelivery, Outbox, OutboxBuilder, RequeueFilter,
};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::support::{self, ConsumedRecord, MockKafka, TopicReader};

// ----------------------------------------------------------------------------------------------
// Local helpers
// ----------------------------------------------------------------------------------------------

type Env = support::TestEnv;

/// Migrates a fresh table (own channel) on the shared test database and creates a topic with
/// `partitions`, on the test Kafka or, when given, on `mock`.
async fn setup(prefix: &str, partitions: i32, mock: Option<&MockKafka>) -> Env {
    setup_in(prefix, partitions, mock, support::postgres().await).await
}

async fn setup_in(
    prefix: &str,
    partitions: i32,
    mock: Option<&MockKafka>,
    pg: tokio_postgres::Config,
) -> Env {
    support::init_tracing();
    let brokers = match mock {
        Some(kafka) => kafka.bootstrap_servers(),
        None => support::kafka_brokers(),
    };
    let env = Env::named(prefix, brokers, pg);
    let (table, topic) = (&env.table, &env.topic);
    let client = outbox::testing::connect(&env.pg).await.expect("connect pg");
    outbox::migrate_table(&client, table, &env.channel)
        .await
        .unwrap_or_else(|e| panic!("migrating {table}: {e}"));
    match mock {
        Some(kafka) => {
            kafka
                .create_topic(topic, partitions)
                .unwrap_or_else(|e| panic!("creating {topic} on the mock cluster: {e}"));
            support::wait_for_topic(&env.brokers, topic, Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| panic!("topic {topic} did not appear: {e}"));
        }
        None => support::create_topic(topic, partitions).await,
    }
    env
}

/// A builder for a test that produces to a topic that was never created. The test cluster has
/// `auto.create.topics.enable=false`; the mock cluster (the fallback without `KAFKA_BROKERS`)
/// creates topics unless the producer disallows it.
fn without_auto_create(b: OutboxBuilder) -> OutboxBuilder {
    if support::kafka_is_mock() {
        b.kafka_property("allow.auto.create.topics", "false")
    } else {
        b
    }
}

/// Short timeouts for fault tests: a failed message is reported within 2 s.
fn fast(b: OutboxBuilder) -> OutboxBuilder {
    b.publish_timeout(Duration::from_secs(2))
        .lease(Duration::from_secs(8))
        // The default shutdown_timeout (10 s) may not exceed the lease.
        .shutdown_timeout(Duration::from_secs(5))
        .batch_timeout(Duration::from_millis(200))
        .retry_backoff(Duration::from_millis(100), Duration::from_secs(1))
}

async fn pg(env: &Env) -> tokio_postgres::Client {
    outbox::testing::connect(&env.pg).await.expect("connect pg")
}

/// An outbox connected on `b` and started, with its ack stream (subscribed before the start), a
/// reader on `env`'s topic and a Postgres client.
async fn run(
    env: &Env,
    b: OutboxBuilder,
) -> (
    Outbox,
    DeliveryStream,
    support::RelayTask,
    TopicReader,
    tokio_postgres::Client,
) {
    let outbox = b.connect().await.expect("connect");
    let acks = outbox.subscribe();
    let handle = outbox.start().expect("start");
    (outbox, acks, handle, reader(env).await, pg(env).await)
}

async fn reader_of(brokers: &str, topic: &str) -> TopicReader {
    TopicReader::connect(brokers, topic, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("reading topic {topic}: {e}"))
}

async fn reader(env: &Env) -> TopicReader {
    reader_of(&env.brokers, &env.topic).await
}

/// Reads exactly `n` records within `timeout` or panics.
async fn read_n(reader: &mut TopicReader, n: usize, timeout: Duration) -> Vec<ConsumedRecord> {
    let got = reader.read(n, timeout).await;
    assert_eq!(
        got.len(),
        n,
        "expected {n} records within {timeout:?}, got {}: {:#?}",
        got.len(),
        &got[..got.len().min(10)]
    );
    got
}

/// An event of `aggregate` whose payload carries the aggregate's counter `n`.
fn ev(topic: &str, aggregate: &str, n: i64) -> NewEvent {
    NewEvent::new(
        topic,
        aggregate,
        "counter.incremented",
        json!({ "aggregate": aggregate, "n": n }),
    )
}

/// `aggregate`'s events with counters `ns`, as [`ev`] makes them.
fn counters(topic: &str, aggregate: &str, ns: std::ops::RangeInclusive<i64>) -> Vec<NewEvent> {
    ns.map(|n| ev(topic, aggregate, n)).collect()
}

/// Makes the mock cluster answer the next Produce request with `err`.
fn fail_next_produce(kafka: &MockKafka, err: RDKafkaRespErr) {
    kafka.request_errors(RDKafkaApiKey::Produce, &[err]);
}

/// Inserts `events` in one transaction (one `add_new_events` call) and commits.
async fn insert(
    outbox: &Outbox,
    client: &mut tokio_postgres::Client,
    events: &[NewEvent],
) -> Vec<Uuid> {
    let tx = client.transaction().await.expect("begin");
    let ids = outbox
        .add_new_events(&tx, events)
        .await
        .expect("add_new_events");
    tx.commit().await.expect("commit");
    ids
}

fn counter(r: &ConsumedRecord) -> i64 {
    r.json()["n"]
        .as_i64()
        .unwrap_or_else(|| panic!("record without counter: {r:#?}"))
}

fn event_id_of(r: &ConsumedRecord) -> Uuid {
    let h = r
        .header("event_id")
        .unwrap_or_else(|| panic!("record without event_id header: {r:#?}"));
    Uuid::parse_str(h).unwrap_or_else(|e| panic!("event_id header {h:?} is not a uuid: {e}"))
}

/// Counters per key, in consumed order (records of one key share a partition, so arrival order
/// is offset order).
fn counters_by_key(records: &[ConsumedRecord]) -> BTreeMap<String, Vec<i64>> {
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in records {
        by_key
            .entry(r.key_str().to_string())
            .or_default()
            .push(counter(r));
    }
    by_key
}

/// Asserts that one aggregate's consumed counters are `expected`, in order, where a duplicate
/// may appear only as a contiguous replay of already published events (1 2 1 2 3 or 1 2 2 3,
/// never 2 3 1 or 1 2 1 3).
fn assert_order_with_contiguous_replays(aggregate: &str, seen: &[i64], expected: &[i64]) {
    let mut first_seen = Vec::new();
    let mut known = HashSet::new();
    for (i, &c) in seen.iter().enumerate() {
        if known.insert(c) {
            first_seen.push(c);
            continue;
        }
        // A replay must go on with the event that followed `c` the first time.
        if let Some(&next) = seen.get(i + 1) {
            let pos = expected.iter().position(|&e| e == c);
            let successor = pos.and_then(|p| expected.get(p + 1)).copied();
            assert_eq!(
                Some(next),
                successor,
                "aggregate {aggregate}: duplicate {c} at position {i} is not a contiguous replay: {seen:?}"
            );
        }
    }
    assert_eq!(
        first_seen, expected,
        "aggregate {aggregate}: consumed out of order or incomplete: {seen:?}"
    );
}

async fn find_aggregate(outbox: &Outbox, aggregate: &str) -> Vec<Event> {
    outbox
        .find(&EventFilter::new().aggregate_id(aggregate).limit(10_000))
        .await
        .expect("find by aggregate")
}

/// The next `Failed` item of a delivery stream (acks are skipped).
async fn next_failure(stream: &mut DeliveryStream, timeout: Duration) -> DeliveryFailure {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("no delivery failure reported within {timeout:?}"),
            Ok(None) => panic!("the delivery stream ended while a failure was expected"),
            Ok(Some(DeliveryEvent::Failed(f))) => return f,
            Ok(Some(_)) => {}
        }
    }
}

use crate::support::stop_and_join;

/// A notification arrives within 5 s (a waiting relay gets one), then none for 1.5 s: `what`
/// says what was notified once.
async fn assert_one_notification(rx: &mut mpsc::UnboundedReceiver<String>, what: &str) {
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert!(
        matches!(first, Ok(Some(_))),
        "a waiting relay gets a notification"
    );
    let more = notifications_within(rx, Duration::from_millis(1500)).await;
    assert_eq!(more, 0, "{what}");
}

/// Notifications that arrive within `window`.
async fn notifications_within(rx: &mut mpsc::UnboundedReceiver<String>, window: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + window;
    let mut n = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        n += 1;
    }
    n
}

// ----------------------------------------------------------------------------------------------
// S3 — several relays, per-aggregate order
// ----------------------------------------------------------------------------------------------

/// Three relays (three `Outbox` instances on one table, batches of 50, two batches in flight
/// each) and five concurrent writers, each owning ten aggregates and committing transactions of
/// four events (two consecutive events of each of two aggregates). 50 aggregates × 200 events:
/// every event is consumed exactly once, each aggregate's counters strictly increase, at least
/// two relays did part of the work, and every row ends done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_three_relays_deliver_every_event_once_in_order_per_aggregate() {
    const AGGREGATES: usize = 50;
    const PER_AGGREGATE: i64 = 200;
    const WRITERS: usize = 5;
    const TOTAL: usize = AGGREGATES * PER_AGGREGATE as usize;

    let env = setup("s3", 4, None).await;
    let mut relays = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..3 {
        let outbox = env
            .builder()
            .batch_size(50)
            .max_batches_in_flight(2)
            .poll_interval(Duration::from_millis(100))
            .connect()
            .await
            .expect("connect");
        handles.push(outbox.start().expect("start"));
        relays.push(outbox);
    }
    let mut reader = reader(&env).await;

    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let writer = relays[0].writer();
        let topic = env.topic.clone();
        let pg = env.pg.clone();
        writers.spawn(async move {
            let mut client = outbox::testing::connect(&pg).await.expect("connect writer");
            let owned: Vec<String> = (0..AGGREGATES)
                .filter(|a| a % WRITERS == w)
                .map(|a| format!("agg-{a:02}"))
                .collect();
            // Round-robin over the writer's aggregates, two consecutive events at a time.
            let mut plan = Vec::new();
            for n in (0..PER_AGGREGATE).step_by(2) {
                for a in &owned {
                    plan.push(ev(&topic, a, n));
                    plan.push(ev(&topic, a, n + 1));
                }
            }
            for (i, chunk) in plan.chunks(4).enumerate() {
                let tx = client.transaction().await.expect("begin");
                if i % 2 == 0 {
                    writer
                        .add_new_events(&tx, chunk)
                        .await
                        .expect("add_new_events");
                } else {
                    for e in chunk {
                        writer.add_new_event(&tx, e).await.expect("add_new_event");
                    }
                }
                tx.commit().await.expect("commit");
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer task");
    }

    let records = read_n(&mut reader, TOTAL, Duration::from_secs(240)).await;
    // No faults: nothing more may arrive (no duplicates).
    reader.assert_idle(Duration::from_secs(2)).await;

    let ids: HashSet<Uuid> = records.iter().map(event_id_of).collect();
    assert_eq!(
        ids.len(),
        TOTAL,
        "every event exactly once (distinct event_id headers)"
    );
    let by_key = counters_by_key(&records);
    assert_eq!(by_key.len(), AGGREGATES, "keys: {:?}", by_key.keys());
    let expected: Vec<i64> = (0..PER_AGGREGATE).collect();
    for (key, counters) in &by_key {
        assert_eq!(
            counters, &expected,
            "aggregate {key}: every counter exactly once, strictly increasing"
        );
        let r = records.iter().find(|r| r.key_str() == key).unwrap();
        assert_eq!(r.json()["aggregate"], json!(key), "key is the aggregate id");
    }
    for r in &records {
        assert_eq!(r.header("event_type"), Some("counter.incremented"));
    }

    let stats: Vec<_> = relays.iter().map(Outbox::stats).collect();
    let delivered: u64 = stats.iter().map(|s| s.delivered).sum();
    assert_eq!(
        delivered, TOTAL as u64,
        "the relays confirmed every event exactly once: {stats:#?}"
    );
    let busy = stats.iter().filter(|s| s.delivered > 0).count();
    assert!(
        busy >= 2,
        "at least two relays delivered events concurrently: {stats:#?}"
    );
    for s in &stats {
        assert_eq!(
            (s.retried, s.dead_lettered, s.confirm_failures),
            (0, 0, 0),
            "{s:?}"
        );
    }

    for (outbox, handle) in relays.iter().zip(handles) {
        stop_and_join(outbox, handle).await;
    }
    let client = pg(&env).await;
    let row = client
        .query_one(
            &format!(
                "select count(*) filter (where status = 'done'), count(*) from {}",
                env.table
            ),
            &[],
        )
        .await
        .unwrap();
    let (done, all): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((done, all), (TOTAL as i64, TOTAL as i64), "every row done");
}

// ----------------------------------------------------------------------------------------------
// S4 — a failed publish must not reorder; dead letters (mock cluster)
// ----------------------------------------------------------------------------------------------

/// On the mock cluster: X's first Produce fails once with NOT_LEADER_FOR_PARTITION (retried by
/// the idempotent producer): X is consumed 1, 2, 3. Then Y's event 1 fails permanently
/// (INVALID_RECORD, a per-record broker error; TOPIC_AUTHORIZATION_FAILED would not do: librdkafka
/// then marks the whole topic as failed and every later event of it fails at once): under the default `BlockAggregate` it becomes a dead letter
/// (`failed`, `last_error`, a dead-letter `Failed` item on the ack stream), Y's 2 and 3 stay
/// pending and unpublished behind it and are visible as such through `find` and `status()`,
/// while another aggregate flows. Requeueing Y after the fault is gone publishes Y 1, 2, 3 in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_failed_publish_keeps_order_and_dead_letter_blocks_its_aggregate() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let env = setup("s4", 2, Some(&kafka)).await;
    let (outbox, mut acks, handle, mut reader, mut client) = run(&env, fast(env.builder())).await;
    let t = env.topic.as_str();

    // 1. A retriable failure of X's first publish.
    fail_next_produce(
        &kafka,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
    );
    let x_ids = insert(&outbox, &mut client, &counters(t, "X", 1..=3)).await;
    let mut got = read_n(&mut reader, 3, Duration::from_secs(30)).await;
    got.extend(reader.read_for(Duration::from_millis(500)).await);
    let by_key = counters_by_key(&got);
    assert_eq!(by_key.keys().collect::<Vec<_>>(), vec!["X"], "{got:#?}");
    assert_order_with_contiguous_replays("X", &by_key["X"], &[1, 2, 3]);
    support::wait_status(&outbox, &x_ids, EventStatus::Done, Duration::from_secs(10)).await;

    // 2. A permanent failure of Y's event 1.
    fail_next_produce(&kafka, RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD);
    let y_ids = insert(&outbox, &mut client, &counters(t, "Y", 1..=3)).await;
    let failure = next_failure(&mut acks, Duration::from_secs(30)).await;
    assert_eq!(
        failure.event_id(),
        y_ids[0],
        "Y's event 1 failed: {failure:?}"
    );
    assert_eq!(failure.aggregate_id(), "Y");
    assert_eq!(failure.topic(), t);
    assert!(
        failure.is_dead_letter(),
        "a permanent error dead-letters at once: {failure:?}"
    );
    assert_eq!(failure.attempts(), 1, "{failure:?}");
    assert!(
        failure.error().to_lowercase().contains("record"),
        "the error names the cause: {failure:?}"
    );

    let y = find_aggregate(&outbox, "Y").await;
    assert_eq!(y.len(), 3, "{}", support::brief(&y));
    assert_eq!(y[0].id(), y_ids[0]);
    assert_eq!(y[0].status(), EventStatus::Failed, "{}", support::brief(&y));
    assert_eq!(y[0].attempts(), 1);
    assert_eq!(y[0].last_error(), Some(failure.error()));
    for e in &y[1..] {
        assert_eq!(
            e.status(),
            EventStatus::New,
            "blocked, still pending: {}",
            support::brief(&y)
        );
        assert_eq!(e.attempts(), 0, "never tried: {}", support::brief(&y));
        assert!(e.seq() > y[0].seq(), "behind the dead letter");
    }
    let status = outbox.status().await.expect("status");
    assert_eq!((status.dead_letters, status.pending), (1, 2), "{status:?}");
    let topic_status = status
        .topics
        .iter()
        .find(|s| s.topic == t)
        .expect("topic listed");
    assert_eq!(
        (topic_status.dead_letters, topic_status.pending),
        (1, 2),
        "{status:?}"
    );

    // Other aggregates keep flowing; Y's 2 and 3 do not go out.
    insert(&outbox, &mut client, &counters(t, "Z", 1..=3)).await;
    let z = read_n(&mut reader, 3, Duration::from_secs(10)).await;
    assert_eq!(counters_by_key(&z).get("Z"), Some(&vec![1, 2, 3]), "{z:#?}");
    reader.assert_idle(Duration::from_secs(2)).await;
    let y = find_aggregate(&outbox, "Y").await;
    assert_eq!(
        y.iter()
            .map(|e| (e.status(), e.attempts()))
            .collect::<Vec<_>>(),
        vec![
            (EventStatus::Failed, 1),
            (EventStatus::New, 0),
            (EventStatus::New, 0)
        ],
        "Y stays blocked behind its dead letter: {}",
        support::brief(&y)
    );

    // 3. Fault removed, requeue: Y 1, 2, 3 in order.
    kafka.clear_request_errors(RDKafkaApiKey::Produce);
    let n = outbox
        .requeue(&RequeueFilter::all().aggregate_id("Y"))
        .await
        .expect("requeue");
    assert_eq!(n, 1, "one dead letter requeued");
    let mut y_recs = read_n(&mut reader, 3, Duration::from_secs(15)).await;
    y_recs.extend(reader.read_for(Duration::from_millis(500)).await);
    let by_key = counters_by_key(&y_recs);
    assert_eq!(by_key.keys().collect::<Vec<_>>(), vec!["Y"], "{y_recs:#?}");
    assert_order_with_contiguous_replays("Y", &by_key["Y"], &[1, 2, 3]);
    assert_eq!(
        event_id_of(&y_recs[0]),
        y_ids[0],
        "the requeued event keeps its id"
    );
    support::wait_status(&outbox, &y_ids, EventStatus::Done, Duration::from_secs(10)).await;
    let stats = outbox.stats();
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    stop_and_join(&outbox, handle).await;
}

/// The same permanent failure under `DeadLetterPolicy::Continue`: Y's 2 and 3 go out while 1 is
/// a dead letter; requeued, 1 is published after them (as documented).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_dead_letter_policy_continue_publishes_later_events() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let env = setup("s4c", 2, Some(&kafka)).await;
    let (outbox, mut acks, handle, mut reader, mut client) = run(
        &env,
        fast(env.builder()).dead_letter_policy(DeadLetterPolicy::Continue),
    )
    .await;
    let t = env.topic.as_str();

    fail_next_produce(&kafka, RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD);
    let y_ids = insert(&outbox, &mut client, &counters(t, "Y", 1..=3)).await;
    let failure = next_failure(&mut acks, Duration::from_secs(30)).await;
    assert_eq!(failure.event_id(), y_ids[0], "{failure:?}");
    assert!(failure.is_dead_letter(), "{failure:?}");

    let mut got = read_n(&mut reader, 2, Duration::from_secs(15)).await;
    got.extend(reader.read_for(Duration::from_secs(1)).await);
    let by_key = counters_by_key(&got);
    assert_eq!(
        by_key.get("Y"),
        Some(&vec![2, 3]),
        "2 and 3 go on: {got:#?}"
    );
    support::wait_status(
        &outbox,
        &y_ids[1..],
        EventStatus::Done,
        Duration::from_secs(10),
    )
    .await;
    let y = find_aggregate(&outbox, "Y").await;
    assert_eq!(y[0].status(), EventStatus::Failed, "{}", support::brief(&y));
    assert!(y[0].last_error().is_some());

    kafka.clear_request_errors(RDKafkaApiKey::Produce);
    assert_eq!(
        outbox
            .requeue(&RequeueFilter::all().aggregate_id("Y"))
            .await
            .expect("requeue"),
        1
    );
    let again = read_n(&mut reader, 1, Duration::from_secs(15)).await;
    assert_eq!((again[0].key_str(), counter(&again[0])), ("Y", 1));
    assert_eq!(event_id_of(&again[0]), y_ids[0]);
    reader.assert_idle(Duration::from_millis(500)).await;
    support::wait_status(&outbox, &y_ids, EventStatus::Done, Duration::from_secs(10)).await;
    stop_and_join(&outbox, handle).await;
}

/// Aggregates whose first open event is not due hold back their later events — and more of
/// those than a batch at the lowest `seq`s must not hold back anything else (found by a breaker
/// helper: every scan took the `batch_size` first due rows, the gate kept none of them, the
/// reservation came back empty and no row after them was ever reserved — with 1,000 dead
/// letters and their 2,000 later events under the defaults, nothing was delivered again until
/// someone requeued them, `health()` green). Batch size 10; D's first event is a dead letter,
/// B's in a retry's backoff for an hour, G's reserved by a Go relay for an hour, each with ten
/// later events; then five events of other aggregates, committed in the same transaction after
/// them: the five are delivered, the thirty stay pending, in order behind their first events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_behind_blocked_aggregates_do_not_hold_back_the_others() {
    let env = setup("hol", 1, None).await;
    let (outbox, _acks, handle, mut reader, mut client) =
        run(&env, env.builder().batch_size(10)).await;
    let (t, table) = (env.topic.as_str(), env.table.as_str());
    let blocked = [
        (
            "D",
            "status = 'failed', attempts = 1, last_error = 'refused'",
        ),
        (
            "B",
            "attempts = 1, next_attempt_at = now() + interval '1 hour'",
        ),
        ("G", "reserved_to = localtimestamp + interval '1 hour'"),
    ];
    let tx = client.transaction().await.expect("begin");
    for (aggregate, block) in blocked {
        let ids = outbox
            .add_new_events(&tx, &counters(t, aggregate, 0..=10))
            .await
            .expect("add");
        tx.execute(
            &format!("update {table} set {block} where id = $1"),
            &[&ids[0]],
        )
        .await
        .expect("block the aggregate's first event");
    }
    let free: Vec<NewEvent> = (0..5).map(|i| ev(t, &format!("free-{i}"), i)).collect();
    let free_ids = outbox.add_new_events(&tx, &free).await.expect("add");
    tx.commit().await.expect("commit");

    let mut got = read_n(&mut reader, 5, Duration::from_secs(15)).await;
    got.extend(reader.read_for(Duration::from_millis(500)).await);
    let ids: HashSet<Uuid> = got.iter().map(event_id_of).collect();
    assert_eq!(
        ids,
        free_ids.iter().copied().collect::<HashSet<_>>(),
        "only the five free events: {got:#?}"
    );
    let pending = support::count_rows(&client, table, "where status = 'new'").await;
    assert_eq!(
        pending, 32,
        "B's and G's events and D's later ten stay pending"
    );
    stop_and_join(&outbox, handle).await;
}

/// 150,000 aggregates' events, each behind its aggregate's dead letter (a deleted topic
/// dead-letters the first event of every aggregate sending to it): a full scan skips them but
/// still reads them, one probe of the aggregate index each (a single aggregate's pile is
/// probed once: memoized), and a relay that scanned from the first pending row at every
/// wake-up paid that for every new event (found by a breaker helper: with 100,000, commit →
/// done p50 724 ms at 20 events/s). Once full scans are slow, wake-ups between them scan from
/// the floor (the lowest candidate of the last full scan). Counted in the server's log of every
/// statement with its parameters (whatever the machine's speed): while 60 single-event
/// transactions of other aggregates commit over 6 s, no more reservations start in the pile than
/// one per ten full scans' time (measured first; one or two here), plus one (without the floor,
/// every wake-up scans from the first pending row: checked, 24), and all 60 are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_scans_are_spaced_out_when_blocked_rows_make_them_slow() {
    let server = outbox::testing::TestPostgres::builder()
        .setting("log_min_duration_statement", "0")
        .start()
        .await
        .unwrap();
    let env = setup_in("floor", 1, None, server.config()).await;
    let mut client = pg(&env).await;
    let (t, table) = (env.topic.as_str(), env.table.as_str());
    let whole = slow_pile(&mut client, &env).await;
    // Delivery reports come within the batch: no held message, so no due wake-up (a due hold or
    // retry scans from the first pending row, floor or not).
    let (outbox, _acks, handle, _reader, _c) =
        run(&env, env.builder().batch_timeout(Duration::from_secs(10))).await;
    let first = insert(&outbox, &mut client, &[ev(t, "first", 1)]).await;
    support::wait_status(&outbox, &first, EventStatus::Done, Duration::from_secs(60)).await;
    let pile_end: i64 = client
        .query_one(
            &format!("select max(seq) from {table} where aggregate_id like 'D%'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let before = reservations_from(&server.log(), ..=pile_end);
    let mut ids = Vec::new();
    let started = Instant::now();
    for i in 0..60 {
        ids.extend(insert(&outbox, &mut client, &[ev(t, &format!("g{i}"), i)]).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = started.elapsed();
    let in_pile = reservations_from(&server.log(), ..=pile_end) - before;
    eprintln!("{in_pile} reservations started in the pile while 60 events came in {window:?}");
    support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(60)).await;
    let bound = 1 + (window.as_secs_f64() / (10.0 * whole.as_secs_f64())).ceil() as usize;
    assert!(
        in_pile <= bound,
        "{in_pile} reservations started in the pile while 60 events came in {window:?}, full \
         scans taking {whole:?}: at most {bound} (the floor spaces out full scans)"
    );
    let pending = support::count_rows(&client, table, "where status = 'new'").await;
    assert_eq!(
        pending, 150_000,
        "the D aggregates' events stay behind their dead letters"
    );
    stop_and_join(&outbox, handle).await;
}

/// 150,000 aggregates `D1`..`D150000`, each an event behind its dead letter (as after a
/// deleted topic), in `env`'s table; returns how long a full scan through them takes, at least
/// the 200 ms from which the relay scans from the floor between full scans.
async fn slow_pile(client: &mut tokio_postgres::Client, env: &Env) -> Duration {
    let (t, table) = (env.topic.as_str(), env.table.as_str());
    client
        .batch_execute(&format!(
            "insert into {table} (aggregate_id, event_topic, event_type, payload, status)
               select 'D' || g, '{t}', 'x', '{{}}', 'failed' from generate_series(1, 150000) g;
             insert into {table} (aggregate_id, event_topic, event_type, payload)
               select 'D' || g, '{t}', 'x', '{{}}' from generate_series(1, 150000) g"
        ))
        .await
        .unwrap();
    let whole = empty_full_scan_took(client, table).await;
    eprintln!("a full scan through the pile: {whole:?}");
    assert!(
        whole >= Duration::from_millis(200),
        "a full scan through the pile takes {whole:?} on this machine: below 200 ms the floor does \
         not engage (make the pile larger)"
    );
    whole
}

/// Between slow full scans a wake-up scans from the floor (the lowest candidate the last full
/// scan found), so a row that turns pending below it is not seen until the next full scan. A
/// writer's transaction that took its `seq` before the floor's row and commits after it —
/// here L, open while E (after it) is delivered — is such a row, and its NOTIFY wakes only a
/// scan from the floor: the relay must not then wait for the fallback poll (300 s here) but
/// scan from the first pending row within ten full scans' time. Found by CI (`s9a`: 112 of
/// 1,000 events of 8 concurrent writers left pending on a loaded machine); fails without
/// `ScanStart::full_scan_owed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_below_the_floor_is_delivered_while_the_relay_waits() {
    let env = setup("floorlate", 1, None).await;
    let mut client = pg(&env).await;
    let t = env.topic.as_str();
    let whole = slow_pile(&mut client, &env).await;
    let (outbox, _acks, handle, _reader, _c) = run(
        &env,
        env.builder()
            .batch_timeout(Duration::from_secs(10))
            .poll_interval(Duration::from_secs(300)),
    )
    .await;
    // A full scan through the pile finds `first`: the floor is at it.
    let first = insert(&outbox, &mut client, &[ev(t, "first", 1)]).await;
    support::wait_status(&outbox, &first, EventStatus::Done, Duration::from_secs(60)).await;
    let mut late_client = pg(&env).await;
    let late_tx = late_client.transaction().await.expect("begin");
    let late = outbox
        .add_new_events(&late_tx, &[ev(t, "L", 1)])
        .await
        .expect("add the late event");
    // A scan from the floor finds E, after L: the floor rises above L.
    let after = insert(&outbox, &mut client, &[ev(t, "E", 1)]).await;
    support::wait_status(&outbox, &after, EventStatus::Done, Duration::from_secs(60)).await;
    late_tx.commit().await.expect("commit the late event");
    let committed = Instant::now();
    // Ten of the relay's full scans, which on a loaded machine may take several times the
    // test's: far below the poll interval.
    let within = whole * 40 + Duration::from_secs(20);
    support::wait_status(&outbox, &late, EventStatus::Done, within).await;
    eprintln!(
        "the late event was done {:?} after its commit (a full scan: {whole:?})",
        committed.elapsed()
    );
    stop_and_join(&outbox, handle).await;
}

/// A hot aggregate's events behind its dead letter, more than a scan can read within
/// `postgres_timeout`: a full scan read them all, failed at its deadline, and every scan after
/// it started at the same row — nothing after the pile was delivered again until it was requeued
/// (failed reservations the only sign). After such a scan failed, scans that skip blocked
/// aggregates read a window of 10,000 pending rows at a time, the next continuing after it
/// (without: 0 of 10 events in 60 s, checked; with windows of 10,000 seqs, one reservation per
/// row of this pile, spread over the seqs). Here the deadline is 3/4 of what the relay's full
/// scan (batch size 2,000, nothing to find) takes to read the whole pile of 400,000 on this
/// machine (measured first), a window a fortieth of the pile:
/// five events committed after the pile, and five committed while the relay runs, arrive in
/// Kafka; D's events stay pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pile_of_blocked_events_longer_than_a_deadline_does_not_stop_delivery() {
    let env = setup("pile", 1, None).await;
    let mut client = pg(&env).await;
    let (t, table) = (env.topic.as_str(), env.table.as_str());
    pile_behind_a_dead_letter(&client, table, t, 400_000).await;
    // Spread over the seqs, as an aggregate's events among many others' are (every 20,000th):
    // a window of seqs rather than rows took a reservation per row (found by a breaker helper).
    client
        .batch_execute(&format!(
            "update {table} set seq = seq * 20000 where aggregate_id = 'D';
             select setval(pg_get_serial_sequence('{table}', 'seq'), (select max(seq) from {table}))"
        ))
        .await
        .unwrap();
    let whole = empty_full_scan_took(&mut client, table).await;
    let deadline = (whole * 3 / 4).max(Duration::from_millis(100));
    eprintln!("reading the pile: {whole:?}; postgres_timeout {deadline:?}");
    let outbox = env
        .builder()
        .postgres_timeout(deadline)
        .connect()
        .await
        .expect("connect");
    let after = (0..5)
        .map(|i| ev(t, &format!("after-{i}"), i))
        .collect::<Vec<_>>();
    let mut expected: HashSet<Uuid> = insert(&outbox, &mut client, &after)
        .await
        .into_iter()
        .collect();
    let handle = outbox.start().expect("start");
    let mut reader = reader(&env).await;
    let more = (0..5)
        .map(|i| ev(t, &format!("more-{i}"), i))
        .collect::<Vec<_>>();
    expected.extend(insert(&outbox, &mut client, &more).await);
    let got = read_n(&mut reader, 10, Duration::from_secs(60)).await;
    let ids: HashSet<Uuid> = got.iter().map(event_id_of).collect();
    assert_eq!(ids, expected, "the ten events after the pile: {got:#?}");
    let expected: Vec<Uuid> = expected.into_iter().collect();
    support::wait_status(
        &outbox,
        &expected,
        EventStatus::Done,
        Duration::from_secs(60),
    )
    .await;
    let pending = support::count_rows(&client, table, "where status = 'new'").await;
    assert_eq!(pending, 400_000, "D's events stay behind its dead letter");
    stop_and_join(&outbox, handle).await;
}

/// `seq` is a `bigserial` the caller may set: rows at the lowest and highest `int8`, and a dead
/// letter with a later event just below the highest, are scanned like any other (the window's
/// end and where the next scan starts are computed without overflow): with one row per batch,
/// the three free events arrive and D's later event stays pending; the windowed scan from
/// either end answers without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_at_the_extreme_seqs_are_scanned_like_any_other() {
    let env = setup("extreme", 1, None).await;
    let mut client = pg(&env).await;
    let (t, table) = (env.topic.as_str(), env.table.as_str());
    let outbox = env
        .builder()
        .batch_size(1)
        .connect()
        .await
        .expect("connect");
    let ids = insert(
        &outbox,
        &mut client,
        &[
            ev(t, "low", 1),
            ev(t, "mid", 2),
            ev(t, "high", 3),
            ev(t, "D", 1),
            ev(t, "D", 2),
        ],
    )
    .await;
    let max = i64::MAX;
    for (id, seq, extra) in [
        (ids[0], i64::MIN, ""),
        (ids[2], max, ""),
        (ids[3], max - 2, ", status = 'failed', attempts = 1"),
        (ids[4], max - 1, ""),
    ] {
        client
            .execute(
                &format!("update {table} set seq = $2{extra} where id = $1"),
                &[&id, &seq],
            )
            .await
            .unwrap();
    }
    let handle = outbox.start().expect("start");
    let mut reader = reader(&env).await;
    let got = read_n(&mut reader, 3, Duration::from_secs(30)).await;
    let got: HashSet<Uuid> = got.iter().map(event_id_of).collect();
    assert_eq!(got, ids[..3].iter().copied().collect(), "low, mid, high");
    support::wait_status(
        &outbox,
        &ids[..3],
        EventStatus::Done,
        Duration::from_secs(30),
    )
    .await;
    let pending = support::count_rows(&client, table, "where status = 'new'").await;
    assert_eq!(pending, 1, "D's later event stays behind its dead letter");
    stop_and_join(&outbox, handle).await;
    // The windowed scan, which the relay runs after a failed scan, from either end: D's event
    // (at MAX - 1) is the only pending row, blocked; the window ends at the highest int8 and
    // nothing follows it.
    let sql = outbox::testing::relay_sql(table, false);
    for start in [i64::MIN, max - 2, max] {
        let tx = client.transaction().await.unwrap();
        let rows =
            outbox::testing::reserve_every_aggregate(&tx, &sql.reserve_windowed, 2_000, start)
                .await
                .unwrap_or_else(|e| panic!("windowed scan from {start}: {e:?}"));
        assert!(
            outbox::testing::reserved_rows(&rows).is_empty(),
            "from {start}"
        );
        assert_eq!(
            outbox::testing::next_scan_start(&rows),
            None,
            "from {start}"
        );
        tx.rollback().await.unwrap();
    }
}

/// Aggregate D's dead letter and `n` later events of D on `topic` (then `vacuum analyze`).
async fn pile_behind_a_dead_letter(
    client: &tokio_postgres::Client,
    table: &str,
    topic: &str,
    n: i64,
) {
    client
        .batch_execute(&format!(
            "insert into {table} (aggregate_id, event_topic, event_type, payload, status)
               values ('D', '{topic}', 'x', '{{}}', 'failed');
             insert into {table} (aggregate_id, event_topic, event_type, payload)
               select 'D', '{topic}', 'x', jsonb_build_object('n', g) from generate_series(1, {n}) g"
        ))
        .await
        .unwrap();
    client
        .batch_execute(&format!("vacuum analyze {table}"))
        .await
        .unwrap();
}

/// The fence session is shared by the batches in flight, their statements pipelined on it. A
/// fence that missed its deadline but ended on the server just after it: a cancel request sent
/// for it then arrived while the next batch's fence ran, and failed that one (found by a breaker
/// helper). Here, through a proxy adding 100 ms each way with `postgres_timeout` 2 s, A's fence
/// takes 1.85 s on the server (its round trip 2.05 s) and B's, sent while it runs, 0.5 s after
/// it (well within B's deadline). The relay cancels a shared session's statement only once no
/// round trip is in flight on it: no statement is cancelled on the server (checked: with a
/// cancel for every missed deadline, B's fence was, `canceling statement due to user
/// request`), A's fence is removed at once although its round trip failed, and both events are
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_fence_deadline_cancels_no_other_batch_s_fence() {
    let server = outbox::testing::TestPostgres::builder()
        .start()
        .await
        .unwrap();
    let env = setup_in("fencecancel", 1, None, server.config()).await;
    let mut client = pg(&env).await;
    let (t, table) = (env.topic.as_str(), env.table.as_str());
    client
        .batch_execute(&format!(
            "create sequence {table}_fences_seen;
             create function {table}_slow_fence() returns trigger language plpgsql as $$
             begin
               if nextval('{table}_fences_seen') = 1 then perform pg_sleep(1.85);
               else perform pg_sleep(0.5); end if;
               return new;
             end $$;
             create trigger {table}_slow_fence before insert on {table}_fence for each row
               execute function {table}_slow_fence();"
        ))
        .await
        .unwrap();
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port()).into())
        .await
        .unwrap();
    let mut through = env.pg.clone();
    through.connect_timeout(Duration::from_secs(10));
    let outbox = env
        .builder()
        .postgres(proxy.postgres_config(&through))
        .postgres_timeout(Duration::from_secs(2))
        .batch_size(1)
        .connect()
        .await
        .expect("connect");
    proxy.set_fault(Fault::Latency(Duration::from_millis(100)));
    let handle = outbox.start().expect("start");
    let a = insert(&outbox, &mut client, &[ev(t, "A", 1)]).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let b = insert(&outbox, &mut client, &[ev(t, "B", 1)]).await;
    let ids: Vec<Uuid> = a.into_iter().chain(b).collect();
    support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(60)).await;
    let log = server.log();
    let cancelled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("canceling statement due to user request"))
        .collect();
    assert!(cancelled.is_empty(), "statements cancelled: {cancelled:#?}");
    let fences: i64 = client
        .query_one(&format!("select count(*) from {table}_fence"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(fences, 0, "A's fence, committed past its deadline, is gone");
    proxy.set_fault(Fault::None);
    stop_and_join(&outbox, handle).await;
}

/// How long the relay's full scan (batch size 2,000, from the first pending row) takes on
/// `table`, vacuumed and analyzed first, where every pending row is behind a blocked aggregate
/// (it reserves nothing).
async fn empty_full_scan_took(client: &mut tokio_postgres::Client, table: &str) -> Duration {
    client
        .batch_execute(&format!("vacuum analyze {table}"))
        .await
        .unwrap();
    let sql = outbox::testing::relay_sql(table, false);
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&sql.session_setup).await.unwrap();
    let started = Instant::now();
    let rows = outbox::testing::reserve_every_aggregate(&tx, &sql.reserve_full, 2_000, i64::MIN)
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        outbox::testing::reserved_rows(&rows).is_empty(),
        "every pending row is behind a dead letter"
    );
    tx.rollback().await.unwrap();
    took
}

/// The reservations in a server log of every statement's parameters
/// (`log_min_duration_statement = 0`) whose scan started (`$3`) in `range`: the reservation is
/// the relay's only statement whose `$2` is the byte budget (16 MiB by default).
fn reservations_from(log: &str, range: impl std::ops::RangeBounds<i64>) -> usize {
    log.lines()
        .filter_map(|l| l.split_once("', $2 = '16777216', $3 = '"))
        .filter_map(|(_, start)| start.trim_end_matches('\'').parse::<i64>().ok())
        .filter(|start| range.contains(start))
        .count()
}

// ----------------------------------------------------------------------------------------------
// Retries and backoff (mock cluster)
// ----------------------------------------------------------------------------------------------

fn retriable_errors(n: usize) -> Vec<RDKafkaRespErr> {
    vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; n]
}

/// Every Produce fails with NOT_ENOUGH_REPLICAS (the cluster's fault) until X's event 1 times out
/// in the producer: the relay records the failure without counting an attempt (attempts 0,
/// `last_error`, `next_attempt_at` after the minimum backoff, still pending, never a dead letter
/// even with `max_attempts(2)`), X's 2 and 3 wait behind it, and after the fault is gone X is
/// consumed 1, 2, 3, event 1 not before its `next_attempt_at`. An error of the event that is not
/// permanent (the broker's UNKNOWN_SERVER_ERROR) counts: with `max_attempts(2)` an event that
/// keeps failing becomes a dead letter on its second failure, and its aggregate's next event
/// stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_record_attempts_backoff_and_dead_letter_after_max_attempts() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let env = setup("retry", 1, Some(&kafka)).await;
    let (outbox, mut acks, handle, mut reader, mut client) = run(
        &env,
        env.builder()
            .publish_timeout(Duration::from_secs(2))
            .lease(Duration::from_secs(8))
            .shutdown_timeout(Duration::from_secs(5))
            .batch_timeout(Duration::from_secs(2))
            .retry_backoff(Duration::from_secs(2), Duration::from_secs(4))
            .max_attempts(2),
    )
    .await;
    let t = env.topic.as_str();

    // 1. A transient failure.
    kafka.request_errors(RDKafkaApiKey::Produce, &retriable_errors(1000));
    let x_ids = insert(&outbox, &mut client, &counters(t, "X", 1..=3)).await;
    let failure = next_failure(&mut acks, Duration::from_secs(20)).await;
    let failed_at = Utc::now();
    assert_eq!(failure.event_id(), x_ids[0], "{failure:?}");
    assert!(
        !failure.is_dead_letter(),
        "a retriable failure is retried: {failure:?}"
    );
    assert_eq!(
        failure.attempts(),
        0,
        "the cluster's fault counts no attempt"
    );
    let x = find_aggregate(&outbox, "X").await;
    assert_eq!(x[0].status(), EventStatus::New, "{}", support::brief(&x));
    assert_eq!(x[0].attempts(), 0, "{}", support::brief(&x));
    assert_eq!(
        x[0].last_error(),
        Some(failure.error()),
        "{}",
        support::brief(&x)
    );
    let next_attempt = x[0]
        .next_attempt_at()
        .expect("next_attempt_at set after a failure");
    assert!(
        next_attempt > failed_at + chrono::Duration::milliseconds(1500),
        "next attempt after the 2 s minimum backoff: next {next_attempt}, failed at {failed_at}"
    );
    for e in &x[1..] {
        assert_eq!(
            (e.status(), e.attempts()),
            (EventStatus::New, 0),
            "{}",
            support::brief(&x)
        );
    }
    reader.assert_idle(Duration::from_millis(500)).await;

    kafka.clear_request_errors(RDKafkaApiKey::Produce);
    let mut got = read_n(&mut reader, 3, Duration::from_secs(20)).await;
    got.extend(reader.read_for(Duration::from_millis(500)).await);
    let by_key = counters_by_key(&got);
    assert_eq!(by_key.keys().collect::<Vec<_>>(), vec!["X"], "{got:#?}");
    assert_order_with_contiguous_replays("X", &by_key["X"], &[1, 2, 3]);
    let sent_ms = got[0].timestamp_ms.expect("record timestamp");
    assert!(
        sent_ms + 100 >= next_attempt.timestamp_millis(),
        "event 1 was sent again only after its backoff: sent at {sent_ms} ms, next attempt {next_attempt}"
    );
    let x = support::wait_status(&outbox, &x_ids, EventStatus::Done, Duration::from_secs(10)).await;
    assert_eq!(
        x[0].attempts(),
        0,
        "the cluster's failures counted no attempt: {}",
        support::brief(&x)
    );
    assert_eq!(
        x[0].last_error(),
        None,
        "cleared on delivery: {}",
        support::brief(&x)
    );

    // 2. An error of the event, again and again: a dead letter after max_attempts (2).
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 1000],
    );
    let w_ids = insert(&outbox, &mut client, &[ev(t, "W", 1), ev(t, "W", 2)]).await;
    let first = next_failure(&mut acks, Duration::from_secs(20)).await;
    assert_eq!(first.event_id(), w_ids[0], "{first:?}");
    assert_eq!(
        (first.attempts(), first.is_dead_letter()),
        (1, false),
        "{first:?}"
    );
    let second = next_failure(&mut acks, Duration::from_secs(20)).await;
    assert_eq!(second.event_id(), w_ids[0], "{second:?}");
    assert_eq!(
        (second.attempts(), second.is_dead_letter()),
        (2, true),
        "{second:?}"
    );
    let w = find_aggregate(&outbox, "W").await;
    assert_eq!(w[0].status(), EventStatus::Failed, "{}", support::brief(&w));
    assert_eq!(w[0].attempts(), 2, "{}", support::brief(&w));
    assert!(w[0].last_error().is_some(), "{}", support::brief(&w));
    assert_eq!(
        w[0].next_attempt_at(),
        None,
        "a dead letter is not scheduled: {}",
        support::brief(&w)
    );
    assert_eq!(
        (w[1].status(), w[1].attempts()),
        (EventStatus::New, 0),
        "{}",
        support::brief(&w)
    );
    reader.assert_idle(Duration::from_secs(1)).await;
    let stats = outbox.stats();
    assert_eq!((stats.retried, stats.dead_lettered), (2, 1), "{stats:?}");
    kafka.clear_request_errors(RDKafkaApiKey::Produce);
    stop_and_join(&outbox, handle).await;
}

/// Kafka takes the messages but does not acknowledge them by their batch's end (every
/// response of the only broker delayed 10 s; on a real cluster: too few in-sync replicas for
/// `acks=all`, where librdkafka retries quietly until `message.timeout.ms`). The relay holds
/// the events, and health names the Kafka problem while it lasts, not only once librdkafka
/// reports a failure; the delivery that follows clears it. Before, health stayed green with
/// the reports overdue (seen in CI: 2 of 3 brokers down, health checked 8 s in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_delivery_reports_are_a_kafka_problem_in_health() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("overdue", |b| {
        b.publish_timeout(Duration::from_secs(5))
            .batch_timeout(Duration::from_secs(1))
            .lease(Duration::from_secs(20))
    })
    .await;
    let t = env.topic.as_str();
    assert_eq!(outbox.health().await.expect("health").kafka_problem, None);

    kafka
        .broker_round_trip_time(1, Duration::from_secs(10))
        .expect("delay the broker");
    let ids = insert(&outbox, &mut client, &[ev(t, "X", 1), ev(t, "Y", 1)]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let problem = loop {
        let health = outbox.health().await.expect("health");
        if let Some(p) = health.kafka_problem {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "health names no Kafka problem {} s after the reports were due: {health:?}",
            5
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        problem.starts_with("2 delivery report(s) overdue"),
        "{problem}"
    );
    let found = find_aggregate(&outbox, "X").await;
    assert_eq!(
        found[0].status(),
        EventStatus::New,
        "{}",
        support::brief(&found)
    );

    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(30)).await;
    let health = outbox.health().await.expect("health");
    assert_eq!(
        health.kafka_problem, None,
        "a delivery clears it: {health:?}"
    );
    stop_and_join(&outbox, handle).await;
}

/// What [`warm_relay_on_mock`] returns: the cluster, the environment, the relay, its task and a
/// Postgres client.
type WarmRelay = (
    MockKafka,
    Env,
    Outbox,
    tokio::task::JoinHandle<Result<(), Error>>,
    tokio_postgres::Client,
);

/// The broker's UNKNOWN error, counted as an attempt (see
/// `retries_record_attempts_backoff_and_dead_letter_after_max_attempts`), for every Produce until
/// cleared.
fn fail_every_produce(kafka: &MockKafka) {
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 1000],
    );
}

/// Waits until the event `id` has failed at least `attempts` times (recorded, still pending).
async fn wait_attempts(outbox: &Outbox, id: Uuid, attempts: i32) {
    support::eventually(
        Duration::from_secs(30),
        "the failure is recorded",
        || async {
            let e = support::find_ids(outbox, &[id]).await;
            match e.first() {
                Some(e) if e.attempts() >= attempts => Ok(()),
                _ => Err(support::brief(&e)),
            }
        },
    )
    .await;
}

/// Two events of one batch fail, X at its first attempt (retried after the 1 s minimum
/// backoff), Y at its fourth (after 8 s): the relay wakes for each. It kept only the earliest
/// due time of a batch, and of the relay (one slot, which the owed full scan of
/// `a_late_commit_below_the_floor_is_delivered_while_the_relay_waits` also fills), so Y waited
/// for the fallback poll (300 s here). Found by a review helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retry_of_a_batch_wakes_the_relay_when_due() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("dues", |b| {
        b.poll_interval(Duration::from_secs(300))
            .retry_backoff(Duration::from_secs(1), Duration::from_secs(60))
            .max_attempts(10)
    })
    .await;
    let t = env.topic.as_str();
    fail_every_produce(&kafka);
    let tx = client.transaction().await.expect("begin");
    let x = outbox
        .add_new_events(&tx, &[ev(t, "X", 1)])
        .await
        .expect("add X")[0];
    let y: Uuid = tx
        .query_one(
            &format!(
                "insert into {} (aggregate_id, event_topic, event_type, payload, attempts)
                 values ('Y', $1, 'counter.incremented', '{{}}', 3) returning id",
                env.table
            ),
            &[&t],
        )
        .await
        .expect("add Y, failed three times before")
        .get(0);
    tx.commit().await.expect("commit");
    wait_attempts(&outbox, x, 1).await;
    wait_attempts(&outbox, y, 4).await;
    kafka.clear_request_errors(RDKafkaApiKey::Produce);
    let failed = Instant::now();
    support::wait_status(&outbox, &[x, y], EventStatus::Done, Duration::from_secs(30)).await;
    eprintln!("X and Y done {:?} after their failure", failed.elapsed());
    stop_and_join(&outbox, handle).await;
}

/// A held message (its report later than the batch's cutoff) whose late report is a failure is
/// retried after its backoff (10 s), after the hold's end (6 s): the relay's only wake-up for
/// it was the hold's end, whose scan found it not yet due, so it waited for the fallback poll
/// (300 s here). Found by a review helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_failure_wakes_the_relay_when_its_retry_is_due() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("latefail", |b| {
        b.poll_interval(Duration::from_secs(300))
            .batch_timeout(Duration::from_millis(200))
            .publish_timeout(Duration::from_secs(5))
            .retry_backoff(Duration::from_secs(10), Duration::from_secs(60))
            .max_attempts(10)
    })
    .await;
    let t = env.topic.as_str();
    kafka
        .broker_round_trip_time(1, Duration::from_secs(1))
        .expect("delay the broker");
    fail_every_produce(&kafka);
    let id = insert(&outbox, &mut client, &[ev(t, "X", 1)]).await[0];
    wait_attempts(&outbox, id, 1).await;
    kafka.clear_request_errors(RDKafkaApiKey::Produce);
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    let failed = Instant::now();
    // Its retry is due 10–20 s after the failure (jittered), the wake-up up to an eighth later.
    support::wait_status(&outbox, &[id], EventStatus::Done, Duration::from_secs(40)).await;
    eprintln!("X done {:?} after its late failure", failed.elapsed());
    stop_and_join(&outbox, handle).await;
}

/// Two relays on one table, both with a 300 s fallback poll: relay A has X and Y in flight (the
/// broker answers after 3 s) when it is stopped within 1 s; their messages are purged and their
/// rows held by A's last writes. Relay B, idle since its start (it found them locked), delivers
/// them once they are due — before, nothing woke it and they waited for its poll (found by a
/// breaker helper: still pending after 30 s). A hands its last rows over by a NOTIFY with their
/// due times (without the times: still pending after 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_relay_wakes_the_other_when_its_held_rows_are_due() {
    handed_over_at_stop("handoff", Some(Duration::from_secs(3)), |b| b).await;
}

/// As above, with X and Y still queued in A's producer (the broker is down) when it stops:
/// purged unsent, their rows are released at once, and B takes them once the broker is back
/// (A's NOTIFY; nothing else wakes B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_relay_wakes_the_other_for_the_rows_it_released() {
    handed_over_at_stop("handoffq", None, |b| b).await;
}

/// Relay A (configured by `a`) has X and Y in flight — the broker answering after
/// `round_trip`, or down when `None` — when relay B starts and finds them locked; A stops
/// within 1 s, then the broker answers at once again; B must deliver them within 20 s although
/// both poll every 300 s.
async fn handed_over_at_stop(
    prefix: &str,
    round_trip: Option<Duration>,
    a: impl FnOnce(OutboxBuilder) -> OutboxBuilder,
) {
    let relay = |b: OutboxBuilder| {
        b.poll_interval(Duration::from_secs(300))
            .batch_timeout(Duration::from_millis(500))
            .publish_timeout(Duration::from_secs(5))
    };
    let (kafka, env, a, a_run, mut client) = warm_relay_on_mock(prefix, |b| a(relay(b))).await;
    let t = env.topic.as_str();
    match round_trip {
        Some(delay) => kafka.broker_round_trip_time(1, delay),
        None => kafka.broker_down(1),
    }
    .expect("slow the broker down");
    let ids = insert(&a, &mut client, &[ev(t, "X", 1), ev(t, "Y", 1)]).await;
    support::eventually(Duration::from_secs(10), "X and Y in flight", || async {
        match a.stats().in_flight {
            2 => Ok(()),
            n => Err(format!("{n} in flight")),
        }
    })
    .await;
    let b = relay(env.builder()).connect().await.expect("connect B");
    let b_run = b.start().expect("start B");
    support::eventually(Duration::from_secs(10), "B listens", || async {
        match b.stats().listener_connected {
            true => Ok(()),
            false => Err("not yet".to_string()),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.stop(Duration::from_secs(1)).await.expect("A stops");
    let a_ran = a_run.await.expect("join A");
    assert!(a_ran.is_ok(), "A: {a_ran:?}");
    match round_trip {
        Some(_) => kafka.broker_round_trip_time(1, Duration::ZERO),
        None => kafka.broker_up(1),
    }
    .expect("bring the broker back");
    let stopped = Instant::now();
    let pending = support::find_ids(&b, &ids).await;
    assert!(
        pending.iter().all(|e| e.status() == EventStatus::New),
        "X and Y are left to B: {}",
        support::brief(&pending)
    );
    // Held at most until their messages' fate is known (`publish_timeout` 5 s and a margin).
    support::wait_status(&b, &ids, EventStatus::Done, Duration::from_secs(20)).await;
    eprintln!(
        "{prefix}: X and Y done {:?} after A stopped",
        stopped.elapsed()
    );
    stop_and_join(&b, b_run).await;
}

/// A batch whose confirm fails keeps its fence until its unreported messages have settled
/// (the broker answers after 2 s); the relay's scan after its pause finds the aggregate fenced
/// and waits. Once the fence is removed the event is sent again at once, not at the fallback
/// poll (300 s here; found by a review helper) nor when the fence would have expired (21 s) or
/// at the wake-up after the failed batch's round trip deadline (10 s): done within 8 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_s_events_go_out_once_its_fence_is_removed() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("unfence", |b| {
        b.poll_interval(Duration::from_secs(300))
            .batch_timeout(Duration::from_millis(200))
            .publish_timeout(Duration::from_secs(20))
            .postgres_timeout(Duration::from_secs(10))
    })
    .await;
    let t = env.topic.as_str();
    let table = env.table.as_str();
    client
        .batch_execute(&format!(
            "create function {table}_refuse() returns trigger language plpgsql as
               $$ begin raise exception 'confirm refused by the test'; end $$;
             create trigger {table}_refuse before update on {table}
               for each row execute function {table}_refuse()"
        ))
        .await
        .expect("a trigger refusing every update");
    kafka
        .broker_round_trip_time(1, Duration::from_secs(2))
        .expect("delay the broker");
    let id = insert(&outbox, &mut client, &[ev(t, "X", 1)]).await[0];
    support::eventually(Duration::from_secs(30), "a confirm failed", || async {
        match outbox.stats().confirm_failures {
            0 => Err("none yet".to_string()),
            _ => Ok(()),
        }
    })
    .await;
    client
        .batch_execute(&format!("drop trigger {table}_refuse on {table}"))
        .await
        .expect("drop the trigger");
    // The broker stays slow: the first send's report, and with it the fence's removal, comes
    // after the relay's scan that follows its pause.
    let allowed = Instant::now();
    support::wait_status(&outbox, &[id], EventStatus::Done, Duration::from_secs(8)).await;
    eprintln!(
        "X done {:?} after the confirm was allowed",
        allowed.elapsed()
    );
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
}

/// Waits (up to 60 s) until every event of `ids` is delivered, and asserts none was charged an
/// attempt (`what` says why none should be).
async fn wait_done_uncharged(outbox: &Outbox, ids: &[Uuid], what: &str) {
    let done = support::wait_status(outbox, ids, EventStatus::Done, Duration::from_secs(60)).await;
    assert!(
        done.iter().all(|e| e.attempts() == 0),
        "{what}: {}",
        support::brief(&done)
    );
}

/// A relay on a one-broker mock cluster (one partition), configured by `configure` with a 5 s
/// shutdown timeout, started, and warmed up: one event delivered (so the broker can be slowed
/// down with every connection made). Returns the cluster, the environment, the relay, its task
/// and a Postgres client.
async fn warm_relay_on_mock(
    prefix: &str,
    configure: impl FnOnce(OutboxBuilder) -> OutboxBuilder,
) -> WarmRelay {
    warm_relay_on_mock_in(prefix, support::postgres().await, configure).await
}

/// As [`warm_relay_on_mock`], on the Postgres server `server` describes.
async fn warm_relay_on_mock_in(
    prefix: &str,
    server: tokio_postgres::Config,
    configure: impl FnOnce(OutboxBuilder) -> OutboxBuilder,
) -> WarmRelay {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let env = setup_in(prefix, 1, Some(&kafka), server).await;
    let outbox = configure(env.builder().shutdown_timeout(Duration::from_secs(5)))
        .connect()
        .await
        .expect("connect");
    let handle = outbox.start().expect("start");
    let mut client = pg(&env).await;
    let warm = insert(&outbox, &mut client, &[ev(&env.topic, "W", 1)]).await;
    support::wait_status(&outbox, &warm, EventStatus::Done, Duration::from_secs(20)).await;
    (kafka, env, outbox, handle, client)
}

/// A refused record batch reported after the batch ended (a slow broker: every report is late)
/// is not the event's failure, but its next attempt goes alone: an event refused only with its
/// batch is then delivered, with no attempt charged; one refused again when alone (too large by
/// itself) becomes a dead letter after one attempt. Before the relay sent such an event alone,
/// a late refusal was retried uncharged on the shared producer, and an event too large for the
/// topic cycled forever on a slow cluster instead of becoming a dead letter. (The mock's
/// injected MESSAGE_TOO_LARGE stands for a topic's `max.message.bytes`, which the mock does not
/// enforce.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_refused_batch_sends_the_event_alone_next_time() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("lateref", |b| {
        b.publish_timeout(Duration::from_secs(15))
            .batch_timeout(Duration::from_millis(500))
            .lease(Duration::from_secs(30))
            .retry_backoff(Duration::from_millis(200), Duration::from_secs(1))
    })
    .await;
    let mut acks = outbox.subscribe();
    let t = env.topic.as_str();
    kafka
        .broker_round_trip_time(1, Duration::from_secs(1))
        .expect("delay the broker");
    let too_large = RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE;

    // Refused once, with its batch: delivered alone, no attempt charged.
    kafka.request_errors(RDKafkaApiKey::Produce, &[too_large]);
    let a = insert(&outbox, &mut client, &[ev(t, "A", 1)]).await;
    let failure = next_failure(&mut acks, Duration::from_secs(30)).await;
    assert_eq!(failure.event_id(), a[0], "{failure:?}");
    assert!(!failure.is_dead_letter(), "{failure:?}");
    assert_eq!(failure.attempts(), 0, "no attempt charged: {failure:?}");
    assert!(
        failure.error().contains("it will be sent again, alone"),
        "{failure:?}"
    );
    let done = support::wait_status(&outbox, &a, EventStatus::Done, Duration::from_secs(40)).await;
    assert_eq!(done[0].attempts(), 0, "{}", support::brief(&done));

    // Refused with its batch, then alone: a dead letter after one attempt.
    kafka.request_errors(RDKafkaApiKey::Produce, &[too_large, too_large]);
    let b = insert(&outbox, &mut client, &[ev(t, "B", 1)]).await;
    let first = next_failure(&mut acks, Duration::from_secs(30)).await;
    assert_eq!(first.event_id(), b[0], "{first:?}");
    assert!(!first.is_dead_letter(), "refused with its batch: {first:?}");
    let second = next_failure(&mut acks, Duration::from_secs(40)).await;
    assert_eq!(second.event_id(), b[0], "{second:?}");
    assert!(
        second.is_dead_letter(),
        "refused alone, too large by itself: {second:?}"
    );
    assert_eq!(second.attempts(), 1, "{second:?}");
    let dead =
        support::wait_status(&outbox, &b, EventStatus::Failed, Duration::from_secs(10)).await;
    assert_eq!(dead[0].attempts(), 1, "{}", support::brief(&dead));

    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
}

/// A broker that stalls (every report 8 s late) while events keep coming: each batch ends at
/// its `batch_timeout` (200 ms) with its messages held, so dozens of batches wait for their late
/// reports at once. They all write them on one shared Postgres session: the relay's connections
/// stay a handful (counted in `pg_stat_activity` on a server of the test's own), where it used to
/// open one per held batch and keep it for the hold — about one every 100 ms here, hundreds
/// during a long stall, until the database refused the services' own connections
/// (`max_connections`). When the reports come, every event is recorded as delivered at its
/// first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_batches_share_one_session_for_their_late_reports() {
    let server = outbox::testing::TestPostgres::start().await.unwrap();
    let (kafka, env, outbox, handle, mut client) =
        warm_relay_on_mock_in("stall", server.config(), |b| {
            b.publish_timeout(Duration::from_secs(20))
                .batch_timeout(Duration::from_millis(200))
                .lease(Duration::from_secs(60))
        })
        .await;
    let t = env.topic.as_str();
    let relay_sessions = "select count(*) filter (where application_name like 'outbox-relay%'),
                                 count(*) filter (where application_name = 'outbox-relay-late')
                            from pg_stat_activity";
    kafka
        .broker_round_trip_time(1, Duration::from_secs(8))
        .expect("delay the broker");
    let mut ids = Vec::new();
    let (mut most, mut most_late) = (0i64, 0i64);
    for i in 0..60 {
        ids.extend(insert(&outbox, &mut client, &[ev(t, &format!("s-{i}"), i)]).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let row = client.query_one(relay_sessions, &[]).await.unwrap();
        most = most.max(row.get(0));
        most_late = most_late.max(row.get(1));
    }
    let held = outbox.stats();
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    assert!(
        most_late <= 1,
        "late reports on one session, not one per held batch: {most_late} late sessions at once ({most} relay sessions; {held:?})"
    );
    assert!(
        most <= 10,
        "the relay's sessions stay a handful during the stall: {most} ({held:?})"
    );
    wait_done_uncharged(&outbox, &ids, "each recorded at its first attempt").await;
    stop_and_join(&outbox, handle).await;
}

/// Batches of five whose messages are held for their late reports: `linger.ms` 1.5 s against
/// a 10 ms `batch_timeout` (a full batch keeps the linger; one that caught up kicks).
fn held_five_at_a_time(b: OutboxBuilder) -> OutboxBuilder {
    b.kafka_property("linger.ms", "1500")
        .batch_size(5)
        .batch_timeout(Duration::from_millis(10))
        .publish_timeout(Duration::from_secs(3))
        .lease(Duration::from_secs(10))
}

/// A run of one aggregate's events held for their late reports (`linger.ms` 1.5 s against a
/// 10 ms `batch_timeout`) whose first late write fails (a trigger refuses it once, standing for a
/// dropped connection or a missed deadline on that one statement): the later events of the run
/// are not recorded as delivered either — done before X:1, they would let X:1's replay come
/// after them, and X:6 after that (found by a breaker helper: Kafka saw 1 2 3 4 5 1 6). Their
/// holds end and the run is sent again, a contiguous replay: no later event is ever done while
/// X:1 is not, and Kafka's order of X keeps its duplicates contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_late_write_records_none_of_the_later_events_of_its_run() {
    let env = setup("latew", 1, None).await;
    let (outbox, _acks, handle, mut reader, mut client) =
        run(&env, held_five_at_a_time(env.builder())).await;
    let table = env.table.as_str();
    let tx = client.transaction().await.expect("begin");
    let ids = outbox
        .add_new_events(&tx, &counters(&env.topic, "X", 1..=5))
        .await
        .expect("add");
    tx.batch_execute(&format!(
        "create sequence {table}_once;
         create function {table}_fail_once() returns trigger language plpgsql as $$
         begin
           if new.id = '{x1}' and new.status = 'done' and nextval('{table}_once') = 1 then
             raise exception 'the late write of X:1 fails once';
           end if;
           return new;
         end $$;
         create trigger {table}_fail_once before update on {table}
           for each row execute function {table}_fail_once();",
        x1 = ids[0]
    ))
    .await
    .expect("the trigger");
    tx.commit().await.expect("commit");
    let statuses = format!("select status::text from {table} where id = any($1) order by seq");
    support::eventually(Duration::from_secs(30), "X:1 to X:5 done", || async {
        let rows = client.query(&statuses, &[&ids]).await.expect("statuses");
        let st: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert!(
            st[0] == "done" || st[1..].iter().all(|s| s == "new"),
            "a later event of X is done while X:1 is not: {st:?}"
        );
        if st.iter().all(|s| s == "done") {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    insert(&outbox, &mut client, &[ev(&env.topic, "X", 6)]).await;
    let mut got = read_n(&mut reader, 7, Duration::from_secs(20)).await;
    got.extend(reader.read_for(Duration::from_secs(2)).await);
    let seen = counters_by_key(&got).remove("X").unwrap_or_default();
    assert_order_with_contiguous_replays("X", &seen, &[1, 2, 3, 4, 5, 6]);
    stop_and_join(&outbox, handle).await;
}

/// A confirm commits without waiting for its WAL flush (a lost one is published again), except
/// the confirm of a batch whose messages are still held: its holds are what stops every relay
/// from publishing those rows while the messages may still land, so it must survive a server
/// crash. Messages held here by `linger.ms` 1.5 s against a 10 ms `batch_timeout`; a trigger
/// reads `synchronous_commit` at each write of the batch sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_with_messages_held_waits_for_its_flush() {
    let env = setup("heldsync", 1, None).await;
    let table = env.table.as_str();
    let setup_client = support::connect_pg().await;
    setup_client
        .batch_execute(&format!(
            "create table {table}_commits (seq int8, status text, held bool, sync text);
             create function {table}_commits() returns trigger language plpgsql as $$
             begin
               if current_setting('application_name') = 'outbox-relay-batch' then
                 insert into {table}_commits values (new.seq, new.status,
                     new.next_attempt_at is not null, current_setting('synchronous_commit'));
               end if;
               return null;
             end $$;
             create trigger {table}_commits after update on {table}
               for each row execute function {table}_commits();"
        ))
        .await
        .expect("the trigger");
    let (outbox, _acks, handle, mut reader, mut client) =
        run(&env, held_five_at_a_time(env.builder())).await;
    // Ten: the first batch is full whatever its limit (five, or ten after a gated reservation),
    // so it keeps the linger (a batch that caught up would kick the producer).
    let ids = insert(&outbox, &mut client, &counters(&env.topic, "X", 1..=10)).await;
    support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(30)).await;
    let got = read_n(&mut reader, 10, Duration::from_secs(20)).await;
    assert_eq!(
        counters_by_key(&got).get("X"),
        Some(&(1..=10).collect::<Vec<i64>>())
    );
    let seen: Vec<(String, bool, String)> = client
        .query(
            &format!("select status, held, sync from {table}_commits order by seq"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        seen.iter()
            .any(|(status, held, _)| status == "new" && *held),
        "the batch confirmed with its messages held: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, held, sync)| !held || sync == "on"),
        "a confirm that writes holds waits for its flush: {seen:?}"
    );
    stop_and_join(&outbox, handle).await;
}

// ----------------------------------------------------------------------------------------------
// Per-aggregate pipelining (mock cluster)
// ----------------------------------------------------------------------------------------------

/// One aggregate's backlog on a broker 200 ms away: its events go back to back, so the first
/// batch (1 s to send) delivers all 60 of them, in order. One at a time (a round trip each, as
/// with `max_in_flight_per_aggregate(1)`) a batch delivers about five, and 60 events take a
/// dozen batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_aggregates_events_are_sent_back_to_back() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("hot", |b| {
        b.publish_timeout(Duration::from_secs(10))
            .batch_timeout(Duration::from_secs(1))
            .lease(Duration::from_secs(20))
    })
    .await;
    let mut reader = reader(&env).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(200))
        .expect("delay the broker");
    let before = outbox.stats().batches;
    let ids = insert(&outbox, &mut client, &counters(&env.topic, "H", 1..=60)).await;
    let done =
        support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(60)).await;
    let batches = outbox.stats().batches - before;
    assert!(
        batches <= 2,
        "60 events of one aggregate took {batches} batches (one at a time: about 12): {}",
        support::brief(&done)
    );
    // The warm-up event and H's 60.
    let got = read_n(&mut reader, 61, Duration::from_secs(20)).await;
    assert_eq!(
        counters_by_key(&got).get("H"),
        Some(&(1..=60).collect::<Vec<i64>>()),
        "{got:#?}"
    );
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
}

/// One aggregate's backlog on a broker 100 ms away, with `batch_size` 50 and two batch slots: a
/// second batch can take none of it while the first is in flight (every later event is behind
/// one of the first batch's, the per-aggregate gate holds it), and one aggregate cannot be split
/// between the slots, so the slots give their share to one batch of up to 100 events. 600 events
/// then take at most 8 batches (50, then 100 at a time: 7), where 50 at a time take 12; in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_backlog_of_one_aggregate_takes_the_idle_slots_share() {
    let (gated, _) = gated_backlog("gated", 1, None).await;
    assert!(
        gated.batches <= 8,
        "600 events of one aggregate took {} batches of at most 50 (merged: 100)",
        gated.batches
    );
}

/// The same backlog with a byte budget (`max_batch_bytes` 1 KiB) that holds fewer than 50 of its
/// events: the merged batch takes the slots' share of rows, not of bytes, so that its fetch
/// still fits the reservation's deadline and memory stays within `max_batch_bytes` ×
/// `max_batches_in_flight` while the free slot re-checks. So no batch holds more events than fit
/// in 1 KiB: at least 600 / that many batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_backlogs_batch_keeps_one_byte_budget() {
    let (gated, env) = gated_backlog("gatedbytes", 1, Some(1024)).await;
    let pg = support::connect_pg().await;
    let smallest: i32 = pg
        .query_one(
            &format!(
                "select min(octet_length(payload::text) + coalesce(octet_length(headers::text), 0)) \
                 from {} where aggregate_id like 'G%'",
                env.table
            ),
            &[],
        )
        .await
        .expect("row sizes")
        .get(0);
    let fit = 1024 / usize::try_from(smallest).expect("a size");
    assert!(
        fit < 50,
        "1 KiB must hold fewer than 50 events, holds {fit}"
    );
    assert!(
        gated.batches as usize >= 600usize.div_ceil(fit),
        "600 events of one aggregate took {} batches; with at most {fit} in 1 KiB \
         that needs {} (a merged batch took more than one byte budget)",
        gated.batches,
        600usize.div_ceil(fit)
    );
}

/// A backlog of ten aggregates, interleaved, on the same broker and settings: the first batch
/// holds all ten, and the gate would keep the second slot idle until it is done. The relay splits
/// the aggregates between the two slots instead (see `relay::split`), so two batches are in
/// flight at once — seen as two live fences, the aggregates each batch holds, sampled every 5 ms
/// — and never share an aggregate; every aggregate arrives in order. Without the split the
/// fences are never two at once (one batch of up to 100 at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_backlog_of_ten_aggregates_is_split_between_the_batch_slots() {
    let (gated, _) = gated_backlog("gatedsplit", 10, None).await;
    assert!(
        gated.overlapping.is_empty(),
        "two batches in flight held the same aggregates: {:?}",
        gated.overlapping
    );
    assert!(
        gated.samples_with_two >= 5,
        "two batches were in flight at once in {} of {} samples (the second slot idled behind \
         the gate)",
        gated.samples_with_two,
        gated.samples
    );
}

/// What [`gated_backlog`] saw.
#[derive(Default)]
struct Gated {
    /// Batches the relay made for the 600 events.
    batches: u64,
    /// Samples of the fence table, and those with two live fences (two batches in flight).
    samples: usize,
    samples_with_two: usize,
    /// Aggregates seen in two live fences at once.
    overlapping: BTreeSet<String>,
}

/// Runs 600 events of `aggregates` interleaved aggregates (`G0`…) through a relay with
/// `batch_size` 50, two slots and `max_batch_bytes` (default when `None`) on a mock broker 100 ms
/// away, sampling its fences (the aggregates of each batch in flight) every 5 ms; checks every
/// aggregate arrived in order; returns what it saw, and the environment.
async fn gated_backlog(
    prefix: &str,
    aggregates: usize,
    max_batch_bytes: Option<usize>,
) -> (Gated, Env) {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock(prefix, |b| {
        let b = b
            .batch_size(50)
            .max_batches_in_flight(2)
            .publish_timeout(Duration::from_secs(10))
            .lease(Duration::from_secs(20));
        match max_batch_bytes {
            Some(n) => b.max_batch_bytes(n),
            None => b,
        }
    })
    .await;
    let mut reader = reader(&env).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(100))
        .expect("delay the broker");
    let before = outbox.stats().batches;
    let per = i64::try_from(600 / aggregates).expect("a count");
    let events: Vec<NewEvent> = (1..=per)
        .flat_map(|n| (0..aggregates).map(move |a| (a, n)))
        .map(|(a, n)| ev(&env.topic, &format!("G{a}"), n))
        .collect();
    let seen = Arc::new(Mutex::new(Gated::default()));
    let sampler = tokio::spawn(sample_fences(format!("{}_fence", env.table), seen.clone()));
    let ids = insert(&outbox, &mut client, &events).await;
    support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(60)).await;
    sampler.abort();
    let _ = sampler.await;
    let batches = outbox.stats().batches - before;
    // The warm-up event and the 600.
    let got = read_n(&mut reader, 601, Duration::from_secs(20)).await;
    let by_key = counters_by_key(&got);
    for a in 0..aggregates {
        assert_eq!(
            by_key.get(&format!("G{a}")),
            Some(&(1..=per).collect::<Vec<i64>>()),
            "aggregate G{a}"
        );
    }
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
    let mut gated = std::mem::take(&mut *seen.lock().expect("samples"));
    gated.batches = batches;
    (gated, env)
}

/// Reads the live fences of `fence_table` every 5 ms into `seen`, until aborted.
async fn sample_fences(fence_table: String, seen: Arc<Mutex<Gated>>) {
    let pg = support::connect_pg().await;
    let query = format!("select aggregates from {fence_table} where until > now()");
    loop {
        let fences: Vec<Vec<String>> = (pg.query(&query, &[]).await.expect("fences"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        {
            let mut seen = seen.lock().expect("samples");
            seen.samples += 1;
            if fences.len() >= 2 {
                seen.samples_with_two += 1;
            }
            let mut held = HashSet::new();
            for aggregate in fences.iter().flatten() {
                if !held.insert(aggregate) {
                    seen.overlapping.insert(aggregate.clone());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
/// A warm relay on the mock cluster for the scan-start tests: batches of 20, two in flight, no
/// fallback tick during the test (only the relay's own full scans look below a scan's start),
/// and a reader of the topic. The broker answers after 50 ms: at most 40 events per round trip,
/// so a backlog of thousands lasts seconds.
async fn scan_start_relay(prefix: &str) -> (WarmRelay, TopicReader) {
    let (kafka, env, outbox, handle, client) = warm_relay_on_mock(prefix, |b| {
        b.batch_size(20)
            .max_batches_in_flight(2)
            .poll_interval(Duration::from_secs(120))
            .publish_timeout(Duration::from_secs(10))
            .lease(Duration::from_secs(30))
    })
    .await;
    let reader = reader(&env).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(50))
        .expect("delay the broker");
    ((kafka, env, outbox, handle, client), reader)
}

/// Aggregates `B0`..`B199` each read with counters `1..=rounds`, in order; then the broker is
/// undelayed and the relay stopped.
async fn check_backlog_and_stop(
    by_key: &BTreeMap<String, Vec<i64>>,
    rounds: i64,
    kafka: &MockKafka,
    outbox: &Outbox,
    handle: tokio::task::JoinHandle<Result<(), Error>>,
) {
    for a in 0..200 {
        assert_eq!(
            by_key.get(&format!("B{a}")),
            Some(&(1..=rounds).collect::<Vec<i64>>()),
            "aggregate B{a}"
        );
    }
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(outbox, handle).await;
}

/// In a backlog each reservation scans from where the last one left off, not from the first
/// pending row (a scan from the start reads past every delivered row an old snapshot still
/// holds). A row that turns pending below that start — here a writer's transaction that took its
/// `seq` before the backlog's rows and commits once the relay is past it, with no NOTIFY (the
/// relay was busy, so the writer's trigger did not notify) — must be found by the full scan the
/// relay makes at least every 500 ms, not when the backlog ends: when it is delivered, most of
/// the backlog is still pending. Consumed: every event, each aggregate in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_below_the_scan_start_goes_out_during_the_backlog() {
    let ((kafka, env, outbox, handle, mut client), mut reader) = scan_start_relay("latescan").await;
    // Over 200 aggregates every reservation finds rows (the relay never waits, so it never asks
    // writers to NOTIFY).
    let backlog = |rounds: std::ops::RangeInclusive<i64>| -> Vec<NewEvent> {
        rounds
            .flat_map(|n| (0..200).map(move |a| (a, n)))
            .map(|(a, n)| ev(&env.topic, &format!("B{a}"), n))
            .collect()
    };
    let first = insert(&outbox, &mut client, &backlog(1..=3)).await;
    support::eventually(Duration::from_secs(30), "the relay is busy", || async {
        let done = support::find_ids(&outbox, &first).await;
        let n = done
            .iter()
            .filter(|e| e.status() == EventStatus::Done)
            .count();
        if n >= 40 {
            Ok(())
        } else {
            Err(format!("{n} done"))
        }
    })
    .await;
    support::eventually(
        Duration::from_secs(30),
        "the relay is not waiting",
        || async {
            match support::wake_lock_holders(&client, &env.table).await {
                (0, _) => Ok(()),
                held => Err(format!("wake lock (exclusive, any): {held:?}")),
            }
        },
    )
    .await;
    let mut late_client = pg(&env).await;
    let late_tx = late_client.transaction().await.expect("begin");
    let late = outbox
        .add_new_events(&late_tx, &[ev(&env.topic, "L", 1)])
        .await
        .expect("add the late event");
    let second = insert(&outbox, &mut client, &backlog(4..=13)).await;
    let pending_of_second = || async {
        let rows = client
            .query_one(
                &format!(
                    "select count(*) filter (where status = 'new') from {} where id = any($1)",
                    env.table
                ),
                &[&second],
            )
            .await
            .expect("count pending");
        rows.get::<_, i64>(0)
    };
    // The relay's scans now start above the late row's `seq`.
    support::eventually(
        Duration::from_secs(30),
        "the relay is past the late row",
        || async {
            let pending = pending_of_second().await;
            if pending <= 1_900 {
                Ok(())
            } else {
                Err(format!("{pending} of 2,000 pending"))
            }
        },
    )
    .await;
    late_tx.commit().await.expect("commit the late event");
    support::wait_status(&outbox, &late, EventStatus::Done, Duration::from_secs(60)).await;
    let pending = pending_of_second().await;
    assert!(
        pending >= 500,
        "the late event was delivered with only {pending} of the backlog's 2,000 events pending: \
         the relay did not scan below where its scans started until the backlog was nearly done"
    );
    support::wait_status(&outbox, &second, EventStatus::Done, Duration::from_secs(60)).await;
    // The warm-up event, the backlog's 2,600 and the late one.
    let got = read_n(&mut reader, 2_602, Duration::from_secs(30)).await;
    let by_key = counters_by_key(&got);
    assert_eq!(by_key.get("L"), Some(&vec![1]), "the late event");
    check_backlog_and_stop(&by_key, 13, &kafka, &outbox, handle).await;
}

/// A dead letter blocks its aggregate's later events also when the relay's scans start above it
/// (in a backlog each reservation scans from where the last one left off): the gate's probe is
/// not bounded by the scan's start. Here aggregate X's first event breaks a rule of
/// `add_new_event` (written by another writer: an empty event type), so it is dead-lettered
/// unsent; X's next ten events are spread through a backlog of 2,000 that the relay reserves
/// with such scans. None of X's may be published, and all stay pending behind the dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_below_the_scan_start_still_blocks_its_aggregate() {
    let ((kafka, env, outbox, handle, mut client), mut reader) = scan_start_relay("deadscan").await;
    client
        .execute(
            &format!(
                "insert into {} (aggregate_id, event_topic, event_type, payload) \
                 values ('X', $1, '', '{{\"aggregate\": \"X\", \"n\": 1}}')",
                env.table
            ),
            &[&env.topic],
        )
        .await
        .expect("insert the invalid event");
    let dead = outbox
        .find(&EventFilter::new().aggregate_id("X"))
        .await
        .expect("find X");
    let dead: Vec<Uuid> = dead.iter().map(Event::id).collect();
    support::wait_status(&outbox, &dead, EventStatus::Failed, Duration::from_secs(30)).await;
    let events: Vec<NewEvent> = (1..=10)
        .flat_map(|n| {
            (0..200)
                .map(move |a| (format!("B{a}"), n))
                .chain(std::iter::once(("X".to_string(), n + 1)))
        })
        .map(|(a, n)| ev(&env.topic, &a, n))
        .collect();
    let ids = insert(&outbox, &mut client, &events).await;
    let of = |x: bool| -> Vec<Uuid> {
        ids.iter()
            .zip(&events)
            .filter(|(_, e)| (e.aggregate_id() == "X") == x)
            .map(|(id, _)| *id)
            .collect()
    };
    let (x, backlog) = (of(true), of(false));
    support::wait_status(
        &outbox,
        &backlog,
        EventStatus::Done,
        Duration::from_secs(60),
    )
    .await;
    let blocked = support::find_ids(&outbox, &x).await;
    assert!(
        blocked.iter().all(|e| e.status() == EventStatus::New),
        "X's events behind its dead letter: {}",
        support::brief(&blocked)
    );
    // The warm-up event and the backlog's 2,000, then nothing more.
    let mut got = read_n(&mut reader, 2_001, Duration::from_secs(30)).await;
    got.extend(reader.read_for(Duration::from_secs(1)).await);
    let by_key = counters_by_key(&got);
    assert_eq!(by_key.get("X"), None, "X published behind its dead letter");
    check_backlog_and_stop(&by_key, 10, &kafka, &outbox, handle).await;
}

/// A pipelined run of 200 events of one aggregate, five per record batch
/// (`batch.num.messages=5`, so several produce requests are in flight at once), whose second
/// produce request the broker refuses permanently (MESSAGE_TOO_LARGE: the record batch, not the
/// events): no later event may be written before the refused ones. The pipelining producer's
/// `enable.gapless.guarantee` fails every later message instead (the plain idempotent producer
/// bumps its epoch and writes them: the refused events then arrive after them); the refused ones
/// go alone next time, with no attempt charged. Consumed: every counter, first occurrences in
/// order, duplicates only as contiguous replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_batch_in_a_pipelined_run_lets_no_later_event_ahead() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("pipefail", |b| {
        b.publish_timeout(Duration::from_secs(10))
            .batch_timeout(Duration::from_secs(2))
            .lease(Duration::from_secs(20))
            .retry_backoff(Duration::from_millis(100), Duration::from_secs(1))
            .kafka_property("batch.num.messages", "5")
    })
    .await;
    let mut acks = outbox.subscribe();
    let mut reader = reader(&env).await;
    reader.read_for(Duration::from_millis(500)).await; // the warm-up event
    kafka
        .broker_round_trip_time(1, Duration::from_millis(50))
        .expect("delay the broker");
    use RDKafkaRespErr::{RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, RD_KAFKA_RESP_ERR_NO_ERROR};
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NO_ERROR,
            RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    const N: i64 = 200;
    let ids = insert(&outbox, &mut client, &counters(&env.topic, "P", 1..=N)).await;
    let failure = next_failure(&mut acks, Duration::from_secs(30)).await;
    assert!(
        failure.error().contains("it will be sent again, alone") && failure.attempts() == 0,
        "the refused record batch's first event: {failure:?}"
    );
    wait_done_uncharged(&outbox, &ids, "no attempt charged").await;
    let mut got = reader.read(N as usize, Duration::from_secs(20)).await;
    got.extend(reader.read_for(Duration::from_secs(1)).await);
    let seen = counters_by_key(&got).remove("P").unwrap_or_default();
    assert_order_with_contiguous_replays("P", &seen, &(1..=N).collect::<Vec<_>>());
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
}

/// A pipelined run whose 11th event librdkafka refuses before sending it (over
/// `message.max.bytes`) while the first ten are in flight on a slow broker and held at the
/// cutoff: the ten arrive in order, the 11th is a dead letter after one attempt, and no order
/// anomaly is counted (found by a breaker helper: the held ten were all taken as following the
/// failure, and each on-time delivery was counted and logged as an anomaly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_refusal_in_a_pipelined_run_is_no_order_anomaly() {
    let before = support::counter_value("outbox_order_anomalies_total");
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("localref", |b| {
        b.publish_timeout(Duration::from_secs(10))
            .batch_timeout(Duration::from_millis(500))
            .lease(Duration::from_secs(20))
    })
    .await;
    let mut reader = reader(&env).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(700))
        .expect("delay the broker");
    let t = env.topic.as_str();
    let mut events = counters(t, "L", 1..=10);
    events.push(NewEvent::new(
        t,
        "L",
        "counter.incremented",
        json!({ "aggregate": "L", "n": 11, "pad": "x".repeat(1_200_000) }),
    ));
    let ids = insert(&outbox, &mut client, &events).await;
    support::wait_status(
        &outbox,
        &ids[..10],
        EventStatus::Done,
        Duration::from_secs(30),
    )
    .await;
    let big = support::wait_status(
        &outbox,
        &ids[10..],
        EventStatus::Failed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(big[0].attempts(), 1, "{}", support::brief(&big));
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    // The warm-up event and L's ten.
    let got = read_n(&mut reader, 11, Duration::from_secs(20)).await;
    assert_eq!(
        counters_by_key(&got).get("L"),
        Some(&(1..=10).collect::<Vec<i64>>())
    );
    assert_eq!(
        support::counter_value("outbox_order_anomalies_total") - before,
        0.0,
        "L 1-10 were written in order before the refused 11th: no anomaly"
    );
    stop_and_join(&outbox, handle).await;
}

/// On a broker 1.5 s away, a fresh pipelining producer needs several round trips (metadata, a
/// producer id) before its first message is acknowledged, so it is purged `publish_timeout`
/// after the cutoff with nothing delivered; a new one would be as cold (found by a breaker
/// helper: ten events of one aggregate were never delivered). After a purge, runs go one event
/// at a time on the warm main producer for a while (`PIPE_PAUSE`): the ten are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_does_not_starve_a_pipelined_aggregate() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("slowpipe", |b| {
        b.publish_timeout(Duration::from_secs(10))
            .batch_timeout(Duration::from_millis(500))
            .lease(Duration::from_secs(20))
    })
    .await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .expect("delay the broker");
    let ids = insert(&outbox, &mut client, &counters(&env.topic, "S", 1..=10)).await;
    wait_done_uncharged(&outbox, &ids, "the ten delivered, none charged").await;
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
}

/// Waits (up to 30 s) for the relay's first purge of its pipelining producer.
async fn a_purge(outbox: &Outbox) {
    support::eventually(Duration::from_secs(30), "a purge", || async {
        match outbox.stats().pipelining_purges {
            0 => Err("no purge".to_owned()),
            _ => Ok(()),
        }
    })
    .await;
}

/// A purge of the pipelining producer (a broker 1.5 s away: its first message's report is
/// overdue) makes librdkafka raise a fatal error on that gapless producer ("Fatal error: Local:
/// Gap-less ordering would not be guaranteed if proceeding: … Purged in flight"). The relay
/// purged that producer and discards it, so the error is expected: neither an ERROR nor a
/// WARN in the log (the purge's own warning says what happened), and never in health (found by
/// a breaker helper: an ERROR "FATAL" line and a WARN "Kafka client error" at each purge, 2-7
/// per chaos run, alarming at 3 a.m. while nothing was wrong). Fails when the purged
/// producer's errors are logged as any other producer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_pipelining_producer_s_fatal_error_is_expected_not_alarming() {
    support::init_tracing();
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("purgefatal", |b| {
        b.publish_timeout(Duration::from_secs(2))
            .batch_timeout(Duration::from_secs(1))
            .lease(Duration::from_secs(20))
    })
    .await;
    // A pipelined run first, so that the pipelining producer knows the topic's leader and has
    // its producer id: the next run's request is in flight at once, and purged in flight.
    let warm = insert(&outbox, &mut client, &counters(&env.topic, "W", 1..=3)).await;
    wait_done_uncharged(&outbox, &warm, "a first run").await;
    kafka
        .broker_round_trip_time(1, Duration::from_secs(10))
        .expect("delay the broker");
    let slow = insert(&outbox, &mut client, &counters(&env.topic, "S", 1..=5)).await;
    a_purge(&outbox).await;
    // The purged producer's fatal error comes from its own thread soon after the purge; the
    // broker still answers 10 s late, so nothing is delivered meanwhile (which would clear a
    // problem from health).
    let mut named = Vec::new();
    for _ in 0..20 {
        named.extend(outbox.health().await.expect("health").kafka_problem);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    wait_done_uncharged(&outbox, &slow, "the five delivered after the purge").await;
    stop_and_join(&outbox, handle).await;
    // The fatal error names the purged request's topic, which is this test's alone.
    let alarms: Vec<String> = [tracing::Level::ERROR, tracing::Level::WARN]
        .into_iter()
        .flat_map(|level| support::logged(level, &env.topic))
        .filter(|line| line.contains("Gap-less") || line.contains("Fatal"))
        .collect();
    assert_eq!(
        alarms,
        Vec::<String>::new(),
        "the purged producer's fatal error, logged as an alarm"
    );
    assert!(
        !named
            .iter()
            .any(|p| p.contains("Fatal") || p.contains("Gap-less")),
        "health named the purged producer's expected fatal error: {named:?}"
    );
    assert!(
        named
            .iter()
            .any(|p| p.contains("without an acknowledgement")),
        "health names the purged messages: {named:?}"
    );
}

/// After a purge of the pipelining producer (a broker 1.5 s away: its first message's report is
/// overdue), once the broker answers again, pipelining resumes after the first pause (5 s), not
/// after a fixed minute: a hundred events of one aggregate on a broker 100 ms away are delivered
/// back to back (well under a second) rather than one per round trip (10 s or more). Found by a
/// breaker helper: 42–48 s to drain 5,000 events after 7.5 s of broker errors, most of it the
/// fixed 60 s pause (fails with it: the hundred take over 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_resumes_seconds_after_a_purge_once_the_broker_answers() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("pipeback", |b| {
        b.publish_timeout(Duration::from_secs(2))
            .batch_timeout(Duration::from_secs(1))
            .lease(Duration::from_secs(20))
    })
    .await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .expect("delay the broker");
    let slow = insert(&outbox, &mut client, &counters(&env.topic, "S", 1..=5)).await;
    a_purge(&outbox).await;
    let purged_at = tokio::time::Instant::now();
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    wait_done_uncharged(&outbox, &slow, "the five delivered after the purge").await;
    // Past the first pause, on a broker 100 ms away.
    tokio::time::sleep_until(purged_at + Duration::from_secs(6)).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(100))
        .expect("delay the broker");
    let hot = insert(&outbox, &mut client, &counters(&env.topic, "H", 1..=100)).await;
    let sent = tokio::time::Instant::now();
    support::wait_status(&outbox, &hot, EventStatus::Done, Duration::from_secs(30)).await;
    let took = sent.elapsed();
    assert_eq!(
        outbox.stats().pipelining_purges,
        1,
        "one purge, none after it"
    );
    assert!(
        took < Duration::from_secs(5),
        "100 events of one aggregate took {took:?} on a broker 100 ms away, 6 s after a purge: still one at a time (pipelining paused)"
    );
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
}

/// A batch writes the rows Kafka acknowledged while it still publishes (in its transaction,
/// `EARLY_CONFIRM_ROWS` at a time), and commits them with its confirm: when that confirm fails,
/// the rows written early are rolled back with it — none is `done` — and the batch is published
/// again. A trigger refuses to mark the batch's last event done (so the failing statement is the
/// batch confirm, after the early writes); a statement-level trigger counts the statements that
/// mark rows done (in a sequence, which a rollback does not undo): more than one per attempt
/// shows that rows were written early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_early_roll_back_with_a_batch_that_cannot_confirm() {
    rows_written_early(false).await;
}

/// As `rows_written_early_roll_back_with_a_batch_that_cannot_confirm`, with
/// `OnDelivery::Delete`: the rows deleted early come back with the rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_deleted_early_roll_back_with_a_batch_that_cannot_confirm() {
    rows_written_early(true).await;
}

/// The early-writing test; `delete`: with `OnDelivery::Delete` (else `MarkDone`).
async fn rows_written_early(delete: bool) {
    let env = setup(if delete { "early_del" } else { "early" }, 1, None).await;
    let t = &env.table;
    let admin = pg(&env).await;
    // The delivery's write: an update to `done`, or a delete.
    let (event, row, table, marks) = if delete {
        ("delete", "old", "old table", "true")
    } else {
        ("update", "new", "new table", "status = 'done'")
    };
    admin
        .batch_execute(&format!(
            "create table {t}_refuse (refuse bool not null);
             insert into {t}_refuse values (true);
             create sequence {t}_done_statements;
             create function {t}_refuse_last() returns trigger language plpgsql as $$
             begin
               if ({row}.status = 'done' or tg_op = 'DELETE') and ({row}.payload->>'n')::int = 1000
                  and (select refuse from {t}_refuse) then
                 raise exception 'refused by the test';
               end if;
               return {row};
             end $$;
             create trigger {t}_refuse_last before {event} on {t}
               for each row execute function {t}_refuse_last();
             create function {t}_count_done() returns trigger language plpgsql as $$
             begin
               if exists (select 1 from marked where {marks}) then
                 perform nextval('{t}_done_statements');
               end if;
               return null;
             end $$;
             create trigger {t}_count_done after {event} on {t}
               referencing {table} as marked
               for each statement execute function {t}_count_done();"
        ))
        .await
        .expect("triggers");
    // 1,000 events of 10 aggregates in one transaction: one batch, chains of 100; the 1,000th
    // (aggregate 9's last) is refused.
    let events: Vec<NewEvent> = (1..=1000)
        .map(|n| ev(&env.topic, &format!("E{}", (n - 1) / 100), n))
        .collect();
    let on_delivery = if delete {
        OnDelivery::Delete
    } else {
        OnDelivery::MarkDone
    };
    let outbox = env
        .builder()
        .batch_size(2000)
        .on_delivery(on_delivery)
        .retry_backoff(Duration::from_millis(200), Duration::from_secs(1))
        .connect()
        .await
        .expect("connect");
    let mut client = pg(&env).await;
    insert(&outbox, &mut client, &events).await;
    let handle = outbox.start().expect("start");
    support::eventually(Duration::from_secs(60), "two failed confirms", || async {
        let s = outbox.stats();
        (s.confirm_failures >= 2)
            .then_some(())
            .ok_or(format!("{s:?}"))
    })
    .await;
    let count = |sql: String| {
        let admin = &admin;
        async move { admin.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let pending = count(format!("select count(*) from {t} where status = 'new'")).await;
    let statements = count(format!(
        "select case when is_called then last_value else 0 end from {t}_done_statements"
    ))
    .await;
    assert_eq!(
        pending, 1000,
        "rows written early were committed without their batch"
    );
    assert!(statements > 0, "no rows were written early");
    admin
        .batch_execute(&format!("update {t}_refuse set refuse = false"))
        .await
        .unwrap();
    support::eventually(Duration::from_secs(60), "the batch confirms", || async {
        let n = count(format!("select count(*) from {t} where status = 'new'")).await;
        (n == 0).then_some(()).ok_or(format!("{n} pending"))
    })
    .await;
    stop_and_join(&outbox, handle).await;
    let mut r = reader(&env).await;
    let records = r.read(usize::MAX, Duration::from_secs(5)).await;
    let by_key = counters_by_key(&records);
    assert_eq!(by_key.len(), 10, "every aggregate in Kafka");
    for (key, seen) in &by_key {
        // Each attempt published the aggregate's events from its first: replays, each in order;
        // a counter never seen before is always the next one.
        let first: i64 = key[1..].parse::<i64>().unwrap() * 100 + 1;
        let mut highest = first - 1;
        for (i, &c) in seen.iter().enumerate() {
            if c > highest {
                assert_eq!(
                    c,
                    highest + 1,
                    "{key}: {c} before {} at {i}: {seen:?}",
                    highest + 1
                );
                highest = c;
            } else if i > 0 && c != first {
                assert_eq!(
                    c,
                    seen[i - 1] + 1,
                    "{key}: a replay out of order at {i}: {seen:?}"
                );
            }
        }
        assert_eq!(highest, first + 99, "{key}: every event: {seen:?}");
    }
}

/// Once an early write fails, the batch cannot confirm: its chains send nothing more (every
/// message sent after that would only be published again). One aggregate × 5,000 events behind
/// a broker 300 ms away, 500 unacknowledged at most: the batch's first early write fails (a
/// trigger refuses it, once); the attempt stops after about two windows instead of sending all
/// 5,000 until its cutoff (found by a breaker helper). Then everything arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_early_write_failed_sends_nothing_more() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("earlyfail", |b| {
        b.publish_timeout(Duration::from_secs(20))
            .batch_timeout(Duration::from_secs(10))
            .lease(Duration::from_secs(40))
            .batch_size(5000)
            .max_in_flight_per_aggregate(500)
    })
    .await;
    let t = &env.table;
    client
        .batch_execute(&format!(
            "create sequence {t}_once;
             create function {t}_refuse_once() returns trigger language plpgsql as $$
             begin
               if new.status = 'done' and new.aggregate_id = 'F' and nextval('{t}_once') = 1 then
                 raise exception 'refused once by the test';
               end if;
               return new;
             end $$;
             create trigger {t}_refuse_once before update on {t}
               for each row execute function {t}_refuse_once();"
        ))
        .await
        .expect("trigger");
    kafka
        .broker_round_trip_time(1, Duration::from_millis(300))
        .expect("delay the broker");
    let ids = insert(&outbox, &mut client, &counters(&env.topic, "F", 1..=5000)).await;
    support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(120)).await;
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
    let mut r = reader(&env).await;
    let records = r.read(usize::MAX, Duration::from_secs(5)).await;
    let seen = counters_by_key(&records).remove("F").unwrap_or_default();
    // The failed attempt's records, then the whole run again.
    let first_attempt = seen.len() - 5000;
    assert!(
        seen.len() >= 5000 && first_attempt < 2500,
        "{first_attempt} records sent by the attempt whose early write failed (of 5,000)"
    );
    assert_eq!(
        &seen[first_attempt..],
        &(1..=5000).collect::<Vec<i64>>()[..]
    );
    assert_eq!(
        &seen[..first_attempt],
        &(1..=first_attempt as i64).collect::<Vec<i64>>()[..]
    );
}

/// Two relays on one table, B behind a broker slower than its `publish_timeout` (its messages
/// are never acknowledged in time: health names the problem), A behind a healthy one: A
/// delivers everything. Once nothing is pending, B's past delivery failures describe nothing
/// left to deliver, and its health clears. Before, B kept its Kafka problem until a delivery of
/// its own, which never came with nothing to send: unhealthy for good once the problem outlived
/// `max_pending_age` (found by a breaker helper, 2 runs of 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_clears_its_kafka_problem_once_another_delivered_everything() {
    let kafka_a = MockKafka::start(1).expect("mock cluster A");
    let kafka_b = MockKafka::start(1).expect("mock cluster B");
    let env = setup("idleclear", 1, Some(&kafka_a)).await;
    kafka_b.create_topic(&env.topic, 1).expect("topic on B");
    support::wait_for_topic(
        &kafka_b.bootstrap_servers(),
        &env.topic,
        Duration::from_secs(30),
    )
    .await
    .expect("topic on B");
    kafka_b
        .broker_round_trip_time(1, Duration::from_secs(4))
        .expect("slow broker B");
    let b = fast(env.builder().kafka_brokers(kafka_b.bootstrap_servers()))
        .connect()
        .await
        .expect("connect B");
    let b_task = b.start().expect("start B");
    let mut client = pg(&env).await;
    let ids = insert(&b, &mut client, &counters(&env.topic, "I", 1..=5)).await;
    support::eventually(Duration::from_secs(30), "B names the problem", || async {
        let h = b.health().await.map_err(|e| e.to_string())?;
        h.kafka_problem.as_ref().map(drop).ok_or(format!("{h:?}"))
    })
    .await;
    let a = fast(env.builder()).connect().await.expect("connect A");
    let a_task = a.start().expect("start A");
    wait_done_uncharged(&a, &ids, "A delivers them").await;
    support::eventually(Duration::from_secs(20), "B's health clears", || async {
        let h = b.health().await.map_err(|e| e.to_string())?;
        match h.kafka_problem {
            None => Ok(()),
            Some(p) => Err(p),
        }
    })
    .await;
    stop_and_join(&a, a_task).await;
    stop_and_join(&b, b_task).await;
}

// ----------------------------------------------------------------------------------------------
// S5 — oversized payload
// ----------------------------------------------------------------------------------------------

/// A 2 MB event (the producer's default `message.max.bytes` of 1,000,000 refuses it locally; the
/// topic's `max.message.bytes` is 1,000,000 too), then 10 normal events of other aggregates: the
/// big one becomes a dead letter with an error about its size after one attempt and is never
/// retried; the 10 others are consumed within seconds (far below the 30 s publish timeout a
/// stalled batch would wait for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_oversized_event_is_dead_lettered_once_and_others_flow() {
    s5_oversized(2_000_000, "1000000", false).await;
}

/// The broker's own limit: a 200 kB event on a topic with `max.message.bytes` 100,000 (the
/// producer lets it through, the broker answers MESSAGE_TOO_LARGE), then 10 small events of other
/// aggregates: only the big one may become a dead letter.
///
/// Failed on Apache Kafka in most runs (2 of 3) before the relay sent such an event alone: when
/// librdkafka put the small events in the same record batch as the big one, the broker refused
/// the whole batch and the relay dead-lettered all 11 events with "Broker: Message size too
/// large" (Kafka 4.1.1, librdkafka 2.12). Needs a real broker: the mock cluster does not enforce
/// topic configs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_broker_size_limit_dead_letters_only_the_big_event() {
    s5_broker_limit(false).await;
}

/// As `s5_broker_size_limit_dead_letters_only_the_big_event`, with the big event and the 10
/// small ones written in one transaction: one reservation sends them all at once to the topic's
/// single partition, so librdkafka puts them in one record batch and the broker refuses it
/// whole. Each refused event is sent again alone; only the big one is refused again and becomes
/// a dead letter (after 1 attempt); the 10 others are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_broker_size_limit_in_one_record_batch_dead_letters_only_the_big_event() {
    s5_broker_limit(true).await;
}

/// An event too large for its topic 40th in a pipelined run of 60 (one aggregate, one
/// transaction; topic `max.message.bytes` 3,000, the event 8 kB): the broker refuses the record
/// batch that holds it with events before it. Every event of that refused record batch goes
/// alone next time, so the run costs a cycle or two, not one per event before the culprit
/// (found by a breaker helper: with only the first marked, 51 cycles, 54 s and 51 fatal
/// pipelining producers for the 50th of 100). The 39 before it are delivered in order, it is a
/// dead letter after one attempt. Needs a real broker (topic configs). Fails with only the
/// first event of the refused batch sent alone (dozens of pipelining producers replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_an_oversized_event_late_in_a_pipelined_run_costs_a_cycle_not_one_per_event() {
    if support::kafka_is_mock() {
        eprintln!("s5 pipelined: skipped: the mock cluster does not enforce max.message.bytes");
        return;
    }
    support::init_tracing();
    let env = Env::named(
        "s5pipe",
        support::kafka_brokers(),
        support::postgres().await,
    );
    outbox::migrate_table(&support::connect_pg().await, &env.table, &env.channel)
        .await
        .expect("migrate");
    let topic = &env.topic;
    support::create_topic_with_config(&env.brokers, topic, 1, &[("max.message.bytes", "3000")])
        .await
        .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
    let (outbox, _acks, handle, mut reader, mut client) = run(&env, env.builder()).await;
    let events: Vec<NewEvent> = (1..=60)
        .map(|n| {
            let pad = if n == 40 {
                "x".repeat(8_000)
            } else {
                String::new()
            };
            NewEvent::new(topic, "h", "counter", json!({ "n": n, "pad": pad }))
        })
        .collect();
    let ids = insert(&outbox, &mut client, &events).await;
    let dead = support::wait_status(
        &outbox,
        &ids[39..40],
        EventStatus::Failed,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dead[0].attempts(), 1, "{}", support::brief(&dead));
    support::wait_status(
        &outbox,
        &ids[..39],
        EventStatus::Done,
        Duration::from_secs(10),
    )
    .await;
    let got = read_n(&mut reader, 39, Duration::from_secs(10)).await;
    let firsts = support::first_seen(got.iter().map(|r| r.json()["n"].as_i64().unwrap()));
    assert_eq!(
        firsts,
        (1..=39).collect::<Vec<_>>(),
        "the 39 before it, in order"
    );
    let rebuilds = outbox.stats().producer_rebuilds;
    assert!(
        rebuilds <= 3,
        "{rebuilds} producers replaced: the refused record batch's events were not all sent alone"
    );
    stop_and_join(&outbox, handle).await;
}

/// `s5_oversized` with the broker's own limit (a 200 kB event, topic limit 100,000); skipped on
/// the mock cluster, which does not enforce topic configs.
async fn s5_broker_limit(together: bool) {
    if support::kafka_is_mock() {
        eprintln!("s5 broker limit: skipped: the mock cluster does not enforce max.message.bytes");
        return;
    }
    s5_oversized(200_000, "100000", together).await;
}

/// `big` bytes of payload for the big event, `topic_limit` as the topic's `max.message.bytes`;
/// `together`: the big event and the small ones in one transaction (else two).
async fn s5_oversized(big: usize, topic_limit: &str, together: bool) {
    support::init_tracing();
    let env = Env::named("s5", support::kafka_brokers(), support::postgres().await);
    outbox::migrate_table(&support::connect_pg().await, &env.table, &env.channel)
        .await
        .expect("migrate");
    let topic = &env.topic;
    if support::kafka_is_mock() {
        // The mock cluster has no CreateTopics; the limit is the producer's anyway.
        support::create_topic(topic, 1).await;
    } else {
        support::create_topic_with_config(
            &env.brokers,
            topic,
            1,
            &[("max.message.bytes", topic_limit)],
        )
        .await
        .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
    }
    let (outbox, mut acks, handle, mut reader, mut client) = run(&env, env.builder()).await;
    let t = env.topic.as_str();

    let big = NewEvent::new(t, "big", "blob.stored", json!({ "blob": "x".repeat(big) }));
    let started = Instant::now();
    let normal: Vec<NewEvent> = (0..10).map(|i| ev(t, &format!("n-{i}"), i)).collect();
    let (big_id, normal_ids) = if together {
        let all: Vec<NewEvent> = std::iter::once(big).chain(normal).collect();
        let ids = insert(&outbox, &mut client, &all).await;
        (ids[0], ids[1..].to_vec())
    } else {
        let big_id = insert(&outbox, &mut client, &[big]).await[0];
        (big_id, insert(&outbox, &mut client, &normal).await)
    };

    let got = read_n(&mut reader, 10, Duration::from_secs(10)).await;
    let took = started.elapsed();
    let mut keys: Vec<&str> = got.iter().map(ConsumedRecord::key_str).collect();
    keys.sort_unstable();
    let mut expected: Vec<String> = (0..10).map(|i| format!("n-{i}")).collect();
    expected.sort_unstable();
    assert_eq!(keys, expected, "the 10 normal events, not the big one");
    assert!(
        took < Duration::from_secs(10),
        "normal events went out in {took:?}"
    );
    support::wait_status(
        &outbox,
        &normal_ids,
        EventStatus::Done,
        Duration::from_secs(10),
    )
    .await;

    let failure = next_failure(&mut acks, Duration::from_secs(10)).await;
    assert_eq!(failure.event_id(), big_id, "{failure:?}");
    assert!(
        failure.is_dead_letter(),
        "too large is permanent: {failure:?}"
    );
    let dead = support::wait_status(
        &outbox,
        &[big_id],
        EventStatus::Failed,
        Duration::from_secs(10),
    )
    .await;
    let error = dead[0].last_error().expect("last_error").to_lowercase();
    assert!(
        error.contains("size") || error.contains("too large"),
        "error mentions size: {error}"
    );
    assert_eq!(dead[0].attempts(), 1);

    // Not retried: several poll intervals later nothing more is published and attempts stay 1.
    reader.assert_idle(Duration::from_secs(3)).await;
    let dead = support::wait_status(
        &outbox,
        &[big_id],
        EventStatus::Failed,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(
        dead[0].attempts(),
        1,
        "not retried: {}",
        support::brief(&dead)
    );
    let stats = outbox.stats();
    assert_eq!(
        (stats.delivered, stats.dead_lettered, stats.retried),
        (10, 1, 0),
        "{stats:?}"
    );
    stop_and_join(&outbox, handle).await;
}

// ----------------------------------------------------------------------------------------------
// S6 — bad or missing topic
// ----------------------------------------------------------------------------------------------

fn assert_invalid_topic(result: outbox::Result<impl std::fmt::Debug>, what: &str) -> String {
    match result {
        Err(Error::InvalidEvent { field, reason }) => {
            assert_eq!(field, "event_topic", "{what}: {reason}");
            reason
        }
        other => panic!("{what}: expected InvalidEvent(event_topic), got {other:?}"),
    }
}

/// `orders events!` and a 250-character topic are refused by `add_new_event` and
/// `add_new_events` with `Error::InvalidEvent` on `event_topic`; nothing is written and the
/// caller's transaction stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_invalid_topics_are_rejected_at_add_new_event() {
    let env = setup("s6i", 1, None).await;
    let outbox = env.builder().connect().await.expect("connect");
    let mut client = pg(&env).await;
    let long = "a".repeat(250);
    let tx = client.transaction().await.unwrap();

    let reason = assert_invalid_topic(
        outbox
            .add_new_event(&tx, ev("orders events!", "o-1", 1))
            .await,
        "`orders events!`",
    );
    assert!(
        reason.contains("orders events!"),
        "names the topic: {reason}"
    );
    let reason = assert_invalid_topic(
        outbox.add_new_event(&tx, ev(&long, "o-1", 1)).await,
        "250 chars",
    );
    assert!(
        reason.contains("250") && reason.contains("249"),
        "names the limit: {reason}"
    );
    assert_invalid_topic(
        outbox
            .add_new_events(
                &tx,
                &[ev(&env.topic, "o-1", 1), ev("orders events!", "o-1", 2)],
            )
            .await,
        "a batch with one bad topic",
    );
    assert_invalid_topic(
        outbox
            .add_new_events(&tx, &[ev(&long, "o-1", 1), ev(&env.topic, "o-1", 2)])
            .await,
        "a batch with a 250-char topic",
    );

    // The transaction is still usable and nothing was written.
    outbox
        .add_new_event(&tx, ev(&env.topic, "o-1", 3))
        .await
        .expect("a valid event in the same transaction");
    tx.commit().await.expect("commit");
    let rows: Vec<(String, i64)> = support::pairs(
        &client,
        &format!(
            "select event_topic, (payload->>'n')::int8 from {}",
            env.table
        ),
    )
    .await;
    assert_eq!(rows, vec![(env.topic.clone(), 3)]);
}

/// Events for a valid topic that does not exist (auto-create is off on the test cluster) are
/// retried with backoff — attempts grow, `last_error` is set, they stay pending (not dead after
/// the first failures) — while events for an existing topic keep flowing, before and during
/// the retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_missing_topic_is_retried_with_backoff_while_others_flow() {
    let env = setup("s6m", 1, None).await;
    let missing = support::unique_name("s6_missing_topic");
    let (outbox, mut acks, handle, mut reader, mut client) =
        run(&env, without_auto_create(fast(env.builder()))).await;
    let t = env.topic.as_str();

    let m_ids = insert(
        &outbox,
        &mut client,
        &[ev(&missing, "m", 1), ev(&missing, "m", 2)],
    )
    .await;
    let started = Instant::now();
    let good: Vec<NewEvent> = (0..5).map(|i| ev(t, &format!("g-{i}"), i)).collect();
    insert(&outbox, &mut client, &good).await;
    read_n(&mut reader, 5, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(5));

    // The missing topic's event fails, and is retried.
    let mut failures = Vec::new();
    while failures.len() < 2 {
        let f = next_failure(&mut acks, Duration::from_secs(20)).await;
        assert_eq!(
            f.event_id(),
            m_ids[0],
            "only m's first event is tried: {f:?}"
        );
        assert!(!f.is_dead_letter(), "a missing topic is retried: {f:?}");
        failures.push(f);
    }
    assert_eq!(
        failures
            .iter()
            .map(DeliveryFailure::attempts)
            .collect::<Vec<_>>(),
        vec![1, 2],
        "{failures:?}"
    );
    let m = find_aggregate(&outbox, "m").await;
    assert_eq!(m[0].status(), EventStatus::New, "{}", support::brief(&m));
    assert!(m[0].attempts() >= 2, "{}", support::brief(&m));
    assert!(
        m[0].last_error().is_some_and(|e| !e.is_empty()),
        "{}",
        support::brief(&m)
    );
    assert!(
        m[0].next_attempt_at().is_some(),
        "scheduled for a retry: {}",
        support::brief(&m)
    );
    assert_eq!(
        (m[1].status(), m[1].attempts()),
        (EventStatus::New, 0),
        "{}",
        support::brief(&m)
    );
    let status = outbox.status().await.expect("status");
    let ms = status
        .topics
        .iter()
        .find(|s| s.topic == missing)
        .expect("missing topic listed");
    assert_eq!((ms.pending, ms.dead_letters), (2, 0), "{status:?}");

    // Still flowing while m is retried.
    let more: Vec<NewEvent> = (5..10).map(|i| ev(t, &format!("g-{i}"), i)).collect();
    let started = Instant::now();
    insert(&outbox, &mut client, &more).await;
    read_n(&mut reader, 5, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    reader.assert_idle(Duration::from_millis(300)).await;
    assert!(
        support::wait_for_topic(&env.brokers, &missing, Duration::from_millis(500))
            .await
            .is_err(),
        "the missing topic was not created"
    );
    stop_and_join(&outbox, handle).await;
}

/// The missing topic's `last_error` names the problem (unknown topic or partition), not just a
/// timeout, with the relay's own settings (`publish_timeout` 2 s). librdkafka keeps messages for
/// a topic it has not seen for `topic.metadata.propagation.max.ms` (default 30 s) before failing
/// them with "Unknown topic or partition"; unless the relay keeps that below `publish_timeout`,
/// the message just times out ("Local: Message timed out").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_missing_topic_error_names_unknown_topic() {
    let env = setup("s6e", 1, None).await;
    let missing = support::unique_name("s6_missing_topic");
    let outbox = without_auto_create(fast(env.builder()))
        .connect()
        .await
        .expect("connect");
    let mut acks = outbox.subscribe();
    let handle = outbox.start().expect("start");
    let mut client = pg(&env).await;
    let ids = insert(&outbox, &mut client, &[ev(&missing, "m", 1)]).await;
    let failure = next_failure(&mut acks, Duration::from_secs(20)).await;
    assert_eq!(failure.event_id(), ids[0]);
    let m = find_aggregate(&outbox, "m").await;
    let error = m[0].last_error().unwrap_or_default().to_lowercase();
    stop_and_join(&outbox, handle).await;
    assert!(
        error.contains("unknown topic") && error.contains("create the topic"),
        "last_error of an event for a missing topic should say the topic is unknown and what to do, got {error:?}"
    );
}

// ----------------------------------------------------------------------------------------------
// S10 (b) — one wake-up per transaction; no NOTIFY without a waiting relay
// ----------------------------------------------------------------------------------------------

/// While a relay waits (holds the wake lock), 1,000 events in one transaction — one
/// `add_new_events` call, then 1,000 `add_new_event` statements — each produce exactly one
/// notification on the channel (counted by a LISTEN connection of the test drained with
/// `poll_message`), which wakes the relay (the poll interval is 60 s). With the relay stopped,
/// and on a table no relay ever watched, an insert notifies nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s10_one_notify_per_transaction_and_none_without_a_waiting_relay() {
    let env = setup("s10", 2, None).await;
    let outbox = env
        .builder()
        .poll_interval(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect");
    let (_listener, mut notes) = support::listen(&env.pg, &env.channel).await;
    let handle = outbox.start().expect("start");
    let mut reader = reader(&env).await;
    let mut client = pg(&env).await;
    let watcher = pg(&env).await;
    let t = env.topic.as_str();
    tokio::time::sleep(Duration::from_millis(500)).await;
    support::wait_armed(&outbox, &env.table, Duration::from_secs(10)).await;
    assert_eq!(
        notifications_within(&mut notes, Duration::from_millis(300)).await,
        0
    );

    // (1) one add_new_events call of 1,000 events.
    let batch: Vec<NewEvent> = (0..1000)
        .map(|i| ev(t, &format!("a-{}", i % 50), i))
        .collect();
    insert(&outbox, &mut client, &batch).await;
    assert_one_notification(
        &mut notes,
        "exactly one notification for one transaction of 1,000 events",
    )
    .await;
    read_n(&mut reader, 1000, Duration::from_secs(30)).await;

    // (2) 1,000 add_new_event statements in one transaction.
    support::wait_armed(&outbox, &env.table, Duration::from_secs(10)).await;
    assert_eq!(
        notifications_within(&mut notes, Duration::from_millis(200)).await,
        0
    );
    let tx = client.transaction().await.unwrap();
    for i in 0..1000 {
        outbox
            .add_new_event(&tx, ev(t, &format!("b-{}", i % 50), i))
            .await
            .expect("add_new_event");
    }
    assert_eq!(
        notifications_within(&mut notes, Duration::from_millis(200)).await,
        0,
        "nothing before commit"
    );
    tx.commit().await.unwrap();
    assert_one_notification(
        &mut notes,
        "exactly one notification for 1,000 statements in one transaction",
    )
    .await;
    read_n(&mut reader, 1000, Duration::from_secs(30)).await;

    // (3) relay stopped: its wake lock is released and writers stop notifying. (Its stop sent
    // one notification of its own: the handoff to other relays on the table.)
    stop_and_join(&outbox, handle).await;
    assert_eq!(
        notifications_within(&mut notes, Duration::from_millis(500)).await,
        1,
        "the stopping relay's handoff"
    );
    support::eventually(
        Duration::from_secs(10),
        "the wake lock is released after stop",
        || async {
            match support::wake_lock_holders(&watcher, &env.table).await {
                (_, 0) => Ok(()),
                held => Err(format!("{held:?}")),
            }
        },
    )
    .await;
    insert(&outbox, &mut client, &[ev(t, "c", 1)]).await;
    assert_eq!(
        notifications_within(&mut notes, Duration::from_millis(1500)).await,
        0,
        "no relay waits: no NOTIFY"
    );

    // (4) a table no relay ever ran on.
    let quiet = setup("s10q", 1, None).await;
    let (_l2, mut quiet_notes) = support::listen(&quiet.pg, &quiet.channel).await;
    let writer = outbox::Writer::new(&quiet.table).unwrap();
    let tx = client.transaction().await.unwrap();
    writer
        .add_new_event(&tx, ev(&quiet.topic, "q", 1))
        .await
        .unwrap();
    writer
        .add_new_events(&tx, &[ev(&quiet.topic, "q", 2), ev(&quiet.topic, "q", 3)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        notifications_within(&mut quiet_notes, Duration::from_millis(1500)).await,
        0,
        "no relay: no NOTIFY"
    );
}

// ----------------------------------------------------------------------------------------------
// S11 — table bloat
// ----------------------------------------------------------------------------------------------

/// `analyze`, then the plan of the relay's own reservation statement (for 1,000 rows), under the
/// relay's batch-session settings.
async fn reserve_plan(client: &tokio_postgres::Client, table: &str) -> String {
    client
        .batch_execute(&format!("analyze {table}"))
        .await
        .unwrap();
    let sql = outbox::testing::relay_sql(table, false);
    // `set` inside a transaction that rolls back leaves the session as it was.
    client
        .batch_execute(&format!("begin; {}", sql.session_setup))
        .await
        .unwrap();
    let plan = explain(
        client,
        &sql.reserve
            .replace("$1", "1000")
            .replace("$2", "16777216")
            .replace("$3", "(-9223372036854775807 - 1)")
            .replace("$4", "'{}'")
            .replace("$5", "(-1)")
            .replace("$6", "'{}'::text[]"),
    )
    .await;
    client.batch_execute("rollback").await.unwrap();
    plan
}

/// The lines of `explain <statement>`, joined.
async fn explain(client: &tokio_postgres::Client, statement: &str) -> String {
    client
        .query(&format!("explain {statement}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The relay's confirm reads the table by primary key however many delivered rows it keeps: on
/// 30,000 `done` rows and a 500-row batch, the planner on its own prefers a sequential scan of
/// every row into a hash join (a confirm's cost then grows with the table, up to hundreds of
/// thousands of rows for a 1,000-row batch); the relay's `confirm_setup`, sent before the confirm
/// in its transaction, keeps it on the primary key. The plan of a custom plan with the batch's
/// values, as the relay's sessions plan it (`plan_cache_mode = force_custom_plan`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confirm_reads_by_primary_key_however_many_rows_are_kept() {
    let client = support::connect_pg().await;
    let table = support::unique_name("confirmplan");
    outbox::migrate_table(&client, &table, "outbox")
        .await
        .unwrap_or_else(|e| panic!("migrating {table}: {e}"));
    client
        .batch_execute(&format!(
            "insert into {table} (aggregate_id, event_topic, event_type, payload, status, published_at)
               select 'a' || (g % 1000), 't', 'x', '{{}}', 'done', now()
                 from generate_series(1, 30000) g;
             insert into {table} (aggregate_id, event_topic, event_type, payload)
               select 'a' || g, 't', 'x', '{{}}' from generate_series(1, 500) g;
             analyze {table}"
        ))
        .await
        .unwrap();
    let ids: Vec<String> = client
        .query(
            &format!("select id::text from {table} where status = 'new'"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let n = ids.len();
    assert_eq!(n, 500);
    let sql = outbox::testing::relay_sql(&table, false);
    let plan = |setup: String| {
        let (client, sql, ids) = (&client, &sql, &ids);
        async move {
            // Everything in a transaction that rolls back: the session and the rows stay as they
            // were.
            client
                .batch_execute(&format!(
                    "begin; {}; {setup}; prepare confirm_plan as {}",
                    sql.session_setup, sql.confirm
                ))
                .await
                .unwrap();
            let array = |v: String| {
                format!(
                    "'{{{}}}'",
                    std::iter::repeat_n(v, n).collect::<Vec<_>>().join(",")
                )
            };
            let plan = explain(
                client,
                &format!(
                    "execute confirm_plan('{{{}}}', {}, {}, {}, {}, {}, '{}')",
                    ids.join(","),
                    array("1".into()),
                    array("0".into()),
                    array("7".into()),
                    array("NULL".into()),
                    array("0".into()),
                    uuid::Uuid::new_v4()
                ),
            )
            .await;
            client
                .batch_execute("deallocate confirm_plan; rollback")
                .await
                .unwrap();
            plan
        }
    };
    let own = plan("select 1".into()).await;
    assert!(
        own.contains(&format!("Seq Scan on {table} ")),
        "the premise: on its own the planner scans the whole table:\n{own}"
    );
    let relay = plan(sql.confirm_setup.clone()).await;
    assert!(
        relay.contains(&format!("Index Scan using {table}_pkey"))
            && !relay.contains(&format!("Seq Scan on {table} ")),
        "the relay's confirm reads by primary key:\n{relay}"
    );
}

/// `connect()` analyzes a table Postgres never analyzed (a fresh or restored table before
/// autovacuum's first analyze), whose reservation plans are quadratic in the batch: after it,
/// `pg_class.reltuples` is set and the reservation's `kept` join is no nested loop over the
/// candidates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_analyzes_a_table_postgres_never_analyzed() {
    let mock = MockKafka::start(1).unwrap();
    let db = support::fresh_database().await;
    let env = setup_in("neveranalyzed", 1, Some(&mock), db).await;
    let client = pg(&env).await;
    let table = env.table.as_str();
    // No autovacuum on it during the test: only connect() may analyze it. `migrate` analyzed
    // the new table; a restored or upgraded one has never been: as pg_restore leaves it.
    client
        .batch_execute(&format!(
            "alter table {table} set (autovacuum_enabled = false);
             update pg_class set reltuples = -1, relpages = 0 where oid = '{table}'::regclass;
             insert into {table} (aggregate_id, event_topic, event_type, payload)
               select 'a' || g, 't', 'x', '{{}}' from generate_series(1, 5000) g"
        ))
        .await
        .unwrap();
    let reltuples = || async {
        client
            .query_one(
                "select reltuples::float8 from pg_class where oid = to_regclass($1::text)",
                &[&table],
            )
            .await
            .unwrap()
            .get::<_, f64>(0)
    };
    assert!(reltuples().await < 0.0, "the premise: never analyzed");
    let outbox = env.builder().connect().await.expect("connect");
    assert!(
        reltuples().await >= 1000.0,
        "connect() analyzed the table: reltuples {}",
        reltuples().await
    );
    drop(outbox);
}

/// A migrated table in a database of its own (its statistics are the test's alone), with
/// autovacuum off on it, and a client.
async fn without_autovacuum(prefix: &str) -> (Env, tokio_postgres::Client) {
    let db = support::fresh_database().await;
    let env = setup_in(prefix, 2, None, db).await;
    let client = pg(&env).await;
    client
        .batch_execute(&format!(
            "alter table {} set (autovacuum_enabled = false)",
            env.table
        ))
        .await
        .unwrap();
    (env, client)
}

/// A running relay analyzes its table once the table has grown well past the size its
/// statistics describe (here: analyzed empty at connect, then 20,000 events committed at once,
/// autovacuum off on it), so that its reservations are not planned for the empty table until
/// autovacuum's next pass; every event is then delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_analyzes_a_table_that_outgrew_its_statistics() {
    let (env, client) = without_autovacuum("outgrew").await;
    let table = env.table.as_str();
    let outbox = env.builder().connect().await.expect("connect");
    let relpages = || async {
        client
            .query_one(
                "select relpages::int8 from pg_class where oid = to_regclass($1::text)",
                &[&table],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(
        relpages().await,
        0,
        "the premise: analyzed empty at connect"
    );
    let handle = outbox.start().unwrap();
    let events = 20_000;
    client
        .batch_execute(&format!(
            "insert into {table} (aggregate_id, event_topic, event_type, payload)
               select 'a' || (g % 100), '{}', 'x', jsonb_build_object('n', g)
                 from generate_series(1, {events}) g",
            env.topic
        ))
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the relay analyzed the grown table",
        || async {
            match relpages().await {
                p if p >= 128 => Ok(()),
                p => Err(format!("relpages {p}")),
            }
        },
    )
    .await;
    let records =
        outbox::testing::consume_all(&env.brokers, &env.topic, events, Duration::from_secs(30))
            .await;
    assert_eq!(records.len(), events);
    support::stop_and_join(&outbox, handle).await;
}

/// A burst committed in one transaction while the relay runs: the table's pages grow while the
/// transaction is open, and the relay's `ANALYZE` then counts none of its rows (Postgres does not
/// count another transaction's uncommitted inserts), so the table was planned as thousands of
/// empty pages; its pages did not double again after the commit, and the relay did not analyze
/// it again (autovacuum is off here; in the benchmark's burst: 16k events/s instead of 40k).
/// Committed rows outgrowing the statistics now trigger an `ANALYZE` too: after the commit,
/// `reltuples` describes the 20,000 rows (checked: without that rule it stayed 0). The rows are
/// written not due (as retries in backoff) until then, so that no confirm grows the table's
/// pages meanwhile (the pages' rule would analyze it once delivered rows doubled them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_committed_in_one_transaction_is_analyzed_after_its_commit() {
    let (env, client) = without_autovacuum("burststats").await;
    let table = env.table.as_str();
    let outbox = env.builder().connect().await.expect("connect");
    let handle = outbox.start().unwrap();
    // Pages measured, rows measured, pages now.
    let measured = || async {
        let r = client
            .query_one(
                "select relpages::int8, reltuples::int8,
                        pg_relation_size(oid) / current_setting('block_size')::int8
                   from pg_class where oid = to_regclass($1::text)",
                &[&table],
            )
            .await
            .unwrap();
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2))
    };
    let events = 20_000;
    let mut writer = pg(&env).await;
    let tx = writer.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "insert into {table} (aggregate_id, event_topic, event_type, payload, next_attempt_at)
           select 'a' || (g % 100), '{}', 'x', jsonb_build_object('n', g), now() + interval '1 hour'
             from generate_series(1, {events}) g",
        env.topic
    ))
    .await
    .unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the premise: the relay analyzed the whole uncommitted burst",
        || async {
            match measured().await {
                (p, _, now) if p >= 128 && p == now => Ok(()),
                m => Err(format!("relpages, reltuples, pages now {m:?}")),
            }
        },
    )
    .await;
    assert!(
        measured().await.1 < 1_000,
        "none of the uncommitted rows counted"
    );
    tx.commit().await.unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the relay analyzed the table again after the commit",
        || async {
            match measured().await {
                (_, rows, _) if rows >= events * 9 / 10 => Ok(()),
                m => Err(format!("relpages, reltuples, pages now {m:?}")),
            }
        },
    )
    .await;
    client
        .batch_execute(&format!("update {table} set next_attempt_at = null"))
        .await
        .unwrap();
    let records = outbox::testing::consume_all(
        &env.brokers,
        &env.topic,
        events as usize,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records.len(), events as usize);
    support::stop_and_join(&outbox, handle).await;
}

/// While the grown table is locked against `ANALYZE` (a `VACUUM`, another `ANALYZE`, `CREATE
/// INDEX CONCURRENTLY` — here a transaction holding `SHARE UPDATE EXCLUSIVE`), the relay's
/// skipped `ANALYZE` (Postgres only warns) is not repeated every 2 s: it pauses (30 s first).
/// Counted in the server's log, on a server of the test's own; events keep flowing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_analyze_of_a_locked_table_is_not_repeated_every_check() {
    let server = outbox::testing::TestPostgres::start().await.unwrap();
    let env = setup_in("locked", 1, None, server.config()).await;
    let client = pg(&env).await;
    let table = env.table.as_str();
    client
        .batch_execute(&format!(
            "alter table {table} set (autovacuum_enabled = false);
             insert into {table} (aggregate_id, event_topic, event_type, payload, status)
               select 'a' || g, '{}', 'x', jsonb_build_object('n', g), 'done'
                 from generate_series(1, 20000) g",
            env.topic
        ))
        .await
        .unwrap();
    let locker = pg(&env).await;
    locker
        .batch_execute(&format!(
            "begin; lock table {table} in share update exclusive mode"
        ))
        .await
        .unwrap();
    let outbox = env.builder().connect().await.expect("connect");
    let handle = outbox.start().unwrap();
    // Three checks' worth while the lock is held; an event still goes out.
    let mut c = pg(&env).await;
    let ids = insert(&outbox, &mut c, &[ev(&env.topic, "b", 1)]).await;
    let records =
        outbox::testing::consume_all(&env.brokers, &env.topic, 1, Duration::from_secs(30)).await;
    assert_eq!(
        records[0].header("event_id"),
        Some(ids[0].to_string().as_str())
    );
    tokio::time::sleep(Duration::from_secs(7)).await;
    let skipped = server.log().matches("skipping analyze of").count();
    locker.batch_execute("rollback").await.unwrap();
    stop_and_join(&outbox, handle).await;
    assert!(
        (1..=2).contains(&skipped),
        "the relay tried, was skipped, and paused: {skipped} skipped ANALYZEs in the server's log"
    );
}

async fn table_size(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(
            "select pg_total_relation_size($1::text::regclass)",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

async fn count_status(client: &tokio_postgres::Client, table: &str, status: &str) -> i64 {
    client
        .query_one(
            &format!("select count(*) from {table} where status = $1"),
            &[&status],
        )
        .await
        .unwrap()
        .get(0)
}

/// Scaled down from 200k to 20k events for test time. In its own database (so that other
/// tests' transactions do not hold back vacuum): 20k events are published while another session
/// holds a REPEATABLE READ snapshot; after it is released, 10 cycles of 2k events (publish,
/// retention cleanup with retention 1 s and batches of 500, vacuum) keep the table's total size
/// flat; cleanup never deletes a dead letter, the pending events blocked behind it, or a pending
/// event waiting for a retry; the reservation query uses the partial index `<table>_pending_idx`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s11_table_stays_flat_and_cleanup_keeps_pending_and_failed_rows() {
    const SNAPSHOT_EVENTS: usize = 20_000;
    const CYCLE_EVENTS: usize = 2_000;
    const CYCLES: usize = 10;
    const AGGREGATES: usize = 2_000;

    let db = support::fresh_database().await;
    let env = setup_in("s11", 4, None, db).await;
    let outbox = env
        .builder()
        .retention(Duration::from_secs(1))
        .cleanup(Duration::from_millis(200), 500)
        .connect()
        .await
        .expect("connect");
    let handle = outbox.start().expect("start");
    let mut client = pg(&env).await;
    let t = env.topic.as_str();
    let table = env.table.as_str();

    // Rows cleanup must keep: a dead letter (a payload above the producer's 1 MB limit), the
    // pending events blocked behind it, and a pending event waiting for its retry tomorrow.
    let dead = NewEvent::new(
        t,
        "dead",
        "blob.stored",
        json!({ "blob": "x".repeat(1_100_000) }),
    );
    let mut keep = insert(
        &outbox,
        &mut client,
        &[dead, ev(t, "dead", 2), ev(t, "dead", 3)],
    )
    .await;
    support::wait_status(
        &outbox,
        &keep[..1],
        EventStatus::Failed,
        Duration::from_secs(15),
    )
    .await;
    {
        let tx = client.transaction().await.unwrap();
        let id = outbox.add_new_event(&tx, ev(t, "later", 1)).await.unwrap();
        tx.execute(
            &format!("update {table} set next_attempt_at = now() + interval '1 day' where id = $1"),
            &[&id],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        keep.push(id);
    }

    let plan = |round: usize, n: usize| -> Vec<Vec<NewEvent>> {
        (0..n)
            .map(|i| {
                ev(
                    t,
                    &format!("a{:04}", i % AGGREGATES),
                    (round * n + i) as i64,
                )
            })
            .collect::<Vec<_>>()
            .chunks(1000)
            .map(<[NewEvent]>::to_vec)
            .collect()
    };
    let wait_delivered = |target: u64| {
        let outbox = &outbox;
        async move {
            support::eventually(
                Duration::from_secs(300),
                &format!("{target} events delivered"),
                || async {
                    let s = outbox.stats();
                    if s.delivered >= target {
                        Ok(())
                    } else {
                        Err(format!("{s:?}"))
                    }
                },
            )
            .await
        }
    };

    // 1. 20k events while a REPEATABLE READ snapshot is held.
    let snapshot = pg(&env).await;
    snapshot
        .batch_execute(&format!(
            "begin isolation level repeatable read; select 1 from {table} limit 1"
        ))
        .await
        .unwrap();
    let size_before = table_size(&client, table).await;
    for chunk in plan(0, SNAPSHOT_EVENTS) {
        insert(&outbox, &mut client, &chunk).await;
    }
    wait_delivered(SNAPSHOT_EVENTS as u64).await;
    let size_with_snapshot = table_size(&client, table).await;
    // The reservation uses the partial index on pending rows (asked while the table is large
    // and bloated: on the few-row table left at the end, a sequential scan is rightly cheaper).
    let plan_text = reserve_plan(&client, table).await;
    assert!(
        plan_text.contains(&format!("{table}_pending_idx")),
        "the reservation should use {table}_pending_idx:\n{plan_text}"
    );
    snapshot.batch_execute("commit").await.unwrap();

    // 2. Publish + cleanup cycles.
    let mut sizes = Vec::new();
    for cycle in 1..=CYCLES {
        for chunk in plan(cycle, CYCLE_EVENTS) {
            insert(&outbox, &mut client, &chunk).await;
        }
        wait_delivered((SNAPSHOT_EVENTS + cycle * CYCLE_EVENTS) as u64).await;
        let c = &client;
        support::eventually(
            Duration::from_secs(60),
            &format!("cycle {cycle}: delivered rows cleaned up"),
            || async {
                match count_status(c, table, "done").await {
                    0 => Ok(()),
                    n => Err(format!("{n} done rows left")),
                }
            },
        )
        .await;
        client
            .batch_execute(&format!("vacuum {table}"))
            .await
            .unwrap();
        sizes.push(table_size(&client, table).await);
    }
    eprintln!(
        "s11: size before {size_before}, with snapshot {size_with_snapshot}, after each cycle {sizes:?}"
    );
    let baseline = sizes[1];
    for (i, &s) in sizes.iter().enumerate().skip(2) {
        assert!(
            s as f64 <= baseline as f64 * 1.5,
            "table grows: after cycle {} {s} bytes > 1.5 × {baseline} (after cycle 2); all: {sizes:?}",
            i + 1
        );
    }

    // Cleanup kept the dead letter, the events behind it and the one in backoff, untouched.
    let kept = outbox
        .find(&EventFilter::new().ids(keep.iter().copied()))
        .await
        .unwrap();
    assert_eq!(
        kept.iter()
            .map(|e| (e.id(), e.status()))
            .collect::<Vec<_>>(),
        vec![
            (keep[0], EventStatus::Failed),
            (keep[1], EventStatus::New),
            (keep[2], EventStatus::New),
            (keep[3], EventStatus::New),
        ],
        "{}",
        support::brief(&kept)
    );
    let all = support::count_rows(&client, table, "").await;
    assert_eq!(all, 4, "only the kept rows remain");

    stop_and_join(&outbox, handle).await;
    // Everything published exactly once (the dead letter and the rows behind it never).
    let total = SNAPSHOT_EVENTS + CYCLES * CYCLE_EVENTS;
    let records =
        support::assert_nothing_more(&env.brokers, t, total, Duration::from_secs(1)).await;
    let ids: HashSet<Uuid> = records.iter().map(event_id_of).collect();
    assert_eq!(ids.len(), total, "no duplicates");
    assert!(records
        .iter()
        .all(|r| r.key_str() != "dead" && r.key_str() != "later"));
}

// ----------------------------------------------------------------------------------------------
// Lease validation
// ----------------------------------------------------------------------------------------------

/// `lease(10 s)` with `publish_timeout(8 s)` leaves less than the 5 s margin: `connect()` refuses
/// it with one problem naming `lease`; `lease(13 s)` is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_shorter_than_publish_timeout_plus_margin_is_rejected() {
    let env = setup("lease", 1, None).await;
    let err = env
        .builder()
        .publish_timeout(Duration::from_secs(8))
        .lease(Duration::from_secs(10))
        .connect()
        .await
        .expect_err("lease 10 s with publish_timeout 8 s must be refused");
    let problems = match err {
        Error::Config(c) => c.problems().to_vec(),
        other => panic!("expected Error::Config, got {other:?}"),
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("lease"),
        "names lease: {problems:?}"
    );
    assert!(problems[0].contains("publish_timeout"), "{problems:?}");

    env.builder()
        .publish_timeout(Duration::from_secs(8))
        .lease(Duration::from_secs(13))
        .connect()
        .await
        .expect("lease 13 s with publish_timeout 8 s is valid");
}

/// A gated backlog split three ways, whose groups drain at different times: three slots, and
/// aggregates of very different sizes (a few events to hundreds), so that a group runs dry while
/// the others' batches are in flight and the backlog is split again, into fewer groups, from the
/// last batch. A batch of the earlier split that finishes then belongs to none of the new split's
/// groups: it must neither stop the relay (its group indexed the new split's scans, out of range
/// with fewer groups) nor mark a new group free. Every event arrives, in order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_backlog_split_again_into_fewer_groups_keeps_running() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("resplit", |b| {
        b.batch_size(40)
            .max_batches_in_flight(3)
            .publish_timeout(Duration::from_secs(10))
            .lease(Duration::from_secs(20))
    })
    .await;
    let mut reader = reader(&env).await;
    kafka
        .broker_round_trip_time(1, Duration::from_millis(50))
        .expect("delay the broker");
    let sizes: [i64; 8] = [300, 5, 200, 3, 120, 60, 8, 150];
    let total: i64 = sizes.iter().sum();
    let events = interleaved(&env.topic, "R", &sizes);
    let ids = insert(&outbox, &mut client, &events).await;
    // (About 3 s on the mock broker.)
    support::wait_status(&outbox, &ids, EventStatus::Done, Duration::from_secs(30)).await;
    assert!(
        !handle.is_finished(),
        "the relay stopped while draining the backlog"
    );
    let got = read_n(
        &mut reader,
        usize::try_from(total).expect("a count") + 1,
        Duration::from_secs(20),
    )
    .await;
    let by_key = counters_by_key(&got);
    for (a, &size) in sizes.iter().enumerate() {
        assert_eq!(
            by_key.get(&format!("R{a}")),
            Some(&(1..=size).collect::<Vec<i64>>()),
            "aggregate R{a}"
        );
    }
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    stop_and_join(&outbox, handle).await;
}

/// A panic of the relay (a bug; injected with `panic_the_relay_of`) while batches hold messages
/// in flight on a broker 300 ms away, three slots: the relay stops with `Error::Panicked`, counts
/// nothing in flight any more (its batches went with the pipeline: what the producers held is
/// purged, so no retry of it lands after the next relay published the rows again), and ends the
/// stream subscribed before the panic. A new relay on the same table, with the old handle and its
/// producers still alive, delivers every event: nothing lost, order kept per aggregate,
/// duplicates only as contiguous replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_panics_with_messages_in_flight_loses_nothing() {
    let configure = |b: OutboxBuilder| {
        b.batch_size(20)
            .max_batches_in_flight(3)
            .publish_timeout(Duration::from_secs(5))
            .batch_timeout(Duration::from_secs(1))
            .lease(Duration::from_secs(20))
    };
    let (kafka, env, outbox, handle, mut client) =
        warm_relay_on_mock("panicinflight", configure).await;
    let mut reader = reader(&env).await;
    let mut acks = outbox.subscribe();
    kafka
        .broker_round_trip_time(1, Duration::from_millis(300))
        .expect("delay the broker");
    let sizes: [i64; 8] = [200, 3, 150, 40, 100, 7, 80, 1];
    let events = interleaved(&env.topic, "P", &sizes);
    let ids = insert(&outbox, &mut client, &events).await;
    support::eventually(Duration::from_secs(30), "some events delivered", || async {
        match outbox.stats() {
            s if s.delivered > 60 && s.in_flight > 0 => Ok(()),
            s => Err(format!(
                "delivered {}, in flight {}",
                s.delivered, s.in_flight
            )),
        }
    })
    .await;
    outbox::testing::faults::panic_the_relay_of(&env.table);
    let ended = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the relay ends after its panic")
        .expect("the relay task itself did not panic");
    assert!(matches!(ended, Err(Error::Panicked(_))), "{ended:?}");
    assert_eq!(
        outbox.stats().in_flight,
        0,
        "messages still counted in flight after the panic"
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while acks.next().await.is_some() {}
    })
    .await
    .expect("the stream subscribed before the panic ends");
    let again = configure(env.builder()).connect().await.expect("connect");
    let relay = again.start().expect("start");
    support::wait_status(&again, &ids, EventStatus::Done, Duration::from_secs(90)).await;
    kafka
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("undelay the broker");
    // Everything there is: the warm-up event, the events, and any replays.
    let got = reader.read(usize::MAX, Duration::from_secs(5)).await;
    let by_key = counters_by_key(&got);
    for (a, &size) in sizes.iter().enumerate() {
        let aggregate = format!("P{a}");
        let seen = by_key.get(&aggregate).cloned().unwrap_or_default();
        assert_order_with_contiguous_replays(&aggregate, &seen, &(1..=size).collect::<Vec<_>>());
    }
    stop_and_join(&again, relay).await;
}

/// Events of aggregates `{prefix}0`, `{prefix}1`, … with `sizes[a]` events each (counters
/// 1..=size), interleaved: every aggregate's n-th event before any (n+1)-th.
fn interleaved(topic: &str, prefix: &str, sizes: &[i64]) -> Vec<NewEvent> {
    let longest = sizes.iter().copied().max().unwrap_or(0);
    (1..=longest)
        .flat_map(|n| {
            (sizes.iter().enumerate())
                .filter(move |&(_, &size)| n <= size)
                .map(move |(a, _)| ev(topic, &format!("{prefix}{a}"), n))
        })
        .collect()
}

/// A delivery report that says "delivered" without an offset is no proof that the event is in
/// Kafka: librdkafka infers such deliveries (a request with an uncertain outcome followed by a
/// successful one; a retry answered DUPLICATE_SEQUENCE_NUMBER), and in a chaos run on a 3-node
/// Apache Kafka cluster 8 events so reported (offset -1001) were in no partition after leader
/// kills. The relay sends such an event again (a duplicate at worst, as a contiguous replay)
/// and records only a delivery with an offset. Here the mock cluster answers a Produce request
/// with DUPLICATE_SEQUENCE_NUMBER without writing it (librdkafka reports offset -1 for the
/// first message and -1 + i for the i-th of that request): a lone event, then a hot
/// aggregate's pipelined run (whose later messages look delivered with offsets 0, 1, …), must
/// each reach the topic, in order, with a real offset in their rows. Fails with the offset
/// check removed (the lone event is done at offset -1, not in the topic) and with the run's
/// replay removed (H 2–30 done, not in the topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_report_without_an_offset_is_no_delivery() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("nooffset", |b| {
        b.publish_timeout(Duration::from_secs(10))
            .batch_timeout(Duration::from_secs(1))
            .lease(Duration::from_secs(20))
            .retry_backoff(Duration::from_millis(100), Duration::from_millis(500))
    })
    .await;
    let mut reader = reader(&env).await;
    let t = env.topic.as_str();
    let duplicate = RDKafkaRespErr::RD_KAFKA_RESP_ERR_DUPLICATE_SEQUENCE_NUMBER;

    fail_next_produce(&kafka, duplicate);
    let lone = insert(&outbox, &mut client, &[ev(t, "L", 1)]).await;
    let done =
        support::wait_status(&outbox, &lone, EventStatus::Done, Duration::from_secs(60)).await;
    assert_offsets_recorded(&done);

    fail_next_produce(&kafka, duplicate);
    let hot = insert(&outbox, &mut client, &counters(t, "H", 1..=30)).await;
    let done =
        support::wait_status(&outbox, &hot, EventStatus::Done, Duration::from_secs(60)).await;
    assert_offsets_recorded(&done);

    // Every record up to the last event's offset: the warm-up event, L and H's 30, with any
    // replays.
    let last = done.iter().filter_map(|e| e.offset()).max().unwrap();
    let got = reader
        .read(last as usize + 1, Duration::from_secs(20))
        .await;
    let by_key = counters_by_key(&got);
    assert_eq!(by_key.get("L"), Some(&vec![1]), "{got:#?}");
    assert_order_with_contiguous_replays(
        "H",
        by_key.get("H").map(Vec::as_slice).unwrap_or_default(),
        &(1..=30).collect::<Vec<i64>>(),
    );
    stop_and_join(&outbox, handle).await;
}

/// Asserts that every event of `done` has the partition and offset Kafka gave it.
fn assert_offsets_recorded(done: &[Event]) {
    let without: Vec<_> = done
        .iter()
        .filter(|e| e.offset().is_none_or(|o| o < 0))
        .map(|e| (e.seq(), e.partition(), e.offset()))
        .collect();
    assert!(
        without.is_empty(),
        "delivered without an offset (seq, partition, offset): {without:?}"
    );
}

/// A relay stopping while its pipelined messages wait for their partition's leader still purges
/// them `publish_timeout` after their batch ended, before their holds end, as it does while it
/// runs: its stop flushes its producers until the stop's deadline, which may come after the
/// holds, and the pipelining producer retries without end, so a message was written after
/// another relay had published the events again and newer ones of their aggregate (found by a
/// breaker helper: 13 order violations in chaos runs on a 3-node Kafka cluster, each from a relay
/// stopped while waiting for Kafka). Here the broker is down from before the batch until 3 s
/// into an 8 s stop (the holds end about 2.3 s after the batch started): nothing of the batch may
/// reach the topic from the stopping relay; a new relay then publishes each event once, in order.
/// Fails without the purge at stop (the five events are written when the broker comes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_relay_writes_nothing_after_its_holds_end() {
    let (kafka, env, outbox, handle, mut client) = warm_relay_on_mock("stoppipe", |b| {
        b.publish_timeout(Duration::from_secs(1))
            .batch_timeout(Duration::from_millis(300))
            .lease(Duration::from_secs(10))
            .shutdown_timeout(Duration::from_secs(8))
    })
    .await;
    let mut reader = reader(&env).await;
    let t = env.topic.as_str();
    kafka.broker_down(1).expect("broker down");
    let ids = insert(&outbox, &mut client, &counters(t, "S", 1..=5)).await;
    // The batch ends (300 ms) with its five messages queued on the pipelining producer.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let purges = outbox.stats().pipelining_purges;
    let broker_back = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        kafka.broker_up(1).expect("broker up");
    };
    let stopped = async {
        outbox
            .stop(Duration::from_secs(8))
            .await
            .expect("the relay stops");
        handle
            .await
            .unwrap()
            .expect("the relay ended without error");
    };
    tokio::join!(broker_back, stopped);
    assert_eq!(
        outbox.stats().pipelining_purges - purges,
        1,
        "the pipelining producer purged while stopping"
    );
    // Only the warm-up event: nothing of the batch was written by the stopped relay.
    let got = reader.read(6, Duration::from_secs(3)).await;
    assert_eq!(
        counters_by_key(&got).get("S"),
        None,
        "written after the holds ended: {got:#?}"
    );
    // On loaded cores the reader may not have reached the warm-up event yet (its broker was
    // back only 3 s into the stop): it comes before the batch's then (a CI run saw it so).
    let warm_up_unread = !counters_by_key(&got).contains_key("W");
    // Another relay publishes them, each once and in order.
    let next = env.builder().connect().await.expect("connect");
    let next_handle = next.start().expect("start");
    support::wait_status(&next, &ids, EventStatus::Done, Duration::from_secs(30)).await;
    let got = reader
        .read(5 + usize::from(warm_up_unread), Duration::from_secs(10))
        .await;
    assert_eq!(
        counters_by_key(&got).get("S"),
        Some(&(1..=5).collect::<Vec<i64>>()),
        "{got:#?}"
    );
    stop_and_join(&next, next_handle).await;
}
