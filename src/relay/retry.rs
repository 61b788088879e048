//! Retry policy: which Kafka errors are permanent, how long an event waits before its next
//! attempt, when it becomes a dead letter, and how long the relay pauses after a failure of its
//! own (Postgres unreachable, a batch that could not be confirmed).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::Settings;

/// Errors that no retry can fix: the event is dead-lettered at once.
pub(crate) fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | InvalidMessageSize
            | InvalidMessage
            | BadMessage
            | InvalidTopic
            | MessageBatchTooLarge
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | InvalidRecord
            | PolicyViolation
            | UnsupportedForMessageFormat
            | InvalidRequiredAcks
            | InvalidTimestamp
            | InvalidArgument
    )
}

/// A failed delivery attempt judged by the policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    /// librdkafka's message.
    pub(crate) error: String,
    /// librdkafka's error code, when the error has one.
    pub(crate) code: Option<RDKafkaErrorCode>,
    /// A permanent error, or the last allowed attempt: the event becomes a dead letter.
    pub(crate) dead: bool,
}

/// Judges attempt number `attempts_before + 1` of an event that failed with `e`.
pub(crate) fn judge(settings: &Settings, e: &KafkaError, attempts_before: i32) -> Failure {
    let code = e.rdkafka_error_code();
    let permanent = code.is_some_and(is_permanent);
    let last = i64::from(attempts_before) + 1 >= i64::from(settings.max_attempts);
    Failure {
        error: e.to_string(),
        code,
        dead: permanent || last,
    }
}

/// The failure of a row that breaks a rule of `add_new_event` (`rule` says which): a dead letter
/// at once, never sent.
pub(crate) fn invalid_row(rule: &str) -> Failure {
    Failure {
        error: rule.to_string(),
        code: None,
        dead: true,
    }
}

/// How long an event waits after its `attempts`-th failed attempt: exponential from
/// `retry_backoff_min`, with jitter, at most `retry_backoff_max`.
pub(crate) fn retry_delay(settings: &Settings, attempts: i32) -> Duration {
    backoff(settings.retry_backoff_min, settings.retry_backoff_max)
        .nth(attempts.saturating_sub(1).max(0) as usize)
        .unwrap_or(settings.retry_backoff_max)
        .min(settings.retry_backoff_max)
}

/// The relay's pause after failures of its own: 100 ms doubling to 10 s, with jitter; a fresh
/// iterator after a success.
pub(crate) fn error_backoff() -> impl Iterator<Item = Duration> {
    backoff(Duration::from_millis(100), MAX_ERROR_PAUSE)
}

/// Exponential backoff from `min`, doubling, at most `max`, with jitter, without end.
pub(crate) fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The pause when the backoff iterator is exhausted (it never is; a bound for the type).
pub(crate) const MAX_ERROR_PAUSE: Duration = Duration::from_secs(10);
