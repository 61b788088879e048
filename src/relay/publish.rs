//! The publish stage: a batch's rows as one chain per aggregate, all chains at once, each chain
//! one message at a time — an event is handed to the producer only after the previous one of its
//! aggregate was acknowledged, so a failure can never let a later event of the aggregate reach
//! Kafka first. Messages in flight over all batches are bounded by `max_in_flight` permits.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::text::printable;

use super::confirm::{confirm_early, EARLY_CONFIRM_MAX_CHAINS, EARLY_CONFIRM_ROWS};
use super::producer::RelayProducer;
use super::reserve::{BatchConn, Reserved};
use super::retry::{self, Failure, FailureKind};
use super::Ctx;
use crate::otel::PublishSpan;

/// What became of one reserved row.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Not handed to the producer (or purged unsent): released as it was.
    NotSent,
    /// Kafka acknowledged it.
    Delivered { partition: i32, offset: i64 },
    /// The attempt failed (retry or dead letter).
    Failed(Failure),
    /// Sent, no report by the batch's cutoff: held until the report comes.
    Held,
}

impl Outcome {
    /// The outcome of a delivery report for `row`; `None` when the message was purged from the
    /// producer's queue before it was sent (nothing to record: it is simply released). An
    /// acknowledgement without an offset is no delivery (see [`retry::without_offset`]).
    pub(crate) fn of_report(
        ctx: &Ctx,
        row: &Reserved,
        report: Result<(i32, i64), KafkaError>,
    ) -> Option<Outcome> {
        match report {
            Ok((partition, offset)) if offset >= 0 => {
                Some(Outcome::Delivered { partition, offset })
            }
            Ok((partition, offset)) => {
                metrics::counter!("outbox_acks_without_offset_total", "table" => ctx.report.table())
                    .increment(1);
                Some(Outcome::Failed(retry::without_offset(partition, offset)))
            }
            Err(e) if is_purged_unsent(&e) => None,
            Err(e) => {
                let cause = ctx.producers.state().client_problem().map(|p| p.error);
                let failure = retry::judge(&ctx.settings, &e, row.attempts, cause.as_deref());
                if !failure.charged() {
                    ctx.producers.state().unavailable(e.to_string());
                }
                Some(Outcome::Failed(failure))
            }
        }
    }
}

/// A message sent but not reported by its batch's cutoff.
pub(crate) struct Straggler {
    /// Index of its row in the batch.
    pub(crate) idx: usize,
    pub(crate) future: DeliveryFuture,
    /// Sent by the solo producer, alone in its record batch (see [`send_alone`]).
    pub(crate) alone: bool,
    /// Sent back to back with others of its aggregate by the pipelining producer of this
    /// generation (see [`pipeline`]): purged when its report is overdue.
    pub(crate) pipe: Option<u64>,
    /// Sent in the same pipelined run right after the straggler before it in the list: its
    /// report is judged after that one's (a message after a failed one is released).
    pub(crate) follows: bool,
    /// Its run had a failure before the batch ended: its report, and those of the messages that
    /// follow it, release the events (as in the batch).
    pub(crate) after_failure: bool,
    /// That failure was an acknowledgement without an offset: the run's later messages are sent
    /// again whatever their reports say (see [`retry::Failure::without_offset`]).
    pub(crate) replay: bool,
    /// Alive while the report is awaited; its batch's purge of the pipelining producer
    /// (`batch::purge_when_overdue`) watches it.
    pub(crate) watch: Option<std::sync::Arc<()>>,
    /// Its in-flight permit, released with the report.
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// What the publish stage hands to the confirm stage.
pub(crate) struct Published {
    /// One per reserved row, in the batch's order.
    pub(crate) outcomes: Vec<Outcome>,
    /// The held messages, still awaiting their reports.
    pub(crate) stragglers: Vec<Straggler>,
    /// One per reserved row: delivered and already written in the batch transaction (see
    /// [`confirm_early`]); the batch confirm leaves those out.
    pub(crate) written_early: Vec<bool>,
    /// Writing delivered rows early failed: the batch cannot confirm (its transaction is
    /// aborted, or its session is to be dropped after a timeout).
    pub(crate) early_error: Option<crate::Error>,
}

/// The rows' indexes grouped by aggregate, each chain in `seq` order (the batch's order).
pub(crate) fn chains(rows: &[Reserved]) -> Vec<Vec<usize>> {
    let mut chains: Vec<Vec<usize>> = Vec::new();
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
    chains
}

tokio::task_local! {
    /// Messages the chains of the batch being published handed to a producer so far.
    static HANDED_OVER: Cell<u64>;
    /// Rows of the batch being published that Kafka acknowledged and that are not yet written
    /// early: (row index, partition, offset). A delivered outcome is final when it is decided
    /// (a chain reads its reports in order; a later failure never revokes an earlier delivery).
    static ACKED: RefCell<Vec<(usize, i32, i64)>>;
    /// An early write of the batch being published failed: it cannot confirm, its chains send
    /// nothing more (found by a breaker helper: they went on to the cutoff, and all of it was
    /// published again).
    static CANNOT_CONFIRM: Cell<bool>;
}

/// Records `outcome` of row `idx` in the chain's `out`, and a delivery for early writing.
fn decided(out: &mut Vec<(usize, Outcome)>, idx: usize, outcome: Outcome) {
    if let Outcome::Delivered { partition, offset } = outcome {
        // Outside a batch that writes early nothing is collected: the batch confirm writes it.
        let _ = ACKED.try_with(|a| a.borrow_mut().push((idx, partition, offset)));
    }
    out.push((idx, outcome));
}

/// The batch's delivered rows written early (see [`confirm_early`]): at most one statement in
/// flight on the batch session; a failure ends early writing for the batch.
struct EarlyWrites<'a> {
    /// Whether the batch writes early at all (see [`EARLY_CONFIRM_MAX_CHAINS`]).
    enabled: bool,
    in_flight: Option<BoxFuture<'a, crate::Result<Vec<usize>>>>,
    written: Vec<bool>,
    error: Option<crate::Error>,
}

impl<'a> EarlyWrites<'a> {
    /// Polls the statement in flight, then starts the next one when enough deliveries wait.
    fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
        ctx: &'a Ctx,
        conn: &'a BatchConn,
        rows: &'a [Reserved],
    ) {
        loop {
            if let Some(f) = &mut self.in_flight {
                match f.poll_unpin(cx) {
                    std::task::Poll::Pending => return,
                    std::task::Poll::Ready(r) => {
                        self.in_flight = None;
                        self.done(r);
                    }
                }
            }
            if !self.enabled || self.error.is_some() {
                return;
            }
            let acked = ACKED.with(|a| {
                let mut a = a.borrow_mut();
                (a.len() >= EARLY_CONFIRM_ROWS).then(|| std::mem::take(&mut *a))
            });
            let Some(acked) = acked else {
                return;
            };
            self.in_flight = Some(confirm_early(ctx, conn, rows, acked).boxed());
        }
    }

    /// Waits for the statement in flight, if any.
    async fn finish(&mut self) {
        if let Some(f) = self.in_flight.take() {
            let r = f.await;
            self.done(r);
        }
    }

    /// Records what a statement wrote, or its failure.
    fn done(&mut self, r: crate::Result<Vec<usize>>) {
        match r {
            Ok(written) => written.into_iter().for_each(|i| self.written[i] = true),
            Err(e) => {
                let _ = CANNOT_CONFIRM.try_with(|c| c.set(true));
                self.error = Some(e);
            }
        }
    }
}

/// Publishes every chain until each is done, failed, or reached `cutoff`. Stops sending when
/// `session` (the batch transaction holding the row locks) is lost. `prompt`: the batch caught
/// up: the producers are kicked when its chains wait, and with `prompt_producer` on its single
/// sends go to the prompt producer (see
/// [`Producers::get`](super::producer::Producers::get)).
pub(crate) async fn publish(
    ctx: &Ctx,
    conn: &BatchConn,
    rows: &[Reserved],
    chains: &[Vec<usize>],
    cutoff: Instant,
    prompt: bool,
) -> Published {
    let session: &Client = &conn.client;
    let mut outcomes: Vec<Outcome> = rows.iter().map(|_| Outcome::NotSent).collect();
    let mut stragglers = Vec::new();
    let writes_early = chains.len() <= EARLY_CONFIRM_MAX_CHAINS;
    let mut early = EarlyWrites {
        enabled: writes_early,
        in_flight: None,
        written: vec![false; rows.len()],
        error: None,
    };
    let mut running: FuturesUnordered<_> = chains
        .iter()
        .map(|c| publish_chain(ctx, session, rows, c, cutoff, prompt))
        .collect();
    // In a batch that caught up, whenever every chain waits (for reports, or permits) after
    // handing messages over, those go out now rather than after `linger.ms` (see
    // `Producers::kick`): no more rows were there for later messages to join them. A backlog's
    // batches keep the linger: kicking their tails too cost 15 % of the uniform drain (the kick
    // also sends the other batch's messages as they come, in small requests; BENCHMARKS.md,
    // "The kick"). A pass that handed some over is followed by another before the kick:
    // FuturesUnordered also returns `Pending` when chains yielded (tokio's cooperative budget
    // ends a long pass every 128 sends or so).
    let (mut seen, mut kicked) = (0, 0);
    let tally = async {
        loop {
            let polled = futures::future::poll_fn(|cx| {
                let polled = running.poll_next_unpin(cx);
                // After the chains: what they decided in this pass counts towards the next
                // early write.
                early.poll(cx, ctx, conn, rows);
                if polled.is_pending() && prompt {
                    let handed = HANDED_OVER.with(Cell::get);
                    if handed != seen {
                        seen = handed;
                        cx.waker().wake_by_ref();
                    } else if handed != kicked {
                        kicked = handed;
                        ctx.producers.kick();
                    }
                }
                polled
            })
            .await;
            let Some((results, straggler)) = polled else {
                break;
            };
            for (idx, o) in results {
                outcomes[idx] = o;
            }
            stragglers.extend(straggler);
        }
    };
    // Deliveries are collected for early writes only in a batch that makes them: the others
    // (a uniform drain's) do not pay a push per message.
    let tally = CANNOT_CONFIRM.scope(Cell::new(false), tally);
    HANDED_OVER
        .scope(Cell::new(0), async {
            if writes_early {
                ACKED.scope(RefCell::new(Vec::new()), tally).await;
            } else {
                tally.await;
            }
        })
        .await;
    early.finish().await;
    Published {
        outcomes,
        stragglers,
        written_early: early.written,
        early_error: early.error,
    }
}

enum Sent {
    Report(Result<(i32, i64), KafkaError>),
    /// No report by the cutoff; `bool`: sent alone (the solo producer).
    Cutoff(DeliveryFuture, OwnedSemaphorePermit, bool),
    Skipped,
}

/// What one step of a chain leaves to do.
enum Step {
    /// Delivered: the chain goes on.
    Next,
    /// Not delivered (failed, released, or the batch ended): the chain stops here.
    Stop,
    /// Sent and not reported by the cutoff: held, the chain stops here.
    Held(Vec<Straggler>),
}

/// Publishes one aggregate's events of the batch in order: a run of consecutive events for the
/// same topic back to back on the pipelining producer (see [`pipeline`]), any other event only
/// after the previous one was acknowledged (see [`publish_one`]). Stops at the first event that
/// was not delivered: a later event of the aggregate must never reach Kafka before it.
async fn publish_chain(
    ctx: &Ctx,
    session: &Client,
    rows: &[Reserved],
    chain: &[usize],
    cutoff: Instant,
    prompt: bool,
) -> (Vec<(usize, Outcome)>, Vec<Straggler>) {
    let mut out = Vec::with_capacity(chain.len());
    let mut at = 0;
    while at < chain.len() {
        // A lost batch session means lost row locks: send nothing more (the fence keeps other
        // relays off these aggregates until what was sent has settled).
        if !may_send(ctx, session, cutoff) {
            break;
        }
        let run = pipelined_run(ctx, rows, &chain[at..]);
        let pipe = if run > 1 { pipe_generation(ctx) } else { None };
        let step = match pipe {
            Some(g) => {
                pipeline(
                    ctx,
                    session,
                    rows,
                    &chain[at..at + run],
                    g,
                    cutoff,
                    &mut out,
                )
                .await
            }
            None => publish_one(ctx, rows, chain[at], cutoff, prompt, &mut out).await,
        };
        let run = if pipe.is_some() { run } else { 1 };
        match step {
            Step::Next => at += run,
            Step::Stop => break,
            Step::Held(stragglers) => return (out, stragglers),
        }
    }
    (out, Vec::new())
}

/// The pipelining producer's generation (replaced first when librdkafka made it fatal), or
/// `None` — the run then goes one event at a time — while pipelining is paused after a purge
/// (`producer::PIPE_PAUSE`, `producer::pipe_pause`) or when that producer cannot be created
/// (the failure is not the event's).
fn pipe_generation(ctx: &Ctx) -> Option<u64> {
    if ctx.producers.pipe_paused() {
        return None;
    }
    let generation = ctx.producers.pipe().ok()?;
    if ctx.producers.pipe_fatal_error(generation).is_none() {
        return Some(generation);
    }
    ctx.check_pipe_fatal(generation);
    match ctx.producers.pipe() {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(error = %e, "outbox relay: the pipelining producer cannot be created; sending one event at a time");
            None
        }
    }
}

/// Whether a chain may hand another message to the producer: not stopping, before the cutoff,
/// the batch session (holding the row locks) still there, and the batch still able to confirm
/// (an early write did not fail: everything sent after that would only be sent again).
fn may_send(ctx: &Ctx, session: &Client, cutoff: Instant) -> bool {
    !(ctx.stop.token().is_cancelled()
        || Instant::now() >= cutoff
        || session.is_closed()
        || CANNOT_CONFIRM.try_with(Cell::get).unwrap_or(false))
}

/// How many of `chain`'s first events may go back to back: consecutive valid events for the
/// same topic as the first (same topic and key: same partition, where Kafka keeps their order),
/// none of them marked to go alone; 1 or 0 when the first goes by itself (or
/// `max_in_flight_per_aggregate` is 1).
fn pipelined_run(ctx: &Ctx, rows: &[Reserved], chain: &[usize]) -> usize {
    // A single event (most chains of a uniform backlog) goes by itself: no mark to look up.
    if ctx.settings.max_in_flight_per_aggregate <= 1 || chain.len() == 1 {
        return 1;
    }
    let topic = &rows[chain[0]].topic;
    chain
        .iter()
        .take_while(|&&i| {
            let r = &rows[i];
            r.invalid.is_none() && &r.topic == topic && !ctx.alone_next.contains(r.id)
        })
        .count()
}

/// Publishes one event and waits for its report (or the cutoff).
async fn publish_one(
    ctx: &Ctx,
    rows: &[Reserved],
    idx: usize,
    cutoff: Instant,
    prompt: bool,
    out: &mut Vec<(usize, Outcome)>,
) -> Step {
    let row = &rows[idx];
    if let Some(rule) = &row.invalid {
        // A row that breaks a writer rule is a dead letter, never sent; its aggregate's
        // later events wait behind it like behind any dead letter.
        out.push((idx, Outcome::Failed(retry::invalid_row(rule))));
        return Step::Stop;
    }
    let report = match send_one(ctx, row, cutoff, prompt).await {
        Sent::Skipped => return Step::Stop,
        Sent::Cutoff(future, permit, alone) => {
            out.push((idx, Outcome::Held));
            return Step::Held(vec![Straggler {
                idx,
                future,
                alone,
                pipe: None,
                follows: false,
                after_failure: false,
                replay: false,
                watch: None,
                _permit: permit,
            }]);
        }
        Sent::Report(report) => report,
    };
    // Purged from the producer's queue at stop: never sent, so simply released.
    let Some(outcome) = Outcome::of_report(ctx, row, report) else {
        return Step::Stop;
    };
    let delivered = matches!(outcome, Outcome::Delivered { .. });
    if delivered {
        ctx.fatal.delivered();
    }
    decided(out, idx, outcome);
    if delivered {
        Step::Next
    } else {
        Step::Stop
    }
}

/// A message of a [`pipeline`] awaiting its report.
struct InFlight {
    /// Its position in the run.
    pos: usize,
    idx: usize,
    future: DeliveryFuture,
    span: PublishSpan,
    permit: OwnedSemaphorePermit,
}

/// Sends `run` — one aggregate's consecutive events for one topic — back to back on the
/// pipelining producer ([`Producers::pipe`](super::producer::Producers::pipe)), at most
/// `max_in_flight_per_aggregate` unacknowledged at once, and reads their reports in order.
///
/// Why the order holds: the messages share a partition and a producer id, so the broker takes
/// them only in sequence (a message whose predecessor is missing is refused as out of order),
/// librdkafka retries a failed request together with all later ones, that producer's
/// `enable.gapless.guarantee` turns a permanent error into failing every later message, and it
/// never times a message out while the relay waits (the relay purges it instead, a suffix of
/// never-sent messages and in-flight ones possibly written). So the acknowledged messages are
/// a prefix of the run. After the first failure nothing more is sent; the later messages' reports
/// release them as they were (their failure is their predecessor's), except one acknowledged
/// anyway, which is recorded as delivered (it is in Kafka) and logged as an order anomaly.
/// At the cutoff the messages still in flight are held, each with its report to come.
async fn pipeline(
    ctx: &Ctx,
    session: &Client,
    rows: &[Reserved],
    run: &[usize],
    generation: u64,
    cutoff: Instant,
    out: &mut Vec<(usize, Outcome)>,
) -> Step {
    let depth = ctx.settings.max_in_flight_per_aggregate;
    let mut window: VecDeque<InFlight> = VecDeque::with_capacity(depth.min(run.len()));
    let mut next = 0;
    // The first event not delivered.
    let mut failed_at: Option<RunFailure> = None;
    loop {
        while failed_at.is_none()
            && next < run.len()
            && window.len() < depth
            && may_send(ctx, session, cutoff)
        {
            let idx = run[next];
            match send_next(ctx, &rows[idx], generation, cutoff, window.is_empty()).await {
                Ok(Some((future, span, permit))) => {
                    ctx.report.in_flight(1);
                    window.push_back(InFlight {
                        pos: next,
                        idx,
                        future,
                        span,
                        permit,
                    });
                    next += 1;
                }
                Ok(None) => break,
                // Refused before it was sent (by librdkafka: too large for `message.max.bytes`,
                // unknown topic, a replaced producer): about this event alone, never its record
                // batch.
                Err(report) => settle(ctx, rows, idx, next, report, true, &mut failed_at, out),
            }
        }
        let Some(mut front) = window.pop_front() else {
            break;
        };
        let report = tokio::select! {
            r = &mut front.future => report_result(r),
            _ = wait_until(ctx, cutoff) => {
                window.push_front(front);
                return Step::Held(hold(ctx, window, generation, failed_at, out));
            }
        };
        ctx.report.in_flight(-1);
        let InFlight { pos, idx, span, .. } = front;
        match &report {
            Ok(r) => span.end(Ok(*r)),
            Err(e) => span.end(Err(&e.to_string())),
        }
        ctx.pipe_reported(generation, report.is_ok());
        settle(ctx, rows, idx, pos, report, false, &mut failed_at, out);
    }
    if failed_at.is_none() && next == run.len() {
        Step::Next
    } else {
        Step::Stop
    }
}

/// Hands the next event of a [`pipeline`] to the pipelining producer of `generation`, with an
/// in-flight permit: waited for only when nothing of the run is in flight (`first`), so that no
/// chain holds permits while waiting for more. `Ok(None)`: not sent (no permit, or the producer
/// queue stayed full until the cutoff); `Err`: refused before it was sent.
async fn send_next(
    ctx: &Ctx,
    row: &Reserved,
    generation: u64,
    cutoff: Instant,
    first: bool,
) -> Result<
    Option<(DeliveryFuture, PublishSpan, OwnedSemaphorePermit)>,
    Result<(i32, i64), KafkaError>,
> {
    let permit = if first {
        in_flight_permit(ctx, cutoff).await
    } else {
        ctx.in_flight.clone().try_acquire_owned().ok()
    };
    let Some(permit) = permit else {
        return Ok(None);
    };
    match hand_over(ctx, row, cutoff, &Via::Pipe(generation)).await {
        Ok((_, future, span)) => Ok(Some((future, span, permit))),
        Err(Sent::Report(report)) => {
            ctx.check_pipe_fatal(generation);
            Err(report)
        }
        Err(_) => Ok(None),
    }
}

/// The messages of a [`pipeline`] still in flight at the cutoff, as held stragglers (see
/// [`Straggler::follows`] and [`Straggler::after_failure`]).
fn hold(
    ctx: &Ctx,
    window: VecDeque<InFlight>,
    generation: u64,
    failed_at: Option<RunFailure>,
    out: &mut Vec<(usize, Outcome)>,
) -> Vec<Straggler> {
    let held = window.into_iter().enumerate().map(|(i, f)| {
        ctx.report.in_flight(-1);
        f.span
            .end(Err("held: no delivery report before the batch ended"));
        out.push((f.idx, Outcome::Held));
        Straggler {
            idx: f.idx,
            future: f.future,
            alone: false,
            pipe: Some(generation),
            follows: i > 0,
            // Only a message after the failed one (a local refusal fails the message after
            // every one in flight: those before it are judged on their own reports).
            after_failure: failed_at.is_some_and(|p| f.pos > p.at),
            replay: failed_at.is_some_and(|p| f.pos > p.at && p.replay),
            watch: None,
            _permit: f.permit,
        }
    });
    held.collect()
}

/// An event acknowledged although an earlier one of its pipelined run failed, which the
/// pipelining producer's guarantees rule out (see [`pipeline`]): it is in Kafka, so it is
/// recorded as delivered (sending it again would add a copy, not restore the order); logged as
/// an error and counted in `outbox_order_anomalies_total`.
fn order_anomaly(ctx: &Ctx, row: &Reserved, partition: i32, offset: i64) -> Outcome {
    tracing::error!(event_id = %row.id, aggregate_id = %printable(&row.aggregate_id), partition, offset, "outbox relay: order anomaly: an event was acknowledged after an earlier event of its aggregate failed; the earlier one will follow it");
    metrics::counter!("outbox_order_anomalies_total", "table" => ctx.report.table()).increment(1);
    ctx.fatal.delivered();
    Outcome::Delivered { partition, offset }
}

/// Records the report of the pipelined event at `pos` of its run (see [`pipeline`]).
#[allow(clippy::too_many_arguments)]
fn settle(
    ctx: &Ctx,
    rows: &[Reserved],
    idx: usize,
    pos: usize,
    report: Result<(i32, i64), KafkaError>,
    local: bool,
    failed_at: &mut Option<RunFailure>,
    out: &mut Vec<(usize, Outcome)>,
) {
    let row = &rows[idx];
    if let Some(failed) = failed_at.as_mut().filter(|f| pos > f.at) {
        match after_run_failure(ctx, row, report, failed.replay) {
            AfterRunFailure::Anomaly(o) => decided(out, idx, o),
            AfterRunFailure::Replay => failed.replay = true,
            AfterRunFailure::Released => {}
        }
        return;
    }
    let outcome = outcome_marking_alone(ctx, row, report, !local);
    match outcome {
        Some(o @ Outcome::Delivered { .. }) => {
            ctx.fatal.delivered();
            decided(out, idx, o);
        }
        Some(o) => {
            let replay = matches!(&o, Outcome::Failed(f) if f.kind == FailureKind::Unconfirmed);
            RunFailure::at(failed_at, pos, replay);
            out.push((idx, o));
        }
        None => RunFailure::at(failed_at, pos, false),
    }
}

/// The first failure of a [`pipeline`]'s run.
#[derive(Clone, Copy)]
struct RunFailure {
    /// Its position in the run.
    at: usize,
    /// A failure of the run was an acknowledgement without an offset: the run's later events are
    /// sent again even when acknowledged (see [`retry::Failure::without_offset`]).
    replay: bool,
}

impl RunFailure {
    /// Records a failure at `pos` of the run (`replay`: an acknowledgement without an offset).
    fn at(failed: &mut Option<RunFailure>, pos: usize, replay: bool) {
        *failed = Some(match *failed {
            Some(f) => RunFailure {
                at: f.at.min(pos),
                replay: f.replay || replay,
            },
            None => RunFailure { at: pos, replay },
        });
    }
}

/// Completes at `cutoff`, or — once the relay is stopping — halfway to the stop deadline.
async fn wait_until(ctx: &Ctx, cutoff: Instant) {
    let stopping = async {
        let window = ctx.stop.requested().await;
        tokio::time::sleep_until(window.sends_end()).await;
    };
    tokio::select! {
        _ = tokio::time::sleep_until(cutoff) => {}
        _ = stopping => {}
    }
}

/// The outcome of a report whose event cannot be sent alone at once (a pipelined or a late
/// report): a refusal of the record batch it `shared` with others is recorded as
/// [`retry::refused_batch`] (no attempt) and the event goes alone next time (see [`AloneNext`]);
/// any other report is judged by [`Outcome::of_report`].
pub(crate) fn outcome_marking_alone(
    ctx: &Ctx,
    row: &Reserved,
    report: Result<(i32, i64), KafkaError>,
    shared: bool,
) -> Option<Outcome> {
    match report {
        Err(e) if shared && is_batch_refused_error(&e) => {
            ctx.alone_next.mark(row.id);
            Some(Outcome::Failed(retry::refused_batch(&e)))
        }
        report => Outcome::of_report(ctx, row, report),
    }
}

/// What the report of an event after the first failure of its pipelined run means (see
/// [`after_run_failure`]).
pub(crate) enum AfterRunFailure {
    /// Acknowledged with an offset, which the pipelining producer's guarantees rule out: an
    /// [`order_anomaly`], recorded as delivered.
    Anomaly(Outcome),
    /// Acknowledged without an offset (it may be in Kafka): the run's later events are sent
    /// again even when acknowledged — resent alone, this one would land after them — and so is
    /// this one (see [`retry::Failure::without_offset`]).
    Replay,
    /// Not delivered: released as it was, without an attempt.
    Released,
}

/// The one rule for an event of a pipelined run after the run's first failure, in a batch
/// ([`pipeline`]'s `settle`) and in a late report (`confirm::run_outcome`): failed because a
/// predecessor did, it is released as it was. `replaying`: the run already replays (an
/// acknowledgement is then one more copy, not an anomaly). A refusal of the record batch it
/// shared with the failed one (too large, an invalid record: see [`is_batch_refused_error`])
/// marks it to go alone next time as well: marking only the failed one, each next try
/// pipelined the rest into the same refused record batch again, one cycle (about a second) and
/// one fatal pipelining producer per event before the culprit (found by a breaker helper: 51
/// cycles, 54 s, for an 8 KB event 50th in its run).
pub(crate) fn after_run_failure(
    ctx: &Ctx,
    row: &Reserved,
    report: Result<(i32, i64), KafkaError>,
    replaying: bool,
) -> AfterRunFailure {
    match report {
        Ok((partition, offset)) if offset >= 0 && !replaying => {
            AfterRunFailure::Anomaly(order_anomaly(ctx, row, partition, offset))
        }
        Ok(_) => AfterRunFailure::Replay,
        Err(e) => {
            if is_batch_refused_error(&e) {
                ctx.alone_next.mark(row.id);
            }
            AfterRunFailure::Released
        }
    }
}

/// A message purged from a producer (queued or in flight).
pub(crate) fn is_purged(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
    )
}

/// A message purged from the producer's queue before it was sent.
pub(crate) fn is_purged_unsent(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::PurgeQueue)
}

async fn send_one(ctx: &Ctx, row: &Reserved, cutoff: Instant, prompt: bool) -> Sent {
    if ctx.alone_next.take(row.id) {
        return send_alone(ctx, row, cutoff).await;
    }
    let Some(permit) = in_flight_permit(ctx, cutoff).await else {
        return Sent::Skipped;
    };
    match deliver(ctx, row, cutoff, permit, Via::Main { prompt }).await {
        Sent::Report(report) if is_batch_refused(&report) => send_alone(ctx, row, cutoff).await,
        sent => sent,
    }
}

/// An in-flight permit (`max_in_flight`), or `None` when the batch ends first.
async fn in_flight_permit(ctx: &Ctx, cutoff: Instant) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        p = ctx.in_flight.clone().acquire_owned() => p.ok(),
        _ = wait_until(ctx, cutoff) => None,
    }
}

/// Which producer a message goes to.
enum Via {
    /// The current generation's main producer, or with `prompt` its prompt producer (see
    /// [`Producers::get`](super::producer::Producers::get)).
    Main { prompt: bool },
    /// The solo producer (see [`send_alone`]).
    Solo(RelayProducer),
    /// The pipelining producer of this generation (see [`pipeline`]).
    Pipe(u64),
}

/// Hands `row` to the producer `via` names (see [`deliver`]): the main producer's generation, the
/// delivery future and the record's span; or, when it was not taken, what became of it — a
/// local refusal (`Sent::Report`, the main producer checked for a fatal error) or a producer
/// queue that stayed full until the cutoff (`Sent::Skipped`).
async fn hand_over(
    ctx: &Ctx,
    row: &Reserved,
    cutoff: Instant,
    via: &Via,
) -> Result<(Option<u64>, DeliveryFuture, PublishSpan), Sent> {
    let mut id_buf = Uuid::encode_buffer();
    let event_id: &str = row.id.hyphenated().encode_lower(&mut id_buf);
    let (mut record, span) = record_of(ctx, row, event_id);
    // The producer's clone lives only for the hand-over: after a rebuild, the replaced producer's
    // last clone must not be dropped on the runtime's threads (its drop flushes, up to 500 ms).
    loop {
        let (generation, sent) = match via {
            Via::Main { prompt } => {
                let (generation, producer) = ctx.producers.get(*prompt);
                (Some(generation), producer.send_result(record))
            }
            Via::Solo(producer) => (None, producer.send_result(record)),
            Via::Pipe(generation) => (None, ctx.producers.send_pipe(*generation, record)),
        };
        match sent {
            Ok(f) => {
                let _ = HANDED_OVER.try_with(|n| n.set(n.get() + 1));
                return Ok((generation, f, span));
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                // Backpressure: the producer queue is full; wait for it to drain.
                if Instant::now() >= cutoff || ctx.stop.token().is_cancelled() {
                    span.end(Err(
                        "not sent: the batch ended while the producer queue was full",
                    ));
                    return Err(Sent::Skipped);
                }
                record = r;
                tokio::time::sleep(QUEUE_FULL_WAIT).await;
            }
            Err((e, _)) => {
                span.end(Err(&e.to_string()));
                if let Some(generation) = generation {
                    ctx.check_fatal(generation);
                }
                return Err(Sent::Report(Err(e)));
            }
        }
    }
}

/// Hands `row` to the producer `via` names — the main one checked for a fatal error after a
/// failure — and waits for the delivery report until
/// `cutoff` (or the stop's send window): then the message is held (`Sent::Cutoff`, with its
/// permit). A full producer queue is waited out until then (`Sent::Skipped`: not sent).
async fn deliver(
    ctx: &Ctx,
    row: &Reserved,
    cutoff: Instant,
    permit: OwnedSemaphorePermit,
    via: Via,
) -> Sent {
    let (generation, mut future, span) = match hand_over(ctx, row, cutoff, &via).await {
        Ok(sent) => sent,
        Err(sent) => return sent,
    };
    ctx.report.in_flight(1);
    let report = tokio::select! {
        r = &mut future => r,
        _ = wait_until(ctx, cutoff) => {
            ctx.report.in_flight(-1);
            span.end(Err("held: no delivery report before the batch ended"));
            return Sent::Cutoff(future, permit, matches!(via, Via::Solo(_)));
        }
    };
    ctx.report.in_flight(-1);
    drop(permit);
    let report = report_result(report);
    match (&report, generation) {
        (Ok(r), _) => span.end(Ok(*r)),
        (Err(e), generation) => {
            span.end(Err(&e.to_string()));
            if let Some(generation) = generation {
                ctx.check_fatal(generation);
            }
        }
    }
    Sent::Report(report)
}

/// The record of `row`, and the span it is published in (see [`record_headers`]).
fn record_of<'a>(
    ctx: &Ctx,
    row: &'a Reserved,
    event_id: &'a str,
) -> (FutureRecord<'a, str, [u8]>, PublishSpan) {
    let (headers, span) = record_headers(ctx, row, event_id);
    let record = FutureRecord::to(&row.topic)
        .key(row.aggregate_id.as_str())
        .payload(row.payload.0.as_slice())
        .headers(headers);
    (record, span)
}

/// A delivery report of MESSAGE_TOO_LARGE from the broker: the record batch that carried the
/// message exceeded the topic's `max.message.bytes`, which says nothing about this message
/// when others shared the batch. (A message over the producer's own `message.max.bytes` is
/// refused by `send_result`, not reported.)
/// RECORD_LIST_TOO_LARGE (`MessageBatchTooLarge`, a batch over the topic's `segment.bytes`) is the
/// same kind of answer about the batch, and so is librdkafka's `InvalidDifferentRecord` (KIP-467:
/// the broker refused the batch for another record's INVALID_RECORD; that record gets the error
/// itself): re-sent alone, this message is judged on its own.
pub(crate) fn is_batch_refused(report: &Result<(i32, i64), KafkaError>) -> bool {
    matches!(report, Err(e) if is_batch_refused_error(e))
}

/// See [`is_batch_refused`].
pub(crate) fn is_batch_refused_error(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(MessageSizeTooLarge | MessageBatchTooLarge | InvalidDifferentRecord)
    )
}

/// Events whose record batch was refused in a report that came after their batch ended (see
/// `confirm::late_outcome`): their next attempt skips the shared producer and goes alone
/// ([`send_alone`]), or an event too large for the topic would be refused late with its batch,
/// uncharged, forever. Relay-local (a restarted relay learns it again from one refusal). A mark
/// is dropped when this relay sends the event alone, and forgotten after [`AloneNext::EXPIRY`]
/// (another relay took the event, or it was deleted); at most [`AloneNext::CAPACITY`] marks:
/// beyond that a late refusal is still retried uncharged, only not marked.
#[derive(Default)]
pub(crate) struct AloneNext(std::sync::Mutex<HashMap<Uuid, Instant>>);

impl AloneNext {
    /// The most events remembered at once.
    pub(crate) const CAPACITY: usize = 10_000;
    /// How long a mark lasts.
    pub(crate) const EXPIRY: Duration = Duration::from_secs(600);

    /// Marks `id` to go alone next time (not when the set is full of live marks).
    pub(crate) fn mark(&self, id: Uuid) {
        let mut set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if set.len() >= Self::CAPACITY {
            set.retain(|_, at| now.duration_since(*at) < Self::EXPIRY);
        }
        if set.len() < Self::CAPACITY || set.contains_key(&id) {
            set.insert(id, now);
        }
    }

    /// Whether `id` has a live mark (keeping it).
    fn contains(&self, id: Uuid) -> bool {
        let set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.get(&id).is_some_and(|at| at.elapsed() < Self::EXPIRY)
    }

    /// Whether `id` has a live mark, forgetting it.
    fn take(&self, id: Uuid) -> bool {
        let mut set = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.remove(&id)
            .is_some_and(|at| at.elapsed() < Self::EXPIRY)
    }
}

/// Sends `row` again as the only message of its record batch (on the solo producer, one message
/// at a time): only a message that is too large by itself is refused again, and then it is a
/// dead letter. Bounded like any send by the batch's `cutoff` and the stop: when the solo
/// producer or an in-flight permit is not free by then, the event is retried later without
/// counting an attempt; a report later than that is held like any other. The solo producer puts
/// one message in each record batch (`batch.num.messages=1`); one that librdkafka made fatal is
/// replaced before its next use (`Producers::solo`).
async fn send_alone(ctx: &Ctx, row: &Reserved, cutoff: Instant) -> Sent {
    // Not sent by the cutoff (the solo producer or an in-flight permit was not free): released
    // as it was, like any message the batch had no time for, and still alone next time.
    let busy = || {
        ctx.alone_next.mark(row.id);
        Sent::Skipped
    };
    let solo = tokio::select! {
        solo = ctx.producers.solo() => solo,
        _ = wait_until(ctx, cutoff) => return busy(),
    };
    let solo = match solo {
        Ok(solo) => solo,
        Err(e) => return Sent::Report(Err(e)),
    };
    let Some(producer) = solo.clone() else {
        return busy();
    };
    let Some(permit) = in_flight_permit(ctx, cutoff).await else {
        return busy();
    };
    tracing::info!(event_id = %row.id, topic = %printable(&row.topic), "outbox relay: the broker refused the record batch the event shared (too large, or another record invalid); sending the event alone");
    drop(solo);
    deliver(ctx, row, cutoff, permit, Via::Solo(producer)).await
}

/// How long a send waits before trying again when the producer's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);

/// The record's headers: the relay's own (`event_id`, `event_type`) exactly once, the
/// CloudEvents attributes when `cloudevents_source` is set (see [`crate::cloudevents`]), then the
/// row's valid custom headers. Custom headers the relay will not publish (a forged reserved name,
/// a non-string value, a column that is not an object) are logged and counted in
/// `outbox_headers_dropped_total{reason}`; the event itself is published. Under feature
/// `opentelemetry` the record is published in a producer span continuing the row's
/// `traceparent`, and carries that span's `traceparent` instead (see [`crate::otel`]).
fn record_headers(ctx: &Ctx, row: &Reserved, event_id: &str) -> (OwnedHeaders, PublishSpan) {
    let cloudevents_source = ctx.settings.cloudevents_source.as_deref();
    let mut custom = crate::headers::parse(row.headers.as_ref().map(|h| h.0.as_slice()));
    if cloudevents_source.is_some() {
        custom.valid.retain(|(name, _)| {
            let reserved = crate::cloudevents::is_reserved(name);
            if reserved {
                custom
                    .dropped
                    .push(crate::headers::Dropped::Reserved(name.clone()));
            }
            !reserved
        });
    }
    let span = PublishSpan::start(
        &row.topic,
        &row.aggregate_id,
        event_id,
        custom.valid.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let trace = span.headers();
    if !trace.is_empty() {
        custom
            .valid
            .retain(|(k, _)| !crate::otel::is_trace_header(k));
        custom.valid.extend(trace);
    }
    for dropped in &custom.dropped {
        metrics::counter!("outbox_headers_dropped_total", "reason" => dropped.reason(), "table" => ctx.report.table())
            .increment(1);
        tracing::warn!(
            event_id,
            topic = %printable(&row.topic),
            reason = dropped.reason(),
            "outbox relay: publishing without a custom header: {}",
            printable(&dropped.to_string())
        );
    }
    let mut headers = OwnedHeaders::new_with_capacity(9 + custom.valid.len())
        .insert(Header {
            key: "event_id",
            value: Some(event_id),
        })
        .insert(Header {
            key: "event_type",
            value: Some(row.event_type.as_str()),
        });
    if let Some(source) = cloudevents_source {
        use crate::cloudevents::{CONTENT_TYPE, SPEC_VERSION};
        let attributes = [
            ("ce_specversion", Some(SPEC_VERSION)),
            ("ce_id", Some(event_id)),
            ("ce_source", Some(source)),
            ("ce_type", Some(row.event_type.as_str())),
            ("ce_subject", Some(row.aggregate_id.as_str())),
            ("ce_time", row.created_at.as_deref()),
            ("content-type", Some(CONTENT_TYPE)),
        ];
        for (key, value) in attributes {
            if let Some(value) = value {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
    }
    for (k, v) in &custom.valid {
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    (headers, span)
}

/// A delivery future's result as partition and offset, or the error.
pub(crate) fn report_result(
    r: Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> Result<(i32, i64), KafkaError> {
    match r {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alone_next_marks_until_full_and_forgets_what_it_sent() {
        let marks = AloneNext::default();
        let ids: Vec<Uuid> = (0..AloneNext::CAPACITY).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            marks.mark(*id);
        }
        let late = Uuid::new_v4();
        marks.mark(late);
        assert!(
            !marks.take(late),
            "no room for a new mark while all are live"
        );
        marks.mark(ids[0]);
        assert!(marks.take(ids[0]), "a marked event goes alone");
        assert!(!marks.take(ids[0]), "once");
        marks.mark(late);
        assert!(marks.take(late), "a taken mark makes room");
    }
}
