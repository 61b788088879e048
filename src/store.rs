//! All SQL the crate runs against the outbox table, rendered once per table name.
//!
//! Table and channel names are validated identifiers (see `schema::validate_identifier`), so
//! formatting them into statements is safe; every value is a bind parameter.

use std::collections::BTreeMap;

use bytes::BufMut;
use postgres_types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::Row;

use crate::event::{Event, EventFilter, EventStatus, DEFAULT_FIND_LIMIT};

/// Columns returned by the reservation, in order.
pub(crate) const RESERVED_COLUMNS: &str =
    "id, seq, aggregate_id, event_topic, event_type, payload, headers, attempts, created_at_tz";

/// Columns returned by `find`, in order.
const EVENT_COLUMNS: &str = "id, seq, aggregate_id, event_topic, event_type, payload, headers, status, \
     created_at, reserved_to, attempts, last_error, next_attempt_at, published_at, kafka_partition, kafka_offset, \
     created_at_tz";

/// Outcome codes of the confirm statement.
pub(crate) mod outcome {
    /// Kafka acknowledged it: done (or deleted).
    pub(crate) const DELIVERED: i16 = 0;
    /// Failed, will be retried after `delay_ms`.
    pub(crate) const RETRY: i16 = 1;
    /// Failed permanently or too often: dead letter.
    pub(crate) const DEAD: i16 = 2;
    /// Sent, no delivery report yet: no relay may send it again for `delay_ms`.
    pub(crate) const HOLD: i16 = 3;
}

#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) table: String,
    /// The NOTIFY channel, bound as a parameter of [`Store::notify`], never formatted into SQL.
    pub(crate) channel: String,
    pub(crate) insert_one: String,
    pub(crate) insert_many: String,
    pub(crate) reserve: String,
    pub(crate) confirm: String,
    pub(crate) late_confirm: String,
    pub(crate) late_fail: String,
    pub(crate) late_release: String,
    pub(crate) fence: String,
    pub(crate) fence_expire: String,
    pub(crate) unfence: String,
    pub(crate) cleanup: String,
    pub(crate) requeue: String,
    pub(crate) notify: String,
    pub(crate) status: String,
    pub(crate) status_relays: String,
}

/// The session whose snapshot is the oldest in this database (it holds back cleanup of dead
/// rows): pid, application_name, state, seconds since its transaction (or statement) began.
/// Sessions of other roles show their `backend_xmin` only to roles with `pg_read_all_stats`.
pub(crate) const OLDEST_TRANSACTION: &str =
    "select pid, coalesce(application_name, ''), coalesce(state, ''),
            greatest(0, extract(epoch from clock_timestamp())
                        - extract(epoch from coalesce(xact_start, query_start, backend_start)))::float8
       from pg_stat_activity
      where backend_xmin is not null and pid <> pg_backend_pid()
        and datname = current_database()
      order by age(backend_xmin) desc, xact_start
      limit 1";

impl Store {
    /// `block_on_dead_letter`: whether a dead letter holds back the later events of its aggregate.
    /// `delete_on_delivery`: delete delivered rows instead of marking them done.
    pub(crate) fn new(
        table: &str,
        channel: &str,
        block_on_dead_letter: bool,
        delete_on_delivery: bool,
    ) -> Self {
        let t = table;
        let open = if block_on_dead_letter {
            "e.status <> 'done'"
        } else {
            "e.status <> 'done' and e.status = 'new'"
        };
        // Reserve: lock the earliest available rows (the lock is the lease: it lasts as long as
        // the relay's batch transaction), then keep, per aggregate, only the rows before the
        // first open row of that aggregate that this batch did not get (in backoff, held, dead,
        // or locked by another relay): an aggregate's later event never overtakes an earlier one.
        // The probe stops at the aggregate's last candidate: an open row after all of them
        // excludes nothing.
        let reserve = format!(
            "with cand as materialized (
                 select {RESERVED_COLUMNS}
                   from {t}
                  where status = 'new'
                    and (reserved_to is null or reserved_to < localtimestamp)
                    and (next_attempt_at is null or next_attempt_at <= now())
                    and aggregate_id not in (select unnest(aggregates) from {t}_fence
                                              where until > now())
                  order by seq
                  limit $1
                    for update skip locked
             ),
             gate as (
                 select a.aggregate_id, g.seq as gap
                   from (select aggregate_id, max(seq) as max_seq from cand group by aggregate_id) a
                   left join lateral (
                        select e.seq from {t} e
                         where e.aggregate_id = a.aggregate_id and {open}
                           and e.seq < a.max_seq
                           and e.id not in (select id from cand)
                         order by e.seq
                         limit 1
                   ) g on true
             )
             select c.id, c.seq, c.aggregate_id, c.event_topic, c.event_type, c.payload, c.headers,
                    c.attempts, case when isfinite(c.created_at_tz)
                               then greatest(0, extract(epoch from now() - c.created_at_tz))::float8
                               end
               from cand c join gate g on g.aggregate_id = c.aggregate_id
              where g.gap is null or c.seq < g.gap
              order by c.seq"
        );
        // Confirm: one statement per batch for every outcome, deleting the batch's fence.
        // `published_at` is the confirm statement's start: after Kafka acknowledged every
        // delivered row of the batch (not `now()`, the batch transaction's start, which is the
        // reservation).
        let update = format!(
            "update {t} e set
                 status = case u.outcome when 0 then 'done' when 2 then 'failed' else e.status end,
                 published_at = case when u.outcome = 0 then statement_timestamp() else e.published_at end,
                 kafka_partition = case when u.outcome = 0 then u.part else e.kafka_partition end,
                 kafka_offset = case when u.outcome = 0 then u.off else e.kafka_offset end,
                 attempts = e.attempts + case when u.outcome in (1, 2) then 1 else 0 end,
                 last_error = case when u.outcome = 0 then null else coalesce(u.error, e.last_error) end,
                 next_attempt_at = case when u.outcome in (1, 3)
                                        then now() + u.delay_ms * interval '1 millisecond' end,
                 reserved_to = null
               from unnest($1::uuid[], $2::int2[], $3::int4[], $4::int8[], $5::text[], $6::int8[])
                    as u(id, outcome, part, off, error, delay_ms)
              where e.id = u.id"
        );
        let unfence = format!("unfenced as (delete from {t}_fence where batch_id = $7)");
        let confirm = if delete_on_delivery {
            format!(
                "with {unfence},
                 delivered as (
                     delete from {t} where id = any(
                         select u.id from unnest($1::uuid[], $2::int2[]) as u(id, outcome)
                          where u.outcome = 0)
                 )
                 {update} and u.outcome <> 0"
            )
        } else {
            format!("with {unfence} {update}")
        };
        // A held row (sent, no report before the batch committed) whose report arrived while the
        // hold lasts: nobody else can have taken it, because reservation skips held rows.
        let late_confirm = if delete_on_delivery {
            format!("delete from {t} where id = $1 and status = 'new' and next_attempt_at > now()")
        } else {
            format!(
                "update {t} set status = 'done', published_at = now(), kafka_partition = $2,
                        kafka_offset = $3, last_error = null, next_attempt_at = null, reserved_to = null
                  where id = $1 and status = 'new' and next_attempt_at > now()"
            )
        };
        let late_fail = format!(
            "update {t} set attempts = attempts + 1, last_error = $2,
                    status = case when $4::bool then 'failed' else status end,
                    next_attempt_at = case when $4::bool then null
                                           else now() + $3::int8 * interval '1 millisecond' end
              where id = $1 and status = 'new' and next_attempt_at > now()"
        );
        let cleanup = format!(
            "delete from {t} where id in (
                 select id from {t}
                  where status = 'done'
                    and (published_at < now() - $1::float8 * interval '1 millisecond'
                         or (published_at is null
                             and created_at_tz < now() - $1::float8 * interval '1 millisecond'))
                  limit $2)"
        );
        Store {
            table: t.to_string(),
            channel: channel.to_string(),
            insert_one: format!(
                "insert into {t} (id, aggregate_id, event_topic, event_type, payload, headers)
                 values ($1, $2, $3, $4, $5, $6)"
            ),
            insert_many: format!(
                "insert into {t} (id, aggregate_id, event_topic, event_type, payload, headers)
                 select id, aggregate_id, event_topic, event_type, payload, headers
                   from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
                        with ordinality as u(id, aggregate_id, event_topic, event_type, payload, headers, ord)
                  order by ord"
            ),
            reserve,
            confirm,
            late_confirm,
            late_fail,
            fence: format!(
                "insert into {t}_fence (batch_id, until, aggregates)
                 values ($1, now() + $2::int8 * interval '1 millisecond', $3)"
            ),
            fence_expire: format!("delete from {t}_fence where until < now()"),
            unfence: format!("delete from {t}_fence where batch_id = $1"),
            late_release: format!(
                "update {t} set next_attempt_at = null
                  where id = $1 and status = 'new' and next_attempt_at > now()"
            ),
            cleanup,
            // Dead letters back to pending, keeping their seq: each goes out before its
            // aggregate's later events, which were blocked behind it.
            requeue: format!(
                "update {t} set status = 'new', attempts = 0, next_attempt_at = null, reserved_to = null
                  where status = 'failed'
                    and ($1::uuid[] is null or id = any($1))
                    and ($2::text is null or aggregate_id = $2)
                    and ($3::text is null or event_topic = $3)"
            ),
            // `$1` = the channel: a bind parameter, never SQL text.
            notify: "select pg_notify($1, '')".to_string(),
            status: format!(
                "select event_topic,
                        count(*) filter (where status = 'new'),
                        count(*) filter (where status = 'new' and next_attempt_at > now()),
                        count(*) filter (where status = 'failed'),
                        greatest(0, extract(epoch from now() - min(created_at_tz) filter (where status = 'new' and isfinite(created_at_tz))))::float8
                   from {t} where status <> 'done'
                  group by event_topic order by event_topic"
            ),
            status_relays: format!(
                "select (select count(*) from pg_stat_activity
                          where application_name = 'outbox-relay-batch' and datname = current_database()
                            and state in ('idle in transaction', 'active') and xact_start is not null),
                        (select count(*) from {t} where reserved_to > localtimestamp)"
            ),
        }
    }

    /// Renders `find`: SQL text and its parameters.
    pub(crate) fn find_query(
        &self,
        f: &EventFilter,
    ) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let mut sql = format!("select {EVENT_COLUMNS} from {} where true", self.table);
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut push = |sql: &mut String, clause: &str, p: Box<dyn ToSql + Sync + Send>| {
            params.push(p);
            sql.push_str(&clause.replace('?', &format!("${}", params.len())));
        };
        if !f.statuses.is_empty() {
            let s: Vec<String> = f.statuses.iter().map(|s| s.as_str().to_string()).collect();
            push(&mut sql, " and status = any(?::text[])", Box::new(s));
        }
        if let Some(a) = &f.aggregate_id {
            push(&mut sql, " and aggregate_id = ?", Box::new(a.clone()));
        }
        if let Some(t) = &f.topic {
            push(&mut sql, " and event_topic = ?", Box::new(t.clone()));
        }
        if let Some(t) = &f.event_type {
            push(&mut sql, " and event_type = ?", Box::new(t.clone()));
        }
        if !f.ids.is_empty() {
            push(&mut sql, " and id = any(?)", Box::new(f.ids.clone()));
        }
        if let Some(from) = f.created_from {
            push(&mut sql, " and created_at >= ?", Box::new(from));
        }
        if let Some(to) = f.created_to {
            push(&mut sql, " and created_at < ?", Box::new(to));
        }
        if let Some(after) = f.after_seq {
            push(&mut sql, " and seq > ?", Box::new(after));
        }
        let limit = i64::from(f.limit.unwrap_or(DEFAULT_FIND_LIMIT));
        push(&mut sql, " order by seq limit ?", Box::new(limit));
        (sql, params)
    }
}

/// Maps a `find` row. Values a row can hold but this crate cannot represent (timestamps of
/// `±infinity` or outside chrono's range, JSON nested deeper than serde_json's 128 levels, …)
/// become `None` / `null` with a note in [`Event::decode_problems`]; they never panic.
///
/// # Errors
/// [`crate::Error::Schema`] when a column no longer has the type the crate created it with.
pub(crate) fn event_from_row(row: &Row) -> crate::Result<Event> {
    let mut problems = Vec::new();
    let id = get(row, 0)?;
    // A row written by SQL may nest deeper than serde_json's limit (128 levels): the payload is
    // then given as its JSON text, and the headers that can be read are kept.
    let raw_payload = get::<RawJson>(row, 5)?;
    let payload = match raw_payload.parse("payload") {
        Ok(v) => v,
        Err(p) => {
            problems.push(p);
            serde_json::Value::String(String::from_utf8_lossy(&raw_payload.0).into_owned())
        }
    };
    let headers = match get::<Option<RawJson>>(row, 6)? {
        None => BTreeMap::new(),
        Some(raw) => match raw.parse("headers") {
            Ok(v) => headers_from_json(v),
            Err(p) => {
                problems.push(p);
                crate::headers::parse(Some(&raw.0))
                    .valid
                    .into_iter()
                    .collect()
            }
        },
    };
    let status: String = get(row, 7)?;
    let mut ts = |i: usize, name: &str| -> crate::Result<Option<PgTimestamp>> {
        let v: Option<PgTimestamp> = get(row, i)?;
        Ok(match v {
            Some(PgTimestamp::Unrepresentable(what)) => {
                problems.push(format!("{name}: {what}"));
                None
            }
            other => other,
        })
    };
    let created_at = ts(8, "created_at")?.and_then(PgTimestamp::naive);
    let reserved_to = ts(9, "reserved_to")?.and_then(PgTimestamp::naive);
    let next_attempt_at = ts(12, "next_attempt_at")?.and_then(PgTimestamp::utc);
    let published_at = ts(13, "published_at")?.and_then(PgTimestamp::utc);
    let created_at_tz = ts(16, "created_at_tz")?.and_then(PgTimestamp::utc);
    Ok(Event {
        id,
        seq: get(row, 1)?,
        aggregate_id: get(row, 2)?,
        topic: get(row, 3)?,
        event_type: get(row, 4)?,
        payload,
        headers,
        // Unknown values cannot pass the check constraint; treat them as new defensively.
        status: EventStatus::parse(&status).unwrap_or(EventStatus::New),
        created_at,
        reserved_to,
        attempts: get(row, 10)?,
        last_error: get(row, 11)?,
        next_attempt_at,
        published_at,
        partition: get(row, 14)?,
        offset: get(row, 15)?,
        created_at_tz,
        problems,
    })
}

/// One column of a row; a type that does not match is a schema problem, not a panic.
fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> crate::Result<T> {
    row.try_get(idx).map_err(|e| {
        let col = &row.columns()[idx];
        crate::Error::Schema(format!(
            "column `{}` (type {}) cannot be read: {e}; was its type changed? Run `outbox-relay migrate` or restore the type",
            col.name(),
            col.type_()
        ))
    })
}

/// A `timestamp` / `timestamptz` decoded without panicking on values chrono cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PgTimestamp {
    /// A value in chrono's range (UTC for `timestamptz`, as stored for `timestamp`).
    At(chrono::NaiveDateTime),
    /// `infinity`, `-infinity`, or a value outside chrono's range: described.
    Unrepresentable(String),
}

impl PgTimestamp {
    fn naive(self) -> Option<chrono::NaiveDateTime> {
        match self {
            PgTimestamp::At(t) => Some(t),
            PgTimestamp::Unrepresentable(_) => None,
        }
    }
    fn utc(self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.naive().map(|t| t.and_utc())
    }
}

impl<'a> FromSql<'a> for PgTimestamp {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "timestamp: expected 8 bytes")?;
        // Microseconds since 2000-01-01 00:00:00; i64::MAX / MIN are ±infinity.
        let micros = i64::from_be_bytes(bytes);
        Ok(match micros {
            i64::MAX => PgTimestamp::Unrepresentable("infinity".into()),
            i64::MIN => PgTimestamp::Unrepresentable("-infinity".into()),
            m => {
                let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .ok_or("timestamp epoch")?;
                match epoch.checked_add_signed(chrono::TimeDelta::microseconds(m)) {
                    Some(t) => PgTimestamp::At(t),
                    None => PgTimestamp::Unrepresentable(format!(
                        "{m} µs from 2000-01-01 is outside the range this crate can represent"
                    )),
                }
            }
        })
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMP || *ty == Type::TIMESTAMPTZ
    }
}

impl RawJson {
    /// Parses the JSON text; a problem (e.g. nesting deeper than serde_json's 128 levels) is
    /// described, naming `column` and the size.
    fn parse(&self, column: &str) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.0).map_err(|e| {
            format!(
                "{column}: {} bytes of JSON this crate cannot decode ({e}); read it with SQL",
                self.0.len()
            )
        })
    }
}

/// Custom headers stored as a JSON object; non-string values are kept as their JSON text.
pub(crate) fn headers_from_json(v: serde_json::Value) -> BTreeMap<String, String> {
    match v {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// JSON text bound as `json`/`jsonb` without building a `serde_json::Value`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JsonText<'a>(pub(crate) &'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1); // jsonb binary format version
        }
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

/// JSON text read from a `json`/`jsonb` column without parsing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawJson(pub(crate) Vec<u8>);

impl<'a> FromSql<'a> for RawJson {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let body = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, rest)) => rest,
                _ => return Err("unsupported jsonb binary format version".into()),
            }
        } else {
            raw
        };
        Ok(RawJson(body.to_vec()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}
