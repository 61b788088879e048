//! The SQL layer: every statement the crate runs, kept in `src/sql/*.sql` and rendered once per
//! table and channel by [`render`], the renderer of the migrations. Each component renders only
//! what it runs: [`WriterSql`] (inserts), [`AdminSql`] (find, requeue, status), [`RelaySql`]
//! (reserve, confirm, late confirms, fences, cleanup, gauges).
//!
//! Table and channel names are validated identifiers (see `schema::validate_identifier`), so
//! rendering them into statements is safe; every value is a bind parameter.

use std::collections::BTreeMap;

use bytes::BufMut;
use postgres_types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::Row;

use crate::event::{Event, EventFilter, EventStatus, DEFAULT_FIND_LIMIT};
use crate::schema::{wake_lock_key, LOCK_CLASS};

/// Renders a statement or migration for `table` and `channel`: replaces `{{table}}`,
/// `{{channel}}`, `{{lock_class}}` and `{{lock_key}}` (the table's wake lock), `{{sendable
/// <column>}}` for the text columns (see [`sendable_text`]), then each `{{name}}` of `vars`.
pub(crate) fn render(sql: &str, table: &str, channel: &str, vars: &[(&str, &str)]) -> String {
    let mut out = sql
        .replace("{{table}}", table)
        .replace("{{channel}}", channel)
        .replace("{{lock_class}}", &LOCK_CLASS.to_string())
        .replace("{{lock_key}}", &wake_lock_key(table).to_string());
    for column in ["aggregate_id", "event_topic", "event_type"] {
        out = out.replace(
            &format!("{{{{sendable {column}}}}}"),
            &sendable_text(column),
        );
    }
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    debug_assert!(!out.contains("{{"), "unrendered placeholder in: {out}");
    out
}

/// The outcome of one row in the confirm statement (its `$2::int2[]`). The SQL's literals are
/// rendered from this enum (`{{delivered}}`, `{{retry}}`, `{{dead}}`, `{{hold}}`, `{{defer}}`), so the two
/// cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i16)]
pub(crate) enum ConfirmOutcome {
    /// Kafka acknowledged it: done (or deleted).
    Delivered = 0,
    /// Failed, will be retried after `delay_ms`.
    Retry = 1,
    /// Failed permanently or too often: dead letter.
    Dead = 2,
    /// Sent, no delivery report yet: no relay may send it again for `delay_ms`.
    Hold = 3,
    /// Failed because the cluster was unavailable: retried after `delay_ms`, no attempt counted.
    Defer = 4,
}

impl ConfirmOutcome {
    pub(crate) const ALL: [ConfirmOutcome; 5] = [
        ConfirmOutcome::Delivered,
        ConfirmOutcome::Retry,
        ConfirmOutcome::Dead,
        ConfirmOutcome::Hold,
        ConfirmOutcome::Defer,
    ];

    /// The value bound for it.
    pub(crate) fn code(self) -> i16 {
        self as i16
    }

    /// Its placeholder name in the SQL.
    fn placeholder(self) -> &'static str {
        match self {
            ConfirmOutcome::Delivered => "delivered",
            ConfirmOutcome::Retry => "retry",
            ConfirmOutcome::Dead => "dead",
            ConfirmOutcome::Hold => "hold",
            ConfirmOutcome::Defer => "defer",
        }
    }

    /// The rendering variables of every outcome.
    fn vars() -> Vec<(&'static str, String)> {
        Self::ALL
            .iter()
            .map(|o| (o.placeholder(), o.code().to_string()))
            .collect()
    }
}

/// Renders `sql` with the confirm outcomes' codes and `extra` variables.
/// `column` as text the server can always send: as it is in a UTF8 database; elsewhere (a
/// `SQL_ASCII` or `WIN1252` database, where a value may hold bytes with no UTF8 form: 22021,
/// 22P05) as the server stores it, bytes above 0x7f escaped (`\ooo`). For the columns of a row
/// that may be unprintable (`relay::unprintable`) and a dead letter's topic in `status`.
fn sendable_text(column: &str) -> String {
    format!(
        "case when current_setting('server_encoding') = 'UTF8' then {column}::text \
         else encode(convert_to({column}, 'SQL_ASCII'), 'escape') end"
    )
}

fn render_with_outcomes(sql: &str, table: &str, extra: &[(&str, &str)]) -> String {
    let outcomes = ConfirmOutcome::vars();
    let mut vars: Vec<(&str, &str)> = outcomes.iter().map(|(n, v)| (*n, v.as_str())).collect();
    vars.extend_from_slice(extra);
    render(sql, table, "", &vars)
}

/// What [`Writer`](crate::Writer) runs.
#[derive(Debug)]
pub(crate) struct WriterSql {
    pub(crate) table: String,
    pub(crate) insert_one: String,
    pub(crate) insert_many: String,
}

impl WriterSql {
    pub(crate) fn new(table: &str) -> Self {
        WriterSql {
            table: table.to_string(),
            insert_one: render(include_str!("sql/insert_one.sql"), table, "", &[]),
            insert_many: render(include_str!("sql/insert_many.sql"), table, "", &[]),
        }
    }
}

/// What [`Admin`](crate::Admin) runs.
#[derive(Debug)]
pub(crate) struct AdminSql {
    pub(crate) table: String,
    /// The NOTIFY channel, bound as [`notify`](Self::notify)'s `$1`, never rendered into SQL.
    pub(crate) channel: String,
    find: String,
    pub(crate) requeue: String,
    pub(crate) notify: String,
    pub(crate) status: String,
    pub(crate) status_relays: String,
    pub(crate) oldest_transaction: String,
}

impl AdminSql {
    pub(crate) fn new(table: &str, channel: &str) -> Self {
        let r = |sql: &str| render(sql, table, channel, &[]);
        AdminSql {
            table: table.to_string(),
            channel: channel.to_string(),
            find: render(
                include_str!("sql/find.sql"),
                table,
                channel,
                &[("unprintable", crate::relay::UNPRINTABLE)],
            ),
            requeue: r(include_str!("sql/requeue.sql")),
            notify: r(include_str!("sql/notify.sql")),
            status: r(include_str!("sql/status.sql")),
            status_relays: r(include_str!("sql/status_relays.sql")),
            oldest_transaction: r(include_str!("sql/oldest_transaction.sql")),
        }
    }

    /// Renders `find`: SQL text and its parameters.
    pub(crate) fn find_query(
        &self,
        f: &EventFilter,
    ) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let mut sql = self.find.trim_end().to_string();
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

/// How many pending rows a windowed scan that skips blocked aggregates reads at most, from its
/// start (or the batch's row limit when larger): its window (see `reserve_window.sql`; rows that
/// share the window's last `seq` are all in it). Such a scan probes each row's
/// aggregate (~7.5 µs a row on the benchmark machine), and a pile of rows behind a hot
/// aggregate's dead letter has no bound: unbounded, a scan over more of them than it can read
/// within `postgres_timeout` (about 1.3 million at the default 10 s) failed and was tried again
/// from the same start — no row after the pile was delivered again until it was requeued.
/// Bounded, a scan reads ~0.1 s of such rows and the next one continues after its window; the
/// relay bounds its scans so after one failed (see `relay::scan::ScanStart::next`).
pub(crate) const SCAN_WINDOW: usize = 10_000;

/// The most rows a light batch reserves (see `relay::reserve::LIGHT_BEGIN`; fewer when
/// `batch_size` is smaller): enough for a relay that keeps up (batches of 2–5 rows at 1k
/// events/s), and a generic plan that misjudges a backlog — in a breaker's rerun, light
/// reservations that met a burst took 94–242 ms for ~1,800 rows where custom ones took 57–126 —
/// costs at most one batch this size before the full, custom-planned ones.
pub(crate) const LIGHT_LIMIT: usize = 256;

/// What the relay runs.
#[derive(Debug)]
pub(crate) struct RelaySql {
    /// The reservation of a scan from where the last one left off.
    pub(crate) reserve: String,
    /// The reservation of a scan from the first pending row (`$3` the lowest int8) or from the
    /// floor: it skips the rows of aggregates whose first open row is not due (see
    /// `reserve.sql`).
    pub(crate) reserve_full: String,
    /// [`reserve_full`](Self::reserve_full) reading a window of at most [`SCAN_WINDOW`] pending
    /// rows (see `reserve_window.sql`), or continuing such a scan after its window: after a scan that
    /// skips blocked aggregates failed (it may have outlasted `postgres_timeout`).
    pub(crate) reserve_windowed: String,
    /// The three reservations of a light batch (see `relay::reserve::LIGHT_BEGIN`), in the same
    /// order, with the candidates' limit written as the literal [`light_limit`](Self::light_limit)
    /// instead of `$1`: a generic plan takes a `limit $1` for a tenth of the rows it estimates
    /// pending, and once that outgrew `work_mem` the gate's `e.id not in (select id from cand)`
    /// was no longer hashed but rescanned the candidates for every probed row — 260 ms to 8.3 s
    /// for what custom plans reserved in 15 ms to 0.15 s (a breaker helper's measurements, on
    /// statistics implying millions of pending rows).
    pub(crate) light_reserve: [String; 3],
    /// The limit written into [`light_reserve`](Self::light_reserve): the relay's `batch_size`,
    /// at most [`LIGHT_LIMIT`].
    pub(crate) light_limit: usize,
    /// Begins a batch transaction: `begin`, then the table's `ROW EXCLUSIVE` lock — the lock its
    /// confirm's `UPDATE`/`DELETE` takes — before its reservation takes `ROW SHARE`. Upgrading
    /// from `ROW SHARE` to `ROW EXCLUSIVE` at the confirm, with DDL (a `migrate`, an
    /// `alter table`) queued for `ACCESS EXCLUSIVE` in between, is a deadlock Postgres breaks by
    /// failing the confirm, whose published events then go again (a test saw 2 batches replayed
    /// per `migrate`); and a `create index` (`SHARE`, which `ROW SHARE` lets in) held the
    /// confirm up for as long as it built. With the lock taken first, such DDL waits for the
    /// batches in flight to end and the next ones wait at their reservation, before anything is
    /// published (Postgres docs, "Explicit Locking": `ROW EXCLUSIVE` conflicts with `SHARE` and
    /// stronger; the relay role's `UPDATE` privilege allows it). No round trip of its own: it
    /// goes with the reservation.
    pub(crate) begin: String,
    /// [`begin`](Self::begin) for a light batch: with `relay::reserve::LIGHT_BEGIN`'s settings.
    pub(crate) light_begin: String,
    /// [`reserve`](Self::reserve), [`reserve_full`](Self::reserve_full) and
    /// [`reserve_windowed`](Self::reserve_windowed) printing nothing: the rows each would print
    /// (ids, in `seq` order), for `relay::unprintable`.
    pub(crate) unprintable_scan: [String; 3],
    /// Prints rows one at a time (`print_each.sql`).
    pub(crate) print_each: String,
    /// A row Postgres cannot print, as a reservation returns it without its JSON
    /// (`unprintable_row.sql`).
    pub(crate) unprintable_row: String,
    pub(crate) confirm: String,
    /// Rows acknowledged while the batch still publishes, written in its transaction.
    pub(crate) confirm_early: String,
    pub(crate) late_confirm: String,
    pub(crate) late_fail: String,
    pub(crate) late_release: String,
    pub(crate) fence: String,
    pub(crate) unfence: String,
    pub(crate) fence_expire: String,
    pub(crate) cleanup: String,
    pub(crate) status: String,
    pub(crate) status_relays: String,
    pub(crate) oldest_transaction: String,
}

impl RelaySql {
    /// `block_on_dead_letter`: whether a dead letter holds back the later events of its aggregate.
    /// `delete_on_delivery`: delete delivered rows instead of marking them done. `batch_size`:
    /// the relay's; a light batch's reservations take at most [`LIGHT_LIMIT`] of it.
    pub(crate) fn new(
        table: &str,
        block_on_dead_letter: bool,
        delete_on_delivery: bool,
        batch_size: usize,
    ) -> Self {
        // The rows that block their aggregate's later events. `status <> 'done'` in both lets
        // the gate probe use the aggregate index (`… where status <> 'done'`).
        let open = if block_on_dead_letter {
            "e.status <> 'done'"
        } else {
            "e.status <> 'done' and e.status = 'new'"
        };
        let update = render_with_outcomes(include_str!("sql/confirm_update.sql"), table, &[]);
        let (confirm, confirm_early, late_confirm) = if delete_on_delivery {
            (
                include_str!("sql/confirm_delete.sql"),
                include_str!("sql/confirm_early_delete.sql"),
                include_str!("sql/late_confirm_delete.sql"),
            )
        } else {
            (
                include_str!("sql/confirm.sql"),
                include_str!("sql/confirm_early.sql"),
                include_str!("sql/late_confirm.sql"),
            )
        };
        let r = |sql: &str| render(sql, table, "", &[]);
        let [reserve, reserve_full, reserve_windowed] = reserve_statements(table, open, "$1", true);
        let light_limit = batch_size.min(LIGHT_LIMIT);
        let lock = format!("lock table {table} in row exclusive mode");
        RelaySql {
            reserve,
            reserve_full,
            reserve_windowed,
            light_reserve: reserve_statements(table, open, &light_limit.to_string(), true),
            light_limit,
            begin: format!("begin; {lock}"),
            light_begin: format!("{}; {lock}", crate::relay::LIGHT_BEGIN),
            unprintable_scan: reserve_statements(table, open, "$1", false),
            print_each: r(include_str!("sql/print_each.sql")),
            unprintable_row: r(include_str!("sql/unprintable_row.sql")),
            confirm: render_with_outcomes(confirm, table, &[("confirm_update", update.as_str())]),
            confirm_early: r(confirm_early),
            late_confirm: r(late_confirm),
            late_fail: r(include_str!("sql/late_fail.sql")),
            late_release: r(include_str!("sql/late_release.sql")),
            fence: r(include_str!("sql/fence.sql")),
            unfence: r(include_str!("sql/unfence.sql")),
            fence_expire: r(include_str!("sql/fence_expire.sql")),
            cleanup: r(include_str!("sql/cleanup.sql")),
            status: r(include_str!("sql/status.sql")),
            status_relays: r(include_str!("sql/status_relays.sql")),
            oldest_transaction: r(include_str!("sql/oldest_transaction.sql")),
        }
    }
}

/// `reserve.sql` for `table` whose open rows are `open`, its candidates limited by `limit` (`$1`,
/// or a literal): the scan from where the last one left off (no window, no skipping), the scan
/// that skips blocked aggregates (`reserve_skip_blocked.sql`), and that one within its window
/// (`reserve_window.sql`). `printed`: the rows' JSON is printed and sent (a reservation), or
/// not at all (the same scan for `relay::unprintable`).
fn reserve_statements(table: &str, open: &str, limit: &str, printed: bool) -> [String; 3] {
    let no_window = "select null::int8 as first, null::int8 as last, false as full";
    let (text_bytes, sent, texts) = if printed {
        (
            "octet_length(k.payload::text) + coalesce(octet_length(k.headers::text), 0)",
            "k.payload, k.headers",
            "k.aggregate_id, k.event_topic, k.event_type",
        )
    } else {
        (
            "0",
            "null::jsonb, null::jsonb",
            "null::text, null::text, null::text",
        )
    };
    let reserve = |window: &str, in_window: &str, skip: bool| {
        let (first_open, skip_blocked) = if skip {
            (
                render(
                    include_str!("sql/reserve_first_open.sql"),
                    table,
                    "",
                    &[("open", open)],
                ),
                render(
                    include_str!("sql/reserve_skip_blocked.sql"),
                    table,
                    "",
                    &[("in_window", in_window)],
                ),
            )
        } else {
            (String::new(), String::new())
        };
        render(
            include_str!("sql/reserve.sql"),
            table,
            "",
            &[
                ("open", open),
                ("limit", limit),
                ("window", window),
                ("first_open", &first_open),
                ("skip_blocked", &skip_blocked),
                ("text_bytes", text_bytes),
                ("sent", sent),
                ("texts", texts),
            ],
        )
    };
    let window = render(
        include_str!("sql/reserve_window.sql"),
        table,
        "",
        &[("scan_window", &SCAN_WINDOW.to_string())],
    );
    [
        reserve(no_window, "", false),
        reserve(no_window, "", true),
        reserve(
            &window,
            "and seq between (select first from win) and (select last from win)",
            true,
        ),
    ]
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
    let (payload, headers, unpublished_headers) = json_columns(row, &mut problems)?;
    let status: String = get(row, 7)?;
    let last_error: Option<String> = get(row, 11)?;
    if status == "failed"
        && last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(crate::relay::UNPRINTABLE))
    {
        problems.push(
            "payload, headers: not shown: Postgres cannot print them as JSON (see last_error); \
             fix them with SQL, then requeue the event"
                .to_string(),
        );
    }
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
        last_error,
        next_attempt_at,
        published_at,
        partition: get(row, 14)?,
        offset: get(row, 15)?,
        created_at_tz,
        problems,
        unpublished_headers,
    })
}

/// The payload (column 5), the headers (column 6) and the headers the relay would leave out of
/// the record, by the rules it publishes with. A row written by SQL may nest deeper than
/// serde_json's limit (128 levels): the payload is then given as its JSON text, and the headers
/// that can be read are kept; each such value adds to `problems`.
#[allow(clippy::type_complexity)]
fn json_columns(
    row: &Row,
    problems: &mut Vec<String>,
) -> crate::Result<(serde_json::Value, BTreeMap<String, String>, Vec<String>)> {
    let raw_payload = get::<RawJson>(row, 5)?;
    let payload = match raw_payload.parse("payload") {
        Ok(v) => v,
        Err(p) => {
            problems.push(p);
            serde_json::Value::String(String::from_utf8_lossy(&raw_payload.0).into_owned())
        }
    };
    let raw_headers = get::<Option<RawJson>>(row, 6)?;
    let unpublished = crate::headers::parse(raw_headers.as_ref().map(|h| h.0.as_slice()))
        .dropped
        .iter()
        .map(ToString::to_string)
        .collect();
    let headers = match raw_headers {
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
    Ok((payload, headers, unpublished))
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

    /// RFC 3339 in UTC with microseconds (`2026-12-07T01:02:03.000004Z`; a `timestamptz` is
    /// stored in UTC), for the years 0001–9999 only: RFC 3339 has four-digit years and no era,
    /// so year 20000 or a BC year has no such form (`None`, as for ±infinity).
    pub(crate) fn rfc3339_micros(&self) -> Option<String> {
        use chrono::{Datelike, Timelike};
        match self {
            // Written field by field: `format` parses its pattern on every call, which was 4 %
            // of the relay's CPU in a drain (one call per event).
            PgTimestamp::At(t) if (1..=9999).contains(&t.year()) => Some(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.nanosecond() / 1_000
            )),
            _ => None,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ce_time_is_rfc3339_with_microseconds_for_four_digit_years_only() {
        let at = |y: i32, micros: u32| {
            let t = chrono::NaiveDate::from_ymd_opt(y, 12, 7)
                .and_then(|d| d.and_hms_micro_opt(1, 2, 3, micros))
                .unwrap();
            PgTimestamp::At(t).rfc3339_micros()
        };
        // As `to_char(t at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')` wrote it.
        assert_eq!(at(2026, 4).as_deref(), Some("2026-12-07T01:02:03.000004Z"));
        assert_eq!(at(2026, 0).as_deref(), Some("2026-12-07T01:02:03.000000Z"));
        assert_eq!(
            at(1, 999_999).as_deref(),
            Some("0001-12-07T01:02:03.999999Z")
        );
        assert_eq!(at(9999, 1).as_deref(), Some("9999-12-07T01:02:03.000001Z"));
        assert_eq!(at(10_000, 0), None, "five digits are not RFC 3339");
        assert_eq!(at(0, 0), None, "1 BC");
        assert_eq!(at(-44, 0), None);
        let decoded = |micros: i64| {
            PgTimestamp::from_sql(&Type::TIMESTAMPTZ, &micros.to_be_bytes())
                .unwrap()
                .rfc3339_micros()
        };
        assert_eq!(decoded(i64::MAX), None, "infinity");
        assert_eq!(decoded(i64::MIN), None, "-infinity");
        assert_eq!(decoded(1).as_deref(), Some("2000-01-01T00:00:00.000001Z"));
        assert_eq!(decoded(-1).as_deref(), Some("1999-12-31T23:59:59.999999Z"));
    }

    #[test]
    fn confirm_outcome_codes_are_rendered_from_the_enum() {
        let update = include_str!("sql/confirm_update.sql");
        for o in ConfirmOutcome::ALL {
            let placeholder = format!("{{{{{}}}}}", o.placeholder());
            assert!(update.contains(&placeholder), "{placeholder} used");
        }
        for delete in [false, true] {
            let sql = RelaySql::new("t", true, delete, 2000);
            assert!(!sql.confirm.contains("{{"), "{}", sql.confirm);
            assert!(sql.confirm.contains(&format!(
                "when {} then 'done' when {} then 'failed'",
                ConfirmOutcome::Delivered.code(),
                ConfirmOutcome::Dead.code()
            )));
            assert!(sql.confirm.contains(&format!(
                "u.outcome in ({}, {}, {})",
                ConfirmOutcome::Retry.code(),
                ConfirmOutcome::Hold.code(),
                ConfirmOutcome::Defer.code()
            )));
        }
    }

    #[test]
    fn every_statement_renders_completely() {
        let relay = RelaySql::new("t", false, false, 2000);
        let admin = AdminSql::new("t", "c");
        let writer = WriterSql::new("t");
        for sql in [
            &relay.reserve,
            &relay.reserve_full,
            &relay.reserve_windowed,
            &relay.light_reserve[0],
            &relay.light_reserve[1],
            &relay.light_reserve[2],
            &relay.unprintable_scan[0],
            &relay.unprintable_scan[1],
            &relay.unprintable_scan[2],
            &relay.print_each,
            &relay.unprintable_row,
            &relay.late_confirm,
            &relay.late_fail,
            &relay.late_release,
            &relay.fence,
            &relay.unfence,
            &relay.fence_expire,
            &relay.cleanup,
            &relay.status,
            &relay.status_relays,
            &relay.oldest_transaction,
            &admin.find,
            &admin.requeue,
            &admin.notify,
            &admin.status,
            &admin.status_relays,
            &admin.oldest_transaction,
            &writer.insert_one,
            &writer.insert_many,
        ] {
            assert!(!sql.contains("{{") && !sql.contains("}}"), "{sql}");
        }
        assert!(relay
            .reserve
            .contains("e.status <> 'done' and e.status = 'new'"));
        // The scan for a row Postgres cannot print prints nothing.
        for sql in &relay.unprintable_scan {
            assert!(sql.contains("for update of c skip locked"), "{sql}");
            assert!(
                !sql.contains("payload::text")
                    && !sql.contains("headers::text")
                    && !sql.contains("k.payload"),
                "{sql}"
            );
        }
        assert!(relay.reserve.contains("octet_length(k.payload::text)"));
        // The channel is a bind parameter, never SQL text.
        assert!(admin.notify.contains("pg_notify($1, '')"));
        assert!(!admin.notify.contains("'c'"));
    }
}
