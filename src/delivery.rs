//! Delivery acknowledgements and failures, and the stream that carries them.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use futures::Stream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use uuid::Uuid;

/// Kafka acknowledged an event, and the relay recorded it (the row is done or deleted). That
/// commit does not wait for its WAL flush: a server crash within about three
/// `wal_writer_delay`s of it can undo the record, and the event is then published again (README,
/// "Guarantees") — as one whose confirm failed is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAck {
    pub(crate) event_id: Uuid,
    pub(crate) seq: i64,
    pub(crate) aggregate_id: String,
    pub(crate) topic: String,
    pub(crate) event_type: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) delivered_at: DateTime<Utc>,
}

impl DeliveryAck {
    /// The event id (the record's `event_id` header).
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }
    /// The event's insertion order (`seq`).
    pub fn seq(&self) -> i64 {
        self.seq
    }
    /// The aggregate id (the record's key).
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// The partition Kafka wrote the record to.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// The record's offset in that partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// When the relay received the delivery report.
    pub fn delivered_at(&self) -> DateTime<Utc> {
        self.delivered_at
    }
}

/// A delivery attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailure {
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_id: String,
    pub(crate) topic: String,
    pub(crate) error: String,
    pub(crate) kafka_code: Option<rdkafka::error::RDKafkaErrorCode>,
    pub(crate) attempts: i32,
    pub(crate) dead_letter: bool,
}

impl DeliveryFailure {
    /// The event id.
    pub fn event_id(&self) -> Uuid {
        self.event_id
    }
    /// The aggregate id.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The error, as stored in `last_error`.
    pub fn error(&self) -> &str {
        &self.error
    }
    /// librdkafka's error code (e.g. `MessageSizeTooLarge`, `MessageTimedOut`), when the error
    /// has one; [`RDKafkaErrorCode`](rdkafka::error::RDKafkaErrorCode) says what it means.
    pub fn kafka_code(&self) -> Option<rdkafka::error::RDKafkaErrorCode> {
        self.kafka_code
    }
    /// Failed attempts so far, this one included — unless the cluster, not the event, failed
    /// (unreachable brokers, a timeout, no leader, a refused login, a fatal producer), or the
    /// broker refused the record batch the event only shared, in a report that came after its
    /// batch ended (the event is then sent alone): such a failure counts no attempt, and the
    /// number is unchanged.
    pub fn attempts(&self) -> i32 {
        self.attempts
    }
    /// `true` when the event became a dead letter (`status = 'failed'`); otherwise it will be
    /// retried after a backoff.
    pub fn is_dead_letter(&self) -> bool {
        self.dead_letter
    }
}

/// One item of a [`DeliveryStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryEvent {
    /// An event was delivered and confirmed.
    Delivered(DeliveryAck),
    /// A delivery attempt failed.
    Failed(DeliveryFailure),
    /// This subscriber fell behind by more than the stream's buffer; `missed` items were dropped
    /// for it (the relay never waits for a subscriber).
    Lagged {
        /// How many items this subscriber missed.
        missed: u64,
    },
}

/// The stream returned by [`Outbox::subscribe`](crate::Outbox::subscribe).
///
/// Yields every [`DeliveryEvent`] the relay produces after the call, in the order the relay
/// confirmed them (per aggregate: delivery order). Each subscriber has its own buffer of
/// `ack_buffer` items; a subscriber that falls behind gets [`DeliveryEvent::Lagged`] and
/// continues with newer items. The stream ends when the relay has stopped.
pub struct DeliveryStream {
    inner: BroadcastStream<DeliveryEvent>,
}

impl std::fmt::Debug for DeliveryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryStream").finish_non_exhaustive()
    }
}

impl Stream for DeliveryStream {
    type Item = DeliveryEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|item| {
            item.map(|r| match r {
                Ok(ev) => ev,
                Err(BroadcastStreamRecvError::Lagged(missed)) => DeliveryEvent::Lagged { missed },
            })
        })
    }
}

/// Hands out subscriptions; closed when the relay stops.
#[derive(Debug, Clone)]
pub(crate) struct Hub {
    sender: Arc<Mutex<Option<broadcast::Sender<DeliveryEvent>>>>,
    capacity: usize,
}

impl Hub {
    pub(crate) fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Hub {
            sender: Arc::new(Mutex::new(Some(tx))),
            capacity,
        }
    }

    pub(crate) fn subscribe(&self) -> DeliveryStream {
        let guard = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let rx = match guard.as_ref() {
            Some(tx) => tx.subscribe(),
            // Stopped: a stream that ends at once.
            None => broadcast::channel(self.capacity).1,
        };
        DeliveryStream {
            inner: BroadcastStream::new(rx),
        }
    }

    /// The sender, for the relay; `None` once closed.
    pub(crate) fn sender(&self) -> Option<broadcast::Sender<DeliveryEvent>> {
        self.sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ends every stream once the relay drops its sender clones.
    pub(crate) fn close(&self) {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
