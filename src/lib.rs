//! # outbox — the transactional outbox for Postgres and Kafka
//!
//! Services write domain events into a Postgres table inside their own business transactions;
//! the relay streams those rows to Kafka — in order per aggregate, with millisecond latency — so
//! no service ever does a dual write.
//!
//! ```no_run
//! use outbox::{NewEvent, Outbox};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = Outbox::builder()
//!     .database_url("postgres://app@localhost/app")
//!     .kafka_brokers("localhost:9092")
//!     .migrate(true)
//!     .connect()
//!     .await?;
//! outbox.start()?; // the relay, on a Tokio task
//!
//! // In your own transaction:
//! let (mut client, conn) =
//!     tokio_postgres::connect("postgres://app@localhost/app", tokio_postgres::NoTls).await?;
//! tokio::spawn(conn);
//! let tx = client.transaction().await?;
//! // … your business writes …
//! outbox::add_new_event(&tx, NewEvent::new("orders", "order-42", "OrderPlaced", json!({"total": 10}))).await?;
//! tx.commit().await?;
//!
//! outbox.stop(std::time::Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - **At-least-once.** An event whose transaction committed is published; nothing is published
//!   for a transaction that rolled back. A row is marked done only after Kafka's delivery report
//!   said OK. Crashes or a failed confirmation can publish an event again, always with the same
//!   `event_id` header and key: deduplicate by `event_id`.
//! - **Order per aggregate.** Events of one aggregate (the Kafka key, so one partition) reach
//!   Kafka in insertion order (`seq`), across retries, restarts and several relays: a relay hands
//!   an aggregate's next event to the producer only after the previous one was acknowledged, and
//!   never reserves an aggregate's event while an earlier one is unfinished (in flight elsewhere,
//!   waiting for a retry, or a dead letter under [`DeadLetterPolicy::BlockAggregate`]). A
//!   duplicate appears only as a replay of an event that was already published, before the
//!   aggregate's later events.
//! - **Reservations are row locks.** A relay reserves a batch with `FOR UPDATE SKIP LOCKED` in a
//!   transaction that stays open while the batch is published (bounded by the lease through
//!   `idle_in_transaction_session_timeout`) and confirms it in one statement at commit. A relay
//!   that dies releases its rows at once; one that hangs loses them at the end of the lease and
//!   cannot confirm them afterwards.
//!
//! ## Wake path
//!
//! An insert trigger NOTIFYs the channel (empty payload: the table is the source of truth) — but
//! only while a relay is idle and waiting, announced with an advisory lock, so busy writers do not
//! pay NOTIFY's commit-time lock. A poll interval is the safety net.
//!
//! ## Features
//!
//! | feature | adds |
//! |---|---|
//! | `testing` | `outbox::testing`: a throwaway Postgres, an embedded Kafka (librdkafka's mock cluster), consume-back and `assert_published` helpers |
//! | `cli` | the `outbox-relay` binary (migrate, run, status, find, requeue; Prometheus `/metrics` and `/health`) |
//! | `sqlx` | `Writer::add_new_event_sqlx` inside a `sqlx::Transaction` |
//! | `postgres-rustls` | `OutboxBuilder::postgres_tls` and `Admin::connect_rustls`: Postgres over TLS |
//! | `kafka-ssl` | librdkafka with OpenSSL: TLS and SASL/SCRAM through [`OutboxBuilder::kafka_property`] |
//!
//! ## Observability
//!
//! Counters, gauges and a commit-to-ack histogram go through the `metrics` facade
//! (`outbox_events_delivered_total`, `outbox_backlog_events`, `outbox_commit_to_ack_seconds`, …);
//! [`Outbox::health`] and [`Outbox::stats`] give the same in code; each batch runs in a
//! `outbox_batch` tracing span, with its event ids at debug level.
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
// One `unsafe` call, allowed where it is made: `relay::producer::send_now`.
#![deny(unsafe_code)]

mod admin;
mod cloudevents;
mod config;
mod delivery;
mod error;
mod event;
mod headers;
mod otel;
mod outbox;
mod pg;
mod relay;
mod schema;
mod schema_check;
mod store;
mod text;
mod writer;

#[cfg(feature = "testing")]
pub mod testing;

pub use crate::admin::{
    Admin, OldestTransaction, OutboxStatus, RequeueFilter, TopicStatus, MIGRATE_TIMEOUT_FACTOR,
};
pub use crate::config::{
    DeadLetterPolicy, OnDelivery, OutboxBuilder, Settings, WakeMode, DEFAULT_CHANNEL, DEFAULT_TABLE,
};
pub use crate::delivery::{DeliveryAck, DeliveryEvent, DeliveryFailure, DeliveryStream};
pub use crate::error::{ConfigErrors, Error, Result};
pub use crate::event::{
    validate_topic, Event, EventFilter, EventStatus, NewEvent, DEFAULT_FIND_LIMIT,
    MAX_COLUMN_CHARS, MAX_FIND_LIMIT, MAX_TOPIC_CHARS, RESERVED_HEADERS,
};
pub use crate::outbox::{Health, Outbox, RelayStats};
pub use crate::schema::{
    migrate, migrate_table, validate_identifier, wake_lock, MigrationReport, MAX_IDENTIFIER_LEN,
    SCHEMA_VERSION,
};
pub use crate::writer::{add_new_event, add_new_events, Writer};

/// The README's Rust code blocks, run by `cargo test --doc` exactly as the README shows them
/// (no hidden lines), so that a reader can copy them; a warning (an unused `mut`, say) fails them.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
#[doc(test(attr(deny(warnings))))]
pub struct ReadmeDoctests;

impl OutboxBuilder {
    /// Validates every setting (all problems reported at once), connects to Postgres, runs or
    /// checks the migrations, and creates the idempotent producer (`enable.idempotence=true`,
    /// `acks=all`). The relay does not run until [`Outbox::run`] or [`Outbox::start`].
    ///
    /// Before anything else touches Postgres, a self-test refuses a pooler in transaction or
    /// statement pooling mode (see the README's "Connection poolers").
    ///
    /// # Errors
    /// [`Error::Config`] listing every invalid setting, or naming transaction pooling and the
    /// fix; [`Error::Postgres`] when Postgres is unreachable; [`Error::Timeout`] when it does not
    /// answer within `postgres_timeout` (the connect timeout); [`Error::Schema`] when the table
    /// is missing, not migrated (and `migrate` is off), has missing objects (each named), or was
    /// migrated for another channel.
    pub async fn connect(self) -> Result<Outbox> {
        Outbox::connect(self).await
    }
}
