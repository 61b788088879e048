//! Where each reservation's scan for candidates starts: where the last one left off, at the
//! first pending row (a full scan), or at the floor below which the last full scan skipped every
//! row; and whether it skips the rows of blocked aggregates (see `reserve.sql`).

use std::time::Duration;

use tokio::time::Instant;

use super::reserve::Scan;
use super::wake::Wake;

/// The longest a reservation scans from where the last one left off before it scans from the
/// first pending row again (see [`ScanStart::next`]): how long a row that turned pending below
/// that start can wait in a backlog.
pub(crate) const FULL_SCAN_EVERY: Duration = Duration::from_millis(500);

/// A full scan this slow (rows behind blocked aggregates to read past) spaces out the next ones
/// (see [`ScanStart::next`]).
const SLOW_FULL_SCAN: Duration = Duration::from_millis(200);

/// A reservation's scan start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start {
    /// The lowest `seq` it looks at (`i64::MIN`: the first pending row).
    pub(crate) from: i64,
    /// It skips the rows of aggregates whose first open row is not due
    /// (`RelaySql::reserve_full`).
    pub(crate) skip_blocked: bool,
    /// It does so a window at a time (`RelaySql::reserve_windowed`).
    pub(crate) windowed: bool,
}

/// What the pipeline knows about where the next scan may start.
pub(crate) struct ScanStart {
    /// Where the last scan left off (see [`Scan::next_from`]).
    next_from: Option<i64>,
    /// `next_from` continues a scan that skips blocked aggregates after its window (see
    /// [`Scan::windowed`]): the next scan skips them too, however long ago the full scan
    /// started.
    next_windowed: bool,
    /// When the last reservation scanned from the first pending row.
    last_full_scan: Instant,
    /// When the scan from the first pending row whose windows the reservations are still going
    /// through started (`None`: none is).
    sweep_started: Option<Instant>,
    /// How long the last full scan took, from its first window to the first that found a
    /// candidate, or to the last pending row.
    full_scan_took: Duration,
    /// The lowest candidate the last full scan found: every pending row below it was skipped
    /// (see [`Scan::lowest`]). `None` after anything that may have released rows below it (a
    /// batch that did not confirm).
    floor: Option<i64>,
    /// Scans that skip blocked aggregates read a window at a time: since one of them failed,
    /// until a full scan takes less than [`SLOW_FULL_SCAN`].
    bounded: bool,
    /// A scan started at the floor since the last full scan: rows below the floor have not been
    /// looked at since (see [`ScanStart::full_scan_owed`]).
    below_floor_unseen: bool,
    /// The scans since the last full one went past candidates held back behind rows another
    /// transaction has (see [`ScanStart::go_past`]): they are pending below the later scans'
    /// candidates, so those do not raise the floor.
    past_held: bool,
}

impl ScanStart {
    pub(crate) fn new() -> Self {
        ScanStart {
            next_from: None,
            next_windowed: false,
            last_full_scan: Instant::now(),
            sweep_started: None,
            full_scan_took: Duration::ZERO,
            floor: None,
            bounded: false,
            below_floor_unseen: false,
            past_held: false,
        }
    }

    /// How long after a full scan the next one comes at the latest while wake-ups keep coming:
    /// [`FULL_SCAN_EVERY`], or ten times the last full scan's duration if that is longer.
    pub(crate) fn every(&self) -> Duration {
        FULL_SCAN_EVERY.max(self.full_scan_took.saturating_mul(10))
    }

    /// When the relay, about to wait for notifications, must scan from the first pending row
    /// all the same (`None`: the last scan that decided there was nothing looked at every
    /// pending row): a scan from the floor since the last full scan did not look below the
    /// floor, and a row can turn pending there without any wake-up that scans from the first
    /// row — a writer's transaction that took its `seq` before the floor's row and commits
    /// after the full scan, whose NOTIFY (if the relay was waiting) woke a scan from the floor.
    /// Without it such a row waited for the fallback poll: found by CI, 112 of 1,000 events
    /// from 8 concurrent writers left pending on a loaded machine, where a full scan took over
    /// [`SLOW_FULL_SCAN`] and the floor engaged. With it a row that turns pending below the
    /// floor waits at most ten full scans' time (or [`FULL_SCAN_EVERY`]), idle or not.
    pub(crate) fn full_scan_owed(&self) -> Option<Instant> {
        self.below_floor_unseen
            .then(|| self.last_full_scan + self.every())
    }

    /// Where this reservation's scan for candidates starts (`seq`; `i64::MIN`: the first pending
    /// row).
    ///
    /// In a backlog the scan starts where the last one left off (see
    /// [`Scan::next_from`]) rather than at the first pending row: the index entries of
    /// rows delivered since the start cannot be pruned while any transaction's snapshot is older
    /// than their delivery (a long report query, a replica's `hot_standby_feedback`, a
    /// `pg_dump`), and a scan from the start reads past every one of them (BENCHMARKS.md, "held
    /// snapshot": the drain's rate halved over its tenths). Rows can turn pending below the
    /// start: a writer's transaction that took its `seq` early and commits late, a retry or hold
    /// that comes due, a batch that rolled back, a requeued dead letter, a row another relay
    /// released. Rows a confirmed batch released (unsent, or past its byte budget) lower the
    /// start (see [`ScanStart::released`]). For the others the scan starts at the first pending
    /// row whenever the relay wakes for anything but more work in hand (a notification, the
    /// fallback tick, a due retry or hold of this relay, a resume after an error), after a batch
    /// that did not confirm, when a scan from the start found nothing, and at least every
    /// [`FULL_SCAN_EVERY`]: in a backlog such a row waits about that long (for the next full
    /// scan that reaches it). Order never depends on it: the gate's probe is not bounded by the
    /// start, so a pending row below it holds back its aggregate's later rows.
    ///
    /// A full scan skips the rows behind aggregates whose first open row is not due (see
    /// `reserve.sql`), but it still reads them: hundreds of thousands behind a hot aggregate's
    /// dead letter made every full scan take about a second (found by a breaker helper), and
    /// more than it could read within `postgres_timeout` failed every reservation. After such a
    /// scan failed, they are read a window at a time (see [`Scan::windowed`]: the next
    /// reservation continues after the window, however long the whole scan takes) until a full
    /// scan takes less than [`SLOW_FULL_SCAN`]: not always, since counting a window's rows reads
    /// their index entries twice, and a window of `seq`s (tried first) holds few pending rows
    /// where most were delivered — under a held snapshot either cost the drain (BENCHMARKS.md).
    /// A full scan's duration counts from its first window to the first
    /// that found a candidate. Once a full scan takes
    /// [`SLOW_FULL_SCAN`] or longer, full scans come at most every ten times their duration: in
    /// between, a wake-up that is not "more work in hand" scans from the floor (the lowest
    /// candidate the last full scan found; every pending row below it was skipped), skipping
    /// blocked aggregates too. A row that turns pending below the floor then waits up to ten
    /// full scans' time (also when the relay has nothing else to do: see
    /// [`ScanStart::full_scan_owed`]); a due retry or hold, a resume after an error and a batch
    /// that did not confirm still scan from the first pending row.
    ///
    pub(crate) fn next(&mut self, wake: Wake) -> Start {
        let slow = self.full_scan_took >= SLOW_FULL_SCAN;
        let recent = self.last_full_scan.elapsed() < self.every();
        let windowed = std::mem::take(&mut self.next_windowed);
        let (from, skip_blocked, windowed) = match (self.next_from.take(), self.floor) {
            (Some(from), _) if wake == Wake::Again && (recent || windowed) => {
                (from, windowed, windowed)
            }
            (_, Some(floor)) if slow && recent && !matches!(wake, Wake::Due | Wake::Resumed) => {
                self.below_floor_unseen = true;
                (floor, true, self.bounded)
            }
            _ => {
                self.last_full_scan = Instant::now();
                self.below_floor_unseen = false;
                self.past_held = false;
                (i64::MIN, true, self.bounded)
            }
        };
        Start {
            from,
            skip_blocked,
            windowed,
        }
    }

    /// What a scan that started at `start` at `started` found (`None`: it failed). One that
    /// skipped blocked aggregates (a full scan, one from the floor, or one continuing these
    /// after its window) tells the next ones how long a full scan takes (from its first window
    /// to the first that found a candidate, or to the last pending row), and a higher floor: it
    /// skipped every pending row below its lowest candidate (one that found nothing skipped
    /// every row: the floor stays valid).
    pub(crate) fn scanned(&mut self, start: Start, started: Instant, scan: Option<&Scan>) {
        if !start.skip_blocked {
            return;
        }
        if start.from == i64::MIN {
            self.sweep_started = Some(started);
        }
        let Some(scan) = scan else {
            // It may have outlasted its deadline: read a window at a time from now on.
            self.sweep_started = None;
            self.bounded = true;
            return;
        };
        if scan.lowest.is_some() || !scan.windowed {
            if let Some(sweep) = self.sweep_started.take() {
                self.full_scan_took = sweep.elapsed();
                self.bounded &= self.full_scan_took >= SLOW_FULL_SCAN;
            }
        }
        self.floor = match (scan.lowest, self.floor) {
            (Some(lowest), Some(floor)) if self.past_held => Some(floor.min(lowest)),
            (lowest, floor) => lowest.or(floor),
        };
    }

    /// The next scan may start where `scan` left off (a reservation that started a batch, or
    /// an empty one whose window ended before the pending rows did).
    pub(crate) fn left_off(&mut self, scan: &Scan) {
        self.next_from = scan.next_from;
        self.next_windowed = scan.windowed;
    }

    /// The next scan goes on at `from`, past every candidate of one that kept none of them,
    /// skipping blocked aggregates, as after a window (see `Pipeline::reserved_nothing`). The
    /// candidates it passes stay pending below the next scans' candidates: until the next full
    /// scan, the floor does not rise past them.
    pub(crate) fn go_past(&mut self, from: i64) {
        self.next_from = Some(from);
        self.next_windowed = true;
        self.past_held = true;
    }

    /// A batch confirmed; it released the rows from `released` pending (unsent, or past its
    /// byte budget): they may lie below where the next scan would start, or below the floor.
    pub(crate) fn released(&mut self, released: Option<i64>) {
        if let Some(released) = released {
            self.next_from = self.next_from.map(|from| from.min(released));
            self.floor = self.floor.map(|floor| floor.min(released));
        }
    }

    /// A batch did not confirm: its rows are pending again, below any start.
    pub(crate) fn reset(&mut self) {
        self.next_from = None;
        self.floor = None;
    }
}

/// Aggregates the reservations leave out (see `Pipeline::leave_out`), each until its own
/// deadline, and those found held back lately (what the relay reports).
#[derive(Debug, Default)]
pub(crate) struct LeftOut {
    until: Vec<(String, Instant)>,
    /// The unexpired aggregates, as the reservations take them.
    list: std::sync::Arc<[String]>,
    /// When a scan last found each aggregate held back, for [`HELD_SHOWN_FOR`].
    found: std::collections::HashMap<String, Instant>,
}

/// How long an aggregate counts as held back ([`LeftOut::held`]) after a scan last found it so,
/// at least (see [`held_shown_for`]). Its time left out ends after a second, and the next full
/// scan finds it again while the lock lasts: counted only while left out, a lock held for
/// minutes read 1, 0, 1, … to a scrape.
pub(crate) const HELD_SHOWN_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an aggregate counts as held back after a scan last found it so, when full scans come
/// at most every `every` ([`ScanStart::every`]): until two of them could have found it again, and
/// at least [`HELD_SHOWN_FOR`]. Behind 20,000–50,000 locked aggregates a full scan took seconds,
/// the next came 15–30 s later, and a 5 s count read 0 for most of a lock that lasted (found by a
/// breaker helper). An aggregate this relay publishes again stops counting at once
/// ([`LeftOut::publishing`]).
pub(crate) fn held_shown_for(every: Duration) -> Duration {
    HELD_SHOWN_FOR.max(
        every
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(1)),
    )
}

impl LeftOut {
    /// The aggregates left out at `now`; those found held back more than `shown_for` ago
    /// ([`held_shown_for`]) no longer count.
    pub(crate) fn now(&mut self, now: Instant, shown_for: Duration) -> std::sync::Arc<[String]> {
        let before = self.until.len();
        self.until.retain(|(_, until)| *until > now);
        if self.until.len() != before {
            self.refresh();
        }
        self.found.retain(|_, at| *at + shown_for > now);
        self.list.clone()
    }

    /// Leaves out each aggregate of `held` (found held back at `now`) until `until`, but those
    /// `ours` says are this relay's and those left out already (they keep their own deadline: a
    /// new one never extends another's); counts as held back those `counted` says (not another
    /// relay's batch in flight). How many were added.
    pub(crate) fn add(
        &mut self,
        held: Vec<String>,
        ours: impl Fn(&String) -> bool,
        counted: impl Fn(&String) -> bool,
        now: Instant,
        until: Instant,
    ) -> usize {
        let mut added = 0;
        for aggregate in held {
            if ours(&aggregate) {
                continue;
            }
            if counted(&aggregate) {
                self.found.insert(aggregate.clone(), now);
            }
            if !self.until.iter().any(|(a, _)| *a == aggregate) {
                self.until.push((aggregate, until));
                added += 1;
            }
        }
        if added > 0 {
            self.refresh();
        }
        added
    }

    /// How many aggregates a scan found held back (and left out) lately (see [`held_shown_for`]),
    /// as of the last [`now`](Self::now), [`add`](Self::add) or [`publishing`](Self::publishing).
    pub(crate) fn held(&self) -> usize {
        self.found.len()
    }

    /// This relay publishes `aggregate` again: it is held back no longer.
    pub(crate) fn publishing(&mut self, aggregate: &str) {
        if !self.found.is_empty() {
            self.found.remove(aggregate);
        }
    }

    fn refresh(&mut self) {
        self.list = self.until.iter().map(|(a, _)| a.clone()).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: Start = Start {
        from: i64::MIN,
        skip_blocked: true,
        windowed: false,
    };

    fn found(next_from: Option<i64>, lowest: Option<i64>, windowed: bool) -> Scan {
        Scan {
            cut_by_bytes: false,
            next_from,
            lowest,
            windowed,
            past: None,
            held: Vec::new(),
            held_locked: Vec::new(),
            held_by: None,
        }
    }

    #[test]
    fn a_backlog_continues_where_the_last_scan_left_off_until_the_next_full_scan() {
        let mut s = ScanStart::new();
        assert_eq!(s.next(Wake::Again), FULL, "nothing known: a full scan");
        s.scanned(FULL, Instant::now(), Some(&found(Some(40), Some(1), false)));
        s.left_off(&found(Some(40), Some(1), false));
        let on = Start {
            from: 40,
            skip_blocked: false,
            windowed: false,
        };
        assert_eq!(s.next(Wake::Again), on);
        s.left_off(&found(Some(80), Some(41), false));
        assert_eq!(
            s.next(Wake::Notified),
            FULL,
            "a notification scans from the start"
        );
        s.left_off(&found(Some(80), Some(41), false));
        s.last_full_scan = Instant::now() - FULL_SCAN_EVERY;
        assert_eq!(s.next(Wake::Again), FULL, "at least every FULL_SCAN_EVERY");
    }

    #[test]
    fn a_scan_past_its_window_goes_on_skipping_blocked_rows_however_long_it_takes() {
        let mut s = ScanStart::new();
        assert_eq!(s.next(Wake::Again), FULL);
        let window = found(Some(10_001), None, true);
        s.scanned(FULL, Instant::now(), Some(&window));
        s.left_off(&window);
        s.last_full_scan = Instant::now() - Duration::from_secs(60);
        let on = Start {
            from: 10_001,
            skip_blocked: true,
            windowed: true,
        };
        assert_eq!(s.next(Wake::Again), on);
        assert_eq!(s.floor, None, "nothing found yet: no floor");
        assert!(s.sweep_started.is_some(), "the full scan goes on");
    }

    #[test]
    fn a_scan_past_held_back_candidates_goes_on_after_them_and_keeps_the_floor_below_them() {
        let mut s = ScanStart::new();
        assert_eq!(s.next(Wake::Again), FULL);
        // A full scan found its limit of candidates from 100 to 119, every one held back.
        s.scanned(
            FULL,
            Instant::now(),
            Some(&found(Some(100), Some(100), false)),
        );
        s.go_past(120);
        s.last_full_scan = Instant::now() - Duration::from_secs(60);
        let on = Start {
            from: 120,
            skip_blocked: true,
            windowed: true,
        };
        assert_eq!(
            s.next(Wake::Again),
            on,
            "however long ago the full scan was"
        );
        s.scanned(
            on,
            Instant::now(),
            Some(&found(Some(200), Some(150), false)),
        );
        assert_eq!(s.floor, Some(100), "the held-back candidates are below 150");
        assert_eq!(s.next(Wake::Notified), FULL);
        s.scanned(FULL, Instant::now(), Some(&found(None, Some(150), false)));
        assert_eq!(s.floor, Some(150), "a full scan sets the floor again");
    }

    #[test]
    fn an_aggregate_is_left_out_until_its_own_deadline_and_never_one_of_ours() {
        let mut l = LeftOut::default();
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let shown = HELD_SHOWN_FOR;
        let none = |_: &String| false;
        let all = |_: &String| true;
        assert_eq!(l.add(vec!["a".into()], none, all, t0, t0 + second), 1);
        assert_eq!(&*l.now(t0, shown), ["a".to_string()]);
        // A new aggregate later does not extend the first one's time (a breaker helper kept an
        // aggregate whose lock was gone out as long as new ones came).
        let half = t0 + second / 2;
        assert_eq!(
            l.add(vec!["a".into(), "b".into()], none, all, half, half + second),
            1
        );
        assert_eq!(&*l.now(half, shown), ["a".to_string(), "b".to_string()]);
        assert_eq!(
            &*l.now(t0 + second, shown),
            ["b".to_string()],
            "a's second is over"
        );
        assert!(l.now(half + second, shown).is_empty());
        // Both still count as held back, found lately, until `shown` after the scan that last
        // found each.
        assert_eq!(l.held(), 2);
        l.now(t0 + shown, shown);
        assert_eq!(l.held(), 2, "a was found again with b, half a second later");
        l.now(half + shown, shown);
        assert_eq!(l.held(), 0, "neither found since");
        // An aggregate of this relay's batch in flight is never left out, nor counted.
        let ours = |a: &String| a == "hot";
        assert_eq!(l.add(vec!["hot".into()], ours, all, t0, t0 + second), 0);
        assert!(l.now(t0, shown).is_empty());
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn another_relay_s_batch_is_left_out_uncounted_and_a_published_aggregate_stops_counting() {
        let mut l = LeftOut::default();
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let none = |_: &String| false;
        // "r" is behind another relay's batch: left out like "x", but not counted (several
        // relays warned of a lock that did not exist).
        let counted = |a: &String| a != "r";
        let added = l.add(vec!["x".into(), "r".into()], none, counted, t0, t0 + second);
        assert_eq!(added, 2);
        assert_eq!(
            &*l.now(t0, HELD_SHOWN_FOR),
            ["x".to_string(), "r".to_string()]
        );
        assert_eq!(l.held(), 1, "only x is held back behind a lock");
        // Full scans every 20 s (a slow one behind a large pile): x counts until two of them
        // could have found it again, not 5 s (a breaker helper read 0 while the lock lasted).
        let shown = held_shown_for(Duration::from_secs(20));
        assert_eq!(shown, Duration::from_secs(41));
        assert_eq!(held_shown_for(Duration::from_millis(500)), HELD_SHOWN_FOR);
        l.now(t0 + Duration::from_secs(30), shown);
        assert_eq!(l.held(), 1, "x still counts 30 s after a scan found it");
        // Published again by this relay: the lock is gone, x no longer counts.
        l.publishing("x");
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn a_slow_full_scan_sends_wake_ups_to_its_floor_and_a_failed_batch_forgets_it() {
        let mut s = ScanStart::new();
        assert_eq!(s.next(Wake::Again), FULL);
        let started = Instant::now() - SLOW_FULL_SCAN;
        let window = found(Some(10_001), None, true);
        s.scanned(FULL, started, Some(&window));
        s.left_off(&window);
        let on = s.next(Wake::Again);
        s.scanned(on, Instant::now(), Some(&found(None, Some(10_500), false)));
        assert!(
            s.full_scan_took >= SLOW_FULL_SCAN,
            "timed from its first window"
        );
        let floor = Start {
            from: 10_500,
            skip_blocked: true,
            windowed: false,
        };
        assert_eq!(s.next(Wake::Notified), floor);
        assert_eq!(s.next(Wake::Tick), floor);
        assert_eq!(
            s.next(Wake::Due),
            FULL,
            "a due retry may lie below the floor"
        );
        s.released(Some(7));
        assert_eq!(
            s.next(Wake::Notified).from,
            7,
            "released rows lower the floor"
        );
        s.reset();
        assert_eq!(s.next(Wake::Notified), FULL, "a failed batch: no floor");
    }

    #[test]
    fn a_scan_from_the_floor_owes_a_full_scan_within_ten_full_scans_time() {
        let mut s = ScanStart::new();
        assert_eq!(s.next(Wake::Again), FULL);
        s.scanned(
            FULL,
            Instant::now() - SLOW_FULL_SCAN,
            Some(&found(None, Some(500), false)),
        );
        assert_eq!(s.full_scan_owed(), None, "a full scan looked at every row");
        let floor = s.next(Wake::Notified);
        assert_eq!(floor.from, 500, "slow full scans: from the floor");
        let owed = s.full_scan_owed().expect("rows below the floor unseen");
        let every = s.full_scan_took * 10;
        assert!(every >= SLOW_FULL_SCAN * 10);
        assert_eq!(owed, s.last_full_scan + every);
        s.scanned(floor, Instant::now(), Some(&found(None, None, false)));
        assert_eq!(
            s.full_scan_owed(),
            Some(owed),
            "finding nothing above the floor says nothing below it"
        );
        assert_eq!(s.next(Wake::Due), FULL, "the owed scan is a full one");
        assert_eq!(s.full_scan_owed(), None);
    }

    #[test]
    fn after_a_failed_scan_full_scans_read_windows_until_one_is_quick() {
        let mut s = ScanStart::new();
        assert_eq!(s.next(Wake::Again), FULL);
        s.scanned(FULL, Instant::now(), None);
        let windowed = Start {
            windowed: true,
            ..FULL
        };
        assert_eq!(
            s.next(Wake::Resumed),
            windowed,
            "it may have outlasted its deadline"
        );
        let slow = Instant::now() - SLOW_FULL_SCAN;
        s.scanned(windowed, slow, Some(&found(None, Some(5), false)));
        assert_eq!(s.next(Wake::Due), windowed, "still slow: still windows");
        s.scanned(windowed, Instant::now(), Some(&found(None, Some(5), false)));
        assert_eq!(s.next(Wake::Due), FULL, "quick again: no window");
    }
}
