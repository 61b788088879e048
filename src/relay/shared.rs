//! A session shared by the relay's tasks of one kind (the batch fences, the late reports):
//! opened on demand, kept open, and replaced after a round trip on it missed its deadline (it may
//! be stuck) or found its prepared statements gone. tokio-postgres pipelines the tasks'
//! statements on it, so that however many tasks there are, they take one Postgres connection.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::pg::Pg;

use super::timing::{round_trip, Stop};

/// A connection with what was prepared on it. The client is shared so that a cancel request
/// can keep the session open until the cancelled statement ended (see `Pg::cancel`).
pub(crate) trait Session {
    fn client(&self) -> &Arc<Client>;
    /// The connection string's server the session is on (see `Pg::connect_session`).
    fn server(&self) -> usize;
}

/// A [`Session`] shared by tasks: it counts the round trips in flight on it.
pub(crate) trait SharedSession: Session {
    /// Round trips in flight on the session (see [`Shared::round_trip`]).
    fn live(&self) -> &AtomicUsize;
}

/// Counts a round trip in flight while alive.
struct Live<'a>(&'a AtomicUsize);

impl<'a> Live<'a> {
    fn start(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Live(n)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The shared session of one kind of task.
pub(crate) struct Shared<T> {
    slot: Mutex<Option<Arc<T>>>,
}

impl<T: SharedSession> Shared<T> {
    pub(crate) fn new() -> Self {
        Shared {
            slot: Mutex::new(None),
        }
    }

    /// The open session, or a new one from `open` (one connect at a time: tasks that ask
    /// meanwhile wait for it).
    ///
    /// # Errors
    /// `open`'s.
    pub(crate) async fn get<F, Fut>(&self, open: F) -> crate::Result<Arc<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = crate::Result<T>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.client().is_closed()) {
            return Ok(s.clone());
        }
        let s = Arc::new(open().await?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// `op` on `s` within `after` (see `timing::round_trip`). A missed deadline makes the next
    /// [`get`](Self::get) open a new session, and the server is asked to cancel what runs on
    /// this one (see `Pg::cancel`) — but only by the last round trip in flight on it to miss its
    /// deadline: a cancel request cancels whichever statement runs when it arrives, and while
    /// another task's round trip is in flight, that may be its statement (the timed-out one
    /// having ended just past its deadline; found by a breaker helper: a fence's cancel failed
    /// the next batch's fence). Once none is left, whatever runs on the session was abandoned.
    ///
    /// # Errors
    /// As `timing::round_trip`.
    pub(crate) async fn round_trip<R, E: Into<crate::Error>>(
        &self,
        pg: &Pg,
        s: &Arc<T>,
        stop: &Stop,
        what: &'static str,
        after: Duration,
        op: impl Future<Output = Result<R, E>>,
    ) -> crate::Result<R> {
        let live = Live::start(s.live());
        let r = round_trip(stop, what, after, op).await;
        drop(live);
        // Replaced after a missed deadline (it may be stuck), and once its prepared statements
        // are gone (a pooler moved the session, or `DEALLOCATE ALL` ran in it: it would fail
        // every round trip the same way for good — found by a breaker helper, every fence
        // failed for minutes after PgBouncer was back in session pooling), and after a write
        // refused as read-only (a session opened while the database defaulted to read-only
        // keeps that default: a breaker helper saw every fence fail for 4 min 38 s after
        // `alter database … reset default_transaction_read_only`, until the session ended).
        let timed_out = r.as_ref().is_err_and(crate::Error::is_timeout);
        let stale = r
            .as_ref()
            .is_err_and(|e| e.lost_prepared_statement() || e.read_only());
        if timed_out || stale {
            let mut slot = self.slot.lock().await;
            if slot.as_ref().is_some_and(|g| Arc::ptr_eq(g, s)) {
                *slot = None;
            }
        }
        if timed_out && s.live().load(Ordering::SeqCst) == 0 {
            pg.cancel(s.client(), s.server(), what);
        }
        r
    }
}
