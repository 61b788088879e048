//! The confirm stage: a batch's outcomes written in one statement together with the commit (one
//! round trip; in a batch of few aggregates, the rows Kafka acknowledged are written in the
//! batch transaction while it still publishes: [`confirm_early`]), and — for messages held at
//! the batch's cutoff — their late reports written one by one while the hold lasts, on one
//! session shared by every held batch ([`LateConn`]). Both judge reports with the same policy
//! (`Outcome::of_report`) and report through the same sink.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{BoxStream, SelectAll};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::config::{DeadLetterPolicy, OnDelivery};
use crate::store::ConfirmOutcome;

use super::publish::{self, report_result, Outcome, Straggler};
use super::reserve::{BatchConn, Reserved};
use super::retry::{retry_delay, unavailable_delay, FailureKind};
use super::shared::{Session, SharedSession};
use super::timing::{millis, round_trip, round_trip_on, LATE_GRACE};
use super::Ctx;

/// How long a row waits before it is due again after `outcome` (a retry's backoff, a hold).
fn due_after(ctx: &Ctx, row: &Reserved, outcome: &Outcome) -> Option<Duration> {
    match outcome {
        Outcome::Failed(f) => match f.kind {
            FailureKind::SharedBatch => Some(ctx.settings.retry_backoff_min),
            FailureKind::Cluster | FailureKind::Unconfirmed => Some(unavailable_delay(
                &ctx.settings,
                ctx.producers.state().streak(),
            )),
            FailureKind::Event => Some(retry_delay(&ctx.settings, row.attempts + 1)),
            FailureKind::Dead => None,
        },
        Outcome::Held => Some(ctx.timing.hold),
        Outcome::NotSent | Outcome::Delivered { .. } => None,
    }
}

/// The confirm statement's parameters: one element per row that has something to record.
#[derive(Default)]
struct ConfirmRows<'a> {
    ids: Vec<Uuid>,
    codes: Vec<i16>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    errors: Vec<Option<&'a str>>,
    delays_ms: Vec<i64>,
}

impl<'a> ConfirmRows<'a> {
    /// The rows of `outcomes` but those `written_early` (see [`confirm_early`]; empty: none).
    fn new(ctx: &Ctx, rows: &[Reserved], outcomes: &'a [Outcome], written_early: &[bool]) -> Self {
        let mut c = ConfirmRows::default();
        for (i, (row, o)) in rows.iter().zip(outcomes).enumerate() {
            if written_early.get(i).copied().unwrap_or(false) {
                continue;
            }
            let (code, partition, offset, error) = match o {
                Outcome::NotSent => continue,
                Outcome::Delivered { partition, offset } => {
                    (ConfirmOutcome::Delivered, *partition, *offset, None)
                }
                Outcome::Failed(f) => {
                    let code = match f.kind {
                        FailureKind::Dead => ConfirmOutcome::Dead,
                        FailureKind::Event => ConfirmOutcome::Retry,
                        FailureKind::Cluster
                        | FailureKind::SharedBatch
                        | FailureKind::Unconfirmed => ConfirmOutcome::Defer,
                    };
                    (code, 0, 0, Some(f.error.as_str()))
                }
                Outcome::Held => (ConfirmOutcome::Hold, 0, 0, None),
            };
            c.ids.push(row.id);
            c.codes.push(code.code());
            c.partitions.push(partition);
            c.offsets.push(offset);
            c.errors.push(error);
            c.delays_ms.push(due_after(ctx, row, o).map_or(0, millis));
        }
        c
    }

    /// When the retries and holds written by this confirm are due (each distinct delay once,
    /// shortest first): the relay wakes for every one — only the earliest, and a longer retry
    /// of the same batch waited for the fallback poll (found by a review helper).
    fn due_in(&self) -> Vec<Duration> {
        let mut due: Vec<Duration> = self
            .codes
            .iter()
            .zip(&self.delays_ms)
            .filter(|(code, _)| {
                **code == ConfirmOutcome::Retry.code()
                    || **code == ConfirmOutcome::Hold.code()
                    || **code == ConfirmOutcome::Defer.code()
            })
            .map(|(_, ms)| Duration::from_millis(u64::try_from(*ms).unwrap_or(0)))
            .collect();
        due.sort_unstable();
        due.dedup();
        due
    }
}

/// The holds a batch's confirm wrote: each held row's `next_attempt_at`, the token that fences
/// its late report to this hold (another relay's later write changes or clears it).
pub(crate) type Holds = HashMap<Uuid, SystemTime>;

/// Sent before the confirm, in its transaction. The confirm joins the batch's ids (`unnest`) to
/// the table; while the table holds fewer than about 300 rows per confirmed id, the planner
/// prefers reading all of it — the delivered rows kept for `retention` included — into a hash
/// join over one primary-key probe per id: measured on 106k rows, 30–37 ms against 10–15 ms for
/// 1,000 ids and 47–62 ms against 17–27 ms for 2,000, so a confirm's cost grew with the table up
/// to hundreds of thousands of rows. (Not a session setting: the reservation's plans on a
/// near-empty table got much worse with sequential scans off.)
///
/// The confirm's commit does not wait for its WAL flush, whatever the database's default (1k/s
/// p50 −0.55 to −0.68 ms: BENCHMARKS.md, "The confirm's commit" and "Where a caught-up batch
/// waits"). One lost with a server crash leaves its rows pending, and they are published again,
/// a contiguous replay: the next batch of any of those aggregates commits its fence
/// synchronously before it sends, which flushes the WAL up to it, the confirm included. What
/// such a confirm also undid, its fence's deletion, the relay redoes when it opens its next
/// batch session (`Fences::remove_recent`). Set for the transaction only (`set local`): with
/// PgBouncer in session pooling a session setting would outlive the relay's session when no
/// `server_reset_query` resets it, and the next client's commits would not wait either.
pub(crate) const CONFIRM_SETUP: &str =
    "set local enable_seqscan = off; set local synchronous_commit = off";

/// [`CONFIRM_SETUP`] for the confirm of a batch with messages still held: it waits for its WAL
/// flush. Its holds stop every relay from publishing those rows while the messages may still
/// land, and its fence is gone once it commits; lost with a server crash, the rows would be
/// pending again at once.
pub(crate) const CONFIRM_SETUP_DURABLE: &str =
    "set local enable_seqscan = off; set local synchronous_commit = on";

/// How many acknowledged rows a batch collects before it writes them while it still publishes
/// (see [`confirm_early`]): fewer would add statements (each a round trip on the batch session)
/// for little; a batch that ends with fewer leaves them all to the batch confirm.
pub(crate) const EARLY_CONFIRM_ROWS: usize = 256;

/// Only a batch of at most this many aggregates writes early: its chains are long (their
/// reports come in waves of `max_in_flight_per_aggregate`), and a backlog of few aggregates
/// leaves the other batch slot idle (its rows wait behind this batch's), so Postgres has the
/// time. In a batch of many aggregates the other batch's reservation needs that time: writing
/// early there cost the uniform drain about 10 % (three interleaved runs each, 42.5k against
/// 48.7k events/s; BENCHMARKS.md, "Writing acknowledged rows early").
pub(crate) const EARLY_CONFIRM_MAX_CHAINS: usize = 16;

/// Writes rows Kafka acknowledged — `acked`: (row index, partition, offset) — in the batch
/// transaction while the batch still publishes, as the batch confirm would write them: the
/// session otherwise idles while the batch publishes, and the confirm's per-row work then
/// overlaps the publishing instead of following it. Committed (and announced) with the batch
/// confirm: if the batch cannot confirm, they are rolled back with it and published again.
/// Returns the indexes written.
///
/// # Errors
/// As [`confirm_batch`]; the transaction is then aborted (or the session to be dropped), and the
/// batch cannot confirm.
pub(crate) async fn confirm_early(
    ctx: &Ctx,
    conn: &BatchConn,
    rows: &[Reserved],
    acked: Vec<(usize, i32, i64)>,
) -> crate::Result<Vec<usize>> {
    let ids: Vec<Uuid> = acked.iter().map(|(i, _, _)| rows[*i].id).collect();
    let partitions: Vec<i32> = acked.iter().map(|(_, p, _)| *p).collect();
    let offsets: Vec<i64> = acked.iter().map(|(_, _, o)| *o).collect();
    let params: [&(dyn postgres_types::ToSql + Sync); 3] = [&ids, &partitions, &offsets];
    let op = async {
        futures::try_join!(
            conn.client.batch_execute(CONFIRM_SETUP),
            conn.client.execute(&conn.confirm_early, &params),
        )
    };
    confirm_round_trip(ctx, conn, op).await?;
    Ok(acked.into_iter().map(|(i, _, _)| i).collect())
}

/// A confirm's statements on the batch session, within the round trip deadline (see
/// [`round_trip_on`]).
async fn confirm_round_trip<T, E: Into<crate::Error>>(
    ctx: &Ctx,
    conn: &BatchConn,
    op: impl std::future::Future<Output = Result<T, E>>,
) -> crate::Result<T> {
    round_trip_on(
        &ctx.pg,
        conn,
        &ctx.stop,
        "confirm",
        ctx.timing.round_trip,
        op,
    )
    .await
}

/// Confirms the batch and commits (pipelined: one round trip). Returns when its retries and
/// holds are due (see `ConfirmRows::due_in`), and the holds it wrote. `holding`: messages of the
/// batch are still unreported (held); the commit then waits for its WAL flush (see
/// [`CONFIRM_SETUP_DURABLE`]).
///
/// # Errors
/// The Postgres error of the confirm or the commit (the transaction is then still open: roll it
/// back), or [`Error::Timeout`](crate::Error::Timeout) when they missed the round trip deadline
/// (drop the connection).
pub(crate) async fn confirm_batch(
    ctx: &Ctx,
    conn: &BatchConn,
    rows: &[Reserved],
    outcomes: &[Outcome],
    written_early: &[bool],
    batch_id: &Uuid,
    holding: bool,
) -> crate::Result<(Vec<Duration>, Holds)> {
    let c = ConfirmRows::new(ctx, rows, outcomes, written_early);
    let setup = if holding {
        CONFIRM_SETUP_DURABLE
    } else {
        CONFIRM_SETUP
    };
    let params: [&(dyn postgres_types::ToSql + Sync); 7] = [
        &c.ids,
        &c.codes,
        &c.partitions,
        &c.offsets,
        &c.errors,
        &c.delays_ms,
        batch_id,
    ];
    // Planned with sequential scans off (see `CONFIRM_SETUP`); all three in one round trip.
    let op = async {
        futures::try_join!(
            conn.client.batch_execute(setup),
            conn.client.query(&conn.confirm, &params),
            conn.client.batch_execute("commit")
        )
    };
    let ((), held, ()) = confirm_round_trip(ctx, conn, op).await?;
    // The values this very statement wrote (now() + the hold); a row that cannot be read is
    // simply not recorded late (its hold expires and it is retried).
    let holds = held
        .iter()
        .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
        .collect();
    Ok((c.due_in(), holds))
}

/// Waits for the reports of held messages and records them, fenced by the hold: a row whose
/// hold ended, or that another relay wrote since, is left as it is (to be retried). Ends at the
/// hold's end, or shortly after a stop's deadline. `fetched_at`: when the batch's rows arrived
/// (their commit-to-ack time is their age then plus the time since).
pub(crate) async fn confirm_late(
    ctx: Arc<Ctx>,
    rows: Vec<Reserved>,
    stragglers: Vec<Straggler>,
    holds: Holds,
    fetched_at: Instant,
) {
    let hold_end = Instant::now() + ctx.timing.hold;
    // Health names the overdue reports while they are (with too few in-sync replicas nothing
    // fails: the reports just do not come).
    let mut overdue = ctx.producers.state().overdue(stragglers.len());
    // Connected now (unless it is already), so that a report arriving late in the hold is
    // written at once; replaced after a write that missed its deadline, reconnected on the next
    // report.
    if let Err(e) = late_conn(&ctx).await {
        ctx.report.late_unrecordable(&e);
    }
    // Runs (see `in_order`) in which a message was not delivered.
    let mut failed_runs = HashSet::new();
    // Runs in which a delivered message could not be recorded (the write failed, or its hold
    // was gone): it will be sent again, so the later messages of its run are not recorded either
    // (their holds end and they are sent again after it, a contiguous replay) — recorded as
    // delivered, they would be done before an earlier event of their aggregate. So are the
    // runs in which a message was acknowledged without an offset (it is sent again: see
    // `retry::without_offset`).
    let mut unrecorded_runs = HashSet::new();
    let mut waiting = in_order(stragglers);
    let stopping = async {
        let window = ctx.stop.requested().await;
        tokio::time::sleep_until(window.deadline + LATE_GRACE).await;
    };
    tokio::pin!(stopping);
    loop {
        let next = tokio::select! {
            n = waiting.next() => n,
            _ = tokio::time::sleep_until(hold_end) => None,
            _ = &mut stopping => None,
        };
        let Some(late) = next else {
            break;
        };
        // Late acknowledgements count too: a broker whose round trip outlasts `batch_timeout`
        // acknowledges every pipelined message late (found by a breaker helper: the pauses of
        // pipelining kept doubling there).
        if let Some(g) = late.pipe {
            ctx.pipe_reported(g, late.report.is_ok());
        }
        if late.after_failure {
            failed_runs.insert(late.run);
        }
        if late.replay {
            unrecorded_runs.insert(late.run);
        }
        // A report that is an error settles its overdue count without an acknowledgement,
        // unless its outcome records a failure itself (or the relay is stopping).
        let unacknowledged = late.report.is_err() && !ctx.stop.token().is_cancelled();
        if unrecorded_runs.contains(&late.run) {
            overdue.settled_one(unacknowledged);
            continue;
        }
        let row = &rows[late.idx];
        let run = late.run;
        if matches!(late.report, Ok((_, offset)) if offset < 0) {
            // Its own outcome is written below (a failure, or nothing after an earlier one).
            unrecorded_runs.insert(run);
        }
        let outcome = run_outcome(&ctx, row, late, &mut failed_runs);
        overdue.settled_one(unacknowledged && !matches!(outcome, Some(Outcome::Failed(_))));
        let written = write_late(&ctx, row, outcome.as_ref(), holds.get(&row.id)).await;
        match &outcome {
            Some(o) if written => ctx.report.settled_late(row, o, fetched_at.elapsed()),
            Some(Outcome::Delivered { .. }) => {
                unrecorded_runs.insert(run);
            }
            _ => {}
        }
    }
    overdue.hold_ended(ctx.stop.token().is_cancelled());
}

/// The outcome of a held message's late `report` for its `row`, within its run: after an
/// earlier message of the run failed (in `failed_runs`) it is released as it was, no attempt
/// (an acknowledgement then is an order anomaly); otherwise judged on its own, and a run whose
/// message was not delivered joins `failed_runs`.
fn run_outcome(
    ctx: &Ctx,
    row: &Reserved,
    late: LateReport,
    failed_runs: &mut HashSet<usize>,
) -> Option<Outcome> {
    if failed_runs.contains(&late.run) {
        // A replaying run never gets here (its reports are skipped, and one without an offset
        // made its run replay before this call).
        return match publish::after_run_failure(ctx, row, late.report, false) {
            publish::AfterRunFailure::Anomaly(o) => Some(o),
            publish::AfterRunFailure::Replay | publish::AfterRunFailure::Released => None,
        };
    }
    let outcome = late_outcome(ctx, row, late.report, late.alone, late.pipe.is_some());
    if !matches!(outcome, Some(Outcome::Delivered { .. })) {
        failed_runs.insert(late.run);
    }
    outcome
}

/// Writes a held row's late outcome (see [`record_late`]) on the late reports' session;
/// whether an outcome was written (a failed write is reported here). `hold`: the row's hold
/// (every held row of a batch has one; without it nothing can be fenced, so nothing is written).
async fn write_late(
    ctx: &Ctx,
    row: &Reserved,
    outcome: Option<&Outcome>,
    hold: Option<&SystemTime>,
) -> bool {
    let Some(hold) = hold else {
        return false;
    };
    let c = match late_conn(ctx).await {
        Ok(c) => c,
        Err(e) => {
            ctx.report.late_unrecordable(&e);
            return false;
        }
    };
    let write = record_late(ctx, &c, row, outcome, hold);
    let written = ctx
        .late_conn
        .round_trip(
            &ctx.pg,
            &c,
            &ctx.stop,
            "late confirm",
            ctx.timing.round_trip,
            write,
        )
        .await;
    match written {
        Ok(written) => written,
        Err(e) => {
            ctx.report.late_unrecordable(&e);
            false
        }
    }
}

/// A held message's report.
struct LateReport {
    /// Index of its row in the batch.
    idx: usize,
    /// Sent alone (see `publish::send_alone`).
    alone: bool,
    /// Sent by the pipelining producer of this generation.
    pipe: Option<u64>,
    /// Its run: the messages of one pipelined run share one (see `Straggler::follows`).
    run: usize,
    /// Its run had failed before the batch ended (see `Straggler::after_failure`).
    after_failure: bool,
    /// That failure was an acknowledgement without an offset (see `Straggler::replay`).
    replay: bool,
    report: Result<(i32, i64), rdkafka::error::KafkaError>,
}

/// The held messages' reports as they come, those of one pipelined run in the run's order (a
/// later one is judged knowing whether an earlier one failed).
fn in_order(stragglers: Vec<Straggler>) -> SelectAll<BoxStream<'static, LateReport>> {
    let mut runs: Vec<Vec<Straggler>> = Vec::new();
    for st in stragglers {
        match runs.last_mut() {
            Some(run) if st.follows => run.push(st),
            _ => runs.push(vec![st]),
        }
    }
    futures::stream::select_all(runs.into_iter().enumerate().map(|(run, sts)| {
        futures::stream::iter(sts)
            .then(move |st| async move {
                let Straggler {
                    idx,
                    future,
                    alone,
                    pipe,
                    after_failure,
                    replay,
                    watch,
                    _permit,
                    ..
                } = st;
                let report = report_result(future.await);
                drop(watch);
                LateReport {
                    idx,
                    alone,
                    pipe,
                    run,
                    after_failure,
                    replay,
                    report,
                }
            })
            .boxed()
    }))
}

/// The outcome of a late report. A broker's "too large" answer is about the record batch the
/// message shared with others, and a late report cannot re-send the event alone as the batch
/// does (`publish::send_alone`): unless the message already went alone (`alone`), it is recorded
/// as a failure that charges no attempt ([`refused_batch`](super::retry::refused_batch)) and the
/// event is marked to go alone on its next attempt, where only an event too large by itself is
/// refused again and becomes a dead letter (see `publish::outcome_marking_alone`). A pipelined message purged while the relay runs timed out.
fn late_outcome(
    ctx: &Ctx,
    row: &Reserved,
    report: Result<(i32, i64), rdkafka::error::KafkaError>,
    alone: bool,
    pipelined: bool,
) -> Option<Outcome> {
    match report {
        // The pipelining producer was purged because a report was overdue (not at stop): the
        // message timed out, as librdkafka's own timeout would have said on the main producer.
        Err(e) if pipelined && publish::is_purged(&e) && !ctx.stop.token().is_cancelled() => {
            Outcome::of_report(
                ctx,
                row,
                Err(rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
                )),
            )
        }
        report => publish::outcome_marking_alone(ctx, row, report, !alone),
    }
}

/// The session late reports are written on, with its statements: one for every held batch of
/// the relay, however many there are (a connection per held batch, kept for its hold, took a new
/// Postgres connection every `batch_timeout` per batch slot while the brokers stalled — hundreds
/// with a short `batch_timeout` — until the database refused the services' own connections).
pub(crate) struct LateConn {
    client: Arc<Client>,
    release: Statement,
    confirm: Statement,
    fail: Statement,
    server: usize,
    live: AtomicUsize,
}

impl Session for LateConn {
    fn client(&self) -> &Arc<Client> {
        &self.client
    }
    fn server(&self) -> usize {
        self.server
    }
}

impl SharedSession for LateConn {
    fn live(&self) -> &AtomicUsize {
        &self.live
    }
}

/// The late reports' session: the open one, or a new one within the connect deadline and the
/// round trip deadline of its preparation.
async fn late_conn(ctx: &Ctx) -> crate::Result<Arc<LateConn>> {
    ctx.late_conn
        .get(|| async {
            let connect = ctx.pg.connect("late");
            let client =
                round_trip(&ctx.stop, "connect", ctx.pg.connect_deadline(), connect).await?;
            let server = ctx.pg.server_of_last_connect();
            let prepare = async {
                futures::try_join!(
                    client.prepare(&ctx.sql.late_release),
                    client.prepare(&ctx.sql.late_confirm),
                    client.prepare(&ctx.sql.late_fail)
                )
            };
            let (release, confirm, fail) = round_trip(
                &ctx.stop,
                "late session setup",
                ctx.timing.round_trip,
                prepare,
            )
            .await?;
            Ok(LateConn {
                client: Arc::new(client),
                release,
                confirm,
                fail,
                server,
                live: AtomicUsize::new(0),
            })
        })
        .await
}

/// Writes one late outcome while the row's hold `hold` lasts and is still the row's (`None`:
/// purged unsent, the hold is released, no attempt counted); `Ok(true)` when an outcome was
/// written.
async fn record_late(
    ctx: &Ctx,
    c: &LateConn,
    row: &Reserved,
    o: Option<&Outcome>,
    hold: &SystemTime,
) -> Result<bool, tokio_postgres::Error> {
    let client = &c.client;
    let Some(o) = o else {
        client.execute(&c.release, &[&row.id, hold]).await?;
        // Due again at once, and nothing else wakes the relay for it before the hold's end.
        ctx.due.at(Instant::now());
        return Ok(false);
    };
    let retry_after = due_after(ctx, row, o);
    let written = match o {
        Outcome::Delivered { .. } if ctx.settings.on_delivery == OnDelivery::Delete => {
            client.execute(&c.confirm, &[&row.id, hold]).await
        }
        Outcome::Delivered { partition, offset } => {
            client
                .execute(&c.confirm, &[&row.id, partition, offset, hold])
                .await
        }
        Outcome::Failed(f) => {
            let delay = retry_after.map_or(0, millis);
            client
                .execute(
                    &c.fail,
                    &[&row.id, &f.error, &delay, &f.dead(), hold, &f.charged()],
                )
                .await
        }
        Outcome::NotSent | Outcome::Held => return Ok(false),
    };
    let written = written? == 1;
    if written {
        // The relay's only wake-up for this row, and for its aggregate's later events waiting
        // behind it, was the hold's end: they are free now if it was delivered (or became a
        // dead letter its aggregate does not wait for), and it is due again after its delay.
        let now = Instant::now();
        let frees = match o {
            Outcome::Delivered { .. } => true,
            Outcome::Failed(f) => {
                f.dead() && ctx.settings.dead_letter_policy == DeadLetterPolicy::Continue
            }
            Outcome::NotSent | Outcome::Held => false,
        };
        if frees {
            ctx.due.at(now);
        }
        if let Some(after) = retry_after {
            ctx.due.at(now + after);
        }
    }
    Ok(written)
}
