//! Fault injection for tests: a TCP fault proxy for Postgres and Kafka connections, and helpers
//! that end relay sessions, hold a snapshot open, or make the idempotent producer fatal.
//!
//! ```no_run
//! use outbox::testing::faults::{Fault, FaultProxy};
//! # async fn demo(pg: outbox::testing::TestPostgres) -> std::io::Result<()> {
//! // Point the relay at the proxy instead of Postgres …
//! let proxy = FaultProxy::start(([127, 0, 0, 1], pg.port()).into()).await?;
//! let config = proxy.postgres_config(&pg.config());
//! // … then break the path while the relay runs, and heal it.
//! proxy.set_fault(Fault::Blackhole); // sockets stay open, nothing gets through
//! proxy.set_fault(Fault::None);
//! # Ok(()) }
//! ```
//!
//! Why not an existing proxy: Toxiproxy is a Go server (the Rust crates for it are clients), and
//! `noxious`, its Rust port, depends on tokio-util 0.6 and rand 0.8 and has not been released
//! since 2021. This proxy is plain tokio, runs inside the test process and needs no root
//! (Linux network namespaces with `tc netem` are the other real option where tests run as root).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::MockKafka;

/// What a [`FaultProxy`] does to the bytes between its clients and the upstream server. Applies
/// at once to every open connection and to new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Forward everything unchanged.
    None,
    /// Delay every chunk read from either side by this much before forwarding it (a chunk is
    /// what one read returned, up to 16 KiB).
    Latency(Duration),
    /// Accept new connections and keep every socket open, but forward nothing in either
    /// direction (bytes read are discarded): a half-open connection, a moved failover address, a
    /// dropped NAT entry, a hung server. Connections accepted during a blackhole have no upstream
    /// and stay silent until closed.
    Blackhole,
    /// Abort every open connection with a TCP reset (RST) and reset each new connection as soon
    /// as it is accepted.
    Reset,
    /// Forward at most this many bytes per second in each direction of each connection
    /// (at least 1).
    Bandwidth(u64),
}

/// A TCP proxy in front of one upstream address (Postgres or a Kafka broker) that injects
/// [`Fault`]s. It listens on `127.0.0.1` on a free port; stops (closing every connection) when
/// dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    token: CancellationToken,
}

const CHUNK: usize = 16 * 1024;

impl FaultProxy {
    /// Starts a proxy to `upstream` with [`Fault::None`] on the current Tokio runtime.
    ///
    /// # Errors
    /// When no local port can be bound.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        Self::start_inner(Some(upstream)).await
    }

    /// A server that accepts TCP connections and never answers (a hung Postgres or broker, or
    /// the far end of a half-open connection): a proxy with no upstream, in
    /// [`Fault::Blackhole`] for good.
    ///
    /// # Errors
    /// When no local port can be bound.
    pub async fn silent() -> std::io::Result<FaultProxy> {
        let p = Self::start_inner(None).await?;
        p.set_fault(Fault::Blackhole);
        Ok(p)
    }

    async fn start_inner(upstream: Option<SocketAddr>) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (fault, rx) = watch::channel(Fault::None);
        let token = CancellationToken::new();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (t, o, a) = (token.clone(), open.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = t.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::debug!(error = %e, "fault proxy: accept failed");
                            continue;
                        }
                    },
                };
                a.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(
                    client,
                    upstream,
                    rx.clone(),
                    t.child_token(),
                    o.clone(),
                ));
            }
        });
        Ok(FaultProxy {
            addr,
            fault,
            open,
            accepted,
            token,
        })
    }

    /// The proxy's address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` of the proxy, e.g. for `bootstrap.servers`. Kafka clients reach the brokers
    /// at the addresses the brokers advertise, so a proxy in front of a bootstrap address
    /// affects only the bootstrap connection unless the broker advertises the proxy's address.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// `base` (a Postgres configuration) pointed at the proxy: host `127.0.0.1` and the proxy's
    /// port; every other setting (user, password, database, options, SSL mode, timeouts, …)
    /// kept.
    pub fn postgres_config(&self, base: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut c = crate::pg::without_servers(base);
        c.host("127.0.0.1").port(self.addr.port());
        c
    }

    /// Sets the fault for every open and future connection.
    pub fn set_fault(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Client connections accepted since the start.
    pub fn accepted_connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Counts an open connection while alive.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(
    client: TcpStream,
    upstream: Option<SocketAddr>,
    mut fault: watch::Receiver<Fault>,
    token: CancellationToken,
    open: Arc<AtomicUsize>,
) {
    open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(open);
    let _ = client.set_nodelay(true);
    let initial = *fault.borrow_and_update();
    let upstream = match (initial, upstream) {
        (Fault::Reset, _) => {
            let _ = client.set_zero_linger();
            return;
        }
        (Fault::Blackhole, _) | (_, None) => return swallow(client, fault, token).await,
        (_, Some(addr)) => match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, %addr, "fault proxy: upstream unreachable");
                let _ = client.set_zero_linger();
                return;
            }
        },
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = tokio::spawn(pump(cr, uw, fault.clone(), token.clone()));
    let down = tokio::spawn(pump(ur, cw, fault, token));
    let _ = tokio::join!(up, down);
}

/// Reads and discards until the peer closes, the proxy stops, or the fault becomes `Reset`.
async fn swallow(mut s: TcpStream, mut fault: watch::Receiver<Fault>, token: CancellationToken) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            r = fault.changed() => {
                if r.is_err() || *fault.borrow() == Fault::Reset {
                    let _ = s.set_zero_linger();
                    return;
                }
            }
            r = s.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
        }
    }
}

/// Forwards one direction, applying the fault in force to each chunk.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    token: CancellationToken,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = tokio::select! {
            _ = token.cancelled() => return,
            r = fault.changed() => {
                if r.is_err() || *fault.borrow() == Fault::Reset {
                    let _ = to.as_ref().set_zero_linger();
                    return;
                }
                continue;
            }
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
        };
        let current = *fault.borrow();
        let sent = match current {
            Fault::None => to.write_all(&buf[..n]).await,
            Fault::Blackhole => Ok(()),
            Fault::Reset => {
                let _ = to.as_ref().set_zero_linger();
                return;
            }
            Fault::Latency(d) => {
                tokio::time::sleep(d).await;
                to.write_all(&buf[..n]).await
            }
            Fault::Bandwidth(bps) => {
                let bps = bps.max(1);
                let mut r = Ok(());
                // Slices of about 10 ms worth of bytes, each followed by its share of time.
                let slice = ((bps / 100).max(1) as usize).min(n);
                for part in buf[..n].chunks(slice) {
                    r = to.write_all(part).await;
                    if r.is_err() {
                        break;
                    }
                    let secs = part.len() as f64 / bps as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
                r
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Ends every Postgres session whose `application_name` matches the SQL `LIKE` pattern
/// `application_name` (e.g. `outbox-relay-%` for all of a relay's sessions, `outbox-relay-waker`
/// for one role) with `pg_terminate_backend`, except the calling session; returns how many were
/// ended. The relay names its sessions `outbox-relay-<role>`: `batch`, `fence`, `listener`,
/// `waker`, `late`, `metrics`, `cleanup`, `admin`.
///
/// # Errors
/// When the query fails (e.g. the role may not signal those backends).
pub async fn terminate_backends(
    client: &tokio_postgres::Client,
    application_name: &str,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select count(*) filter (where pg_terminate_backend(pid))
               from pg_stat_activity
              where application_name like $1 and pid <> pg_backend_pid()
                and datname = current_database()",
            &[&application_name],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// A Postgres session holding a snapshot open (a `repeatable read` transaction that has read a
/// table), so that `VACUUM` cannot remove rows deleted or updated after it began: the
/// long-transaction fault. Released when dropped (the session ends) or by
/// [`release`](Self::release).
#[derive(Debug)]
pub struct SnapshotHolder {
    client: Option<tokio_postgres::Client>,
    pid: i32,
}

impl SnapshotHolder {
    /// Opens a session on `config` (application name `outbox-test-snapshot`) and holds a
    /// snapshot from now on.
    ///
    /// # Errors
    /// When connecting or starting the transaction fails.
    pub async fn start(config: &tokio_postgres::Config) -> Result<Self, tokio_postgres::Error> {
        let mut c = config.clone();
        c.application_name("outbox-test-snapshot");
        let client = super::connect(&c).await?;
        client
            .batch_execute("begin isolation level repeatable read; select count(*) from pg_class")
            .await?;
        let pid: i32 = client
            .query_one("select pg_backend_pid()", &[])
            .await?
            .get(0);
        Ok(SnapshotHolder {
            client: Some(client),
            pid,
        })
    }

    /// The backend pid of the holding session.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Ends the transaction (and the session).
    ///
    /// # Errors
    /// When the rollback fails (the session is closed anyway).
    pub async fn release(mut self) -> Result<(), tokio_postgres::Error> {
        match self.client.take() {
            Some(c) => c.batch_execute("rollback").await,
            None => Ok(()),
        }
    }
}

/// Makes the next Produce requests to `mock` fail with `OUT_OF_ORDER_SEQUENCE_NUMBER`, which
/// librdkafka's idempotent producer treats as a fatal error (the producer is unusable from then
/// on; `fatal_error()` reports it): `count` answers in a row. Undo with
/// [`MockKafka::clear_request_errors`]`(RDKafkaApiKey::Produce)`.
pub fn fatal_producer_errors(mock: &MockKafka, count: usize) {
    let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; count.max(1)];
    mock.request_errors(RDKafkaApiKey::Produce, &errors);
}

/// Where an injected panic strikes (see [`panic_the_relay_of`], [`panic_the_listener_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PanicAt {
    /// The next batch to finish publishing.
    Batch,
    /// The listener, when it next connects and LISTENs.
    Listener,
}

/// Tables whose relay is to panic, and where (see [`panic_the_relay_of`]).
static PANIC_TABLES: std::sync::Mutex<Vec<(String, PanicAt)>> = std::sync::Mutex::new(Vec::new());

/// Whether any panic was ever asked for: until then a batch does not take the lock (the
/// benchmark builds with `testing` too, and every batch checks).
static PANIC_ASKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn ask_panic(table: &str, at: PanicAt) {
    PANIC_TABLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((table.to_string(), at));
    PANIC_ASKED.store(true, Ordering::Release);
}

/// Makes the relay of `table` panic in its next batch to finish publishing, once, after its
/// messages were sent and before the batch is confirmed: what a bug in the relay does. The relay
/// must then stop with [`Error::Panicked`](crate::Error) and report itself not running; the
/// batch's events, published but not confirmed, are published again by the next relay once
/// their fence expires. Only relays of `table` (tests run side by side) are affected.
pub fn panic_the_relay_of(table: &str) {
    ask_panic(table, PanicAt::Batch);
}

/// Makes the listener of the relay of `table` panic, once, the next time it has connected and
/// LISTENs (after its session was ended, for instance): what a bug in a task beside the
/// pipeline does. The relay must stop with [`Error::Panicked`](crate::Error) naming the
/// listener, as for a panic of the pipeline.
pub fn panic_the_listener_of(table: &str) {
    ask_panic(table, PanicAt::Listener);
}

/// Whether the relay of `table` is to panic now at `at` (once per ask).
pub(crate) fn take_panic(table: &str, at: PanicAt) -> bool {
    if !PANIC_ASKED.load(Ordering::Acquire) {
        return false;
    }
    let mut tables = PANIC_TABLES.lock().unwrap_or_else(|e| e.into_inner());
    match tables.iter().position(|(t, a)| t == table && *a == at) {
        Some(i) => {
            tables.swap_remove(i);
            true
        }
        None => false,
    }
}
