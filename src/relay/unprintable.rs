//! Rows Postgres cannot print. A reservation prints its rows' payload and headers as JSON (to
//! measure them against `max_batch_bytes`, and to send them: `jsonb_send` prints the text), and
//! a `jsonb` value may print far larger than it is stored: a number like `1e131071` is a few
//! bytes stored and 131 KB printed, so 8,200 of them in one event print past Postgres' 1 GB
//! limit on a string ("out of memory … Cannot enlarge string buffer containing … bytes by …
//! more bytes", SQLSTATE 54000). Such a row failed every reservation that reached it, for good
//! (the first candidate is always printed, so no smaller reservation passes it), and every row
//! only those reservations reach waited behind it (found by a breaker helper: 0 of 50 events
//! behind one such row delivered).
//!
//! [`locate`] runs after a reservation failed with a limit of Postgres (see [`failed_to_print`]:
//! raised by a value too large to print, never by load or an outage), or after a small
//! reservation missed its deadline (a row can take longer to fail than `postgres_timeout`: 2 MB
//! of `\u0001` characters print six bytes each and reached the 1 GB limit after 15 s, found by a
//! breaker helper). It runs the same scan without printing (`RelaySql::unprintable_scan`: the
//! same candidates, fences, gate, group and byte budget by stored size, so the rows the
//! reservation printed, locked the same way; after a missed deadline, once the cancelled
//! statement's backend is gone, since it holds the rows until then), prints them
//! one at a time in one statement that streams a result row per row printed (the first one
//! missing is the suspect), and prints the suspect alone. Only when Postgres refuses to print it
//! alone with such an error (or it prints past what one result row can carry) is it the culprit:
//! it goes as a batch of one row, a dead letter at once (never sent), named in the log with the
//! server's message; the other rows the scan locked are released when that batch commits. Its
//! round trips have [`LOCATE_DEADLINE`] (at least `postgres_timeout`): a print that fails after
//! 15 s must be let fail. Nothing is judged by time: a row that prints slowly but within the
//! limits is not a dead letter (a stall, a lock or a slow link can make any print slow); it is
//! named in a warning with its print time on the server (see README "Failure policy").

use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::pg::Pg;
use crate::store::RelaySql;

use super::reserve::{Ask, BatchConn, Reserved, RESERVE_PARAM_TYPES};
use super::timing::{round_trip_on, Stop, Timing};

/// How a dead letter's `last_error` begins when Postgres cannot print it (`find` then shows it
/// without its payload and headers: see `find.sql`).
pub(crate) const UNPRINTABLE: &str = "Postgres cannot print its payload or headers as JSON";

/// The most bytes of payload and headers (JSON text) one result row can carry: a row Postgres
/// sends is one message, a string of at most 1 GB − 1 (`MaxAllocSize`); this leaves 1 MiB for
/// the row's other columns and the message's framing. A row that prints its payload and headers
/// within the limit one at a time but past it together fails the reservation's result row.
const MAX_PRINTED: i64 = (1 << 30) - 1 - (1 << 20);

/// The deadline of each of [`locate`]'s round trips, unless `postgres_timeout` is longer: the
/// prints that find the row let it fail however long that takes (15–20 s for 1 GB of escapes on
/// the benchmark machine), and the wait for the cancelled reservation's backend to end lasts as
/// long as its print.
pub(crate) const LOCATE_DEADLINE: Duration = Duration::from_secs(60);

/// A reservation of at most this many candidates that misses its deadline starts [`locate`]:
/// reserving so few rows takes milliseconds unless one of them takes long to print (or the
/// server stalls: then `locate` finds every row printable, or fails, and judges nothing). After
/// one that misses its deadline the candidates' cap is 1, doubling; a reservation of one
/// candidate alone does not do: while the cancelled statement still prints the row it holds its
/// lock, so the next ones pass it (`skip locked`) and double the cap before one reaches it
/// again (a test saw 2, 4 and 256).
pub(crate) const SMALL_RESERVATION: usize = 16;

/// Whether a statement failed because a value was too large for Postgres to print: SQLSTATE
/// class 54, "program limit exceeded" (54000 "out of memory … Cannot enlarge string buffer" for
/// a string past 1 GB), or XX000 "invalid memory alloc request size" (a text value of the
/// printed JSON, 4 bytes longer, past 1 GB − 1: a row that prints to 1,073,741,820–822 bytes,
/// found by a breaker helper; the same error public reports show for wal2json); or a text
/// value the server cannot send in UTF8 (22021, 22P05: see `is_print_limit`).
pub(crate) fn failed_to_print(e: &crate::Error) -> bool {
    e.as_db_error().is_some_and(is_print_limit)
}

fn is_print_limit(db: &tokio_postgres::error::DbError) -> bool {
    let code = db.code().code();
    code.starts_with("54")
        // A text value the server cannot send in the client's encoding (UTF8): bytes invalid
        // in it in a `SQL_ASCII` database (22021), or a character with no UTF8 equivalent in
        // another server encoding (22P05, e.g. 0x81 in WIN1252) — found by a breaker helper:
        // one such row stopped every delivery.
        || code == "22021"
        || code == "22P05"
        || (code == "XX000"
            && db
                .message()
                .starts_with("invalid memory alloc request size"))
}

/// Why [`locate`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// The reservation failed with a print limit ([`failed_to_print`]) on `conn`: it is rolled
    /// back first.
    Refused,
    /// A reservation of at most [`SMALL_RESERVATION`] candidates missed its deadline on the
    /// session of this backend (process id); `conn` is a fresh session.
    TimedOut(i32),
}

/// After a reservation of `ask` failed with `failure`: finds the row Postgres cannot print
/// among the rows that reservation printed, and returns it without its JSON, marked invalid (a
/// dead letter, never sent) in a transaction on `conn` that holds the scan's row locks (the
/// batch's). `None` when no single row is to blame (the reservation's failure stands; the
/// transaction is rolled back and `conn` may be reused), or when a round trip failed (drop
/// `conn`).
pub(crate) async fn locate(
    conn: &BatchConn,
    pg: &Pg,
    sql: &RelaySql,
    timing: &Timing,
    stop: &Stop,
    ask: &Ask,
    after: After,
) -> Result<Option<Reserved>, crate::Error> {
    let search = Search {
        conn,
        pg,
        stop,
        deadline: timing.round_trip.max(LOCATE_DEADLINE),
    };
    match after {
        After::Refused => {
            search
                .step(
                    "unprintable: rollback",
                    conn.client.batch_execute("rollback"),
                )
                .await?
        }
        After::TimedOut(pid) => search.wait_for_end(pid).await?,
    }
    let scan = &sql.unprintable_scan[match (ask.skip_blocked, ask.windowed) {
        (false, _) => 0,
        (true, false) => 1,
        (true, true) => 2,
    }];
    let params = ask.params();
    let client = &conn.client;
    let ids = search
        .step("unprintable: scan", async {
            let statement = client.prepare_typed(scan, &RESERVE_PARAM_TYPES).await?;
            client.batch_execute(&sql.begin).await?;
            let rows = client.query(&statement, &params.refs()).await?;
            Ok::<_, tokio_postgres::Error>(
                rows.iter()
                    .filter_map(|r| r.get::<_, Option<Uuid>>(0))
                    .collect::<Vec<_>>(),
            )
        })
        .await?;
    let Some((suspect, why)) = search.suspect(sql, &ids, timing, after).await? else {
        search
            .step("unprintable: rollback", client.batch_execute("rollback"))
            .await?;
        return Ok(None);
    };
    search.dead_letter(sql, suspect, &why).await.map(Some)
}

/// The session [`locate`] searches on, and the deadline of each of its round trips.
struct Search<'a> {
    conn: &'a BatchConn,
    pg: &'a Pg,
    stop: &'a Stop,
    deadline: Duration,
}

impl Search<'_> {
    /// Runs one round trip (`what` names it in a timeout) within the deadline.
    async fn step<T, E: Into<crate::Error>>(
        &self,
        what: &'static str,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> crate::Result<T> {
        round_trip_on(self.pg, self.conn, self.stop, what, self.deadline, op).await
    }

    /// Waits until the backend `pid` (the session whose reservation missed its deadline) is
    /// gone. Its cancelled statement holds its rows until it has printed the row it is printing
    /// (Postgres checks for a cancel between rows, not within one) and the server notices the
    /// closed session: until then, the scan would pass the row by. Waiting for locks instead (an
    /// earlier form) waited on any other session's locks too — another relay's batch, an
    /// operator's transaction — 60 s with the relay stopped (found by a breaker helper).
    async fn wait_for_end(&self, pid: i32) -> crate::Result<()> {
        let client = &self.conn.client;
        self.step("unprintable: the cancelled statement's end", async {
            while client
                .query_opt("select 1 from pg_stat_activity where pid = $1", &[&pid])
                .await?
                .is_some()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, tokio_postgres::Error>(())
        })
        .await
    }

    /// Prints the scanned `ids` one at a time, then the first one refused alone: that row and
    /// the server's message when Postgres refuses it alone too; `None` when every row printed
    /// (after a missed deadline, the slowest one is named in a warning when it took half the
    /// deadline or more: after a stall every print is quick and nothing is named).
    async fn suspect(
        &self,
        sql: &RelaySql,
        ids: &[Uuid],
        timing: &Timing,
        after: After,
    ) -> crate::Result<Option<(Uuid, String)>> {
        let client = &self.conn.client;
        let print = self
            .step(
                "unprintable: prepare",
                client.prepare_typed(&sql.print_each, &[Type::UUID_ARRAY]),
            )
            .await?;
        let each = self
            .step(
                "unprintable: print each",
                print_each(self.conn, &print, ids),
            )
            .await?;
        if let Some((i, _)) = each.refused {
            let alone = self
                .step(
                    "unprintable: print alone",
                    print_each(self.conn, &print, &ids[i..=i]),
                )
                .await?;
            return Ok(alone.refused.map(|(_, why)| (ids[i], why)));
        }
        let slow =
            (each.slowest).filter(|&(_, secs)| secs * 2.0 >= timing.round_trip.as_secs_f64());
        if let (After::TimedOut(_), Some((i, secs))) = (after, slow) {
            tracing::warn!(
                event_id = %ids[i],
                print_secs = secs,
                postgres_timeout = ?timing.round_trip,
                "outbox relay: a small reservation missed its deadline, and the slowest event it reaches takes this long to print as JSON on the server; if that is near postgres_timeout, every reservation that reaches it misses its deadline: raise postgres_timeout above it, or dead-letter the event by hand (README, Failure policy)"
            );
        }
        Ok(None)
    }

    /// The row `id` without its JSON, marked invalid with `why` (the server's refusal): a dead
    /// letter, never sent; logged with its event id.
    async fn dead_letter(&self, sql: &RelaySql, id: Uuid, why: &str) -> crate::Result<Reserved> {
        let row = self
            .step(
                "unprintable: the row",
                self.conn.client.query_one(&sql.unprintable_row, &[&id]),
            )
            .await?;
        let mut reserved = Reserved::from_row(&row);
        tracing::warn!(
            event_id = %reserved.id,
            seq = reserved.seq,
            error = %why,
            "outbox relay: Postgres cannot print the event (its payload or headers as JSON, or its text in the relay's encoding, UTF8); it is a dead letter, not sent"
        );
        reserved.invalid = Some(format!(
            "{UNPRINTABLE}: {why} (not sent, no retries; make it printable and requeue it)"
        ));
        Ok(reserved)
    }
}

/// What printing rows one at a time showed.
struct Printed {
    /// The index of the first row Postgres refused to print, with why.
    refused: Option<(usize, String)>,
    /// The index of the row that took longest to print before it, and its seconds.
    slowest: Option<(usize, f64)>,
}

/// Prints `ids` one at a time (`print_each.sql`) under a savepoint, rolled back after. A
/// failure other than a print limit is returned as the error.
async fn print_each(
    conn: &BatchConn,
    print: &tokio_postgres::Statement,
    ids: &[Uuid],
) -> Result<Printed, tokio_postgres::Error> {
    let client = &conn.client;
    client.batch_execute("savepoint unprintable").await?;
    let mut printed = Printed {
        refused: None,
        slowest: None,
    };
    let mut next = 0usize;
    let mut clock = 0.0f64;
    let refused = |next: usize, e: &tokio_postgres::Error| {
        e.as_db_error()
            .filter(|db| is_print_limit(db) && next < ids.len())
            .map(|db| (next, server_message(db)))
    };
    match client.query_raw(print, [&ids]).await {
        Ok(rows) => {
            let mut rows = std::pin::pin!(rows);
            while let Some(row) = rows.next().await {
                let row = match row {
                    Ok(row) => row,
                    Err(e) => match refused(next, &e) {
                        Some(r) => {
                            printed.refused = Some(r);
                            break;
                        }
                        None => return Err(e),
                    },
                };
                let (n, len, at): (i64, Option<i64>, f64) = (row.get(0), row.get(2), row.get(3));
                if usize::try_from(n).ok() != Some(next + 1) {
                    // Out of order: no position can be named from the stream.
                    break;
                }
                let took = at - clock;
                clock = at;
                if printed.slowest.is_none_or(|(_, s)| took > s) {
                    printed.slowest = Some((next, took));
                }
                if let Some(len) = len.filter(|&l| l > MAX_PRINTED) {
                    printed.refused = Some((
                        next,
                        format!("it prints {len} bytes, more than one result row of Postgres can carry (1 GB)"),
                    ));
                    break;
                }
                next += 1;
            }
        }
        Err(e) => match refused(0, &e) {
            Some(r) => printed.refused = Some(r),
            None => return Err(e),
        },
    }
    client
        .batch_execute("rollback to savepoint unprintable; release savepoint unprintable")
        .await?;
    Ok(printed)
}

/// The server's error as it reported it: SQLSTATE, message and detail.
fn server_message(db: &tokio_postgres::error::DbError) -> String {
    match db.detail() {
        Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
        None => format!("{}: {}", db.code().code(), db.message()),
    }
}
