//! A row whose JSON cannot be printed in time, found and dead-lettered.
//!
//! A reservation prints every kept row's payload and headers to JSON twice (for the byte budget,
//! then by `jsonb_send` to return it). A `jsonb` number such as `1e131071` is stored in a few
//! bytes and printed as 131,072 digits, so one row of a few KB can print to gigabytes: its
//! reservation then misses its deadline, or Postgres refuses the string (54000, "out of memory …
//! Cannot enlarge string buffer"). The candidates' cap narrows to one candidate after such a
//! failure ([`next_candidates_cap`](super::next_candidates_cap)), but the first candidate is
//! always kept, so a row that cannot be printed at all stopped every reservation for good, and
//! every row behind it (found by a breaker helper: 0 of 50 delivered behind one such row).
//!
//! When a reservation fails that way, [`check`] takes its first candidate (the first pending,
//! due row from the scan's start, locked, without reading its JSON) and prints it alone: a row
//! that Postgres cannot print, or that takes more than a third of the Postgres timeout to print,
//! is dead-lettered with an error naming why. The check runs only after Postgres answered it
//! (connect, lock): a stalled server or network fails the check itself and dead-letters nothing;
//! a row that prints in time is left alone (rows that are only expensive together are the
//! candidates' cap's to spread). A third: the reservation prints each row twice within one
//! deadline, beside its other work. Any reservation may fail that way, not only one of one
//! candidate: a scan from where the last one left off starts past such a row, so only the
//! periodic scans from the first pending row reach it, and each of them failed while the others
//! went on (breaker helper's case and this module's test).

use std::time::Duration;

use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::Ctx;
use crate::error::Error;
use crate::pg::bounded;

/// A row [`check`] dead-lettered.
#[derive(Debug)]
pub(crate) struct Unprintable {
    pub(crate) id: Uuid,
    pub(crate) aggregate_id: String,
    pub(crate) topic: String,
    /// Its attempts, this one counted.
    pub(crate) attempts: i32,
    pub(crate) error: String,
}

/// Whether a reservation's failure may come from printing a row's JSON: it missed its deadline,
/// or Postgres refused to build a string or ran out of memory.
pub(crate) fn may_be_unprintable(e: &Error) -> bool {
    match e {
        Error::Timeout {
            what: "reserve", ..
        } => true,
        Error::Postgres(e) => e.code().is_some_and(print_refused),
        _ => false,
    }
}

/// Errors of printing a value too large (class 54, program limit exceeded: "Cannot enlarge
/// string buffer") or out of memory (53200).
fn print_refused(code: &SqlState) -> bool {
    code.code().starts_with("54") || code == &SqlState::OUT_OF_MEMORY
}

/// The longest one row may take to print before it is dead-lettered: a third of the Postgres
/// timeout.
pub(crate) fn print_limit(postgres_timeout: Duration) -> Duration {
    (postgres_timeout / 3).max(Duration::from_millis(1))
}

/// How long [`check`] waits for the row's lock, and then for its print: ten Postgres timeouts,
/// at least 10 s. The reservation that failed may still hold the row: its statement goes on
/// printing after the relay cancels it and closes its session (Postgres looks at the cancel only
/// between values), and Postgres gives up printing at 1 GB (54000), after a few seconds.
pub(crate) fn lock_and_print_wait(postgres_timeout: Duration) -> Duration {
    (postgres_timeout * 10).max(Duration::from_secs(10))
}

/// Prints the row a reservation from `from` (a `seq`) takes first, and dead-letters it when
/// Postgres cannot print it, or takes longer than [`print_limit`]; `None` when there is no such
/// row or it printed in time. On a connection of its own (dropped at the end); each round trip
/// within the Postgres timeout, but the row's lock and its print within
/// [`lock_and_print_wait`].
///
/// # Errors
/// [`Error::Postgres`] / [`Error::Timeout`] when a round trip fails for another reason (then
/// nothing is dead-lettered).
pub(crate) async fn check(ctx: &Ctx, from: i64) -> crate::Result<Option<Unprintable>> {
    let timeout = ctx.pg.timeout;
    let wait = lock_and_print_wait(timeout);
    let client = ctx.pg.connect_bounded("relay-print-check").await?;
    bounded("print check", timeout, async {
        client
            .batch_execute(&format!(
                "begin; set local lock_timeout = {}",
                wait.as_millis()
            ))
            .await
            .map_err(Error::Postgres)
    })
    .await?;
    let first = bounded("print check", wait + timeout, async {
        client
            .query_opt(&ctx.sql.unprintable_first, &[&from])
            .await
            .map_err(Error::Postgres)
    })
    .await?;
    let Some(row) = first else {
        return Ok(None);
    };
    let id: Uuid = row.get(0);
    let limit = print_limit(timeout);
    bounded("print check", timeout, async {
        client
            .batch_execute("savepoint print_check")
            .await
            .map_err(Error::Postgres)
    })
    .await?;
    let started = std::time::Instant::now();
    let printed = bounded("print check", wait, async {
        Ok(client.query_one(&ctx.sql.unprintable_print, &[&id]).await)
    })
    .await?;
    let took = started.elapsed();
    let error = match printed {
        Ok(row) if took <= limit => {
            let _ = row;
            return Ok(None);
        }
        Ok(row) => format!(
            "its payload and headers took {took:?} to print to JSON ({} bytes), more than a \
             third of postgres_timeout ({timeout:?}): no reservation, which prints each row \
             twice, could take it in time (numbers with huge exponents print to that many \
             digits)",
            row.get::<_, Option<i32>>(0).unwrap_or(0)
        ),
        Err(e) if e.code().is_some_and(print_refused) => format!(
            "Postgres could not print its payload and headers to JSON: {}",
            e.as_db_error()
                .map_or_else(|| e.to_string(), |db| db.message().to_string())
        ),
        Err(e) => return Err(Error::Postgres(e)),
    };
    bounded("print check", timeout, async {
        client
            .batch_execute("rollback to savepoint print_check")
            .await
            .map_err(Error::Postgres)
    })
    .await?;
    let n = bounded("print check", timeout, async {
        client
            .execute(&ctx.sql.unprintable_fail, &[&id, &error])
            .await
            .map_err(Error::Postgres)
    })
    .await?;
    bounded("print check", timeout, async {
        client
            .batch_execute("commit")
            .await
            .map_err(Error::Postgres)
    })
    .await?;
    Ok((n == 1).then(|| Unprintable {
        id,
        aggregate_id: row.get(1),
        topic: row.get(2),
        attempts: row.get::<_, i32>(3).saturating_add(1),
        error,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_third_of_the_timeout_and_the_failures_that_may_come_from_printing() {
        assert_eq!(
            print_limit(Duration::from_secs(10)),
            Duration::from_nanos(3_333_333_333)
        );
        assert_eq!(print_limit(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(
            lock_and_print_wait(Duration::from_millis(300)),
            Duration::from_secs(10)
        );
        assert_eq!(
            lock_and_print_wait(Duration::from_secs(10)),
            Duration::from_secs(100)
        );
        let timed_out = Error::Timeout {
            what: "reserve",
            after: Duration::from_secs(1),
        };
        assert!(may_be_unprintable(&timed_out));
        let connect = Error::Timeout {
            what: "connect",
            after: Duration::from_secs(1),
        };
        assert!(!may_be_unprintable(&connect));
        assert!(print_refused(&SqlState::PROGRAM_LIMIT_EXCEEDED));
        assert!(print_refused(&SqlState::OUT_OF_MEMORY));
        assert!(!print_refused(&SqlState::QUERY_CANCELED));
        assert!(!print_refused(&SqlState::T_R_SERIALIZATION_FAILURE));
    }
}
