//! Every duration the relay derives from its settings, computed once, and the stop window.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::pg::Pg;

use super::shared::Session;

/// Safety margin added to the lease check, to holds of unreported messages and to batch fences:
/// it covers the round trip that records the hold or fence and clock skew between the relay and
/// Postgres.
pub(crate) const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// How long a stopping relay flushes the producer after purging it.
pub(crate) const PURGE_FLUSH: Duration = Duration::from_millis(100);

/// How long a stopping relay waits, after the purge, for held messages' last reports and for
/// recording them (late confirms end this long after the stop deadline).
pub(crate) const LATE_GRACE: Duration = Duration::from_millis(500);

/// The round trips that still follow the late grace: the late confirms' last writes and the end
/// of the maintenance tasks.
const FINAL_WRITES: Duration = Duration::from_millis(900);

/// How far past its stop deadline a relay may still be finishing: the purge's flush, the late
/// grace and the final writes. [`Outbox::stop`](crate::Outbox::stop) waits this long beyond its
/// timeout before it reports `StopTimeout`.
pub(crate) const STOP_OVERRUN: Duration = PURGE_FLUSH
    .saturating_add(LATE_GRACE)
    .saturating_add(FINAL_WRITES);

/// The durations of a relay, derived once from [`Settings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// Longest life of a batch transaction (Postgres `idle_in_transaction_session_timeout`).
    pub(crate) lease: Duration,
    /// How long after its reservation a batch stops sending and confirms what was reported.
    pub(crate) batch_timeout: Duration,
    /// How long a sent but unreported message is held (no relay sends it again): its final
    /// report comes within `publish_timeout`, plus [`LEASE_MARGIN`].
    pub(crate) hold: Duration,
    /// How long a batch's fence keeps other relays off its aggregates: the batch sends during
    /// `batch_timeout`, the last report comes `publish_timeout` later, plus [`LEASE_MARGIN`].
    pub(crate) fence: Duration,
    /// Fallback poll period.
    pub(crate) poll_interval: Duration,
    /// Stop timeout when the token is cancelled without [`Outbox::stop`](crate::Outbox::stop).
    pub(crate) shutdown_timeout: Duration,
    /// Deadline of one round trip of the pipeline (connect, reserve, fence, confirm + commit,
    /// rollback, late confirm, the wake sessions' statements): the `postgres_timeout` setting.
    /// A connection that misses it is dropped, never reused.
    pub(crate) round_trip: Duration,
}

impl Timing {
    pub(crate) fn new(s: &Settings) -> Self {
        Timing {
            lease: s.lease,
            batch_timeout: s.batch_timeout,
            hold: s.publish_timeout + LEASE_MARGIN,
            fence: s.batch_timeout + s.publish_timeout + LEASE_MARGIN,
            poll_interval: s.poll_interval,
            shutdown_timeout: s.shutdown_timeout,
            round_trip: s.postgres_timeout,
        }
    }
}

/// Runs one round trip of the pipeline with its deadline: `after`, cut short [`LATE_GRACE`]
/// after the stop's deadline once a stop is requested, so that a silent Postgres cannot hold a
/// stopping relay. A miss is [`Error::Timeout`](crate::Error::Timeout) naming `what`; the caller
/// drops the connection.
///
/// # Errors
/// [`Error::Postgres`](crate::Error::Postgres) from `op`, or the timeout.
pub(crate) async fn round_trip<T, E: Into<crate::Error>>(
    stop: &Stop,
    what: &'static str,
    after: Duration,
    op: impl Future<Output = Result<T, E>>,
) -> crate::Result<T> {
    let stop_cut = async {
        let window = stop.requested().await;
        tokio::time::sleep_until(window.deadline + LATE_GRACE).await;
    };
    tokio::select! {
        r = op => r.map_err(Into::into),
        _ = tokio::time::sleep(after) => Err(crate::Error::Timeout { what, after }),
        _ = stop_cut => Err(crate::Error::Timeout { what, after }),
    }
}

/// [`round_trip`] on a batch session (one task's: shared sessions use `Shared::round_trip`):
/// when it misses its deadline (or is cut by a stop), the server is asked to cancel the
/// statement (see [`Pg::cancel`]), since the caller then drops the session.
///
/// # Errors
/// As [`round_trip`].
pub(crate) async fn round_trip_on<T, E: Into<crate::Error>>(
    pg: &Pg,
    session: &impl Session,
    stop: &Stop,
    what: &'static str,
    after: Duration,
    op: impl Future<Output = Result<T, E>>,
) -> crate::Result<T> {
    let r = round_trip(stop, what, after, op).await;
    if r.as_ref().is_err_and(crate::Error::is_timeout) {
        pg.cancel(session.client(), session.server(), what);
    }
    r
}

/// The `n`-th pause of a streak (1 for the first): `first`, doubling, at most `max`.
pub(crate) fn doubling(first: Duration, n: u32, max: Duration) -> Duration {
    first
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(max)
}

/// A duration as whole milliseconds for a SQL `int8` parameter.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When a stop was requested and by when the relay should be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StopWindow {
    pub(crate) requested_at: Instant,
    pub(crate) deadline: Instant,
}

impl StopWindow {
    /// In-flight sends give up halfway to the deadline; the rest is for confirming and flushing.
    pub(crate) fn sends_end(&self) -> Instant {
        self.requested_at + (self.deadline - self.requested_at) / 2
    }
}

/// The relay's stop: the cancellation token and the stop window, set once by whoever stops
/// first ([`Outbox::stop`](crate::Outbox::stop) with its timeout, or a cancelled token with the
/// `shutdown_timeout` setting).
#[derive(Debug)]
pub(crate) struct Stop {
    token: CancellationToken,
    window: OnceLock<StopWindow>,
    default_timeout: Duration,
}

impl Stop {
    pub(crate) fn new(token: CancellationToken, default_timeout: Duration) -> Self {
        Stop {
            token,
            window: OnceLock::new(),
            default_timeout,
        }
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Requests the stop with `timeout` (unless a stop was already requested) and returns its
    /// window.
    pub(crate) fn request(&self, timeout: Duration) -> StopWindow {
        let window = self.window_or(timeout);
        self.token.cancel();
        window
    }

    /// Completes with the stop window once the stop was requested.
    pub(crate) async fn requested(&self) -> StopWindow {
        self.token.cancelled().await;
        self.window_or(self.default_timeout)
    }

    /// The stop window when a stop was requested.
    pub(crate) fn window(&self) -> Option<StopWindow> {
        self.token
            .is_cancelled()
            .then(|| self.window_or(self.default_timeout))
    }

    fn window_or(&self, timeout: Duration) -> StopWindow {
        *self.window.get_or_init(|| {
            let now = Instant::now();
            StopWindow {
                requested_at: now,
                deadline: now + timeout,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_stop_request_sets_the_window() {
        let stop = Stop::new(CancellationToken::new(), Duration::from_secs(10));
        assert!(stop.window().is_none());
        let w = stop.request(Duration::from_secs(2));
        assert_eq!(w.deadline - w.requested_at, Duration::from_secs(2));
        assert_eq!(w.sends_end() - w.requested_at, Duration::from_secs(1));
        assert_eq!(stop.request(Duration::from_secs(60)), w);
        assert_eq!(stop.requested().await, w);
    }

    #[tokio::test]
    async fn a_cancelled_token_stops_with_the_default_timeout() {
        let token = CancellationToken::new();
        let stop = Stop::new(token.clone(), Duration::from_secs(3));
        token.cancel();
        let w = stop.window().expect("stopping");
        assert_eq!(w.deadline - w.requested_at, Duration::from_secs(3));
    }
}
