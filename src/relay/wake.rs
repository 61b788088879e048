//! The wake stage: one [`Stream`] of reasons to reserve now — notifications (and the listener's
//! and waker's catch-up signals) ⊕ the fallback ticker ⊕ the earliest due retry or hold ⊕ "the
//! last batch was full". After a failure the stream pauses and then yields [`Wake::Resumed`].

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

/// Why the relay should reserve now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A NOTIFY arrived.
    Notified,
    /// The listener (re)connected and LISTENs again: notifications sent while it was away are
    /// lost, so the relay runs a catch-up pass.
    Listening,
    /// The idle lock was granted: writers that did not notify have committed; catch up.
    Armed,
    /// The fallback poll period passed.
    Tick,
    /// A retry or a hold of an earlier batch is due, or a scan from the first pending row
    /// ([`ScanStart::full_scan_owed`](super::scan::ScanStart::full_scan_owed)).
    Due,
    /// The last batch was full (or the relay just started): there may be more.
    Again,
    /// A pause after a failure ended.
    Resumed,
}

/// Due times are rounded up to this at least (see [`Wakeups::due_at`])…
const DUE_GRAIN: Duration = Duration::from_millis(10);

/// …and to this at most.
const MAX_DUE_GRAIN: Duration = Duration::from_millis(10_240);

/// The wake-ups of one relay. Never ends.
pub(crate) struct Wakeups {
    notifications: Option<mpsc::Receiver<Wake>>,
    /// Due times asked for by tasks beside the pipeline (see [`DueSender`]).
    requests: Option<mpsc::UnboundedReceiver<Instant>>,
    /// Due times handed over by other relays (see [`HandoffSender`]).
    handoffs: Option<mpsc::Receiver<Instant>>,
    ticker: Interval,
    /// The earliest due time.
    due: Option<Pin<Box<Sleep>>>,
    /// Every later one: each is a row (or a full scan) that no other wake-up may come for, so
    /// none is dropped (one slot kept only the earliest, and a retry due after it waited for
    /// the fallback poll: found by a review helper). Rounded up (see [`Wakeups::rounded`]), so
    /// that the rows a burst of late reports frees make one wake-up, after all of them, and
    /// the jittered retries of a failed batch a few.
    later: BTreeSet<Instant>,
    base: Instant,
    /// A scan from the first pending row owed (see [`Wakeups::full_scan_at`]).
    owed: Option<Pin<Box<Sleep>>>,
    paused: Option<Pin<Box<Sleep>>>,
    /// Wake-ups read from `notifications` during a pause, yielded after it: each kind once (a
    /// wake-up carries no data, so a second `Notified` says nothing the first does not), so a
    /// NOTIFY storm during a 10 s pause holds at most one of each kind, not every one read.
    held: std::collections::VecDeque<Wake>,
    again: bool,
}

/// The most due times one handoff carries (and one received is read for); later ones are left
/// to the other relays' fallback poll.
pub(crate) const MAX_HANDOFF: usize = 16;

/// The longest delay a received handoff is read for; a later one is left to the fallback poll.
const MAX_HANDOFF_DELAY: Duration = Duration::from_secs(3600);

/// How many handed-over due times wait to be taken by the wake stage; more are dropped (the
/// fallback poll covers them): anyone who can connect may NOTIFY the channel.
const HANDOFF_QUEUE: usize = 64;

/// The start of a handoff's NOTIFY payload (the wake trigger's payload is empty).
const HANDOFF_PREFIX: &str = "outbox-handoff table=";

/// The NOTIFY payload by which a stopping relay on `table` tells the others when the rows it
/// last wrote turn due: `outbox-handoff table=<table> due_ms=<delays, comma-separated>` (empty:
/// only "now"), delays rounded up to whole milliseconds. Without it a stopping relay's last
/// retries and holds woke only itself, and another relay found them at its fallback poll (found
/// by a breaker helper). The table is named because tables migrated with the default channel
/// share it.
pub(crate) fn handoff_payload(table: &str, due: &[Duration]) -> String {
    let ms: Vec<String> = (due.iter().take(MAX_HANDOFF))
        .map(|d| d.as_nanos().div_ceil(1_000_000).max(1).to_string())
        .collect();
    format!("{HANDOFF_PREFIX}{table} due_ms={}", ms.join(","))
}

/// The delays of a NOTIFY payload written by [`handoff_payload`] for `table`; nothing for any
/// other payload (the wake trigger's empty one, another table's handoff, one sent by hand).
/// Parts that are not a number of milliseconds up to an hour are skipped; at most
/// [`MAX_HANDOFF`] are read.
pub(crate) fn handoff_delays(payload: &str, table: &str) -> Vec<Duration> {
    let Some((to, list)) =
        (payload.strip_prefix(HANDOFF_PREFIX)).and_then(|rest| rest.split_once(" due_ms="))
    else {
        return Vec::new();
    };
    if to != table {
        return Vec::new();
    }
    (list.split(','))
        .filter_map(|ms| ms.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_HANDOFF_DELAY)
        .take(MAX_HANDOFF)
        .collect()
}

/// Hands due times received from other relays to the wake stage, through a bounded queue
/// ([`HANDOFF_QUEUE`]; a time that does not fit is dropped).
#[derive(Clone)]
pub(crate) struct HandoffSender(mpsc::Sender<Instant>);

/// What [`Wakeups`] receives from a [`HandoffSender`].
pub(crate) struct Handoffs(mpsc::Receiver<Instant>);

impl HandoffSender {
    pub(crate) fn new() -> (HandoffSender, Handoffs) {
        let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
        (HandoffSender(tx), Handoffs(rx))
    }

    pub(crate) fn at(&self, at: Instant) {
        let _ = self.0.try_send(at);
    }
}

/// Asks the pipeline for a [`Wake::Due`] at a time: for rows that turn due or free through a
/// task beside it (a late report's retry or release, a fence removed after its batch failed).
#[derive(Clone)]
pub(crate) struct DueSender(mpsc::UnboundedSender<Instant>);

/// What [`Wakeups`] receives from a [`DueSender`].
pub(crate) struct DueRequests(mpsc::UnboundedReceiver<Instant>);

impl DueSender {
    pub(crate) fn new() -> (DueSender, DueRequests) {
        let (tx, rx) = mpsc::unbounded_channel();
        (DueSender(tx), DueRequests(rx))
    }

    pub(crate) fn at(&self, at: Instant) {
        // Closed only once the pipeline has ended.
        let _ = self.0.send(at);
    }
}

impl Wakeups {
    /// `notifications`: the listener's and waker's wake-ups (`None` when polling only). The
    /// first item is [`Wake::Again`].
    pub(crate) fn new(
        notifications: Option<mpsc::Receiver<Wake>>,
        poll_interval: Duration,
    ) -> Self {
        let mut ticker = tokio::time::interval_at(Instant::now() + poll_interval, poll_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Wakeups {
            notifications,
            requests: None,
            handoffs: None,
            ticker,
            due: None,
            later: BTreeSet::new(),
            base: Instant::now(),
            owed: None,
            paused: None,
            held: std::collections::VecDeque::new(),
            again: true,
        }
    }

    /// Also yields the due times sent by `due` (see [`DueSender::new`]).
    pub(crate) fn with_requests(mut self, due: DueRequests) -> Self {
        self.requests = Some(due.0);
        self
    }

    /// Also yields the due times other relays hand over (see [`HandoffSender::new`]).
    pub(crate) fn with_handoffs(mut self, handoffs: Handoffs) -> Self {
        self.handoffs = Some(handoffs.0);
        self
    }

    /// Yield at once (the last batch was full).
    pub(crate) fn again(&mut self) {
        self.again = true;
    }

    /// Yield [`Wake::Due`] at `at`, rounded up (see [`Wakeups::rounded`]), and at every other
    /// time asked for: one wake-up for all those that have passed when it is yielded.
    pub(crate) fn due_at(&mut self, at: Instant) {
        let at = self.rounded(at);
        match &mut self.due {
            Some(sleep) if sleep.deadline() == at => {}
            Some(sleep) if sleep.deadline() < at => {
                self.later.insert(at);
            }
            Some(sleep) => {
                self.later.insert(sleep.deadline());
                sleep.as_mut().reset(at);
            }
            None => self.due = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Yield [`Wake::Due`] at `at` unless a scan from the first pending row starts before
    /// (see [`Wakeups::full_scan_done`]): the full scan that scans from the floor owe
    /// (`ScanStart::full_scan_owed`). Kept apart from the due times, or a full scan made
    /// meanwhile for another reason was followed by a second one (found by CI: four full scans
    /// through a slow pile where three were allowed).
    pub(crate) fn full_scan_at(&mut self, at: Instant) {
        match &mut self.owed {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.owed = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// A scan from the first pending row starts: it is the one owed.
    pub(crate) fn full_scan_done(&mut self) {
        self.owed = None;
    }

    /// `at` rounded up to a multiple (after `base`) of a grain of about an eighth of the time
    /// until then, a power of two times [`DUE_GRAIN`] up to [`MAX_DUE_GRAIN`]: the retries of
    /// a failed batch are jittered (up to twice the backoff, see `retry::retry_delay`), so a
    /// fixed grain left one wake-up — each a scan from the first pending row — per 10 ms of
    /// their spread (found by a review helper: 50 for a batch's first retries, 100 for its
    /// second…). A retry is thus late by at most about an eighth of its delay.
    fn rounded(&self, at: Instant) -> Instant {
        let ahead = at.saturating_duration_since(Instant::now());
        let mut grain = DUE_GRAIN;
        while grain.saturating_mul(8) < ahead && grain < MAX_DUE_GRAIN {
            grain = grain.saturating_mul(2);
        }
        let grain = grain.as_nanos();
        let since = at.saturating_duration_since(self.base).as_nanos();
        let up = since.div_ceil(grain) * grain;
        self.base + Duration::from_nanos(u64::try_from(up).unwrap_or(u64::MAX))
    }

    /// The due time has come: the next one is the earliest still ahead.
    fn next_due(&mut self) {
        let now = Instant::now();
        self.later = self.later.split_off(&now);
        self.later.remove(&now);
        self.due = self
            .later
            .pop_first()
            .map(|at| Box::pin(tokio::time::sleep_until(at)));
    }

    /// The due times still ahead (those kept and those asked for but not yet taken), as
    /// delays from now, earliest first, at most [`MAX_HANDOFF`]: what a stopping relay hands to
    /// the others (see [`handoff_payload`]). The owed full scan is this relay's own and is left
    /// out.
    pub(crate) fn still_due(&mut self) -> Vec<Duration> {
        let mut asked = Vec::new();
        if let Some(rx) = self.requests.as_mut() {
            while let Ok(at) = rx.try_recv() {
                asked.push(at);
            }
        }
        for at in asked {
            let at = self.rounded(at);
            self.later.insert(at);
        }
        let now = Instant::now();
        let mut due: Vec<Duration> = (self.due.iter().map(|s| s.deadline()))
            .chain(self.later.iter().copied())
            .filter(|at| *at > now)
            .map(|at| at - now)
            .collect();
        due.sort_unstable();
        due.dedup();
        due.truncate(MAX_HANDOFF);
        due
    }

    /// Yield nothing for `delay`, then [`Wake::Resumed`] (other wake-ups wait meanwhile).
    pub(crate) fn pause(&mut self, delay: Duration) {
        self.paused = Some(Box::pin(tokio::time::sleep(delay)));
    }
}

impl Stream for Wakeups {
    type Item = Wake;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Wake>> {
        let this = self.get_mut();
        if this.paused.is_some() {
            // The listener back (it reconnected: Postgres answers again) ends a pause at once:
            // a pause after failures grows to 10 s and more with its jitter, and the relay
            // sat out up to 16 s of it after a server had restarted (found by a breaker
            // helper). Other wake-ups wait for the pause's end.
            while let Some(rx) = this.notifications.as_mut() {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(Wake::Listening)) => {
                        this.paused = None;
                        return Poll::Ready(Some(Wake::Listening));
                    }
                    Poll::Ready(Some(w)) => {
                        if !this.held.contains(&w) {
                            this.held.push_back(w);
                        }
                    }
                    Poll::Ready(None) => this.notifications = None,
                    Poll::Pending => break,
                }
            }
            if let Some(pause) = this.paused.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            this.paused = None;
            return Poll::Ready(Some(Wake::Resumed));
        }
        if std::mem::take(&mut this.again) {
            return Poll::Ready(Some(Wake::Again));
        }
        if let Some(w) = this.held.pop_front() {
            return Poll::Ready(Some(w));
        }
        if let Some(rx) = this.notifications.as_mut() {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(w)) => return Poll::Ready(Some(w)),
                // The wake path ended (stopping): the ticker goes on.
                Poll::Ready(None) => this.notifications = None,
                Poll::Pending => {}
            }
        }
        while let Some(rx) = this.requests.as_mut() {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(at)) => this.due_at(at),
                Poll::Ready(None) => this.requests = None,
                Poll::Pending => break,
            }
        }
        while let Some(rx) = this.handoffs.as_mut() {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(at)) => this.due_at(at),
                Poll::Ready(None) => this.handoffs = None,
                Poll::Pending => break,
            }
        }
        if let Some(due) = this.due.as_mut() {
            if due.as_mut().poll(cx).is_ready() {
                this.next_due();
                return Poll::Ready(Some(Wake::Due));
            }
        }
        if let Some(owed) = this.owed.as_mut() {
            if owed.as_mut().poll(cx).is_ready() {
                this.owed = None;
                return Poll::Ready(Some(Wake::Due));
            }
        }
        match this.ticker.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Wake::Tick)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn reads_only_handoff_payloads() {
        let t = "events";
        assert!(handoff_delays("", t).is_empty());
        assert!(handoff_delays("hello", t).is_empty());
        assert_eq!(
            handoff_delays(
                "outbox-handoff table=events due_ms=5,x,-3,,20, 30,99999999999",
                t
            ),
            [5, 20, 30].map(Duration::from_millis)
        );
        let many = format!(
            "outbox-handoff table=events due_ms={}",
            vec!["1"; 1000].join(",")
        );
        assert_eq!(handoff_delays(&many, t).len(), MAX_HANDOFF);
        assert_eq!(
            handoff_payload(t, &[Duration::from_micros(1_500)]),
            "outbox-handoff table=events due_ms=2"
        );
        assert_eq!(
            handoff_payload(t, &[]),
            "outbox-handoff table=events due_ms="
        );
    }

    #[tokio::test(start_paused = true)]
    async fn merges_every_source() {
        let (tx, rx) = mpsc::channel(4);
        let mut w = Wakeups::new(Some(rx), Duration::from_secs(3600));
        assert_eq!(w.next().await, Some(Wake::Again));
        tx.try_send(Wake::Notified).unwrap();
        assert_eq!(w.next().await, Some(Wake::Notified));
        // The earlier due time first, the later one kept.
        let later = Instant::now() + Duration::from_millis(60);
        w.due_at(later);
        w.due_at(Instant::now() + Duration::from_millis(10));
        assert_eq!(w.next().await, Some(Wake::Due));
        assert!(Instant::now() < later);
        assert_eq!(w.next().await, Some(Wake::Due));
        assert!(Instant::now() >= later, "the later due time is not dropped");
        // Asked for from beside the pipeline; those passed by then make one wake-up.
        let (due, requests) = DueSender::new();
        let mut w = w.with_requests(requests);
        let now = Instant::now();
        due.at(now);
        due.at(now);
        due.at(now + Duration::from_millis(20));
        assert_eq!(w.next().await, Some(Wake::Due));
        assert_eq!(w.next().await, Some(Wake::Due));
        assert!(Instant::now() >= now + Duration::from_millis(20));
        assert!(w.due.is_none() && w.later.is_empty(), "nothing else due");
        // An owed full scan comes unless one started before.
        w.full_scan_at(Instant::now() + Duration::from_millis(10));
        assert_eq!(w.next().await, Some(Wake::Due));
        w.full_scan_at(Instant::now() + Duration::from_millis(10));
        w.full_scan_done();
        w.again();
        assert_eq!(w.next().await, Some(Wake::Again));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), w.next())
                .await
                .is_err(),
            "no Due: the owed scan was made"
        );
        // Jittered retries over a second make a few wake-ups, none early.
        let now = Instant::now();
        let asked: Vec<Instant> = (0..100)
            .map(|i| now + Duration::from_millis(1_000 + 10 * i))
            .collect();
        for at in &asked {
            w.due_at(*at);
        }
        let mut woken = Vec::new();
        while Instant::now() < asked[99] {
            assert_eq!(w.next().await, Some(Wake::Due));
            woken.push(Instant::now());
        }
        assert!(woken.len() <= 8, "{} wake-ups for 100 retries", woken.len());
        for at in &asked {
            assert!(woken.iter().any(|w| w >= at), "a wake-up at or after each");
        }
        // A pause holds back what is already waiting, then yields it.
        w.pause(Duration::from_millis(10));
        w.again();
        tx.try_send(Wake::Armed).unwrap();
        assert_eq!(w.next().await, Some(Wake::Resumed));
        assert_eq!(w.next().await, Some(Wake::Again));
        assert_eq!(w.next().await, Some(Wake::Armed));
        drop(tx);
        let mut ticking = Wakeups::new(None, Duration::from_millis(10));
        assert_eq!(ticking.next().await, Some(Wake::Again));
        assert_eq!(ticking.next().await, Some(Wake::Tick));
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_back_ends_a_pause() {
        let (tx, rx) = mpsc::channel(4);
        let mut w = Wakeups::new(Some(rx), Duration::from_secs(3600));
        assert_eq!(w.next().await, Some(Wake::Again));
        let start = Instant::now();
        w.pause(Duration::from_secs(10));
        tx.try_send(Wake::Notified).unwrap();
        let listener = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            listener.send(Wake::Listening).await.unwrap();
        });
        assert_eq!(w.next().await, Some(Wake::Listening));
        assert!(
            Instant::now() < start + Duration::from_secs(2),
            "the pause ended when the listener was back"
        );
        assert_eq!(w.next().await, Some(Wake::Notified), "held, not lost");
        // A storm of notifications during a pause is held as one wake-up of each kind.
        w.pause(Duration::from_secs(10));
        for _ in 0..2 {
            tx.try_send(Wake::Notified).unwrap();
            tx.try_send(Wake::Armed).unwrap();
        }
        tokio::task::yield_now().await;
        let held = futures::poll!(w.next());
        assert!(held.is_pending(), "paused: {held:?}");
        for _ in 0..3 {
            tx.try_send(Wake::Notified).unwrap();
        }
        let held = futures::poll!(w.next());
        assert!(held.is_pending(), "paused: {held:?}");
        assert_eq!(w.held.len(), 2, "one of each kind: {:?}", w.held);
        assert_eq!(w.next().await, Some(Wake::Resumed));
        assert_eq!(w.next().await, Some(Wake::Notified));
        assert_eq!(w.next().await, Some(Wake::Armed));
        // Without the listener a pause lasts.
        w.pause(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(w.next().await, Some(Wake::Resumed));
        assert!(Instant::now() >= start + Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn hands_over_the_due_times_ahead() {
        let (due, requests) = DueSender::new();
        let mut w = Wakeups::new(None, Duration::from_secs(3600)).with_requests(requests);
        // What a stopping relay hands over: the due times ahead, taken or not, as delays.
        let now = Instant::now();
        w.due_at(now + Duration::from_millis(300));
        due.at(now + Duration::from_millis(100));
        due.at(now + Duration::from_millis(5_000));
        let handed = w.still_due();
        assert_eq!(handed.len(), 3, "{handed:?}");
        assert!(handed[0] >= Duration::from_millis(100) && handed[0] < Duration::from_millis(120));
        assert!(
            handed[2] >= Duration::from_millis(5_000) && handed[2] < Duration::from_millis(5_700)
        );
        let payload = handoff_payload("events", &handed);
        let read = handoff_delays(&payload, "events");
        assert_eq!(read.len(), 3, "{payload}");
        assert!(read[0] >= handed[0], "never earlier: {read:?} {handed:?}");
        assert!(
            handoff_delays(&payload, "other").is_empty(),
            "another table's"
        );
    }
}
