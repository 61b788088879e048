//! Retry policy: which Kafka errors are permanent, how long an event waits before its next
//! attempt, when it becomes a dead letter, and how long the relay pauses after a failure of its
//! own (Postgres unreachable, a batch that could not be confirmed).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::Settings;

/// Errors that no retry can fix: the event is dead-lettered at once.
///
/// Authorization is not among them: a refusal can be transient (ACLs propagating after a
/// change: librdkafka#2544, redpanda#8186), and after one `TOPIC_AUTHORIZATION_FAILED` answer
/// librdkafka fails every message to that topic for about a second, so that one bad answer
/// dead-lettered every aggregate sending then (found by a breaker helper: 22 dead letters from
/// one refused produce request). A refused topic is charged like any failure of the event (it
/// becomes a dead letter after `max_attempts`); a refused cluster-wide permission is the
/// cluster's (see [`is_cluster_unavailable`]). Nor is `InvalidTimestamp`: the record's timestamp
/// is the relay's clock at sending, so a refusal means that clock is off by more than the topic
/// allows (`message.timestamp.after.max.ms`, one hour by default since Kafka 3.6), not that the
/// event is wrong: no attempt is counted (a breaker helper saw every aggregate dead-lettered
/// when it was charged), with the clock named in `last_error`.
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
            | InvalidRecord
            | PolicyViolation
            | UnsupportedForMessageFormat
            | InvalidRequiredAcks
            | InvalidArgument
    )
}

/// Errors of the cluster or of the connection to it, not of the event: the event is retried
/// (after `retry_backoff_min`) without counting an attempt and never becomes a dead letter for
/// them, however long they last. librdkafka retries most of them itself until `publish_timeout`
/// (`message.timeout.ms`) and then reports `MessageTimedOut`; an unreachable, leaderless,
/// under-replicated or unauthenticated cluster therefore looks like a timeout, and an outage of
/// any length must cost no attempt. `Fatal` and the idempotence errors that make the producer
/// fatal are the producer's failure (it is rebuilt), not the event's; so is `GaplessGuarantee`
/// (the pipelining producer failing the messages after another one's permanent error).
///
/// A topic the cluster does not know (`UnknownTopicOrPartition`, `UnknownTopic`) or refuses the
/// relay (`TopicAuthorizationFailed`) is not in the list: it is the event's topic that is wrong,
/// and it is charged like any failure of the event. A cluster-wide refusal
/// (`ClusterAuthorizationFailed`, e.g. no IdempotentWrite) is in it: no event is at fault.
pub(crate) fn is_cluster_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageTimedOut
            | AllBrokersDown
            | BrokerTransportFailure
            | BrokerDestroy
            | DestroyBroker
            | Resolve
            | SSL
            | Authentication
            | SaslAuthenticationFailed
            | UnsupportedSASLMechanism
            | IllegalSASLState
            | OperationTimedOut
            | TimedOutQueue
            | QueueFull
            | PurgeInflight
            | Fatal
            | GaplessGuarantee
            | Inconsistent
            | OutOfOrderSequenceNumber
            | UnknownProducerId
            | InvalidProducerEpoch
            | InvalidProducerIdMapping
            | ProducerFenced
            | LeaderNotAvailable
            | NotLeaderForPartition
            | RequestTimedOut
            | BrokerNotAvailable
            | ReplicaNotAvailable
            | NetworkException
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | KafkaStorageError
            | FencedLeaderEpoch
            | UnknownLeaderEpoch
            | PreferredLeaderNotAvailable
            | EligibleLeadersNotAvailable
            | ThrottlingQuotaExceeded
            | CoordinatorNotAvailable
            | NotCoordinator
            | NotController
            | RebootstrapRequired
            | ClusterAuthorizationFailed
            | InvalidTimestamp
    )
}

/// Whether `e` says the cluster or the connection to it failed, not the event (see
/// [`is_cluster_unavailable`]); a delivery future cancelled because its producer was dropped
/// (rebuilt) counts too.
pub(crate) fn is_not_the_events_fault(e: &KafkaError) -> bool {
    match e.rdkafka_error_code() {
        Some(code) => is_cluster_unavailable(code),
        None => matches!(e, KafkaError::Canceled),
    }
}

/// A failed delivery attempt judged by the policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    /// librdkafka's message.
    pub(crate) error: String,
    /// librdkafka's error code, when the error has one.
    pub(crate) code: Option<RDKafkaErrorCode>,
    /// Whose failure it was, and so what follows.
    pub(crate) kind: FailureKind,
}

/// Whose failure a [`Failure`] is: each kind is retried (or not) in its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The event's own failure, retried after its backoff (`retry_delay`); the attempt counts
    /// (`attempts + 1`).
    Event,
    /// The event's own failure, permanent or on its last allowed attempt: a dead letter; the
    /// attempt counts.
    Dead,
    /// A failure of the cluster or the producer, not of the event (see
    /// [`is_cluster_unavailable`]): retried after the cluster's backoff (`unavailable_delay`),
    /// no attempt counted, never a dead letter.
    Cluster,
    /// The broker refused the record batch the event shared with others (too large, or another
    /// record invalid), and the refusal came too late to send the event alone within its batch
    /// ([`refused_batch`]): its next attempt goes alone after `retry_backoff_min` (see
    /// `publish::AloneNext`). Neither the event's failure nor the cluster's: no attempt counted.
    SharedBatch,
    /// Kafka's acknowledgement came without an offset ([`without_offset`]): the event may or may
    /// not be in the topic, so it is sent again after the cluster's backoff, no attempt counted,
    /// and so are the later events of its pipelined run even when acknowledged (a contiguous
    /// replay, never a stale event after a newer one).
    Unconfirmed,
}

impl Failure {
    /// Whether the event becomes a dead letter.
    pub(crate) fn dead(&self) -> bool {
        self.kind == FailureKind::Dead
    }

    /// Whether the attempt counts (`attempts + 1`): only for the event's own failures.
    pub(crate) fn charged(&self) -> bool {
        matches!(self.kind, FailureKind::Event | FailureKind::Dead)
    }
}

/// Judges attempt number `attempts_before + 1` of an event that failed with `e`. `cause`: what
/// the client last reported about the cluster (e.g. an authentication failure), appended to the
/// error of a failure of the cluster, whose own text is often only "Message timed out".
pub(crate) fn judge(
    settings: &Settings,
    e: &KafkaError,
    attempts_before: i32,
    cause: Option<&str>,
) -> Failure {
    let code = e.rdkafka_error_code();
    if is_not_the_events_fault(e) {
        let error = match cause {
            _ if code == Some(RDKafkaErrorCode::InvalidTimestamp) => format!("{e} (the record's timestamp is the relay host's clock at sending: check that clock against the brokers' and the topic's message.timestamp.before.max.ms / after.max.ms; retried with backoff, no attempt counted)"),
            Some(cause) => format!("{e} (Kafka unavailable: {cause})"),
            None => format!("{e} (Kafka unavailable)"),
        };
        return Failure {
            error,
            code,
            kind: FailureKind::Cluster,
        };
    }
    let permanent = code.is_some_and(is_permanent);
    let last = i64::from(attempts_before) + 1 >= i64::from(settings.max_attempts);
    // What happens next, for the hints below: a dead letter waits for `requeue`.
    let then = if permanent || last {
        "then requeue the event"
    } else {
        "the event is retried with backoff until `max_attempts`"
    };
    let error = match code {
        Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition) => {
            format!("{e} (the topic does not exist and the cluster does not create it on demand: create the topic; {then})")
        }
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
            format!("{e} (the relay's Kafka principal may not write to this topic: grant it Write on the topic (an ACL), or wait for a new grant to reach every broker; {then})")
        }
        // Brokers since Kafka 3.6 refuse a timestamp out of the topic's range with this code too.
        Some(RDKafkaErrorCode::InvalidRecord) => {
            format!("{e} (the broker's validation refused the record: e.g. its timestamp, the relay host's clock at sending, outside the topic's message.timestamp.before.max.ms / after.max.ms, or a broker-side policy)")
        }
        _ => e.to_string(),
    };
    Failure {
        error,
        code,
        kind: if permanent || last {
            FailureKind::Dead
        } else {
            FailureKind::Event
        },
    }
}

/// A late report that the record batch the event shared was refused (see
/// [`FailureKind::SharedBatch`]): no attempt counted, never a dead letter; the event is sent
/// again, alone, after `retry_backoff_min`.
pub(crate) fn refused_batch(e: &KafkaError) -> Failure {
    Failure {
        error: format!(
            "{e} (refused with the record batch it shared; it will be sent again, alone)"
        ),
        code: e.rdkafka_error_code(),
        kind: FailureKind::SharedBatch,
    }
}

/// An acknowledgement of partition `partition` without an offset (`offset` < 0), which no
/// broker gave: librdkafka's idempotent producer reports messages as delivered with offset -1001
/// when a request of theirs failed with an uncertain outcome (a timeout, a lost connection) and
/// a later request of the partition succeeded ("implicitly acked by subsequent batch success",
/// `rd_kafka_dr_implicit_ack`), and when a retry is answered DUPLICATE_SEQUENCE_NUMBER (offset
/// -1001, or the broker's -1). That inference can be wrong: in a chaos run on a 3-node Apache
/// Kafka 4.1 cluster with partition leaders killed, 8 events so acknowledged were in no
/// partition (confluent-kafka-go#921 reports the same loss during a leader election). Nothing
/// proves such an event is in Kafka, so it is not recorded as delivered: it is sent again (a
/// duplicate at worst), after the backoff of a failure of the cluster, with no attempt counted;
/// never a dead letter.
pub(crate) fn without_offset(partition: i32, offset: i64) -> Failure {
    Failure {
        error: format!("Kafka acknowledged the event without an offset (partition {partition}, offset {offset}: librdkafka inferred the delivery from a later one, or from a duplicate's answer); nothing proves it is in the topic, so it is sent again (a duplicate at worst), no attempt counted"),
        code: None,
        kind: FailureKind::Unconfirmed,
    }
}

/// The failure of a row that breaks a rule of `add_new_event` (`rule` says which): a dead letter
/// at once, never sent.
pub(crate) fn invalid_row(rule: &str) -> Failure {
    Failure {
        error: rule.to_string(),
        code: None,
        kind: FailureKind::Dead,
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

/// How long an event waits after a failure that charged no attempt (the cluster was
/// unavailable), `streak` such failures since the last delivery (relay-wide): the retry backoff
/// as if the event had failed `streak` times, at most [`MAX_UNAVAILABLE_DELAY`], so that a long
/// outage is tried every few seconds (not in a tight loop that keeps re-sending the same events
/// while others wait their turn) and delivery resumes within seconds of the recovery.
pub(crate) fn unavailable_delay(settings: &Settings, streak: u32) -> Duration {
    let level = i32::try_from(streak.clamp(1, 32)).unwrap_or(32);
    retry_delay(settings, level).min(MAX_UNAVAILABLE_DELAY)
}

/// The longest wait of an event after a failure of the cluster.
pub(crate) const MAX_UNAVAILABLE_DELAY: Duration = Duration::from_secs(10);

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

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::judge;
    use crate::config::Settings;

    /// `(dead, charged)` of a first failure with `code` (`max_attempts` 10) and its error text.
    fn first_failure(code: RDKafkaErrorCode) -> ((bool, bool), String) {
        let f = judge(
            &Settings::default(),
            &KafkaError::MessageProduction(code),
            0,
            None,
        );
        ((f.dead(), f.charged()), f.error)
    }

    #[test]
    fn refusals_that_can_pass_cost_an_attempt_or_nothing_never_a_dead_letter_at_once() {
        use RDKafkaErrorCode::*;
        let (judged, error) = first_failure(TopicAuthorizationFailed);
        assert_eq!(judged, (false, true));
        assert!(
            error.contains("grant it Write") && error.contains("retried"),
            "{error}"
        );
        assert_eq!(first_failure(ClusterAuthorizationFailed).0, (false, false));
        let (judged, error) = first_failure(InvalidTimestamp);
        assert_eq!(judged, (false, false));
        assert!(error.contains("clock"), "{error}");
    }

    #[test]
    fn errors_of_the_record_are_dead_letters_at_once_and_say_what_to_check() {
        use RDKafkaErrorCode::*;
        assert_eq!(first_failure(MessageSizeTooLarge).0, (true, true));
        let (judged, error) = first_failure(InvalidRecord);
        assert_eq!(judged, (true, true));
        assert!(error.contains("after.max.ms"), "{error}");
    }

    #[test]
    fn the_last_attempt_s_hint_says_to_requeue_not_that_it_is_retried() {
        let settings = Settings::default();
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        let last = judge(&settings, &e, settings.max_attempts as i32 - 1, None);
        assert!(last.dead(), "{last:?}");
        assert!(
            last.error.contains("requeue") && !last.error.contains("retried"),
            "{}",
            last.error
        );
    }
}
