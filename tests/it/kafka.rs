//! Tests that only a real Apache Kafka cluster can run (issue 11): broker crashes and restarts
//! with their data, leader moves, an in-sync replica set below `min.insync.replicas`, the whole
//! cluster down. They use the private 3-node [`support::fault_cluster`] (replication factor 3,
//! `min.insync.replicas=2`, auto-create off), one test at a time, and skip (saying so) without
//! Java or with `OUTBOX_TEST_KAFKA=mock`.
//!
//! Every test consumes back and checks every event: each committed event arrives, nothing else,
//! per-aggregate order, duplicates only as contiguous replays ([`support::check_delivery`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::{NewEvent, Outbox, OutboxBuilder};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{self, Cluster, ConsumedRecord};

/// What a test wrote: event id → (aggregate, per-aggregate counter).
pub(crate) type Expected = Arc<Mutex<HashMap<Uuid, (String, u64)>>>;

type Env = support::TestEnv;

async fn setup(prefix: &str, cluster: &Cluster, partitions: i32) -> Env {
    support::init_tracing();
    let env = Env::named(prefix, cluster.brokers(), support::postgres().await);
    let (table, topic, brokers) = (&env.table, &env.topic, &env.brokers);
    outbox::migrate_table(&support::connect_pg().await, table, &env.channel)
        .await
        .unwrap_or_else(|e| panic!("migrating {table}: {e}"));
    outbox::testing::create_topic(brokers, topic, partitions)
        .await
        .unwrap_or_else(|e| panic!("creating {topic} on {brokers}: {e}"));
    env
}

/// Inserts `per_aggregate` events for each of `aggregates` aggregates (`{prefix}-{i}`), in
/// transactions of one event per aggregate, recording them in `expected`.
pub(crate) async fn write(
    outbox: &Outbox,
    env: &Env,
    expected: &Expected,
    prefix: &str,
    aggregates: usize,
    per_aggregate: u64,
) {
    let mut client = outbox::testing::connect(&env.pg).await.expect("connect pg");
    let start = {
        let e = expected.lock().unwrap();
        e.values().filter(|(a, _)| a.starts_with(prefix)).count() as u64 / aggregates as u64
    };
    for n in start..start + per_aggregate {
        let events: Vec<NewEvent> = (0..aggregates)
            .map(|a| {
                NewEvent::new(
                    env.topic.as_str(),
                    format!("{prefix}-{a}"),
                    "counter.incremented",
                    json!({ "n": n }),
                )
            })
            .collect();
        let tx = client.transaction().await.expect("begin");
        let ids = outbox.add_new_events(&tx, &events).await.expect("insert");
        tx.commit().await.expect("commit");
        let mut e = expected.lock().unwrap();
        for (a, id) in ids.into_iter().enumerate() {
            e.insert(id, (format!("{prefix}-{a}"), n));
        }
    }
}

/// A writer task: rounds of one event for each of 20 aggregates, every 20 ms, until `stop`.
pub(crate) fn spawn_writer(
    outbox: Outbox,
    env: &Env,
    expected: Expected,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let env = env.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            write(&outbox, &env, &expected, "w", 20, 1).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Rows of the test's table by status.
async fn statuses(env: &Env) -> HashMap<String, i64> {
    let client = support::connect_pg().await;
    client
        .query(
            &format!("select status, count(*) from {} group by status", env.table),
            &[],
        )
        .await
        .expect("counting statuses")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until every row is `done` (panics naming the counts and any dead letter's error).
pub(crate) async fn wait_all_done(env: &Env, within: Duration) {
    support::eventually(within, "every event done", || async {
        let s = statuses(env).await;
        if s.keys().all(|k| k == "done") {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
}

/// Reads with `reader` until every event of `expected` arrived (by its `event_id` header; within
/// 60 s, or fails naming how many did), and returns every record read, replays included.
async fn read_every_event(
    reader: &mut support::TopicReader,
    expected: &HashMap<Uuid, (String, u64)>,
    what: &str,
) -> Vec<ConsumedRecord> {
    let mut records = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !expected.keys().all(|id| seen.contains(id)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {} events read back within 60 s",
            seen.len(),
            expected.len()
        );
        for r in reader.read_for(Duration::from_millis(500)).await {
            if let Some(id) = r.header("event_id").and_then(|h| Uuid::parse_str(h).ok()) {
                seen.insert(id);
            }
            records.push(r);
        }
    }
    records
}

/// Reads the whole topic (with rdkafka) until every expected event arrived, then checks it.
pub(crate) async fn read_back_and_check(
    env: &Env,
    expected: &Expected,
    what: &str,
) -> Vec<ConsumedRecord> {
    let expected = expected.lock().unwrap().clone();
    let mut reader =
        support::TopicReader::connect(&env.brokers, &env.topic, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("reading {}: {e}", env.topic));
    let mut records = read_every_event(&mut reader, &expected, what).await;
    // Anything still in flight (a late duplicate) must follow the rules too.
    records.extend(reader.read_for(Duration::from_millis(500)).await);
    records.sort_by_key(|r| (r.partition, r.offset));
    let check = support::check_delivery(&expected, &records);
    check.assert_ok(what);
    eprintln!(
        "{what}: {} events, {} records, {} duplicates, 0 lost, 0 order violations",
        expected.len(),
        records.len(),
        check.duplicates
    );
    records
}

macro_rules! fault_cluster_or_skip {
    ($name:literal) => {
        match support::fault_cluster().await {
            Some(c) => c,
            None => {
                eprintln!(
                    "{}: skipped: needs a real Kafka cluster (Java; not OUTBOX_TEST_KAFKA=mock)",
                    $name
                );
                return;
            }
        }
    };
}

/// The leader of a busy partition is SIGKILLed while the relay drains a backlog and writers keep
/// writing, then started again on its data: the leader moves, in-flight produce requests are
/// retried by the idempotent producer, every event arrives once in order or as a contiguous
/// replay, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_drain_then_restarted() {
    let (_faults, cluster) = fault_cluster_or_skip!("leader_killed_mid_drain_then_restarted");
    let env = setup("leaderkill", cluster, 3).await;
    let expected: Expected = Arc::default();
    let outbox = env.builder().connect().await.expect("connect");
    write(&outbox, &env, &expected, "b", 30, 200).await; // 6,000 events of backlog
    let stop = CancellationToken::new();
    let writer = spawn_writer(outbox.clone(), &env, expected.clone(), stop.clone());
    let handle = outbox.start().expect("start");

    // Mid-drain: some but not all of the backlog is delivered.
    support::eventually(Duration::from_secs(60), "the drain under way", || async {
        let s = statuses(&env).await;
        match (s.get("done"), s.get("new")) {
            (Some(&d), Some(_)) if d >= 500 => Ok(()),
            _ => Err(format!("{s:?}")),
        }
    })
    .await;
    let leader = cluster
        .leader(&env.topic, 0)
        .await
        .expect("partition 0 has a leader");
    let before = cluster.describe(&env.topic).await;
    cluster.kill(leader).await;
    let pending_at_kill = statuses(&env).await.get("new").copied().unwrap_or(0);
    assert!(pending_at_kill > 0, "the kill came after the drain ended");
    // The controller fences the node after broker.session.timeout.ms (4 s) and elects a new
    // leader from the ISR; when the followers had fallen out of the ISR under load, the
    // partition stays offline until the node is back (unclean election is off). Both happen.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let moved = cluster.leader(&env.topic, 0).await;
    eprintln!(
        "leader {leader} of partition 0 SIGKILLed with {pending_at_kill} events pending; 6 s later \
         the leader is {moved:?}; before the kill:\n{before}"
    );
    cluster.start(leader).await;
    cluster.wait_ready().await;
    stop.cancel();
    writer.await.expect("writer");

    wait_all_done(&env, Duration::from_secs(120)).await;
    support::stop_and_join(&outbox, handle).await;
    read_back_and_check(&env, &expected, "leader killed mid-drain").await;
}

/// A rolling restart (SIGTERM, controlled shutdown, start on its data) of all three nodes, one
/// after the other, while writers write and two relays share the table: everything arrives in
/// order, no dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_writers_and_two_relays() {
    let (_faults, cluster) = fault_cluster_or_skip!("rolling_restart_with_writers_and_two_relays");
    let env = setup("rolling", cluster, 3).await;
    let expected: Expected = Arc::default();
    let a = env.builder().connect().await.expect("connect relay a");
    let b = env.builder().connect().await.expect("connect relay b");
    let stop = CancellationToken::new();
    let writer = spawn_writer(a.clone(), &env, expected.clone(), stop.clone());
    let ha = a.start().expect("start a");
    let hb = b.start().expect("start b");
    for node in cluster.nodes() {
        cluster.stop(node).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.start(node).await;
        cluster.wait_ready().await;
    }
    stop.cancel();
    writer.await.expect("writer");
    wait_all_done(&env, Duration::from_secs(120)).await;
    support::stop_and_join(&a, ha).await;
    support::stop_and_join(&b, hb).await;
    read_back_and_check(&env, &expected, "rolling restart").await;
}

/// Kills `down` nodes, writes 40 events, and checks for `hold` (longer than the publish timeout)
/// that nothing is marked delivered and nothing dead-lettered, with `max_attempts(1)`: a failure
/// of the cluster (a timeout, no leader, not enough replicas) must not count as an attempt of
/// the event, or the first timeout would make each aggregate's first event a dead letter. Then
/// starts the nodes again and checks that everything arrives, in order, with no attempt
/// counted; meanwhile health names the Kafka problem and stats count the unavailable attempts.
async fn outage(name: &str, down: &[i32], publish_timeout: Duration, hold: Duration) {
    let Some((_faults, cluster)) = support::fault_cluster().await else {
        eprintln!("{name}: skipped: needs a real Kafka cluster (Java; not OUTBOX_TEST_KAFKA=mock)");
        return;
    };
    let env = setup(name, cluster, 1).await;
    let expected: Expected = Arc::default();
    let outbox = env
        .builder()
        .publish_timeout(publish_timeout)
        .lease(publish_timeout + Duration::from_secs(10))
        .shutdown_timeout(Duration::from_secs(5))
        .retry_backoff(Duration::from_millis(200), Duration::from_secs(1))
        .max_attempts(1)
        .connect()
        .await
        .expect("connect");
    let handle = outbox.start().expect("start");
    // One event through first: the relay's producer knows the cluster.
    write(&outbox, &env, &expected, "warm", 1, 1).await;
    wait_all_done(&env, Duration::from_secs(60)).await;

    for &n in down {
        cluster.kill(n).await;
    }
    write(&outbox, &env, &expected, "o", 4, 10).await;
    let deadline = tokio::time::Instant::now() + hold;
    // Health names the outage while it lasts: once it has named it (the first batch's reports
    // are overdue), at every poll until the nodes are back — also between a held batch's purge
    // and the next batch's overdue reports (CI once saw it clear there).
    let started = tokio::time::Instant::now();
    let mut problem_seen = None;
    let mut cleared = Vec::new();
    // `health()` failing (its status query) is not a health that is clear: kept apart (CI once
    // counted such a failure, 6.6 s into the outage, as "clear" while the Kafka problem stayed
    // recorded from the outage's start to its end).
    let mut health_errors = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let problem = match outbox.health().await {
            Ok(h) => h.kafka_problem,
            Err(e) => {
                health_errors.push(format!("{:?}: {e}", started.elapsed()));
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        match (&problem_seen, problem) {
            (None, p) => problem_seen = p,
            (Some(_), None) => cleared.push(started.elapsed()),
            (Some(_), Some(_)) => {}
        }
        let s = statuses(&env).await;
        if s.get("done").copied().unwrap_or(0) != 1 {
            let rows: Vec<String> = support::connect_pg()
                .await
                .query(
                    &format!(
                        "select aggregate_id, kafka_partition, kafka_offset, published_at::text \
                         from {} where status = 'done' order by published_at limit 10",
                        env.table
                    ),
                    &[],
                )
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| {
                            let v: (String, Option<i32>, Option<i64>, Option<String>) =
                                (r.get(0), r.get(1), r.get(2), r.get(3));
                            format!("{v:?}")
                        })
                        .collect()
                })
                .unwrap_or_default();
            let describe = cluster.describe(&env.topic).await;
            panic!(
                "{name}: events marked delivered while nodes {down:?} are down: {s:?}\n\
                 done rows: {rows:#?}\ntopic: {describe}"
            );
        }
        assert_eq!(
            s.get("failed"),
            None,
            "{name}: dead letters during the outage: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let health = outbox.health().await.expect("health");
    eprintln!(
        "{name}: during the outage: {problem_seen:?}; at its end: {health:?} {:?}; health() failed: {health_errors:?}",
        outbox.stats()
    );
    assert!(
        problem_seen.is_some(),
        "{name}: health names the Kafka problem during the outage: {health:?}"
    );
    assert!(
        cleared.is_empty(),
        "{name}: health's Kafka problem was clear during the outage at {cleared:?} after it began"
    );
    // Postgres is up throughout: a failing `health()` is a bug of its own, unless it is a blip.
    assert!(
        health_errors.len() <= 2,
        "{name}: health() failed during the outage: {health_errors:?}"
    );
    for &n in down {
        cluster.start(n).await;
    }
    cluster.wait_ready().await;
    wait_all_done(&env, Duration::from_secs(120)).await;
    let charged: i64 = support::connect_pg()
        .await
        .query_one(
            &format!("select count(*) from {} where attempts > 0", env.table),
            &[],
        )
        .await
        .expect("count attempts")
        .get(0);
    assert_eq!(charged, 0, "{name}: the outage counted attempts");
    let health = outbox.health().await.expect("health");
    assert_eq!(
        health.kafka_problem, None,
        "{name}: a delivery clears the Kafka problem"
    );
    support::stop_and_join(&outbox, handle).await;
    read_back_and_check(&env, &expected, name).await;
}

/// Two of three replicas down (NOT_ENOUGH_REPLICAS, or no leader): nothing is marked delivered
/// that acks=all did not acknowledge, nothing is dead-lettered; after the restart all arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_replicas_down_nothing_marked_delivered() {
    outage(
        "two_down",
        &[1, 2],
        Duration::from_secs(3),
        Duration::from_secs(8),
    )
    .await;
}

/// The whole cluster down for longer than `publish_timeout`, then back: zero dead letters,
/// everything delivered in order. The outage lasts 30 s: with every broker down, librdkafka
/// reported the first "Message timed out" about 20 s after the events were sent (not after
/// `publish_timeout`, 3 s), and with `max_attempts(1)` that first report made a dead letter
/// before the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_down_longer_than_publish_timeout() {
    outage(
        "all_down",
        &[1, 2, 3],
        Duration::from_secs(3),
        Duration::from_secs(30),
    )
    .await;
}

// ----------------------------------------------------------------------------------------------
// Security: TLS + SASL/SCRAM, ACLs (the shared cluster's SASL_SSL listener; no node faults)
// ----------------------------------------------------------------------------------------------

/// The shared cluster of `scripts/test`, else the private fault cluster (with its guard).
async fn some_cluster() -> Option<(
    Option<tokio::sync::MutexGuard<'static, ()>>,
    &'static Cluster,
)> {
    if let Some(c) = support::shared_cluster() {
        return Some((None, c));
    }
    support::fault_cluster().await.map(|(g, c)| (Some(g), c))
}

/// A builder on the SASL_SSL listener as the cluster's SCRAM-SHA-512 user, with `password`.
fn sasl_builder(env: &Env, cluster: &Cluster, password: &str) -> OutboxBuilder {
    let (user, _) = cluster.sasl_credentials();
    env.builder()
        .kafka_brokers(cluster.sasl_brokers())
        .kafka_property("security.protocol", "SASL_SSL")
        .kafka_property("sasl.mechanisms", "SCRAM-SHA-512")
        .kafka_property("sasl.username", user)
        .kafka_property("sasl.password", password)
        .kafka_property("ssl.ca.location", cluster.ca_file().display().to_string())
}

/// TLS + SASL_SSL with SCRAM-SHA-512 (`kafka-ssl` feature): the relay publishes through the
/// encrypted, authenticated listener; with a wrong password nothing is delivered, the event stays
/// pending with no attempt counted (`max_attempts(1)`: not a dead letter), its stored error and
/// health name the authentication failure (librdkafka reports it through its error callback, not
/// on the message, whose own error is only "Local: Message timed out"), and the password appears
/// in no error text.
#[cfg(feature = "kafka-ssl")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_scram_delivers_and_a_wrong_password_is_a_clear_error() {
    let Some((_guard, cluster)) = some_cluster().await else {
        eprintln!("sasl_ssl: skipped: needs a real Kafka cluster");
        return;
    };
    let env = setup("sasl", cluster, 1).await;
    let (_, password) = cluster.sasl_credentials();
    let expected: Expected = Arc::default();
    let outbox = sasl_builder(&env, cluster, &password)
        .connect()
        .await
        .expect("connect over SASL_SSL");
    let handle = outbox.start().expect("start");
    write(&outbox, &env, &expected, "s", 5, 4).await;
    wait_all_done(&env, Duration::from_secs(60)).await;
    support::stop_and_join(&outbox, handle).await;
    read_back_and_check(&env, &expected, "SASL_SSL").await;

    // A wrong password: the events stay pending with an error about authentication.
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());
    let env = setup("sasl_bad", cluster, 1).await;
    let outbox = sasl_builder(&env, cluster, &wrong)
        .max_attempts(1)
        .publish_timeout(Duration::from_secs(3))
        .lease(Duration::from_secs(13))
        .shutdown_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect (the broker is reached only when publishing)");
    let handle = outbox.start().expect("start");
    let mut client = outbox::testing::connect(&env.pg).await.expect("connect pg");
    let tx = client.transaction().await.unwrap();
    let id = outbox
        .add_new_event(&tx, NewEvent::new(env.topic.as_str(), "a", "t", json!({})))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let error = support::eventually(Duration::from_secs(60), "an error on the event", || async {
        let events = outbox
            .find(&outbox::EventFilter::new().ids([id]))
            .await
            .map_err(|e| e.to_string())?;
        match events
            .first()
            .and_then(|e| e.last_error().map(str::to_string))
        {
            Some(e) => Ok((e, events[0].status())),
            None => Err(format!("{events:?}")),
        }
    })
    .await;
    eprintln!("wrong password: {error:?}");
    assert_ne!(
        error.1,
        outbox::EventStatus::Done,
        "delivered with a wrong password"
    );
    assert_eq!(
        error.1,
        outbox::EventStatus::New,
        "a wrong password is not the event's fault: {error:?}"
    );
    let text = error.0.to_lowercase();
    assert!(
        text.contains("auth") || text.contains("sasl"),
        "the stored error names authentication: {}",
        error.0
    );
    let health = outbox.health().await.expect("health");
    let problem = health.kafka_problem.clone().unwrap_or_default();
    assert!(
        problem.to_lowercase().contains("auth") && !problem.contains(&wrong),
        "health names the authentication failure (without the password): {health:?}"
    );
    assert!(
        !error.0.contains(&wrong),
        "the password leaked into the error: {}",
        error.0
    );
    assert!(
        !format!("{outbox:?}").contains(&wrong),
        "the password leaked into Debug"
    );
    support::stop_and_join(&outbox, handle).await;
    assert!(
        !statuses(&env).await.contains_key("done"),
        "nothing delivered with a wrong password"
    );
}

/// ACLs (StandardAuthorizer): the relay's principal is denied Write on one topic; that topic's
/// events are charged an attempt per refusal (a refusal can be transient) and become dead letters
/// after `max_attempts` (2 here), their error naming authorization, while another topic's
/// events flow.
#[cfg(feature = "kafka-ssl")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_denied_topic_is_dead_lettered_others_flow() {
    let Some((_guard, cluster)) = some_cluster().await else {
        eprintln!("acl: skipped: needs a real Kafka cluster");
        return;
    };
    let env = setup("acl_ok", cluster, 1).await;
    let denied = support::unique_name("acl_denied");
    outbox::testing::create_topic(&env.brokers, &denied, 1)
        .await
        .unwrap_or_else(|e| panic!("creating {denied}: {e}"));
    let (user, password) = cluster.sasl_credentials();
    cluster
        .control(&[
            "tool",
            "org.apache.kafka.tools.AclCommand",
            "--bootstrap-server",
            &env.brokers,
            "--add",
            "--deny-principal",
            &format!("User:{user}"),
            "--operation",
            "Write",
            "--topic",
            &denied,
        ])
        .await;
    let outbox = sasl_builder(&env, cluster, &password)
        .publish_timeout(Duration::from_secs(10))
        .max_attempts(2)
        .retry_backoff(Duration::from_millis(100), Duration::from_millis(500))
        .connect()
        .await
        .expect("connect");
    let handle = outbox.start().expect("start");
    let mut client = outbox::testing::connect(&env.pg).await.expect("connect pg");
    let tx = client.transaction().await.unwrap();
    let denied_ids = outbox
        .add_new_events(
            &tx,
            &(0..3)
                .map(|i| NewEvent::new(denied.as_str(), format!("d-{i}"), "t", json!({ "n": 0 })))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let expected: Expected = Arc::default();
    write(&outbox, &env, &expected, "ok", 5, 4).await;

    let dead = support::eventually(
        Duration::from_secs(60),
        "the denied topic's dead letters",
        || async {
            let events = outbox
                .find(&outbox::EventFilter::new().ids(denied_ids.iter().copied()))
                .await
                .map_err(|e| e.to_string())?;
            if events.len() == 3
                && events
                    .iter()
                    .all(|e| e.status() == outbox::EventStatus::Failed)
            {
                Ok(events)
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await;
    for e in &dead {
        let error = e.last_error().unwrap_or_default().to_lowercase();
        assert!(
            error.contains("authoriz"),
            "the error names authorization: {error}"
        );
        assert_eq!(e.attempts(), 2, "charged per refusal: {e:?}");
    }
    // The other topic flowed: every event delivered.
    support::eventually(
        Duration::from_secs(60),
        "the allowed topic delivered",
        || async {
            let client = support::connect_pg().await;
            let n: i64 = client
                .query_one(
                    &format!(
                        "select count(*) from {} where event_topic = $1 and status <> 'done'",
                        env.table
                    ),
                    &[&env.topic],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} pending"))
            }
        },
    )
    .await;
    support::stop_and_join(&outbox, handle).await;
    read_back_and_check(&env, &expected, "ACL: allowed topic").await;
}

// ----------------------------------------------------------------------------------------------
// Partition count increase on a live topic
// ----------------------------------------------------------------------------------------------

/// A topic goes from 2 to 6 partitions while the relay runs. What the README states: once the
/// relay's producers see the new count (their metadata refreshes), a key may hash to another
/// partition; its later events go there. Checked: every event arrives (at least once: a replay
/// after a retry is counted, not failed), each key's events are in order within each partition,
/// and — once every producer has refreshed — a key has changed partition at most once, with all
/// its events before the change in the old partition and all after it in the new one — so a
/// consumer reading partitions independently can see a moved key's new events before its old
/// ones. Within the refresh window the main producer (single events) and the pipelining one
/// (runs) may disagree, and a key may alternate: seen in about one run in five when the runs
/// followed at once (README, "Adding partitions to a live topic"); the test waits the window
/// out before the runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_count_increase_moves_keys_once() {
    let Some((_guard, cluster)) = some_cluster().await else {
        eprintln!("partition increase: skipped: needs a real Kafka cluster");
        return;
    };
    let env = setup("grow", cluster, 2).await;
    let expected: Expected = Arc::default();
    let outbox = env
        .builder()
        .kafka_property("topic.metadata.refresh.interval.ms", "1000")
        .connect()
        .await
        .expect("connect");
    let handle = outbox.start().expect("start");
    write(&outbox, &env, &expected, "k", 20, 5).await;
    wait_all_done(&env, Duration::from_secs(60)).await;

    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &env.brokers)
            .create()
            .expect("admin client");
    // The read-back below waits for 6 partitions; with 2 that wait must not pass.
    let early =
        support::wait_for_partitions(&env.brokers, &env.topic, 6, Duration::from_secs(1)).await;
    assert!(early.is_err(), "6 partitions before growing: {early:?}");
    let grow = rdkafka::admin::NewPartitions::new(&env.topic, 6);
    let opts = rdkafka::admin::AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_partitions([&grow], &opts)
        .await
        .expect("CreatePartitions")
    {
        r.unwrap_or_else(|e| panic!("growing {}: {e:?}", env.topic));
    }
    // Rounds of one event per key until the producer uses a new partition, then 5 more.
    support::eventually(
        Duration::from_secs(90),
        "an event in a new partition",
        || async {
            write(&outbox, &env, &expected, "k", 20, 1).await;
            wait_all_done(&env, Duration::from_secs(60)).await;
            let n: i64 = support::connect_pg()
                .await
                .query_one(
                    &format!(
                        "select count(*) from {} where kafka_partition >= 2",
                        env.table
                    ),
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if n > 0 {
                Ok(())
            } else {
                Err("no event in partitions 2..5 yet".into())
            }
        },
    )
    .await;
    // Three refresh intervals: every producer has seen the new count (see above).
    tokio::time::sleep(Duration::from_secs(3)).await;
    write(&outbox, &env, &expected, "k", 20, 5).await;
    wait_all_done(&env, Duration::from_secs(60)).await;
    support::stop_and_join(&outbox, handle).await;

    let expected = expected.lock().unwrap().clone();
    // A broker that has not applied the growth yet still reports 2 partitions: read all 6.
    let mut reader = support::TopicReader::connect_at_least(
        &env.brokers,
        &env.topic,
        6,
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("reading {} with 6 partitions: {e}", env.topic));
    let mut records = read_every_event(&mut reader, &expected, "partition increase").await;
    records.sort_by_key(|r| (r.partition, r.offset));
    // Per key: (counter, partition) of each event's first record, and the check of each
    // partition alone. Delivery is at least once: a replay (a record again after a retry) is
    // counted, not an error, as long as each partition's first records keep counter order.
    let mut by_key: HashMap<String, Vec<(u64, i32)>> = HashMap::new();
    let mut first = std::collections::HashSet::new();
    for r in &records {
        let id = Uuid::parse_str(r.header("event_id").expect("event_id")).expect("uuid");
        if first.insert(id) {
            let (key, counter) = expected.get(&id).expect("an expected event").clone();
            by_key.entry(key).or_default().push((counter, r.partition));
        }
    }
    let replays = records.len() - first.len();
    let mut moved = 0;
    for (key, mut events) in by_key {
        // Within a partition, records come in offset order: counters must increase.
        let mut last: HashMap<i32, u64> = HashMap::new();
        for &(c, p) in &events {
            if let Some(prev) = last.insert(p, c) {
                assert!(prev < c, "{key}: partition {p} has {c} after {prev}");
            }
        }
        events.sort_unstable();
        let switches = events.windows(2).filter(|w| w[0].1 != w[1].1).count();
        assert!(
            switches <= 1,
            "{key} changed partition {switches} times: {events:?}"
        );
        moved += switches;
    }
    eprintln!(
        "partition increase 2 -> 6: {moved} of 20 keys moved once; order held per partition; \
         {replays} replayed records"
    );
    assert!(moved > 0, "no key moved to a new partition");
}
