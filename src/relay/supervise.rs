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

    /// A receiver that sees the first panic, recorded before this call or after: marked
    /// changed, so that its first `changed()` returns at once and the caller looks (a panic of
    /// a task spawned before the pipeline subscribed would otherwise count as seen — found by
    /// a breaker helper).
    pub(crate) fn watch(&self) -> watch::Receiver<Option<String>> {
        let mut watch = self.first.subscribe();
        watch.mark_changed();
        watch
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic recorded before the pipeline subscribed is still seen by it (the pipeline
    /// subscribes after spawning the listener and the waker).
    #[tokio::test]
    async fn a_panic_before_the_watch_is_seen() {
        let panics = Panics::new();
        supervised(&panics, "listener", async { panic!("early") }).await;
        let mut watch = panics.watch();
        tokio::time::timeout(std::time::Duration::from_secs(1), watch.changed())
            .await
            .expect("changed() returns at once")
            .expect("the sender lives");
        assert_eq!(watch.borrow().as_deref(), Some("listener: early"));
    }

    /// Only the first panic is kept; a task that ends normally records nothing.
    #[tokio::test]
    async fn the_first_panic_is_kept() {
        let panics = Panics::new();
        supervised(&panics, "waker", async {}).await;
        assert_eq!(panics.first(), None);
        supervised(&panics, "late report", async { panic!("one") }).await;
        supervised(&panics, "listener", async { panic!("two") }).await;
        assert_eq!(panics.first().as_deref(), Some("late report: one"));
    }
}
