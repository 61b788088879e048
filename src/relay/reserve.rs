//! The reserve stage: the batch connections and the reservation transaction. A reservation is
//! the batch transaction's row locks (`for update skip locked`, see `src/sql/reserve.sql`); it lasts
//! until the confirm stage commits, and Postgres ends a session that idles in it longer than the
//! lease.

use std::sync::Arc;

use postgres_types::Type;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::pg::Pg;
use crate::store::{PgTimestamp, RawJson, RelaySql};

use super::shared::Session;
use super::timing::{millis, round_trip, round_trip_on, Stop, Timing};
use super::unprintable;

/// The reservations' parameter types (`reserve.sql`'s `$1`–`$6`: batch size, byte budget, the
/// scan's start, the group of each aggregate bucket, the group taken, the aggregates left out),
/// as they are prepared.
pub(crate) const RESERVE_PARAM_TYPES: [Type; 6] = [
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT2_ARRAY,
    Type::INT2,
    Type::TEXT_ARRAY,
];

/// Session settings of the relay's batch connections (besides the lease timeout).
///
/// Custom plans: a generic plan made while the table was nearly empty is several times slower
/// once a backlog arrives (measured: 15k vs 40k events/s); planning costs well under 1 ms.
/// Bitmap scans read and sort every pending row for the `order by seq limit n` reservation.
/// (Whether a confirm waits for its WAL flush is set in its own transaction: see
/// `confirm::CONFIRM_SETUP`.)
pub(crate) const BATCH_SESSION_SETUP: &str = "set plan_cache_mode = force_custom_plan; \
     set enable_bitmapscan = off";

/// A row reserved for publishing.
#[derive(Debug)]
pub(crate) struct Reserved {
    pub(crate) id: Uuid,
    pub(crate) seq: i64,
    pub(crate) aggregate_id: String,
    pub(crate) topic: String,
    pub(crate) event_type: String,
    pub(crate) payload: RawJson,
    pub(crate) headers: Option<RawJson>,
    /// Failed attempts before this one.
    pub(crate) attempts: i32,
    /// Seconds since `created_at_tz` when reserved (None for an infinite `created_at_tz`).
    pub(crate) age_at_reserve: Option<f64>,
    /// `created_at_tz` as RFC 3339 in UTC with microseconds (None when infinite or outside the
    /// years 0001–9999, which RFC 3339 cannot write: the record then has no `ce_time`).
    pub(crate) created_at: Option<String>,
    /// The rule of `add_new_event` this row breaks (a row written by another writer): it is
    /// dead-lettered without being sent.
    pub(crate) invalid: Option<String>,
    /// The bucket of its aggregate (`hashtext(aggregate_id) & 63`, see [`super::split`]).
    pub(crate) bucket: u8,
}

impl Reserved {
    pub(crate) fn from_row(r: &tokio_postgres::Row) -> Self {
        let mut row = Reserved {
            id: r.get(0),
            seq: r.get(1),
            aggregate_id: r.get(2),
            topic: r.get(3),
            event_type: r.get(4),
            payload: r.get(5),
            headers: r.get(6),
            attempts: r.get(7),
            age_at_reserve: r.get(8),
            created_at: (r.get::<_, Option<PgTimestamp>>(10)).and_then(|t| t.rfc3339_micros()),
            invalid: None,
            bucket: (r.get::<_, Option<i32>>(16))
                .and_then(|b| u8::try_from(b & 63).ok())
                .unwrap_or(0),
        };
        row.invalid = crate::event::validate_row(&row.topic, &row.aggregate_id, &row.event_type)
            .err()
            .map(|e| format!("{e} (a rule of add_new_event; not sent, no retries)"));
        row
    }
}

/// The rows a reservation returned: `reserve.sql` stands for none with one row of nulls but
/// for the scan's columns (see [`Scan::of`]), so that an empty scan still says where it ended.
pub(crate) fn returned(rows: &[tokio_postgres::Row]) -> &[tokio_postgres::Row] {
    match rows.first() {
        Some(r) if r.get::<_, Option<Uuid>>(0).is_none() => &[],
        _ => rows,
    }
}

/// A batch connection with the statements of its transaction.
pub(crate) struct BatchConn {
    pub(crate) client: Arc<Client>,
    /// The reservation of a scan from where the last one left off.
    reserve: Statement,
    /// The reservation of a scan from the first pending row (see `RelaySql::reserve_full`).
    reserve_full: Statement,
    /// The same within a window (see `RelaySql::reserve_windowed`).
    reserve_windowed: Statement,
    /// The three for a light batch (see `RelaySql::light_reserve`), and their limit.
    light_reserve: [Statement; 3],
    light_limit: usize,
    /// `RelaySql::begin` and `RelaySql::light_begin`: each batch transaction's first round trip.
    begin: Arc<str>,
    light_begin: Arc<str>,
    pub(crate) confirm: Statement,
    /// Rows acknowledged while the batch still publishes (see `confirm::confirm_early`).
    pub(crate) confirm_early: Statement,
    /// The connection string's server it is on.
    server: usize,
    /// Its backend's process id (`pg_backend_pid()`): after it missed a deadline, its cancelled
    /// statement holds its row locks until the server notices the closed session (see
    /// [`unprintable::locate`]).
    pid: i32,
}

impl Session for BatchConn {
    fn client(&self) -> &Arc<Client> {
        &self.client
    }
    fn server(&self) -> usize {
        self.server
    }
}

impl BatchConn {
    /// Connects (bounded by the connect deadline) and prepares (one round trip each).
    async fn open(pg: &Pg, sql: &RelaySql, timing: &Timing, stop: &Stop) -> crate::Result<Self> {
        let client =
            round_trip(stop, "connect", pg.connect_deadline(), pg.connect("batch")).await?;
        let server = pg.server_of_last_connect();
        round_trip(
            stop,
            "batch session setup",
            timing.round_trip,
            Self::setup(&client, sql, timing),
        )
        .await
        .map(
            |(
                [reserve, reserve_full, reserve_windowed],
                light_reserve,
                confirm,
                confirm_early,
                pid,
            )| {
                BatchConn {
                    client: Arc::new(client),
                    reserve,
                    reserve_full,
                    reserve_windowed,
                    light_reserve,
                    light_limit: sql.light_limit,
                    begin: sql.begin.as_str().into(),
                    light_begin: sql.light_begin.as_str().into(),
                    confirm,
                    confirm_early,
                    server,
                    pid,
                }
            },
        )
    }

    async fn setup(
        client: &Client,
        sql: &RelaySql,
        timing: &Timing,
    ) -> Result<([Statement; 3], [Statement; 3], Statement, Statement, i32), tokio_postgres::Error>
    {
        // A session that idles in its batch transaction longer than the lease (a hung relay) is
        // ended by Postgres, which releases the rows.
        client
            .batch_execute(&format!(
                "set idle_in_transaction_session_timeout = {}; {BATCH_SESSION_SETUP}",
                millis(timing.lease)
            ))
            .await?;
        let types = RESERVE_PARAM_TYPES;
        let [l0, l1, l2] = &sql.light_reserve;
        let (r0, r1, r2, l0, l1, l2, confirm, confirm_early, pid) = futures::try_join!(
            client.prepare_typed(&sql.reserve, &types),
            client.prepare_typed(&sql.reserve_full, &types),
            client.prepare_typed(&sql.reserve_windowed, &types),
            client.prepare_typed(l0, &types),
            client.prepare_typed(l1, &types),
            client.prepare_typed(l2, &types),
            client.prepare(&sql.confirm),
            client.prepare(&sql.confirm_early),
            client.query_one("select pg_backend_pid()", &[])
        )?;
        let pid = pid.try_get(0).unwrap_or(0);
        Ok(([r0, r1, r2], [l0, l1, l2], confirm, confirm_early, pid))
    }

    /// Begins the batch transaction and locks the rows `ask` describes. On an empty result the
    /// transaction is ended. Returns the rows (none: `reserve.sql` then returns one row of
    /// nulls but for the scan's columns) and what the scan found.
    async fn reserve(&self, ask: &Ask) -> Result<(Vec<Reserved>, Scan), tokio_postgres::Error> {
        let params = ask.params();
        let params = params.refs();
        // Light statements limit their candidates to `light_limit`, written in: only for that.
        let light = ask.light && ask.limit == self.light_limit;
        let statement = match (light, ask.skip_blocked, ask.windowed) {
            (false, true, true) => &self.reserve_windowed,
            (false, true, false) => &self.reserve_full,
            (false, false, _) => &self.reserve,
            (true, true, true) => &self.light_reserve[2],
            (true, true, false) => &self.light_reserve[1],
            (true, false, _) => &self.light_reserve[0],
        };
        let rows = if light {
            let (_, rows, _) = futures::try_join!(
                self.client.batch_execute(&self.light_begin),
                self.client.query(statement, &params),
                self.client.batch_execute(LIGHT_AFTER_RESERVE)
            )?;
            rows
        } else {
            let (_, rows) = futures::try_join!(
                self.client.batch_execute(&self.begin),
                self.client.query(statement, &params)
            )?;
            rows
        };
        let scan = Scan::of(&rows);
        if returned(&rows).is_empty() {
            self.client.batch_execute("rollback").await?;
            return Ok((Vec::new(), scan));
        }
        Ok((rows.iter().map(Reserved::from_row).collect(), scan))
    }

    /// Ends the batch transaction without confirming (its rows are released); `false` when the
    /// rollback failed or missed its deadline (drop the connection then: Postgres ends the
    /// transaction with the session; a missed deadline sent a cancel request for the statement,
    /// see [`Pg::cancel`]).
    pub(crate) async fn rollback(&self, pg: &Pg, timing: &Timing, stop: &Stop) -> bool {
        round_trip_on(
            pg,
            self,
            stop,
            "rollback",
            timing.round_trip,
            self.client.batch_execute("rollback"),
        )
        .await
        .is_ok()
    }
}

/// `reserve.sql`'s parameters `$1`–`$6` for an [`Ask`].
pub(crate) struct Params<'a> {
    limit: i64,
    max_bytes: i64,
    from: i64,
    buckets: &'a [i16],
    group: i16,
    left_out: &'a [String],
}

impl Params<'_> {
    pub(crate) fn refs(&self) -> [&(dyn postgres_types::ToSql + Sync); 6] {
        [
            &self.limit,
            &self.max_bytes,
            &self.from,
            &self.buckets,
            &self.group,
            &self.left_out,
        ]
    }
}

/// What a reservation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ask {
    /// Rows at most.
    pub(crate) limit: usize,
    /// The byte budget of the rows' payloads and headers (JSON text); the first row is taken
    /// whatever its size.
    pub(crate) max_bytes: usize,
    /// The lowest `seq` the scan for candidates looks at (`i64::MIN`: every pending row).
    pub(crate) from: i64,
    /// Skip the rows of aggregates whose first open row is not due (`RelaySql::reserve_full`:
    /// scans from the first pending row, or from the floor below which the last one found
    /// nothing, see `ScanStart::next`).
    pub(crate) skip_blocked: bool,
    /// With `skip_blocked`: read at most a window of pending rows (`RelaySql::reserve_windowed`).
    pub(crate) windowed: bool,
    /// Only the rows of this group of aggregates: the group of each bucket, and the group (see
    /// [`super::split`]); `None`: every row.
    pub(crate) group: Option<(Arc<[i16]>, i16)>,
    /// A light reservation (after one that caught up with at most [`LIGHT_ROWS`] rows): it runs
    /// its generic plan (see [`LIGHT_BEGIN`]); only with `limit` = `RelaySql::light_limit`.
    pub(crate) light: bool,
    /// Aggregates whose rows are no candidates: held back behind a row another transaction
    /// has locked (see `Pipeline::reserved_nothing`).
    pub(crate) left_out: Arc<[String]>,
}

impl Ask {
    /// The reservation's parameters.
    pub(crate) fn params(&self) -> Params<'_> {
        let (buckets, group): (&[i16], i16) = match &self.group {
            Some((buckets, group)) => (buckets, *group),
            None => (&[], -1),
        };
        Params {
            limit: i64::try_from(self.limit).unwrap_or(i64::MAX),
            max_bytes: i64::try_from(self.max_bytes).unwrap_or(i64::MAX),
            from: self.from,
            buckets,
            group,
            left_out: &self.left_out,
        }
    }
}

/// A reservation that caught up with at most this many rows makes the next one light (see
/// [`LIGHT_BEGIN`]): a relay that keeps up at 1k events/s reserves 2–5 rows at a time, where
/// planning is most of a reservation's cost; at 10k events/s (batches of ~170 rows, the
/// relay near the machine's limit) it is not, and light reservations there (in a first form,
/// after every batch that caught up, whatever its size) let the backlog outgrow the relay (p50
/// 1.9–2.3 s against 61–82 ms, BENCHMARKS.md).
pub(crate) const LIGHT_ROWS: usize = 64;

/// Begins a light batch transaction: its reservation runs its generic plan, made once per
/// session, instead of a custom plan per execution. Planning the reservation took 0.8 ms of
/// its 1.05 ms server time in a relay that keeps up at 1k events/s (`pg_stat_statements`, 2,420
/// reservations of 4.6 rows); a caught-up batch pays it on its way to the ack, and the two
/// cores pay it per batch (BENCHMARKS.md, "Generic plans for the batches of a relay that keeps
/// up"). A generic plan cannot see the table's size and, planned once on a near-empty table,
/// chose sequential scans and nested loops that grew with the table (16 ms for 256 rows, from
/// 0.9 ms); with sequential scans and nested loops disabled it keeps the custom plans' shape
/// (the index scans, the hash join of candidates and gate; the gate's lateral probe stays a
/// nested loop: nothing else can run a lateral), also for a full batch (a burst after a quiet
/// spell: 2,000 rows reserved in 55 ms against 65 ms with custom plans, measured on a table of
/// 24k pending rows); and it sees the limit, written into the light statements (see
/// `RelaySql::light_reserve`). The plan is cached with the settings it was made under, and made
/// again after an `ANALYZE` of the table.
pub(crate) const LIGHT_BEGIN: &str = "begin; set local plan_cache_mode = force_generic_plan; \
     set local enable_seqscan = off; set local enable_nestloop = off";

/// After a light reservation, in the same round trip: the confirm (and an early write) plan
/// custom again, with nested loops. Their generic plans saved 0.15 ms but cannot see how many
/// ids a batch has: made on a table that looked empty, the confirm's generic plan hashed the
/// whole primary key per confirm (8.4 s for one row on a table grown to 1M rows), or put the
/// table outside a nested loop over the ids (81 s for a 2,000-row burst's batch: a confirm past
/// `postgres_timeout`, its batch published again) — found by two breaker helpers.
pub(crate) const LIGHT_AFTER_RESERVE: &str =
    "set local plan_cache_mode = force_custom_plan; set local enable_nestloop = on";

/// What a reservation's scan found, besides its rows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Rows were left out by the byte budget (reserve again at once).
    pub(crate) cut_by_bytes: bool,
    /// Where the next scan may start, when this one found as many candidates as it could take
    /// (a backlog: more may be pending above them): every row below it that this scan saw was
    /// returned, or is held back behind a row that is not due (a dead letter, a backoff, a hold:
    /// see `reserve.sql`). `None` when the scan reached the end of the pending rows.
    pub(crate) next_from: Option<i64>,
    /// The lowest `seq` among its candidates: below it, every pending row it looked at was
    /// skipped (locked by another batch, fenced, not due, or behind a blocked aggregate).
    pub(crate) lowest: Option<i64>,
    /// A scan that skipped blocked aggregates stopped at the end of its window (see
    /// `store::SCAN_WINDOW`) with fewer candidates than it could take: more pending rows follow,
    /// and the next scan continues from `next_from` (after the window, or at its last `seq`
    /// when it found candidates), skipping blocked aggregates too. Rows the gate held back in
    /// the window wait for the next scan from the first pending row or the floor.
    pub(crate) windowed: bool,
    /// After a scan that found as many candidates as it could take: the `seq` after the
    /// highest of them, where a scan that goes on past all of them starts (see
    /// `Pipeline::reserved_nothing`).
    pub(crate) past: Option<i64>,
    /// When it kept none of them: the aggregates the gate held back behind a row that is
    /// pending and due but not among the candidates (column 17).
    pub(crate) held: Vec<String>,
    /// Those of `held` whose blocking row a transaction in progress has locked, other than a
    /// relay's batch session (column 18): the locks to report.
    pub(crate) held_locked: Vec<String>,
    /// Who holds those locks (column 19): up to three sessions, as `reserve.sql` describes
    /// them (their application names are the sessions' own text: made printable where shown).
    pub(crate) held_by: Option<String>,
}

impl Scan {
    /// Whether the reservation caught up: its scan found fewer candidates than it could take,
    /// within its byte budget, so no more rows were available to it (pending, due, not locked
    /// by another batch, not of a fenced aggregate, at or above its start). Its rows may be
    /// fewer than its limit without that: the gate holds back the rows of aggregates whose
    /// earlier events are unfinished.
    pub(crate) fn caught_up(&self) -> bool {
        !self.cut_by_bytes && self.next_from.is_none()
    }

    /// What the scan of a reservation that returned `rows` found (columns 9 and 11–15 of
    /// `reserve.sql`, the same in every row; column 9 is null in the row of nulls that stands
    /// for no rows).
    pub(crate) fn of(rows: &[tokio_postgres::Row]) -> Scan {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Scan::default();
        };
        let kept: Option<i64> = first.get(9);
        let found_limit: bool = first.get(11);
        let blocker: Option<i64> = first.get(12);
        let max_seq: Option<i64> = first.get(13);
        let lowest: Option<i64> = first.get(14);
        let window_end: Option<i64> = first.get(15);
        let held: Option<Vec<String>> = first.try_get(17).ok().flatten();
        let held_locked: Option<Vec<String>> = first.try_get(18).ok().flatten();
        let held_by: Option<String> = first.try_get(19).ok().flatten();
        let cut_by_bytes =
            kept.is_some_and(|k| usize::try_from(k).map_or(true, |k| k > rows.len()));
        let last_seq = last.get::<_, Option<i64>>(1);
        let (next_from, windowed) = match (found_limit, max_seq, window_end) {
            (true, Some(max_seq), _) => (
                Some(next_from(
                    blocker,
                    cut_by_bytes,
                    last_seq.unwrap_or(max_seq),
                    max_seq,
                )),
                false,
            ),
            // Every row up to the window's end was skipped: the next scan starts after it
            // (`seq` may repeat, but the window read every row at its end).
            (_, _, Some(end)) if lowest.is_none() => (end.checked_add(1), true),
            (_, _, Some(end)) => (Some(end), true),
            _ => (None, false),
        };
        Scan {
            cut_by_bytes,
            next_from,
            lowest,
            windowed: windowed && next_from.is_some(),
            past: max_seq
                .filter(|_| found_limit)
                .and_then(|m| m.checked_add(1)),
            held: held.unwrap_or_default(),
            held_locked: held_locked.unwrap_or_default(),
            held_by,
        }
    }
}

/// Where the next scan may start after a scan that found as many candidates as it could take:
/// at or below the lowest row it saw but did not return that may soon be available — the lowest
/// due row behind which the gate held rows back (`blocker`: below the rows it holds back), or
/// the last row returned (`last`) when the byte budget left rows out (they follow it or share
/// its `seq`) — or else at the highest it saw (`max_seq`). The start is inclusive: a row at it is seen again (locked by this batch, it is
/// skipped), which keeps rows sharing a `seq` (it is not unique) from being passed over.
fn next_from(blocker: Option<i64>, cut_by_bytes: bool, last: i64, max_seq: i64) -> i64 {
    let cut = cut_by_bytes.then_some(last);
    match (blocker, cut) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => max_seq,
    }
}

/// What [`Reserver::reserve`] got.
pub(crate) enum Reservation {
    /// Nothing to reserve (the connection went back to the pool), and what the scan found.
    Nothing(Scan),
    /// A batch: its session, its rows (in `seq` order), and what the scan found.
    Batch(BatchConn, Vec<Reserved>, Scan),
    /// Not a scan: a row Postgres cannot print, found after a reservation failed on it (see
    /// [`unprintable::locate`]), marked invalid, as a batch of its own on this session (a
    /// dead letter, never sent). It says nothing of where the next scan may start or of how
    /// long one takes.
    Unprintable(BatchConn, Reserved),
}

/// Reserves batches over a pool of idle batch connections.
#[derive(Default)]
pub(crate) struct Reserver {
    idle: Vec<BatchConn>,
    /// A batch session was opened since [`take_opened`](Self::take_opened) was last called.
    opened: bool,
}

impl Reserver {
    /// Reserves the rows `ask` describes (see [`BatchConn::reserve`]) on an idle (or new)
    /// connection; with what the scan found. After a failure that one row Postgres cannot
    /// print may cause, that row when it is found (see [`Reservation::Unprintable`]).
    ///
    /// # Errors
    /// The Postgres error of the connect or the reservation, or [`Error::Timeout`](crate::Error::Timeout)
    /// when one missed its deadline (that connection is dropped).
    pub(crate) async fn reserve(
        &mut self,
        pg: &Pg,
        sql: &RelaySql,
        timing: &Timing,
        stop: &Stop,
        ask: Ask,
    ) -> crate::Result<Reservation> {
        let conn = match self.idle.pop() {
            Some(c) if !c.client.is_closed() => c,
            _ => {
                let conn = BatchConn::open(pg, sql, timing, stop).await?;
                self.opened = true;
                conn
            }
        };
        let reserve = conn.reserve(&ask);
        let (rows, scan) =
            match round_trip_on(pg, &conn, stop, "reserve", timing.round_trip, reserve).await {
                Ok(reserved) => reserved,
                Err(e) => {
                    return self
                        .after_failure(conn, pg, sql, timing, stop, &ask, e)
                        .await
                }
            };
        if rows.is_empty() {
            self.idle.push(conn);
            return Ok(Reservation::Nothing(scan));
        }
        Ok(Reservation::Batch(conn, rows, scan))
    }

    /// After the reservation of `ask` on `conn` failed with `e`: one row Postgres cannot print
    /// fails every reservation that reaches it, so after a print limit, or a small reservation
    /// that missed its deadline (on a new session), the row is looked for (see
    /// [`unprintable::locate`]): `Ok` with it, a batch of its own (a dead letter), so that the
    /// rest go on; `Err(e)` otherwise.
    #[allow(clippy::too_many_arguments)]
    async fn after_failure(
        &mut self,
        conn: BatchConn,
        pg: &Pg,
        sql: &RelaySql,
        timing: &Timing,
        stop: &Stop,
        ask: &Ask,
        e: crate::Error,
    ) -> crate::Result<Reservation> {
        let (conn, after) = match &e {
            e if unprintable::failed_to_print(e) => (conn, unprintable::After::Refused),
            crate::Error::Timeout {
                what: "reserve", ..
            } if ask.limit <= unprintable::SMALL_RESERVATION => {
                // A session that missed its deadline is dropped, never reused.
                let old = conn.pid;
                drop(conn);
                match BatchConn::open(pg, sql, timing, stop).await {
                    Ok(c) => (c, unprintable::After::TimedOut(old)),
                    Err(_) => return Err(e),
                }
            }
            _ => return Err(e),
        };
        let found = unprintable::locate(&conn, pg, sql, timing, stop, ask, after).await;
        match found {
            Ok(Some(row)) => Ok(Reservation::Unprintable(conn, row)),
            Ok(None) => {
                tracing::warn!(error = %e, "outbox relay: a reservation failed, and no event it reaches is one Postgres cannot print");
                self.idle.push(conn);
                Err(e)
            }
            Err(l) => {
                tracing::warn!(error = %l, reservation_error = %e, "outbox relay: cannot look for an event Postgres cannot print");
                Err(e)
            }
        }
    }

    /// Whether a batch session was opened since the last call (after a server restart, every
    /// session is new).
    pub(crate) fn take_opened(&mut self) -> bool {
        std::mem::take(&mut self.opened)
    }

    /// Returns a connection whose batch committed.
    pub(crate) fn put_back(&mut self, conn: BatchConn) {
        self.idle.push(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::next_from;

    #[test]
    fn the_next_scan_starts_at_the_lowest_row_left_out() {
        // Every candidate returned: at the highest (seen again, skipped as locked).
        assert_eq!(next_from(None, false, 40, 40), 40);
        // Rows held back behind a due row (in flight) at 17.
        assert_eq!(next_from(Some(17), false, 40, 40), 17);
        // Left out by the byte budget: at the last returned (rows sharing its `seq` included).
        assert_eq!(next_from(None, true, 25, 40), 25);
        assert_eq!(next_from(Some(30), true, 25, 40), 25);
        assert_eq!(next_from(Some(12), true, 25, 40), 12);
        // Hostile `seq` values at the ends of int8.
        assert_eq!(next_from(None, false, i64::MAX, i64::MAX), i64::MAX);
        assert_eq!(
            next_from(Some(i64::MIN), true, i64::MAX, i64::MAX),
            i64::MIN
        );
    }
}
