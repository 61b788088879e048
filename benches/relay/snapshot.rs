//! The relay while another session holds a repeatable-read snapshot (the xmin horizon stays
//! behind every row version the relay creates, so none can be pruned or vacuumed).

use anyhow::Result;
use outbox::OnDelivery;

use crate::drain::{drain_with, Drain, DrainSpec};
use crate::env::Env;
use crate::latency::{latency_with, Latency};

#[derive(Debug, Clone)]
pub(crate) struct HeldSnapshot {
    /// The backlog drained while the snapshot (taken after loading) is held.
    pub(crate) drain: Drain,
    /// Commit → ack at 1k/s (4 writers) with the snapshot held for the whole window.
    pub(crate) latency: Latency,
}

pub(crate) async fn held_snapshot(env: &Env) -> Result<HeldSnapshot> {
    let mut spec = DrainSpec::new(env, "snapdrain", env.opts.n, OnDelivery::MarkDone);
    spec.hold_snapshot = true;
    let drain = drain_with(env, &spec).await?;
    let latency = latency_with(env, "snaplat", 1_000.0, 4, env.opts.snapshot_secs, true).await?;
    Ok(HeldSnapshot { drain, latency })
}
