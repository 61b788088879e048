//! Drains whose keys are skewed: 1, 10, 1,000 and 10,000 aggregates and a Zipf(1.1) mix, each
//! as a ratio to a uniform drain of the same run, made just before them (an aggregate's
//! consecutive events go back to back, at most `max_in_flight_per_aggregate` unacknowledged).
//! In `--key-rounds` rounds (3 in full mode), each with its own uniform drain; a ratio's verdict
//! is its median over the rounds.

use anyhow::Result;
use outbox::OnDelivery;

use crate::drain::{drain_with, Drain, DrainSpec};
use crate::env::Env;
use crate::events::Keys;
use crate::say;

/// One skewed backlog, drained once per round.
#[derive(Debug, Clone)]
pub(crate) struct KeyDrain {
    pub(crate) keys: String,
    /// Target ratio to the uniform drain, where the performance issue sets one.
    pub(crate) target: Option<f64>,
    /// The drain of each round, in round order.
    pub(crate) drains: Vec<Result<Drain, String>>,
    /// Each round's rate / that round's uniform drain (rounds whose drain failed left out).
    pub(crate) ratios: Vec<f64>,
}

impl KeyDrain {
    /// The median ratio over the rounds (the lower middle one of an even count), if any
    /// round succeeded.
    pub(crate) fn median(&self) -> Option<f64> {
        let mut r = self.ratios.clone();
        r.sort_by(f64::total_cmp);
        r.get((r.len().max(1) - 1) / 2).copied()
    }

    /// The last round's drain that succeeded.
    pub(crate) fn last(&self) -> Option<&Drain> {
        self.drains.iter().rev().find_map(|d| d.as_ref().ok())
    }

    /// The first error, when no round succeeded.
    pub(crate) fn error(&self) -> Option<&str> {
        self.drains
            .iter()
            .find_map(|d| d.as_ref().err().map(String::as_str))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct KeySpread {
    /// Each round's uniform drain, which that round's ratios refer to.
    pub(crate) uniform: Vec<Drain>,
    /// The `drain` phase's rate, when it ran (earlier in the run, on a server with fewer
    /// tables and less of autovacuum's work behind it).
    pub(crate) drain_phase: Option<f64>,
    pub(crate) runs: Vec<KeyDrain>,
}

/// Runs the skewed drains. The one-aggregate backlog is 1/4 of `--n` (50,000 in full mode)
/// and ten aggregates' 1/2; with `--per-aggregate 1` (one event per produce round trip) 1/40 and
/// 1/8. The others drain the full backlog.
///
/// The uniform reference is drained here, at the start of each round, rather than taken from
/// the `drain` phase: in a full run a dozen phases come between, and the same drains ran
/// 15–30 % slower there than in runs of the skewed drains alone (BENCHMARKS.md, "What bounds
/// the misses"), so a ratio to the early drain measured the server's state as much as the
/// keys. One round is not enough either: the fourth drain of a round is the reference's own
/// backlog (10,000 aggregates, uniform), and its ratio ranged 0.80–1.15 over nine rounds.
pub(crate) async fn key_spread(env: &Env, drain_phase: Option<&Drain>) -> Result<KeySpread> {
    let n = env.opts.n;
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
    let mut runs: Vec<KeyDrain> = plan
        .iter()
        .map(|(keys, _, target, _)| KeyDrain {
            keys: keys.describe(),
            target: *target,
            drains: Vec::new(),
            ratios: Vec::new(),
        })
        .collect();
    let rounds = env.opts.key_rounds;
    let mut uniforms = Vec::new();
    for round in 1..=rounds {
        say!("keys: round {round} of {rounds}: uniform reference drain, {n} events");
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
        for ((keys, events, _, phase), run) in plan.iter().zip(runs.iter_mut()) {
            say!("keys: {} events over {}", events, keys.describe());
            let mut spec = DrainSpec::new(env, phase, *events, OnDelivery::MarkDone);
            spec.keys = keys.clone();
            let drain = drain_with(env, &spec).await.map_err(|e| format!("{e:#}"));
            if let Ok(d) = &drain {
                let ratio = d.rate / uniform.rate;
                say!(
                    "  keys over {}: {:.0}/s = {:.2} × uniform",
                    keys.describe(),
                    d.rate,
                    ratio
                );
                run.ratios.push(ratio);
            }
            run.drains.push(drain);
        }
        uniforms.push(uniform);
    }
    for run in &runs {
        if let Some(m) = run.median() {
            say!(
                "keys over {}: median {m:.2} × uniform over {} rounds",
                run.keys,
                run.ratios.len()
            );
        }
    }
    Ok(KeySpread {
        uniform: uniforms,
        drain_phase: drain_phase.map(|d| d.rate),
        runs,
    })
}
