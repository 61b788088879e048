//! Maintenance, beside the pipeline: the retention cleanup, the backlog gauges and the expiry of
//! batch fences, each a supervised task with its own period.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::OnDelivery;
use crate::pg::bounded;

use super::Ctx;

/// Period of the backlog gauges (`outbox_backlog_events`, …).
const GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// Period of the expiry of fences left by batches that never confirmed.
const FENCE_EXPIRY_INTERVAL: Duration = Duration::from_secs(10);

/// Period of the check that the table's statistics still describe it (see
/// [`refresh_statistics`]).
const STATISTICS_INTERVAL: Duration = Duration::from_secs(2);

/// The table must have grown by at least this many pages (1 MiB of 8 kB pages) besides
/// doubling since Postgres last measured it before the relay analyzes it.
const STATISTICS_GROWTH_PAGES: i64 = 128;

/// Or its committed rows by at least this many, besides doubling.
const STATISTICS_GROWTH_ROWS: i64 = 10_000;

/// Deadline of the relay's `ANALYZE` (also its `statement_timeout`): a sample of a large table
/// can take longer than a Postgres round trip.
const ANALYZE_DEADLINE: Duration = Duration::from_secs(60);

/// The first pause after an `ANALYZE` that failed or was skipped; it doubles up to
/// [`ANALYZE_MAX_PAUSE`] while they keep failing.
const ANALYZE_FIRST_PAUSE: Duration = Duration::from_secs(30);

/// See [`ANALYZE_FIRST_PAUSE`].
const ANALYZE_MAX_PAUSE: Duration = Duration::from_secs(600);

/// The statistics check's state, kept between its runs.
#[derive(Default)]
struct Statistics {
    /// Its session (dropped after a failed or late round trip).
    client: Option<tokio_postgres::Client>,
    /// No `ANALYZE` before this (after one that failed or was skipped).
    pause_until: Option<tokio::time::Instant>,
    /// The current pause (zero: no failure since the last `ANALYZE` that worked).
    pause: Duration,
}

/// Logged once per process: the table grew, and the relay's role cannot analyze it.
static CANNOT_ANALYZE_LOGGED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Starts the maintenance tasks on `tracker`; they end when the relay stops.
pub(crate) fn spawn(tracker: &TaskTracker, ctx: &Arc<Ctx>) {
    let token = ctx.stop.token().clone();
    let c = ctx.clone();
    let session = Arc::new(tokio::sync::Mutex::new(Statistics::default()));
    supervise(
        tracker,
        &token,
        "statistics",
        STATISTICS_INTERVAL,
        move || {
            let c = c.clone();
            let session = session.clone();
            async move {
                // An optimization: while Postgres is away the pipeline's own errors say so,
                // and a warning every 2 s would only repeat them.
                if let Err(e) = refresh_statistics(&c, &session).await {
                    tracing::debug!(error = %e, "outbox relay: table statistics not checked");
                }
                Ok(())
            }
        },
    );
    let c = ctx.clone();
    supervise(tracker, &token, "gauges", GAUGE_INTERVAL, move || {
        let c = c.clone();
        async move {
            // Stale gauges hide a backlog: a failure is a warning.
            if let Err(e) = bounded("gauges", c.pg.timeout, update_gauges(&c)).await {
                tracing::warn!(error = %e, "outbox relay: backlog gauges not updated");
            }
            Ok(())
        }
    });
    let c = ctx.clone();
    supervise(
        tracker,
        &token,
        "fence expiry",
        FENCE_EXPIRY_INTERVAL,
        move || {
            let c = c.clone();
            async move { bounded("fence expiry", c.pg.timeout, expire_fences(&c)).await }
        },
    );
    if ctx.settings.on_delivery == OnDelivery::MarkDone {
        let c = ctx.clone();
        supervise(
            tracker,
            &token,
            "retention cleanup",
            ctx.settings.cleanup_interval,
            move || {
                let c = c.clone();
                async move { cleanup(&c).await }
            },
        );
    }
}

/// Runs `job` every `period` (the first run at once) until `token` is cancelled, one run at a
/// time. Each run is a task of its own: a failure or a panic is logged and the next period runs
/// the job again.
fn supervise<F, Fut>(
    tracker: &TaskTracker,
    token: &CancellationToken,
    name: &'static str,
    period: Duration,
    job: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = crate::Result<()>> + Send + 'static,
{
    let token = token.clone();
    tracker.spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // A stop ends a run in progress (its connection is dropped) rather than waiting
            // for its Postgres deadline.
            let mut run = tokio::spawn(job());
            let done = tokio::select! {
                _ = token.cancelled() => {
                    run.abort();
                    return;
                }
                r = &mut run => r,
            };
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(task = name, error = %e, "outbox relay: maintenance task failed; it runs again at its next period")
                }
                Err(e) => {
                    tracing::error!(task = name, error = %e, "outbox relay: maintenance task panicked; it runs again at its next period")
                }
            }
        }
    });
}

/// Sets the backlog gauges from the status query, the legacy-reservation gauge (with an error
/// log while another relay holds rows) and the age of the oldest transaction.
async fn update_gauges(ctx: &Ctx) -> crate::Result<()> {
    let client = ctx.pg.connect("metrics").await?;
    let rows = client.query(&ctx.sql.status, &[]).await?;
    let (mut pending, mut retrying, mut dead, mut oldest) = (0i64, 0i64, 0i64, 0f64);
    for r in &rows {
        pending += r.get::<_, i64>(1);
        retrying += r.get::<_, i64>(2);
        dead += r.get::<_, i64>(3);
        oldest = oldest.max(r.get::<_, Option<f64>>(4).unwrap_or(0.0));
    }
    let table = ctx.report.table();
    metrics::gauge!("outbox_backlog_events", "table" => table.clone()).set(pending as f64);
    metrics::gauge!("outbox_retrying_events", "table" => table.clone()).set(retrying as f64);
    metrics::gauge!("outbox_dead_letter_events", "table" => table.clone()).set(dead as f64);
    metrics::gauge!("outbox_oldest_pending_age_seconds", "table" => table.clone()).set(oldest);
    let legacy: i64 = client.query_one(&ctx.sql.status_relays, &[]).await?.get(1);
    metrics::gauge!("outbox_legacy_reservations", "table" => table.clone()).set(legacy as f64);
    if legacy > 0 {
        tracing::error!(
            table = %ctx.settings.table,
            legacy_reservations = legacy,
            "outbox relay: rows reserved by another relay within its lease (reserved_to in the future): the original Go relay is probably still running against this table; stop it — it publishes dead letters and ignores the order per aggregate"
        );
    }
    // The transaction holding back cleanup of dead rows (named in `status` and `/health`).
    let xact_age = match client.query_opt(&ctx.sql.oldest_transaction, &[]).await? {
        Some(r) => r.get::<_, Option<f64>>(3).unwrap_or(0.0),
        None => 0.0,
    };
    metrics::gauge!("outbox_oldest_transaction_age_seconds", "table" => table).set(xact_age);
    Ok(())
}

/// Analyzes the table when it has at least doubled (and grown by
/// [`STATISTICS_GROWTH_PAGES`]) since Postgres last measured it (`pg_class.relpages`, set by
/// `ANALYZE` and `VACUUM`), or its committed rows have (by [`STATISTICS_GROWTH_ROWS`]; the
/// statistics system's live rows against `pg_class.reltuples`). The second catches a burst
/// committed in one transaction: the pages grow while it runs, and an `ANALYZE` then counts
/// none of its rows (Postgres does not count another transaction's uncommitted inserts), so
/// the table was planned as thousands of empty pages — and the pages did not double again after
/// the commit (measured: a 200k-event burst drained at 16k events/s instead of 40k; BENCHMARKS.md).
/// A table that fills from empty, or a burst many times its usual size,
/// is otherwise planned with statistics of the small table until autovacuum's next pass (up to
/// `autovacuum_naptime`, a minute by default, after its thresholds are crossed). Measured
/// (BENCHMARKS.md, "Statistics of a table that fills from empty"): with 32 writers starting on a
/// fresh table the relay fell seconds behind for its first 10 s (per-second p50 up to 6 s) and
/// caught up once the table was analyzed. Doubling keeps the analyzes logarithmic in the
/// table's growth; `SKIP_LOCKED` leaves the table to an analyze or vacuum already running. A
/// role that does not own the table cannot analyze it: logged once, at info.
///
/// One session, kept between runs (dropped after a failed or late round trip); the check is
/// bounded by the Postgres timeout, the `ANALYZE` by [`ANALYZE_DEADLINE`]. An `ANALYZE` that
/// fails, misses its deadline or is skipped (`SKIP_LOCKED`: another `ANALYZE`, a `VACUUM` or
/// `CREATE INDEX CONCURRENTLY` holds the table; Postgres then only warns, and `relpages` stays)
/// is tried again after a pause that doubles from [`ANALYZE_FIRST_PAUSE`] to
/// [`ANALYZE_MAX_PAUSE`]; the first of a streak is a warning with the reason.
async fn refresh_statistics(
    ctx: &Ctx,
    state: &tokio::sync::Mutex<Statistics>,
) -> crate::Result<()> {
    let mut state = state.lock().await;
    if state
        .pause_until
        .is_some_and(|t| tokio::time::Instant::now() < t)
    {
        return Ok(());
    }
    let client = match state.client.take().filter(|c| !c.is_closed()) {
        Some(c) => c,
        None => ctx.pg.connect_bounded("statistics").await?,
    };
    let table = ctx.settings.table.as_str();
    let Some(size) = bounded("statistics", ctx.pg.timeout, async {
        table_size(&client, table).await
    })
    .await?
    else {
        state.client = Some(client);
        return Ok(());
    };
    let (measured, pages, owner) = (size.measured_pages, size.pages, size.owner);
    if !size.outgrew_statistics() {
        state.client = Some(client);
        return Ok(());
    }
    if !owner {
        if !CANNOT_ANALYZE_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(table, measured_pages = measured, pages, "outbox relay: the table grew well past the size its statistics describe, and the relay's role does not own it, so cannot ANALYZE it; reservations may be slow until autovacuum analyzes it (logged once)");
        }
        state.client = Some(client);
        return Ok(());
    }
    let analyze = format!(
        "begin; set local statement_timeout = {}; analyze (skip_locked) {table}; commit",
        ANALYZE_DEADLINE.as_millis()
    );
    let analyzed = bounded("analyze", ANALYZE_DEADLINE + ctx.pg.timeout, async {
        client.batch_execute(&analyze).await?;
        // Skipped (the table was locked) when no analyze was counted.
        Ok(table_size(&client, table)
            .await?
            .is_some_and(|after| after.analyzes > size.analyzes))
    })
    .await;
    let why = match analyzed {
        Ok(true) => {
            tracing::info!(
                table,
                measured_pages = measured,
                pages,
                measured_rows = size.measured_rows,
                rows = size.rows,
                "outbox relay: the table grew well past the size its statistics describe; analyzed it"
            );
            state.client = Some(client);
            state.pause = Duration::ZERO;
            state.pause_until = None;
            return Ok(());
        }
        Ok(false) => {
            state.client = Some(client);
            "skipped: another ANALYZE, a VACUUM or CREATE INDEX CONCURRENTLY holds the table"
                .to_string()
        }
        Err(e) => e.to_string(),
    };
    state.analyze_failed(table, &size, &why);
    Ok(())
}

impl Statistics {
    /// An `ANALYZE` of the grown table (`size`) failed or was skipped (`why`): the next waits a
    /// pause that doubles from [`ANALYZE_FIRST_PAUSE`] to [`ANALYZE_MAX_PAUSE`]; the first of a
    /// streak is a warning.
    fn analyze_failed(&mut self, table: &str, size: &TableSize, why: &str) {
        let first = self.pause.is_zero();
        self.pause = (self.pause * 2).clamp(ANALYZE_FIRST_PAUSE, ANALYZE_MAX_PAUSE);
        self.pause_until = Some(tokio::time::Instant::now() + self.pause);
        let pause = self.pause;
        let (measured, pages) = (size.measured_pages, size.pages);
        if first {
            tracing::warn!(table, measured_pages = measured, pages, reason = %why, ?pause, "outbox relay: the table grew well past the size its statistics describe, and analyzing it did not work; trying again after a pause (further failures at debug)");
        } else {
            tracing::debug!(table, reason = %why, ?pause, "outbox relay: ANALYZE of the grown table did not work again");
        }
    }
}

/// The table's size as its statistics describe it and as it is now.
#[derive(Debug, Clone, Copy)]
struct TableSize {
    /// Pages as Postgres last measured them (`pg_class.relpages`).
    measured_pages: i64,
    /// Pages now.
    pages: i64,
    /// Rows as Postgres last measured them (`pg_class.reltuples`; 0 when never measured).
    measured_rows: i64,
    /// Committed live rows now, as the statistics system counts them (`n_live_tup`; reported
    /// by the writing sessions within about a second of their commits, 0 with `track_counts`
    /// off).
    rows: i64,
    /// `ANALYZE`s of the table so far, manual and automatic.
    analyzes: i64,
    /// Whether the session's role owns the table (may `ANALYZE` it).
    owner: bool,
}

impl TableSize {
    /// Doubled, and grown by [`STATISTICS_GROWTH_PAGES`] or [`STATISTICS_GROWTH_ROWS`], in pages
    /// or in committed rows since Postgres last measured it.
    fn outgrew_statistics(&self) -> bool {
        let outgrew =
            |then: i64, now: i64, by: i64| now >= then.saturating_mul(2) && now >= then + by;
        outgrew(self.measured_pages, self.pages, STATISTICS_GROWTH_PAGES)
            || outgrew(self.measured_rows, self.rows, STATISTICS_GROWTH_ROWS)
    }
}

/// The table's [`TableSize`]; `None` when there is no such table.
async fn table_size(
    client: &tokio_postgres::Client,
    table: &str,
) -> crate::Result<Option<TableSize>> {
    Ok(client
        .query_opt(include_str!("../sql/table_size.sql"), &[&table])
        .await?
        .map(|r| TableSize {
            measured_pages: r.get(0),
            pages: r.get(1),
            measured_rows: r.get(2),
            rows: r.get(3),
            analyzes: r.get(4),
            owner: r.get(5),
        }))
}

/// Deletes the fences of batches that never confirmed (their session was lost) once they ended.
async fn expire_fences(ctx: &Ctx) -> crate::Result<()> {
    let client = ctx.pg.connect("fence-expiry").await?;
    client.execute(&ctx.sql.fence_expire, &[]).await?;
    Ok(())
}

/// Deletes delivered rows older than the retention, in bounded batches; connecting and each
/// batch are bounded by the Postgres timeout.
async fn cleanup(ctx: &Ctx) -> crate::Result<()> {
    let client = ctx.pg.connect_bounded("cleanup").await?;
    let retention_ms = ctx.settings.retention.as_millis() as f64;
    let batch = i64::try_from(ctx.settings.cleanup_batch).unwrap_or(i64::MAX);
    loop {
        if ctx.stop.token().is_cancelled() {
            return Ok(());
        }
        let n = bounded("cleanup", ctx.pg.timeout, async {
            Ok(client
                .execute(&ctx.sql.cleanup, &[&retention_ms, &batch])
                .await?)
        })
        .await?;
        if n > 0 {
            tracing::debug!(deleted = n, "outbox retention cleanup");
        }
        if n < batch as u64 {
            return Ok(());
        }
    }
}
