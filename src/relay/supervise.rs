//! The tasks beside the pipeline (the listener, the waker, the tasks that wait for late
//! delivery reports), supervised: a panic in one of them stops the relay as a panic of the
//! pipeline does (`Outbox::run` returns `Error::Panicked`, health says the relay is not
//! running). Before, such a task ended alone: a panicking listener left the relay on its
//! fallback poll, and a panicking late-report task left its rows held, with health green.

use std::future::Future;
use std::sync::Arc;

use futures::FutureExt as _;
use tokio::sync::watch;

/// The first panic of a supervised task (`"<task>: <message>"`), for the pipeline to raise
/// again.
pub(crate) struct Panics {
    first: watch::Sender<Option<String>>,
}

impl Panics {
    pub(crate) fn new() -> Arc<Panics> {
        Arc::new(Panics {
            first: watch::Sender::new(None),
        })
    }

    /// A receiver that sees the first panic when it is recorded.
    pub(crate) fn watch(&self) -> watch::Receiver<Option<String>> {
        self.first.subscribe()
    }

    /// The first panic recorded, if any.
    pub(crate) fn first(&self) -> Option<String> {
        self.first.borrow().clone()
    }

    fn record(&self, message: String) {
        self.first.send_if_modified(|first| {
            let fresh = first.is_none();
            if fresh {
                *first = Some(message);
            }
            fresh
        });
    }
}

/// `task` (named `name` in the panic's message), with its panic recorded in `panics` instead
/// of ending it silently.
pub(crate) fn supervised<F>(
    panics: &Arc<Panics>,
    name: &'static str,
    task: F,
) -> impl Future<Output = ()> + Send + 'static
where
    F: Future<Output = ()> + Send + 'static,
{
    let panics = panics.clone();
    async move {
        if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
            panics.record(format!("{name}: {}", crate::outbox::panic_message(panic)));
        }
    }
}

/// Raises the panic `message` again on the caller's task (the pipeline's: `Outbox::run`
/// catches it).
pub(crate) fn raise(message: String) -> ! {
    std::panic::resume_unwind(Box::new(message))
}
