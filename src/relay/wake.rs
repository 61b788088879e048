//! The wake stage: one [`Stream`] of reasons to reserve now — notifications (and the listener's
//! and waker's catch-up signals) ⊕ the fallback ticker ⊕ the earliest due retry or hold ⊕ "the
//! last batch was full". After a failure the stream pauses and then yields [`Wake::Resumed`].

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

/// The wake-ups of one relay. Never ends.
pub(crate) struct Wakeups {
    notifications: Option<mpsc::Receiver<Wake>>,
    ticker: Interval,
    due: Option<Pin<Box<Sleep>>>,
    paused: Option<Pin<Box<Sleep>>>,
    again: bool,
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
            ticker,
            due: None,
            paused: None,
            again: true,
        }
    }

    /// Yield at once (the last batch was full).
    pub(crate) fn again(&mut self) {
        self.again = true;
    }

    /// Yield [`Wake::Due`] at `at`, or earlier when an earlier time is already set.
    pub(crate) fn due_at(&mut self, at: Instant) {
        match &mut self.due {
            Some(sleep) if sleep.deadline() <= at => {}
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.due = Some(Box::pin(tokio::time::sleep_until(at))),
        }
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
        if let Some(pause) = this.paused.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.paused = None;
            return Poll::Ready(Some(Wake::Resumed));
        }
        if std::mem::take(&mut this.again) {
            return Poll::Ready(Some(Wake::Again));
        }
        if let Some(rx) = this.notifications.as_mut() {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(w)) => return Poll::Ready(Some(w)),
                // The wake path ended (stopping): the ticker goes on.
                Poll::Ready(None) => this.notifications = None,
                Poll::Pending => {}
            }
        }
        if let Some(due) = this.due.as_mut() {
            if due.as_mut().poll(cx).is_ready() {
                this.due = None;
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

    #[tokio::test]
    async fn merges_every_source() {
        let (tx, rx) = mpsc::channel(4);
        let mut w = Wakeups::new(Some(rx), Duration::from_secs(3600));
        assert_eq!(w.next().await, Some(Wake::Again));
        tx.try_send(Wake::Notified).unwrap();
        assert_eq!(w.next().await, Some(Wake::Notified));
        // The earlier due time wins.
        w.due_at(Instant::now() + Duration::from_millis(10));
        w.due_at(Instant::now() + Duration::from_secs(3600));
        assert_eq!(w.next().await, Some(Wake::Due));
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
}
