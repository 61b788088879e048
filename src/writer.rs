//! Enqueueing events inside the caller's transaction.

use std::sync::Arc;

use postgres_types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::config::DEFAULT_TABLE;
use crate::error::Result;
use crate::event::NewEvent;
use crate::schema::validate_identifier;
use crate::store::{JsonText, WriterSql};

/// Writes events into one outbox table. Cheap to clone; holds no connection.
///
/// Each method runs on the client you pass, so the event commits or rolls back with your
/// transaction: pass a `tokio_postgres::Transaction` (or a deadpool-postgres transaction, which
/// dereferences to one). With a bare `Client` the insert commits on its own.
#[derive(Debug, Clone)]
pub struct Writer {
    sql: Arc<WriterSql>,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new(DEFAULT_TABLE).expect("the default table name is valid")
    }
}

impl Writer {
    /// A writer for `table`.
    ///
    /// # Errors
    /// [`Error::InvalidIdentifier`](crate::Error::InvalidIdentifier) when `table` is not a plain
    /// lower-case identifier of at most 48 bytes.
    pub fn new(table: &str) -> Result<Self> {
        validate_identifier("table", table)?;
        Ok(Writer {
            sql: Arc::new(WriterSql::new(table)),
        })
    }

    pub(crate) fn from_sql(sql: Arc<WriterSql>) -> Self {
        Writer { sql }
    }

    /// The table this writer inserts into.
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// Inserts one event; returns its id (a UUIDv7, time-ordered).
    ///
    /// One round trip. The relay publishes the event once the caller's transaction commits;
    /// nothing is published if it rolls back.
    ///
    /// # Errors
    /// [`Error::InvalidEvent`](crate::Error::InvalidEvent) naming the field when the event breaks
    /// a rule (nothing is sent to Postgres then, so the caller's transaction stays usable);
    /// [`Error::Postgres`](crate::Error::Postgres) when the insert fails.
    pub async fn add_new_event<C: GenericClient>(
        &self,
        client: &C,
        event: impl AsRef<NewEvent>,
    ) -> Result<Uuid> {
        let event = event.as_ref();
        event.validate()?;
        let id = Uuid::now_v7();
        let headers = headers_json(event);
        let headers_param = headers.as_deref().map(JsonText);
        client
            .query_typed(
                &self.sql.insert_one,
                &[
                    (&id as &(dyn ToSql + Sync), Type::UUID),
                    (&event.aggregate_id, Type::VARCHAR),
                    (&event.topic, Type::VARCHAR),
                    (&event.event_type, Type::VARCHAR),
                    (&JsonText(&event.payload), Type::JSONB),
                    (&headers_param, Type::JSONB),
                ],
            )
            .await?;
        Ok(id)
    }

    /// Inserts many events in one statement, in the given order (so one aggregate's events are
    /// published in that order); returns their ids in the same order.
    ///
    /// # Errors
    /// As [`add_new_event`](Self::add_new_event); when any event is invalid, none is inserted.
    pub async fn add_new_events<C: GenericClient>(
        &self,
        client: &C,
        events: &[NewEvent],
    ) -> Result<Vec<Uuid>> {
        for e in events {
            e.validate()?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
        let aggregates: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
        let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let payloads: Vec<JsonText<'_>> = events.iter().map(|e| JsonText(&e.payload)).collect();
        let headers: Vec<Option<String>> = events.iter().map(headers_json).collect();
        let headers: Vec<Option<JsonText<'_>>> =
            headers.iter().map(|h| h.as_deref().map(JsonText)).collect();
        client
            .query_typed(
                &self.sql.insert_many,
                &[
                    (&ids as &(dyn ToSql + Sync), Type::UUID_ARRAY),
                    (&aggregates, Type::TEXT_ARRAY),
                    (&topics, Type::TEXT_ARRAY),
                    (&types, Type::TEXT_ARRAY),
                    (&payloads, Type::JSONB_ARRAY),
                    (&headers, Type::JSONB_ARRAY),
                ],
            )
            .await?;
        Ok(ids)
    }
}

#[cfg(feature = "sqlx")]
impl Writer {
    /// [`add_new_event`](Self::add_new_event) for sqlx: pass `&mut *tx` where `tx` is a
    /// `sqlx::Transaction<'_, sqlx::Postgres>` (or any `&mut PgConnection`), so the event commits
    /// or rolls back with your sqlx transaction.
    ///
    /// # Errors
    /// [`Error::InvalidEvent`](crate::Error::InvalidEvent) naming the field (nothing is sent);
    /// [`Error::Sqlx`](crate::Error::Sqlx) when the insert fails.
    pub async fn add_new_event_sqlx(
        &self,
        conn: &mut sqlx::PgConnection,
        event: impl AsRef<NewEvent>,
    ) -> Result<Uuid> {
        let event = event.as_ref();
        event.validate()?;
        let id = Uuid::now_v7();
        let payload: &sqlx::types::JsonRawValue = serde_json::from_str(&event.payload)?;
        let headers: Option<Box<sqlx::types::JsonRawValue>> = headers_json(event)
            .map(sqlx::types::JsonRawValue::from_string)
            .transpose()?;
        sqlx::query(&self.sql.insert_one)
            .bind(id)
            .bind(&event.aggregate_id)
            .bind(&event.topic)
            .bind(&event.event_type)
            .bind(sqlx::types::Json(payload))
            .bind(headers.as_deref().map(sqlx::types::Json))
            .execute(conn)
            .await?;
        Ok(id)
    }
}

/// The event's headers as JSON text, with the caller's trace context (`traceparent`,
/// `tracestate`) added under feature `opentelemetry` unless the event sets `traceparent` (any case).
fn headers_json(event: &NewEvent) -> Option<String> {
    if let Some(trace) = crate::otel::writer_headers(&event.headers) {
        let mut headers = event.headers.clone();
        headers.extend(trace);
        return Some(serde_json::to_string(&headers).expect("string maps serialize"));
    }
    if event.headers.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&event.headers).expect("string maps serialize"))
    }
}

/// Inserts one event into the default table `events` inside the caller's transaction; returns
/// its id. See [`Writer::add_new_event`] for another table.
///
/// # Errors
/// As [`Writer::add_new_event`].
pub async fn add_new_event<C: GenericClient>(
    client: &C,
    event: impl AsRef<NewEvent>,
) -> Result<Uuid> {
    Writer::default().add_new_event(client, event).await
}

/// Inserts many events into the default table `events` in one statement; returns their ids.
///
/// # Errors
/// As [`Writer::add_new_events`].
pub async fn add_new_events<C: GenericClient>(
    client: &C,
    events: &[NewEvent],
) -> Result<Vec<Uuid>> {
    Writer::default().add_new_events(client, events).await
}
