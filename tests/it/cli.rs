//! The `outbox-relay` binary, run as a user would: real Postgres, real broker, real process,
//! signals, HTTP endpoints and exit codes.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use outbox::{NewEvent, Writer};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

// ----------------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------------

/// [`support::relay_command`] for tokio, stdin closed, killed when dropped.
fn relay_cmd() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(support::relay_command());
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    pub(crate) fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs the binary to completion (at most 60 s).
pub(crate) async fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = relay_cmd();
    cmd.args(args).envs(envs.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("outbox-relay {args:?} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("spawning {BIN}: {e}"));
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the binary against `table` of the test database (via `--database-url`/`--table`).
pub(crate) async fn cli_on(table: &str, args: &[&str]) -> Output {
    cli_on_url(&support::postgres_url().await, table, args).await
}

/// Runs the binary against `table` of the database at `url`.
async fn cli_on_url(url: &str, table: &str, args: &[&str]) -> Output {
    let mut all = vec!["--database-url", url, "--table", table];
    all.extend_from_slice(args);
    cli(&all, &[]).await
}

/// `url` (a `postgres://` URL) with its database replaced by `db`.
fn url_for_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[host_start..].find('/') {
        Some(i) => &base[..host_start + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

pub(crate) fn assert_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.code,
        Some(code),
        "{what}: expected exit code {code}\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// Removes ANSI escape sequences (colours) from log text.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The value of `name=value` in a text log line.
pub(crate) fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(name)?.strip_prefix('='))
}

/// Runs the binary against `table` with `args`, which must be refused as invalid configuration
/// (exit 3; `what` describes the case) with a message naming `setting`.
async fn refused_naming(table: &str, args: &[&str], what: &str, setting: &str) -> Output {
    let out = cli_on(table, args).await;
    assert_code(&out, 3, what);
    assert!(out.stderr.contains(setting), "{}", out.stderr);
    out
}

/// A free local port's address, and the same as text for a command line.
fn local_addr() -> (SocketAddr, String) {
    let port = support::free_port().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    (addr, addr.to_string())
}

/// A running `outbox-relay` process ([`support::ChildRelay`]) and what the CLI tests ask of its
/// log.
pub(crate) struct RelayProcess {
    pub(crate) relay: support::ChildRelay,
}

impl RelayProcess {
    pub(crate) fn spawn(args: &[&str], envs: &[(&str, &str)]) -> RelayProcess {
        RelayProcess {
            relay: support::ChildRelay::with_args(args, envs),
        }
    }

    /// `outbox-relay --database-url <url> --table <table> --channel <table> run --kafka-brokers
    /// <brokers> --shutdown-timeout 3s` and `extra`, with no environment.
    pub(crate) fn run_on(url: &str, table: &str, brokers: &str, extra: &[&str]) -> RelayProcess {
        let mut args = vec![
            "--database-url",
            url,
            "--table",
            table,
            "--channel",
            table,
            "run",
            "--kafka-brokers",
            brokers,
            "--shutdown-timeout",
            "3s",
        ];
        args.extend_from_slice(extra);
        RelayProcess::spawn(&args, &[])
    }

    /// [`RelayProcess::run_on`] with `--metrics-addr` on a free local port; returns once it
    /// logs that it serves `/metrics` (60 s at most), with that address.
    pub(crate) async fn run_serving(
        url: &str,
        table: &str,
        brokers: &str,
        extra: &[&str],
    ) -> (RelayProcess, SocketAddr) {
        let (addr, addr_s) = local_addr();
        let mut args = vec!["--metrics-addr", addr_s.as_str()];
        args.extend_from_slice(extra);
        let mut relay = RelayProcess::run_on(url, table, brokers, &args);
        relay
            .wait_for_line("`serving /metrics`", Duration::from_secs(60), |l| {
                l.contains("serving /metrics")
            })
            .await;
        (relay, addr)
    }

    /// The stderr so far, without colours.
    pub(crate) fn log(&self) -> String {
        strip_ansi(&self.relay.stderr())
    }

    /// Waits until a stderr line satisfies `pred`; returns it.
    pub(crate) async fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if let Some(status) = self.relay.exited() {
                panic!(
                    "outbox-relay exited ({status}) before logging {what}; stderr:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "outbox-relay did not log {what} within {timeout:?}; stderr:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -TERM <pid>`.
    pub(crate) fn sigterm(&self) {
        self.relay.sigterm();
    }

    /// Waits for the process to exit; returns its exit code and how long it took.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        let Some(status) = self.relay.wait_exit(timeout).await else {
            panic!(
                "outbox-relay did not exit within {timeout:?}; stderr:\n{}",
                self.log()
            );
        };
        (status.code(), start.elapsed())
    }
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {raw:?}")))?;
    Ok((code, body.to_string()))
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let p = path.to_string();
    tokio::task::spawn_blocking(move || http_get(addr, &p))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// GETs `path` until it answers `want` (at most 30 s); returns the body.
pub(crate) async fn get_until(addr: SocketAddr, path: &str, want: u16) -> String {
    let what = format!("{path} answering {want}");
    support::eventually(Duration::from_secs(30), &what, || async move {
        let p = path.to_string();
        match tokio::task::spawn_blocking(move || http_get(addr, &p))
            .await
            .unwrap()
        {
            Ok((code, body)) if code == want => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Scrapes `/metrics` (each answering 200) until `ready` holds for its text (at most 30 s);
/// returns that text.
pub(crate) async fn metrics_until(
    addr: SocketAddr,
    what: &str,
    ready: impl Fn(&str) -> bool,
) -> String {
    let ready = &ready;
    support::eventually(Duration::from_secs(30), what, || async move {
        let (code, text) = get(addr, "/metrics").await;
        assert_eq!(code, 200, "/metrics: {text}");
        if ready(&text) {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await
}

/// The value of the first sample of `name` in Prometheus text, with or without labels.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        // The series of `name`, whatever its labels (the relay's carry `table`).
        let series = n.strip_prefix(name)?;
        (series.is_empty() || series.starts_with('{'))
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// A migrated table (own channel) in the shared test database.
pub(crate) async fn migrated_table(prefix: &str) -> (tokio_postgres::Client, String) {
    let client = support::connect_pg().await;
    let table = support::unique_name(prefix);
    outbox::migrate_table(&client, &table, &table)
        .await
        .unwrap_or_else(|e| panic!("migrating {table}: {e}"));
    (client, table)
}

/// Creates `table` with the Go DDL and three rows (two pending, one done) for `topic`, created
/// out of order; returns their ids in created_at order: (oldest new, done, newest new).
async fn go_table(client: &tokio_postgres::Client, table: &str, topic: &str) -> [Uuid; 3] {
    support::create_go_table(client, table).await;
    let ids = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    let insert = format!(
        "insert into {table} (id, aggregate_id, event_topic, event_type, payload, status, created_at)
         values ($1, $2, $3, $4, $5, $6, localtimestamp - $7::int * interval '1 minute')"
    );
    // Inserted newest first: migration numbers rows by created_at.
    for (id, agg, ty, payload, status, minutes) in [
        (
            ids[2],
            "go-a",
            "GoNewest",
            json!({"go": "newest"}),
            "new",
            1i32,
        ),
        (ids[1], "go-b", "GoDone", json!({"go": "done"}), "done", 2),
        (
            ids[0],
            "go-a",
            "GoOldest",
            json!({"go": "oldest"}),
            "new",
            3,
        ),
    ] {
        client
            .execute(
                &insert,
                &[&id, &agg, &topic, &ty, &payload, &status, &minutes],
            )
            .await
            .unwrap();
    }
    ids
}

/// Parses JSON lines.
pub(crate) fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn ids_of(lines: &[Value]) -> Vec<Uuid> {
    lines
        .iter()
        .map(|v| v["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

async fn statuses(client: &tokio_postgres::Client, table: &str) -> Vec<(Uuid, String, i32)> {
    client
        .query(
            &format!("select id, status, attempts from {table} order by seq"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

// ----------------------------------------------------------------------------------------------
// 1. migrate
// ----------------------------------------------------------------------------------------------

/// `migrate` upgrades a table created with the Go DDL in place: it names the migrations it
/// applied, a second run reports the table up to date, every row is kept (numbered in
/// created_at order), and the table is then usable by `status`. Before it, `status` refuses the
/// un-migrated table with exit 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_go_table_in_place() {
    let client = support::connect_pg().await;
    let table = support::unique_name("cli_go");
    let channel = support::unique_name("cli_go_c");
    let topic = support::unique_name("cli_go_topic");
    let [oldest, done, newest] = go_table(&client, &table, &topic).await;

    let before = cli_on(&table, &["status"]).await;
    assert_code(&before, 5, "status on an un-migrated Go table");
    assert!(
        before.stderr.contains(&table) && before.stderr.contains("migrate"),
        "names the table and migrate: {}",
        before.stderr
    );

    let first = cli_on(&table, &["--channel", &channel, "migrate"]).await;
    assert_code(&first, 0, "first migrate");
    // Its `if not exists` statements on the Go table answer with NOTICEs: not printed.
    assert!(
        !first.stderr.contains("NOTICE") && !first.stderr.contains("skipping"),
        "migrate prints no Postgres NOTICE: {}",
        first.stderr
    );
    let applied: Vec<i32> = (1..=outbox::SCHEMA_VERSION).collect();
    assert!(
        first.stdout.contains(&table)
            && first
                .stdout
                .contains(&format!("applied migrations {applied:?}")),
        "names the table and the applied migrations {applied:?}: {}",
        first.stdout
    );

    let second = cli_on(&table, &["--channel", &channel, "migrate"]).await;
    assert_code(&second, 0, "second migrate");
    assert!(
        second.stdout.contains("up to date")
            && second
                .stdout
                .contains(&format!("schema version {}", outbox::SCHEMA_VERSION))
            && !second.stdout.contains("applied"),
        "second run is a no-op: {}",
        second.stdout
    );

    let rows: Vec<(Uuid, Value, String, i64)> = client
        .query(
            &format!("select id, payload, status, seq from {table} order by seq"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (oldest, json!({"go": "oldest"}), "new".into(), 1),
            (done, json!({"go": "done"}), "done".into(), 2),
            (newest, json!({"go": "newest"}), "new".into(), 3),
        ],
        "every Go row kept, numbered by created_at"
    );
    let registered: String = client
        .query_one(
            "select channel from outbox_tables where table_name = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(registered, channel, "migrate registers --channel");

    let status = cli_on(&table, &["status", "--json"]).await;
    assert_code(&status, 0, "status after migrate");
    let s: Value = serde_json::from_str(status.stdout.trim()).unwrap();
    assert_eq!(s["pending"], 2, "the two Go rows are pending: {s}");
}

// ----------------------------------------------------------------------------------------------
// 2. run
// ----------------------------------------------------------------------------------------------

/// `run --migrate` on a Go table, configured through the environment (DATABASE_URL,
/// KAFKA_BROKERS, OUTBOX_TABLE, OUTBOX_CHANNEL): the pre-existing Go rows and newly inserted
/// events reach the topic (the Go `done` row does not), the progress line reports delivered and
/// backlog, and SIGTERM stops the process gracefully with exit 0 within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_relays_go_rows_logs_progress_and_stops_on_sigterm() {
    let client = support::connect_pg().await;
    let table = support::unique_name("cli_run");
    let channel = support::unique_name("cli_run_c");
    let topic = support::unique_name("cli_run_topic");
    let brokers = support::kafka_brokers();
    support::create_topic(&topic, 1).await;
    let [oldest, done, newest] = go_table(&client, &table, &topic).await;
    let url = support::postgres_url().await;

    let mut relay = RelayProcess::spawn(
        &[
            "run",
            "--migrate",
            "--progress-interval",
            "500ms",
            "--poll-interval",
            "200ms",
        ],
        &[
            ("DATABASE_URL", &url),
            ("KAFKA_BROKERS", &brokers),
            ("OUTBOX_TABLE", &table),
            ("OUTBOX_CHANNEL", &channel),
        ],
    );
    relay
        .wait_for_line("`outbox relay running`", Duration::from_secs(60), |l| {
            l.contains("outbox relay running")
        })
        .await;

    let writer = Writer::new(&table).unwrap();
    let mut expected = vec![oldest, newest];
    for i in 0..3 {
        let id = writer
            .add_new_event(
                &client,
                NewEvent::new(&topic, format!("new-{i}"), "Created", json!({"n": i})),
            )
            .await
            .unwrap();
        expected.push(id);
    }

    let records = support::assert_nothing_more(&brokers, &topic, 5, Duration::from_secs(1)).await;
    let got: BTreeSet<Uuid> = records
        .iter()
        .map(|r| {
            let id = r
                .headers
                .iter()
                .find(|(k, _)| k == "event_id")
                .expect("event_id header")
                .1
                .parse()
                .unwrap();
            id
        })
        .collect();
    assert_eq!(
        got,
        expected.iter().copied().collect::<BTreeSet<_>>(),
        "Go rows and new events published once each"
    );
    assert!(!got.contains(&done), "the Go `done` row is not published");
    let oldest_rec = records
        .iter()
        .find(|r| r.headers.iter().any(|(_, v)| v == &oldest.to_string()))
        .unwrap();
    assert_eq!(oldest_rec.key_str(), "go-a");
    assert_eq!(
        serde_json::from_str::<Value>(&oldest_rec.payload_str()).unwrap(),
        json!({"go": "oldest"})
    );

    // The progress line reports every delivery and an empty backlog.
    let line = relay
        .wait_for_line(
            "a progress line with delivered=5 backlog=0",
            Duration::from_secs(15),
            |l| {
                l.contains("progress")
                    && log_field(l, "delivered") == Some("5")
                    && log_field(l, "backlog") == Some("0")
            },
        )
        .await;
    assert!(
        log_field(&line, "dead_letters") == Some("0"),
        "progress line has dead_letters: {line}"
    );

    // Confirmed in the table.
    let left = support::count_rows(&client, &table, "where status <> 'done'").await;
    assert_eq!(left, 0, "every row is done");

    relay.sigterm();
    let (code, took) = relay.wait_exit(Duration::from_secs(15)).await;
    let log = relay.log();
    assert_eq!(code, Some(0), "graceful stop exits 0; stderr:\n{log}");
    assert!(
        took < Duration::from_secs(5),
        "stopped within a few seconds, took {took:?}"
    );
    assert!(
        log.contains("signal received"),
        "logs the signal; stderr:\n{log}"
    );
}

// ----------------------------------------------------------------------------------------------
// 3. /metrics and /health
// ----------------------------------------------------------------------------------------------

/// `--metrics-addr`: /metrics reports the delivered count and the commit-to-ack latency,
/// Deliveries whose reports come after their batch ended (a slow broker: 1 s round trip, batch
/// cutoff 100 ms) are recorded late, and each is a sample of `outbox_commit_to_ack_seconds`
/// like any other delivery: before, late deliveries were counted in
/// `outbox_events_delivered_total` but missing from the histogram, whose tail then hid exactly
/// the slow events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_deliveries_are_commit_to_ack_samples() {
    let (client, table) = migrated_table("cli_late_ack").await;
    let topic = support::unique_name("cli_late_ack_topic");
    let kafka = support::MockKafka::start(1).expect("mock cluster");
    let brokers = kafka.bootstrap_servers();
    kafka.create_topic(&topic, 1).expect("topic on the mock");
    support::wait_for_topic(&brokers, &topic, Duration::from_secs(30))
        .await
        .expect("topic");
    let url = support::postgres_url().await;
    let (mut relay, addr) = RelayProcess::run_serving(
        &url,
        &table,
        &brokers,
        &["--batch-timeout", "100ms", "--poll-interval", "200ms"],
    )
    .await;
    kafka
        .broker_round_trip_time(1, Duration::from_secs(1))
        .expect("delay the broker");
    let writer = Writer::new(&table).unwrap();
    for i in 0..3 {
        writer
            .add_new_event(
                &client,
                NewEvent::new(&topic, format!("late-{i}"), "Late", json!({"i": i})),
            )
            .await
            .unwrap();
    }
    let text = metrics_until(addr, "outbox_events_delivered_total reaching 3", |text| {
        metric(text, "outbox_events_delivered_total") == Some(3.0)
    })
    .await;
    assert!(
        relay
            .log()
            .contains("delivery reports late; holding those events"),
        "the reports came after the batch ended (held):\n{}",
        relay.log()
    );
    assert_eq!(
        metric(&text, "outbox_commit_to_ack_seconds_count"),
        Some(3.0),
        "one latency sample per delivered event, late ones too:\n{text}"
    );
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(20)).await;
}

/// /health is 200 with healthy/listener_connected true, other paths 404; an event stuck on a
/// missing topic older than `--health-max-pending-age` turns /health into 503 healthy:false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints() {
    let (client, table) = migrated_table("cli_metrics").await;
    let topic = support::unique_name("cli_metrics_topic");
    let missing = support::unique_name("cli_missing_topic");
    let brokers = support::kafka_brokers();
    support::create_topic(&topic, 1).await;
    let url = support::postgres_url().await;
    let (mut relay, addr) = RelayProcess::run_serving(
        &url,
        &table,
        &brokers,
        &[
            "--log-format",
            "json",
            "-X",
            "allow.auto.create.topics=false",
            "--health-max-pending-age",
            "1s",
            "--poll-interval",
            "200ms",
            "--progress-interval",
            "300ms",
        ],
    )
    .await;

    let writer = Writer::new(&table).unwrap();
    for i in 0..4 {
        writer
            .add_new_event(
                &client,
                NewEvent::new(&topic, format!("m-{i}"), "Metered", json!({"i": i})),
            )
            .await
            .unwrap();
    }
    let records = support::consume_all(&brokers, &topic, 4, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 4, "four events delivered");

    // The counter follows the confirmation, which may trail the broker's ack a little.
    let text = metrics_until(addr, "outbox_events_delivered_total reaching 4", |text| {
        metric(text, "outbox_events_delivered_total") == Some(4.0)
    })
    .await;
    assert!(
        text.contains("outbox_commit_to_ack_seconds"),
        "commit-to-ack latency exported:\n{text}"
    );
    assert_eq!(
        metric(&text, "outbox_commit_to_ack_seconds_count"),
        Some(4.0),
        "one latency sample per delivered event:\n{text}"
    );
    assert_eq!(
        metric(&text, "outbox_reservation_candidates_limit"),
        Some(2000.0),
        "reservations take batch_size (the default) while none misses its deadline:\n{text}"
    );
    assert_eq!(
        metric(&text, "outbox_left_out_aggregates"),
        Some(0.0),
        "no aggregate left out while no row is locked:\n{text}"
    );
    assert_eq!(
        metric(&text, "outbox_acks_without_offset_total"),
        Some(0.0),
        "registered at 0, so that an alert on it has a series (found by a new user):\n{text}"
    );

    let (code, body) = get(addr, "/health").await;
    assert_eq!(code, 200, "/health while healthy: {body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["healthy"], true, "{h}");
    assert_eq!(h["reasons"], json!([]), "{h}");
    assert_eq!(h["listener_connected"], true, "{h}");
    assert_eq!(h["running"], true, "{h}");
    assert_eq!(h["backlog"], 0, "{h}");
    assert_eq!(h["held_back_by"], Value::Null, "no row locked: {h}");
    assert!(h["last_delivery"].is_string(), "last delivery set: {h}");

    let (code, body) = get(addr, "/nope").await;
    assert_eq!(code, 404, "unknown path: {body}");

    // An event for a topic that does not exist stays pending; after 1 s the relay is unhealthy.
    writer
        .add_new_event(
            &client,
            NewEvent::new(&missing, "stuck", "Stuck", json!({"stuck": true})),
        )
        .await
        .unwrap();
    let h: Value = serde_json::from_str(&get_until(addr, "/health", 503).await).unwrap();
    assert_eq!(h["healthy"], false, "{h}");
    assert_eq!(h["backlog"], 1, "{h}");
    let reasons = h["reasons"].as_array().expect("reasons");
    assert!(
        reasons.iter().any(|r| r
            .as_str()
            .is_some_and(|r| r.starts_with("the oldest pending event is"))),
        "the reason named: {h}"
    );
    assert!(
        h["oldest_pending_age_s"].as_f64().unwrap() > 1.0,
        "the stuck event is older than 1 s: {h}"
    );
    assert_eq!(h["running"], true, "still running, just behind: {h}");
    let stuck: String = client
        .query_one(
            &format!("select status from {table} where event_topic = $1"),
            &[&missing],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stuck, "new");

    // The stuck event is still in flight: the stop waits for it at most --shutdown-timeout 3s
    // (the default would be 10 s).
    relay.sigterm();
    let (code, took) = relay.wait_exit(Duration::from_secs(20)).await;
    assert!(
        took < Duration::from_secs(8),
        "--shutdown-timeout 3s honoured, the stop took {took:?}"
    );
    let log = relay.log();
    assert_eq!(
        code,
        Some(0),
        "graceful stop with a stuck event; stderr:\n{log}"
    );
    // --log-format json: every stderr line is a JSON object with a message.
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("--log-format json wrote a non-JSON line ({e}): {l}"))
        })
        .collect();
    let messages: Vec<String> = lines
        .iter()
        .map(|v| {
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    // The progress line's figures are JSON numbers, for log pipelines that aggregate them.
    let progress: Vec<&Value> = lines
        .iter()
        .filter(|v| v["fields"]["message"] == "progress")
        .collect();
    assert!(!progress.is_empty(), "progress lines: {messages:?}");
    for p in progress {
        for field in ["delivered", "backlog", "dead_letters"] {
            assert!(
                p["fields"][field].is_u64(),
                "{field} is a whole number in the progress line: {p}"
            );
        }
        for field in ["delivered_per_s", "oldest_pending_age_s"] {
            assert!(
                p["fields"][field].is_f64(),
                "{field} is a number in the progress line: {p}"
            );
        }
    }
    assert!(
        messages.iter().any(|m| m == "serving /metrics and /health"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "signal received: stopping"),
        "{messages:?}"
    );
}

/// Ages do not depend on the writers' time zones (issue 13.2). Writers in New York, Tokyo and
/// UTC each commit, in one transaction, an event for a topic of their own that does not exist
/// (it stays pending), one for a real topic through `add_new_event`, and one through the Go
/// package's INSERT. A second later every age — `status` per topic, `/health`, and the
/// commit-to-ack histogram of the relay started then — lies between 1 s and the time since the
/// first write began. Read from the zone-dependent `created_at`, New York's events would be
/// hours old and Tokyo's 0 s, whatever the server's zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ages_are_right_whatever_the_writers_time_zone() {
    let (client, table) = migrated_table("cli_zones").await;
    let topic = support::fresh_topic("cli_zones_topic", 1).await;
    let brokers = support::kafka_brokers();
    let url = support::postgres_url().await;
    let zones = ["America/New_York", "Asia/Tokyo", "UTC"];
    let prefix = support::unique_name("cli_zones_missing");
    let missing: Vec<String> = zones
        .iter()
        .map(|z| format!("{prefix}_{}", z.replace('/', "_").to_lowercase()))
        .collect();
    let writer = Writer::new(&table).unwrap();
    let go_insert = format!(
        "insert into {table} (aggregate_id, event_topic, event_type, payload)
         values ($1,$2,$3,$4) returning id;"
    );
    let began = Instant::now();
    for (zone, stuck) in zones.iter().zip(&missing) {
        let mut client = support::connect_pg().await;
        client
            .batch_execute(&format!("set time zone '{zone}'"))
            .await
            .unwrap();
        let tx = client.transaction().await.unwrap();
        writer
            .add_new_event(
                &tx,
                NewEvent::new(
                    stuck,
                    format!("stuck-{zone}"),
                    "Stuck",
                    json!({"zone": zone}),
                ),
            )
            .await
            .unwrap();
        writer
            .add_new_event(
                &tx,
                NewEvent::new(&topic, *zone, "Ours", json!({"zone": zone})),
            )
            .await
            .unwrap();
        tx.query_one(&go_insert, &[zone, &topic, &"Go", &json!({"zone": zone})])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // Every event is at least this old when any age is read below.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let check = |age: f64, what: &str| {
        let max = began.elapsed().as_secs_f64();
        assert!(
            (1.0..=max).contains(&age),
            "{what}: age {age} s, expected 1 s..{max} s"
        );
    };

    let out = cli_on_url(&url, &table, &["status", "--json"]).await;
    assert_code(&out, 0, "status --json");
    let s: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let topics = s["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 4, "three stuck topics and the real one: {s}");
    for t in topics {
        check(
            t["oldest_pending_age_s"].as_f64().unwrap(),
            &format!("status of {}", t["topic"]),
        );
    }

    let (mut relay, addr) = RelayProcess::run_serving(
        &url,
        &table,
        &brokers,
        &[
            "-X",
            "allow.auto.create.topics=false",
            "--health-max-pending-age",
            "1h",
        ],
    )
    .await;
    let records = support::consume_all(&brokers, &topic, 6, Duration::from_secs(30)).await;
    assert_eq!(
        records.len(),
        6,
        "both writers' events of every zone delivered"
    );
    let text = metrics_until(addr, "outbox_events_delivered_total reaching 6", |text| {
        metric(text, "outbox_events_delivered_total") == Some(6.0)
    })
    .await;
    // Counters exist from the start, also those that never increased (issue 14.5).
    assert_eq!(
        metric(&text, "outbox_confirm_failures_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outbox_dead_letters_total"),
        Some(0.0),
        "{text}"
    );
    // published_at is when the delivery was confirmed: not before the producer created the
    // record (its CreateTime), which is after the reservation.
    for r in &records {
        let id: Uuid = r.header("event_id").unwrap().parse().unwrap();
        let published_ms: i64 = client
            .query_one(
                &format!(
                    "select (extract(epoch from published_at) * 1000)::int8 from {table} where id = $1"
                ),
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        let created_ms = r.timestamp_ms.expect("records carry a CreateTime");
        assert!(
            published_ms >= created_ms,
            "published_at {published_ms} ms precedes the record's CreateTime {created_ms} ms"
        );
    }
    let count = metric(&text, "outbox_commit_to_ack_seconds_count").unwrap();
    let sum = metric(&text, "outbox_commit_to_ack_seconds_sum").unwrap();
    assert_eq!(count, 6.0, "{text}");
    let max = began.elapsed().as_secs_f64();
    assert!(
        (6.0..=6.0 * max).contains(&sum),
        "commit-to-ack: six samples of 1 s..{max} s each, sum {sum} s"
    );

    let (code, body) = get(addr, "/health").await;
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "no event is an hour old: {h}");
    assert_eq!(h["backlog"], 3, "{h}");
    check(h["oldest_pending_age_s"].as_f64().unwrap(), "/health");
    relay.sigterm();
    let (code, _) = relay.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "stderr:\n{}", relay.log());
}

/// `migrate` refuses to adopt a Go table while the Go relay holds a live reservation (issue
/// 14.1: left running, it would publish our dead letters and ignore our order), names the rows
/// and changes nothing; once the lease has run out, the same command migrates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_while_the_go_relay_holds_reservations() {
    let client = support::connect_pg().await;
    let table = support::unique_name("cli_go_live");
    let topic = support::unique_name("cli_go_live_topic");
    let [oldest, _, _] = go_table(&client, &table, &topic).await;
    // The Go relay's SetReservedToByIDs: its clock plus its lease.
    let reserve = format!("update {table} set reserved_to = localtimestamp + $2::int * interval '1 minute' where id = $1");
    client.execute(&reserve, &[&oldest, &1i32]).await.unwrap();

    let refused = cli_on(&table, &["migrate"]).await;
    assert_code(&refused, 5, "migrate with a live Go reservation");
    assert!(
        refused.stderr.contains(&table)
            && refused
                .stderr
                .contains("1 row(s) are reserved by the Go package's relay")
            && refused.stderr.contains("nothing was changed"),
        "{}",
        refused.stderr
    );
    let seq_columns: i64 = client
        .query_one(
            "select count(*) from information_schema.columns where table_name = $1 and column_name = 'seq'",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seq_columns, 0, "the refused migrate changed the table");

    // The lease ran out (the Go relay stopped a lease ago).
    client.execute(&reserve, &[&oldest, &-1i32]).await.unwrap();
    let migrated = cli_on(&table, &["migrate"]).await;
    assert_code(&migrated, 0, "migrate once the Go leases have run out");
}

/// An existing table that is not the Go package's (columns missing) is refused by `migrate` with
/// the missing columns named, before any change: not Postgres' bare "column does not exist"
/// from a migration half-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_foreign_table_naming_its_missing_columns() {
    let client = support::connect_pg().await;
    let table = support::unique_name("cli_foreign");
    client
        .batch_execute(&format!(
            "create table {table} (id uuid primary key, aggregate_id text, payload jsonb)"
        ))
        .await
        .unwrap();
    let out = cli_on(&table, &["migrate"]).await;
    assert_code(&out, 5, "migrate of a foreign table");
    assert!(
        out.stderr.contains(&format!(
            "table {table} exists but is not the Go package's events table: no column event_topic, event_type, status, created_at, reserved_to"
        )) && out.stderr.contains("nothing was changed"),
        "{}",
        out.all()
    );
    let columns: i64 = client
        .query_one(
            "select count(*) from information_schema.columns where table_name = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, 3, "the refused migrate changed the table");
}

/// A Go relay still running against the table after `migrate` (issue 14.1), simulated with its
/// own statements (`FindNewAndNotReserved`, then `SetReservedToByIDs` with its process's clock
/// plus its lease): `status` warns, `/health` turns 503 naming the reserved rows, and the relay
/// logs an error telling to stop the Go relay; while reserved, our relay does not publish those
/// rows. When the Go relay's reservation is gone, health is green again and the rows go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_relay_still_running_is_reported() {
    let (client, table) = migrated_table("cli_gorelay").await;
    let topic = support::fresh_topic("cli_gorelay_topic", 1).await;
    let brokers = support::kafka_brokers();
    let url = support::postgres_url().await;
    let go_insert = format!(
        "insert into {table} (aggregate_id, event_topic, event_type, payload)
         values ($1,$2,$3,$4) returning id;"
    );
    for i in 0..3 {
        client
            .query_one(
                &go_insert,
                &[&format!("g-{i}"), &topic, &"Go", &json!({"i": i})],
            )
            .await
            .unwrap();
    }
    // The Go relay's round: its SELECT, then its reservation `time.Now().Add(ReserveDuration)`
    // (the Go process's wall clock; the same zone as this session here).
    let found: Vec<Uuid> = client
        .query(
            &format!(
                "select id, aggregate_id, event_topic, event_type,
                        payload, status, created_at, reserved_to
                   from {table} where status != $1 AND
                        (reserved_to IS NULL OR reserved_to < now());"
            ),
            &[&"done"],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(found.len(), 3);
    let reserved_to: chrono::NaiveDateTime = client
        .query_one("select localtimestamp + interval '2 minutes'", &[])
        .await
        .unwrap()
        .get(0);
    let n = client
        .execute(
            &format!("update {table} set reserved_to = $1 where id = ANY ($2);"),
            &[&reserved_to, &found],
        )
        .await
        .unwrap();
    assert_eq!(n, 3);

    let out = cli_on_url(&url, &table, &["status"]).await;
    assert_code(&out, 0, "status");
    assert!(
        out.stdout
            .contains("WARNING: 3 rows reserved by another relay")
            && out.stdout.contains("Go relay"),
        "status warns:\n{}",
        out.stdout
    );
    let out = cli_on_url(&url, &table, &["status", "--json"]).await;
    let s: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(s["legacy_reservations"], 3, "{s}");

    // A host name is accepted (found by the new-user helper: `localhost:9464` was refused);
    // `localhost` may resolve to ::1 first, so the test reads it back the same way.
    let (addr, _) = local_addr();
    let host_port = format!("localhost:{}", addr.port());
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .unwrap()
        .next()
        .unwrap();
    let mut relay = RelayProcess::run_on(
        &url,
        &table,
        &brokers,
        &["--metrics-addr", &host_port, "--poll-interval", "200ms"],
    );
    let line = relay
        .wait_for_line("the Go relay error", Duration::from_secs(60), |l| {
            l.contains("Go relay is probably still running")
        })
        .await;
    assert!(line.contains("ERROR") && line.contains("3"), "{line}");
    let (code, body) = get(addr, "/health").await;
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 503, "a Go relay beside ours is unhealthy: {h}");
    assert_eq!(h["legacy_reservations"], 3, "{h}");
    assert_eq!(h["healthy"], false, "{h}");
    assert!(
        h["reasons"]
            .to_string()
            .contains("reserved by another relay"),
        "{h}"
    );
    // The Go relay's rows are left alone while it holds them.
    let pending = support::count_rows(&client, &table, "where status = 'new'").await;
    assert_eq!(pending, 3);

    // The Go relay stopped and its lease ran out (simulated: moved into the past).
    client
        .execute(
            &format!(
                "update {table} set reserved_to = localtimestamp - interval '1 second' where id = ANY ($1)"
            ),
            &[&found],
        )
        .await
        .unwrap();
    client
        .execute(&format!("select pg_notify('{table}', '')"), &[])
        .await
        .unwrap();
    let records = support::consume_all(&brokers, &topic, 3, Duration::from_secs(30)).await;
    assert_eq!(
        records.len(),
        3,
        "the rows go out once the Go relay's lease ended"
    );
    get_until(addr, "/health", 200).await;
    relay.sigterm();
    let (code, _) = relay.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "stderr:\n{}", relay.log());
}

/// The default text log format writes plain text when stderr is not a terminal (a pipe, a log
/// file, journald, a container runtime): no ANSI colour escape sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_have_no_colour_codes() {
    // `migrate` on a new table logs each migration it applies.
    let table = support::unique_name("cli_plain_log");
    let out = cli_on(&table, &["migrate"]).await;
    assert_code(&out, 0, "migrate");
    assert!(
        out.stderr.contains("applying outbox migration"),
        "migrate logs its migrations: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains('\u{1b}'),
        "ANSI escape sequences in logs written to a pipe:\n{}",
        out.stderr.escape_debug()
    );
}

// ----------------------------------------------------------------------------------------------
// 4. status
// ----------------------------------------------------------------------------------------------

/// `status --json` and the table: pending, retrying, dead letters and oldest age per topic and
/// in total; delivered rows are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_backlog_as_json_and_table() {
    // A database of its own: `open_batches` counts the relay sessions of the whole database.
    let config = support::fresh_database().await;
    let url = url_for_db(
        &support::postgres_url().await,
        config
            .get_dbname()
            .expect("fresh_database names the database"),
    );
    let client = outbox::testing::connect(&config).await.unwrap();
    let table = support::unique_name("cli_status");
    outbox::migrate_table(&client, &table, &table)
        .await
        .unwrap();
    // Sorted: the per-topic list is ordered by topic name.
    let t1 = format!("{}_a", support::unique_name("cli_st"));
    let t2 = format!("{t1}_b");
    let t3 = format!("{t1}_c");
    let writer = Writer::new(&table).unwrap();
    let mut ids = Vec::new();
    for (topic, agg) in [
        (&t1, "a1"),
        (&t1, "a2"),
        (&t1, "a3"),
        (&t1, "a4"),
        (&t2, "b1"),
        (&t2, "b2"),
        (&t2, "b3"),
        (&t2, "b4"),
        (&t3, "c1"),
    ] {
        ids.push(
            writer
                .add_new_event(&client, NewEvent::new(topic, agg, "T", json!({})))
                .await
                .unwrap(),
        );
    }
    let exec = |sql: String, id: Uuid| {
        let client = &client;
        async move { client.execute(&sql, &[&id]).await.unwrap() }
    };
    // t1: a1 pending an hour old, a2 pending (retrying), a3 pending, a4 dead.
    exec(
        format!("update {table} set created_at_tz = now() - interval '1 hour' where id = $1"),
        ids[0],
    )
    .await;
    exec(
        format!(
            "update {table} set attempts = 1, last_error = 'x', next_attempt_at = now() + interval '1 hour' where id = $1"
        ),
        ids[1],
    )
    .await;
    // t2: b1 pending, b2 and b3 dead, b4 delivered; t3: c1 dead, nothing pending (no age).
    for id in [ids[3], ids[5], ids[6], ids[8]] {
        exec(
            format!("update {table} set status = 'failed', attempts = 10, last_error = 'boom' where id = $1"),
            id,
        )
        .await;
    }
    exec(
        format!("update {table} set status = 'done', published_at = now() where id = $1"),
        ids[7],
    )
    .await;

    let out = cli_on_url(&url, &table, &["status", "--json"]).await;
    assert_code(&out, 0, "status --json");
    let s: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is one JSON document ({e}): {}", out.stdout));
    assert_eq!(s["table"], table.as_str(), "{s}");
    assert_eq!(s["pending"], 4, "{s}");
    assert_eq!(s["retrying"], 1, "{s}");
    assert_eq!(s["dead_letters"], 4, "{s}");
    assert_eq!(s["open_batches"], 0, "{s}");
    let age = s["oldest_pending_age_s"].as_f64().unwrap();
    assert!(
        (3590.0..3700.0).contains(&age),
        "oldest is an hour old: {s}"
    );
    let topics = s["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 3, "{s}");
    let (j1, j2, j3) = (&topics[0], &topics[1], &topics[2]);
    assert_eq!(j1["topic"], t1.as_str(), "{s}");
    assert_eq!(
        (&j1["pending"], &j1["retrying"], &j1["dead_letters"]),
        (&json!(3), &json!(1), &json!(1)),
        "{s}"
    );
    assert!(
        j1["oldest_pending_age_s"].as_f64().unwrap() >= 3590.0,
        "{s}"
    );
    assert_eq!(j2["topic"], t2.as_str(), "{s}");
    assert_eq!(
        (&j2["pending"], &j2["retrying"], &j2["dead_letters"]),
        (&json!(1), &json!(0), &json!(2)),
        "{s}"
    );
    assert!(j2["oldest_pending_age_s"].as_f64().unwrap() < 600.0, "{s}");
    assert_eq!(j3["topic"], t3.as_str(), "{s}");
    assert_eq!(j3["dead_letters"], 1, "{s}");
    assert!(
        j3["oldest_pending_age_s"].is_null(),
        "nothing pending, no age (found by the new user: 0.0): {s}"
    );

    let out = cli_on_url(&url, &table, &["status"]).await;
    assert_code(&out, 0, "status");
    let cols = |prefix: &str| -> Vec<String> {
        out.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line:\n{}", out.stdout))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert!(out.stdout.contains("TOPIC"), "header:\n{}", out.stdout);
    assert_eq!(cols(&t1)[1..4], ["3", "1", "1"], "\n{}", out.stdout);
    assert_eq!(cols(&t2)[1..4], ["1", "0", "2"], "\n{}", out.stdout);
    let total = cols("TOTAL");
    assert_eq!(cols(&t3)[1..], ["0", "0", "1", "-"], "\n{}", out.stdout);
    assert_eq!(total[1..4], ["4", "1", "4"], "\n{}", out.stdout);
    assert!(
        total[4].ends_with('s') && total[4].starts_with("3"),
        "oldest pending age about 3600s: {total:?}"
    );
    assert!(
        out.stdout.contains("open relay batches: 0"),
        "\n{}",
        out.stdout
    );
}

// ----------------------------------------------------------------------------------------------
// 5. find
// ----------------------------------------------------------------------------------------------

/// `find` prints one JSON document per line and honours --status, --aggregate, --topic,
/// --type, --id, --limit and --after-seq (keyset paging over seq).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_filters_and_pages_json_lines() {
    let (client, table) = migrated_table("cli_find").await;
    let t1 = support::unique_name("cli_find_t1");
    let t2 = support::unique_name("cli_find_t2");
    let writer = Writer::new(&table).unwrap();
    let specs = [
        (&t1, "A", "Created"),
        (&t1, "A", "Updated"),
        (&t2, "B", "Created"),
        (&t1, "A", "Updated"),
        (&t2, "B", "Deleted"),
        (&t1, "C", "Created"),
    ];
    let mut ids = Vec::new();
    for (i, (topic, agg, ty)) in specs.iter().enumerate() {
        let ev = NewEvent::new(*topic, *agg, *ty, json!({"i": i})).header("trace", format!("t{i}"));
        ids.push(writer.add_new_event(&client, ev).await.unwrap());
    }
    // A's first and third events are dead letters; B's first is delivered.
    for id in [ids[0], ids[3]] {
        client
            .execute(
                &format!("update {table} set status = 'failed', attempts = 3, last_error = 'boom' where id = $1"),
                &[&id],
            )
            .await
            .unwrap();
    }
    client
        .execute(
            &format!("update {table} set status = 'done' where id = $1"),
            &[&ids[2]],
        )
        .await
        .unwrap();

    async fn find(table: &str, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["find"];
        all.extend_from_slice(args);
        let out = cli_on(table, &all).await;
        assert_code(&out, 0, &format!("find {args:?}"));
        json_lines(&out.stdout)
    }

    let everything = find(&table, &[]).await;
    assert_eq!(ids_of(&everything), ids, "all events, in seq order");
    let seqs: Vec<i64> = everything
        .iter()
        .map(|v| v["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq ascending");
    let first = &everything[0];
    assert_eq!(first["aggregate_id"], "A");
    assert_eq!(first["topic"], t1.as_str());
    assert_eq!(first["event_type"], "Created");
    assert_eq!(first["payload"], json!({"i": 0}));
    assert_eq!(first["headers"], json!({"trace": "t0"}));
    assert_eq!(first["status"], "failed");
    assert_eq!(first["attempts"], 3);
    assert_eq!(first["last_error"], "boom");

    let failed = find(&table, &["--status", "failed"]).await;
    assert_eq!(ids_of(&failed), vec![ids[0], ids[3]]);
    assert!(failed.iter().all(|v| v["status"] == "failed"));

    let new_or_done = find(&table, &["--status", "new", "--status", "done"]).await;
    assert_eq!(ids_of(&new_or_done), vec![ids[1], ids[2], ids[4], ids[5]]);

    let a = find(&table, &["--aggregate", "A"]).await;
    assert_eq!(ids_of(&a), vec![ids[0], ids[1], ids[3]]);
    let a_failed = find(&table, &["--aggregate", "A", "--status", "failed"]).await;
    assert_eq!(ids_of(&a_failed), vec![ids[0], ids[3]]);

    let on_t2 = find(&table, &["--topic", &t2]).await;
    assert_eq!(ids_of(&on_t2), vec![ids[2], ids[4]]);
    // Nothing found: no JSON line, and stderr says so.
    let none = cli_on(&table, &["find", "--aggregate", "nosuch"]).await;
    assert_code(&none, 0, "find with no match");
    assert_eq!(none.stdout.trim(), "", "{}", none.stdout);
    assert!(none.stderr.contains("no events match"), "{}", none.stderr);
    assert!(on_t2.iter().all(|v| v["topic"] == t2.as_str()));

    let created = find(&table, &["--type", "Created", "--topic", &t1]).await;
    assert_eq!(ids_of(&created), vec![ids[0], ids[5]]);

    let by_id = find(
        &table,
        &["--id", &ids[4].to_string(), "--id", &ids[1].to_string()],
    )
    .await;
    assert_eq!(ids_of(&by_id), vec![ids[1], ids[4]]);

    // Keyset paging: two pages of --limit 4 cover everything once.
    let page1 = find(&table, &["--limit", "4"]).await;
    assert_eq!(ids_of(&page1), ids[..4]);
    let cursor = page1.last().unwrap()["seq"].as_i64().unwrap().to_string();
    let page2 = find(&table, &["--limit", "4", "--after-seq", &cursor]).await;
    assert_eq!(ids_of(&page2), ids[4..]);
    let cursor = page2.last().unwrap()["seq"].as_i64().unwrap().to_string();
    assert!(find(&table, &["--after-seq", &cursor]).await.is_empty());

    let none = find(&table, &["--aggregate", "nobody"]).await;
    assert!(none.is_empty());

    let bad = cli_on(&table, &["find", "--limit", "0"]).await;
    assert_code(&bad, 3, "find --limit 0");
    assert!(bad.stderr.contains("limit"), "{}", bad.stderr);
}

// ----------------------------------------------------------------------------------------------
// 6. requeue
// ----------------------------------------------------------------------------------------------

/// `requeue`: no selector is refused (exit 2, naming --all); --dry-run lists the selected dead
/// letters and changes nothing; without it they become pending again with attempts reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_needs_a_selector_dry_runs_and_requeues() {
    let (client, table) = migrated_table("cli_requeue").await;
    let topic = support::unique_name("cli_requeue_t");
    let writer = Writer::new(&table).unwrap();
    let mut ids = Vec::new();
    for agg in ["X", "Y", "X", "Z"] {
        ids.push(
            writer
                .add_new_event(
                    &client,
                    NewEvent::new(&topic, agg, "T", json!({"agg": agg})),
                )
                .await
                .unwrap(),
        );
    }
    // X's two events and Y's are dead letters; Z's is pending.
    for id in &ids[..3] {
        client
            .execute(
                &format!("update {table} set status = 'failed', attempts = 10, last_error = 'boom' where id = $1"),
                &[id],
            )
            .await
            .unwrap();
    }
    let initial = statuses(&client, &table).await;
    let dead = |rows: &[(Uuid, String, i32)]| -> Vec<Uuid> {
        rows.iter()
            .filter(|r| r.1 == "failed")
            .map(|r| r.0)
            .collect()
    };
    assert_eq!(dead(&initial), ids[..3]);

    let out = cli_on(&table, &["requeue"]).await;
    assert_code(&out, 2, "requeue without selectors");
    assert!(out.stderr.contains("--all"), "names --all: {}", out.stderr);
    assert_eq!(statuses(&client, &table).await, initial, "nothing changed");

    let out = cli_on(&table, &["requeue", "--aggregate", "X", "--dry-run"]).await;
    assert_code(&out, 0, "requeue --aggregate X --dry-run");
    let listed = json_lines(&out.stdout);
    assert_eq!(ids_of(&listed), vec![ids[0], ids[2]], "X's dead letters");
    assert!(listed.iter().all(|v| v["aggregate_id"] == "X"));
    assert!(
        out.stderr.contains("2 dead letter(s) would be requeued"),
        "{}",
        out.stderr
    );
    assert_eq!(
        statuses(&client, &table).await,
        initial,
        "a dry run changes nothing"
    );

    let out = cli_on(&table, &["requeue", "--aggregate", "X"]).await;
    assert_code(&out, 0, "requeue --aggregate X");
    assert!(
        out.stdout.contains("requeued 2 dead letter(s)"),
        "prints the count: {}",
        out.stdout
    );
    let after = statuses(&client, &table).await;
    assert_eq!(
        after,
        vec![
            (ids[0], "new".to_string(), 0),
            (ids[1], "failed".to_string(), 10),
            (ids[2], "new".to_string(), 0),
            (ids[3], "new".to_string(), 0),
        ],
        "X's dead letters pending again with attempts reset; Y untouched"
    );

    let out = cli_on(&table, &["requeue", "--aggregate", "X"]).await;
    assert_code(&out, 0, "requeue --aggregate X again");
    assert!(out.stdout.contains("requeued 0"), "{}", out.stdout);

    let out = cli_on(&table, &["requeue", "--id", &ids[1].to_string()]).await;
    assert_code(&out, 0, "requeue --id");
    assert!(out.stdout.contains("requeued 1"), "{}", out.stdout);
    assert!(dead(&statuses(&client, &table).await).is_empty());
}

// ----------------------------------------------------------------------------------------------
// 7. Bad flags, bad configuration, unreachable servers, missing table
// ----------------------------------------------------------------------------------------------

/// Flags clap or the binary refuses: exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_2() {
    let out = cli(&["frobnicate"], &[]).await;
    assert_code(&out, 2, "unknown subcommand");
    assert!(out.stderr.contains("frobnicate"), "{}", out.stderr);

    let out = cli(&["status", "--no-such-flag"], &[]).await;
    assert_code(&out, 2, "unknown flag");
    assert!(out.stderr.contains("--no-such-flag"), "{}", out.stderr);

    let out = cli(&[], &[]).await;
    assert_code(&out, 2, "no subcommand");

    let out = cli(&["run", "--poll-interval", "soon"], &[]).await;
    assert_code(&out, 2, "unparseable duration");

    let out = cli(&["find", "--status", "lost"], &[]).await;
    assert_code(&out, 2, "unknown status");

    let (_client, table) = migrated_table("cli_badx").await;
    let brokers = support::kafka_brokers();
    let out = cli_on(
        &table,
        &["run", "--kafka-brokers", &brokers, "-X", "nonsense"],
    )
    .await;
    assert_code(&out, 2, "-X without =");
    assert!(out.stderr.contains("nonsense"), "{}", out.stderr);
}

/// Invalid configuration: exit 3, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_exits_3() {
    let (_client, table) = migrated_table("cli_cfg").await;
    let brokers = support::kafka_brokers();

    let out = refused_naming(
        &table,
        &["run"],
        "run without KAFKA_BROKERS",
        "kafka_brokers",
    )
    .await;
    // Only the clear error: no librdkafka warning about the missing bootstrap.servers first.
    assert!(
        !out.stderr.contains("librdkafka") && !out.stderr.contains("CONFWARN"),
        "{}",
        out.stderr
    );

    refused_naming(
        &table,
        &[
            "run",
            "--kafka-brokers",
            &brokers,
            "-X",
            "no.such.property=1",
        ],
        "-X no.such.property=1",
        "no.such.property",
    )
    .await;

    refused_naming(
        &table,
        &[
            "run",
            "--kafka-brokers",
            &brokers,
            "-X",
            "bootstrap.servers=x:1",
        ],
        "-X bootstrap.servers",
        "bootstrap.servers",
    )
    .await;

    refused_naming(
        &table,
        &["run", "--kafka-brokers", &brokers, "--lease", "1s"],
        "--lease 1s",
        "lease",
    )
    .await;

    // A broker host that does not resolve beside a setting out of range: only the clear error,
    // not the Kafka client's resolve errors before it (no client is created).
    let out = refused_naming(
        &table,
        &[
            "run",
            "--kafka-brokers",
            "no-such-broker.invalid:9092",
            "--batch-size",
            "0",
        ],
        "--batch-size 0 with an unresolvable broker",
        "batch_size",
    )
    .await;
    assert!(
        !out.stderr.contains("Kafka client error") && !out.stderr.contains("resolve"),
        "{}",
        out.stderr
    );

    let out = cli(&["status"], &[]).await;
    assert_code(&out, 3, "no database URL");
    assert!(
        out.stderr.contains("DATABASE_URL") || out.stderr.contains("--database-url"),
        "{}",
        out.stderr
    );

    let out = cli(
        &[
            "--database-url",
            "postgres://u:s3cret@127.0.0.1:notaport/x",
            "status",
        ],
        &[],
    )
    .await;
    assert_code(&out, 3, "unparseable database URL");
    assert!(
        !out.all().contains("s3cret"),
        "password leaked:\n{}",
        out.all()
    );

    // A mistyped scheme, or no scheme: the error says what form is expected, and nothing of
    // the URL but the scheme.
    for (bad, says) in [
        (
            "postgress://u:s3cret@127.0.0.1/x",
            "postgresql://, not postgress://",
        ),
        (
            "u:s3cret@127.0.0.1/x",
            "postgres://USER:PASSWORD@HOST:PORT/DATABASE",
        ),
    ] {
        let out = cli(&["--database-url", bad, "status"], &[]).await;
        assert_code(&out, 3, bad);
        assert!(out.stderr.contains(says), "{bad}: {}", out.stderr);
        assert!(
            !out.all().contains("s3cret"),
            "password leaked:\n{}",
            out.all()
        );
    }

    let url = support::postgres_url().await;
    let out = cli(
        &[
            "--database-url",
            &url,
            "--table",
            "bad-name; drop",
            "status",
        ],
        &[],
    )
    .await;
    assert_code(&out, 3, "invalid table name");
}

/// Postgres unreachable: exit 4 from every subcommand, and the password never shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_exits_4_without_the_password() {
    let brokers = support::kafka_brokers();
    let url = "postgres://u:s3cret@127.0.0.1:1/x";
    for args in [
        vec!["migrate"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["find"],
        vec!["requeue", "--all"],
        vec!["run", "--kafka-brokers", brokers.as_str()],
    ] {
        let mut all = vec!["--database-url", url];
        all.extend(args.iter().copied());
        let out = cli(&all, &[]).await;
        assert_code(&out, 4, &format!("{args:?} with Postgres unreachable"));
        assert!(
            !out.all().contains("s3cret"),
            "{args:?}: password leaked:\n{}",
            out.all()
        );
        assert!(
            out.stderr.to_lowercase().contains("postgres"),
            "{args:?}: names Postgres: {}",
            out.stderr
        );
        // Also through the environment, with debug logging on.
        let out = cli(&args, &[("DATABASE_URL", url), ("OUTBOX_LOG", "debug")]).await;
        assert_code(&out, 4, &format!("{args:?} with DATABASE_URL unreachable"));
        assert!(
            !out.all().contains("s3cret"),
            "{args:?} (env, debug log): password leaked:\n{}",
            out.all()
        );
    }
    // Key=value form without a user: the error names the target as the connect uses it (the OS
    // user, and a database of its name), not a placeholder for a hidden value.
    let out = cli(&["--database-url", "host=127.0.0.1 port=1", "status"], &[]).await;
    assert_code(&out, 4, "key=value URL without a user");
    assert!(
        out.stderr
            .contains("127.0.0.1:1, database (the OS user's name), user (the OS user)"),
        "{}",
        out.stderr
    );
}

/// A table that does not exist: exit 5, naming the table and `migrate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_exits_5() {
    let table = support::unique_name("cli_nothere");
    let brokers = support::kafka_brokers();
    for args in [
        vec!["status"],
        vec!["find"],
        vec!["requeue", "--all"],
        vec!["run", "--kafka-brokers", brokers.as_str()],
    ] {
        let out = cli_on(&table, &args).await;
        assert_code(&out, 5, &format!("{args:?} on a missing table"));
        assert!(
            out.stderr.contains(&table) && out.stderr.contains("migrate"),
            "{args:?}: names the table and migrate: {}",
            out.stderr
        );
    }
    // Still missing: none of them created it.
    let client = support::connect_pg().await;
    let exists: bool = client
        .query_one("select to_regclass($1) is not null", &[&table])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "nothing created {table}");
}
