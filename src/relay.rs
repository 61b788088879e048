//! The relay pipeline: wake → reserve → publish per-aggregate chains → confirm → acks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use postgres_types::Type;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{OnDelivery, Settings, WakeMode, LEASE_MARGIN};
use crate::delivery::{DeliveryAck, DeliveryEvent, DeliveryFailure, Hub};
use crate::pg::Pg;
use crate::store::{outcome, RawJson, Store};
use crate::text::printable;
use crate::wake::{self, Wake};

/// Counters kept by the relay; read them with [`Outbox::stats`](crate::Outbox::stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) delivered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) confirm_failures: AtomicU64,
    pub(crate) reserve_failures: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) listener_reconnects: Arc<AtomicU64>,
    pub(crate) listener_connected: Arc<AtomicBool>,
    pub(crate) in_flight: AtomicI64,
    /// Unix time in milliseconds of the last confirmed delivery, 0 if none.
    pub(crate) last_delivery_ms: AtomicI64,
    pub(crate) running: AtomicBool,
}

/// A row reserved for publishing.
#[derive(Debug)]
struct Reserved {
    id: Uuid,
    seq: i64,
    aggregate_id: String,
    topic: String,
    event_type: String,
    payload: RawJson,
    headers: Option<RawJson>,
    attempts: i32,
    /// Seconds since `created_at_tz` when reserved.
    age_at_reserve: Option<f64>,
    /// The rule of `add_new_event` this row breaks (a row written by another writer): it is
    /// dead-lettered without being sent.
    invalid: Option<String>,
}

#[derive(Debug)]
enum Outcome {
    NotSent,
    Delivered {
        partition: i32,
        offset: i64,
    },
    /// `dead`: a permanent error, or the last allowed attempt.
    Failed {
        error: String,
        dead: bool,
    },
    Held,
}

/// A message sent but not yet reported when its batch was confirmed.
struct Straggler {
    idx: usize,
    future: DeliveryFuture,
    _permit: OwnedSemaphorePermit,
}

struct BatchConn {
    client: Client,
    reserve: Statement,
    confirm: Statement,
}

pub(crate) struct Relay {
    pub(crate) settings: Arc<Settings>,
    pub(crate) store: Arc<Store>,
    pub(crate) pg: Pg,
    pub(crate) producer: FutureProducer,
    pub(crate) hub: Hub,
    pub(crate) token: CancellationToken,
    pub(crate) counters: Arc<Counters>,
    /// How long the stop may take, set by `Outbox::stop` before it cancels.
    pub(crate) shutdown_timeout: Arc<Mutex<Duration>>,
}

/// Shared by the batch tasks.
struct Ctx {
    settings: Arc<Settings>,
    store: Arc<Store>,
    pg: Pg,
    producer: FutureProducer,
    acks: Option<broadcast::Sender<DeliveryEvent>>,
    token: CancellationToken,
    counters: Arc<Counters>,
    in_flight: Arc<Semaphore>,
    late: TaskTracker,
    shutdown_timeout: Arc<Mutex<Duration>>,
    /// Autocommit connection for batch fences with its prepared statements (shared by the
    /// batches; reconnected when lost).
    fence: tokio::sync::Mutex<Option<Arc<FenceConn>>>,
}

impl Relay {
    pub(crate) async fn run(self) -> crate::Result<()> {
        let s = self.settings.clone();
        let ctx = Arc::new(Ctx {
            settings: s.clone(),
            store: self.store.clone(),
            pg: self.pg.clone(),
            producer: self.producer.clone(),
            acks: self.hub.sender(),
            token: self.token.clone(),
            counters: self.counters.clone(),
            in_flight: Arc::new(Semaphore::new(s.max_in_flight)),
            late: TaskTracker::new(),
            shutdown_timeout: self.shutdown_timeout.clone(),
            fence: tokio::sync::Mutex::new(None),
        });
        self.counters.running.store(true, Ordering::Relaxed);
        register_metrics();
        let background = TaskTracker::new();
        let (wake_tx, mut wake_rx) = mpsc::channel::<Wake>(16);
        let (arm_tx, arm_rx) = watch::channel(false);
        if s.wake == WakeMode::Notify {
            wake::spawn_listener(
                &background,
                self.pg.clone(),
                s.channel.clone(),
                wake_tx.clone(),
                self.token.clone(),
                self.counters.listener_reconnects.clone(),
                self.counters.listener_connected.clone(),
            );
            wake::spawn_waker(
                &background,
                self.pg.clone(),
                s.table.clone(),
                arm_rx,
                wake_tx.clone(),
                self.token.clone(),
            );
        }
        drop(wake_tx);
        let mut ticker = tokio::time::interval(s.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cleanup_ticker = tokio::time::interval(s.cleanup_interval);
        cleanup_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cleanup_running = Arc::new(AtomicBool::new(false));
        let mut gauge_ticker = tokio::time::interval(GAUGE_INTERVAL);
        gauge_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let gauges_running = Arc::new(AtomicBool::new(false));

        let mut idle: Vec<BatchConn> = Vec::new();
        let mut batches: JoinSet<BatchDone> = JoinSet::new();
        let mut retry_at: Option<Instant> = None;
        let mut poll_due = true;
        let mut pause_until: Option<Instant> = None;
        let mut errors = error_backoff();

        loop {
            let paused = pause_until.is_some_and(|t| Instant::now() < t);
            if poll_due && !paused && batches.len() < s.max_batches_in_flight {
                poll_due = false;
                let conn = match idle.pop() {
                    Some(c) if !c.client.is_closed() => Ok(c),
                    _ => open_batch_conn(&ctx).await,
                };
                let reserved = match conn {
                    Ok(conn) => {
                        let started = Instant::now();
                        match reserve(&conn, s.batch_size).await {
                            Ok(rows) => Ok((conn, rows, started)),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                match reserved {
                    Ok((conn, rows, _)) if rows.is_empty() => {
                        idle.push(conn);
                        errors = error_backoff();
                        // Nothing to reserve: ask writers to NOTIFY, even while other
                        // batches are still in flight, so that a new event is reserved in
                        // the free slot at once rather than after those batches.
                        arm_tx.send_replace(true);
                    }
                    Ok((conn, rows, started)) => {
                        arm_tx.send_replace(false);
                        if rows.len() >= s.batch_size {
                            poll_due = true;
                        }
                        let span = tracing::debug_span!(
                            "outbox_batch",
                            events = rows.len(),
                            first_seq = rows[0].seq,
                            last_seq = rows[rows.len() - 1].seq
                        );
                        batches.spawn(tracing::Instrument::instrument(
                            run_batch(ctx.clone(), conn, rows, started),
                            span,
                        ));
                    }
                    Err(e) => {
                        self.counters
                            .reserve_failures
                            .fetch_add(1, Ordering::Relaxed);
                        let delay = errors.next().unwrap_or(Duration::from_secs(5));
                        tracing::warn!(error = %e, ?delay, "outbox relay: reservation failed; retrying");
                        pause_until = Some(Instant::now() + delay);
                        poll_due = true;
                    }
                }
                continue;
            }
            let retry = sleep_until_opt(retry_at);
            let pause = sleep_until_opt(pause_until);
            tokio::select! {
                biased;
                _ = self.token.cancelled() => break,
                Some(done) = batches.join_next() => {
                    match done {
                        Ok(BatchDone { conn: Some(conn), next_due }) => {
                            if let Some(d) = next_due {
                                let at = Instant::now() + d;
                                retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                            }
                            idle.push(conn);
                            // Only a confirmed batch ends an error streak: a batch that publishes
                            // but cannot be confirmed must not re-send in a tight loop.
                            errors = error_backoff();
                        }
                        Ok(BatchDone { conn: None, .. }) => {
                            // Confirm failed: back off so a persistent fault is not a tight loop of re-sends.
                            let delay = errors.next().unwrap_or(Duration::from_secs(5));
                            pause_until = Some(Instant::now() + delay);
                        }
                        Err(e) => tracing::error!(error = %e, "outbox relay: batch task panicked"),
                    }
                    poll_due = true;
                }
                Some(_) = wake_rx.recv() => poll_due = true,
                _ = ticker.tick() => poll_due = true,
                _ = pause => { pause_until = None; }
                _ = retry => { retry_at = None; poll_due = true; }
                _ = gauge_ticker.tick() => {
                    let ctx = ctx.clone();
                    spawn_unless_running(&background, &gauges_running, async move {
                        if let Err(e) = update_gauges(&ctx).await {
                            tracing::warn!(error = %e, "outbox relay: backlog gauges not updated");
                        }
                    });
                }
                _ = cleanup_ticker.tick(), if s.on_delivery == OnDelivery::MarkDone => {
                    let ctx = ctx.clone();
                    spawn_unless_running(&background, &cleanup_running, async move {
                        if let Err(e) = cleanup(&ctx).await {
                            tracing::warn!(error = %e, "outbox relay: retention cleanup failed");
                        }
                    });
                }
            }
        }

        // Graceful stop: no more reservations. Batches stop sending, wait for their in-flight
        // reports (bounded by batch_timeout), confirm, and commit (releasing unsent rows).
        arm_tx.send_replace(false);
        let stop_timeout = *self
            .shutdown_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + stop_timeout;
        tracing::info!(in_flight_batches = batches.len(), "outbox relay stopping");
        while let Some(done) = batches.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "outbox relay: batch task panicked");
            }
        }
        drop(idle);
        // Flush what the producer still holds while the held messages' reports come in, then
        // purge so that nothing is sent after we return. A message purged before it was sent is
        // released at once; one purged in flight stays held (it may have reached Kafka).
        ctx.late.close();
        let producer = self.producer.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let flush = tokio::task::spawn_blocking(move || producer.flush(left));
        let _ = tokio::time::timeout_at(deadline, ctx.late.wait()).await;
        let _ = flush.await;
        if self.producer.in_flight_count() > 0 {
            self.producer
                .purge(PurgeConfig::default().queue().inflight());
            let producer = self.producer.clone();
            let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_millis(100)))
                .await;
        }
        let _ = tokio::time::timeout(LATE_GRACE, ctx.late.wait()).await;
        background.close();
        background.wait().await;
        self.counters.running.store(false, Ordering::Relaxed);
        self.hub.close();
        tracing::info!("outbox relay stopped");
        Ok(())
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Spawns `task` on `tracker` unless the previous run (flagged by `running`) is still going.
fn spawn_unless_running(
    tracker: &TaskTracker,
    running: &Arc<AtomicBool>,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if running.swap(true, Ordering::AcqRel) {
        return;
    }
    let running = running.clone();
    tracker.spawn(async move {
        task.await;
        running.store(false, Ordering::Release);
    });
}

fn error_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Session settings of the relay's batch connections (besides the lease timeout).
pub(crate) const BATCH_SESSION_SETUP: &str =
    "set plan_cache_mode = force_custom_plan; set enable_bitmapscan = off";

async fn open_batch_conn(ctx: &Ctx) -> Result<BatchConn, tokio_postgres::Error> {
    let client = ctx.pg.connect("batch").await?;
    // The reservation is a row lock held by the batch transaction; a session that idles in it
    // longer than the lease (a hung relay) is ended by Postgres, which releases the rows.
    // Custom plans: a generic plan made while the table was nearly empty is several times slower
    // once a backlog arrives (measured: 15k vs 40k events/s); planning costs well under 1 ms.
    // Bitmap scans read and sort every pending row for the `order by seq limit n` reservation.
    client
        .batch_execute(&format!(
            "set idle_in_transaction_session_timeout = {}; {BATCH_SESSION_SETUP}",
            ctx.settings.lease.as_millis()
        ))
        .await?;
    let reserve = client
        .prepare_typed(&ctx.store.reserve, &[Type::INT8])
        .await?;
    let confirm = client.prepare(&ctx.store.confirm).await?;
    Ok(BatchConn {
        client,
        reserve,
        confirm,
    })
}

/// Begins the batch transaction and locks up to `limit` rows (see `Store::reserve`). On an empty
/// result the transaction is ended.
async fn reserve(conn: &BatchConn, limit: usize) -> Result<Vec<Reserved>, tokio_postgres::Error> {
    let limit = limit as i64;
    let params: [&(dyn postgres_types::ToSql + Sync); 1] = [&limit];
    let (_, rows) = futures::try_join!(
        conn.client.batch_execute("begin"),
        conn.client.query(&conn.reserve, &params)
    )?;
    if rows.is_empty() {
        conn.client.batch_execute("rollback").await?;
        return Ok(Vec::new());
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut row = Reserved {
                id: r.get(0),
                seq: r.get(1),
                aggregate_id: r.get(2),
                topic: r.get(3),
                event_type: r.get(4),
                payload: r.get(5),
                headers: r.get(6),
                attempts: r.get(7),
                age_at_reserve: r.get(8),
                invalid: None,
            };
            row.invalid =
                crate::event::validate_row(&row.topic, &row.aggregate_id, &row.event_type)
                    .err()
                    .map(|e| format!("{e} (a rule of add_new_event; not sent, no retries)"));
            row
        })
        .collect())
}

/// The record's headers: the relay's own (`event_id`, `event_type`) exactly once, then the row's
/// valid custom headers. Custom headers the relay will not publish (a forged reserved name, a
/// non-string value, a column that is not an object) are logged and counted in
/// `outbox_headers_dropped_total{reason}`; the event itself is published.
fn record_headers(row: &Reserved, event_id: &str) -> OwnedHeaders {
    let custom = crate::headers::parse(row.headers.as_ref().map(|h| h.0.as_slice()));
    for dropped in &custom.dropped {
        metrics::counter!("outbox_headers_dropped_total", "reason" => dropped.reason())
            .increment(1);
        tracing::warn!(
            event_id,
            topic = %printable(&row.topic),
            reason = dropped.reason(),
            "outbox relay: publishing without a custom header: {}",
            printable(&dropped.to_string())
        );
    }
    let mut headers = OwnedHeaders::new_with_capacity(2 + custom.valid.len())
        .insert(Header {
            key: "event_id",
            value: Some(event_id),
        })
        .insert(Header {
            key: "event_type",
            value: Some(row.event_type.as_str()),
        });
    for (k, v) in &custom.valid {
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    headers
}

/// Errors that no retry can fix: the event is dead-lettered at once.
pub(crate) fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | InvalidMessageSize
            | InvalidMessage
            | BadMessage
            | InvalidTopic
            | MessageBatchTooLarge
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | InvalidRecord
            | PolicyViolation
            | UnsupportedForMessageFormat
            | InvalidRequiredAcks
            | InvalidTimestamp
            | InvalidArgument
    )
}

fn classify(e: &KafkaError) -> (String, bool) {
    let permanent = e.rdkafka_error_code().is_some_and(is_permanent);
    (e.to_string(), permanent)
}

enum Sent {
    Report(Result<(i32, i64), KafkaError>),
    Cutoff(DeliveryFuture, OwnedSemaphorePermit),
    Skipped,
}

/// Publishes one aggregate's events of the batch in order, one at a time: an event is handed to
/// the producer only after the previous one was acknowledged, so a failure can never let a later
/// event of the aggregate reach Kafka first.
async fn publish_chain(
    ctx: &Ctx,
    session: &Client,
    rows: &[Reserved],
    chain: &[usize],
    cutoff: Instant,
) -> (Vec<(usize, Outcome)>, Option<Straggler>) {
    let mut out = Vec::with_capacity(chain.len());
    for &idx in chain {
        // A lost batch session means lost row locks: send nothing more (the fence keeps other
        // relays off these aggregates until what was sent has settled).
        if ctx.token.is_cancelled() || Instant::now() >= cutoff || session.is_closed() {
            break;
        }
        let row = &rows[idx];
        if let Some(rule) = &row.invalid {
            out.push((
                idx,
                Outcome::Failed {
                    error: rule.clone(),
                    dead: true,
                },
            ));
            break;
        }
        let sent = send_one(ctx, row, cutoff).await;
        match sent {
            Sent::Skipped => break,
            Sent::Report(Ok((partition, offset))) => {
                out.push((idx, Outcome::Delivered { partition, offset }))
            }
            // Purged from the producer's queue at stop: never sent, so simply released.
            Sent::Report(Err(e)) if is_purged_unsent(&e) => break,
            Sent::Report(Err(e)) => {
                let (error, permanent) = classify(&e);
                let dead = permanent || row.attempts + 1 >= ctx.settings.max_attempts as i32;
                out.push((idx, Outcome::Failed { error, dead }));
                break;
            }
            Sent::Cutoff(future, permit) => {
                out.push((idx, Outcome::Held));
                return (
                    out,
                    Some(Straggler {
                        idx,
                        future,
                        _permit: permit,
                    }),
                );
            }
        }
    }
    (out, None)
}

/// Completes at `cutoff`, or — once the relay is stopping — after half of the stop timeout.
async fn wait_until(ctx: &Ctx, cutoff: Instant) {
    let stopping = async {
        ctx.token.cancelled().await;
        let stop = *ctx
            .shutdown_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tokio::time::sleep(stop / 2).await;
    };
    tokio::select! {
        _ = tokio::time::sleep_until(cutoff) => {}
        _ = stopping => {}
    }
}

fn is_purged_unsent(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::PurgeQueue)
}

async fn send_one(ctx: &Ctx, row: &Reserved, cutoff: Instant) -> Sent {
    let permit = tokio::select! {
        p = ctx.in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return Sent::Skipped },
        _ = wait_until(ctx, cutoff) => return Sent::Skipped,
    };
    let mut id_buf = Uuid::encode_buffer();
    let event_id: &str = row.id.hyphenated().encode_lower(&mut id_buf);
    let mut record = FutureRecord::to(&row.topic)
        .key(row.aggregate_id.as_str())
        .payload(row.payload.0.as_slice())
        .headers(record_headers(row, event_id));
    let future = loop {
        match ctx.producer.send_result(record) {
            Ok(f) => break f,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // Backpressure: the producer queue is full; wait for it to drain.
                if Instant::now() >= cutoff || ctx.token.is_cancelled() {
                    return Sent::Skipped;
                }
                record = r;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Sent::Report(Err(e)),
        }
    };
    let in_flight = ctx.counters.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    metrics::gauge!("outbox_in_flight_messages").set(in_flight as f64);
    let mut future = future;
    let report = tokio::select! {
        r = &mut future => r,
        _ = wait_until(ctx, cutoff) => {
            let in_flight = ctx.counters.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
            metrics::gauge!("outbox_in_flight_messages").set(in_flight as f64);
            return Sent::Cutoff(future, permit);
        }
    };
    let in_flight = ctx.counters.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
    metrics::gauge!("outbox_in_flight_messages").set(in_flight as f64);
    drop(permit);
    Sent::Report(report_result(report))
}

fn report_result(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<(i32, i64), KafkaError> {
    match r {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

fn retry_delay(settings: &Settings, attempts: i32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(settings.retry_backoff_min)
        .with_max_delay(settings.retry_backoff_max)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempts.saturating_sub(1).max(0) as usize)
        .unwrap_or(settings.retry_backoff_max)
        .min(settings.retry_backoff_max)
}

/// Publishes a reserved batch, confirms it and emits its acks. Returns the connection for reuse,
/// or `None` when it must not be reused (confirm failed).
async fn run_batch(
    ctx: Arc<Ctx>,
    conn: BatchConn,
    rows: Vec<Reserved>,
    reserved_at: Instant,
) -> BatchDone {
    let s = &ctx.settings;
    ctx.counters.batches.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("outbox_batches_total").increment(1);
    if tracing::enabled!(tracing::Level::DEBUG) {
        let ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
        tracing::debug!(event_ids = ?ids, "outbox batch reserved");
    }
    // The batch confirms (and commits) at the latest `batch_timeout` after its reservation,
    // well inside the lease; a message without a report by then is held by a written hold.
    let cutoff = reserved_at + s.batch_timeout;
    let mut chains: Vec<Vec<usize>> = Vec::new();
    {
        let mut by_aggregate: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let slot = *by_aggregate
                .entry(r.aggregate_id.as_str())
                .or_insert_with(|| {
                    chains.push(Vec::new());
                    chains.len() - 1
                });
            chains[slot].push(i);
        }
    }
    // Fence the batch's aggregates (committed on its own connection) before sending anything.
    let batch_id = Uuid::new_v4();
    let aggregates: Vec<&str> = chains
        .iter()
        .map(|c| rows[c[0]].aggregate_id.as_str())
        .collect();
    let fence_ms = (s.batch_timeout + s.publish_timeout + LEASE_MARGIN).as_millis() as i64;
    if let Err(e) = fence(&ctx, &batch_id, fence_ms, &aggregates).await {
        tracing::warn!(error = %e, "outbox relay: cannot fence the batch; releasing it");
        let _ = conn.client.batch_execute("rollback").await;
        return BatchDone {
            conn: None,
            next_due: None,
        };
    }
    let mut outcomes: Vec<Outcome> = rows.iter().map(|_| Outcome::NotSent).collect();
    let mut stragglers = Vec::new();
    {
        let mut running: FuturesUnordered<_> = chains
            .iter()
            .map(|c| publish_chain(&ctx, &conn.client, &rows, c, cutoff))
            .collect();
        while let Some((results, straggler)) = running.next().await {
            for (idx, o) in results {
                outcomes[idx] = o;
            }
            stragglers.extend(straggler);
        }
    }
    // Confirm in one statement, then commit (pipelined: one round trip).
    let mut ids = Vec::new();
    let mut codes = Vec::new();
    let mut parts = Vec::new();
    let mut offs = Vec::new();
    let mut errs: Vec<Option<&str>> = Vec::new();
    let mut delays = Vec::new();
    let hold_ms = (s.publish_timeout + LEASE_MARGIN).as_millis() as i64;
    for (row, o) in rows.iter().zip(&outcomes) {
        let (code, part, off, err, delay) = match o {
            Outcome::NotSent => continue,
            Outcome::Delivered { partition, offset } => {
                (outcome::DELIVERED, *partition, *offset, None, 0)
            }
            Outcome::Failed { error, dead } => {
                if *dead {
                    (outcome::DEAD, 0, 0, Some(error.as_str()), 0)
                } else {
                    let d = retry_delay(s, row.attempts + 1).as_millis() as i64;
                    (outcome::RETRY, 0, 0, Some(error.as_str()), d)
                }
            }
            Outcome::Held => (outcome::HOLD, 0, 0, None, hold_ms),
        };
        ids.push(row.id);
        codes.push(code);
        parts.push(part);
        offs.push(off);
        errs.push(err);
        delays.push(delay);
    }
    let params: [&(dyn postgres_types::ToSql + Sync); 7] =
        [&ids, &codes, &parts, &offs, &errs, &delays, &batch_id];
    let confirmed = futures::try_join!(
        conn.client.execute(&conn.confirm, &params),
        conn.client.batch_execute("commit")
    );
    if let Err(e) = confirmed {
        let delivered = codes.iter().filter(|c| **c == outcome::DELIVERED).count();
        let streak = ctx
            .counters
            .confirm_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        metrics::counter!("outbox_confirm_failures_total").increment(1);
        tracing::error!(
            confirm_failures_total = streak,
            error = %e,
            delivered,
            "outbox relay: confirming the batch failed; its acknowledged events stay pending and will be published again (duplicates keep their event_id)"
        );
        let _ = conn.client.batch_execute("rollback").await;
        // Nothing of this batch is in flight any more once its held messages have settled: then
        // its fence can go, so that the events are retried without waiting for it to expire.
        let ctx2 = ctx.clone();
        ctx.late.spawn(async move {
            let settle_by = Instant::now() + ctx2.settings.publish_timeout + LEASE_MARGIN;
            let pending: FuturesUnordered<_> = stragglers.into_iter().map(|s| s.future).collect();
            let settled = tokio::time::timeout_at(settle_by, pending.count()).await.is_ok();
            if settled {
                if let Err(e) = unfence(&ctx2, &batch_id).await {
                    tracing::debug!(error = %e, "outbox relay: fence not removed; it expires by itself");
                }
            }
        });
        return BatchDone {
            conn: None,
            next_due: None,
        };
    }
    let now = Utc::now();
    let mut delivered = 0u64;
    let acks = ctx.acks.as_ref().filter(|tx| tx.receiver_count() > 0);
    for (row, o) in rows.iter().zip(&outcomes) {
        match o {
            Outcome::Delivered { partition, offset } => {
                delivered += 1;
                if let Some(tx) = acks {
                    let _ = tx.send(DeliveryEvent::Delivered(DeliveryAck {
                        event_id: row.id,
                        seq: row.seq,
                        aggregate_id: row.aggregate_id.clone(),
                        topic: row.topic.clone(),
                        event_type: row.event_type.clone(),
                        partition: *partition,
                        offset: *offset,
                        delivered_at: now,
                    }));
                }
            }
            Outcome::Failed { error, dead } => {
                let dead = *dead;
                if dead {
                    ctx.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("outbox_dead_letters_total").increment(1);
                    tracing::error!(event_id = %row.id, aggregate_id = %printable(&row.aggregate_id), topic = %printable(&row.topic), error = %printable(&error.to_string()), "outbox event dead-lettered");
                } else {
                    ctx.counters.retried.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("outbox_delivery_failures_total").increment(1);
                    tracing::warn!(event_id = %row.id, aggregate_id = %printable(&row.aggregate_id), topic = %printable(&row.topic), attempts = row.attempts + 1, error = %printable(&error.to_string()), "outbox delivery failed; will retry");
                }
                if let Some(tx) = acks {
                    let _ = tx.send(DeliveryEvent::Failed(DeliveryFailure {
                        event_id: row.id,
                        aggregate_id: row.aggregate_id.clone(),
                        topic: row.topic.clone(),
                        error: error.clone(),
                        attempts: row.attempts + 1,
                        dead_letter: dead,
                    }));
                }
            }
            _ => {}
        }
    }
    if delivered > 0 {
        let acked = reserved_at.elapsed().as_secs_f64();
        let latency = metrics::histogram!("outbox_commit_to_ack_seconds");
        for (row, o) in rows.iter().zip(&outcomes) {
            if let (Outcome::Delivered { .. }, Some(age)) = (o, row.age_at_reserve) {
                latency.record(age + acked);
            }
        }
        metrics::counter!("outbox_events_delivered_total").increment(delivered);
        ctx.counters
            .delivered
            .fetch_add(delivered, Ordering::Relaxed);
        ctx.counters
            .last_delivery_ms
            .store(now.timestamp_millis(), Ordering::Relaxed);
    }
    if !stragglers.is_empty() {
        tracing::warn!(
            held = stragglers.len(),
            "outbox relay: delivery reports late; holding those events until they arrive"
        );
        let ctx2 = ctx.clone();
        ctx.late.spawn(confirm_late(ctx2, rows, stragglers));
    }
    // Wake up when the earliest retry or hold of this batch is due, not at the next poll.
    let next_due = codes
        .iter()
        .zip(&delays)
        .filter(|(c, _)| **c == outcome::RETRY || **c == outcome::HOLD)
        .map(|(_, d)| Duration::from_millis(*d as u64))
        .min();
    BatchDone {
        conn: Some(conn),
        next_due,
    }
}

/// Records the batch's fence on the relay's fence connection (autocommit).
async fn fence(
    ctx: &Ctx,
    batch_id: &Uuid,
    fence_ms: i64,
    aggregates: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let f = fence_conn(ctx).await?;
    f.client
        .execute(&f.insert, &[batch_id, &fence_ms, &aggregates])
        .await?;
    Ok(())
}

/// Removes the fence of a batch that did not confirm, once nothing of it is in flight.
async fn unfence(ctx: &Ctx, batch_id: &Uuid) -> Result<(), tokio_postgres::Error> {
    let f = fence_conn(ctx).await?;
    f.client.execute(&f.delete, &[batch_id]).await?;
    Ok(())
}

/// The fence connection and its prepared statements.
struct FenceConn {
    client: Client,
    insert: Statement,
    delete: Statement,
}

/// The relay's fence connection, (re)connected on demand.
async fn fence_conn(ctx: &Ctx) -> Result<Arc<FenceConn>, tokio_postgres::Error> {
    let mut guard = ctx.fence.lock().await;
    if let Some(f) = guard.as_ref().filter(|f| !f.client.is_closed()) {
        return Ok(f.clone());
    }
    let client = ctx.pg.connect("fence").await?;
    let insert = client
        .prepare_typed(
            &ctx.store.fence,
            &[Type::UUID, Type::INT8, Type::TEXT_ARRAY],
        )
        .await?;
    let delete = client
        .prepare_typed(&ctx.store.unfence, &[Type::UUID])
        .await?;
    let f = Arc::new(FenceConn {
        client,
        insert,
        delete,
    });
    *guard = Some(f.clone());
    Ok(f)
}

/// What a batch task hands back to the relay loop.
struct BatchDone {
    /// The connection for reuse; `None` when the confirmation failed.
    conn: Option<BatchConn>,
    /// When the earliest retry (or held event) of the batch becomes due.
    next_due: Option<Duration>,
}

/// Waits for the reports of held messages and records them, fenced by the hold: a row whose hold
/// ended is left to be retried.
async fn confirm_late(ctx: Arc<Ctx>, rows: Vec<Reserved>, stragglers: Vec<Straggler>) {
    let hold_end = Instant::now() + ctx.settings.publish_timeout + LEASE_MARGIN;
    let client = match ctx.pg.connect("late").await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "outbox relay: cannot record late delivery reports; the held events will be published again");
            return;
        }
    };
    let mut waiting: FuturesUnordered<_> = stragglers
        .into_iter()
        .map(|st| async move {
            let Straggler {
                idx,
                future,
                _permit,
            } = st;
            (idx, report_result(future.await))
        })
        .collect();
    let stopping = async {
        ctx.token.cancelled().await;
        let stop = *ctx
            .shutdown_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tokio::time::sleep(stop + LATE_GRACE).await;
    };
    tokio::pin!(stopping);
    loop {
        let next = tokio::select! {
            n = waiting.next() => n,
            _ = tokio::time::sleep_until(hold_end) => None,
            _ = &mut stopping => None,
        };
        let Some((idx, report)) = next else { break };
        let row = &rows[idx];
        match report {
            Ok((partition, offset)) => {
                let done = if ctx.settings.on_delivery == OnDelivery::Delete {
                    client.execute(&ctx.store.late_confirm, &[&row.id]).await
                } else {
                    client
                        .execute(&ctx.store.late_confirm, &[&row.id, &partition, &offset])
                        .await
                };
                if matches!(done, Ok(1)) {
                    ctx.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("outbox_events_delivered_total").increment(1);
                    if let Some(tx) = ctx.acks.as_ref() {
                        let _ = tx.send(DeliveryEvent::Delivered(DeliveryAck {
                            event_id: row.id,
                            seq: row.seq,
                            aggregate_id: row.aggregate_id.clone(),
                            topic: row.topic.clone(),
                            event_type: row.event_type.clone(),
                            partition,
                            offset,
                            delivered_at: Utc::now(),
                        }));
                    }
                }
            }
            Err(e) if is_purged_unsent(&e) => {
                // Never sent: release the hold, no attempt counted.
                let _ = client.execute(&ctx.store.late_release, &[&row.id]).await;
            }
            Err(e) => {
                let (error, permanent) = classify(&e);
                let delay = retry_delay(&ctx.settings, row.attempts + 1).as_millis() as i64;
                let dead = permanent || row.attempts + 1 >= ctx.settings.max_attempts as i32;
                let r = client
                    .execute(&ctx.store.late_fail, &[&row.id, &error, &delay, &dead])
                    .await;
                if matches!(r, Ok(1)) {
                    if dead {
                        ctx.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("outbox_dead_letters_total").increment(1);
                    } else {
                        ctx.counters.retried.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("outbox_delivery_failures_total").increment(1);
                    }
                    tracing::warn!(event_id = %row.id, error = %printable(&error.to_string()), dead_letter = dead, "outbox delivery failed (late report)");
                    if let Some(tx) = ctx.acks.as_ref() {
                        let _ = tx.send(DeliveryEvent::Failed(DeliveryFailure {
                            event_id: row.id,
                            aggregate_id: row.aggregate_id.clone(),
                            topic: row.topic.clone(),
                            error,
                            attempts: row.attempts + 1,
                            dead_letter: dead,
                        }));
                    }
                }
            }
        }
    }
}

/// How long a stopping relay waits, after the purge, for held messages' last reports.
const LATE_GRACE: Duration = Duration::from_millis(500);

/// Period of the backlog gauges (`outbox_backlog_events`, …).
const GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// Describes the relay's metrics and registers its counters at zero, so that `rate(…)` alerts
/// have a series to evaluate before the first event (a counter otherwise appears only when it
/// first increases).
fn register_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    let counters = [
        (
            "outbox_events_delivered_total",
            "Events Kafka acknowledged and the relay confirmed.",
        ),
        (
            "outbox_delivery_failures_total",
            "Failed delivery attempts that will be retried.",
        ),
        (
            "outbox_dead_letters_total",
            "Events that became dead letters.",
        ),
        (
            "outbox_confirm_failures_total",
            "Batches whose confirmation in Postgres failed (their events are published again).",
        ),
        ("outbox_batches_total", "Batches reserved."),
    ];
    for (name, help) in counters {
        describe_counter!(name, Unit::Count, help);
        metrics::counter!(name).increment(0);
    }
    describe_gauge!(
        "outbox_backlog_events",
        Unit::Count,
        "Pending events (every 10 s)."
    );
    describe_gauge!(
        "outbox_retrying_events",
        Unit::Count,
        "Pending events waiting for a retry."
    );
    describe_gauge!(
        "outbox_dead_letter_events",
        Unit::Count,
        "Dead letters in the table."
    );
    describe_gauge!(
        "outbox_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest pending event."
    );
    describe_gauge!(
        "outbox_legacy_reservations",
        Unit::Count,
        "Rows with a live reservation of another relay (the original Go relay still running)."
    );
    describe_gauge!(
        "outbox_in_flight_messages",
        Unit::Count,
        "Messages sent, not yet acknowledged."
    );
    describe_histogram!(
        "outbox_commit_to_ack_seconds",
        Unit::Seconds,
        "From the writer's transaction start to the confirmed delivery."
    );
}

/// Sets the backlog gauges from the status query, within the Postgres timeout.
async fn update_gauges(ctx: &Ctx) -> crate::Result<()> {
    crate::pg::bounded("gauges", ctx.pg.timeout, update_gauges_unbounded(ctx)).await
}

async fn update_gauges_unbounded(ctx: &Ctx) -> crate::Result<()> {
    let client = ctx.pg.connect("metrics").await?;
    // Fences of batches that never confirmed (their session was lost) expire here.
    client.execute(&ctx.store.fence_expire, &[]).await?;
    let rows = client.query(&ctx.store.status, &[]).await?;
    let (mut pending, mut retrying, mut dead, mut oldest) = (0i64, 0i64, 0i64, 0f64);
    for r in &rows {
        pending += r.get::<_, i64>(1);
        retrying += r.get::<_, i64>(2);
        dead += r.get::<_, i64>(3);
        oldest = oldest.max(r.get::<_, Option<f64>>(4).unwrap_or(0.0));
    }
    metrics::gauge!("outbox_backlog_events").set(pending as f64);
    metrics::gauge!("outbox_retrying_events").set(retrying as f64);
    metrics::gauge!("outbox_dead_letter_events").set(dead as f64);
    metrics::gauge!("outbox_oldest_pending_age_seconds").set(oldest);
    let legacy: i64 = client
        .query_one(&ctx.store.status_relays, &[])
        .await?
        .get(1);
    metrics::gauge!("outbox_legacy_reservations").set(legacy as f64);
    if legacy > 0 {
        tracing::error!(
            table = %ctx.store.table,
            legacy_reservations = legacy,
            "outbox relay: rows reserved by another relay within its lease (reserved_to in the future): the original Go relay is probably still running against this table; stop it — it publishes dead letters and ignores the order per aggregate"
        );
    }
    // The transaction holding back cleanup of dead rows (named in `status` and `/health`).
    let xact_age = match client
        .query_opt(crate::store::OLDEST_TRANSACTION, &[])
        .await?
    {
        Some(r) => r.get::<_, Option<f64>>(3).unwrap_or(0.0),
        None => 0.0,
    };
    metrics::gauge!("outbox_oldest_transaction_age_seconds").set(xact_age);
    Ok(())
}

/// Deletes delivered rows older than the retention, in bounded batches; connecting and each
/// batch are bounded by the Postgres timeout.
async fn cleanup(ctx: &Ctx) -> crate::Result<()> {
    let client = ctx.pg.connect_bounded("cleanup").await?;
    let retention_ms = ctx.settings.retention.as_millis() as f64;
    let batch = ctx.settings.cleanup_batch as i64;
    loop {
        if ctx.token.is_cancelled() {
            return Ok(());
        }
        let n = crate::pg::bounded("cleanup", ctx.pg.timeout, async {
            Ok(client
                .execute(&ctx.store.cleanup, &[&retention_ms, &batch])
                .await?)
        })
        .await?;
        if n > 0 {
            tracing::debug!(deleted = n, "outbox retention cleanup");
        }
        if (n as i64) < batch {
            return Ok(());
        }
    }
}
