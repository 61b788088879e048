//! Shared support for the `it` integration test binary (`tests/it/main.rs` declares `mod support;`).
//!
//! * Postgres: [`postgres`], [`postgres_url`], [`connect_pg`] and [`fresh_database`] use
//!   `DATABASE_URL` when it is set, else one throwaway [`TestPostgres`] shared by every test of
//!   this process (started on first use, removed when the process exits). Tests that stop or
//!   restart Postgres must start their own `TestPostgres` instead.
//! * Kafka: [`kafka_brokers`] returns `KAFKA_BROKERS` when it is set (`scripts/test` starts tansu
//!   and sets it), else starts one tansu broker for this process, else (no tansu installed, or
//!   `OUTBOX_TEST_KAFKA=mock`) falls back to an in-process [`MockKafka`]. Create topics with
//!   [`create_topic`], which works with all three.
//! * [`unique_name`] gives every test its own table / topic names, so tests run in parallel.
//!
//! Nothing here is tied to a tokio runtime: every `#[tokio::test]` runs its own runtime, and the
//! shared servers are plain processes.
#![allow(dead_code, unused_imports)]

use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use outbox::testing::{
    assert_nothing_more, consume_all, create_topic_with_config, free_port, wait_for_topic,
    ConsumedRecord, MockKafka, TestPostgres, TopicReader,
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
    External(String),
    Tansu {
        brokers: String,
        /// `sh` wrapper: kills tansu when its stdin (held only by this process) closes.
        _guard: Mutex<Child>,
    },
    Mock(MockKafka),
}

impl Kafka {
    fn brokers(&self) -> String {
        match self {
            Kafka::External(b) | Kafka::Tansu { brokers: b, .. } => b.clone(),
            Kafka::Mock(m) => m.bootstrap_servers(),
        }
    }
}

static KAFKA: OnceLock<Kafka> = OnceLock::new();

fn kafka() -> &'static Kafka {
    KAFKA.get_or_init(|| {
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            if !brokers.is_empty() {
                return Kafka::External(brokers);
            }
        }
        let want_mock = std::env::var("OUTBOX_TEST_KAFKA").as_deref() == Ok("mock");
        if !want_mock {
            if let Some(tansu) = find_tansu() {
                return start_tansu(&tansu);
            }
            eprintln!(
                "support: KAFKA_BROKERS is not set and tansu is not installed: using librdkafka's \
                 mock cluster (run scripts/test to test against tansu)"
            );
        }
        Kafka::Mock(MockKafka::start(1).expect("starting the librdkafka mock cluster"))
    })
}

/// `bootstrap.servers` of the test Kafka: `KAFKA_BROKERS`, else a tansu broker started once per
/// test process, else an in-process mock cluster (see the module docs). Blocks on first use
/// while the broker starts (about a second).
pub fn kafka_brokers() -> String {
    kafka().brokers()
}

/// Whether the test Kafka is librdkafka's mock cluster (some Kafka features are missing there).
pub fn kafka_is_mock() -> bool {
    matches!(kafka(), Kafka::Mock(_))
}

/// Creates a topic on the test Kafka (CreateTopics, or the mock cluster's own API) and waits
/// until it is usable.
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

/// The tansu binary: `$TANSU`, `tansu` on PATH, `$OUTBOX_TOOLS/bin/tansu`,
/// `$HOME/.cache/outbox-tools/bin/tansu` or `/root/.cache/outbox-tools/bin/tansu`.
pub fn find_tansu() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(t) = std::env::var_os("TANSU") {
        candidates.push(PathBuf::from(t));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    if let Some(tools) = std::env::var_os("OUTBOX_TOOLS") {
        candidates.push(PathBuf::from(tools).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/outbox-tools/bin/tansu"));
    }
    candidates.push(PathBuf::from("/root/.cache/outbox-tools/bin/tansu"));
    candidates.into_iter().find(|p| p.is_file())
}

fn start_tansu(tansu: &std::path::Path) -> Kafka {
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port().expect("finding a free port for tansu");
        let url = format!("tcp://127.0.0.1:{port}");
        // Runs tansu, then waits for EOF on stdin (this process exiting or dropping the guard)
        // and kills it. Signals are ignored so that Ctrl-C still reaches the cleanup.
        let script = r#"log=$1; shift
"$@" >"$log" 2>&1 &
pid=$!
trap '' INT HUP TERM QUIT
cat >/dev/null 2>&1
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -f "$log""#;
        let log =
            std::env::temp_dir().join(format!("outbox-it-tansu-{}-{port}.log", std::process::id()));
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg("outbox-it-tansu")
            .arg(&log)
            .arg(tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning /bin/sh to run tansu");
        let brokers = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(
                &([127, 0, 0, 1], port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return Kafka::Tansu {
                    brokers,
                    _guard: Mutex::new(child),
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        last = std::fs::read_to_string(&log).unwrap_or_default();
        drop(child); // closes stdin: the wrapper kills tansu
    }
    panic!(
        "tansu ({}) did not start listening; its log:\n{last}",
        tansu.display()
    );
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

/// Installs a `tracing` subscriber writing to the test output, filtered by `RUST_LOG`
/// (default `warn`). Safe to call from every test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
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
