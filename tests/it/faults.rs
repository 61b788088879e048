//! Failure scenarios S1, S2, S8, S9 and S12 of `SCENARIOS.md`: real Postgres, a real
//! Kafka-protocol broker (`support::kafka_brokers()`) or a private `MockKafka` where a Kafka
//! fault is injected, and every outcome read back with a real rdkafka consumer.
//!
//! S2 and S12c (child variant) run the `outbox-relay` binary in a child process
//! ([`support::ChildRelay`]) so that it can be SIGKILLed / SIGTERMed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::{NewEvent, Outbox, OutboxBuilder, Writer};
use serde_json::json;
use uuid::Uuid;

use crate::support::ChildRelay;
use crate::support::{self, ConsumedRecord, MockKafka, TopicReader};

// ----------------------------------------------------------------------------------------------
// Local helpers
// ----------------------------------------------------------------------------------------------

/// Unique table, channel and topic names for one test.
struct Names {
    table: String,
    channel: String,
    topic: String,
}

fn names(prefix: &str) -> Names {
    Names {
        table: support::unique_name(&format!("{prefix}_t")),
        channel: support::unique_name(&format!("{prefix}_c")),
        topic: support::unique_name(&format!("{prefix}_topic")),
    }
}

/// The start every test here shares: tracing on, the Kafka to use, fresh names, a Postgres
/// client, the outbox table (and its channel) migrated and the topic created with `partitions`.
async fn setup(prefix: &str, partitions: i32) -> (String, Names, tokio_postgres::Client) {
    support::init_tracing();
    let brokers = support::kafka_brokers();
    let n = names(prefix);
    let client = support::connect_pg().await;
    outbox::migrate_table(&client, &n.table, &n.channel)
        .await
        .unwrap();
    support::create_topic(&n.topic, partitions).await;
    (brokers, n, client)
}

/// Writes `events` into `table` and returns their ids.
async fn insert(
    client: &tokio_postgres::Client,
    table: &str,
    events: &[NewEvent],
) -> HashSet<Uuid> {
    Writer::new(table)
        .unwrap()
        .add_new_events(client, events)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Relay A of the lease tests: an `outbox-relay` child on `n`'s table whose Kafka is a closed
/// port, so it reserves batches but never publishes; `settings` are its further variables.
async fn unreachable_relay(n: &Names, settings: &[(&str, String)]) -> ChildRelay {
    let dead_port = support::free_port().unwrap();
    let mut envs = vec![
        ("DATABASE_URL", support::postgres_url().await),
        ("KAFKA_BROKERS", format!("127.0.0.1:{dead_port}")),
        ("OUTBOX_TABLE", n.table.clone()),
        ("OUTBOX_CHANNEL", n.channel.clone()),
    ];
    envs.extend(settings.iter().cloned());
    ChildRelay::builder(&envs).spawn()
}

fn builder(n: &Names, pg: tokio_postgres::Config, brokers: &str) -> OutboxBuilder {
    Outbox::builder()
        .postgres(pg)
        .kafka_brokers(brokers)
        .table(&n.table)
        .channel(&n.channel)
}

/// A private mock cluster (one broker) with `topic` created on it.
async fn mock_with_topic(topic: &str, partitions: i32) -> MockKafka {
    let mock = MockKafka::start(1).expect("starting a mock Kafka cluster");
    mock.create_topic(topic, partitions)
        .expect("creating the topic on the mock cluster");
    support::wait_for_topic(&mock.bootstrap_servers(), topic, Duration::from_secs(30))
        .await
        .expect("mock topic usable");
    mock
}

fn event_id(r: &ConsumedRecord) -> Uuid {
    r.header("event_id")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "record {}/{}@{} has no valid event_id header: {:?}",
                r.topic, r.partition, r.offset, r.headers
            )
        })
}

/// `n` events round-robin over `aggregates` aggregates, payload `{"agg": a, "n": i}` where `i`
/// counts the aggregate's own events from 0.
fn round_robin(topic: &str, prefix: &str, n: usize, aggregates: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            let a = i % aggregates;
            NewEvent::new(
                topic,
                format!("{prefix}-{a}"),
                "Happened",
                json!({ "agg": a, "n": i / aggregates }),
            )
        })
        .collect()
}

/// Asserts that each key's records (in offset order) carry strictly increasing `n`.
fn assert_per_key_order(records: &[ConsumedRecord]) {
    let mut sorted: Vec<&ConsumedRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut last: HashMap<String, (i32, i64)> = HashMap::new();
    for r in sorted {
        let n = r.json()["n"].as_i64().expect("payload has n");
        if let Some((partition, prev)) = last.get(r.key_str()) {
            assert_eq!(
                *partition,
                r.partition,
                "key {} appeared on two partitions",
                r.key_str()
            );
            assert!(
                n > *prev,
                "key {}: n={n} at {}@{} after n={prev}: per-aggregate order broken",
                r.key_str(),
                r.partition,
                r.offset
            );
        }
        last.insert(r.key_str().to_string(), (r.partition, n));
    }
}

/// One outbox row as the tests see it.
#[derive(Debug, Clone)]
struct RowState {
    id: Uuid,
    status: String,
    attempts: i32,
    last_error: Option<String>,
    partition: Option<i32>,
    offset: Option<i64>,
    reserved_to_set: bool,
    next_attempt_in_future: bool,
}

async fn rows(client: &tokio_postgres::Client, table: &str) -> Vec<RowState> {
    client
        .query(
            &format!(
                "select id, status, attempts, last_error, kafka_partition, kafka_offset,
                        reserved_to is not null, coalesce(next_attempt_at > now(), false)
                   from {table} order by seq"
            ),
            &[],
        )
        .await
        .expect("reading the outbox table")
        .iter()
        .map(|r| RowState {
            id: r.get(0),
            status: r.get(1),
            attempts: r.get(2),
            last_error: r.get(3),
            partition: r.get(4),
            offset: r.get(5),
            reserved_to_set: r.get(6),
            next_attempt_in_future: r.get(7),
        })
        .collect()
}

async fn status_counts(client: &tokio_postgres::Client, table: &str) -> BTreeMap<String, i64> {
    client
        .query(
            &format!("select status, count(*) from {table} group by status"),
            &[],
        )
        .await
        .expect("counting statuses")
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect()
}

async fn count_status(client: &tokio_postgres::Client, table: &str, status: &str) -> i64 {
    status_counts(client, table)
        .await
        .get(status)
        .copied()
        .unwrap_or(0)
}

/// Pending rows currently row-locked by somebody (a relay's reservation). Our probe takes
/// `FOR KEY SHARE SKIP LOCKED` for the length of one statement: it skips rows locked
/// `FOR UPDATE` and does not block anyone.
async fn locked_rows(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(
            &format!(
                "select (select count(*) from {table} where status = 'new')
                      - (select count(*) from (select 1 from {table} where status = 'new'
                                                 for key share skip locked) s)"
            ),
            &[],
        )
        .await
        .expect("probing row locks")
        .get(0)
}

/// Waits until `count_status(status) == want`; returns the last count.
async fn wait_status(
    client: &tokio_postgres::Client,
    table: &str,
    status: &str,
    want: i64,
    timeout: Duration,
) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = count_status(client, table, status).await;
        if n == want || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `cond` every 50 ms until it is true or `timeout` passed; returns whether it became true.
async fn wait_for<F>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until records with `n` distinct `event_id`s arrived (duplicates allowed) or `timeout`
/// passed; returns everything read.
async fn read_distinct(
    reader: &mut TopicReader,
    n: usize,
    timeout: Duration,
) -> Vec<ConsumedRecord> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let batch = reader.read(n - seen.len(), left).await;
        seen.extend(batch.iter().map(event_id));
        out.extend(batch);
    }
    out
}

async fn stop_relay(
    outbox: &Outbox,
    relay: tokio::task::JoinHandle<outbox::Result<()>>,
) -> outbox::Result<()> {
    let stopped = outbox.stop(Duration::from_secs(10)).await;
    let joined = tokio::time::timeout(Duration::from_secs(20), relay)
        .await
        .expect("relay task ended")
        .expect("relay task did not panic");
    stopped.and(joined)
}

/// Waits until some relay holds a reservation on `table` (pending rows row-locked by a batch
/// transaction); returns how many rows are locked, 0 on timeout.
async fn wait_reserved(client: &tokio_postgres::Client, table: &str, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = locked_rows(client, table).await;
        if n > 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ----------------------------------------------------------------------------------------------
// S1 — published, but marking done failed
// ----------------------------------------------------------------------------------------------

/// S1: a Postgres trigger makes every `status = 'done'` update fail. The event is published, the
/// confirm fails (counted in `confirm_failures`), re-sends are spaced by a backoff rather than a
/// tight loop, and the row never becomes done. Once the trigger is dropped the event is published
/// once more with the same `event_id` and key, marked done with that copy's offset, and never
/// published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_confirm_failure_backs_off_then_republishes_once() {
    let (brokers, n, client) = setup("s1", 1).await;
    let t = &n.table;
    client
        .batch_execute(&format!(
            "create function {t}_no_done() returns trigger language plpgsql as $$
             begin
               raise exception 's1 injected fault: cannot mark % done', new.id;
             end $$;
             create trigger {t}_no_done before update on {t} for each row
               when (new.status = 'done') execute function {t}_no_done();"
        ))
        .await
        .unwrap();

    let (outbox, mut reader, relay) = support::start_with_reader(
        builder(&n, support::postgres().await, &brokers).poll_interval(Duration::from_millis(200)),
        &brokers,
        &n.topic,
        Duration::from_secs(30),
    )
    .await;
    let id = outbox
        .add_new_event(
            &client,
            NewEvent::new(&n.topic, "s1-agg", "Created", json!({"n": 1})),
        )
        .await
        .unwrap();

    // E is published (the delivery report is OK) …
    let first = reader.read(1, Duration::from_secs(20)).await;
    assert_eq!(first.len(), 1, "E was never published");
    assert_eq!(event_id(&first[0]), id);
    assert_eq!(first[0].key_str(), "s1-agg");

    // … but cannot be marked done. Watch 3 s of the fault.
    let window = Duration::from_secs(3);
    let during = reader.read_for(window).await;
    let stats = outbox.stats();
    eprintln!(
        "s1: {} re-sends of E in {window:?} of the fault; {stats:?}",
        during.len()
    );
    for r in &during {
        assert_eq!(event_id(r), id, "only E may be re-sent: {r:?}");
        assert_eq!(r.key_str(), "s1-agg", "a re-send keeps the key");
    }
    assert!(
        stats.confirm_failures >= 2,
        "the failing confirm must be counted each time it repeats: {stats:?}"
    );
    assert!(
        during.len() < 10,
        "a confirm that keeps failing must not become a tight re-send loop: {} copies of E in {:?} \
         (confirm_failures={}, batches={})",
        during.len(),
        window,
        stats.confirm_failures,
        stats.batches
    );
    let row = rows(&client, t).await;
    assert_eq!(row.len(), 1);
    assert_eq!(
        row[0].status, "new",
        "never done while the fault is there: {row:?}"
    );
    assert_eq!(row[0].offset, None);

    // Remove the fault: E is published once more, then marked done with that copy's offset.
    let copies_before = reader.received();
    client
        .batch_execute(&format!("drop trigger {t}_no_done on {t}"))
        .await
        .unwrap();
    let done = wait_status(&client, t, "done", 1, Duration::from_secs(30)).await;
    assert_eq!(
        done,
        1,
        "E not marked done after the fault was removed: {:?}",
        rows(&client, t).await
    );
    // Copies still on their way (sent before the row was confirmed).
    let after = reader.read_for(Duration::from_secs(1)).await;
    let all: Vec<ConsumedRecord> = first.iter().chain(&during).chain(&after).cloned().collect();
    assert!(
        reader.received() > copies_before,
        "E must be published once more after the fault is gone (copies before: {copies_before})"
    );
    for r in &all {
        assert_eq!(event_id(r), id);
        assert_eq!(r.key_str(), "s1-agg");
        assert_eq!(r.json(), json!({"n": 1}));
    }
    let last = all.iter().max_by_key(|r| r.offset).unwrap();
    let row = rows(&client, t).await.remove(0);
    assert_eq!(
        (row.partition, row.offset),
        (Some(last.partition), Some(last.offset)),
        "the row is marked done with the copy whose delivery report said OK (the last one)"
    );

    // Then never again (several poll intervals).
    reader.assert_idle(Duration::from_secs(3)).await;
    let stats = outbox.stats();
    assert_eq!(stats.delivered, 1, "{stats:?}");
    stop_relay(&outbox, relay).await.unwrap();
}

// ----------------------------------------------------------------------------------------------
// S2 — relay dies holding reservations
// ----------------------------------------------------------------------------------------------

/// S2: relay A (a child process whose Kafka is an unreachable port, so it can reserve but never
/// publish) reserves a batch and is SIGKILLed. Its reservations disappear with its session; relay
/// B (in-process, reachable broker) publishes all 1,000 events exactly once, in order per
/// aggregate, within lease + poll interval + margin, and no row is left reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_sigkilled_relay_releases_its_reservations() {
    let (brokers, n, client) = setup("s2", 3).await;
    let events = round_robin(&n.topic, "s2-agg", 1000, 50);
    let ids = insert(&client, &n.table, &events).await;

    let lease = Duration::from_secs(15);
    let poll = Duration::from_millis(500);
    let mut a = unreachable_relay(
        &n,
        &[
            ("OUTBOX_LEASE", format!("{}ms", lease.as_millis())),
            ("OUTBOX_PUBLISH_TIMEOUT", "5000ms".into()),
            ("OUTBOX_BATCH_TIMEOUT", "5000ms".into()),
            ("OUTBOX_BATCH_SIZE", "200".into()),
            ("OUTBOX_POLL_INTERVAL", format!("{}ms", poll.as_millis())),
        ],
    )
    .await;
    let locked = wait_reserved(&client, &n.table, Duration::from_secs(60)).await;
    assert!(
        locked > 0,
        "relay A never reserved a batch\n{}",
        a.diagnostics()
    );
    let status = a.sigkill();
    assert!(!status.success(), "A was killed: {status}");
    eprintln!("s2: relay A held {locked} rows when it was SIGKILLed");

    // A confirmed nothing (it never reached a broker) …
    let after_kill = rows(&client, &n.table).await;
    let touched: Vec<&RowState> = after_kill
        .iter()
        .filter(|r| r.status != "new" || r.attempts > 0 || r.next_attempt_in_future)
        .collect();
    assert!(
        touched.is_empty(),
        "A was killed while publishing, yet rows were confirmed: {:?}",
        &touched[..touched.len().min(5)]
    );
    // … and its row locks went with its session.
    let mut still_locked = locked;
    let deadline = Instant::now() + Duration::from_secs(5);
    while still_locked > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        still_locked = locked_rows(&client, &n.table).await;
    }
    assert_eq!(still_locked, 0, "rows still locked 5 s after relay A died");

    // Relay B.
    let mut reader = TopicReader::connect(&brokers, &n.topic, Duration::from_secs(30))
        .await
        .unwrap();
    let outbox = builder(&n, support::postgres().await, &brokers)
        .lease(lease)
        .publish_timeout(Duration::from_secs(5))
        .poll_interval(poll)
        .batch_size(200)
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let relay = outbox.start().unwrap();
    let bound = lease + poll + Duration::from_secs(10);
    let records = reader.read(1000, bound).await;
    let elapsed = started.elapsed();
    assert_eq!(
        records.len(),
        1000,
        "relay B published {} of 1000 events within lease + poll interval + 10 s ({:?}); states: {:?}",
        records.len(),
        bound,
        status_counts(&client, &n.table).await
    );
    eprintln!("s2: relay B published all 1000 events in {elapsed:?}");
    let consumed: Vec<Uuid> = records.iter().map(event_id).collect();
    let unique: HashSet<Uuid> = consumed.iter().copied().collect();
    assert_eq!(unique.len(), 1000, "duplicates: A never reached a broker");
    assert_eq!(unique, ids);
    assert_per_key_order(&records);
    reader.assert_idle(Duration::from_secs(2)).await;

    assert_eq!(
        wait_status(&client, &n.table, "done", 1000, Duration::from_secs(15)).await,
        1000,
        "{:?}",
        status_counts(&client, &n.table).await
    );
    let left = rows(&client, &n.table).await;
    assert!(
        left.iter().all(|r| !r.reserved_to_set),
        "a row kept reserved_to set"
    );
    assert_eq!(locked_rows(&client, &n.table).await, 0);
    assert_eq!(outbox.stats().delivered, 1000);
    stop_relay(&outbox, relay).await.unwrap();
}

// ----------------------------------------------------------------------------------------------
// S8 — listener connection dropped
// ----------------------------------------------------------------------------------------------

/// S8: poll interval 60 s. The listener's backend is terminated and kept from reconnecting (the
/// relay's database stops accepting connections) while E is inserted, so E's NOTIFY is lost. Once
/// connections are allowed again the listener reconnects, LISTENs and catches up: E is published
/// within seconds, and `listener_reconnects` counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_listener_reconnects_and_catches_up() {
    support::init_tracing();
    let brokers = support::kafka_brokers();
    let n = names("s8");
    support::create_topic(&n.topic, 1).await;
    let db_config = support::fresh_database().await;
    let db = db_config.get_dbname().unwrap().to_string();
    let admin = support::connect_pg().await; // the `postgres` database
    let writer = outbox::testing::connect(&db_config).await.unwrap();

    let (outbox, mut reader, relay) = support::start_with_reader(
        builder(&n, db_config.clone(), &brokers)
            .migrate(true)
            .poll_interval(Duration::from_secs(60)),
        &brokers,
        &n.topic,
        Duration::from_secs(30),
    )
    .await;

    // Warm-up: the wake path works and the relay goes idle.
    outbox
        .add_new_event(&writer, NewEvent::new(&n.topic, "s8", "WarmUp", json!({})))
        .await
        .unwrap();
    assert_eq!(reader.read(1, Duration::from_secs(15)).await.len(), 1);
    let idle = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let armed: i64 = admin
                .query_one(
                    "select count(*) from pg_stat_activity
                      where datname = $1 and application_name = 'outbox-relay-waker'
                        and state = 'idle' and query like 'select pg_advisory_lock(%'",
                    &[&db],
                )
                .await
                .unwrap()
                .get(0);
            if (armed == 1 && outbox.stats().listener_connected) || Instant::now() >= deadline {
                break armed == 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(idle, "relay never went idle (waker lock + listener)");

    // Keep the listener away, and kill it.
    admin
        .batch_execute(&format!("alter database {db} allow_connections false"))
        .await
        .unwrap();
    let killed = admin
        .query(
            "select pg_terminate_backend(pid) from pg_stat_activity
              where datname = $1 and application_name = 'outbox-relay-listener' and query = $2",
            &[&db, &format!("listen {}", n.channel)],
        )
        .await
        .unwrap();
    let allow = format!("alter database {db} allow_connections true");
    if killed.len() != 1 || !killed[0].get::<_, bool>(0) {
        admin.batch_execute(&allow).await.unwrap();
        panic!(
            "expected to terminate exactly this relay's listener, got {} rows",
            killed.len()
        );
    }
    let noticed = wait_for(Duration::from_secs(5), || {
        !outbox.stats().listener_connected
    })
    .await;
    // E is inserted while the listener is down: its notification is lost.
    let e = outbox
        .add_new_event(
            &writer,
            NewEvent::new(&n.topic, "s8", "E", json!({"e": true})),
        )
        .await
        .unwrap();
    // Stay down a little, so that the listener fails to reconnect a few times.
    let early = reader.read_for(Duration::from_secs(1)).await;
    admin.batch_execute(&allow).await.unwrap();
    assert!(
        noticed,
        "stats().listener_connected stayed true after the listener was killed"
    );
    let back = Instant::now();

    let got = if early.is_empty() {
        reader.read(1, Duration::from_secs(5)).await
    } else {
        eprintln!("s8: E was published before the listener came back (extra poll)");
        early
    };
    assert_eq!(
        got.len(),
        1,
        "E not published within 5 s of the listener being able to reconnect (poll interval 60 s); stats: {:?}",
        outbox.stats()
    );
    assert_eq!(event_id(&got[0]), e);
    eprintln!(
        "s8: E published {:?} after connections were allowed again",
        back.elapsed()
    );
    let stats = outbox.stats();
    assert!(stats.listener_reconnects >= 1, "{stats:?}");
    assert!(stats.listener_connected, "{stats:?}");
    reader.assert_idle(Duration::from_millis(500)).await;
    stop_relay(&outbox, relay).await.unwrap();
}

// ----------------------------------------------------------------------------------------------
// S9 — the listener must be drained
// ----------------------------------------------------------------------------------------------

/// S9a: 1,000 inserts, each its own transaction, from 8 concurrent writers, poll interval 60 s:
/// all are delivered promptly (the wake path works under concurrency).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9a_concurrent_single_row_transactions_all_wake_the_relay() {
    let (brokers, n, client) = setup("s9a", 4).await;
    let (outbox, mut reader, relay) = support::start_with_reader(
        builder(&n, support::postgres().await, &brokers).poll_interval(Duration::from_secs(60)),
        &brokers,
        &n.topic,
        Duration::from_secs(30),
    )
    .await;
    // Let the relay's first (empty) poll pass, so every later event needs a wake-up.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let writers = 8;
    let per_writer = 125;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let outbox = outbox.clone();
        let topic = n.topic.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = support::connect_pg().await;
            let mut ids = Vec::new();
            for i in 0..per_writer {
                let tx = client.transaction().await?;
                let id = outbox
                    .add_new_event(
                        &tx,
                        NewEvent::new(&topic, format!("w{w}-{}", i % 5), "T", json!({"n": i})),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                tx.commit().await?;
                ids.push(id);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.extend(t.await.unwrap().expect("a writer failed"));
    }
    let last_commit = Instant::now();
    let records = reader.read(1000, Duration::from_secs(30)).await;
    let latency = last_commit.elapsed();
    assert_eq!(
        records.len(),
        1000,
        "only {} of 1000 delivered within 30 s of the last commit (poll interval 60 s): wake-ups lost; {:?}",
        records.len(),
        status_counts(&client, &n.table).await
    );
    assert!(
        latency < Duration::from_secs(10),
        "the last events took {latency:?} after the last commit"
    );
    let got: HashSet<Uuid> = records.iter().map(event_id).collect();
    assert_eq!(got, ids);
    assert_per_key_order(&records);
    stop_relay(&outbox, relay).await.unwrap();
}

/// S9b: the relay's Kafka (a private mock cluster) is down for at least 12 s while 4 writers
/// insert 50,000 events in statements of 500. Throughout, `pg_notification_queue_usage()` stays
/// about 0 and the listener session is never `idle in transaction`; no writer sees an error.
/// Then the broker comes back and every event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9b_listener_drained_while_kafka_is_down() {
    if support::run_isolated("faults::s9b_listener_drained_while_kafka_is_down") {
        return;
    }
    support::init_tracing();
    const TOTAL: usize = 50_000;
    const CHUNK: usize = 500;
    const WRITERS: usize = 4;
    const PER_WRITER: usize = TOTAL / WRITERS;
    const CHUNKS: usize = 22; // 22 × 500 = 11,000 rows per writer in chunks, 1,500 one by one
    /// Writer `w`'s `k`-th event: 250 aggregates per writer, `n` increasing per aggregate.
    fn bulk_event(topic: &str, w: usize, k: usize) -> NewEvent {
        NewEvent::new(
            topic,
            format!("w{w}-{}", k % 250),
            "Bulk",
            json!({"n": k / 250}),
        )
    }
    let n = names("s9b");
    let mock = mock_with_topic(&n.topic, 8).await;
    let brokers = mock.bootstrap_servers();
    // A server of its own: pg_notification_queue_usage() is server-wide, and other tests'
    // listeners (one behind a blackholed proxy, say) hold the queue's tail while they run, which
    // made the final "drained to empty" check fail in the full suite.
    let server = outbox::testing::TestPostgres::start()
        .await
        .expect("starting s9b's own Postgres server");
    let db_config: tokio_postgres::Config = server.url().parse().unwrap();
    let db = db_config.get_dbname().unwrap().to_string();
    let (outbox, mut reader, relay) = support::start_with_reader(
        builder(&n, db_config.clone(), &brokers)
            .migrate(true)
            .publish_timeout(Duration::from_secs(5))
            .lease(Duration::from_secs(15))
            .batch_timeout(Duration::from_secs(2))
            .poll_interval(Duration::from_secs(1))
            .retry_backoff(Duration::from_millis(200), Duration::from_secs(2))
            .max_attempts(1000),
        &brokers,
        &n.topic,
        Duration::from_secs(30),
    )
    .await;
    let client = outbox::testing::connect(&db_config).await.unwrap();
    outbox
        .add_new_event(
            &client,
            NewEvent::new(&n.topic, "warm", "WarmUp", json!({})),
        )
        .await
        .unwrap();
    assert_eq!(reader.read(1, Duration::from_secs(15)).await.len(), 1);

    // Sampler: notification queue usage and listener sessions idle in a transaction.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop_sampling.clone();
        let admin = outbox::testing::connect(&db_config).await.unwrap();
        let db = db.clone();
        tokio::spawn(async move {
            let mut max_usage = 0f64;
            let mut max_idle_tx = 0i64;
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let row = admin
                    .query_one(
                        "select pg_notification_queue_usage(),
                                (select count(*) from pg_stat_activity
                                  where datname = $1 and application_name = 'outbox-relay-listener'
                                    and state = 'idle in transaction')",
                        &[&db],
                    )
                    .await
                    .expect("sampling");
                max_usage = max_usage.max(row.get::<_, f64>(0));
                max_idle_tx = max_idle_tx.max(row.get::<_, i64>(1));
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (max_usage, max_idle_tx, samples)
        })
    };

    mock.broker_down(1).unwrap();
    let down_at = Instant::now();
    let inserted = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let outbox = outbox.clone();
        let topic = n.topic.clone();
        let db_config = db_config.clone();
        let inserted = inserted.clone();
        writers.push(tokio::spawn(async move {
            let client = outbox::testing::connect(&db_config).await?;
            let mut ids = Vec::new();
            // Most rows in statements of CHUNK rows (one NOTIFY per statement at most) …
            for c in 0..CHUNKS {
                let events: Vec<NewEvent> = (0..CHUNK)
                    .map(|i| bulk_event(&topic, w, c * CHUNK + i))
                    .collect();
                ids.extend(
                    outbox
                        .add_new_events(&client, &events)
                        .await
                        .map_err(|e| anyhow::anyhow!("writer {w}, chunk {c}: {e}"))?,
                );
                inserted.fetch_add(CHUNK as u64, Ordering::Relaxed);
            }
            // … and the rest one row per transaction, each of which notifies while the relay
            // waits (blocked behind Kafka, it is idle most of the time).
            for k in CHUNKS * CHUNK..PER_WRITER {
                ids.push(
                    outbox
                        .add_new_event(&client, bulk_event(&topic, w, k))
                        .await
                        .map_err(|e| anyhow::anyhow!("writer {w}, single row {k}: {e}"))?,
                );
                inserted.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = HashSet::new();
    let mut writer_errors = Vec::new();
    for w in writers {
        match w.await.unwrap() {
            Ok(v) => ids.extend(v),
            Err(e) => writer_errors.push(e.to_string()),
        }
    }
    let insert_time = down_at.elapsed();
    // Kafka stays down at least 12 s in all.
    let min_down = Duration::from_secs(12);
    if insert_time < min_down {
        tokio::time::sleep(min_down - insert_time).await;
    }
    let delivered_while_down = outbox.stats().delivered;
    mock.broker_up(1).unwrap();
    let up_at = Instant::now();
    eprintln!(
        "s9b: {} events inserted in {insert_time:?} while Kafka was down; down for {:?}",
        inserted.load(Ordering::Relaxed),
        down_at.elapsed()
    );
    assert!(
        writer_errors.is_empty(),
        "writers saw errors: {writer_errors:?}"
    );
    assert_eq!(ids.len(), TOTAL);
    assert_eq!(
        delivered_while_down, 1,
        "nothing can be delivered while Kafka is down"
    );

    let records = read_distinct(&mut reader, TOTAL, Duration::from_secs(60)).await;
    eprintln!(
        "s9b: {} records consumed {:?} after the broker came back",
        records.len(),
        up_at.elapsed()
    );
    stop_sampling.store(true, Ordering::Relaxed);
    let (max_usage, max_idle_tx, samples) = sampler.await.unwrap();
    eprintln!("s9b: {samples} samples, max pg_notification_queue_usage {max_usage}, max listener idle-in-transaction {max_idle_tx}");
    assert!(samples >= 50, "too few samples ({samples})");
    assert!(
        max_usage < 0.01,
        "the notification queue filled up to {max_usage}: the listener is not drained"
    );
    assert_eq!(
        max_idle_tx, 0,
        "the listener session was idle in transaction"
    );
    // 0.01 of the notification queue (8 GB by default) is far more than this test can queue, so
    // also require the queue to be empty again: a listener that is not read keeps the queue's
    // tail (and the usage) above 0 for good.
    let admin = outbox::testing::connect(&db_config).await.unwrap();
    let mut usage = 1.0f64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while usage > 0.0 && Instant::now() < deadline {
        usage = admin
            .query_one("select pg_notification_queue_usage()", &[])
            .await
            .unwrap()
            .get(0);
        if usage > 0.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        usage, 0.0,
        "the notification queue did not drain to empty within 10 s"
    );

    let got: Vec<Uuid> = records.iter().map(event_id).collect();
    let unique: HashSet<Uuid> = got.iter().copied().collect();
    assert_eq!(
        unique.len(),
        TOTAL,
        "{} of {TOTAL} distinct events delivered after Kafka came back; {:?}; stats {:?}",
        unique.len(),
        status_counts(&client, &n.table).await,
        outbox.stats()
    );
    assert_eq!(unique, ids);
    if got.len() != unique.len() {
        eprintln!(
            "s9b: {} duplicates (allowed: at-least-once)",
            got.len() - unique.len()
        );
    }
    assert_per_key_order_allowing_replays(&records);
    assert_eq!(
        wait_status(
            &client,
            &n.table,
            "done",
            TOTAL as i64 + 1,
            Duration::from_secs(20)
        )
        .await,
        TOTAL as i64 + 1,
        "{:?}",
        status_counts(&client, &n.table).await
    );
    stop_relay(&outbox, relay).await.unwrap();
}

/// Per key, `n` never goes back except as a contiguous replay of already-published events
/// (at-least-once): after a drop to `m`, the following records are `m, m+1, …` until the
/// previous maximum is reached again.
fn assert_per_key_order_allowing_replays(records: &[ConsumedRecord]) {
    let mut sorted: Vec<&ConsumedRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    // key -> (max n so far, expected next n while replaying)
    let mut state: HashMap<String, (i64, Option<i64>)> = HashMap::new();
    for r in sorted {
        let n = r.json()["n"].as_i64().expect("payload has n");
        let entry = state.entry(r.key_str().to_string()).or_insert((-1, None));
        match entry.1 {
            Some(expected) => {
                assert_eq!(
                    n,
                    expected,
                    "key {}: replay not contiguous at {}@{}",
                    r.key_str(),
                    r.partition,
                    r.offset
                );
                entry.1 = if n >= entry.0 { None } else { Some(n + 1) };
                entry.0 = entry.0.max(n);
            }
            None if n > entry.0 => entry.0 = n,
            None => {
                entry.1 = if n >= entry.0 { None } else { Some(n + 1) };
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// S12 — producer quirks
// ----------------------------------------------------------------------------------------------

/// S12a body: the broker is down while 100 events (one aggregate each) are inserted. Every
/// delivery fails after `publish_timeout` (1 s): the rows go back to pending with attempts ≥ 1
/// and `last_error` set, none is done. After the broker returns all 100 are delivered.
async fn s12a_broker_down(lease: Duration) {
    support::init_tracing();
    let n = names("s12a");
    let mock = mock_with_topic(&n.topic, 4).await;
    let brokers = mock.bootstrap_servers();
    let client = support::connect_pg().await;
    outbox::migrate_table(&client, &n.table, &n.channel)
        .await
        .unwrap();
    let outbox = builder(&n, support::postgres().await, &brokers)
        .publish_timeout(Duration::from_secs(1))
        .batch_timeout(Duration::from_secs(1))
        .lease(lease)
        // The default (10 s) exceeds these leases and is refused.
        .shutdown_timeout(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(200))
        .retry_backoff(Duration::from_millis(200), Duration::from_secs(1))
        .max_attempts(1000)
        .connect()
        .await
        .unwrap();
    mock.broker_down(1).unwrap();
    let relay = outbox.start().unwrap();
    let events: Vec<NewEvent> = (0..100)
        .map(|i| NewEvent::new(&n.topic, format!("s12a-{i}"), "T", json!({"n": 0, "i": i})))
        .collect();
    let ids: HashSet<Uuid> = outbox
        .add_new_events(&client, &events)
        .await
        .unwrap()
        .into_iter()
        .collect();

    // Every delivery fails; the rows stay pending with their error, no attempt counted (the
    // cluster failed, not the events).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut state;
    loop {
        state = rows(&client, &n.table).await;
        let done: Vec<&RowState> = state.iter().filter(|r| r.status != "new").collect();
        assert!(
            done.is_empty(),
            "rows marked done/failed while Kafka is down: {:?}",
            &done[..done.len().min(5)]
        );
        let all_tried = state.iter().all(|r| r.last_error.is_some());
        if all_tried || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let untried = state.iter().filter(|r| r.last_error.is_none()).count();
    let charged: Vec<&RowState> = state.iter().filter(|r| r.attempts != 0).collect();
    assert!(
        charged.is_empty(),
        "a broker outage counted attempts: {:?}",
        &charged[..charged.len().min(3)]
    );
    assert_eq!(
        untried,
        0,
        "{untried} of 100 rows show no failed attempt 20 s after they were inserted with the broker \
         down (publish_timeout 1 s, lease {lease:?}); stats: {:?}; first rows: {:?}",
        outbox.stats(),
        &state[..3]
    );
    eprintln!(
        "s12a: sample failure: attempts={} last_error={:?}",
        state[0].attempts, state[0].last_error
    );
    assert_eq!(outbox.stats().delivered, 0);

    mock.broker_up(1).unwrap();
    let mut reader = TopicReader::connect(&brokers, &n.topic, Duration::from_secs(30))
        .await
        .unwrap();
    let records = read_distinct(&mut reader, 100, Duration::from_secs(40)).await;
    let got: HashSet<Uuid> = records.iter().map(event_id).collect();
    assert_eq!(
        got.len(),
        100,
        "{} of 100 delivered after the broker came back; {:?}; stats {:?}",
        got.len(),
        status_counts(&client, &n.table).await,
        outbox.stats()
    );
    assert_eq!(got, ids);
    assert_eq!(
        wait_status(&client, &n.table, "done", 100, Duration::from_secs(15)).await,
        100
    );
    let state = rows(&client, &n.table).await;
    for r in &state {
        assert_eq!(r.attempts, 0, "the outage counted no attempt: {r:?}");
        assert!(
            r.last_error.is_none(),
            "last_error cleared on delivery: {r:?}"
        );
    }
    stop_relay(&outbox, relay).await.unwrap();
}

/// S12a with the shortest lease the builder accepts for a 1 s publish timeout (6 s = 1 s + the
/// 5 s margin), as in the scenario brief.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12a_broker_down_every_delivery_fails_then_all_go_out_min_lease() {
    if support::run_isolated(
        "faults::s12a_broker_down_every_delivery_fails_then_all_go_out_min_lease",
    ) {
        return;
    }
    s12a_broker_down(Duration::from_secs(6)).await;
}

/// S12a with a lease of 8 s (the same scenario with 2 s of room for sending). The tests that set
/// a mock broker down run in a child process of their own (`support::run_isolated`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12a_broker_down_every_delivery_fails_then_all_go_out() {
    if support::run_isolated("faults::s12a_broker_down_every_delivery_fails_then_all_go_out") {
        return;
    }
    s12a_broker_down(Duration::from_secs(8)).await;
}

/// S12b: `queue.buffering.max.messages=10` and one batch of 500 events over 20 aggregates:
/// queue-full is backpressure, not a failure or a crash; all 500 are delivered once, in order
/// per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12b_tiny_producer_queue_is_backpressure() {
    let (brokers, n, client) = setup("s12b", 3).await;
    let events = round_robin(&n.topic, "s12b", 500, 20);
    let ids = insert(&client, &n.table, &events).await;
    let (outbox, mut reader, relay) = support::start_with_reader(
        builder(&n, support::postgres().await, &brokers)
            .kafka_property("queue.buffering.max.messages", "10")
            .batch_size(500)
            .poll_interval(Duration::from_millis(200)),
        &brokers,
        &n.topic,
        Duration::from_secs(30),
    )
    .await;
    let records = reader.read(500, Duration::from_secs(60)).await;
    assert_eq!(
        records.len(),
        500,
        "{:?}; stats {:?}",
        status_counts(&client, &n.table).await,
        outbox.stats()
    );
    let got: HashSet<Uuid> = records.iter().map(event_id).collect();
    assert_eq!(got, ids, "each event exactly once");
    assert_per_key_order(&records);
    reader.assert_idle(Duration::from_secs(2)).await;
    assert_eq!(
        wait_status(&client, &n.table, "done", 500, Duration::from_secs(10)).await,
        500
    );
    let stats = outbox.stats();
    assert!(stats.running, "the relay is still running: {stats:?}");
    assert_eq!(
        stats.retried, 0,
        "queue-full is not a failed attempt: {stats:?}"
    );
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(stats.delivered, 500, "{stats:?}");
    stop_relay(&outbox, relay).await.unwrap();
}

/// After a stop with messages lingering in the producer: every row is `done` (and then consumed
/// at the recorded partition/offset) or still `new`; returns the ids still `new`.
async fn check_after_stop(
    client: &tokio_postgres::Client,
    table: &str,
    consumed: &[ConsumedRecord],
) -> Vec<Uuid> {
    let by_id: HashMap<Uuid, Vec<&ConsumedRecord>> =
        consumed.iter().fold(HashMap::new(), |mut m, r| {
            m.entry(event_id(r)).or_default().push(r);
            m
        });
    let state = rows(client, table).await;
    let mut pending = Vec::new();
    let mut sent_not_done = 0;
    for r in &state {
        match r.status.as_str() {
            "done" => {
                let copies = by_id.get(&r.id).unwrap_or_else(|| {
                    panic!("row {} is done but was never consumed: {r:?}", r.id)
                });
                assert!(
                    copies
                        .iter()
                        .any(|c| Some(c.partition) == r.partition && Some(c.offset) == r.offset),
                    "row {} done at {:?}@{:?}, consumed at {:?}",
                    r.id,
                    r.partition,
                    r.offset,
                    copies
                        .iter()
                        .map(|c| (c.partition, c.offset))
                        .collect::<Vec<_>>()
                );
            }
            "new" => {
                if by_id.contains_key(&r.id) {
                    sent_not_done += 1;
                }
                pending.push(r.id);
            }
            other => panic!("row {} is {other} after a stop: {r:?}", r.id),
        }
    }
    eprintln!(
        "after stop: {} done, {} new ({} of them were published but not confirmed); first new row: {:?}",
        state.len() - pending.len(),
        pending.len(),
        sent_not_done,
        state.iter().find(|r| r.status == "new")
    );
    pending
}

/// S12c: `linger.ms=5000`, 100 messages in flight, then `stop(1 s)`. The relay ends within
/// batch_timeout + the stop timeout, `in_flight` is 0, nothing more reaches Kafka afterwards
/// (queued messages were purged, not sent behind the relay's back), every row is done (and
/// consumed) or still new, and a new Outbox on the table delivers the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12c_stop_with_lingering_messages() {
    let (brokers, n, client) = setup("s12c", 4).await;
    let events: Vec<NewEvent> = (0..100)
        .map(|i| NewEvent::new(&n.topic, format!("s12c-{i}"), "T", json!({"n": 0})))
        .collect();
    let ids = insert(&client, &n.table, &events).await;
    let mut reader = TopicReader::connect(&brokers, &n.topic, Duration::from_secs(30))
        .await
        .unwrap();
    let batch_timeout = Duration::from_secs(2);
    let outbox = builder(&n, support::postgres().await, &brokers)
        .kafka_property("linger.ms", "5000")
        // Two full batches: they keep the linger (a batch that caught up kicks the producer).
        .batch_size(50)
        // librdkafka requires message.timeout.ms > linger.ms.
        .publish_timeout(Duration::from_secs(10))
        .batch_timeout(batch_timeout)
        .poll_interval(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let in_flight = wait_for(Duration::from_secs(15), || outbox.stats().in_flight == 100).await;
    assert!(
        in_flight,
        "100 messages never in flight: {:?}",
        outbox.stats()
    );

    let stop_timeout = Duration::from_secs(1);
    let stopping = Instant::now();
    let stopped = outbox.stop(stop_timeout).await;
    let joined = tokio::time::timeout(Duration::from_secs(30), relay).await;
    let took = stopping.elapsed();
    eprintln!("s12c: stop(1 s) returned {stopped:?}; relay ended after {took:?}");
    assert!(matches!(joined, Ok(Ok(Ok(())))), "relay run: {joined:?}");
    let bound = batch_timeout + stop_timeout + Duration::from_millis(1500);
    assert!(
        took <= bound,
        "the stop took {took:?} (> batch_timeout + stop timeout + 1.5 s = {bound:?})"
    );
    let stats = outbox.stats();
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    assert!(!stats.running, "{stats:?}");

    // Longer than linger.ms: anything left queued in the producer would arrive now.
    let consumed = reader.read_for(Duration::from_secs(6)).await;
    let pending = check_after_stop(&client, &n.table, &consumed).await;
    let done_before = ids.len() - pending.len();

    // A new Outbox delivers the rest.
    let outbox2 = builder(&n, support::postgres().await, &brokers)
        .poll_interval(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let relay2 = outbox2.start().unwrap();
    let restarted = Instant::now();
    assert_eq!(
        wait_status(&client, &n.table, "done", 100, Duration::from_secs(30)).await,
        100,
        "the second relay did not deliver the rest: {:?}",
        rows(&client, &n.table)
            .await
            .iter()
            .filter(|r| r.status != "done")
            .take(3)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "s12c: the next relay delivered the rest in {:?}",
        restarted.elapsed()
    );
    let more = reader.read_for(Duration::from_secs(3)).await;
    let all: Vec<ConsumedRecord> = consumed.into_iter().chain(more).collect();
    let got: HashSet<Uuid> = all.iter().map(event_id).collect();
    assert_eq!(got, ids);
    assert_eq!(
        outbox2.stats().delivered as usize,
        100 - done_before,
        "{:?}",
        outbox2.stats()
    );
    check_after_stop(&client, &n.table, &all).await;
    stop_relay(&outbox2, relay2).await.unwrap();
}

/// S12c in a child process, to read librdkafka's own log: the relay (linger.ms=5000) gets SIGTERM
/// with 100 messages in flight, stops within its 1 s stop timeout + batch timeout, and the
/// producer is destroyed without librdkafka's "terminating with N messages in queue" warning.
/// Rows are done (and consumed) or new; a new relay delivers the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12c_sigterm_with_lingering_messages_child_process() {
    let (brokers, n, client) = setup("s12cc", 4).await;
    let mut reader = TopicReader::connect(&brokers, &n.topic, Duration::from_secs(30))
        .await
        .unwrap();
    let mut child = ChildRelay::builder(&[
        ("DATABASE_URL", support::postgres_url().await),
        ("KAFKA_BROKERS", brokers.clone()),
        ("OUTBOX_TABLE", n.table.clone()),
        ("OUTBOX_CHANNEL", n.channel.clone()),
        ("OUTBOX_PUBLISH_TIMEOUT", "10000ms".into()),
        ("OUTBOX_BATCH_TIMEOUT", "2000ms".into()),
        ("OUTBOX_POLL_INTERVAL", "200ms".into()),
        ("OUTBOX_SHUTDOWN_TIMEOUT", "1000ms".into()),
        // Two full batches: they keep the linger (a batch that caught up kicks the producer).
        ("OUTBOX_BATCH_SIZE", "50".into()),
    ])
    .args(&["-X", "linger.ms=5000"])
    .spawn();
    let started = {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !child.stderr().contains("outbox relay running") && Instant::now() < deadline {
            assert!(
                child.exited().is_none(),
                "child relay exited\n{}",
                child.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.stderr().contains("outbox relay running")
    };
    assert!(
        started,
        "child relay did not start\n{}",
        child.diagnostics()
    );
    let events: Vec<NewEvent> = (0..100)
        .map(|i| NewEvent::new(&n.topic, format!("s12cc-{i}"), "T", json!({"n": 0})))
        .collect();
    let ids = insert(&client, &n.table, &events).await;
    let locked = wait_reserved(&client, &n.table, Duration::from_secs(15)).await;
    assert!(locked > 0, "child never reserved\n{}", child.diagnostics());
    // The batch is handed to the producer, where it lingers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    child.sigterm();
    let status = child.wait_exit(Duration::from_secs(20)).await;
    let took = stopping.elapsed();
    let diag = child.diagnostics();
    let status = status.unwrap_or_else(|| panic!("child relay did not exit on SIGTERM\n{diag}"));
    eprintln!("s12c child: exited {status} {took:?} after SIGTERM");
    assert!(status.success(), "child relay failed: {status}\n{diag}");
    let err = child.stderr();
    assert!(
        !err.contains("terminating with") && !err.contains("still in queue or transit"),
        "librdkafka warned about messages left in the queue on a normal stop\n{diag}"
    );
    assert!(
        took < Duration::from_secs(2 + 1 + 3),
        "SIGTERM to exit took {took:?}\n{diag}"
    );

    let consumed = reader.read_for(Duration::from_secs(6)).await;
    let pending = check_after_stop(&client, &n.table, &consumed).await;
    let outbox = builder(&n, support::postgres().await, &brokers)
        .poll_interval(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let restarted = Instant::now();
    assert_eq!(
        wait_status(&client, &n.table, "done", 100, Duration::from_secs(30)).await,
        100,
        "the next relay did not deliver the {} pending events",
        pending.len()
    );
    eprintln!(
        "s12c child: the next relay delivered the rest in {:?}",
        restarted.elapsed()
    );
    let more = reader.read_for(Duration::from_secs(3)).await;
    let all: Vec<ConsumedRecord> = consumed.into_iter().chain(more).collect();
    let got: HashSet<Uuid> = all.iter().map(event_id).collect();
    assert_eq!(got, ids);
    check_after_stop(&client, &n.table, &all).await;
    stop_relay(&outbox, relay).await.unwrap();
}

// ----------------------------------------------------------------------------------------------
// Lease safety — a hung relay loses its reservation and cannot confirm afterwards
// ----------------------------------------------------------------------------------------------

/// Relay A (a child process whose broker is unreachable) reserves a batch and is frozen with
/// SIGSTOP. Postgres ends its idle-in-transaction session after the lease, which releases the
/// rows: relay B publishes every event. When A is resumed, its confirmation fails (its session is
/// gone): it cannot mark, count attempts on, or otherwise touch rows it no longer owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_relay_loses_its_lease_and_cannot_confirm() {
    let (brokers, n, client) = setup("hung", 3).await;
    let events = round_robin(&n.topic, "hung-agg", 300, 30);
    let ids = insert(&client, &n.table, &events).await;
    // lease = publish_timeout + batch_timeout + 2 s.
    let lease = Duration::from_secs(4);
    let mut a = unreachable_relay(
        &n,
        &[
            ("OUTBOX_LEASE", format!("{}ms", lease.as_millis())),
            ("OUTBOX_PUBLISH_TIMEOUT", "1000ms".into()),
            ("OUTBOX_BATCH_TIMEOUT", "1000ms".into()),
            ("OUTBOX_BATCH_SIZE", "300".into()),
            ("OUTBOX_POLL_INTERVAL", "200ms".into()),
        ],
    )
    .await;
    let locked = wait_reserved(&client, &n.table, Duration::from_secs(60)).await;
    assert!(locked > 0, "relay A never reserved\n{}", a.diagnostics());
    let pid = a.child.id().to_string();
    let stop = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stop.success());
    let frozen_at = Instant::now();

    let mut reader = TopicReader::connect(&brokers, &n.topic, Duration::from_secs(30))
        .await
        .unwrap();
    let outbox = builder(&n, support::postgres().await, &brokers)
        .poll_interval(Duration::from_millis(200))
        .batch_size(100)
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    let records = reader.read(300, lease + Duration::from_secs(15)).await;
    let took = frozen_at.elapsed();
    assert_eq!(
        records.len(),
        300,
        "B published {} of 300 while A was frozen; states {:?}",
        records.len(),
        status_counts(&client, &n.table).await
    );
    let unique: HashSet<Uuid> = records.iter().map(event_id).collect();
    assert_eq!(unique, ids, "every event once (A never reached a broker)");
    assert_per_key_order(&records);
    // A's rows were only free once Postgres ended A's session after the lease.
    assert!(
        took >= lease - Duration::from_millis(500),
        "B got A's locked rows after {took:?}, before the {lease:?} lease ran out"
    );
    assert_eq!(
        wait_status(&client, &n.table, "done", 300, Duration::from_secs(10)).await,
        300
    );

    // Resume A: its batch transaction is gone, so it confirms nothing.
    let cont = Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(cont.success());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rows(&client, &n.table).await;
    assert!(
        after.iter().all(|r| r.status == "done" && r.attempts == 0),
        "a row was touched by the resumed relay: {:?}",
        after
            .iter()
            .filter(|r| r.status != "done" || r.attempts != 0)
            .take(5)
            .collect::<Vec<_>>()
    );
    reader.assert_idle(Duration::from_secs(1)).await;
    let log = a.stderr();
    assert!(
        log.contains("confirming the batch failed") || log.contains("terminat"),
        "A should report its lost session\n{}",
        a.diagnostics()
    );
    a.sigkill();
    stop_relay(&outbox, relay).await.unwrap();
}
