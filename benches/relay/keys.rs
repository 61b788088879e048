//! Drains whose keys are skewed: 1, 10, 1,000 and 10,000 aggregates and a Zipf(1.1) mix, each
//! as a ratio to a uniform drain of the same run, made just before them (an aggregate's
//! consecutive events go back to back, at most `max_in_flight_per_aggregate` unacknowledged).

use anyhow::Result;
use outbox::OnDelivery;

use crate::drain::{drain_with, Drain, DrainSpec};
use crate::env::Env;
use crate::events::Keys;
use crate::say;

/// One skewed drain.
#[derive(Debug, Clone)]
pub(crate) struct KeyDrain {
    pub(crate) keys: String,
    /// Target ratio to the uniform drain, where the performance issue sets one.
    pub(crate) target: Option<f64>,
    pub(crate) drain: Result<Drain, String>,
}

#[derive(Debug, Clone)]
pub(crate) struct KeySpread {
    /// The uniform drain the ratios refer to, run here just before the skewed ones.
    pub(crate) uniform: Drain,
    /// The `drain` phase's rate, when it ran (earlier in the run, on a server with fewer
    /// tables and less of autovacuum's work behind it).
    pub(crate) drain_phase: Option<f64>,
    pub(crate) runs: Vec<KeyDrain>,
}

/// Runs the skewed drains. The one-aggregate backlog is 1/4 of `--n` (50,000 in full mode)
/// and ten aggregates' 1/2; with `--per-aggregate 1` (one event per produce round trip) 1/40 and
/// 1/8. The others drain the full backlog.
///
/// The uniform reference is drained here, right before them, rather than taken from the `drain`
/// phase: in a full run a dozen phases come between, and the same drains ran 15–30 % slower
/// there than in runs of the skewed drains alone (BENCHMARKS.md, "What bounds the misses"),
/// so a ratio to the early drain measured the server's state as much as the keys.
pub(crate) async fn key_spread(env: &Env, drain_phase: Option<&Drain>) -> Result<KeySpread> {
    let n = env.opts.n;
    say!("keys: uniform reference drain, {n} events");
    let uniform = drain_with(
        env,
        &DrainSpec::new(env, "keysuniform", n, OnDelivery::MarkDone),
    )
    .await?;
    if let Some(d) = drain_phase {
        say!(
            "  uniform now {:.0}/s; the drain phase's {:.0}/s",
            uniform.rate,
            d.rate
        );
    }
    let (one, ten) = match env.opts.per_aggregate {
        Some(1) => (n / 40, n / 8),
        _ => (n / 4, n / 2),
    };
    let plan = [
        (Keys::Uniform(1), one.max(100), Some(0.5), "keys1"),
        (Keys::Uniform(10), ten.max(100), Some(0.8), "keys10"),
        (Keys::Uniform(1_000), n, None, "keys1000"),
        (Keys::Uniform(10_000), n, None, "keys10000"),
        (
            Keys::zipf(env.opts.aggregates, 1.1),
            n,
            Some(0.8),
            "keyszipf",
        ),
    ];
    let mut runs = Vec::new();
    for (keys, events, target, phase) in plan {
        say!("keys: {} events over {}", events, keys.describe());
        let mut spec = DrainSpec::new(env, phase, events, OnDelivery::MarkDone);
        spec.keys = keys.clone();
        let drain = drain_with(env, &spec).await.map_err(|e| format!("{e:#}"));
        if let Ok(d) = &drain {
            say!(
                "  keys over {}: {:.0}/s = {:.2} × uniform",
                keys.describe(),
                d.rate,
                d.rate / uniform.rate
            );
        }
        runs.push(KeyDrain {
            keys: keys.describe(),
            target,
            drain,
        });
    }
    Ok(KeySpread {
        uniform,
        drain_phase: drain_phase.map(|d| d.rate),
        runs,
    })
}
