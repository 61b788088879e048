//! A session shared by the relay's tasks of one kind (the batch fences, the late reports):
//! opened on demand, kept open, and replaced after a round trip on it missed its deadline (it may
//! be stuck; the round trip's statement is cancelled on the server, see `Pg::cancel`). tokio-postgres pipelines the tasks' statements on it, so that however many tasks
//! there are, they take one Postgres connection.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::Client;

/// A connection with what was prepared on it. The client is shared so that a cancel request
/// can keep the session open until the cancelled statement ended (see `Pg::cancel`).
pub(crate) trait Session {
    fn client(&self) -> &Arc<Client>;
}

/// The shared session of one kind of task.
pub(crate) struct Shared<T> {
    slot: Mutex<Option<Arc<T>>>,
}

impl<T: Session> Shared<T> {
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

    /// Passes `r` on, forgetting `s` first when `r` is a missed deadline (the next [`get`](Self::get)
    /// opens a new session).
    pub(crate) async fn settle<R>(&self, s: &Arc<T>, r: crate::Result<R>) -> crate::Result<R> {
        if r.as_ref().is_err_and(crate::Error::is_timeout) {
            let mut slot = self.slot.lock().await;
            if slot.as_ref().is_some_and(|g| Arc::ptr_eq(g, s)) {
                *slot = None;
            }
        }
        r
    }
}
