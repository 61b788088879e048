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

/// Starts the maintenance tasks on `tracker`; they end when the relay stops.
pub(crate) fn spawn(tracker: &TaskTracker, ctx: &Arc<Ctx>) {
    let token = ctx.stop.token().clone();
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
    metrics::gauge!("outbox_backlog_events").set(pending as f64);
    metrics::gauge!("outbox_retrying_events").set(retrying as f64);
    metrics::gauge!("outbox_dead_letter_events").set(dead as f64);
    metrics::gauge!("outbox_oldest_pending_age_seconds").set(oldest);
    let legacy: i64 = client.query_one(&ctx.sql.status_relays, &[]).await?.get(1);
    metrics::gauge!("outbox_legacy_reservations").set(legacy as f64);
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
    metrics::gauge!("outbox_oldest_transaction_age_seconds").set(xact_age);
    Ok(())
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
