//! Postgres connections: configuration plus the TLS connector, the task that drives each
//! connection, and the deadlines of every round trip outside the relay's pipeline.
//!
//! Every connection the crate opens gets, unless the connection string sets them:
//! `connect_timeout` = the Postgres timeout, TCP keepalives after [`KEEPALIVE_IDLE`] of silence
//! every [`KEEPALIVE_INTERVAL`] ([`KEEPALIVE_RETRIES`] probes), and `tcp_user_timeout` =
//! [`TCP_USER_TIMEOUT`]; with more than one host, `target_session_attrs = read-write` (unless the
//! connection string sets it). tokio-postgres' `connect_timeout` bounds only the TCP connect, so
//! the whole connect (TLS, startup, authentication) is bounded here as well.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, Connection, Socket};

use crate::error::Error;

mod cancel;

/// How Postgres connections are encrypted.
#[derive(Clone)]
pub(crate) enum Tls {
    /// Plain TCP or Unix socket.
    None,
    /// TLS through rustls (feature `postgres-rustls`).
    #[cfg(feature = "postgres-rustls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::None => "none",
            #[cfg(feature = "postgres-rustls")]
            Tls::Rustls(_) => "rustls",
        })
    }
}

/// Default Postgres timeout: bound of one admin/health/gauge/cleanup call (connecting included)
/// and of connecting when the connection string sets no `connect_timeout`.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive: idle time before the first probe (libpq's `keepalives_idle`), unless set.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// TCP keepalive: time between probes (`keepalives_interval`), unless set.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// TCP keepalive: unanswered probes before the connection is dropped (`keepalives_count`).
pub(crate) const KEEPALIVE_RETRIES: u32 = 3;
/// `tcp_user_timeout` (Linux): how long sent data may stay unacknowledged, unless set.
pub(crate) const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// tokio-postgres' default `keepalives_idle` (2 h): taken to mean "not set".
const LIBRARY_KEEPALIVE_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Connection settings shared by every connection the crate opens.
#[derive(Clone)]
pub(crate) struct Pg {
    pub(crate) config: Config,
    pub(crate) tls: Tls,
    /// Bound of one call outside the pipeline (connect, admin, health, gauges, cleanup step).
    pub(crate) timeout: Duration,
    /// The relay's lease (`idle_in_transaction_session_timeout` of batch sessions), if any.
    pub(crate) lease: Option<Duration>,
    /// With several servers: the one the last connect used, tried first by the next (see
    /// [`connect_config`]). Shared by the clones.
    pub(crate) preferred: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `tokio_postgres::Config`'s Debug redacts the password.
        f.debug_struct("Pg")
            .field("config", &self.config)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Called with the payload of every NOTIFY a session receives.
pub(crate) type OnNotification = Box<dyn Fn(&str) + Send>;

/// Drives a connection, calling `on_notification` for every NOTIFY (the bare connection future
/// would drop them); returns the error that ended it, if any.
async fn drive<S, T>(
    mut connection: Connection<S, T>,
    on_notification: Option<OnNotification>,
) -> Option<tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(m) = messages.next().await {
        match m {
            Ok(AsyncMessage::Notification(n)) => {
                if let Some(f) = &on_notification {
                    f(n.payload());
                }
            }
            Ok(AsyncMessage::Notice(n)) => {
                tracing::debug!(notice = %n.message(), "postgres notice")
            }
            Ok(_) => {}
            Err(e) => return Some(e),
        }
    }
    None
}

/// Applies the crate's connection defaults to `config` where it leaves them unset; returns the
/// connect timeout in effect.
pub(crate) fn apply_defaults(config: &mut Config, timeout: Duration) -> Duration {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    if config.get_keepalives() {
        if config.get_keepalives_idle() == LIBRARY_KEEPALIVE_IDLE {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    // Several hosts (a primary and its standbys, for failover): a session on a standby can do
    // nothing the relay needs (its reservations fail with 25006), so the hosts are tried in
    // turn until one accepts writes (`SHOW transaction_read_only` after the startup, libpq's
    // `target_session_attrs=read-write`), rather than taking the first that answers.
    if host_count(config) > 1 && config.get_target_session_attrs() == TargetSessionAttrs::Any {
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    *config.get_connect_timeout().unwrap_or(&timeout)
}

/// Runs `op` with a deadline of `after`; a miss becomes [`Error::Timeout`] naming `what`.
pub(crate) async fn bounded<T>(
    what: &'static str,
    after: Duration,
    op: impl Future<Output = crate::Result<T>>,
) -> crate::Result<T> {
    match tokio::time::timeout(after, op).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout { what, after }),
    }
}

/// Whether a connect failed because the server refused startup `options` (PgBouncer:
/// "unsupported startup parameter", 08P01; Postgres: "unrecognized configuration parameter",
/// 42704).
fn options_refused(e: &tokio_postgres::Error) -> bool {
    options_parameter_refused(e)
        || e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT)
}

/// A placeholder setting sent with the session parameters as a startup option, with a value
/// fresh for each connect, and read back once connected: a pooler that accepts `options` but
/// drops them (PgBouncer with `options` in `ignore_startup_parameters`; Odyssey) leaves it unset
/// (or at a role's or database's default, which cannot match), and the parameters are then
/// `SET`.
const OPTIONS_MARKER: &str = "outbox.session_options";

/// Logged once per process at info (then at debug): a pooler dropped the startup options.
static DROPPED_OPTIONS_LOGGED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// How many servers `config` names: its hosts, or its `hostaddr`s when only those are given.
fn host_count(config: &Config) -> usize {
    config
        .get_hosts()
        .len()
        .max(config.get_hostaddrs().len())
        .max(1)
}

/// `config` with only its `i`-th server (host, `hostaddr` and port, as tokio-postgres pairs
/// them), every other setting copied.
fn single_host(config: &Config, i: usize) -> Config {
    let mut one = without_servers(config);
    match config.get_hosts().get(i) {
        Some(tokio_postgres::config::Host::Tcp(h)) => {
            one.host(h);
        }
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => {
            one.host_path(path);
        }
        None => {}
    }
    if let Some(addr) = config.get_hostaddrs().get(i) {
        one.hostaddr(*addr);
    }
    match config.get_ports() {
        [port] => {
            one.port(*port);
        }
        ports => {
            if let Some(port) = ports.get(i) {
                one.port(*port);
            }
        }
    }
    one
}

/// `config` without servers (no host, `hostaddr` or port), every other setting copied.
pub(crate) fn without_servers(config: &Config) -> Config {
    let mut one = Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation());
    if let Some(t) = config.get_connect_timeout() {
        one.connect_timeout(*t);
    }
    if let Some(t) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*t);
    }
    one.keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle());
    if let Some(t) = config.get_keepalives_interval() {
        one.keepalives_interval(t);
    }
    if let Some(n) = config.get_keepalives_retries() {
        one.keepalives_retries(n);
    }
    one.target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding())
        .load_balance_hosts(config.get_load_balance_hosts());
    one
}

/// Connects with `config`. With several servers each gets the whole connect — TCP, TLS,
/// startup, authentication, the read-write check — within the connect timeout before the next
/// is tried, in the order given starting from the server the last connect used (`preferred`;
/// from a random one with `load_balance_hosts=random`): a frozen server costs one connect
/// timeout once, not every connect — the health check and the gauges connect each time, within
/// the Postgres timeout, which is also the per-server connect timeout.
/// tokio-postgres' own loop bounds only each TCP connect, so a server that accepts connections
/// and never answers (a frozen primary, a half-dead proxy) held the connect until the caller's
/// deadline and the servers after it were never tried (libpq and pgx give each host its own
/// deadline: jackc/pgconn#125). The last server has no deadline of its own here: the caller's
/// (the connect timeout × the number of servers) bounds it.
async fn connect_config<M>(
    config: &Config,
    tls: M,
    preferred: &AtomicUsize,
) -> Result<(Client, Connection<Socket, M::Stream>), tokio_postgres::Error>
where
    M: MakeTlsConnect<Socket> + Clone,
{
    let n = host_count(config);
    let (hosts, addrs, ports) = (
        config.get_hosts().len(),
        config.get_hostaddrs().len(),
        config.get_ports().len(),
    );
    // One server, or lists that do not pair up (tokio-postgres names the mismatch).
    if n == 1 || (hosts > 0 && addrs > 0 && hosts != addrs) || (ports > 1 && ports != n) {
        return config.connect(tls).await;
    }
    let per_host = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_TIMEOUT);
    let start = match config.get_load_balance_hosts() {
        tokio_postgres::config::LoadBalanceHosts::Random => {
            (uuid::Uuid::new_v4().as_u128() % n as u128) as usize
        }
        _ => preferred.load(Ordering::Relaxed) % n,
    };
    let mut failed = Vec::new();
    for k in 0..n {
        let i = (start + k) % n;
        let one = single_host(config, i);
        let attempt = one.connect(tls.clone());
        let outcome = if k + 1 == n {
            Some(attempt.await)
        } else {
            tokio::time::timeout(per_host, attempt).await.ok()
        };
        let why = match outcome {
            Some(Ok(connected)) => {
                preferred.store(i, Ordering::Relaxed);
                if !failed.is_empty() {
                    tracing::debug!(failed = %failed.join("; "), "postgres: connected after other servers failed");
                }
                return Ok(connected);
            }
            Some(Err(e)) if k + 1 == n => {
                if !failed.is_empty() {
                    let last = crate::error::PgErrorDisplay(&e);
                    let failed = failed.join("; ");
                    const TEXT: &str = "postgres: no server of the connection string could be used (each caller also logs the last error; this line at most once a minute)";
                    if once_a_minute(&ALL_SERVERS_FAILED_LOGGED) {
                        tracing::warn!(%failed, %last, "{TEXT}");
                    } else {
                        tracing::debug!(%failed, %last, "{TEXT}");
                    }
                }
                return Err(e);
            }
            Some(Err(e)) => crate::error::PgErrorDisplay(&e).to_string(),
            None => format!("no answer within {per_host:?}"),
        };
        failed.push(format!("server {} ({}): {why}", i + 1, server_name(&one)));
    }
    unreachable!("the last server returns")
}

/// When (seconds since the Unix epoch) every server of a connection string last failed at warn.
static ALL_SERVERS_FAILED_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Whether a minute passed since `last` (then set to now).
fn once_a_minute(last: &AtomicU64) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let before = last.load(Ordering::Relaxed);
    now >= before + 60
        && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// `host:port` (or the socket directory) of a single-server configuration, for logs.
fn server_name(config: &Config) -> String {
    let host = match (config.get_hosts().first(), config.get_hostaddrs().first()) {
        (_, Some(addr)) => addr.to_string(),
        (Some(tokio_postgres::config::Host::Tcp(h)), None) => h.clone(),
        #[cfg(unix)]
        (Some(tokio_postgres::config::Host::Unix(p)), None) => p.display().to_string(),
        (None, None) => "localhost".to_string(),
    };
    format!(
        "{host}:{}",
        config.get_ports().first().copied().unwrap_or(5432)
    )
}

/// Connects with `with_options` (the parameters and [`OPTIONS_MARKER`] = `marker` as startup
/// options); when the server refuses them, with `plain` and `SET`s; when it accepted but did not
/// apply them, `SET`s on that session.
async fn connect_with<M>(
    with_options: Config,
    plain: Config,
    tls: M,
    params: &[(&'static str, String)],
    marker: &str,
    on_notification: Option<OnNotification>,
    preferred: &AtomicUsize,
) -> Result<(Client, JoinHandle<Option<tokio_postgres::Error>>), tokio_postgres::Error>
where
    M: MakeTlsConnect<Socket> + Clone + Send,
    M::Stream: Send + 'static,
    M::TlsConnect: Send,
    <M::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    match connect_config(&with_options, tls.clone(), preferred).await {
        Ok((client, conn)) => {
            let task = tokio::spawn(drive(conn, on_notification));
            let probe = format!(
                "select current_setting('{OPTIONS_MARKER}', true) is not distinct from '{marker}'"
            );
            let applied = client
                .simple_query(&probe)
                .await?
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "t"),
                    _ => None,
                })
                .unwrap_or(false);
            if !applied {
                const TEXT: &str = "postgres accepted the session parameters as startup options but did not apply them (a pooler that drops `options`?); setting them with SET";
                if DROPPED_OPTIONS_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::debug!("{TEXT}");
                } else {
                    tracing::info!("{TEXT} (logged once)");
                }
                set_each(&client, params).await?;
            }
            Ok((client, task))
        }
        Err(e) if options_parameter_refused(&e) && has_own_options(&plain) => {
            own_options_refused(&e);
            Err(e)
        }
        Err(e) if options_refused(&e) => {
            // Every connect through such a pooler: said once per process, then at debug.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            let text = "the server (a pooler such as PgBouncer) does not take session parameters as startup options; the relay sets them with SET after connecting (expected, nothing to fix)";
            if SAID.swap(true, Ordering::Relaxed) {
                tracing::debug!(refusal = %crate::error::PgErrorDisplay(&e), "{text}");
            } else {
                tracing::info!(refusal = %crate::error::PgErrorDisplay(&e), "{text} (logged once)");
            }
            let (client, conn) = connect_config(&plain, tls, preferred).await?;
            let task = tokio::spawn(drive(conn, on_notification));
            set_each(&client, params).await?;
            Ok((client, task))
        }
        Err(e) => Err(e),
    }
}

/// Whether a pooler refused the `options` startup parameter itself (PgBouncer: "unsupported
/// startup parameter", 08P01) — not a server that does not know one of the parameters in it
/// (42704), which takes the connection string's own options once ours are left out.
fn options_parameter_refused(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::PROTOCOL_VIOLATION
            && db.message().contains("startup parameter")
    })
}

/// Whether the connection string sets its own startup `options`.
fn has_own_options(config: &Config) -> bool {
    config.get_options().is_some_and(|o| !o.trim().is_empty())
}

/// The server refused startup options and the connection string has its own, which a connect
/// without ours would send (and have refused) again.
fn own_options_refused(e: &tokio_postgres::Error) {
    tracing::warn!(
        error = %crate::error::PgErrorDisplay(e),
        "postgres (or a pooler in front of it, e.g. PgBouncer) refuses startup `options`, and the connection string sets its own: remove `options` from the connection string (ALTER ROLE … SET can carry those settings)"
    );
}

/// `SET`s each parameter on the session; one the server does not know is skipped.
async fn set_each(
    client: &Client,
    params: &[(&'static str, String)],
) -> Result<(), tokio_postgres::Error> {
    for (k, v) in params {
        match client.batch_execute(&format!("set {k} = '{v}'")).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                tracing::debug!(
                    parameter = k,
                    "postgres does not know this parameter; skipped"
                )
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The startup `options` of a relay session: the connection string's own `options` (if any),
/// then `-c name=value` per parameter, a space or backslash inside a value escaped with a
/// backslash (libpq's rule for `options`: `read committed` must reach the server as one value).
fn startup_options(theirs: Option<&str>, params: &[(&'static str, String)]) -> String {
    let ours = params
        .iter()
        .map(|(k, v)| format!("-c {k}={}", v.replace('\\', "\\\\").replace(' ', "\\ ")))
        .collect::<Vec<_>>()
        .join(" ");
    match theirs.map(str::trim_end) {
        // A lone backslash at the end escapes nothing on its own (the server drops it), but
        // would escape the space before ours: drop it.
        Some(o) if !o.trim().is_empty() => {
            let trailing = o.len() - o.trim_end_matches('\\').len();
            let o = if trailing % 2 == 1 {
                &o[..o.len() - 1]
            } else {
                o
            };
            format!("{o} {ours}")
        }
        _ => ours,
    }
}

impl Pg {
    /// Connection settings with the crate's defaults applied (see the module docs); `timeout`
    /// bounds every call outside the relay's pipeline and connecting, unless the connection
    /// string sets `connect_timeout`.
    pub(crate) fn new(mut config: Config, tls: Tls, timeout: Duration) -> Self {
        apply_defaults(&mut config, timeout);
        Pg {
            config,
            tls,
            timeout,
            lease: None,
            preferred: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// [`Pg::new`] without TLS; the timeout is the connection string's `connect_timeout`, else
    /// [`DEFAULT_TIMEOUT`].
    pub(crate) fn plain(config: Config) -> Self {
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_TIMEOUT);
        Pg::new(config, Tls::None, timeout)
    }

    /// The connect deadline: the configured `connect_timeout` (TCP connect per host in
    /// tokio-postgres) applied to the whole connect, times the number of hosts tried.
    pub(crate) fn connect_deadline(&self) -> Duration {
        let per_host = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(self.timeout);
        per_host * (host_count(&self.config) as u32)
    }

    /// Session parameters a relay session of `role` depends on, so that a role's or
    /// database's defaults (`ALTER ROLE … SET idle_session_timeout`, `statement_timeout`, …)
    /// cannot break it. Sent as startup `options`, which are session-level and cannot leak to
    /// other clients of a pooler the way `SET` on a pooled server connection does.
    pub(crate) fn session_params(&self, role: &str) -> Vec<(&'static str, String)> {
        let mut p = vec![
            // Relay sessions idle for long stretches between polls and batches: never end them.
            ("idle_session_timeout", "0".to_string()),
            // The relay's SQL is written for read committed (each statement sees what committed
            // before it: the gate, the fences, the holds). A `serializable` default would also
            // take predicate locks on the outbox table that can fail writers' transactions
            // (SQLSTATE 40001, its own reservations and confirms too), and under `repeatable
            // read` a confirm does not see the fence committed after its reservation's
            // snapshot, leaves it, and the batch's aggregates wait for it to expire.
            ("default_transaction_isolation", "read committed".into()),
            // No JIT: a plan whose estimated cost crosses `jit_above_cost` (100,000 by default;
            // a scan disabled by `enable_*` but still chosen adds 10^10) is compiled on every
            // execution of a custom plan. Measured on Postgres 15: 0.97 s of JIT compile for a
            // caught-up reservation whose plan crossed it, which runs in 0.2 ms without.
            ("jit", "off".into()),
            // Every row or an error: a row-level security policy that applies to the relay's role
            // makes its statements fail instead of silently hiding rows (`connect()` names it:
            // `schema_check::row_security_problems`).
            ("row_security", "off".into()),
            // A relay killed (OOM killer, SIGKILL, a node drained) leaves its statements running:
            // Postgres notices a closed client only when it next writes to it, so a waker
            // queued for the wake lock, or a batch waiting for a row lock, stayed (holding a
            // connection slot and its place in the lock queue) until the blocker ended; a relay
            // restarted in a loop piled them up. Checked every second (Postgres 14; on 13 the
            // parameter is skipped, as `idle_session_timeout` is).
            ("client_connection_check_interval", "1000".into()),
        ];
        match role {
            // Bounded by the caller's deadline; the server gives up at the same time.
            "admin" | "metrics" | "cleanup" | "statistics" | "stop" => {
                p.push(("statement_timeout", self.timeout.as_millis().to_string()));
            }
            // The waker waits for its advisory lock as long as writers hold it.
            "waker" => {
                p.push(("statement_timeout", "0".into()));
                p.push(("lock_timeout", "0".into()));
            }
            "batch" => {
                p.push(("statement_timeout", "0".into()));
                if let Some(lease) = self.lease {
                    p.push((
                        "idle_in_transaction_session_timeout",
                        lease.as_millis().to_string(),
                    ));
                }
                p.push(("plan_cache_mode", "force_custom_plan".into()));
                p.push(("enable_bitmapscan", "off".into()));
            }
            _ => p.push(("statement_timeout", "0".into())),
        }
        // Durability of fences, whatever the database's default: a fence must be durable
        // before its batch sends, as it is what stops another relay after a crash that took
        // the batch session along. (A confirm need not wait for its flush; it says so in its
        // own transaction, see `confirm::CONFIRM_SETUP`.)
        if role == "fence" {
            p.push(("synchronous_commit", "on".into()));
        }
        p
    }

    /// Connects with `application_name = outbox-relay-<role>` and the role's
    /// [`session_params`](Self::session_params); the connection runs on a task whose handle is
    /// returned (it ends when the client is dropped or the connection fails). Only the TCP
    /// connect is bounded (by `connect_timeout`); see [`connect_bounded`](Self::connect_bounded).
    ///
    /// A server that refuses the startup `options` (PgBouncer ≥ 1.20 refuses parameters it does
    /// not track, older servers parameters they do not know) is connected to again without them,
    /// and the parameters are `SET` on the session (ones it does not know are skipped): with
    /// PgBouncer in session pooling a `SET` stays in the client's session and is reset
    /// (`server_reset_query`) when the server connection is released; transaction pooling is
    /// refused at `connect()`.
    pub(crate) async fn connect_driven(
        &self,
        role: &str,
        on_notification: Option<OnNotification>,
    ) -> Result<(Client, JoinHandle<Option<tokio_postgres::Error>>), tokio_postgres::Error> {
        let mut plain = self.config.clone();
        plain.application_name(format!("outbox-relay-{role}"));
        let params = self.session_params(role);
        let marker = uuid::Uuid::new_v4().simple().to_string();
        let mut flagged = params.clone();
        flagged.push((OPTIONS_MARKER, marker.clone()));
        let mut with_options = plain.clone();
        with_options.options(startup_options(plain.get_options(), &flagged));
        match &self.tls {
            Tls::None => {
                connect_with(
                    with_options,
                    plain,
                    tokio_postgres::NoTls,
                    &params,
                    &marker,
                    on_notification,
                    &self.preferred,
                )
                .await
            }
            #[cfg(feature = "postgres-rustls")]
            Tls::Rustls(tls) => {
                connect_with(
                    with_options,
                    plain,
                    tls.clone(),
                    &params,
                    &marker,
                    on_notification,
                    &self.preferred,
                )
                .await
            }
        }
    }

    /// Connects for queries only (notifications are not expected and dropped). Only the TCP
    /// connect is bounded (by `connect_timeout`): a server that accepts the connection and never
    /// answers the startup holds it; prefer [`connect_bounded`](Self::connect_bounded).
    pub(crate) async fn connect(&self, role: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, task) = self.connect_driven(role, None).await?;
        let role = role.to_string();
        tokio::spawn(async move {
            if let Ok(Some(e)) = task.await {
                tracing::debug!(role, error = %crate::error::PgErrorDisplay(&e), "postgres connection ended");
            }
        });
        Ok(client)
    }

    /// [`connect`](Self::connect) with the whole connect (TCP, TLS, startup, authentication)
    /// bounded by the connect timeout, times the number of hosts.
    ///
    /// # Errors
    /// [`Error::Postgres`] when connecting fails; [`Error::Timeout`] (`what = "connect"`) when
    /// the server did not complete the startup in time.
    pub(crate) async fn connect_bounded(&self, role: &str) -> crate::Result<Client> {
        let deadline = self.connect_deadline();
        match tokio::time::timeout(deadline, self.connect(role)).await {
            Ok(r) => r.map_err(Error::Postgres),
            Err(_) => Err(Error::Timeout {
                what: "connect",
                after: deadline,
            }),
        }
    }

    /// Which of the connection string's servers the last connect used (an index into them, see
    /// [`connect_config`]): read right after a connect, the server of the session it opened
    /// (unless another connect to another server finished in between).
    pub(crate) fn server_of_last_connect(&self) -> usize {
        self.preferred.load(Ordering::Relaxed)
    }

    /// Asks the server to cancel the statement `client`'s session is running (Postgres' cancel
    /// request, on a connection of its own, sent as libpq sends it: see [`cancel`]), on a task,
    /// for a round trip that missed its deadline, whose session the relay drops. Dropping alone
    /// does not end the statement: the server notices a closed client only when it next writes
    /// to it, so a statement waiting for a lock held elsewhere (or running long) would go on,
    /// holding its locks and its connection slot, until the blocker ends.
    ///
    /// The task keeps the session open until the statement ended, which an empty query sent
    /// after the cancel request proves: it is answered once the statement before it ended. A
    /// statement still running after that wait (a pooler or server that ignored the request) is
    /// logged at warn; then the session closes — with a Terminate after a statement that ended,
    /// not mid-statement. The request and the wait are each bounded by the connect deadline; a
    /// request that could not be sent is logged at debug (the session closes anyway).
    pub(crate) fn cancel(&self, client: &Arc<Client>, server: usize, what: &'static str) {
        let session = Arc::clone(client);
        let pg = self.clone();
        let deadline = self.connect_deadline();
        tokio::spawn(async move { pg.cancel_statement(&session, server, what, deadline).await });
    }

    /// [`cancel`](Self::cancel), awaited rather than on a task: returns once the statement of
    /// `session` (on the connection string's server `server`) ended, or the request or the wait
    /// for its end took longer than `deadline` (each).
    pub(crate) async fn cancel_statement(
        &self,
        session: &Client,
        server: usize,
        what: &'static str,
        deadline: Duration,
    ) {
        let cancel = cancel::send(
            &self.config,
            server,
            self.tls.clone(),
            session.cancel_token(),
        );
        match tokio::time::timeout(deadline, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(what, error = %e, "outbox relay: cancel request failed");
                return;
            }
            Err(_) => {
                tracing::debug!(what, "outbox relay: cancel request timed out");
                return;
            }
        }
        match tokio::time::timeout(deadline, session.batch_execute("")).await {
            Ok(_) => tracing::debug!(what, "outbox relay: cancelled statement ended"),
            Err(_) => tracing::warn!(
                what,
                waited_ms = deadline.as_millis() as u64,
                "outbox relay: a cancelled statement was still running when its session was \
                 closed (Postgres ends it when it next writes to the session)"
            ),
        }
    }
}

/// The pooler self-test's verdict when session semantics are broken, naming the fix.
pub(crate) const POOLER_PROBLEM: &str = "the Postgres connection goes through a pooler in transaction (or statement) pooling mode (e.g. PgBouncer `pool_mode = transaction`): two of the relay's sessions shared one server backend, or a session lost its own setting between two statements. The relay needs real sessions (LISTEN, advisory locks, prepared statements, its batch transactions' settings). Point the relay at Postgres directly or at a session-pooling port; writers (`add_new_event` in your transactions) may keep using transaction pooling";

impl Pg {
    /// Connects without `SET`ting anything (a probe must not change any server session before
    /// the pooler test passed). Its only session parameter, `statement_timeout` (the Postgres
    /// timeout), goes as a startup option, so that a database default such as
    /// `statement_timeout = 1ms` cannot cancel the probe; a server that refuses startup options
    /// (PgBouncer ≥ 1.20) is connected to again without it.
    async fn connect_probe(&self) -> Result<Client, tokio_postgres::Error> {
        let mut plain = self.config.clone();
        plain.application_name("outbox-relay-probe");
        let ours = [("statement_timeout", self.timeout.as_millis().to_string())];
        let mut with_options = plain.clone();
        with_options.options(startup_options(plain.get_options(), &ours));
        match self.connect_once(with_options).await {
            Err(e) if options_parameter_refused(&e) && has_own_options(&plain) => {
                own_options_refused(&e);
                Err(e)
            }
            Err(e) if options_refused(&e) => self.connect_once(plain).await,
            r => r,
        }
    }

    /// One connection with `cfg` and the configured TLS, driven on a task.
    async fn connect_once(&self, cfg: Config) -> Result<Client, tokio_postgres::Error> {
        let client = match &self.tls {
            Tls::None => {
                let (client, conn) =
                    connect_config(&cfg, tokio_postgres::NoTls, &self.preferred).await?;
                tokio::spawn(drive(conn, None));
                client
            }
            #[cfg(feature = "postgres-rustls")]
            Tls::Rustls(tls) => {
                let (client, conn) = connect_config(&cfg, tls.clone(), &self.preferred).await?;
                tokio::spawn(drive(conn, None));
                client
            }
        };
        Ok(client)
    }

    /// Detects a pooler that breaks session semantics (transaction or statement pooling), with
    /// two probe sessions A and B: A sets a session-level custom setting and reads its backend
    /// pid; B reads its pid; A reads its setting and pid again. With real sessions A keeps its
    /// backend and setting and B has another backend; a transaction pooler hands A's server
    /// connection to B (it is the most recently released) or gives A another one. Three round
    /// trips and two short-lived connections, within the Postgres timeout. A's second round
    /// trip also reads `server_version_num`: a server older than Postgres 13
    /// ([`MIN_SERVER_VERSION_NUM`]) is refused here, naming its version, rather than failing
    /// later with a syntax error in every reservation.
    ///
    /// # Errors
    /// [`Error::Config`] naming transaction pooling and the fix, or the server's version, or
    /// both; [`Error::Postgres`] / [`Error::Timeout`] when the probe cannot run.
    pub(crate) async fn check_session_semantics(&self) -> crate::Result<()> {
        let deadline = self.connect_deadline();
        let connect = || async {
            match tokio::time::timeout(deadline, self.connect_probe()).await {
                Ok(r) => r.map_err(Error::Postgres),
                Err(_) => Err(Error::Timeout {
                    what: "connect",
                    after: deadline,
                }),
            }
        };
        let a = connect().await?;
        let b = connect().await?;
        let probe = async {
            let token = uuid::Uuid::new_v4().to_string();
            let r = a
                .query_one(
                    "select set_config('outbox.session_probe', $1, false), pg_backend_pid()",
                    &[&token],
                )
                .await?;
            let pid_a1: i32 = r.get(1);
            let pid_b: i32 = b.query_one("select pg_backend_pid()", &[]).await?.get(0);
            let r = a
                .query_one(
                    "select current_setting('outbox.session_probe', true)::text, pg_backend_pid(), \
                            current_setting('server_version_num', true)::text",
                    &[],
                )
                .await?;
            let kept: Option<String> = r.get(0);
            let pid_a2: i32 = r.get(1);
            // As text, parsed here: a value that is not a number (a proxy's, a function of the
            // same name earlier on the search_path) skips the check rather than failing connect.
            // `::text` in the query: a shadowing function may return another type (a breaker
            // helper's `returns int` panicked the read).
            let version = version_num(r.get(2));
            // Clear the probe setting (it may sit on a pooled server connection).
            let _ = a
                .execute("select set_config('outbox.session_probe', '', false)", &[])
                .await;
            let broken = pid_a1 != pid_a2 || pid_b == pid_a1 || kept.as_deref() != Some(&token);
            Ok::<(bool, i32), tokio_postgres::Error>((broken, version))
        };
        let (broken, version) = bounded("pooler check", self.timeout, async {
            match probe.await {
                // A statement prepared on one server connection and executed on another (26000),
                // or a statement name another client session already used on this server
                // connection (42P05): the pooler moved the session between two round trips
                // (PgBouncer 1.18 in transaction pooling, seen intermittently).
                Err(e) if e.code().is_some_and(crate::error::is_moved_session) => Ok((true, 0)),
                r => r.map_err(Error::Postgres),
            }
        })
        .await?;
        let problems: Vec<String> = [
            broken.then(|| POOLER_PROBLEM.to_string()),
            version_problem(version),
        ]
        .into_iter()
        .flatten()
        .map(|p| format!("database_url: {p}"))
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(crate::error::ConfigErrors::new(problems)))
        }
    }
}

/// The oldest Postgres the outbox runs on (`server_version_num`): 13 has `gen_random_uuid()`
/// built in (the table's `id` default); 12 added `MATERIALIZED` common table expressions (the
/// reservation), `plan_cache_mode` and `ANALYZE (SKIP_LOCKED)`. The test suite runs on 15.
pub(crate) const MIN_SERVER_VERSION_NUM: i32 = 130_000;

/// `server_version_num` read as text, parsed here: a value that is not a number (a proxy's, a
/// function of the same name earlier on the `search_path`) is 0, which skips the check rather
/// than failing.
fn version_num(text: Option<String>) -> i32 {
    text.and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Why the server behind `client` is too old for the outbox (`None`: Postgres 13 or later, or a
/// version that cannot be read), from its `server_version_num`; one round trip. For the
/// sessions that do not go through the pooler probe: [`Admin`](crate::Admin)'s and
/// [`migrate_table`](crate::migrate_table)'s.
///
/// # Errors
/// The query's error.
pub(crate) async fn server_version_problem(
    client: &Client,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select current_setting('server_version_num', true)::text",
            &[],
        )
        .await?;
    Ok(version_problem(version_num(row.get(0))))
}

/// What is wrong with a server of `server_version_num` `num` (`None`: it is recent enough; 0 or
/// less: not read or not a version, e.g. the probe failed first).
fn version_problem(num: i32) -> Option<String> {
    (num > 0 && num < MIN_SERVER_VERSION_NUM).then(|| {
        let (major, minor) = if num >= 100_000 {
            (num / 10_000, format!("{}", num % 10_000))
        } else {
            (num / 10_000, format!("{}.{}", num / 100 % 100, num % 100))
        };
        format!(
            "the server is Postgres {major}.{minor} (server_version_num {num}); the outbox needs \
             Postgres 13 or later (gen_random_uuid() built in; MATERIALIZED common table \
             expressions, plan_cache_mode and ANALYZE (SKIP_LOCKED) from 12)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_older_than_postgres_13_is_named_with_its_version() {
        assert_eq!(version_problem(150_018), None);
        assert_eq!(version_problem(130_000), None);
        assert_eq!(version_problem(0), None, "not read: no verdict");
        let twelve = version_problem(120_022).expect("12 is too old");
        assert!(twelve.contains("Postgres 12.22"), "{twelve}");
        assert!(twelve.contains("13 or later"), "{twelve}");
        let nine = version_problem(90_624).expect("9.6 is too old");
        assert!(nine.contains("Postgres 9.6.24"), "{nine}");
    }

    #[test]
    fn startup_options_escape_spaces_and_keep_the_connection_string_s_own() {
        let params = [
            (
                "default_transaction_isolation",
                "read committed".to_string(),
            ),
            ("jit", "off".to_string()),
            ("odd", r"a\b".to_string()),
        ];
        let expected = r"-c default_transaction_isolation=read\ committed -c jit=off -c odd=a\\b";
        assert_eq!(startup_options(None, &params), expected);
        assert_eq!(startup_options(Some("  "), &params), expected);
        assert_eq!(
            startup_options(Some("-c search_path=app"), &params),
            format!("-c search_path=app {expected}")
        );
        // A lone trailing backslash would escape the joining space; an escaped one is kept.
        assert_eq!(
            startup_options(Some(r"-c search_path=app\"), &params),
            format!("-c search_path=app {expected}")
        );
        assert_eq!(
            startup_options(Some(r"-c search_path=app\\"), &params),
            format!(r"-c search_path=app\\ {expected}")
        );
    }

    /// One server of several keeps every other setting: the same as that server's own
    /// connection string.
    #[test]
    fn single_host_keeps_every_setting() {
        let query = "options=-c%20x%3D1&application_name=a&sslmode=require&sslnegotiation=direct\
            &connect_timeout=3&tcp_user_timeout=4000&keepalives=1&keepalives_idle=7\
            &keepalives_interval=2&keepalives_retries=5&target_session_attrs=read-write\
            &channel_binding=require&load_balance_hosts=random";
        let both: Config = format!("postgres://u:secret@db1:5433,db2:5434/app?{query}")
            .parse()
            .unwrap();
        let second: Config = format!("postgres://u:secret@db2:5434/app?{query}")
            .parse()
            .unwrap();
        let one = single_host(&both, 1);
        assert_eq!(format!("{one:?}"), format!("{second:?}"));
        assert_eq!(one.get_password(), Some(&b"secret"[..]));
        assert_eq!(one.get_ssl_negotiation(), second.get_ssl_negotiation());
        // One port for every host; `hostaddr` pairs with the host of the same place.
        let shared: Config = "host=db1,db2 hostaddr=10.0.0.1,10.0.0.2 port=6432 user=u"
            .parse()
            .unwrap();
        let one = single_host(&shared, 1);
        assert_eq!(one.get_ports(), &[6432]);
        assert_eq!(
            one.get_hostaddrs(),
            &["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(server_name(&one), "10.0.0.2:6432");
        assert_eq!(host_count(&shared), 2);
        let addrs_only: Config = "hostaddr=10.0.0.1,10.0.0.2 port=1,2 user=u"
            .parse()
            .unwrap();
        assert_eq!(host_count(&addrs_only), 2);
        assert_eq!(single_host(&addrs_only, 0).get_ports(), &[1]);
    }

    /// Several hosts: sessions go to the one that accepts writes, unless the connection string
    /// says otherwise; one host: unchanged.
    #[test]
    fn several_hosts_target_a_writable_session() {
        let attrs = |url: &str| {
            let mut config: Config = url.parse().unwrap();
            apply_defaults(&mut config, Duration::from_secs(5));
            config.get_target_session_attrs()
        };
        assert_eq!(
            attrs("postgres://u@db1:5432,db2:5432/app"),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            attrs("host=db1,db2 user=u dbname=app"),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(attrs("postgres://u@db1/app"), TargetSessionAttrs::Any);
        assert_eq!(
            attrs("hostaddr=10.0.0.1,10.0.0.2 user=u"),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            attrs("host=db1,db2 user=u target_session_attrs=read-write"),
            TargetSessionAttrs::ReadWrite
        );
    }
}
