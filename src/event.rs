//! Events: what callers enqueue ([`NewEvent`]) and what [`find`](crate::Outbox::find) returns ([`Event`]).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Longest `aggregate_id`, `event_topic` and `event_type`, in characters: the original table's
/// `varchar(100)` columns.
pub const MAX_COLUMN_CHARS: usize = 100;

/// Longest Kafka topic name, in characters (Kafka's `Topic.MAX_NAME_LENGTH`).
pub const MAX_TOPIC_CHARS: usize = 249;

/// Header names the relay sets on every record; custom headers may not use them.
pub const RESERVED_HEADERS: [&str; 2] = ["event_id", "event_type"];

/// An event to write into the outbox table inside the caller's transaction.
///
/// The relay publishes it as a Kafka record: topic = `topic`, key = `aggregate_id`, value = the
/// payload's JSON text, headers `event_id`, `event_type` plus [`header`](NewEvent::header)s.
///
/// The payload is stored as Postgres `jsonb`, which normalizes it: object keys may come back
/// reordered and whitespace is removed, so the Kafka value is equivalent JSON, not the same bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub(crate) topic: String,
    pub(crate) aggregate_id: String,
    pub(crate) event_type: String,
    pub(crate) payload: String,
    pub(crate) headers: BTreeMap<String, String>,
}

impl AsRef<NewEvent> for NewEvent {
    fn as_ref(&self) -> &NewEvent {
        self
    }
}

impl NewEvent {
    /// An event with a JSON payload.
    ///
    /// Nothing is checked here; [`add_new_event`](crate::add_new_event) validates every field.
    pub fn new(
        topic: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        NewEvent {
            topic: topic.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: payload.to_string(),
            headers: BTreeMap::new(),
        }
    }

    /// An event whose payload is any `Serialize` value, serialized to JSON.
    ///
    /// # Errors
    /// [`Error::Serialize`] when `serde_json` cannot serialize the payload (for example a map with
    /// non-string keys).
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self> {
        Ok(NewEvent {
            topic: topic.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: serde_json::to_string(payload)?,
            headers: BTreeMap::new(),
        })
    }

    /// Adds a custom Kafka header (stored in the `headers jsonb` column). A later value for the
    /// same name replaces the earlier one. `event_id` and `event_type` are reserved.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The Kafka topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The aggregate id (the Kafka key; events of one aggregate are delivered in order).
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// The event type (the `event_type` header).
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload as JSON text.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// Custom headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// Checks every rule; the first broken one is returned.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_topic(&self.topic)?;
        check_column("aggregate_id", &self.aggregate_id)?;
        check_column("event_type", &self.event_type)?;
        // jsonb cannot hold U+0000; Postgres would abort the caller's transaction.
        if has_nul_escape(&self.payload) {
            return Err(Error::invalid_event(
                "payload",
                "contains \\u0000, which Postgres jsonb cannot store",
            ));
        }
        for (name, value) in &self.headers {
            check_header(name, value)?;
        }
        Ok(())
    }
}

/// Whether JSON text holds a real NUL character (the escape `\u0000`, which jsonb cannot
/// store), as opposed to the text `\u0000` after an escaped backslash (`"C:\\u0000"`, which it
/// can). Escapes are read pairwise, so `\\` never starts another escape.
pub(crate) fn has_nul_escape(json: &str) -> bool {
    let b = json.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'u') && b.get(i + 2..i + 6) == Some(b"0000".as_slice()) {
                return true;
            }
            i += 2; // the escaped character, whatever it is
        } else {
            i += 1;
        }
    }
    false
}

fn check_header(name: &str, value: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_event("headers", "a header name is empty"));
    }
    if RESERVED_HEADERS.contains(&name) {
        return Err(Error::invalid_event(
            "headers",
            format!(
                "`{}` is reserved: the relay sets it on every record",
                name.escape_debug()
            ),
        ));
    }
    if name.contains('\0') || value.contains('\0') {
        return Err(Error::invalid_event(
            "headers",
            format!("header `{}` contains a NUL character", name.escape_debug()),
        ));
    }
    Ok(())
}

/// Checks a row that another writer (plain SQL, the Go package) put into the table against the
/// rules [`NewEvent`]'s writers enforce: topic name, column lengths, non-empty key and type. The
/// payload needs no check (`jsonb` holds only valid JSON without U+0000), and custom headers are
/// not a reason to refuse the event: the relay publishes the valid ones and reports the rest (see
/// `crate::headers`).
///
/// # Errors
/// [`Error::InvalidEvent`] naming the first broken rule.
pub(crate) fn validate_row(topic: &str, aggregate_id: &str, event_type: &str) -> Result<()> {
    validate_topic(topic)?;
    check_column("aggregate_id", aggregate_id)?;
    check_column("event_type", event_type)
}

fn check_column(field: &'static str, value: &str) -> Result<()> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err(Error::invalid_event(field, "must not be empty"));
    }
    if chars > MAX_COLUMN_CHARS {
        return Err(Error::invalid_event(
            field,
            format!("{chars} characters; the outbox table's {field} column holds at most {MAX_COLUMN_CHARS} (varchar(100))"),
        ));
    }
    if value.contains('\0') {
        return Err(Error::invalid_event(
            field,
            "contains a NUL character, which Postgres text cannot store",
        ));
    }
    Ok(())
}

/// Checks a Kafka topic name: 1–249 characters of `[A-Za-z0-9._-]`, not `.` or `..` (Kafka's
/// `org.apache.kafka.common.internals.Topic.validate`), and at most 100 characters, the
/// `event_topic` column's limit.
///
/// # Errors
/// [`Error::InvalidEvent`] with field `event_topic`, naming the rule that was broken.
pub fn validate_topic(topic: &str) -> Result<()> {
    const FIELD: &str = "event_topic";
    if topic.is_empty() {
        return Err(Error::invalid_event(FIELD, "must not be empty"));
    }
    if topic == "." || topic == ".." {
        return Err(Error::invalid_event(
            FIELD,
            format!("`{topic}` is not allowed as a Kafka topic name"),
        ));
    }
    if let Some(bad) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid_event(
            FIELD,
            format!(
                "`{}` contains {:?}; Kafka topic names use only ASCII letters, digits, '.', '_' and '-'",
                topic.escape_debug(),
                bad
            ),
        ));
    }
    let len = topic.len();
    if len > MAX_TOPIC_CHARS {
        return Err(Error::invalid_event(
            FIELD,
            format!("{len} characters; Kafka topic names are at most {MAX_TOPIC_CHARS}"),
        ));
    }
    if len > MAX_COLUMN_CHARS {
        return Err(Error::invalid_event(
            FIELD,
            format!("{len} characters; the outbox table's event_topic column holds at most {MAX_COLUMN_CHARS} (varchar(100))"),
        ));
    }
    Ok(())
}

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventStatus {
    /// Waiting to be published (`status = 'new'`), possibly after failed attempts.
    New,
    /// Published; Kafka acknowledged it (`status = 'done'`).
    Done,
    /// A dead letter: failed permanently or too often (`status = 'failed'`); see `last_error`.
    Failed,
}

impl EventStatus {
    /// The value stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::New => "new",
            EventStatus::Done => "done",
            EventStatus::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "new" => Some(EventStatus::New),
            "done" => Some(EventStatus::Done),
            "failed" => Some(EventStatus::Failed),
            _ => None,
        }
    }
}

impl std::fmt::Display for EventStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the outbox table, as returned by [`find`](crate::Outbox::find).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub(crate) id: Uuid,
    pub(crate) seq: i64,
    pub(crate) aggregate_id: String,
    pub(crate) topic: String,
    pub(crate) event_type: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) status: EventStatus,
    pub(crate) created_at: Option<NaiveDateTime>,
    pub(crate) reserved_to: Option<NaiveDateTime>,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) next_attempt_at: Option<DateTime<Utc>>,
    pub(crate) published_at: Option<DateTime<Utc>>,
    pub(crate) partition: Option<i32>,
    pub(crate) offset: Option<i64>,
    pub(crate) created_at_tz: Option<DateTime<Utc>>,
    pub(crate) problems: Vec<String>,
    pub(crate) unpublished_headers: Vec<String>,
}

impl Event {
    /// Values of this row the crate could not represent, one sentence each naming the column:
    /// a timestamp of `infinity` / `-infinity` or outside chrono's range (its accessor returns
    /// `None`), a payload or headers that are not decodable JSON, e.g. nested deeper than 128
    /// levels (the payload reads as `null`, the headers as empty). Empty for ordinary rows.
    pub fn decode_problems(&self) -> &[String] {
        &self.problems
    }
    /// The event id (the `event_id` header).
    pub fn id(&self) -> Uuid {
        self.id
    }
    /// Insertion order (`seq`): the order the relay publishes one aggregate's events in.
    pub fn seq(&self) -> i64 {
        self.seq
    }
    /// The aggregate id (the Kafka key).
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }
    /// The Kafka topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// The payload. A payload nested deeper than 128 levels (possible in rows written by SQL)
    /// cannot be parsed into a `Value`: it is given as a JSON string holding its text.
    pub fn payload(&self) -> &serde_json::Value {
        &self.payload
    }
    /// Custom headers as stored: a value that is not a JSON string is given as its JSON text.
    /// The relay publishes only string values under names it does not set itself: see
    /// [`unpublished_headers`](Self::unpublished_headers) for what it leaves out.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }
    /// The row's custom headers the relay does not publish, one sentence each, as its warning
    /// words them: a value that is not a JSON string, a name the relay sets itself (`event_id`,
    /// `event_type`), or a `headers` column that is not a JSON object (then no custom header is
    /// published). A relay running with `cloudevents_source` also leaves out the names of the
    /// CloudEvents attributes (`ce_*`, `content-type`), which this list does not include. Empty
    /// for rows written by [`Writer`](crate::Writer), which refuses such headers.
    pub fn unpublished_headers(&self) -> &[String] {
        &self.unpublished_headers
    }
    /// The status.
    pub fn status(&self) -> EventStatus {
        self.status
    }
    /// When the row was inserted, as the writer's wall-clock time in the writer's session time
    /// zone (`created_at timestamp`, the original Go package's column; `None` when a writer set
    /// it to null). Zone-dependent: use [`created_at_tz`](Self::created_at_tz) for ages.
    pub fn created_at(&self) -> Option<NaiveDateTime> {
        self.created_at
    }
    /// When the row was inserted, as an absolute time (`created_at_tz timestamptz`, the start of
    /// the writer's transaction, whatever the writer's time zone). Every age the relay reports
    /// (pending age, `status`, health, commit-to-ack) is measured from it. `None` only when a
    /// writer stored a value this crate cannot represent (`±infinity`; see
    /// [`decode_problems`](Self::decode_problems)).
    pub fn created_at_tz(&self) -> Option<DateTime<Utc>> {
        self.created_at_tz
    }
    /// A reservation written by the original Go relay (this crate reserves with row locks).
    pub fn reserved_to(&self) -> Option<NaiveDateTime> {
        self.reserved_to
    }
    /// Delivery attempts that ended in an error so far.
    pub fn attempts(&self) -> i32 {
        self.attempts
    }
    /// The error of the last failed attempt, if any.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    /// Earliest time of the next attempt after a failure (backoff), if any.
    pub fn next_attempt_at(&self) -> Option<DateTime<Utc>> {
        self.next_attempt_at
    }
    /// When the relay confirmed Kafka's acknowledgement of the event: the start of the confirm
    /// statement, after the acknowledgement (at most the batch timeout later; for a late report,
    /// when it was confirmed).
    pub fn published_at(&self) -> Option<DateTime<Utc>> {
        self.published_at
    }
    /// The Kafka partition it was written to.
    pub fn partition(&self) -> Option<i32> {
        self.partition
    }
    /// The Kafka offset it was written at.
    pub fn offset(&self) -> Option<i64> {
        self.offset
    }
}

/// Filters for [`find`](crate::Outbox::find) (the original's `FindEventsFilters`, filled in).
///
/// All set filters must match. Results are ordered by `seq` ascending and paged with a keyset
/// cursor: pass the last returned event's [`seq`](Event::seq) to [`after_seq`](Self::after_seq).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub(crate) statuses: Vec<EventStatus>,
    pub(crate) aggregate_id: Option<String>,
    pub(crate) topic: Option<String>,
    pub(crate) event_type: Option<String>,
    pub(crate) ids: Vec<Uuid>,
    pub(crate) created_from: Option<NaiveDateTime>,
    pub(crate) created_to: Option<NaiveDateTime>,
    pub(crate) after_seq: Option<i64>,
    pub(crate) limit: Option<u32>,
}

/// Default page size of [`find`](crate::Outbox::find), in events.
pub const DEFAULT_FIND_LIMIT: u32 = 100;
/// Largest page size of [`find`](crate::Outbox::find), in events.
pub const MAX_FIND_LIMIT: u32 = 10_000;

impl EventFilter {
    /// A filter matching everything (first page of [`DEFAULT_FIND_LIMIT`] events).
    pub fn new() -> Self {
        Self::default()
    }
    /// Only events with this status (call again to allow several).
    pub fn status(mut self, status: EventStatus) -> Self {
        self.statuses.push(status);
        self
    }
    /// Only events of this aggregate.
    pub fn aggregate_id(mut self, aggregate_id: impl Into<String>) -> Self {
        self.aggregate_id = Some(aggregate_id.into());
        self
    }
    /// Only events for this topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }
    /// Only events of this type.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }
    /// Only these event ids.
    pub fn ids(mut self, ids: impl IntoIterator<Item = Uuid>) -> Self {
        self.ids.extend(ids);
        self
    }
    /// Only events created at or after `from` (`created_at`, session time zone).
    pub fn created_from(mut self, from: NaiveDateTime) -> Self {
        self.created_from = Some(from);
        self
    }
    /// Only events created before `to` (exclusive).
    pub fn created_to(mut self, to: NaiveDateTime) -> Self {
        self.created_to = Some(to);
        self
    }
    /// Keyset cursor: only events with `seq` greater than this.
    pub fn after_seq(mut self, seq: i64) -> Self {
        self.after_seq = Some(seq);
        self
    }
    /// Page size in events, 1..=[`MAX_FIND_LIMIT`] (default [`DEFAULT_FIND_LIMIT`]).
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }
}
