//! Chaos suite: the `outbox-relay` binary against a real Postgres (a private [`TestPostgres`])
//! and a real Apache Kafka cluster (the private 3-node [`support::fault_cluster`]: replication
//! factor 3, `min.insync.replicas=2`), while the relays are killed and the infrastructure fails.
//!
//! * Writers (three tasks, each paced at about 40 events/s) insert events for ~120 aggregates (skewed: a few hot ones get half of
//!   the events, so batches hold long per-aggregate chains), 1–5 per transaction, each payload
//!   carrying a per-aggregate counter. A counter value is recorded as committed only when
//!   `COMMIT` returned OK. When `COMMIT` fails the outcome is unknown: the events are "maybe",
//!   resolved at the end by looking for their rows (present: committed, so they must arrive;
//!   absent: rolled back, so they must not), and the writer moves the aggregates of that
//!   transaction to fresh ones, so a maybe event is always its aggregate's last and the counter
//!   checks stay exact. Transactions that failed before `COMMIT` are retried with the same
//!   counters (new event ids); their event ids must never be published.
//! * Every round SIGKILLs a relay at a random point, 50–1500 ms after it started (a relay that
//!   was started during the previous round's fault and is older than that: 50–1500 ms after the
//!   round starts), and starts a new one at once, and adds a fault at a random moment of the
//!   round: nothing more (`Kill`); two or three relays at once, one of them killed (`Multi`; the
//!   extras are stopped with SIGTERM in the next round, and must exit 0); the leader of a random
//!   partition SIGKILLed and started again on its data 0.5–5 s later (`BrokerDown`: the leader
//!   moves, in-flight produce requests to it are lost and retried); Postgres restarted (`pg_ctl stop -m fast`) or crashed
//!   (`-m immediate`) and started again (`PgRestart`); the listener's backend terminated
//!   (`ListenerKill`); the batch sessions of one or two relays terminated, at once, while the
//!   partition cannot take writes (two of the three nodes SIGKILLed: no in-sync quorum, then
//!   restarted on their data), or just after they were started again (the batches are then still
//!   publishing when their row locks go away) (`BatchKill`); the relays' Postgres connections
//!   blackholed for 3.5–8 s, below and above their `postgres_timeout` of 5 s (they reach Postgres
//!   through a [`FaultProxy`]: sockets stay open and silent, as with a moved failover address)
//!   (`PgBlackhole`); the waker session terminated (`WakerKill`); two nodes SIGKILLed for two to
//!   three times `publish_timeout` (`LongOutage`); a burst of 300–2,000 events for one to three
//!   fresh aggregates of one partition committed in one to three transactions, and the leader of
//!   that partition SIGKILLed 0–300 ms after the commit, while the relays drain the burst's long
//!   per-aggregate chains, and started again 0.5–5 s later; the round then waits (at most 20 s
//!   from the commit) for the burst to be published (`HotBurst`). The first rounds go through
//!   every kind in turn, later ones are drawn at random.
//! * Broker faults are real: `kill -9` of Kafka nodes and a restart on their data (a node takes
//!   10–30 s to be back on this kind of machine, so the next rounds may run with one or two nodes
//!   still recovering). Before the final phase every node is running again.
//! * Final phase: the writers stop, the running relays get SIGTERM (each must exit 0), one fresh
//!   relay runs until the table has no `new` rows left and is stopped, then the verifier reads the
//!   whole topic and checks, per aggregate in partition order:
//!   - every committed event (by `event_id`) arrived (`lost`), and nothing that was not committed
//!     (`phantoms`);
//!   - after dropping duplicates by `event_id`, counters strictly increase (`order_violations`);
//!   - every duplicate is a contiguous replay (also counted in `order_violations`): a record
//!     whose counter was seen before may only go back or continue by one from the record before
//!     it (a replay starts at any earlier event and runs c, c+1, …; a relay killed in the middle
//!     of a replay may leave a replay that is itself replayed); a new counter may only follow
//!     the highest counter so far (a replay must catch up before anything new is published).
//!
//! It prints one line: `chaos: rounds=N events=E lost=L order_violations=V duplicates=D
//! dead_letters=F rows_with_attempts=A`, and fails on any loss, phantom, violation, dead letter or
//! charged attempt (none of these faults is an event's own, so none may cost an attempt; the
//! relays run with the default `max_attempts`, 10) (and when a running relay does not exit 0 within 15 s
//! of SIGTERM, or a relay panicked), printing the round log, the offending sequences, the
//! rows of lost events and the relays' log tails (each relay's stderr goes to a file; on failure
//! the directory is kept and named).
//!
//! `chaos_short` runs 10 rounds, one of each kind (CI: about 3–4 min). Long mode:
//! `OUTBOX_CHAOS_ROUNDS=60 cargo test --all-features --test it chaos:: -- --nocapture`.
//! `OUTBOX_CHAOS_SEED=n` replays a schedule (not its timing); `OUTBOX_CHAOS_VERBOSE=1` prints
//! the round log as it goes; `OUTBOX_CHAOS_KEEP_LOGS=1` keeps the relay logs of a passing run;
//! `OUTBOX_CHAOS_KINDS=BatchKill,Multi` runs only these kinds of rounds, in turn.
//! Without a real cluster (`OUTBOX_TEST_KAFKA=mock`, or no Java) the test is skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox::{NewEvent, Writer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox::testing::faults::{Fault, FaultProxy};

use crate::support::{self, AggCheck, ConsumedRecord, TestPostgres, TopicReader};

const DEFAULT_ROUNDS: usize = 10;
/// `OUTBOX_PUBLISH_TIMEOUT` of [`RELAY_ENV`].
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(4);
const PARTITIONS: i32 = 4;
const WRITERS: usize = 3;
const SLOTS_PER_WRITER: usize = 40;
/// Each writer's pace (at most; less while Postgres is slow). Chosen when an aggregate's events
/// were published one at a time (one round trip to the cluster each; unpaced, three writers on a
/// loaded 2-core machine wrote 144,703 events in 60 rounds, a quarter of them to three hot
/// aggregates, and the drain could not finish); kept so that the rounds' fault timing and the
/// final drain stay comparable since pipelining (the `HotBurst` rounds load hot aggregates).
const WRITER_EVENTS_PER_S: u64 = 40;
/// How long the final relay may take to publish what is left.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
/// `HotBurst`: events in a burst. The relay publishes an aggregate's events one round trip each,
/// and the round's leader kill and node restart slow that down further: on a loaded 2-core
/// machine it published 30–100 burst events/s during the round (a burst above ~600 events is
/// then not all published within [`BURST_DRAIN_WAIT`] and the rest drains during the next rounds;
/// with a healthy cluster the final relay published 770 left over in 4 s).
const BURST_EVENTS: std::ops::RangeInclusive<usize> = 300..=2000;
/// `HotBurst`: events per INSERT statement of a burst (one transaction holds several).
const BURST_STATEMENT: usize = 500;
/// `HotBurst`: how long the round waits, from the burst's (last) COMMIT, for the burst to be
/// published, so that its backlog does not pile up into the next rounds and the final drain.
const BURST_DRAIN_WAIT: Duration = Duration::from_secs(20);
/// Relay settings (environment of `outbox-relay run`). The lease must exceed the publish timeout
/// by more than 5 s, or a batch has no time to send anything.
const RELAY_ENV: &[(&str, &str)] = &[
    ("OUTBOX_BATCH_SIZE", "100"),
    ("OUTBOX_POLL_INTERVAL", "200ms"),
    ("OUTBOX_PUBLISH_TIMEOUT", "4s"),
    ("OUTBOX_POSTGRES_TIMEOUT", "5s"),
    ("OUTBOX_LEASE", "15s"),
    ("OUTBOX_BATCH_TIMEOUT", "2s"),
    ("OUTBOX_SHUTDOWN_TIMEOUT", "5s"),
    // The default: no fault of the suite is the events' own, so none may become a dead letter.
    ("OUTBOX_MAX_ATTEMPTS", "10"),
    ("OUTBOX_PROGRESS_INTERVAL", "2s"),
    ("OUTBOX_LOG", "info,rdkafka=warn"),
    ("OUTBOX_LOG_FORMAT", "text"),
];
/// Settings of the parent environment that would change what the relays do.
const RELAY_ENV_REMOVED: &[&str] = &[
    "OUTBOX_MAX_IN_FLIGHT",
    "OUTBOX_MAX_IN_FLIGHT_PER_AGGREGATE",
    "OUTBOX_MAX_BATCHES_IN_FLIGHT",
    "OUTBOX_WAKE_MODE",
    "OUTBOX_DEAD_LETTER_POLICY",
    "OUTBOX_ON_DELIVERY",
    "OUTBOX_RETENTION",
    "OUTBOX_PROMPT_PRODUCER",
];
const RELAY_ARGS: &[&str] = &[
    "run",
    "-X",
    "linger.ms=2",
    "-X",
    "reconnect.backoff.max.ms=1000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    let rounds = match std::env::var("OUTBOX_CHAOS_ROUNDS") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("OUTBOX_CHAOS_ROUNDS={v:?}: {e}")),
        _ => DEFAULT_ROUNDS,
    };
    run_chaos(rounds).await;
}

/// The verifier's rules on hand-made sequences.
#[test]
fn chaos_checker_rules() {
    fn violations(seq: &[u64]) -> usize {
        let mut c = AggCheck::default();
        seq.iter().filter(|&&n| c.push(n).is_violation()).count()
    }
    // In order, gaps (lost events are counted elsewhere), replays from any earlier point,
    // a replay replayed, back-to-back duplicates.
    for ok in [
        &[0, 1, 2, 3][..],
        &[0, 2, 5],
        &[0, 1, 2, 0, 1, 2, 3],
        &[0, 1, 2, 3, 2, 3, 4],
        &[0, 1, 2, 0, 1, 0, 1, 2, 3],
        &[0, 1, 1, 2, 2, 3],
        &[0, 1, 2, 3, 3],
    ] {
        assert_eq!(violations(ok), 0, "{ok:?}");
    }
    // Older event after a newer one; new event before the replay caught up; a replay skipping.
    for bad in [
        &[0, 2, 1][..],
        &[0, 1, 2, 0, 3],
        &[0, 1, 2, 3, 1, 3],
        &[0, 1, 2, 1, 2, 0, 2, 3],
    ] {
        assert!(violations(bad) > 0, "{bad:?}");
    }
}

// ----------------------------------------------------------------------------------------------
// The run
// ----------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Kill,
    Multi,
    BrokerDown,
    PgRestart,
    ListenerKill,
    BatchKill,
    /// The relays' Postgres connections go silent (a blackholing proxy: half-open sockets).
    PgBlackhole,
    /// The waker session (writers' NOTIFY arming) is terminated.
    WakerKill,
    /// Two nodes down (no acks=all write possible) for two to three times `publish_timeout`.
    LongOutage,
    /// A burst of hundreds to thousands of events for one to three aggregates of one partition,
    /// that partition's leader SIGKILLed while the relays drain it.
    HotBurst,
}

const ALL_KINDS: [Kind; 10] = [
    Kind::Kill,
    Kind::Multi,
    Kind::BrokerDown,
    Kind::PgRestart,
    Kind::ListenerKill,
    Kind::BatchKill,
    Kind::PgBlackhole,
    Kind::WakerKill,
    Kind::LongOutage,
    Kind::HotBurst,
];

/// The first rounds cover every kind; later ones are drawn at random. `only` (from
/// `OUTBOX_CHAOS_KINDS`, to reproduce a failure) restricts the kinds: drawn from it in turn.
fn kind_of_round(n: usize, rng: &mut StdRng, only: &[Kind]) -> Kind {
    use Kind::*;
    if !only.is_empty() {
        return only[(n - 1) % only.len()];
    }
    const FIRST: [Kind; 10] = [
        Kill,
        Multi,
        BrokerDown,
        PgRestart,
        ListenerKill,
        BatchKill,
        PgBlackhole,
        WakerKill,
        LongOutage,
        HotBurst,
    ];
    if n <= FIRST.len() {
        return FIRST[n - 1];
    }
    match rng.random_range(0..26) {
        0..=5 => Kill,
        6..=9 => Multi,
        10..=12 => BrokerDown,
        13..=14 => PgRestart,
        15..=16 => ListenerKill,
        17..=18 => BatchKill,
        19..=20 => PgBlackhole,
        21 => WakerKill,
        22..=23 => HotBurst,
        _ => LongOutage,
    }
}

struct Chaos {
    pg: TestPostgres,
    /// The relays reach Postgres through it (`PgBlackhole` rounds).
    pg_proxy: FaultProxy,
    /// Set: the writers pause (`WakerKill` rounds: a relay opens its waker session only once it
    /// has caught up and waits).
    quiet: Arc<AtomicBool>,
    kafka: &'static support::Cluster,
    table: String,
    topic: String,
    relays: Relays,
    rng: StdRng,
    started: Instant,
    verbose: bool,
    /// One line per round (and per notable thing).
    log: Vec<String>,
    /// Round number and its wall-clock window (ms since the epoch).
    windows: Vec<(usize, i64, i64)>,
    /// Relays that exited by themselves (not killed, not stopped by us).
    self_exits: Vec<String>,
    /// The last round that restarted Postgres.
    last_pg_restart: usize,
    /// Events of the `HotBurst` rounds, recorded as a writer's (merged with the writers' logs
    /// for the verifier).
    burst_log: WriterLog,
    /// Each burst aggregate and the partition computed for it (checked against where its
    /// records were read: the round must have killed the leader of the right partition).
    burst_partitions: BTreeMap<String, i32>,
}

impl Chaos {
    fn note(&mut self, line: String) {
        let line = format!("[{:6.1}s] {line}", self.started.elapsed().as_secs_f64());
        if self.verbose {
            eprintln!("{line}");
        }
        self.log.push(line);
    }

    /// Notes relays that exited by themselves; `expected` while Postgres was restarted (a relay
    /// that starts while it is down exits with code 4).
    fn reap(&mut self, round: usize, expected: bool) {
        for line in self.relays.reap(round) {
            if !expected {
                self.self_exits.push(line.clone());
            }
            self.note(line);
        }
    }

    async fn round(&mut self, n: usize, kind: Kind) {
        let wall_start = now_ms();
        let round_start = Instant::now();
        self.reap(n, self.last_pg_restart + 1 == n);
        let target = match kind {
            Kind::Multi => self.rng.random_range(2..=3),
            Kind::BatchKill => self.rng.random_range(1..=2),
            _ => 1,
        };
        // Extras of a previous Multi or BatchKill round: stopped gracefully (they must exit 0).
        while self.relays.running.len() > target {
            let id = self.relays.running[0].id;
            let line = self.relays.stop(id, Duration::from_secs(15)).await;
            self.note(format!("round {n}: trimmed {line}"));
        }
        while self.relays.running.len() < target {
            self.relays.start(n);
        }
        let victim = if kind == Kind::Multi {
            let i = self.rng.random_range(0..self.relays.running.len());
            &self.relays.running[i]
        } else {
            self.relays
                .running
                .iter()
                .max_by_key(|r| r.started)
                .expect("one relay runs")
        };
        let (victim_id, victim_started) = (victim.id, victim.started);
        let kill_after = Duration::from_millis(self.rng.random_range(50..=1500));
        let kill_at = victim_started.max(round_start) + kill_after;
        let fault_at = Duration::from_millis(self.rng.random_range(0..=1200));
        let params = FaultParams {
            pause: Duration::from_millis(self.rng.random_range(500..=5000)),
            crash: self.rng.random_bool(0.5),
            down: Duration::from_millis(self.rng.random_range(0..=800)),
            mode: self.rng.random_range(0..3),
        };

        let relays = &mut self.relays;
        let pg = &self.pg;
        let proxy = &self.pg_proxy;
        let quiet = &self.quiet;
        let kafka = self.kafka;
        let topic = self.topic.as_str();
        let partition = self.rng.random_range(0..PARTITIONS);
        let burst = (kind == Kind::HotBurst).then(|| {
            let plan = BurstPlan::draw(&mut self.rng, n, partition, params.pause);
            for a in &plan.aggregates {
                self.burst_partitions.insert(a.clone(), partition);
            }
            plan
        });
        let table = self.table.as_str();
        let burst_log = &mut self.burst_log;
        let (killed, fault) = tokio::join!(
            async {
                tokio::time::sleep_until(kill_at.into()).await;
                let line = relays.kill(victim_id);
                let replacement = relays.start(n);
                format!("{line}; started relay#{replacement}")
            },
            async {
                tokio::time::sleep(fault_at).await;
                match &burst {
                    Some(plan) => hot_burst(plan, pg, table, kafka, topic, burst_log).await,
                    None => {
                        apply_fault(kind, &params, (pg, proxy, quiet), kafka, topic, partition)
                            .await
                    }
                }
            }
        );
        self.note(format!(
            "round {n} {kind:?}: relays={target}, {killed}; fault at {}ms: {fault}",
            fault_at.as_millis()
        ));
        // Relays started while Postgres was down exit (code 4): start others.
        if kind == Kind::PgRestart {
            self.last_pg_restart = n;
        }
        self.reap(n, kind == Kind::PgRestart);
        while self.relays.running.len() < target {
            self.relays.start(n);
        }
        self.windows.push((n, wall_start, now_ms()));
    }
}

struct FaultParams {
    pause: Duration,
    crash: bool,
    down: Duration,
    mode: u8,
}

/// Kills (SIGKILL) the leader of `topic`/`partition` and, when it has none, node 1; returns
/// the node.
async fn kill_leader(kafka: &support::Cluster, topic: &str, partition: i32) -> i32 {
    let node = kafka.leader(topic, partition).await.unwrap_or(1);
    kafka.kill(node).await;
    node
}

/// SIGKILLs two nodes, the leader of `topic`/`partition` first: no partition can take writes
/// with acks=all (`min.insync.replicas=2`) and the controller quorum is gone.
async fn kill_two(kafka: &support::Cluster, topic: &str, partition: i32) -> [i32; 2] {
    let first = kill_leader(kafka, topic, partition).await;
    let second = if first == 1 { 2 } else { 1 };
    kafka.kill(second).await;
    [first, second]
}

async fn apply_fault(
    kind: Kind,
    p: &FaultParams,
    (pg, proxy, quiet): (&TestPostgres, &FaultProxy, &AtomicBool),
    kafka: &support::Cluster,
    topic: &str,
    partition: i32,
) -> String {
    match kind {
        Kind::Kill | Kind::Multi => "none".to_string(),
        Kind::HotBurst => unreachable!("HotBurst rounds run hot_burst"),
        Kind::PgBlackhole => {
            // 3.5–8 s: below and above the relays' postgres_timeout (5 s).
            let silent = p.pause + Duration::from_secs(3);
            proxy.set_fault(Fault::Blackhole);
            tokio::time::sleep(silent).await;
            proxy.set_fault(Fault::None);
            format!(
                "the relays' Postgres connections blackholed for {}ms ({} open)",
                silent.as_millis(),
                proxy.open_connections()
            )
        }
        Kind::WakerKill => {
            quiet.store(true, Ordering::Relaxed);
            let killed =
                terminate_when_present(pg, "outbox-relay-waker", Duration::from_secs(10)).await;
            quiet.store(false, Ordering::Relaxed);
            match killed {
                Ok(n) => format!("writers paused; terminated {n} waker backend(s)"),
                Err(e) => format!("terminating waker backends failed: {e}"),
            }
        }
        Kind::LongOutage => {
            let out = PUBLISH_TIMEOUT * 2 + p.pause / 2;
            let killed = kill_two(kafka, topic, partition).await;
            tokio::time::sleep(out).await;
            for node in killed {
                kafka.start(node).await;
            }
            format!(
                "nodes {killed:?} SIGKILLed for {}ms (publish_timeout {}ms), started again",
                out.as_millis(),
                PUBLISH_TIMEOUT.as_millis()
            )
        }
        Kind::BrokerDown => {
            let node = kill_leader(kafka, topic, partition).await;
            tokio::time::sleep(p.pause).await;
            kafka.start(node).await;
            format!(
                "node {node} (leader of partition {partition}) SIGKILLed, started again after {}ms",
                p.pause.as_millis()
            )
        }
        Kind::PgRestart => {
            let t = Instant::now();
            if p.crash {
                pg.crash().await.expect("crashing Postgres");
                tokio::time::sleep(p.down).await;
            } else {
                pg.stop().await.expect("stopping Postgres");
            }
            pg.start_again()
                .await
                .unwrap_or_else(|e| panic!("starting Postgres again: {e}\n{}", pg.log()));
            format!(
                "Postgres {} and started again ({}ms down)",
                if p.crash { "crashed" } else { "stopped (fast)" },
                t.elapsed().as_millis()
            )
        }
        Kind::ListenerKill => {
            match terminate_when_present(pg, "outbox-relay-listener", Duration::from_secs(5)).await
            {
                Ok(n) => format!("terminated {n} listener backend(s)"),
                Err(e) => format!("terminating listener backends failed: {e}"),
            }
        }
        Kind::BatchKill => {
            // Mode 0: at once. Mode 1: while the broker is unavailable (the batches wait for
            // delivery reports). Mode 2: just after the broker came back, while the batches
            // publish the backlog in per-aggregate chains. In modes 1 and 2 the batches are still
            // publishing when their sessions, and so their row locks, go away.
            let stop = p.pause.min(Duration::from_millis(3000));
            let mut killed = [0; 2];
            if p.mode > 0 {
                killed = kill_two(kafka, topic, partition).await;
            }
            if p.mode == 1 {
                tokio::time::sleep(p.down.min(stop)).await;
            }
            let during = if p.mode == 1 {
                terminate_backends(pg, "outbox-relay-batch").await
            } else {
                Ok(0)
            };
            if p.mode > 0 {
                tokio::time::sleep(stop.saturating_sub(p.down)).await;
                for node in killed {
                    kafka.start(node).await;
                }
            }
            if p.mode == 2 {
                tokio::time::sleep(p.down / 4).await;
            }
            let terminated = if p.mode == 1 {
                during
            } else {
                terminate_backends(pg, "outbox-relay-batch").await
            };
            let what = match terminated {
                Ok(n) => format!("terminated {n} batch backend(s)"),
                Err(e) => format!("terminating batch backends failed: {e}"),
            };
            match p.mode {
                0 => what,
                1 => format!(
                    "{what} {}ms after nodes {killed:?} were SIGKILLed (started again {}ms later)",
                    p.down.min(stop).as_millis(),
                    stop.max(p.down).as_millis()
                ),
                _ => format!(
                    "{what} {}ms after nodes {killed:?}, SIGKILLed for {}ms, were started again",
                    (p.down / 4).as_millis(),
                    stop.saturating_sub(p.down).as_millis()
                ),
            }
        }
    }
}

async fn terminate_backends(pg: &TestPostgres, application_name: &str) -> Result<i64, String> {
    let client = pg.connect().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "select count(*) filter (where pg_terminate_backend(pid))
               from pg_stat_activity where application_name = $1",
            &[&application_name],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// [`terminate_backends`] once a session named `application_name` exists (a relay started in
/// this round may not have opened it yet), waiting at most `within`.
async fn terminate_when_present(
    pg: &TestPostgres,
    application_name: &str,
    within: Duration,
) -> Result<i64, String> {
    let deadline = Instant::now() + within;
    loop {
        let n = terminate_backends(pg, application_name).await?;
        if n > 0 || Instant::now() >= deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----------------------------------------------------------------------------------------------
// HotBurst rounds
// ----------------------------------------------------------------------------------------------

/// Kafka's `murmur2` of a key (`org.apache.kafka.common.utils.Utils.murmur2`; librdkafka's
/// `murmur2`/`murmur2_random` partitioners, the relay's default, compute the same).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition the relay's producer (and Java's default partitioner) puts `key` on.
fn partition_of_key(key: &str, partitions: i32) -> i32 {
    ((murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions as u32) as i32
}

/// The hash against the test vectors of Kafka's `UtilsTest.testMurmur2`.
#[test]
fn chaos_murmur2_is_kafkas() {
    for (key, java) in [
        (&b"21"[..], -973_932_308i32),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ] {
        assert_eq!(
            murmur2(key) as i32,
            java,
            "{:?}",
            String::from_utf8_lossy(key)
        );
    }
}

/// What a `HotBurst` round writes and when it kills.
struct BurstPlan {
    partition: i32,
    /// Fresh aggregates, all on `partition` (counters start at 0).
    aggregates: Vec<String>,
    /// The aggregate (index into `aggregates`) of each event, in insertion order.
    events: Vec<usize>,
    /// Sizes of the burst's transactions, committed one after the other.
    txns: Vec<usize>,
    /// From the (last) COMMIT to the SIGKILL of the partition's leader.
    kill_delay: Duration,
    /// How long the node stays down.
    pause: Duration,
}

impl BurstPlan {
    fn draw(rng: &mut StdRng, round: usize, partition: i32, pause: Duration) -> BurstPlan {
        let count = rng.random_range(1..=3usize);
        // Fresh names (no writer's aggregate is called so) that hash to `partition`.
        let aggregates: Vec<String> = (0..)
            .map(|k| format!("hot{round:03}-{k}"))
            .filter(|a| partition_of_key(a, PARTITIONS) == partition)
            .take(count)
            .collect();
        let total = rng.random_range(BURST_EVENTS);
        // Interleaved; the first aggregate is the hottest.
        let events: Vec<usize> = (0..total)
            .map(|_| {
                if count == 1 || rng.random_bool(0.6) {
                    0
                } else {
                    rng.random_range(1..count)
                }
            })
            .collect();
        let n_txns = match rng.random_range(0..10) {
            0..=5 => 1,
            6..=8 => 2,
            _ => 3,
        };
        let mut cuts = std::collections::BTreeSet::new();
        while cuts.len() < n_txns - 1 {
            cuts.insert(rng.random_range(1..total));
        }
        cuts.insert(total);
        let mut txns = Vec::with_capacity(n_txns);
        let mut from = 0;
        for cut in cuts {
            txns.push(cut - from);
            from = cut;
        }
        BurstPlan {
            partition,
            aggregates,
            events,
            txns,
            kill_delay: Duration::from_millis(rng.random_range(0..=300)),
            pause,
        }
    }
}

/// A connection for the burst, retried for up to 5 s (Postgres may still be starting after a
/// previous round).
async fn burst_client(pg: &TestPostgres) -> Option<tokio_postgres::Client> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match outbox::testing::connect(&pg.config()).await {
            Ok(c) => return Some(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(_) => return None,
        }
    }
}

/// The burst's events still `new` (not yet published); `None` when Postgres does not answer.
async fn burst_pending(
    client: &mut Option<tokio_postgres::Client>,
    pg: &TestPostgres,
    table: &str,
    aggregates: &[String],
) -> Option<i64> {
    if !matches!(client, Some(c) if !c.is_closed()) {
        *client = outbox::testing::connect(&pg.config()).await.ok();
    }
    let c = client.as_ref()?;
    c.query_one(
        &format!("select count(*) from {table} where aggregate_id = any($1) and status = 'new'"),
        &[&aggregates],
    )
    .await
    .ok()
    .map(|r| r.get(0))
}

/// The `HotBurst` fault: writes the burst (recorded in `log` as the writers record theirs),
/// SIGKILLs the partition's leader `kill_delay` after the COMMIT, starts it again after `pause`,
/// and waits (up to [`BURST_DRAIN_WAIT`] from the COMMIT) until the burst is published.
async fn hot_burst(
    plan: &BurstPlan,
    pg: &TestPostgres,
    table: &str,
    kafka: &support::Cluster,
    topic: &str,
    log: &mut WriterLog,
) -> String {
    let writer = Writer::new(table).expect("valid table name");
    // The leader is looked up first, so that the kill follows the COMMIT by `kill_delay` and not
    // by a metadata request.
    let leader = kafka.leader(topic, plan.partition).await;
    let mut client = burst_client(pg).await;
    let mut counters = vec![0u64; plan.aggregates.len()];
    let (mut committed, mut maybe, mut failed, mut txns) = (0usize, 0usize, 0u64, 0usize);
    let mut commit_ms = 0;
    let mut last_commit = None;
    let mut from = 0;
    'txns: for &size in &plan.txns {
        let planned: Vec<(usize, u64)> = {
            let mut next = counters.clone();
            plan.events[from..from + size]
                .iter()
                .map(|&a| {
                    next[a] += 1;
                    (a, next[a] - 1)
                })
                .collect()
        };
        from += size;
        let events: Vec<NewEvent> = planned
            .iter()
            .map(|&(a, counter)| {
                let agg = plan.aggregates[a].as_str();
                NewEvent::new(
                    topic,
                    agg,
                    "counted",
                    json!({ "w": "burst", "agg": agg, "n": counter }),
                )
            })
            .collect();
        // Like the writers: a transaction that fails before COMMIT is retried with the same
        // counters (new event ids, never to be published); a failed COMMIT makes its events
        // "maybe" and ends the burst, so they are their aggregates' last.
        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts > 3 {
                break 'txns;
            }
            if !matches!(&client, Some(c) if !c.is_closed()) {
                client = burst_client(pg).await;
            }
            let Some(c) = client.as_mut() else {
                break 'txns;
            };
            let t = Instant::now();
            let tx = match c.transaction().await {
                Ok(tx) => tx,
                Err(_) => {
                    failed += 1;
                    log.failed += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let mut ids = Vec::with_capacity(events.len());
            let mut inserted = true;
            for part in events.chunks(BURST_STATEMENT) {
                match writer.add_new_events(&tx, part).await {
                    Ok(v) => ids.extend(v),
                    Err(_) => {
                        inserted = false;
                        break;
                    }
                }
            }
            if !inserted {
                let _ = tx.rollback().await;
                log.rolled_back.extend(ids);
                failed += 1;
                log.failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let outcome = tx.commit().await;
            last_commit = Some(Instant::now());
            commit_ms += t.elapsed().as_millis();
            match outcome {
                Ok(()) => {
                    for (id, &(a, counter)) in ids.iter().zip(&planned) {
                        log.committed
                            .push((*id, plan.aggregates[a].clone(), counter));
                        counters[a] = counter + 1;
                    }
                    committed += ids.len();
                    txns += 1;
                    log.txns += 1;
                    break;
                }
                Err(_) => {
                    for (id, &(a, counter)) in ids.iter().zip(&planned) {
                        log.maybe.push((*id, plan.aggregates[a].clone(), counter));
                    }
                    maybe += ids.len();
                    log.unknown += 1;
                    break 'txns;
                }
            }
        }
    }
    let commit_at = last_commit.unwrap_or_else(Instant::now);
    tokio::time::sleep_until((commit_at + plan.kill_delay).into()).await;
    let node = match leader {
        Some(node) => node,
        None => kafka.leader(topic, plan.partition).await.unwrap_or(1),
    };
    // SIGKILL straight from here: `kafka-cluster kill` (run next, to wait until the node is gone)
    // takes a second or two on a loaded machine before its signal.
    let pid =
        std::fs::read_to_string(kafka.dir().join(format!("node{node}/pid"))).unwrap_or_default();
    let direct = match pid.trim() {
        "" => false,
        pid => Command::new("kill")
            .args(["-KILL", pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
    };
    if !direct {
        kafka.kill(node).await;
    }
    let killed_after = commit_at.elapsed();
    let left_at_kill = burst_pending(&mut client, pg, table, &plan.aggregates).await;
    if direct {
        kafka.kill(node).await;
    }
    tokio::time::sleep(plan.pause).await;
    kafka.start(node).await;
    let mut left = None;
    let drained = loop {
        left = burst_pending(&mut client, pg, table, &plan.aggregates)
            .await
            .or(left);
        if left == Some(0) {
            break Some(commit_at.elapsed());
        }
        if commit_at.elapsed() >= BURST_DRAIN_WAIT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sizes: Vec<String> = plan
        .aggregates
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let n = plan.events.iter().filter(|&&e| e == i).count();
            format!("{a}: {n}")
        })
        .collect();
    format!(
        "burst of {} events ({}) on partition {}, {committed} committed in {txns} of {} transactions ({maybe} maybe, {failed} failed attempts; {commit_ms}ms); node {node} (leader of partition {}{}) SIGKILLed{} {}ms after the commit (planned {}ms), {} of the burst not yet confirmed then; started again after {}ms; {}",
        plan.events.len(),
        sizes.join(", "),
        plan.partition,
        plan.txns.len(),
        plan.partition,
        if leader.is_some() { "" } else { ": none known, guessed" },
        if direct { "" } else { " (by kafka-cluster)" },
        killed_after.as_millis(),
        plan.kill_delay.as_millis(),
        left_at_kill.map_or("?".to_string(), |n| n.to_string()),
        plan.pause.as_millis(),
        match drained {
            Some(d) => format!("burst published {:.1}s after the commit", d.as_secs_f64()),
            None => format!(
                "burst NOT all published {}s after the commit ({} left; the next rounds and the final drain go on)",
                BURST_DRAIN_WAIT.as_secs(),
                left.map_or("?".to_string(), |n| n.to_string())
            ),
        }
    )
}

async fn run_chaos(rounds: usize) {
    let Some((_faults, kafka)) = support::fault_cluster().await else {
        eprintln!("chaos: skipped: no real Kafka cluster (OUTBOX_TEST_KAFKA=mock, or no Java)");
        return;
    };
    let seed: u64 = std::env::var("OUTBOX_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(rand::random);
    let flag = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
    let verbose = flag("OUTBOX_CHAOS_VERBOSE");
    let keep_logs = flag("OUTBOX_CHAOS_KEEP_LOGS");
    let only: Vec<Kind> = std::env::var("OUTBOX_CHAOS_KINDS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            ALL_KINDS
                .iter()
                .copied()
                .find(|kind| format!("{kind:?}").eq_ignore_ascii_case(k))
                .unwrap_or_else(|| {
                    panic!("OUTBOX_CHAOS_KINDS: unknown kind {k:?} (kinds: {ALL_KINDS:?})")
                })
        })
        .collect();
    let started = Instant::now();
    let start_ms = now_ms();
    let logs = tempfile::Builder::new()
        .prefix("outbox-chaos-")
        .tempdir()
        .expect("temporary directory for the relay logs");

    let pg = TestPostgres::builder()
        .max_connections(300)
        .start()
        .await
        .expect("starting the chaos suite's own Postgres");
    let table = support::unique_name("chaos");
    let channel = support::unique_name("chaos_wake");
    let topic = support::unique_name("chaos");
    {
        let client = pg.connect().await.expect("connecting to Postgres");
        outbox::migrate_table(&client, &table, &channel)
            .await
            .expect("migrating the outbox table");
    }
    let brokers = kafka.brokers();
    outbox::testing::create_topic(&brokers, &topic, PARTITIONS)
        .await
        .unwrap_or_else(|e| panic!("creating topic {topic} on {brokers}: {e}"));

    let pg_proxy = FaultProxy::start(([127, 0, 0, 1], pg.port()).into())
        .await
        .expect("starting the relays' Postgres proxy");
    let mut env: Vec<(String, String)> = vec![
        (
            "DATABASE_URL".into(),
            format!("postgres://postgres@{}/postgres", pg_proxy.host_port()),
        ),
        ("KAFKA_BROKERS".into(), brokers.clone()),
        ("OUTBOX_TABLE".into(), table.clone()),
        ("OUTBOX_CHANNEL".into(), channel.clone()),
    ];
    env.extend(
        RELAY_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let relays = Relays {
        program: PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay")),
        env,
        dir: logs.path().to_path_buf(),
        next_id: 0,
        running: Vec::new(),
        ended: Vec::new(),
        kills: 0,
        bad_stops: Vec::new(),
    };
    let mut chaos = Chaos {
        pg,
        pg_proxy,
        quiet: Arc::new(AtomicBool::new(false)),
        kafka,
        table: table.clone(),
        topic: topic.clone(),
        relays,
        rng: StdRng::seed_from_u64(seed),
        started,
        verbose,
        log: Vec::new(),
        windows: Vec::new(),
        self_exits: Vec::new(),
        last_pg_restart: 0,
        burst_log: WriterLog::default(),
        burst_partitions: BTreeMap::new(),
    };
    chaos.note(format!(
        "seed={seed} rounds={rounds} table={table} topic={topic} brokers={} started_at={} logs={}",
        brokers,
        chrono::DateTime::<chrono::Utc>::from(SystemTime::now() - started.elapsed())
            .format("%H:%M:%S%.3fZ"),
        logs.path().display()
    ));

    // Writers.
    let stop = CancellationToken::new();
    let quiet = chaos.quiet.clone();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(run_writer(
                w,
                chaos.pg.config(),
                table.clone(),
                topic.clone(),
                stop.clone(),
                quiet.clone(),
                seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ))
        })
        .collect();

    chaos.relays.start(0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for n in 1..=rounds {
        let kind = kind_of_round(n, &mut chaos.rng, &only);
        chaos.round(n, kind).await;
    }

    // Final phase: stop the writers, stop the relays, drain with one relay.
    stop.cancel();
    let mut wlog = WriterLog::default();
    for w in writers {
        let l = w.await.expect("writer task");
        wlog.committed.extend(l.committed);
        wlog.maybe.extend(l.maybe);
        wlog.rolled_back.extend(l.rolled_back);
        wlog.txns += l.txns;
        wlog.failed += l.failed;
        wlog.unknown += l.unknown;
    }
    chaos.note(format!(
        "writers stopped: {} committed events in {} transactions, {} failed transactions ({} events never committed), {} unknown outcomes ({} maybe events)",
        wlog.committed.len(),
        wlog.txns,
        wlog.failed,
        wlog.rolled_back.len(),
        wlog.unknown,
        wlog.maybe.len()
    ));
    let bursts = &chaos.burst_log;
    let burst_line = format!(
        "hot bursts: {} committed events for {} aggregates in {} transactions, {} failed attempts, {} unknown outcomes ({} maybe events)",
        bursts.committed.len(),
        chaos.burst_partitions.len(),
        bursts.txns,
        bursts.failed,
        bursts.unknown,
        bursts.maybe.len()
    );
    let bursts = std::mem::take(&mut chaos.burst_log);
    wlog.committed.extend(bursts.committed);
    wlog.maybe.extend(bursts.maybe);
    wlog.rolled_back.extend(bursts.rolled_back);
    chaos.note(burst_line);
    chaos.kafka.heal().await;
    chaos
        .pg
        .start_again()
        .await
        .expect("Postgres running for the final phase");
    chaos.reap(rounds + 1, chaos.last_pg_restart == rounds);
    let ids: Vec<usize> = chaos.relays.running.iter().map(|r| r.id).collect();
    for id in ids {
        let line = chaos.relays.stop(id, Duration::from_secs(15)).await;
        chaos.note(format!("final: {line}"));
    }
    let final_relay = chaos.relays.start(rounds + 1);
    let client = chaos.pg.connect().await.expect("connecting to Postgres");
    let drain_start = Instant::now();
    let mut drained = false;
    let mut pending = -1i64;
    while drain_start.elapsed() < DRAIN_TIMEOUT {
        match client
            .query_one(
                &format!("select count(*) from {table} where status = 'new'"),
                &[],
            )
            .await
        {
            Ok(row) => pending = row.get(0),
            Err(e) => panic!("counting pending rows: {e}"),
        }
        if pending == 0 {
            drained = true;
            break;
        }
        chaos.reap(rounds + 1, false);
        if chaos.relays.running.is_empty() {
            chaos.relays.start(rounds + 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    chaos.note(format!(
        "final: relay#{final_relay} drained the table in {:.1}s (drained={drained}, pending={pending})",
        drain_start.elapsed().as_secs_f64()
    ));
    let ids: Vec<usize> = chaos.relays.running.iter().map(|r| r.id).collect();
    for id in ids {
        let line = chaos.relays.stop(id, Duration::from_secs(15)).await;
        chaos.note(format!("final: {line}"));
    }
    let status_counts: BTreeMap<String, i64> = client
        .query(
            &format!("select status, count(*) from {table} group by status"),
            &[],
        )
        .await
        .expect("status counts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    chaos.note(format!("final: table rows by status {status_counts:?}"));
    let dead_letters = status_counts.get("failed").copied().unwrap_or(0);
    let charged: i64 = client
        .query_one(
            &format!("select count(*) from {table} where attempts > 0"),
            &[],
        )
        .await
        .expect("counting charged rows")
        .get(0);

    // Resolve the unknown outcomes: a row that exists committed.
    let maybe_ids: Vec<Uuid> = wlog.maybe.iter().map(|(id, _, _)| *id).collect();
    let present: HashSet<Uuid> = client
        .query(
            &format!("select id from {table} where id = any($1)"),
            &[&maybe_ids],
        )
        .await
        .expect("looking up maybe events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rolled_back: Vec<Uuid> = wlog.rolled_back.clone();
    let rolled_back_present: i64 = client
        .query_one(
            &format!("select count(*) from {table} where id = any($1)"),
            &[&rolled_back],
        )
        .await
        .expect("looking up rolled-back events")
        .get(0);
    let mut committed: HashMap<Uuid, (String, u64)> = wlog
        .committed
        .iter()
        .map(|(id, agg, n)| (*id, (agg.clone(), *n)))
        .collect();
    let mut not_committed: HashSet<Uuid> = wlog.rolled_back.iter().copied().collect();
    for (id, agg, n) in &wlog.maybe {
        if present.contains(id) {
            committed.insert(*id, (agg.clone(), *n));
        } else {
            not_committed.insert(*id);
        }
    }
    chaos.note(format!(
        "final: {} of {} maybe events committed; {rolled_back_present} rows of never-committed events in the table",
        present.len(),
        maybe_ids.len()
    ));

    // Read the topic back.
    let mut reader = TopicReader::connect(&brokers, &topic, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("reading topic {topic}: {e}"));
    let mut records: Vec<ConsumedRecord> = Vec::new();
    let mut seen_ids: HashSet<Uuid> = HashSet::new();
    let read_start = Instant::now();
    loop {
        let chunk = reader.read_for(Duration::from_millis(1500)).await;
        let idle = chunk.is_empty();
        for r in &chunk {
            if let Some(id) = r.header("event_id").and_then(|s| Uuid::parse_str(s).ok()) {
                seen_ids.insert(id);
            }
        }
        records.extend(chunk);
        let complete = committed.keys().all(|id| seen_ids.contains(id));
        if (complete && idle) || read_start.elapsed() > Duration::from_secs(45) {
            break;
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    // The official Java consumer reads the same topic: same records, keys, values, headers.
    let java =
        support::java_read(chaos.kafka, &topic, records.len(), Duration::from_secs(90)).await;
    support::assert_same_as_java(&records, &java);

    let report = verify(&committed, &not_committed, &records);
    // A burst aggregate read from another partition than computed: its round killed the leader
    // of the wrong partition.
    let mut misplaced: BTreeMap<String, (i32, i32)> = BTreeMap::new();
    for r in &records {
        if let Some(&p) = chaos.burst_partitions.get(r.key_str()) {
            if r.partition != p {
                misplaced.insert(r.key_str().to_string(), (p, r.partition));
            }
        }
    }
    let figures = format!(
        "chaos: rounds={rounds} events={} lost={} order_violations={} duplicates={} dead_letters={dead_letters} rows_with_attempts={charged}",
        committed.len(),
        report.lost.len(),
        report.violations.len(),
        report.duplicates
    );
    println!("{figures}");
    chaos.note(figures.clone());
    chaos.note(format!(
        "relays: {} started, {} SIGKILLed, {} exited by themselves ({} unexpectedly); {} records read",
        chaos.relays.next_id,
        chaos.relays.kills,
        chaos.relays.ended.iter().filter(|r| r.end.contains("by itself")).count(),
        chaos.self_exits.len(),
        records.len()
    ));
    let _ = std::fs::write(logs.path().join("chaos.log"), chaos.log.join("\n"));

    // A relay that panicked is a bug even when nothing was lost.
    let panicked: Vec<String> = chaos
        .relays
        .ended
        .iter()
        .filter(|r| {
            std::fs::read_to_string(&r.log)
                .unwrap_or_default()
                .contains("panicked")
        })
        .map(|r| format!("relay#{} ({})", r.id, r.log.display()))
        .collect();
    let ok = report.lost.is_empty()
        && dead_letters == 0
        && charged == 0
        && report.violations.is_empty()
        && report.phantoms.is_empty()
        && rolled_back_present == 0
        && chaos.relays.bad_stops.is_empty()
        && panicked.is_empty()
        && misplaced.is_empty();
    if !chaos.self_exits.is_empty() {
        eprintln!(
            "chaos: warning: {} relay(s) exited by themselves (not while Postgres restarted):\n  {}",
            chaos.self_exits.len(),
            chaos.self_exits.join("\n  ")
        );
    }
    if ok {
        if verbose {
            eprintln!("chaos: done in {:.1}s", started.elapsed().as_secs_f64());
        }
        if keep_logs {
            eprintln!("chaos: logs kept in {}", logs.keep().display());
        }
        return;
    }

    // Failure: everything that helps to understand it.
    let kept = logs.keep();
    let mut msg = String::new();
    msg.push_str(&format!(
        "{figures}\nseed={seed}; phantoms={}; never-committed rows present={rolled_back_present}; drained={drained}\nburst aggregates read from another partition than computed (computed, read): {misplaced:?}\nrelays not stopping cleanly on SIGTERM: {:?}\nrelays that panicked: {panicked:?}\n\nround log:\n{}\n",
        report.phantoms.len(),
        chaos.relays.bad_stops,
        chaos.log.join("\n")
    ));
    if !report.violations.is_empty() {
        msg.push_str("\norder violations (first 20):\n");
        for v in report.violations.iter().take(20) {
            msg.push_str(&format!(
                "  {} (round {})\n",
                v.text,
                round_at(&chaos.windows, v.timestamp_ms)
            ));
        }
        let mut shown = HashSet::new();
        for v in &report.violations {
            if shown.len() >= 3 || !shown.insert(v.aggregate.clone()) {
                continue;
            }
            msg.push_str(&format!(
                "\n  aggregate {} around {}@{} as read (counter:partition@offset[round +ms], * = duplicate):\n    {}\n",
                v.aggregate,
                v.partition,
                v.offset,
                aggregate_sequence(
                    &records,
                    &committed,
                    &v.aggregate,
                    v.offset,
                    &chaos.windows,
                    start_ms
                )
            ));
        }
    }
    if !report.lost.is_empty() {
        msg.push_str(&format!(
            "\nlost events ({}; first 20 with their rows):\n",
            report.lost.len()
        ));
        let lost: Vec<Uuid> = report.lost.iter().take(20).copied().collect();
        let rows = client
            .query(
                &format!(
                    "select id, seq, aggregate_id, status, attempts, coalesce(last_error, ''),
                            published_at::text, kafka_partition, kafka_offset
                       from {table} where id = any($1) order by seq"
                ),
                &[&lost],
            )
            .await
            .unwrap_or_default();
        for r in &rows {
            let id: Uuid = r.get(0);
            msg.push_str(&format!(
                "  {id} seq={} aggregate={} counter={:?} status={} attempts={} last_error={:?} published_at={:?} partition={:?} offset={:?}\n",
                r.get::<_, i64>(1),
                r.get::<_, String>(2),
                committed.get(&id).map(|c| c.1),
                r.get::<_, String>(3),
                r.get::<_, i32>(4),
                r.get::<_, String>(5),
                r.get::<_, Option<String>>(6),
                r.get::<_, Option<i32>>(7),
                r.get::<_, Option<i64>>(8),
            ));
        }
        if rows.len() < lost.len() {
            msg.push_str(&format!(
                "  ({} of them have no row)\n",
                lost.len() - rows.len()
            ));
        }
    }
    if !report.phantoms.is_empty() {
        msg.push_str(&format!(
            "\nphantoms (published, never committed; first 10): {:?}\n",
            &report.phantoms[..report.phantoms.len().min(10)]
        ));
    }
    msg.push_str(&format!("\nrelays (logs in {}):\n", kept.display()));
    for r in &chaos.relays.ended {
        msg.push_str(&format!(
            "  relay#{} (round {}): {}\n",
            r.id, r.round, r.end
        ));
    }
    let mut tails = 0;
    for r in chaos.relays.ended.iter().rev() {
        let text = std::fs::read_to_string(&r.log).unwrap_or_default();
        if tails < 4 || (tails < 10 && text.contains("ERROR")) {
            tails += 1;
            msg.push_str(&format!(
                "\n--- relay#{} log tail ({}):\n{}\n",
                r.id,
                r.log.display(),
                tail(&text, 25)
            ));
        }
    }
    let _ = std::fs::write(kept.join("failure.txt"), &msg);
    panic!("{msg}");
}

fn round_at(windows: &[(usize, i64, i64)], ts: Option<i64>) -> String {
    let Some(ts) = ts else {
        return "?".into();
    };
    match windows.iter().find(|(_, a, b)| *a <= ts && ts <= *b) {
        Some((n, _, _)) => n.to_string(),
        None => match windows.iter().rev().find(|(_, a, _)| *a <= ts) {
            Some((n, _, _)) => format!("after {n}"),
            None => "before 1".into(),
        },
    }
}

/// The aggregate's records around offset `at` (20 before, 12 after), one per entry:
/// `counter:partition@offset[round +ms since the test started]`, `*` marking duplicates.
fn aggregate_sequence(
    records: &[ConsumedRecord],
    committed: &HashMap<Uuid, (String, u64)>,
    aggregate: &str,
    at: i64,
    windows: &[(usize, i64, i64)],
    start_ms: i64,
) -> String {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut center = 0;
    for r in records.iter().filter(|r| r.key_str() == aggregate) {
        let id = r.header("event_id").and_then(|s| Uuid::parse_str(s).ok());
        let counter = id.and_then(|id| committed.get(&id)).map(|c| c.1);
        let dup = id.is_some_and(|id| !seen.insert(id));
        if r.offset == at {
            center = out.len();
        }
        out.push(format!(
            "{}{}:{}@{}[{} +{}ms]",
            if dup { "*" } else { "" },
            counter.map_or("?".to_string(), |c| c.to_string()),
            r.partition,
            r.offset,
            round_at(windows, r.timestamp_ms),
            r.timestamp_ms.map_or(-1, |t| t - start_ms)
        ));
    }
    let from = center.saturating_sub(20);
    let to = (center + 13).min(out.len());
    format!(
        "{}{}{}",
        if from > 0 { "… " } else { "" },
        out[from..to].join(" "),
        if to < out.len() { " …" } else { "" }
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ----------------------------------------------------------------------------------------------
// Verifier
// ----------------------------------------------------------------------------------------------

struct Violation {
    aggregate: String,
    text: String,
    timestamp_ms: Option<i64>,
    partition: i32,
    offset: i64,
}

struct Report {
    lost: Vec<Uuid>,
    phantoms: Vec<Uuid>,
    violations: Vec<Violation>,
    duplicates: usize,
}

/// `records` sorted by partition and offset (an aggregate lives in one partition, so that is its
/// publication order).
fn verify(
    committed: &HashMap<Uuid, (String, u64)>,
    not_committed: &HashSet<Uuid>,
    records: &[ConsumedRecord],
) -> Report {
    let mut aggs: HashMap<String, AggCheck> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut seen_ids: HashSet<Uuid> = HashSet::new();
    let mut phantoms = Vec::new();
    let mut violations = Vec::new();
    let mut duplicates = 0;
    for r in records {
        let at = format!("{}@{}", r.partition, r.offset);
        let mut violation = |aggregate: &str, text: String| {
            violations.push(Violation {
                aggregate: aggregate.to_string(),
                text: format!("{at} aggregate {aggregate}: {text}"),
                timestamp_ms: r.timestamp_ms,
                partition: r.partition,
                offset: r.offset,
            })
        };
        let Some(id) = r.header("event_id").and_then(|s| Uuid::parse_str(s).ok()) else {
            violation(r.key_str(), "record without a valid event_id header".into());
            continue;
        };
        if !seen_ids.insert(id) {
            duplicates += 1;
        }
        let Some((aggregate, counter)) = committed.get(&id) else {
            if !phantoms.contains(&id) {
                phantoms.push(id);
            }
            if !not_committed.contains(&id) {
                violation(r.key_str(), format!("event {id} was never written"));
            }
            continue;
        };
        let payload: Option<(String, u64)> = r
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .and_then(|v| Some((v["agg"].as_str()?.to_string(), v["n"].as_u64()?)));
        if r.key_str() != aggregate || payload.as_ref() != Some(&(aggregate.clone(), *counter)) {
            violation(
                aggregate,
                format!(
                    "event {id}: key {:?} / payload {:?} do not match what was written ({aggregate}, {counter})",
                    r.key, payload
                ),
            );
            continue;
        }
        let p = *partition_of.entry(aggregate.clone()).or_insert(r.partition);
        if p != r.partition {
            violation(
                aggregate,
                format!(
                    "event {id} in partition {} but earlier ones in {p}",
                    r.partition
                ),
            );
        }
        let check = aggs.entry(aggregate.clone()).or_default();
        let (prev, max) = (check.prev, check.max);
        let verdict = check.push(*counter);
        if verdict.is_violation() {
            violation(
                aggregate,
                format!("{verdict:?}: counter {counter} (event {id}) after {prev:?}, highest so far {max:?}"),
            );
        }
    }
    let mut lost: Vec<Uuid> = committed
        .keys()
        .filter(|id| !seen_ids.contains(id))
        .copied()
        .collect();
    lost.sort();
    Report {
        lost,
        phantoms,
        violations,
        duplicates,
    }
}

// ----------------------------------------------------------------------------------------------
// Writers
// ----------------------------------------------------------------------------------------------

#[derive(Default)]
struct WriterLog {
    /// (event id, aggregate, counter) of events whose COMMIT returned OK.
    committed: Vec<(Uuid, String, u64)>,
    /// Events whose COMMIT failed: outcome unknown.
    maybe: Vec<(Uuid, String, u64)>,
    /// Events inserted in transactions that failed before COMMIT.
    rolled_back: Vec<Uuid>,
    txns: u64,
    failed: u64,
    unknown: u64,
}

fn aggregate_name(writer: usize, n: usize) -> String {
    format!("w{writer}-agg{n:05}")
}

async fn run_writer(
    w: usize,
    pg: tokio_postgres::Config,
    table: String,
    topic: String,
    stop: CancellationToken,
    quiet: Arc<AtomicBool>,
    seed: u64,
) -> WriterLog {
    let writer = Writer::new(&table).expect("valid table name");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = WriterLog::default();
    let mut fresh = 0usize;
    let mut slots: Vec<(String, u64)> = (0..SLOTS_PER_WRITER)
        .map(|_| {
            fresh += 1;
            (aggregate_name(w, fresh), 0)
        })
        .collect();
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.is_cancelled() {
        if quiet.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if !matches!(&client, Some(c) if !c.is_closed()) {
            client = None;
            match outbox::testing::connect(&pg).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected");
        // 1–5 events over random aggregates of this writer, counters continuing each one's.
        let n = rng.random_range(1..=5usize);
        let mut bump: BTreeMap<usize, u64> = BTreeMap::new();
        let mut planned: Vec<(usize, u64)> = Vec::with_capacity(n);
        for _ in 0..n {
            // Skewed: slot 0 is hot, slots 1–2 warm, so that batches hold long per-aggregate
            // chains.
            let s = match rng.random_range(0..100) {
                0..=24 => 0,
                25..=39 => rng.random_range(1..=2),
                _ => rng.random_range(0..slots.len()),
            };
            let k = bump.entry(s).or_insert(0);
            planned.push((s, slots[s].1 + *k));
            *k += 1;
        }
        let events: Vec<NewEvent> = planned
            .iter()
            .map(|&(s, counter)| {
                NewEvent::new(
                    topic.as_str(),
                    slots[s].0.as_str(),
                    "counted",
                    json!({ "w": w, "agg": slots[s].0, "n": counter }),
                )
            })
            .collect();
        let in_one_statement = rng.random_bool(0.3);
        // Paced at about WRITER_EVENTS_PER_S: a backlog the relays can drain between the faults.
        let pause =
            Duration::from_millis(n as u64 * 1000 / WRITER_EVENTS_PER_S + rng.random_range(0..=10));
        let tx = match c.transaction().await {
            Ok(tx) => tx,
            Err(_) => {
                log.failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut ids = Vec::with_capacity(n);
        let mut inserted = true;
        if in_one_statement {
            match writer.add_new_events(&tx, &events).await {
                Ok(v) => ids = v,
                Err(_) => inserted = false,
            }
        } else {
            for e in &events {
                match writer.add_new_event(&tx, e).await {
                    Ok(id) => ids.push(id),
                    Err(_) => {
                        inserted = false;
                        break;
                    }
                }
            }
        }
        if !inserted {
            // Not committed: retried with the same counters (and new event ids).
            let _ = tx.rollback().await;
            log.rolled_back.extend(ids);
            log.failed += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        match tx.commit().await {
            Ok(()) => {
                for (id, &(s, counter)) in ids.iter().zip(&planned) {
                    log.committed.push((*id, slots[s].0.clone(), counter));
                }
                for (s, k) in bump {
                    slots[s].1 += k;
                }
                log.txns += 1;
            }
            Err(_) => {
                // Unknown outcome: these aggregates end here (whether or not it committed).
                for (id, &(s, counter)) in ids.iter().zip(&planned) {
                    log.maybe.push((*id, slots[s].0.clone(), counter));
                }
                for s in bump.keys() {
                    fresh += 1;
                    slots[*s] = (aggregate_name(w, fresh), 0);
                }
                log.unknown += 1;
            }
        }
        tokio::time::sleep(pause).await;
    }
    log
}

// ----------------------------------------------------------------------------------------------
// Processes: relays
// ----------------------------------------------------------------------------------------------

/// Whether `setpriv --pdeathsig` works here: children then die with this process even when it
/// is killed (they are spawned from runtime worker threads, which live as long as the test).
fn has_setpriv() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn spawn_process(
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    env_removed: &[&str],
    log: &Path,
) -> std::io::Result<Child> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    let mut cmd = if has_setpriv() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    for k in env_removed {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
}

/// Sends `signal` (a name such as `TERM`) to a child that has not been reaped yet (so its pid
/// cannot have been reused).
fn signal(child: &mut Child, signal: &str) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

struct RelayProc {
    id: usize,
    round: usize,
    child: Child,
    log: PathBuf,
    started: Instant,
}

struct RelayRecord {
    id: usize,
    round: usize,
    log: PathBuf,
    end: String,
}

struct Relays {
    program: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    next_id: usize,
    running: Vec<RelayProc>,
    ended: Vec<RelayRecord>,
    kills: usize,
    /// Relays that were running and did not exit 0 within the timeout of SIGTERM.
    bad_stops: Vec<String>,
}

impl Relays {
    fn start(&mut self, round: usize) -> usize {
        self.next_id += 1;
        let id = self.next_id;
        let log = self.dir.join(format!("relay-{id:03}.log"));
        let child = spawn_process(
            &self.program,
            RELAY_ARGS,
            &self.env,
            RELAY_ENV_REMOVED,
            &log,
        )
        .unwrap_or_else(|e| panic!("starting {}: {e}", self.program.display()));
        self.running.push(RelayProc {
            id,
            round,
            child,
            log,
            started: Instant::now(),
        });
        id
    }

    fn take(&mut self, id: usize) -> Option<RelayProc> {
        let i = self.running.iter().position(|r| r.id == id)?;
        Some(self.running.remove(i))
    }

    fn end(&mut self, r: RelayProc, end: String) -> String {
        let line = format!("relay#{} {end}", r.id);
        self.ended.push(RelayRecord {
            id: r.id,
            round: r.round,
            log: r.log,
            end,
        });
        line
    }

    /// SIGKILL.
    fn kill(&mut self, id: usize) -> String {
        let Some(mut r) = self.take(id) else {
            return format!("relay#{id} already gone");
        };
        let age = r.started.elapsed();
        if let Ok(Some(status)) = r.child.try_wait() {
            let end =
                format!("had exited by itself ({status}) before its kill, {age:.2?} after start");
            return self.end(r, end);
        }
        let _ = r.child.kill();
        let _ = r.child.wait();
        self.kills += 1;
        self.end(r, format!("SIGKILLed {}ms after start", age.as_millis()))
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `timeout`).
    async fn stop(&mut self, id: usize, timeout: Duration) -> String {
        let Some(mut r) = self.take(id) else {
            return format!("relay#{id} already gone");
        };
        let age = r.started.elapsed();
        if let Ok(Some(status)) = r.child.try_wait() {
            let end =
                format!("had exited by itself ({status}) before SIGTERM, {age:.2?} after start");
            return self.end(r, end);
        }
        // Before this line the relay is still connecting (no signal handler yet).
        let running = std::fs::read_to_string(&r.log)
            .unwrap_or_default()
            .contains("outbox relay running");
        signal(&mut r.child, "TERM");
        let t = Instant::now();
        let (end, clean) = loop {
            if let Ok(Some(status)) = r.child.try_wait() {
                let ok = if status.success() { "" } else { " (NOT 0)" };
                break (
                    format!(
                        "stopped by SIGTERM {}after {age:.2?}: {status}{ok} in {}ms",
                        if running { "" } else { "while starting, " },
                        t.elapsed().as_millis()
                    ),
                    status.success(),
                );
            }
            if t.elapsed() > timeout {
                let _ = r.child.kill();
                let _ = r.child.wait();
                break (
                    format!("did NOT stop within {timeout:?} of SIGTERM: SIGKILLed"),
                    false,
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let line = self.end(r, end);
        if running && !clean {
            self.bad_stops.push(line.clone());
        }
        line
    }

    /// Relays that exited by themselves.
    fn reap(&mut self, round: usize) -> Vec<String> {
        let exited: Vec<usize> = self
            .running
            .iter_mut()
            .filter_map(|r| matches!(r.child.try_wait(), Ok(Some(_))).then_some(r.id))
            .collect();
        let mut lines = Vec::new();
        for id in exited {
            let mut r = self.take(id).expect("running");
            let status = r.child.try_wait().ok().flatten();
            let text = std::fs::read_to_string(&r.log).unwrap_or_default();
            let last = text.lines().last().unwrap_or("").to_string();
            let end = format!(
                "exited by itself in round {round}, {:.2?} after start: {} — {last}",
                r.started.elapsed(),
                status.map_or("?".to_string(), |s| s.to_string())
            );
            lines.push(self.end(r, end));
        }
        lines
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for r in &mut self.running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}
