//! Shared support for the `it` integration test binary (`tests/it/main.rs` declares `mod support;`).
//!
//! * Postgres: [`postgres`], [`postgres_url`], [`connect_pg`] and [`fresh_database`] use
//!   `DATABASE_URL` when it is set, else one throwaway [`TestPostgres`] shared by every test of
//!   this process (started on first use, removed when the process exits). Tests that stop or
//!   restart Postgres must start their own `TestPostgres` instead.
//! * Kafka: [`kafka_brokers`] returns `KAFKA_BROKERS` when it is set (`scripts/test` starts a
//!   3-node Apache Kafka cluster with `scripts/kafka-cluster` and sets it), else falls back to an
//!   in-process [`MockKafka`]. Create topics with [`create_topic`], which works with both (auto
//!   create is off on the cluster). Tests that stop, kill or restart brokers take the private
//!   [`fault_cluster`] (one at a time); [`Cluster`] controls nodes and finds partition leaders;
//!   [`eventually`] replaces hand-written deadline loops.
//! * [`unique_name`] gives every test its own table / topic names, so tests run in parallel.
//!
//! Nothing here is tied to a tokio runtime: every `#[tokio::test]` runs its own runtime, and the
//! shared servers are plain processes.
#![allow(dead_code, unused_imports)]

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use outbox::testing::{
    assert_nothing_more, consume_all, create_topic_with_config, free_port, wait_for_partitions,
    wait_for_topic, ConsumedRecord, MockKafka, TestPostgres, TopicReader,
};

// ----------------------------------------------------------------------------------------------
// Postgres
// ----------------------------------------------------------------------------------------------

static TEST_POSTGRES: tokio::sync::OnceCell<TestPostgres> = tokio::sync::OnceCell::const_new();

/// URL of the shared test database: `DATABASE_URL`, else the process-wide [`TestPostgres`].
pub async fn postgres_url() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if !url.is_empty() {
            return url;
        }
    }
    shared_test_postgres().await.url()
}

/// Connection configuration of the shared test database (see [`postgres_url`]).
pub async fn postgres() -> tokio_postgres::Config {
    let url = postgres_url().await;
    url.parse()
        .unwrap_or_else(|e| panic!("invalid database URL {url:?}: {e}"))
}

/// A connected client of the shared test database (its connection runs on a spawned task).
pub async fn connect_pg() -> tokio_postgres::Client {
    let config = postgres().await;
    outbox::testing::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test database: {e}"))
}

/// Creates a new, empty database with a unique name on the shared test server and returns its
/// configuration: for tests that need a whole database (default table names, schema installs).
pub async fn fresh_database() -> tokio_postgres::Config {
    let name = unique_name("db");
    let client = connect_pg().await;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let mut config = postgres().await;
    config.dbname(&name);
    config
}

/// The process-wide throwaway server (started on first use). Do not stop or restart it: other
/// tests use it at the same time.
pub async fn shared_test_postgres() -> &'static TestPostgres {
    TEST_POSTGRES
        .get_or_init(|| async {
            TestPostgres::start()
                .await
                .unwrap_or_else(|e| panic!("starting the test Postgres server: {e}"))
        })
        .await
}

// ----------------------------------------------------------------------------------------------
// Kafka
// ----------------------------------------------------------------------------------------------

enum Kafka {
    /// `KAFKA_BROKERS`; with `OUTBOX_KAFKA_CLUSTER`, the cluster of `scripts/kafka-cluster` it is.
    External {
        brokers: String,
        cluster: Option<Cluster>,
    },
    Mock(MockKafka),
}

impl Kafka {
    fn brokers(&self) -> String {
        match self {
            Kafka::External { brokers, .. } => brokers.clone(),
            Kafka::Mock(m) => m.bootstrap_servers(),
        }
    }
}

static KAFKA: OnceLock<Kafka> = OnceLock::new();

fn kafka() -> &'static Kafka {
    KAFKA.get_or_init(|| {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            if !brokers.is_empty() {
                let cluster = std::env::var_os("OUTBOX_KAFKA_CLUSTER")
                    .filter(|d| !d.is_empty())
                    .map(|d| Cluster::open(PathBuf::from(d)));
                return Kafka::External { brokers, cluster };
            }
        }
        eprintln!(
            "support: KAFKA_BROKERS is not set: using librdkafka's mock cluster (run scripts/test \
             to test against a 3-node Apache Kafka cluster)"
        );
        Kafka::Mock(MockKafka::start(1).expect("starting the librdkafka mock cluster"))
    })
}

/// `bootstrap.servers` of the test Kafka: `KAFKA_BROKERS` (`scripts/test` starts a 3-node
/// cluster and sets it), else an in-process mock cluster (see the module docs).
pub fn kafka_brokers() -> String {
    kafka().brokers()
}

/// Whether the test Kafka is librdkafka's mock cluster (some Kafka features are missing there).
pub fn kafka_is_mock() -> bool {
    matches!(kafka(), Kafka::Mock(_))
}

/// The shared test cluster when `scripts/test` started it (`OUTBOX_KAFKA_CLUSTER`): for tests
/// that read its SASL_SSL listener or credentials. Do not stop its nodes: other tests use it at
/// the same time; use [`fault_cluster`] for broker faults.
pub fn shared_cluster() -> Option<&'static Cluster> {
    match kafka() {
        Kafka::External { cluster, .. } => cluster.as_ref(),
        Kafka::Mock(_) => None,
    }
}

/// Creates a topic on the test Kafka (CreateTopics with the broker's default replication factor,
/// or the mock cluster's own API) and waits until it is usable.
pub async fn create_topic(name: &str, partitions: i32) {
    match kafka() {
        Kafka::Mock(m) => {
            m.create_topic(name, partitions)
                .unwrap_or_else(|e| panic!("creating topic {name} on the mock cluster: {e}"));
            wait_for_topic(&m.bootstrap_servers(), name, Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| panic!("topic {name} did not appear: {e}"));
        }
        k => outbox::testing::create_topic(&k.brokers(), name, partitions)
            .await
            .unwrap_or_else(|e| panic!("creating topic {name} on {}: {e}", k.brokers())),
    }
}

// ----------------------------------------------------------------------------------------------
// Apache Kafka cluster control (scripts/kafka-cluster)
// ----------------------------------------------------------------------------------------------

/// `scripts/kafka-cluster` of this checkout.
pub fn cluster_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-cluster")
}

/// A KRaft cluster made by `scripts/kafka-cluster` (combined broker+controller nodes `1..=n`,
/// replication factor 3, `min.insync.replicas=2`, auto-create off), controlled through its
/// state directory: stop, kill -9 and restart single nodes (with their data), find leaders.
pub struct Cluster {
    dir: PathBuf,
    /// Keeps a private cluster alive: a `sh` wrapper destroys it when its stdin closes (this
    /// process exiting). `None` for the cluster of `scripts/test`.
    _guard: Option<Mutex<Child>>,
}

impl Cluster {
    fn open(dir: PathBuf) -> Cluster {
        Cluster { dir, _guard: None }
    }

    /// Starts a private cluster in a new temporary directory (about 30–60 s; the jars are fetched
    /// once, see `scripts/kafka-cluster`). It is destroyed when this process exits.
    ///
    /// # Panics
    ///
    /// When it does not start (the message has the nodes' log tails).
    pub async fn start_private() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("outbox-it-kafka-")
            .tempdir()
            .expect("a temporary directory for a Kafka cluster")
            .keep();
        let script = cluster_script();
        let out = tokio::process::Command::new(&script)
            .arg("--dir")
            .arg(&dir)
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        if !out.status.success() {
            let mut tails = String::new();
            for n in 1..=3 {
                let log = dir.join(format!("node{n}/server.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<_> = text.lines().rev().take(20).collect();
                tails += &format!("\n--- {}\n", log.display());
                tails += &lines.into_iter().rev().collect::<Vec<_>>().join("\n");
            }
            let _ = std::process::Command::new(&script)
                .arg("--dir")
                .arg(&dir)
                .arg("destroy")
                .status();
            panic!(
                "starting a private Kafka cluster failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                tails
            );
        }
        // Destroys the cluster once this process is gone (its stdin closes). Signals are ignored
        // so that Ctrl-C of the test run still reaches the cleanup.
        let guard = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"trap '' INT HUP TERM QUIT; cat >/dev/null 2>&1; "$0" --dir "$1" destroy >/dev/null 2>&1"#)
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the cluster's cleanup wrapper");
        Cluster {
            dir,
            _guard: Some(Mutex::new(guard)),
        }
    }

    /// The state directory (see `scripts/kafka-cluster`).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("reading {}/{file}: {e}", self.dir.display()))
            .trim()
            .to_string()
    }

    /// `bootstrap.servers` of the PLAINTEXT listeners.
    pub fn brokers(&self) -> String {
        self.read("brokers")
    }

    /// `bootstrap.servers` of the SASL_SSL (SCRAM-SHA-512) listeners.
    pub fn sasl_brokers(&self) -> String {
        self.read("sasl_brokers")
    }

    /// The SCRAM-SHA-512 user and its password.
    pub fn sasl_credentials(&self) -> (String, String) {
        (self.read("sasl_user"), self.read("sasl_password"))
    }

    /// PEM file of the certificate the SASL_SSL listeners present.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Node ids (`1..=3`).
    pub fn nodes(&self) -> Vec<i32> {
        (1..=3)
            .filter(|n| self.dir.join(format!("node{n}")).is_dir())
            .collect()
    }

    /// Runs `scripts/kafka-cluster --dir DIR args…` (deadline 400 s) and panics when it fails.
    pub async fn control(&self, args: &[&str]) {
        let script = cluster_script();
        let run = tokio::process::Command::new(&script)
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(400), run)
            .await
            .unwrap_or_else(|_| panic!("kafka-cluster {args:?}: no answer within 400 s"))
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "kafka-cluster {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a Kafka command-line tool (`org.apache.kafka.tools.…`) on the cluster's classpath and
    /// returns its standard output and error (deadline 200 s), whether it succeeded or not.
    pub async fn tool(&self, args: &[&str]) -> String {
        let run = tokio::process::Command::new(cluster_script())
            .arg("--dir")
            .arg(&self.dir)
            .arg("tool")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(200), run).await {
            Ok(Ok(out)) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Ok(Err(e)) => format!("running kafka-cluster tool: {e}"),
            Err(_) => "kafka-cluster tool: no answer within 200 s".into(),
        }
    }

    /// `TopicCommand --describe` of `topic`: leader, replicas and ISR of each partition.
    pub async fn describe(&self, topic: &str) -> String {
        let brokers = self.brokers();
        self.tool(&[
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            &brokers,
            "--describe",
            "--topic",
            topic,
        ])
        .await
    }

    /// SIGKILLs node `n` (a crash: its data stays).
    pub async fn kill(&self, n: i32) {
        self.control(&["kill", &n.to_string()]).await;
    }

    /// Stops node `n` with SIGTERM (controlled shutdown: leadership moves first).
    pub async fn stop(&self, n: i32) {
        self.control(&["stop-node", &n.to_string()]).await;
    }

    /// Starts node `n` again on its data; returns at once (see [`Cluster::wait_ready`]).
    pub async fn start(&self, n: i32) {
        self.control(&["start-node", &n.to_string()]).await;
    }

    /// Starts every node that is down and waits until the metadata lists all of them.
    pub async fn heal(&self) {
        for n in self.nodes() {
            self.start(n).await;
        }
        self.wait_ready().await;
    }

    /// Waits until the metadata lists every running node.
    pub async fn wait_ready(&self) {
        self.control(&["wait"]).await;
    }

    /// The leader of `topic`'s `partition` by the cluster's metadata (deadline 30 s); `None`
    /// while it has none.
    pub async fn leader(&self, topic: &str, partition: i32) -> Option<i32> {
        let brokers = self.brokers();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .expect("a metadata client");
            use rdkafka::consumer::Consumer as _;
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(30))
                .ok()?;
            let t = md.topics().iter().find(|t| t.name() == topic)?;
            let p = t.partitions().iter().find(|p| p.id() == partition)?;
            (p.leader() >= 0).then_some(p.leader())
        })
        .await
        .expect("the metadata task")
    }

    /// Waits (deadline `within`) until `partition`'s leader is a node other than `not`; returns it.
    pub async fn wait_new_leader(
        &self,
        topic: &str,
        partition: i32,
        not: i32,
        within: Duration,
    ) -> i32 {
        eventually(
            within,
            &format!("a new leader of {topic}/{partition}"),
            || async {
                match self.leader(topic, partition).await {
                    Some(l) if l != not => Ok(l),
                    other => Err(format!("leader {other:?}")),
                }
            },
        )
        .await
    }
}

static FAULT_CLUSTER: tokio::sync::OnceCell<Option<Cluster>> = tokio::sync::OnceCell::const_new();
static FAULT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A private 3-node cluster for tests that stop, kill or restart brokers, shared by such tests of
/// this process one at a time (the guard serializes them; the cluster is healed, every node
/// running, before it is handed out). Started on first use (30–60 s), destroyed at exit.
///
/// `None` (the caller skips, saying so) when the suite runs against the mock cluster
/// (`OUTBOX_TEST_KAFKA=mock`, or `KAFKA_BROKERS` unset without `OUTBOX_KAFKA_CLUSTER`) or Java
/// is missing.
pub async fn fault_cluster() -> Option<(tokio::sync::MutexGuard<'static, ()>, &'static Cluster)> {
    let guard = FAULT_LOCK.lock().await;
    let cluster = FAULT_CLUSTER
        .get_or_init(|| async {
            let mock = std::env::var("OUTBOX_TEST_KAFKA").as_deref() == Ok("mock");
            let java = Command::new("java")
                .arg("-version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if mock || !java || shared_cluster().is_none() && kafka_is_mock() {
                return None;
            }
            Some(Cluster::start_private().await)
        })
        .await
        .as_ref()?;
    cluster.heal().await;
    Some((guard, cluster))
}

// ----------------------------------------------------------------------------------------------
// Waiting
// ----------------------------------------------------------------------------------------------

/// Polls `probe` (every 100 ms) until it returns `Ok`, and returns that value; `Err` carries a
/// description of the state so far.
///
/// # Panics
///
/// When `within` passes first; the message names `what` and the last state.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(state) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not reached within {within:?}; last state: {state}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----------------------------------------------------------------------------------------------
// Names, logging
// ----------------------------------------------------------------------------------------------

/// A name unique to this call, for a table, channel, topic or database: `prefix` lowercased
/// (other characters than letters, digits and `_` become `_`, at most 24 characters, a leading
/// letter guaranteed), then `_` and 12 hex digits. At most 37 characters.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut p: String = prefix
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    if !p.starts_with(|c: char| c.is_ascii_lowercase()) {
        p.insert(0, 't');
        p.truncate(24);
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    let suffix = (random ^ n.rotate_left(40)) & 0xffff_ffff_ffff;
    format!("{p}_{suffix:012x}")
}

/// The values of `seen` in the order each first appeared (a replay's copies dropped).
pub fn first_seen(seen: impl IntoIterator<Item = i64>) -> Vec<i64> {
    let mut firsts: Vec<i64> = Vec::new();
    for n in seen {
        if !firsts.contains(&n) {
            firsts.push(n);
        }
    }
    firsts
}

/// Installs a `tracing` subscriber writing to the test output, filtered by `RUST_LOG`
/// (default `warn`), and keeping the process's latest warnings and errors for [`logged`]
/// whatever `RUST_LOG` says. Safe to call from every test.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(filter),
        )
        .with(Captured.with_filter(tracing_subscriber::filter::LevelFilter::WARN))
        .try_init();
}

/// How many of the latest warnings and errors [`logged`] keeps.
const CAPTURED_MAX: usize = 50_000;

fn captured() -> &'static Mutex<std::collections::VecDeque<(tracing::Level, String)>> {
    static CAPTURED: OnceLock<Mutex<std::collections::VecDeque<(tracing::Level, String)>>> =
        OnceLock::new();
    CAPTURED.get_or_init(Default::default)
}

/// The layer of [`init_tracing`] that keeps warnings and errors: each as its message and
/// fields (`message k=v …`), from every thread (librdkafka's log lines come from its own).
struct Captured;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                match field.name() {
                    "message" => {
                        let _ = write!(self.0, "{value:?}");
                    }
                    name => {
                        let _ = write!(self.0, " {name}={value:?}");
                    }
                }
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        let mut captured = captured().lock().unwrap_or_else(|e| e.into_inner());
        if captured.len() >= CAPTURED_MAX {
            captured.pop_front();
        }
        captured.push_back((*event.metadata().level(), text.0));
    }
}

/// The warnings and errors logged in this process since [`init_tracing`] (the latest
/// [`CAPTURED_MAX`]) whose text contains `containing`, at `level` (`WARN` or `ERROR`).
pub fn logged(level: tracing::Level, containing: &str) -> Vec<String> {
    let captured = captured().lock().unwrap_or_else(|e| e.into_inner());
    (captured.iter())
        .filter(|(l, text)| *l == level && text.contains(containing))
        .map(|(_, text)| text.clone())
        .collect()
}

// ----------------------------------------------------------------------------------------------
// Wake path
// ----------------------------------------------------------------------------------------------

/// Holders of the table's wake lock (`outbox::wake_lock`): (exclusive and granted, any mode).
pub async fn wake_lock_holders(client: &tokio_postgres::Client, table: &str) -> (i64, i64) {
    let (class, key) = outbox::wake_lock(table);
    let (class, key) = (i64::from(class as u32), i64::from(key as u32));
    let row = client
        .query_one(
            "select count(*) filter (where mode = 'ExclusiveLock' and granted), count(*)
               from pg_locks
              where locktype = 'advisory' and classid::bigint = $1 and objid::bigint = $2
                and objsubid = 2",
            &[&class, &key],
        )
        .await
        .expect("querying pg_locks");
    (row.get(0), row.get(1))
}

/// Waits until the relay is idle and armed: running, its LISTEN connection up, and holding the
/// table's wake lock (so writers NOTIFY). Panics after `timeout`.
pub async fn wait_armed(outbox: &outbox::Outbox, table: &str, timeout: Duration) {
    let client = connect_pg().await;
    let deadline = Instant::now() + timeout;
    loop {
        let (granted, _) = wake_lock_holders(&client, table).await;
        let stats = outbox.stats();
        if granted == 1 && stats.listener_connected && stats.running {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "the relay did not become idle and armed within {timeout:?} (wake lock granted: {granted}, stats: {stats:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// LISTENs on `channel` from a connection of its own, drained with `Connection::poll_message`;
/// the receiver gets one item (the channel name) per notification.
pub async fn listen(
    pg: &tokio_postgres::Config,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use futures::StreamExt;
    let (client, mut conn) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connecting the test listener");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.channel().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("listen {channel}"))
        .await
        .expect("LISTEN");
    (client, rx)
}

/// The original Go package's DDL, verbatim (table name `events`; tests substitute their own).
pub const GO_DDL: &str = "create table if not exists events (
    id uuid primary key default gen_random_uuid(),
    aggregate_id varchar(100) not null,
    event_topic varchar(100) not null,
    event_type varchar(100) not null,
    payload jsonb not null,
    status varchar not null default 'new' check(status in ('new', 'done')),
    created_at timestamp default now(),
    reserved_to timestamp default null
);";

/// Stops the relay (10 s) and checks its task ended cleanly.
pub async fn stop_and_join(
    outbox: &outbox::Outbox,
    handle: tokio::task::JoinHandle<outbox::Result<()>>,
) {
    outbox
        .stop(Duration::from_secs(10))
        .await
        .expect("the relay stops within 10 s");
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the relay task ends after stop")
        .expect("the relay task did not panic")
        .expect("the relay ended without error");
}

// ----------------------------------------------------------------------------------------------
// Order and duplicate checks
// ----------------------------------------------------------------------------------------------

/// The order rule for one aggregate's records, fed in publication (partition offset) order: each
/// new counter must be above every counter seen; a duplicate is allowed only as part of a
/// contiguous replay (it starts at any earlier counter and runs c, c+1, …, and nothing new comes
/// before the replay caught up). What arrived for one aggregate so far.
#[derive(Default)]
pub struct AggCheck {
    /// Every counter seen.
    pub seen: HashSet<u64>,
    /// The highest counter seen.
    pub max: Option<u64>,
    /// The counter of the record before.
    pub prev: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
    /// A new counter lower than one already seen.
    OutOfOrder,
    /// A new counter while a replay had not caught up yet.
    NewBeforeReplayDone,
    /// A duplicate more than one ahead of the record before it.
    ReplaySkip,
}

impl Verdict {
    pub fn is_violation(self) -> bool {
        !matches!(self, Verdict::New | Verdict::Duplicate)
    }
}

impl AggCheck {
    pub fn push(&mut self, c: u64) -> Verdict {
        let verdict = if self.seen.contains(&c) {
            match self.prev {
                Some(p) if c <= p + 1 => Verdict::Duplicate,
                _ => Verdict::ReplaySkip,
            }
        } else if self.max.is_some_and(|m| c < m) {
            Verdict::OutOfOrder
        } else if self.prev != self.max {
            Verdict::NewBeforeReplayDone
        } else {
            Verdict::New
        };
        if self.seen.insert(c) {
            self.max = Some(self.max.map_or(c, |m| m.max(c)));
        }
        self.prev = Some(c);
        verdict
    }
}

/// The result of [`check_delivery`].
#[derive(Debug, Default)]
pub struct DeliveryCheck {
    /// Expected event ids that never arrived.
    pub lost: Vec<uuid::Uuid>,
    /// Records whose event id was not expected.
    pub unexpected: Vec<String>,
    /// Order violations: "aggregate: p/offset counter N: verdict".
    pub violations: Vec<String>,
    /// Records that repeated an event already read (allowed as contiguous replays).
    pub duplicates: usize,
}

impl DeliveryCheck {
    /// Panics with the details unless nothing was lost, nothing unexpected arrived and no order
    /// rule was broken.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.lost.is_empty() && self.unexpected.is_empty() && self.violations.is_empty(),
            "{what}: lost {} (first {:?}), unexpected {} (first {:?}), order violations {} (first {:?}), duplicates {}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)],
            self.unexpected.len(),
            &self.unexpected[..self.unexpected.len().min(5)],
            self.violations.len(),
            &self.violations[..self.violations.len().min(5)],
            self.duplicates
        );
    }
}

/// Checks records read back against what was written: `expected` maps each event id to its
/// aggregate (the key) and its per-aggregate counter (0, 1, 2, … in commit order). Records
/// (identified by their `event_id` header) must come sorted by partition
/// and offset (as [`consume_all`] returns them). Every expected id must arrive, no other id, and
/// each aggregate's counters must follow the [`AggCheck`] rule; the key must be the aggregate.
pub fn check_delivery(
    expected: &std::collections::HashMap<uuid::Uuid, (String, u64)>,
    records: &[ConsumedRecord],
) -> DeliveryCheck {
    use std::collections::{HashMap, HashSet};
    let mut check = DeliveryCheck::default();
    let mut aggs: HashMap<String, AggCheck> = HashMap::new();
    let mut seen: HashSet<uuid::Uuid> = HashSet::new();
    for r in records {
        let id = r
            .header("event_id")
            .and_then(|s| uuid::Uuid::parse_str(s).ok());
        let Some((aggregate, counter)) = id.and_then(|id| expected.get(&id)) else {
            check.unexpected.push(format!(
                "{}/{}@{} key {:?}",
                r.topic, r.partition, r.offset, r.key
            ));
            continue;
        };
        if r.key_str() != aggregate {
            check.violations.push(format!(
                "{aggregate}: {}/{} has key {:?}",
                r.partition,
                r.offset,
                r.key_str()
            ));
        }
        if !seen.insert(id.expect("checked")) {
            check.duplicates += 1;
        }
        let verdict = aggs.entry(aggregate.clone()).or_default().push(*counter);
        if verdict.is_violation() {
            check.violations.push(format!(
                "{aggregate}: {}/{} counter {counter}: {verdict:?}",
                r.partition, r.offset
            ));
        }
    }
    check.lost = expected
        .keys()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    check
}

// ----------------------------------------------------------------------------------------------
// Independent Java programs: the official Java consumer (readers) and producer (partitions)
// ----------------------------------------------------------------------------------------------

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s == "-" {
        return None;
    }
    let b = s.as_bytes();
    Some(
        (0..b.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex from a Java program"))
            .collect(),
    )
}

/// Runs `tests/it/java/<program>` as a single-file source program on the cluster's Kafka jars
/// (then `extra_classpath`) with arguments `BROKERS args…` and `input` on its standard input;
/// returns its stdout.
///
/// # Panics
///
/// When `java` cannot run, outlives `timeout` by 60 s, or exits non-zero (its stderr is in the
/// message).
async fn run_java(
    cluster: &Cluster,
    program: &str,
    extra_classpath: Option<&str>,
    args: &[String],
    input: &[u8],
    timeout: Duration,
) -> String {
    use tokio::io::AsyncWriteExt;
    let lib = cluster.read("lib");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/it/java/{program}"));
    let classpath = match extra_classpath {
        Some(extra) => format!("{lib}/*:{extra}/*"),
        None => format!("{lib}/*"),
    };
    let mut child = tokio::process::Command::new("java")
        .arg("-Xmx256m")
        .arg("-XX:TieredStopAtLevel=1")
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            cluster.dir.join("log4j2-tools.properties").display()
        ))
        .arg("-cp")
        .arg(classpath)
        .arg(&source)
        .arg(cluster.brokers())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running java");
    let mut stdin = child.stdin.take().expect("java's stdin");
    // A program that fails before reading all of it shows as its exit status and stderr.
    let feed = async move {
        let _ = stdin.write_all(input).await;
    };
    let run = async { tokio::join!(feed, child.wait_with_output()).1 };
    let out = tokio::time::timeout(timeout + Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("{program} ends within its timeout + 60 s"))
        .expect("running java");
    assert!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`run_java`] for a reader: arguments `BROKERS TOPIC EXPECTED TIMEOUT_MS`, nothing on stdin.
async fn run_java_reader(
    cluster: &Cluster,
    program: &str,
    extra_classpath: Option<&str>,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> String {
    let args = [
        topic.to_string(),
        expected.to_string(),
        timeout.as_millis().to_string(),
    ];
    run_java(cluster, program, extra_classpath, &args, b"", timeout).await
}

/// Reads `topic` of `cluster` from the beginning with the official Java consumer
/// (`tests/it/java/Verify.java`, run as a single-file source program on the cluster's Kafka
/// jars) until `expected` records arrived or `timeout` passed; returns them sorted by partition
/// and offset, as [`ConsumedRecord`]s (header values and keys as text, like rdkafka's reader).
///
/// # Panics
///
/// When `java` cannot run or exits non-zero (its stderr is in the message).
pub async fn java_read(
    cluster: &Cluster,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<ConsumedRecord> {
    let stdout = run_java_reader(cluster, "Verify.java", None, topic, expected, timeout).await;
    let text = |b: Option<Vec<u8>>| b.map(|b| String::from_utf8_lossy(&b).into_owned());
    let mut records: Vec<ConsumedRecord> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("R "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let headers = if f[4] == "." {
                Vec::new()
            } else {
                f[4].split(',')
                    .map(|h| {
                        let (k, v) = h.split_once('=').expect("name=value");
                        (
                            text(unhex(k)).unwrap_or_default(),
                            text(unhex(v)).unwrap_or_default(),
                        )
                    })
                    .collect()
            };
            ConsumedRecord {
                topic: topic.to_string(),
                partition: f[0].parse().expect("partition"),
                offset: f[1].parse().expect("offset"),
                key: text(unhex(f[2])),
                payload: unhex(f[3]),
                headers,
                timestamp_ms: None,
            }
        })
        .collect();
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// Sends one record per key to `topic` of `cluster` with the official Java producer
/// (`tests/it/java/ProducePartitions.java`: `KafkaProducer` of the cluster's kafka-clients with
/// its default partitioner, run as a single-file source program) and returns, for each key (its
/// exact bytes), the partition of its acknowledged send, as its `RecordMetadata` says.
///
/// # Panics
///
/// When `java` cannot run, a send fails or is not acknowledged within `timeout`, or a key gets
/// no answer (keys must be distinct).
pub async fn java_producer_partitions(
    cluster: &Cluster,
    topic: &str,
    keys: &[&[u8]],
    timeout: Duration,
) -> std::collections::HashMap<Vec<u8>, i32> {
    let mut input = String::new();
    for key in keys {
        for b in *key {
            input += &format!("{b:02x}");
        }
        input.push('\n');
    }
    let args = [topic.to_string(), timeout.as_millis().to_string()];
    let stdout = run_java(
        cluster,
        "ProducePartitions.java",
        None,
        &args,
        input.as_bytes(),
        timeout,
    )
    .await;
    let partitions: std::collections::HashMap<Vec<u8>, i32> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("P "))
        .map(|l| {
            let (key, partition) = l.split_once(' ').expect("P <key hex> <partition>");
            let key = unhex(key).expect("a key");
            (key, partition.parse().expect("a partition"))
        })
        .collect();
    assert_eq!(
        partitions.len(),
        keys.len(),
        "the Java producer reported a partition for {} of {} keys",
        partitions.len(),
        keys.len()
    );
    partitions
}

/// A record as the CloudEvents Java SDK's Kafka binding decoded it
/// (`tests/it/java/VerifyCloudEvents.java`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JavaCloudEvent {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub spec_version: String,
    pub id: String,
    pub source: String,
    pub event_type: String,
    pub subject: Option<String>,
    /// `time` as `Instant.toString()` (RFC 3339, UTC).
    pub time: Option<String>,
    pub data_content_type: Option<String>,
    pub data: Option<Vec<u8>>,
    /// Names of the extension attributes the SDK found (other `ce_*` headers).
    pub extensions: Vec<String>,
}

/// Reads `topic` of `cluster` from the beginning with the CloudEvents Java SDK's Kafka binding
/// (`CloudEventDeserializer` on the official Java consumer; its jars are fetched once by
/// `scripts/kafka-cluster fetch-cloudevents`) until `expected` records arrived or `timeout`
/// passed; returns them sorted by partition and offset.
///
/// # Panics
///
/// When the SDK cannot be fetched, `java` cannot run, or a record cannot be decoded as a
/// CloudEvent (the SDK's exception is in the message).
pub async fn java_read_cloudevents(
    cluster: &Cluster,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<JavaCloudEvent> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-cluster");
    let fetched = tokio::process::Command::new(script)
        .arg("fetch-cloudevents")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running scripts/kafka-cluster fetch-cloudevents");
    assert!(
        fetched.status.success(),
        "fetch-cloudevents failed: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let ce_lib = String::from_utf8_lossy(&fetched.stdout).trim().to_string();
    let stdout = run_java_reader(
        cluster,
        "VerifyCloudEvents.java",
        Some(&ce_lib),
        topic,
        expected,
        timeout,
    )
    .await;
    let text = |s: &str| unhex(s).map(|b| String::from_utf8_lossy(&b).into_owned());
    let opt = |s: &str| (s != "-").then(|| s.to_string());
    let mut events: Vec<JavaCloudEvent> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("E "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 12, "a VerifyCloudEvents line: {l}");
            JavaCloudEvent {
                partition: f[0].parse().expect("partition"),
                offset: f[1].parse().expect("offset"),
                key: text(f[2]),
                spec_version: f[3].to_string(),
                id: f[4].to_string(),
                source: text(f[5]).expect("source"),
                event_type: text(f[6]).expect("type"),
                subject: text(f[7]),
                time: opt(f[8]),
                data_content_type: opt(f[9]),
                data: unhex(f[10]),
                extensions: if f[11] == "." {
                    Vec::new()
                } else {
                    f[11].split(',').map(str::to_string).collect()
                },
            }
        })
        .collect();
    events.sort_by_key(|e| (e.partition, e.offset));
    events
}

/// Asserts that the Java consumer read the same records as rdkafka: partition, offset, key,
/// value and headers (names, values, order), record by record.
pub fn assert_same_as_java(rdkafka: &[ConsumedRecord], java: &[ConsumedRecord]) {
    let strip = |r: &ConsumedRecord| {
        (
            r.partition,
            r.offset,
            r.key.clone(),
            r.payload.clone(),
            r.headers.clone(),
        )
    };
    let mut rd: Vec<_> = rdkafka.iter().map(strip).collect();
    rd.sort_by_key(|r| (r.0, r.1));
    let jv: Vec<_> = java.iter().map(strip).collect();
    assert_eq!(
        rd.len(),
        jv.len(),
        "rdkafka read {} records, the Java consumer {}",
        rd.len(),
        jv.len()
    );
    for (a, b) in rd.iter().zip(&jv) {
        assert_eq!(a, b, "rdkafka and the Java consumer disagree");
    }
}

// ----------------------------------------------------------------------------------------------
// The relay as a child process (the `outbox-relay` binary)
// ----------------------------------------------------------------------------------------------

/// The `outbox-relay` binary cargo built for this test run.
pub const RELAY_BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

/// The `outbox-relay` binary with none of the configuration variables of the test's
/// environment (`OUTBOX_*`, `DATABASE_URL`, `KAFKA_BROKERS`): every test passes what it means
/// explicitly.
pub fn relay_command() -> Command {
    let mut cmd = Command::new(RELAY_BIN);
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("OUTBOX_") || name == "DATABASE_URL" || name == "KAFKA_BROKERS" {
            cmd.env_remove(&k);
        }
    }
    cmd
}

/// How to start a child `outbox-relay run`: environment (`OUTBOX_*`, `DATABASE_URL`,
/// `KAFKA_BROKERS`; none is inherited from the test's environment) and extra arguments.
pub struct ChildRelayBuilder {
    envs: Vec<(String, String)>,
    args: Vec<String>,
}

impl ChildRelayBuilder {
    /// Extra arguments after `run` (e.g. `-X linger.ms=5000`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Starts the process: its stdout and stderr go to files ([`ChildRelay::stderr`]); text
    /// logs at `warn,outbox=info,librdkafka=info` unless `OUTBOX_LOG` is given.
    ///
    /// # Panics
    ///
    /// When the binary cannot be spawned.
    pub fn spawn(self) -> ChildRelay {
        let mut cmd = relay_command();
        cmd.arg("run")
            .args(&self.args)
            .env("OUTBOX_LOG", "warn,outbox=info,librdkafka=info")
            .env("OUTBOX_LOG_FORMAT", "text")
            .env("OUTBOX_PROGRESS_INTERVAL", "0s");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        ChildRelay::start(cmd)
    }
}

/// A child `outbox-relay run`: SIGKILLed when dropped; its stdout and stderr go to files.
pub struct ChildRelay {
    /// The process.
    pub child: Child,
    _dir: tempfile::TempDir,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ChildRelay {
    /// A builder with these environment variables.
    pub fn builder(envs: &[(&str, String)]) -> ChildRelayBuilder {
        ChildRelayBuilder {
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            args: Vec::new(),
        }
    }

    /// `outbox-relay` with exactly these arguments (global flags, the subcommand and its flags)
    /// and environment variables: none of the defaults [`builder`](Self::builder) adds.
    ///
    /// # Panics
    ///
    /// When the binary cannot be spawned.
    pub fn with_args(args: &[&str], envs: &[(&str, &str)]) -> ChildRelay {
        let mut cmd = relay_command();
        cmd.args(args).envs(envs.iter().copied());
        ChildRelay::start(cmd)
    }

    /// Spawns `cmd` with stdin closed and stdout and stderr going to files in a temporary
    /// directory.
    fn start(mut cmd: Command) -> ChildRelay {
        let dir = tempfile::tempdir().expect("temp dir");
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {RELAY_BIN}: {e}"));
        ChildRelay {
            child,
            _dir: dir,
            stdout,
            stderr,
        }
    }

    /// Its stdout so far (invalid UTF-8 replaced).
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout)
    }

    /// Its stderr (the log) so far, raw (colours and all; invalid UTF-8 replaced).
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// Its exit status once it exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    pub fn sigkill(&mut self) -> std::process::ExitStatus {
        self.child.kill().expect("SIGKILL the child relay");
        self.child.wait().expect("reaping the child relay")
    }

    /// SIGTERM through kill(1).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tails of stdout and stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- child stdout ---\n{}\n--- child stderr (tail) ---\n{}",
            tail(self.stdout()),
            tail(self.stderr())
        )
    }
}

/// A file's text, invalid UTF-8 replaced; empty when it cannot be read.
fn read_lossy(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A builder on the shared test database and the test's Kafka, for `table` and `channel`: the
/// start of most tests' relays.
pub async fn builder_on(table: &str, channel: &str) -> outbox::OutboxBuilder {
    outbox::Outbox::builder()
        .postgres(postgres().await)
        .kafka_brokers(kafka_brokers())
        .table(table)
        .channel(channel)
}

// ----------------------------------------------------------------------------------------------
// Rows seen through `find`
// ----------------------------------------------------------------------------------------------

/// The events with these ids (any status), in seq order.
pub async fn find_ids(outbox: &outbox::Outbox, ids: &[uuid::Uuid]) -> Vec<outbox::Event> {
    outbox
        .find(
            &outbox::EventFilter::new()
                .ids(ids.iter().copied())
                .limit(10_000),
        )
        .await
        .expect("find by ids")
}

/// Seq, status, attempts, last error and next attempt of each event, for failure messages.
pub fn brief(events: &[outbox::Event]) -> String {
    format!(
        "{:#?}",
        events
            .iter()
            .map(|e| (
                e.seq(),
                e.status(),
                e.attempts(),
                e.last_error().map(str::to_string),
                e.next_attempt_at()
            ))
            .collect::<Vec<_>>()
    )
}

/// Waits until the events with `ids` all have `status` (at most `within`); returns them in seq
/// order.
///
/// # Panics
///
/// When `within` passes first, with the events' state.
pub async fn wait_status(
    outbox: &outbox::Outbox,
    ids: &[uuid::Uuid],
    status: outbox::EventStatus,
    within: std::time::Duration,
) -> Vec<outbox::Event> {
    eventually(
        within,
        &format!("events {ids:?} become {status}"),
        || async {
            let events = outbox
                .find(
                    &outbox::EventFilter::new()
                        .ids(ids.iter().copied())
                        .limit(10_000),
                )
                .await
                .map_err(|e| e.to_string())?;
            if events.len() == ids.len() && events.iter().all(|e| e.status() == status) {
                Ok(events)
            } else {
                Err(brief(&events))
            }
        },
    )
    .await
}

// ----------------------------------------------------------------------------------------------
// Starting a relay with a reader
// ----------------------------------------------------------------------------------------------

/// A started relay's task, as `Outbox::start` returns it.
pub type RelayTask = tokio::task::JoinHandle<outbox::Result<()>>;

/// Connects the outbox `b` describes, then a reader on `topic` of `brokers` (`within` to find
/// the topic), then starts the relay: the reader is subscribed before anything is published.
pub async fn start_with_reader(
    b: outbox::OutboxBuilder,
    brokers: &str,
    topic: &str,
    within: std::time::Duration,
) -> (outbox::Outbox, TopicReader, RelayTask) {
    let outbox = b.connect().await.unwrap();
    let reader = TopicReader::connect(brokers, topic, within).await.unwrap();
    let relay = outbox.start().unwrap();
    (outbox, reader, relay)
}

// ----------------------------------------------------------------------------------------------
// One test's names, Postgres and Kafka
// ----------------------------------------------------------------------------------------------

/// One test's private table, channel and topic, on Postgres `pg` and Kafka `brokers`.
#[derive(Clone)]
pub struct TestEnv {
    pub table: String,
    pub channel: String,
    pub topic: String,
    pub brokers: String,
    pub pg: tokio_postgres::Config,
}

impl TestEnv {
    /// Fresh unique names made from `prefix` (`{prefix}_t`, `{prefix}_c`, `{prefix}_topic`);
    /// nothing is created.
    pub fn named(prefix: &str, brokers: String, pg: tokio_postgres::Config) -> TestEnv {
        TestEnv {
            table: unique_name(&format!("{prefix}_t")),
            channel: unique_name(&format!("{prefix}_c")),
            topic: unique_name(&format!("{prefix}_topic")),
            brokers,
            pg,
        }
    }

    /// A builder for the table and channel, polling every 200 ms.
    pub fn builder(&self) -> outbox::OutboxBuilder {
        outbox::Outbox::builder()
            .postgres(self.pg.clone())
            .kafka_brokers(self.brokers.clone())
            .table(self.table.clone())
            .channel(self.channel.clone())
            .poll_interval(std::time::Duration::from_millis(200))
    }
}

// ----------------------------------------------------------------------------------------------
// Tables and rows
// ----------------------------------------------------------------------------------------------

/// Creates `table` with the original Go package's DDL ([`GO_DDL`]).
pub async fn create_go_table(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&GO_DDL.replace(
            "create table if not exists events (",
            &format!("create table if not exists {table} ("),
        ))
        .await
        .unwrap();
}

/// `column` (an SQL expression) of the row of `table` with this `id`.
pub async fn row_value<T>(
    client: &tokio_postgres::Client,
    table: &str,
    column: &str,
    id: &uuid::Uuid,
) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query_one(
            &format!("select {column} from {table} where id = $1"),
            &[id],
        )
        .await
        .unwrap()
        .get(0)
}

/// `select count(*) from <table> <rest>`: `rest` is empty or a `where` clause.
pub async fn count_rows(client: &tokio_postgres::Client, table: &str, rest: &str) -> i64 {
    client
        .query_one(&format!("select count(*) from {table} {rest}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A fresh, uniquely named topic made from `prefix`, created with `partitions`.
pub async fn fresh_topic(prefix: &str, partitions: i32) -> String {
    let topic = unique_name(prefix);
    create_topic(&topic, partitions).await;
    topic
}

/// A relay on `table` (also its channel) of the database `pg`, on the test cluster, connected
/// and started.
pub async fn start_on_database(
    pg: &tokio_postgres::Config,
    table: &str,
) -> (outbox::Outbox, RelayTask) {
    let outbox = outbox::Outbox::builder()
        .postgres(pg.clone())
        .table(table)
        .channel(table)
        .kafka_brokers(kafka_brokers())
        .connect()
        .await
        .unwrap();
    let relay = outbox.start().unwrap();
    (outbox, relay)
}

/// A relay on `table` (also its channel) from [`builder_on`], connected and started.
pub async fn start_on(table: &str) -> (outbox::Outbox, RelayTask) {
    let outbox = builder_on(table, table).await.connect().await.unwrap();
    let relay = outbox.start().unwrap();
    (outbox, relay)
}

/// The first two columns of every row `sql` returns, collected (a `Vec` of pairs, a map…).
pub async fn pairs<A, B, C>(client: &tokio_postgres::Client, sql: &str) -> C
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
    C: FromIterator<(A, B)>,
{
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Set in the child process of [`run_isolated`].
const ISOLATED_CHILD: &str = "OUTBOX_TEST_ISOLATED_CHILD";

/// What librdkafka's mock cluster asserts (`rd_assert`, rdkafka_mock.c) when a broker set down
/// cannot re-create its listener on the port it had: the whole process aborts.
const MOCK_LISTENER_ABORT: &str = "Failed to-create mock broker listener";

/// Runs the test `name` (its full path, e.g. `faults::s12a_…`) alone in a child process of this
/// test binary, for tests that set a mock broker down: librdkafka's mock cluster closes the
/// broker's listener and binds its port again at once, and when that bind fails (a socket of
/// the busy machine took the port meanwhile) it aborts the process — every test of the run with
/// it. In a child, such an abort fails only that test, and is retried (twice); any other
/// failure is this test's, with the child's output. Returns `true` in the parent once the child
/// passed (the caller then returns), `false` in the child (the caller runs the test's body).
pub fn run_isolated(name: &str) -> bool {
    if std::env::var_os(ISOLATED_CHILD).is_some() {
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    for attempt in 1..=3 {
        let out = Command::new(&exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(ISOLATED_CHILD, "1")
            .output()
            .expect("running the test in a child process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // "1 passed": the filter found the test (0 tests run would also exit 0).
        if out.status.success() && stdout.contains("test result: ok. 1 passed") {
            return true;
        }
        if attempt < 3 && stderr.contains(MOCK_LISTENER_ABORT) {
            eprintln!(
                "{name}: librdkafka's mock cluster aborted (a broker's listener could not be \
                 re-created); running the test again"
            );
            continue;
        }
        panic!(
            "{name} failed in its child process ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
    }
    unreachable!("the last attempt returns or panics")
}

/// The process-wide Prometheus recorder (installed on first use), for reading counters.
pub fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    H.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install the Prometheus recorder")
    })
}

/// The sum of a counter's series in this process whose line starts with `prefix` (a name, or a
/// name with its labels: `outbox_producer_rebuilds_total{producer="main"}`).
pub fn counter_value(prefix: &str) -> f64 {
    (prometheus().render().lines())
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
