//! RSS over a long drain (1M events by default) with the Prometheus recorder installed the way
//! `outbox-relay --metrics-addr` installs it, and nobody scraping `/metrics`.

use anyhow::{Context as _, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the global recorder with the binary's buckets (src/bin/outbox-relay.rs,
/// `serve_metrics`); the handle is never rendered. Once per process: every later relay in this
/// process records into it, hence this phase runs last.
pub(crate) fn install_prometheus() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("outbox_commit_to_ack_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the Prometheus recorder")
}
