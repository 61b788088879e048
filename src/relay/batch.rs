//! One batch through the stages after its reservation: fence → publish → confirm → report.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::time::Instant;
use uuid::Uuid;

use super::confirm::{confirm_batch, confirm_late, Holds};
use super::publish::{self, Outcome, Straggler};
use super::reserve::{BatchConn, Reserved};
use super::Ctx;

/// What a batch hands back to the pipeline.
pub(crate) struct BatchDone {
    /// The connection for reuse; `None` when the batch could not be fenced or confirmed (the
    /// pipeline then pauses, so that a persistent fault is not a tight loop of re-sends).
    pub(crate) conn: Option<BatchConn>,
    /// When the batch's retries (and held events) become due, from its confirm.
    pub(crate) due_in: Vec<Duration>,
    /// The lowest `seq` of the rows its commit released pending and due: rows it did not send,
    /// and (at its last row's `seq` or above) the rows its reservation locked past the byte
    /// budget. The next reservation's scan must not start above it.
    pub(crate) released_from: Option<i64>,
}

impl BatchDone {
    fn failed() -> Self {
        BatchDone {
            conn: None,
            due_in: Vec::new(),
            released_from: None,
        }
    }
}

/// Publishes a reserved batch, confirms it and reports it. `chains`: the rows' indexes grouped by
/// aggregate ([`publish::chains`], computed once by the pipeline). `fetched_at`: when its rows had
/// arrived (each row's age was read just before, see `reserve.sql`) — the batch
/// stops sending `batch_timeout` after that, not after the reservation started, so that a
/// reservation slow to fetch (large events) still leaves the batch its time to send (the lease,
/// Postgres' `idle_in_transaction_session_timeout`, also starts counting only then).
/// `caught_up`: the reservation's scan found fewer candidates than its limit, within its byte
/// budget (`Scan::caught_up`; with `prompt_producer` on, the batch's single sends then go to the
/// prompt producer: see
/// [`Producers::get`](super::producer::Producers::get)).
pub(crate) async fn run_batch(
    ctx: Arc<Ctx>,
    conn: BatchConn,
    rows: Vec<Reserved>,
    chains: Vec<Vec<usize>>,
    cut_by_bytes: bool,
    caught_up: bool,
    fetched_at: Instant,
) -> BatchDone {
    ctx.report.batch_reserved(&rows);
    let cutoff = fetched_at + ctx.timing.batch_timeout;
    // Fence the batch's aggregates (committed on its own connection) before sending anything.
    let batch_id = Uuid::new_v4();
    let aggregates: Vec<&str> = chains
        .iter()
        .map(|c| rows[c[0]].aggregate_id.as_str())
        .collect();
    if let Err(e) = ctx.fences.insert(&batch_id, &aggregates).await {
        return not_fenced(&ctx, conn, batch_id, &e).await;
    }
    let mut published = publish::publish(&ctx, &conn, &rows, &chains, cutoff, caught_up).await;
    watch_pipes(&ctx, &mut published.stragglers, cutoff);
    let outcomes = published.outcomes;
    #[cfg(feature = "testing")]
    if crate::testing::faults::take_panic(
        &ctx.settings.table,
        crate::testing::faults::PanicAt::Batch,
    ) {
        panic!("injected by outbox::testing::faults::panic_the_relay_of");
    }
    let confirmed = match published.early_error.take() {
        Some(e) => Err(e),
        None => {
            confirm_batch(
                &ctx,
                &conn,
                &rows,
                &outcomes,
                &published.written_early,
                &batch_id,
                !published.stragglers.is_empty(),
            )
            .await
        }
    };
    match confirmed {
        Ok((due_in, holds)) => {
            ctx.report
                .batch_confirmed(&rows, &outcomes, fetched_at.elapsed());
            let unsent = rows
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| matches!(o, Outcome::NotSent))
                .map(|(r, _)| r.seq);
            // Rows come in `seq` order: those past the budget follow the last (or share its seq).
            let past_budget = rows.last().filter(|_| cut_by_bytes).map(|r| r.seq);
            let released_from = unsent.chain(past_budget).min();
            if published.stragglers.is_empty() {
                ctx.fences.settled(batch_id);
            }
            hold_stragglers(&ctx, rows, published.stragglers, holds, fetched_at);
            BatchDone {
                conn: Some(conn),
                due_in,
                released_from,
            }
        }
        Err(e) => not_confirmed(&ctx, conn, batch_id, &outcomes, published.stragglers, &e).await,
    }
}

/// The batch confirmed with messages still held: reported, and their late reports awaited.
fn hold_stragglers(
    ctx: &Arc<Ctx>,
    rows: Vec<Reserved>,
    stragglers: Vec<Straggler>,
    holds: Holds,
    fetched_at: Instant,
) {
    if stragglers.is_empty() {
        return;
    }
    let mut topics: Vec<&str> = (stragglers.iter())
        .map(|s| rows[s.idx].topic.as_str())
        .collect();
    topics.sort_unstable();
    topics.dedup();
    topics.truncate(10);
    ctx.report.held(stragglers.len(), &topics);
    ctx.spawn_late(
        "late report",
        confirm_late(ctx.clone(), rows, stragglers, holds, fetched_at),
    );
}

/// The batch could not confirm (an early write or the confirm failed): its transaction is
/// rolled back (or its session dropped), and its fence removed once its held messages settled.
async fn not_confirmed(
    ctx: &Arc<Ctx>,
    conn: BatchConn,
    batch_id: Uuid,
    outcomes: &[Outcome],
    stragglers: Vec<Straggler>,
    e: &crate::Error,
) -> BatchDone {
    let delivered = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Delivered { .. }))
        .count();
    ctx.report.confirm_failed(e, delivered);
    // Not after a timeout: the session may be stuck; dropping it (the timeout sent the server a
    // cancel request for the statement) ends the transaction.
    if e.is_timeout() || !conn.rollback(&ctx.pg, &ctx.timing, &ctx.stop).await {
        free_by_the_lease(ctx);
    }
    ctx.spawn_late(
        "fence removal",
        unfence_when_settled(ctx.clone(), batch_id, stragglers),
    );
    BatchDone::failed()
}

/// The batch's fence could not be inserted: nothing of it was sent; its transaction is rolled
/// back.
async fn not_fenced(
    ctx: &Arc<Ctx>,
    conn: BatchConn,
    batch_id: Uuid,
    e: &crate::Error,
) -> BatchDone {
    ctx.report.fence_failed(e);
    // A fence whose insert failed may still have committed (it missed its deadline, or the
    // connection was lost before the reply): nothing was sent, so it is removed at once rather
    // than left to hold its aggregates back until it expires (found by breaker helpers: 33 s
    // with the defaults, after a timeout and after a server crash).
    ctx.spawn_late(
        "fence removal",
        unfence_when_settled(ctx.clone(), batch_id, Vec::new()),
    );
    // A rollback that fails or misses its deadline leaves the session to end with the
    // dropped connection (at the latest after the lease).
    if !conn.rollback(&ctx.pg, &ctx.timing, &ctx.stop).await {
        free_by_the_lease(ctx);
    }
    BatchDone::failed()
}

/// Messages of the pipelining producer still unreported `publish_timeout` after the batch's
/// cutoff — when librdkafka would have timed out the main producer's at the latest, and at least
/// a second before their holds and the batch's fence end — are purged with that producer (see
/// `Producers::purge_pipe`), which never times out a message itself (`Producers::pipe`): no other
/// relay may take their events while a message of theirs can still be written. Watched from
/// before the confirm, whatever becomes of it; each straggler keeps the watch alive until its
/// report comes.
fn watch_pipes(ctx: &Arc<Ctx>, stragglers: &mut [Straggler], cutoff: Instant) {
    let mut generations: Vec<u64> = stragglers.iter().filter_map(|s| s.pipe).collect();
    if generations.is_empty() {
        return;
    }
    generations.sort_unstable();
    generations.dedup();
    let alive = Arc::new(());
    for s in stragglers.iter_mut().filter(|s| s.pipe.is_some()) {
        s.watch = Some(alive.clone());
    }
    let alive = Arc::downgrade(&alive);
    let at = cutoff + ctx.settings.publish_timeout;
    let task_ctx = ctx.clone();
    ctx.spawn_late("pipelining watch", async move {
        // At stop, `shut_down` flushes every producer until the stop's deadline and then purges
        // them: when that comes first, there is nothing to watch. But the flush may outlast the
        // holds, and the pipelining producer retries without end: a message of a partition whose
        // leader was recovering was written after another relay had published the events again
        // and newer ones of their aggregates (found by a breaker helper: 13 order violations in
        // chaos runs, each from a relay stopped while waiting for Kafka). So it is purged at `at`
        // all the same.
        let stop_deadline = async { task_ctx.stop.requested().await.deadline };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            deadline = stop_deadline => {
                if deadline <= at {
                    return;
                }
                tokio::time::sleep_until(at).await;
            }
        }
        if alive.strong_count() > 0 {
            for g in generations {
                if task_ctx.producers.purge_pipe(g) {
                    task_ctx.report.pipelining_purged();
                }
            }
        }
    });
}

/// Nothing of an unconfirmed batch is in flight any more once its held messages have settled:
/// then its fence can go, so that the events are retried without waiting for it to expire.
/// Either way the relay wakes when the aggregates are free: at the removal, or once the fence
/// has expired (it was committed before now, for `fence` at most).
async fn unfence_when_settled(ctx: Arc<Ctx>, batch_id: Uuid, stragglers: Vec<Straggler>) {
    let expired = Instant::now() + ctx.timing.fence;
    let settle_by = Instant::now() + ctx.timing.hold;
    // Each keeps its watch (see `watch_pipes`) until its report comes.
    let pending: FuturesUnordered<_> = stragglers
        .into_iter()
        .map(|s| async move {
            let Straggler { future, watch, .. } = s;
            let report = future.await;
            drop(watch);
            report
        })
        .collect();
    if tokio::time::timeout_at(settle_by, pending.count())
        .await
        .is_err()
    {
        ctx.due.at(expired);
        return;
    }
    match ctx.fences.remove(&[batch_id]).await {
        // Its aggregates are free: nothing else wakes the relay for them.
        Ok(()) => ctx.due.at(Instant::now()),
        // Removed when the relay opens its next batch session (after a server crash, every
        // session is new), or it expires (found by a breaker helper: this removal failed during
        // the crash, and the aggregates waited 30 s).
        Err(e) => {
            ctx.fences.settled(batch_id);
            tracing::warn!(error = %e, "outbox relay: a failed batch's fence could not be removed; its aggregates wait until the next batch session removes it, or until it expires");
            ctx.due.at(expired);
        }
    }
}

/// A batch that did not confirm and could not be rolled back (a missed deadline, a failed
/// rollback): its rows are pending again only when the server ends the dropped session, at the
/// latest `lease` after its last statement (Postgres' `idle_in_transaction_session_timeout`).
/// The pipeline's scan after its pause may find them still locked, and nothing else would wake
/// it for them but the fallback poll. (After a rollback they are free at once, for that scan.)
fn free_by_the_lease(ctx: &Ctx) {
    let now = Instant::now();
    ctx.due.at(now + ctx.timing.round_trip);
    ctx.due.at(now + ctx.timing.lease);
}
