//! Test infrastructure: a throwaway Postgres server, an in-process Kafka cluster and helpers
//! that read a topic back.
//!
//! This module is compiled only with the `testing` feature. It is meant for the crate's own
//! tests and for applications that want to test their use of the outbox end to end:
//!
//! * [`TestPostgres`] runs a private Postgres cluster in a temporary directory (trust auth,
//!   user `postgres`, loopback only). It can be stopped, crashed and restarted on the same data
//!   directory and port, to test recovery.
//! * [`MockKafka`] is librdkafka's in-process mock cluster (with error and latency injection).
//! * [`faults`]: a TCP fault proxy (latency, blackhole, reset, bandwidth) for Postgres and
//!   Kafka connections, and helpers that end relay sessions, hold a snapshot open, or make the
//!   idempotent producer fatal through the mock cluster.
//! * [`consume_all`], [`assert_nothing_more`] and [`TopicReader`] read a topic back from any
//!   Kafka-protocol broker (Apache Kafka or the mock cluster); [`create_topic`] creates one
//!   through the admin API (the mock cluster has its own way).
//!
//! The helpers in this module panic on infrastructure failures where that is what a test wants
//! (each such function documents it); functions that return a `Result` never panic.

pub mod faults;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

// ---------------------------------------------------------------------------------------------
// Postgres
// ---------------------------------------------------------------------------------------------

/// Options for a [`TestPostgres`] server; create one with [`TestPostgres::builder`].
///
/// Defaults: `fsync = off` (and `full_page_writes = off`), `max_connections = 200`, data in a
/// fresh temporary directory, server binaries found automatically (see [`bindir`]).
///
/// [`bindir`]: TestPostgresBuilder::bindir
#[derive(Debug, Clone)]
pub struct TestPostgresBuilder {
    fsync: bool,
    max_connections: u32,
    settings: BTreeMap<String, String>,
    bindir: Option<PathBuf>,
    base_dir: Option<PathBuf>,
    /// The port of the primary this server is a streaming standby of.
    standby_of: Option<u16>,
}

impl Default for TestPostgresBuilder {
    fn default() -> Self {
        TestPostgresBuilder {
            fsync: false,
            max_connections: 200,
            settings: BTreeMap::new(),
            bindir: None,
            base_dir: None,
            standby_of: None,
        }
    }
}

impl TestPostgresBuilder {
    /// Whether the server syncs its writes to disk (`fsync`, `full_page_writes`). Default `false`:
    /// faster, and crash safety of the test machine does not matter. Turn it on for benchmarks.
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// The server's `max_connections` (default 200).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Any other server setting, written to the server's configuration file as
    /// `name = 'value'` (for example `setting("log_statement", "all")`). Later calls with the
    /// same name win; these override the builder's own settings.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(name.into(), value.into());
        self
    }

    /// Directory holding `initdb`, `pg_ctl` and `postgres`. Without it: the `PG_BINDIR`
    /// environment variable, else `pg_config --bindir`, else the newest
    /// `/usr/lib/postgresql/*/bin`, else `initdb` on `PATH`.
    pub fn bindir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bindir = Some(dir.into());
        self
    }

    /// Parent directory of the server's temporary directory. Default: the system temporary
    /// directory, or `/tmp` when running as root (the `postgres` user must be able to reach it).
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = Some(dir.into());
        self
    }

    /// Makes the server a hot standby of `primary` (asynchronous streaming replication): its
    /// data directory is a `pg_basebackup -R` of the primary instead of a fresh `initdb`, so it
    /// has the primary's databases, tables and settings, replays what the primary commits, and
    /// refuses writes (SQLSTATE 25006) until [`TestPostgres::promote`].
    pub fn standby_of(mut self, primary: &TestPostgres) -> Self {
        self.standby_of = Some(primary.port());
        self
    }

    /// Creates and starts the server (see [`TestPostgres::start`]).
    pub async fn start(self) -> io::Result<TestPostgres> {
        blocking(move || self.start_blocking()).await
    }

    /// Like [`start`](Self::start), for code that is not async (blocks for about a second).
    pub fn start_blocking(self) -> io::Result<TestPostgres> {
        let bindir = self.checked_bindir()?;
        let as_postgres = running_as_root();
        let tempdir = self.make_tempdir(as_postgres)?;
        let dir = tempdir.path().to_path_buf();
        let inner = Inner {
            bindir,
            dir: dir.clone(),
            data_dir: dir.join("data"),
            log_file: dir.join("postgres.log"),
            as_postgres,
            port: Mutex::new(0),
            running: Mutex::new(false),
            watchdog: Mutex::new(None),
            _tempdir: tempdir,
        };
        match self.standby_of {
            Some(primary) => inner.clone_cluster(primary)?,
            None => inner.init_cluster()?,
        }
        // The watchdog stops the server and removes the directory when this process exits
        // without dropping the TestPostgres (a `static`, a panic=abort, a SIGKILL, Ctrl-C).
        inner.spawn_watchdog()?;
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            *inner.port.lock().unwrap() = port;
            inner.write_settings(&self, port)?;
            match inner.start_server() {
                Ok(()) => {
                    return Ok(TestPostgres {
                        inner: Arc::new(inner),
                    })
                }
                Err(e) if inner.log_tail().contains("already in use") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("TestPostgres: no free port")))
    }

    /// The directory of the server programs, checked to hold `initdb`, `pg_ctl` and `postgres`.
    fn checked_bindir(&self) -> io::Result<PathBuf> {
        let bindir = match self.bindir.clone() {
            Some(dir) => dir,
            None => find_bindir()?,
        };
        for tool in ["initdb", "pg_ctl", "postgres"] {
            if !bindir.join(tool).is_file() {
                return Err(io::Error::other(format!(
                    "TestPostgres: {} not found in {} (install the `postgresql` package or set PG_BINDIR)",
                    tool,
                    bindir.display()
                )));
            }
        }
        Ok(bindir)
    }

    /// The server's temporary directory, owned by `postgres` when running as root.
    fn make_tempdir(&self, as_postgres: bool) -> io::Result<tempfile::TempDir> {
        let base = match &self.base_dir {
            Some(dir) => dir.clone(),
            None if as_postgres && Path::new("/tmp").is_dir() => PathBuf::from("/tmp"),
            None => std::env::temp_dir(),
        };
        let tempdir = tempfile::Builder::new()
            .prefix("outbox-pg-")
            .tempdir_in(&base)
            .map_err(|e| {
                annotate(
                    e,
                    &format!("creating a temporary directory in {}", base.display()),
                )
            })?;
        if as_postgres {
            run_checked(
                Command::new("chown").arg("postgres:").arg(tempdir.path()),
                "chown of the temporary directory to the postgres user (running as root: \
                 the server runs as `postgres`; does that user exist?)",
            )?;
        }
        Ok(tempdir)
    }
}

impl Inner {
    /// `initdb` of the data directory, whose `postgresql.conf` then includes
    /// `outbox_test.conf` (our settings live in their own file so that a port change rewrites
    /// only that file).
    fn init_cluster(&self) -> io::Result<()> {
        let mut initdb = self.pg_command("initdb");
        initdb.arg("-D").arg(&self.data_dir).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        run_checked(&mut initdb, "initdb")?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir.join("postgresql.conf"))?;
        writeln!(conf, "\ninclude 'outbox_test.conf'")?;
        Ok(())
    }
}

impl Inner {
    /// The data directory as a `pg_basebackup -R` (streaming WAL, standby configuration
    /// written) of the server on `primary_port`; its `outbox_test.conf` is rewritten for this
    /// server afterwards.
    fn clone_cluster(&self, primary_port: u16) -> io::Result<()> {
        let mut backup = self.pg_command("pg_basebackup");
        backup.arg("-D").arg(&self.data_dir).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary_port.to_string(),
            "-U",
            "postgres",
            "-X",
            "stream",
            "-R",
            "-c",
            "fast",
        ]);
        run_checked(&mut backup, "pg_basebackup of the primary").map(|_| ())
    }
}

/// A throwaway Postgres server for tests.
///
/// `TestPostgres::start().await?` runs `initdb` in a fresh temporary directory and starts
/// `postgres` on a free loopback TCP port (no other listener; its unix socket lives in the same
/// temporary directory), with trust authentication: connect as user `postgres` to database
/// `postgres` without a password, see [`url`](Self::url) and [`config`](Self::config). It takes
/// about one second. When the process runs as root, the directory is handed to the `postgres`
/// system user and the server programs run through `runuser -u postgres --` (Postgres refuses to
/// run as root).
///
/// Dropping it stops the server (immediate shutdown) and deletes the directory. A helper process
/// does the same if this process exits without dropping it, so a `TestPostgres` kept in a
/// `static` does not outlive the test binary.
///
/// The server can be stopped, crashed and started again on the same data directory and port
/// ([`stop`](Self::stop), [`crash`](Self::crash), [`start_again`](Self::start_again),
/// [`restart`](Self::restart)) to test how clients survive a database restart.
///
/// The server processes do not belong to any tokio runtime: one `TestPostgres` can serve tests
/// that each run their own runtime.
pub struct TestPostgres {
    inner: Arc<Inner>,
}

impl fmt::Debug for TestPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPostgres")
            .field("url", &self.url())
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl TestPostgres {
    /// Options for a new server (fsync, max_connections, any setting).
    pub fn builder() -> TestPostgresBuilder {
        TestPostgresBuilder::default()
    }

    /// Starts a server with the default options (fsync off, 200 connections).
    ///
    /// Errors (with a message saying what was tried) when the Postgres server programs cannot be
    /// found, `initdb` fails, or the server does not start; the server log is included.
    pub async fn start() -> io::Result<TestPostgres> {
        Self::builder().start().await
    }

    /// The TCP port the server listens on (on 127.0.0.1). It stays the same across restarts.
    pub fn port(&self) -> u16 {
        *self.inner.port.lock().unwrap()
    }

    /// Connection URL of the `postgres` database: `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Connection URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port(), database)
    }

    /// Connection configuration of the `postgres` database.
    pub fn config(&self) -> tokio_postgres::Config {
        self.config_for("postgres")
    }

    /// Connection configuration of another database on this server.
    pub fn config_for(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port())
            .user("postgres")
            .dbname(database)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Connects to the `postgres` database; the connection runs on a task spawned with
    /// `tokio::spawn` (so this needs a tokio runtime).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(&self.config()).await
    }

    /// Creates a database (`CREATE DATABASE "name"`) and returns its URL.
    pub async fn create_database(&self, name: &str) -> io::Result<String> {
        let client = self.connect().await.map_err(io::Error::other)?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .map_err(|e| io::Error::other(format!("CREATE DATABASE {name}: {e}")))?;
        Ok(self.url_for(name))
    }

    /// The server's temporary directory (data directory in `data/`, log in `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The server log so far (useful in a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.inner.log_file).unwrap_or_default()
    }

    /// Whether the server is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        *self.inner.running.lock().unwrap()
    }

    /// Promotes a standby (see [`TestPostgresBuilder::standby_of`]) to a primary that accepts
    /// writes (`pg_ctl promote`, waiting until it does).
    pub async fn promote(&self) -> io::Result<()> {
        let inner = self.inner.clone();
        blocking(move || {
            let mut cmd = inner.pg_command("pg_ctl");
            cmd.arg("-D")
                .arg(&inner.data_dir)
                .args(["-w", "-t", "60", "-s", "promote"]);
            run_checked(&mut cmd, "pg_ctl promote").map(|_| ())
        })
        .await
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`: open sessions are terminated, their
    /// transactions rolled back). Does nothing when it is not running.
    pub async fn stop(&self) -> io::Result<()> {
        let inner = self.inner.clone();
        blocking(move || inner.stop_server("fast")).await
    }

    /// Kills the server without a clean shutdown (`pg_ctl stop -m immediate`), like a crash: the
    /// next start runs crash recovery. Does nothing when it is not running.
    pub async fn crash(&self) -> io::Result<()> {
        let inner = self.inner.clone();
        blocking(move || inner.stop_server("immediate")).await
    }

    /// Starts the server again after [`stop`](Self::stop) or [`crash`](Self::crash), on the
    /// same data directory and port. Does nothing when it is running.
    pub async fn start_again(&self) -> io::Result<()> {
        let inner = self.inner.clone();
        blocking(move || {
            if *inner.running.lock().unwrap() {
                return Ok(());
            }
            // The port was free a moment ago; a client's ephemeral port may sit on it briefly.
            let mut tries = 0;
            loop {
                match inner.start_server() {
                    Ok(()) => return Ok(()),
                    Err(_) if tries < 20 && inner.log_tail().contains("already in use") => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await
    }

    /// Stops the server cleanly and starts it again on the same data directory and port.
    pub async fn restart(&self) -> io::Result<()> {
        self.stop().await?;
        self.start_again().await
    }
}

struct Inner {
    bindir: PathBuf,
    dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    as_postgres: bool,
    port: Mutex<u16>,
    /// Also serialises start/stop.
    running: Mutex<bool>,
    watchdog: Mutex<Option<Child>>,
    // Dropped last: removes the directory.
    _tempdir: tempfile::TempDir,
}

impl Inner {
    /// A command running one of the server programs, as the `postgres` user when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new(runuser());
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null()).env("LC_ALL", "C");
        cmd
    }

    fn write_settings(&self, builder: &TestPostgresBuilder, port: u16) -> io::Result<()> {
        let onoff = |b: bool| if b { "on" } else { "off" }.to_string();
        let mut settings = BTreeMap::new();
        settings.insert("listen_addresses".to_string(), "127.0.0.1".to_string());
        settings.insert("port".to_string(), port.to_string());
        settings.insert(
            "unix_socket_directories".to_string(),
            self.dir.display().to_string(),
        );
        settings.insert(
            "max_connections".to_string(),
            builder.max_connections.to_string(),
        );
        settings.insert("fsync".to_string(), onoff(builder.fsync));
        settings.insert("full_page_writes".to_string(), onoff(builder.fsync));
        for (k, v) in &builder.settings {
            settings.insert(k.clone(), v.clone());
        }
        let mut text = String::from("# written by outbox::testing::TestPostgres\n");
        for (k, v) in &settings {
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return Err(io::Error::other(format!(
                    "TestPostgres: invalid setting name {k:?}"
                )));
            }
            text.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        std::fs::write(self.data_dir.join("outbox_test.conf"), text)
    }

    fn start_server(&self) -> io::Result<()> {
        let mut running = self.running.lock().unwrap();
        if *running {
            return Ok(());
        }
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", "60", "-s", "start"]);
        match run_checked(&mut cmd, "pg_ctl start") {
            Ok(_) => {
                *running = true;
                Ok(())
            }
            Err(e) => {
                // pg_ctl may have given up while the postmaster lives on: make sure it is gone.
                let _ = self.pg_ctl_stop("immediate");
                Err(io::Error::other(format!(
                    "{e}\n--- server log ({}) ---\n{}",
                    self.log_file.display(),
                    self.log_tail()
                )))
            }
        }
    }

    fn stop_server(&self, mode: &str) -> io::Result<()> {
        let mut running = self.running.lock().unwrap();
        if !*running {
            return Ok(());
        }
        self.pg_ctl_stop(mode)?;
        *running = false;
        Ok(())
    }

    fn pg_ctl_stop(&self, mode: &str) -> io::Result<Output> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", "60", "-s", "stop"]);
        run_checked(&mut cmd, "pg_ctl stop")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `sh` waits for EOF on its stdin, whose write end only this process holds (Rust opens
    /// pipes close-on-exec), then stops the server and removes the directory. It ignores
    /// SIGINT/SIGHUP/SIGTERM so that Ctrl-C on the test run still lets it clean up.
    fn spawn_watchdog(&self) -> io::Result<()> {
        let script = r#"dir=$1; shift
trap '' INT HUP TERM QUIT
cat >/dev/null 2>&1
"$@" >/dev/null 2>&1
rm -rf "$dir""#;
        let stop = self.pg_command("pg_ctl");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .arg("outbox-pg-watchdog")
            .arg(&self.dir)
            .arg(stop.get_program())
            .args(stop.get_args())
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| annotate(e, "spawning /bin/sh (TestPostgres watchdog)"))?;
        *self.watchdog.lock().unwrap() = Some(child);
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let running = *self.running.lock().unwrap();
        if running {
            let _ = self.pg_ctl_stop("immediate");
        }
        if let Some(mut child) = self.watchdog.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // `_tempdir` is dropped next and removes the directory.
    }
}

/// Finds the directory of the Postgres server programs (see [`TestPostgresBuilder::bindir`]).
fn find_bindir() -> io::Result<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_initdb(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| has_initdb(d)) {
            return Ok(dir);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "TestPostgres: Postgres server programs (initdb, pg_ctl, postgres) not found: tried $PG_BINDIR, \
         `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH. Install them (Debian/Ubuntu: \
         `apt-get install -y postgresql`) or set PG_BINDIR",
    ))
}

/// Whether the effective user is root (from `/proc/self/status`, else `id -u`).
fn running_as_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved filesystem
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn runuser() -> PathBuf {
    [
        "/usr/sbin/runuser",
        "/sbin/runuser",
        "/usr/bin/runuser",
        "/bin/runuser",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .unwrap_or_else(|| PathBuf::from("runuser"))
}

/// A TCP port that is free on 127.0.0.1, chosen at random in 20000–25999: below the kernel's
/// ephemeral range (32768 and up on Linux) so that outgoing connections do not grab it while a
/// server is down, and apart from the ports `scripts/kafka-cluster` gives its nodes (26000–31999),
/// so that a test cannot take the port of a node that is down while it restarts. A port is
/// handed out once per process: a server restarted on its port keeps it.
pub fn free_port() -> io::Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    for _ in 0..200 {
        // xorshift
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = 20000 + (seed % 6000) as u16;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed_out.contains(&port)
            && TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
        {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn run_checked(cmd: &mut Command, what: &str) -> io::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| annotate(e, &format!("{what}: running {:?}", cmd.get_program())))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {:?} {:?}\n{}{}",
            out.status,
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn annotate(e: io::Error, context: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("TestPostgres task failed: {e}")))?
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Connects with `config` (no TLS) and spawns the connection on the current tokio runtime.
pub async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // The error (if any) surfaces on the client's next call.
        let _ = connection.await;
    });
    Ok(client)
}

/// Connects with `config` (no TLS) as the relay connects its sessions of `role` (`"batch"`,
/// `"fence"`, `"listener"`, `"waker"`, `"cleanup"`, `"admin"`, …): with the session parameters
/// the relay sends as startup options (or `SET`s where a server refuses them), so that a test
/// can read what such a session really runs with.
///
/// # Errors
/// The Postgres error of the connect.
pub async fn connect_as_relay(
    config: &tokio_postgres::Config,
    role: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    crate::pg::Pg::plain(config.clone()).connect(role).await
}

// ---------------------------------------------------------------------------------------------
// Mock Kafka
// ---------------------------------------------------------------------------------------------

/// The mock cluster type that [`MockKafka::with_cluster`] hands out.
pub type MockClusterHandle = MockCluster<'static, DefaultProducerContext>;

type Job = Box<dyn FnOnce(&MockClusterHandle) + Send>;

/// librdkafka's in-process mock Kafka cluster, owned and usable from any thread.
///
/// Its brokers listen on loopback ports ([`bootstrap_servers`](Self::bootstrap_servers)); any
/// Kafka client of this process or another one can use them. Producers (including idempotent and
/// transactional ones), assigned consumers and consumer groups work. Create topics with
/// [`create_topic`](Self::create_topic): the mock brokers do not implement the CreateTopics admin
/// request (a CreateTopics call times out), but they create an unknown topic, with 4 partitions,
/// when a producer writes to it or a client's metadata request allows auto-creation.
///
/// Errors and latency can be injected with the helpers below or any method of
/// [`MockCluster`] via [`with_cluster`](Self::with_cluster).
///
/// `rdkafka`'s `MockCluster` is neither `Send` nor `Sync`; `MockKafka` keeps it on a dedicated
/// thread and runs closures there, so `MockKafka` is both. Dropping it shuts the cluster down.
pub struct MockKafka {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    bootstrap_servers: String,
    brokers: i32,
}

impl fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("brokers", &self.brokers)
            .finish()
    }
}

impl MockKafka {
    /// Starts a mock cluster with `brokers` brokers (ids `1..=brokers`).
    pub fn start(brokers: i32) -> KafkaResult<MockKafka> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<KafkaResult<String>>();
        let thread = std::thread::Builder::new()
            .name("outbox-mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(cluster) => cluster,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                while let Ok(job) = rx.recv() {
                    job(&cluster);
                }
            })
            .map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::Fail))?;
        let bootstrap_servers = ready_rx
            .recv()
            .map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::Fail))??;
        Ok(MockKafka {
            jobs: Some(jobs),
            thread: Some(thread),
            bootstrap_servers,
            brokers,
        })
    }

    /// The `bootstrap.servers` value for clients (`127.0.0.1:PORT,...`).
    pub fn bootstrap_servers(&self) -> String {
        self.bootstrap_servers.clone()
    }

    /// The number of brokers.
    pub fn brokers(&self) -> i32 {
        self.brokers
    }

    /// Runs `f` with the underlying [`MockCluster`] (on the cluster's thread) and returns its
    /// result. A panic in `f` is propagated.
    pub fn with_cluster<R, F>(&self, f: F) -> R
    where
        F: FnOnce(&MockClusterHandle) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |cluster| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(cluster)));
            let _ = tx.send(result);
        });
        self.jobs
            .as_ref()
            .expect("MockKafka is running")
            .send(job)
            .expect("MockKafka thread is alive");
        match rx.recv().expect("MockKafka thread answered") {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Creates a topic with `partitions` partitions (replication factor 1).
    pub fn create_topic(&self, name: &str, partitions: i32) -> KafkaResult<()> {
        self.create_topic_replicated(name, partitions, 1)
    }

    /// Creates a topic with `partitions` partitions and `replication_factor` replicas (at most
    /// the number of brokers).
    pub fn create_topic_replicated(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
    ) -> KafkaResult<()> {
        let name = name.to_string();
        self.with_cluster(move |c| c.create_topic(&name, partitions, replication_factor))
    }

    /// Makes the next `errors.len()` requests of type `api_key` fail, in order, with these
    /// errors (`RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT` disconnects the client instead).
    pub fn request_errors(&self, api_key: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        let errors = errors.to_vec();
        self.with_cluster(move |c| c.request_errors(api_key, &errors))
    }

    /// Forgets the errors queued by [`request_errors`](Self::request_errors) for `api_key`.
    pub fn clear_request_errors(&self, api_key: RDKafkaApiKey) {
        self.with_cluster(move |c| c.clear_request_errors(api_key))
    }

    /// Takes broker `broker_id` down (its connections are closed and it accepts no new ones).
    pub fn broker_down(&self, broker_id: i32) -> KafkaResult<()> {
        self.with_cluster(move |c| c.broker_down(broker_id))
    }

    /// Brings broker `broker_id` back up.
    pub fn broker_up(&self, broker_id: i32) -> KafkaResult<()> {
        self.with_cluster(move |c| c.broker_up(broker_id))
    }

    /// Delays every response of broker `broker_id` by `delay`.
    pub fn broker_round_trip_time(&self, broker_id: i32, delay: Duration) -> KafkaResult<()> {
        self.with_cluster(move |c| c.broker_round_trip_time(broker_id, delay))
    }

    /// Makes broker `broker_id` (or nobody, with `None`) the leader of a partition.
    pub fn partition_leader(
        &self,
        topic: &str,
        partition: i32,
        broker_id: Option<i32>,
    ) -> KafkaResult<()> {
        let topic = topic.to_string();
        self.with_cluster(move |c| c.partition_leader(&topic, partition, broker_id))
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading topics back
// ---------------------------------------------------------------------------------------------

/// One record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// Topic name.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Key as text (invalid UTF-8 replaced); `None` for a record without a key.
    pub key: Option<String>,
    /// Value bytes; `None` for a record without a value (tombstone).
    pub payload: Option<Vec<u8>>,
    /// Headers in order, values as text (invalid UTF-8 replaced; a null value becomes "").
    pub headers: Vec<(String, String)>,
    /// The record's timestamp in milliseconds since the epoch, if any.
    pub timestamp_ms: Option<i64>,
}

impl ConsumedRecord {
    /// The key, or "" when there is none.
    pub fn key_str(&self) -> &str {
        self.key.as_deref().unwrap_or("")
    }

    /// The value as text (invalid UTF-8 replaced), "" when there is none.
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(self.payload.as_deref().unwrap_or(&[])).into_owned()
    }

    /// The value parsed as JSON.
    ///
    /// # Panics
    ///
    /// When there is no value or it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        let bytes = self.payload.as_deref().unwrap_or_else(|| {
            panic!(
                "record {}/{}@{} has no value",
                self.topic, self.partition, self.offset
            )
        });
        serde_json::from_slice(bytes).unwrap_or_else(|e| {
            panic!(
                "record {}/{}@{} value is not JSON ({e}): {:?}",
                self.topic,
                self.partition,
                self.offset,
                self.payload_str()
            )
        })
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn from_message<M: Message>(m: &M) -> ConsumedRecord {
        ConsumedRecord {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or(&[])).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            timestamp_ms: m.timestamp().to_millis(),
        }
    }
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .set("log_level", "3");
    config
}

/// Waits until `topic` exists with all partitions led by a broker; returns its partition count.
///
/// Errors with the last metadata error (`UnknownTopicOrPartition` when it never appeared) when
/// `timeout` passes.
pub async fn wait_for_topic(brokers: &str, topic: &str, timeout: Duration) -> KafkaResult<i32> {
    wait_for_partitions(brokers, topic, 1, timeout).await
}

/// Waits until `topic` exists with at least `partitions` partitions, all led by a broker; returns
/// its partition count. After CreatePartitions a broker that has not yet applied the change
/// still answers metadata requests with the old count, so a reader of a grown topic waits for
/// the count it expects.
///
/// Errors with the last metadata error (`UnknownTopicOrPartition` when it never appeared, `Fail`
/// when it never had enough partitions) when `timeout` passes.
pub async fn wait_for_partitions(
    brokers: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> KafkaResult<i32> {
    let min = usize::try_from(partitions.max(1)).unwrap_or(1);
    let config = client_config(brokers);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create()?;
        let deadline = Instant::now() + timeout;
        let mut last_err = KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match consumer.fetch_metadata(
                Some(&topic),
                left.clamp(Duration::from_millis(100), Duration::from_secs(2)),
            ) {
                Ok(md) => {
                    if let Some(t) = md.topics().iter().find(|t| t.name() == topic) {
                        let ok = t.error().is_none()
                            && t.partitions().len() >= min
                            && t.partitions()
                                .iter()
                                .all(|p| p.leader() >= 0 && p.error().is_none());
                        if ok {
                            return Ok(t.partitions().len() as i32);
                        }
                        if let Some(e) = t.error() {
                            last_err = KafkaError::MetadataFetch(e.into());
                        } else if t.partitions().len() < min {
                            last_err = KafkaError::MetadataFetch(RDKafkaErrorCode::Fail);
                        }
                    }
                }
                Err(e) => last_err = e,
            }
            if Instant::now() >= deadline {
                return Err(last_err);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .map_err(|_| KafkaError::MetadataFetch(RDKafkaErrorCode::Fail))?
}

/// Creates a topic through the Kafka admin API (CreateTopics) with replication factor
/// min(3, brokers in the cluster) — 3 on the test cluster of `scripts/kafka-cluster` — and waits
/// until its partitions have leaders. Works with Apache Kafka
/// and other brokers that implement CreateTopics, not with [`MockKafka`] (use
/// [`MockKafka::create_topic`]).
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) -> KafkaResult<()> {
    create_topic_with_config(brokers, name, partitions, &[]).await
}

/// Like [`create_topic`], with topic configuration entries such as
/// `("max.message.bytes", "10000")`.
pub async fn create_topic_with_config(
    brokers: &str,
    name: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> KafkaResult<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers).create()?;
    // An explicit factor: librdkafka 2.12's -1 ("the broker's default", KIP-464) made topics
    // with one replica on Apache Kafka 4.1.
    let cluster_size = {
        let config = client_config(brokers);
        tokio::task::spawn_blocking(move || -> KafkaResult<usize> {
            let consumer: BaseConsumer = config.create()?;
            Ok(consumer
                .fetch_metadata(None, Duration::from_secs(10))?
                .brokers()
                .len())
        })
        .await
        .map_err(|_| KafkaError::MetadataFetch(RDKafkaErrorCode::Fail))??
    };
    let replication = cluster_size.clamp(1, 3) as i32;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    // The request timeout bounds the wait on brokers that ignore CreateTopics (the mock cluster).
    let options = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(15)))
        .operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &options).await? {
        if let Err((_, code)) = result {
            return Err(KafkaError::AdminOp(code));
        }
    }
    wait_for_topic(brokers, name, Duration::from_secs(30)).await?;
    Ok(())
}

static READER_ID: AtomicU64 = AtomicU64::new(0);

/// Reads a topic from the beginning of every partition, continuing where the previous read
/// stopped.
///
/// It uses `assign()` on all partitions (no consumer group: no rebalance wait, no committed
/// offsets), with `isolation.level=read_committed`. Records come in arrival order, which is
/// offset order within each partition.
pub struct TopicReader {
    consumer: StreamConsumer,
    topic: String,
    partitions: i32,
    received: usize,
}

impl fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicReader")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("received", &self.received)
            .finish()
    }
}

impl TopicReader {
    /// Waits up to `wait` for `topic` to exist (see [`wait_for_topic`]) and assigns all its
    /// partitions from the beginning. Partitions added later are not read.
    pub async fn connect(brokers: &str, topic: &str, wait: Duration) -> KafkaResult<TopicReader> {
        Self::connect_at_least(brokers, topic, 1, wait).await
    }

    /// As [`connect`](Self::connect), once the topic has at least `partitions` partitions (see
    /// [`wait_for_partitions`]): for a topic that was just grown.
    pub async fn connect_at_least(
        brokers: &str,
        topic: &str,
        partitions: i32,
        wait: Duration,
    ) -> KafkaResult<TopicReader> {
        let partitions = wait_for_partitions(brokers, topic, partitions, wait).await?;
        let mut config = client_config(brokers);
        let id = READER_ID.fetch_add(1, Ordering::Relaxed);
        config
            .set(
                "group.id",
                format!("outbox-testing-{}-{id}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "50")
            .set("fetch.error.backoff.ms", "50");
        let consumer: StreamConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(TopicReader {
            consumer,
            topic: topic.to_string(),
            partitions,
            received: 0,
        })
    }

    /// The number of partitions being read.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// How many records this reader has returned so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Reads until `n` more records arrived or `timeout` passed; returns what arrived (check
    /// its length). Consumer errors (a broker restarting, say) are skipped.
    pub async fn read(&mut self, n: usize, timeout: Duration) -> Vec<ConsumedRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(n.min(100_000));
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => out.push(ConsumedRecord::from_message(&m)),
                Ok(Err(_)) => {}
            }
        }
        self.received += out.len();
        out
    }

    /// Reads everything that arrives within `window`.
    pub async fn read_for(&mut self, window: Duration) -> Vec<ConsumedRecord> {
        self.read(usize::MAX, window).await
    }

    /// Asserts that no further record arrives within `window`.
    ///
    /// # Panics
    ///
    /// When one does (the message shows up to 5 of them).
    pub async fn assert_idle(&mut self, window: Duration) {
        let extra = self.read_for(window).await;
        assert!(
            extra.is_empty(),
            "topic {}: expected no more records after {}, got {} more, first ones: {:#?}",
            self.topic,
            self.received - extra.len(),
            extra.len(),
            &extra[..extra.len().min(5)]
        );
    }
}

/// Reads `topic` from the beginning of every partition until `expected_count` records arrived or
/// `timeout` passed (which includes waiting for the topic to exist), and returns them sorted by
/// partition and offset. Check the length: fewer records than expected means the timeout passed.
///
/// Works with any broker (Apache Kafka, [`MockKafka`]). See [`TopicReader`] for reading in steps.
///
/// # Panics
///
/// When the consumer cannot be created or the topic does not appear within `timeout`.
pub async fn consume_all(
    brokers: &str,
    topic: &str,
    expected_count: usize,
    timeout: Duration,
) -> Vec<ConsumedRecord> {
    let start = Instant::now();
    let mut reader = TopicReader::connect(brokers, topic, timeout)
        .await
        .unwrap_or_else(|e| panic!("consume_all: cannot read topic {topic} on {brokers}: {e}"));
    let left = timeout.saturating_sub(start.elapsed());
    let mut records = reader.read(expected_count, left).await;
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// Asserts that `topic` holds exactly `expected_total` records: reads them from the beginning
/// (waiting up to 30 s for them), then keeps reading for `window` and fails if anything more
/// arrives. Returns the records sorted by partition and offset.
///
/// # Panics
///
/// When fewer than `expected_total` records arrive within 30 s, or any more within `window`.
pub async fn assert_nothing_more(
    brokers: &str,
    topic: &str,
    expected_total: usize,
    window: Duration,
) -> Vec<ConsumedRecord> {
    let mut reader = TopicReader::connect(brokers, topic, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| {
            panic!("assert_nothing_more: cannot read topic {topic} on {brokers}: {e}")
        });
    let mut records = reader.read(expected_total, Duration::from_secs(30)).await;
    assert_eq!(
        records.len(),
        expected_total,
        "topic {topic}: expected {expected_total} records, only {} arrived within 30 s",
        records.len()
    );
    reader.assert_idle(window).await;
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

// ---------------------------------------------------------------------------------------------
// Assertions about what the outbox published
// ---------------------------------------------------------------------------------------------

/// Asserts that the events with ids `expected` (as returned by `add_new_event`) were published
/// to `topic` within `timeout`, and that for each aggregate (record key) they arrived in the
/// order given. Duplicates are allowed (delivery is at-least-once); their first appearance
/// counts. Returns the first record of each expected event, in `expected` order.
///
/// # Panics
/// When an event is missing after `timeout` (naming the missing ids), when two events of one
/// aggregate arrived out of the given order, or when the topic cannot be read.
pub async fn assert_published(
    brokers: &str,
    topic: &str,
    expected: &[uuid::Uuid],
    timeout: Duration,
) -> Vec<ConsumedRecord> {
    use std::collections::HashMap;
    let deadline = Instant::now() + timeout;
    let mut reader = TopicReader::connect(brokers, topic, timeout)
        .await
        .unwrap_or_else(|e| {
            panic!("assert_published: cannot read topic {topic} on {brokers}: {e}")
        });
    let wanted: HashMap<String, usize> = expected
        .iter()
        .enumerate()
        .map(|(i, id)| (id.to_string(), i))
        .collect();
    let mut first: Vec<Option<ConsumedRecord>> = vec![None; expected.len()];
    let mut found = 0;
    // Per key, the position (in `expected`) of the last expected event seen.
    let mut last_per_key: HashMap<String, usize> = HashMap::new();
    while found < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        for record in reader.read(1, left).await {
            let Some(&pos) = record.header("event_id").and_then(|id| wanted.get(id)) else {
                continue;
            };
            if first[pos].is_some() {
                continue; // a duplicate: at-least-once
            }
            let key = record.key_str().to_string();
            if let Some(&prev) = last_per_key.get(&key) {
                assert!(
                    prev < pos,
                    "topic {topic}, key {key}: event {} (position {pos}) arrived after event {} (position {prev})",
                    expected[pos],
                    expected[prev]
                );
            }
            last_per_key.insert(key, pos);
            first[pos] = Some(record);
            found += 1;
        }
    }
    let missing: Vec<String> = expected
        .iter()
        .zip(&first)
        .filter(|(_, r)| r.is_none())
        .map(|(id, _)| id.to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "topic {topic}: {} of {} events not published within {timeout:?}: {missing:?}",
        missing.len(),
        expected.len()
    );
    first
        .into_iter()
        .map(|r| r.expect("checked above"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The relay's own SQL, for benchmarks
// ---------------------------------------------------------------------------------------------

/// The statements the relay runs against an outbox table, exactly as it runs them: for
/// benchmarks that measure the Postgres ceiling of the relay's SQL without Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelaySql {
    /// Reservation of a scan from where the last one left off; `$1` = batch size (`int8`), `$2`
    /// = byte budget (`int8`, see [`max_batch_bytes`](crate::OutboxBuilder::max_batch_bytes)),
    /// `$3` = the scan's start (`int8`, see [`next_scan_start`]), `$4` = the group of each of 64
    /// aggregate buckets (`int2[]`) and `$5` = the group taken (`int2`; `-1`, with any `$4`:
    /// every row; the relay splits a gated backlog of few aggregates between its batch slots),
    /// `$6` = aggregates left out (`text[]`, never null; the relay leaves out those held back
    /// behind rows another transaction has locked). Run inside a transaction.
    pub reserve: String,
    /// The reservation of a scan from the first pending row (`$3` the lowest `int8`), as the
    /// relay runs it: the same, skipping the rows of aggregates whose first open row is not
    /// due.
    pub reserve_full: String,
    /// [`reserve_full`](Self::reserve_full) reading at most a window of pending rows from `$3`
    /// (10,000 of them, or `$1` when larger), as the relay runs it
    /// after such a scan failed (see [`next_scan_start`] for where the next one continues).
    pub reserve_windowed: String,
    /// [`reserve`](Self::reserve), [`reserve_full`](Self::reserve_full) and
    /// [`reserve_windowed`](Self::reserve_windowed) as a relay that keeps up runs them (after a
    /// reservation that caught up with few rows): the candidates' limit written in (the batch
    /// size, at most 256) instead of `$1`, which the relay still passes.
    pub light_reserve: [String; 3],
    /// Begins a batch transaction as the relay does before [`reserve`](Self::reserve) (in the
    /// same round trip): `begin` and the table's `ROW EXCLUSIVE` lock, so that DDL waits for the
    /// batch instead of deadlocking with its confirm.
    pub begin: String,
    /// Confirmation of a batch; `$1` ids (`uuid[]`), `$2` outcomes (`int2[]`: 0 delivered,
    /// 1 retry, 2 dead letter, 3 hold), `$3` partitions (`int4[]`), `$4` offsets (`int8[]`), `$5`
    /// errors (`text[]`), `$6` delays in ms (`int8[]`), `$7` the batch id (`uuid`, its fence is
    /// deleted). Returns the held rows: `id` (`uuid`) and the hold's end (`timestamptz`), the
    /// token their late reports must present.
    pub confirm: String,
    /// Late delivery of a held row: `$1` id (`uuid`), `$2` partition (`int4`), `$3` offset
    /// (`int8`), `$4` the hold's end returned by the confirm (`timestamptz`); with
    /// `delete_on_delivery` a delete with `$1` id and `$2` the hold's end. Writes nothing once
    /// the hold ended or another relay wrote the row.
    pub late_confirm: String,
    /// Late failure of a held row: `$1` id, `$2` error (`text`), `$3` retry delay in ms
    /// (`int8`), `$4` dead letter (`bool`), `$5` the hold's end; fenced as `late_confirm`.
    pub late_fail: String,
    /// Batch fence; `$1` batch id (`uuid`), `$2` lifetime in ms (`int8`), `$3` aggregates
    /// (`text[]`). Runs on its own autocommit connection before the batch publishes.
    pub fence: String,
    /// Session settings of the batch connections (besides `idle_in_transaction_session_timeout`).
    pub session_setup: String,
    /// Sent in the batch transaction just before `confirm`, in the same round trip (the confirm's
    /// plan settings).
    pub confirm_setup: String,
}

/// The relay's producer configuration with its default settings and `brokers` as
/// `bootstrap.servers` (what `connect()` gives the main producer): for benchmarks and tools that
/// must produce exactly as the relay does, without a copy of its properties.
pub fn relay_producer_config(brokers: &str) -> ClientConfig {
    let mut problems = Vec::new();
    crate::Outbox::builder()
        .kafka_brokers(brokers)
        .kafka_config(&mut problems)
}

/// The longest the relay's reservations scan from where the last one left off before one scans
/// from the first pending row again (`reserve.sql`'s `$3`: the scan's start, the lowest `int8`
/// for a full scan): for benchmarks that reserve as the relay does.
pub const FULL_SCAN_EVERY: std::time::Duration = crate::relay::FULL_SCAN_EVERY;

/// Where the relay's next reservation may start its scan (`reserve.sql`'s `$3`) after a
/// reservation that returned `rows`: `None` when the next one scans from the first pending row
/// (this one reached the end of the pending rows, or found fewer candidates than it could take
/// and its window, if any, did not end before the pending rows). Not counting the full scan
/// the relay makes at least every [`FULL_SCAN_EVERY`].
pub fn next_scan_start(rows: &[tokio_postgres::Row]) -> Option<i64> {
    crate::relay::Scan::of(rows).next_from
}

/// The rows a reservation ([`RelaySql::reserve`], [`RelaySql::reserve_full`]) reserved: none
/// when it returned its row of nulls (it always returns at least one row, so that an empty
/// scan still says where it ended; see [`next_scan_start`]).
pub fn reserved_rows(rows: &[tokio_postgres::Row]) -> &[tokio_postgres::Row] {
    crate::relay::reserved_rows(rows)
}

/// The reservations' parameter types, in order (see [`RelaySql::reserve`]), as the relay
/// prepares them.
pub const RESERVE_PARAM_TYPES: [postgres_types::Type; 6] = crate::relay::RESERVE_PARAM_TYPES;

/// Runs the reservation `statement` (one of [`RelaySql`]'s) as the relay does without a split:
/// at most `limit` rows within a byte budget of 16 MiB, its scan starting at `seq` `from` (the
/// lowest `int8` for the first pending row), every aggregate, none left out. Run it inside a transaction: the
/// rows stay locked until it ends.
///
/// # Errors
/// The server's error.
pub async fn reserve_every_aggregate(
    client: &impl tokio_postgres::GenericClient,
    statement: &str,
    limit: i64,
    from: i64,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    client
        .query(
            statement,
            &[
                &limit,
                &(16i64 << 20),
                &from,
                &Vec::<i16>::new(),
                &-1i16,
                &Vec::<String>::new(),
            ],
        )
        .await
}

/// The relay's SQL for `table` (default dead-letter policy: block the aggregate), with
/// `delete_on_delivery` choosing `OnDelivery::Delete`'s confirmation.
pub fn relay_sql(table: &str, delete_on_delivery: bool) -> RelaySql {
    let sql = crate::store::RelaySql::new(
        table,
        true,
        delete_on_delivery,
        crate::Settings::default().batch_size,
    );
    RelaySql {
        reserve: sql.reserve,
        reserve_full: sql.reserve_full,
        reserve_windowed: sql.reserve_windowed,
        light_reserve: sql.light_reserve,
        begin: sql.begin,
        confirm: sql.confirm,
        late_confirm: sql.late_confirm,
        late_fail: sql.late_fail,
        fence: sql.fence,
        session_setup: crate::relay::BATCH_SESSION_SETUP.to_string(),
        confirm_setup: crate::relay::CONFIRM_SETUP.to_string(),
    }
}
