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
//! After a reservation fails with SQLSTATE class 54 (program limit exceeded: raised by a value
//! too large to print, never by load or an outage), [`locate`] runs the same scan without
//! printing (`RelaySql::unprintable_scan`: the same candidates, fences, gate, group and byte
//! budget by stored size, so the same rows the reservation printed, locked the same way), prints
//! them one at a time in one statement that streams a result row per row printed (the first one
//! missing is the suspect), and prints the suspect alone. Only when Postgres refuses to print it
//! alone with class 54 (or it prints past what one result row can carry) is it the culprit: it
//! goes as a batch of one row, a dead letter at once (never sent), named in the log with the
//! server's message; the other rows the scan locked are released when that batch commits.
//! Nothing is timed: a row that prints slowly but within the limit is not judged here (a stall,
//! a lock or a slow link can make any print slow; see README "Failure policy").

use futures::StreamExt;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::pg::Pg;
use crate::store::RelaySql;

use super::reserve::{Ask, BatchConn, Reserved, RESERVE_PARAM_TYPES};
use super::timing::{round_trip_on, Stop, Timing};

/// The most bytes of payload and headers (JSON text) one result row can carry: a row Postgres
/// sends is one message, a string of at most 1 GB − 1 (`MaxAllocSize`); this leaves 1 MiB for
/// the row's other columns and the message's framing. A row that prints its payload and headers
/// within the limit one at a time but past it together fails the reservation's result row.
const MAX_PRINTED: i64 = (1 << 30) - 1 - (1 << 20);

/// Whether a reservation failed because a value was too large for Postgres to print: SQLSTATE
/// class 54, "program limit exceeded" (54000 for a string past 1 GB, 54001 for nesting past
/// `max_stack_depth`).
pub(crate) fn failed_to_print(e: &crate::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("54"))
}

/// After a reservation of `ask` failed with `failure` (see [`failed_to_print`]): finds the row
/// Postgres cannot print among the rows that reservation printed, and returns it without its
/// JSON, marked invalid (a dead letter, never sent) in a transaction on `conn` that holds the
/// scan's row locks (the batch's). `None` when no single row is to blame (the reservation's
/// failure stands; the transaction is rolled back), or when a round trip failed.
pub(crate) async fn locate(
    conn: &BatchConn,
    pg: &Pg,
    sql: &RelaySql,
    timing: &Timing,
    stop: &Stop,
    ask: &Ask,
    failure: &crate::Error,
) -> Option<Reserved> {
    let client = &conn.client;
    // Every round trip has the pipeline's deadline.
    macro_rules! step {
        ($what:expr, $op:expr $(,)?) => {
            round_trip_on(pg, conn, stop, $what, timing.round_trip, $op)
        };
    }
    let found = async {
        step!("unprintable: rollback", client.batch_execute("rollback")).await?;
        let scan = &sql.unprintable_scan[match (ask.skip_blocked, ask.windowed) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        }];
        let params = ask.params();
        let ids = step!("unprintable: scan", async {
            let statement = client.prepare_typed(scan, &RESERVE_PARAM_TYPES).await?;
            client.batch_execute("begin").await?;
            let rows = client.query(&statement, &params.refs()).await?;
            Ok::<_, tokio_postgres::Error>(
                rows.iter()
                    .filter_map(|r| r.get::<_, Option<Uuid>>(0))
                    .collect::<Vec<_>>(),
            )
        })
        .await?;
        let print = step!(
            "unprintable: prepare",
            client.prepare_typed(&sql.print_each, &[Type::UUID_ARRAY]),
        )
        .await?;
        let Some(suspect) = step!(
            "unprintable: print each",
            first_unprintable(conn, &print, &ids)
        )
        .await?
        .map(|(i, _)| ids[i]) else {
            return Ok(None);
        };
        // The suspect alone: the verdict.
        let Some((_, why)) = step!(
            "unprintable: print alone",
            first_unprintable(conn, &print, &[suspect]),
        )
        .await?
        else {
            return Ok(None);
        };
        let row = step!(
            "unprintable: the row",
            client.query_one(&sql.unprintable_row, &[&suspect]),
        )
        .await?;
        Ok::<_, crate::Error>(Some((row, why)))
    }
    .await;
    let (row, why) = match found {
        Ok(Some(found)) => found,
        Ok(None) => {
            tracing::warn!(error = %failure, "outbox relay: a reservation failed on a limit of Postgres, but no row it printed fails alone");
            // Best effort: a connection whose rollback fails is dropped with the error.
            let _ = step!("unprintable: rollback", client.batch_execute("rollback")).await;
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, reservation_error = %failure, "outbox relay: cannot look for the row Postgres cannot print");
            return None;
        }
    };
    let mut reserved = Reserved::from_row(&row);
    tracing::warn!(
        event_id = %reserved.id,
        seq = reserved.seq,
        error = %why,
        "outbox relay: Postgres cannot print the event's payload or headers as JSON; it is a dead letter, not sent"
    );
    reserved.invalid = Some(format!(
        "Postgres cannot print its payload or headers as JSON: {why} (not sent, no retries; \
         make it printable and requeue it)"
    ));
    Some(reserved)
}

/// Prints `ids` one at a time (`print_each.sql`) under a savepoint: the index of the first one
/// Postgres cannot print (with why), or `None` when all print. A failure of another kind (not
/// class 54) is returned as the error.
async fn first_unprintable(
    conn: &BatchConn,
    print: &tokio_postgres::Statement,
    ids: &[Uuid],
) -> Result<Option<(usize, String)>, tokio_postgres::Error> {
    let client = &conn.client;
    client.batch_execute("savepoint unprintable").await?;
    let rows = client.query_raw(print, [&ids]).await;
    let mut next = 0usize;
    let mut found = None;
    match rows {
        Ok(rows) => {
            let mut rows = std::pin::pin!(rows);
            while let Some(row) = rows.next().await {
                match row {
                    Ok(row) => {
                        let (n, len): (i64, Option<i64>) = (row.get(0), row.get(2));
                        if usize::try_from(n).ok() != Some(next + 1) {
                            // Out of order: no position can be named from the stream.
                            break;
                        }
                        if let Some(len) = len.filter(|&l| l > MAX_PRINTED) {
                            found = Some((
                                next,
                                format!("it prints {len} bytes, more than one result row of Postgres can carry (1 GB)"),
                            ));
                            break;
                        }
                        next += 1;
                    }
                    Err(e) if is_limit(&e) => {
                        found = (next < ids.len()).then(|| (next, server_message(&e)));
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(e) if is_limit(&e) => found = (!ids.is_empty()).then(|| (0, server_message(&e))),
        Err(e) => return Err(e),
    }
    client
        .batch_execute("rollback to savepoint unprintable; release savepoint unprintable")
        .await?;
    Ok(found)
}

fn is_limit(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("54"))
}

/// The server's error as it reported it: SQLSTATE, message and detail.
fn server_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => e.to_string(),
    }
}
