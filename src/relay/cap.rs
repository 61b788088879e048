//! The candidates' cap: how many candidates a reservation may take after one missed its
//! deadline. The reservation reads and prints its candidates before the byte budget cuts them,
//! and some rows cost far more to print than they take to store: a `jsonb` number like
//! `1e131071` is 8 bytes stored and 131 KB printed, and 2,000 rows of them made every
//! reservation of the first 2,000 candidates miss its deadline, forever — nothing was delivered
//! (found by a breaker helper). With the limit narrowed, those rows are reserved a few at a time
//! (each then published or dead-lettered on its own merits) and the rows behind them follow.

use std::time::Duration;

use tokio::time::Instant;

use super::report::TableLabel;

/// How long the size of a reservation that missed its deadline bounds the cap (see
/// [`CandidatesCap::after`]).
pub(crate) const MISSED_REMEMBERED: Duration = Duration::from_secs(60);

/// The cap and the last size that missed its deadline.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CandidatesCap {
    /// The candidates' limit (`None`: the batch's own).
    pub(crate) cap: Option<usize>,
    /// The limit of the last reservation that missed its deadline, and when.
    missed: Option<(usize, Instant)>,
}

impl CandidatesCap {
    /// No cap: reservations take `batch_size` candidates (the gauge
    /// `outbox_reservation_candidates_limit` says so from the start).
    pub(crate) fn new(batch_size: usize, table: &TableLabel) -> CandidatesCap {
        let cap = CandidatesCap::default();
        cap.set_gauge(batch_size, table);
        cap
    }

    /// [`next`](Self::next); whether the cap changed (set the gauge then: see
    /// [`set_gauge`](Self::set_gauge)).
    pub(crate) fn after<T>(
        &mut self,
        reserved: &crate::Result<T>,
        limit: usize,
        batch_size: usize,
        took: (Duration, Duration),
        now: Instant,
    ) -> bool {
        let before = self.cap;
        self.next(reserved, limit, batch_size, took, now);
        self.cap != before
    }

    /// The gauge `outbox_reservation_candidates_limit`: the cap, or `batch_size` without one.
    pub(crate) fn set_gauge(&self, batch_size: usize, table: &TableLabel) {
        metrics::gauge!("outbox_reservation_candidates_limit", "table" => table.get())
            .set(self.cap.unwrap_or(batch_size) as f64);
    }

    /// After a reservation of `limit` candidates that took `took` of its `deadline`, at `now`:
    /// - one that missed its deadline (logged): 1;
    /// - any other failure (the connect's, the server's error: they say nothing of the rows'
    ///   cost): unchanged;
    /// - one that answered: doubled (none once that reaches `batch_size`), unless doubling
    ///   would reach the size that missed its deadline within [`MISSED_REMEMBERED`], or it took
    ///   over half its deadline (twice the candidates would likely miss it): then unchanged.
    ///
    /// Doubling whatever the time took the cap back to the size that had missed, over and over
    /// (a breaker helper's expensive rows: 29 missed deadlines in one drain); holding whenever a
    /// reservation took over a quarter of the deadline kept it low for good after one latency
    /// spike (batches of 27 rows where 170 had answered in time before, found by a breaker
    /// helper). Now it stays below the size that missed for a minute, and a stall only holds it.
    fn next<T>(
        &mut self,
        reserved: &crate::Result<T>,
        limit: usize,
        batch_size: usize,
        (took, deadline): (Duration, Duration),
        now: Instant,
    ) {
        match (reserved, self.cap) {
            (
                Err(crate::Error::Timeout {
                    what: "reserve", ..
                }),
                _,
            ) => {
                tracing::warn!(
                    candidates = limit,
                    "outbox relay: a reservation missed its deadline; the next ones take one \
                     candidate, doubling after each that answers within half of it, below this \
                     size for a minute"
                );
                self.cap = Some(1);
                // A reservation of one candidate that missed says nothing of a size: any
                // stall longer than two deadlines makes one, and remembered, it held the cap
                // at 1 for a minute (a breaker helper: 20,000 rows at ~1 per batch, 58.8 s).
                if limit > 1 {
                    self.missed = Some((limit, now));
                }
            }
            (Err(_), _) | (Ok(_), None) => {}
            (Ok(_), Some(cap)) => {
                let doubled = cap.saturating_mul(2);
                let missed = self
                    .missed
                    .filter(|&(_, at)| now.saturating_duration_since(at) < MISSED_REMEMBERED)
                    .map(|(size, _)| size);
                if missed.is_some_and(|m| doubled.min(batch_size) >= m)
                    || took.saturating_mul(2) > deadline
                {
                    return;
                }
                self.cap = (doubled < batch_size).then_some(doubled);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CandidatesCap, MISSED_REMEMBERED};
    use std::time::Duration;
    use tokio::time::Instant;

    fn timed_out() -> crate::Result<()> {
        Err(crate::Error::Timeout {
            what: "reserve",
            after: Duration::from_secs(10),
        })
    }

    const DEADLINE: Duration = Duration::from_secs(10);
    const QUICK: (Duration, Duration) = (Duration::from_millis(50), DEADLINE);

    #[test]
    fn the_cap_drops_to_one_after_a_missed_deadline_and_doubles_back() {
        let now = Instant::now();
        let connect: crate::Result<()> = Err(crate::Error::Timeout {
            what: "connect",
            after: DEADLINE,
        });
        let mut c = CandidatesCap::default();
        c.after(&connect, 2000, 2000, QUICK, now);
        assert_eq!(c.cap, None, "a connect's timeout says nothing of the rows");
        c.after(&timed_out(), 2000, 2000, QUICK, now);
        assert_eq!(c.cap, Some(1));
        c.after(&connect, 1, 2000, QUICK, now);
        assert_eq!(c.cap, Some(1));
        // Long after the missed deadline: 1, 2, 4, …, 1024, then the batch's own.
        let later = now + MISSED_REMEMBERED;
        let mut steps = 0;
        while let Some(limit) = c.cap {
            c.after(&Ok(()), limit, 2000, QUICK, later);
            steps += 1;
        }
        assert_eq!(steps, 11);
        c.after(&Ok(()), 2000, 2000, QUICK, later);
        assert_eq!(c.cap, None);
    }

    #[test]
    fn the_cap_stays_below_the_size_that_missed_for_a_minute_then_recovers() {
        let now = Instant::now();
        let mut c = CandidatesCap::default();
        c.after(&timed_out(), 512, 2000, QUICK, now);
        for _ in 0..20 {
            let limit = c.cap.unwrap();
            c.after(&Ok(()), limit, 2000, QUICK, now + Duration::from_secs(30));
        }
        assert_eq!(
            c.cap,
            Some(256),
            "below the size that missed, however quick"
        );
        let later = now + MISSED_REMEMBERED;
        c.after(&Ok(()), 256, 2000, QUICK, later);
        assert_eq!(c.cap, Some(512), "a minute later it doubles again");
        c.after(&Ok(()), 512, 2000, QUICK, later);
        c.after(&Ok(()), 1024, 2000, QUICK, later);
        assert_eq!(c.cap, None, "back to the batch's own");
    }

    #[test]
    fn a_reservation_of_one_candidate_that_missed_does_not_pin_the_cap() {
        let now = Instant::now();
        let mut c = CandidatesCap::default();
        c.after(&timed_out(), 2000, 2000, QUICK, now);
        c.after(&timed_out(), 1, 2000, QUICK, now);
        for _ in 0..20 {
            let limit = c.cap.unwrap();
            c.after(&Ok(()), limit, 2000, QUICK, now);
        }
        assert_eq!(
            c.cap,
            Some(1024),
            "below the 2,000 that missed, not held at 1"
        );
    }

    #[test]
    fn the_cap_holds_while_reservations_take_over_half_the_deadline() {
        let now = Instant::now() + MISSED_REMEMBERED;
        let mut c = CandidatesCap::default();
        c.after(&timed_out(), 2000, 2000, QUICK, Instant::now());
        // Rows that cost ~40 µs each to print: 128 answer in 5.1 s, 256 would take 10.2 s.
        for _ in 0..20 {
            let limit = c.cap.unwrap();
            let took = Duration::from_micros(40_000 * limit as u64);
            c.after(&Ok(()), limit, 2000, (took, DEADLINE), now);
        }
        assert_eq!(c.cap, Some(128));
        c.after(&Ok(()), 128, 2000, (Duration::from_secs(5), DEADLINE), now);
        assert_eq!(c.cap, Some(256), "within half of the deadline it doubles");
    }
}
