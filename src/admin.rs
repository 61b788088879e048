//! Operator calls that need Postgres only: find, requeue, status.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{Event, EventFilter, MAX_FIND_LIMIT};
use crate::pg::{bounded, Pg};
use crate::store::{event_from_row, AdminSql};

/// [`Admin::migrate`]'s deadline, in multiples of the Postgres timeout.
pub const MIGRATE_TIMEOUT_FACTOR: u32 = 30;

/// Find, requeue and status for one outbox table, over one Postgres connection (re-established
/// when lost). Needs no Kafka; [`Outbox`](crate::Outbox) offers the same calls.
///
/// Every call is bounded by the Postgres timeout, connecting included: the connection string's
/// `connect_timeout` when it sets one, else 10 s (through an [`Outbox`](crate::Outbox): its
/// [`postgres_timeout`](crate::OutboxBuilder::postgres_timeout)). A call that misses it fails
/// with [`Error::Timeout`] and drops the connection; the next call opens a new one.
#[derive(Clone)]
pub struct Admin {
    sql: Arc<AdminSql>,
    pg: Pg,
    client: Arc<Mutex<Option<Client>>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

/// Which dead letters [`Admin::requeue`] takes back: all set criteria must match; an empty
/// filter matches every dead letter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequeueFilter {
    /// The criteria, as for [`find`](crate::Outbox::find); only the ids, the aggregate and the
    /// topic are ever set (the status and the page size are implied).
    criteria: EventFilter,
}

impl RequeueFilter {
    /// Every dead letter.
    pub fn all() -> Self {
        Self::default()
    }
    /// Only these event ids.
    pub fn ids(mut self, ids: impl IntoIterator<Item = Uuid>) -> Self {
        self.criteria = self.criteria.ids(ids);
        self
    }
    /// Only this aggregate's dead letters.
    pub fn aggregate_id(mut self, aggregate_id: impl Into<String>) -> Self {
        self.criteria = self.criteria.aggregate_id(aggregate_id);
        self
    }
    /// Only dead letters for this topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.criteria = self.criteria.topic(topic);
        self
    }

    /// The same selection as an [`EventFilter`] over dead letters (for a dry run).
    pub fn to_event_filter(&self) -> EventFilter {
        self.criteria
            .clone()
            .status(crate::EventStatus::Failed)
            .limit(MAX_FIND_LIMIT)
    }
}

/// The backlog of one topic, from [`Admin::status`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TopicStatus {
    /// The topic.
    pub topic: String,
    /// Events waiting to be published (including those waiting for a retry).
    pub pending: i64,
    /// Pending events waiting for a retry after a failure (or for a late delivery report).
    pub retrying: i64,
    /// Dead letters.
    pub dead_letters: i64,
    /// Age of the oldest pending event.
    pub oldest_pending_age: Option<Duration>,
}

/// The outbox table's backlog, from [`Admin::status`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Per topic with pending events or dead letters, by topic name.
    pub topics: Vec<TopicStatus>,
    /// Pending events over all topics.
    pub pending: i64,
    /// Retrying events over all topics.
    pub retrying: i64,
    /// Dead letters over all topics.
    pub dead_letters: i64,
    /// Age of the oldest pending event over all topics.
    pub oldest_pending_age: Option<Duration>,
    /// Relay batch transactions open now (reservations in flight), over all relays of the
    /// database.
    pub open_batches: i64,
    /// Rows (of any status) with a `reserved_to` still in the future, compared in this
    /// session's time zone. This crate never sets `reserved_to` (it reserves with row locks and
    /// clears the column when it confirms), so a non-zero count means another relay, such as the
    /// original Go package's, reserved them within its lease: it is probably still running
    /// against this table and must be stopped (it publishes dead letters and ignores the order
    /// per aggregate).
    pub legacy_reservations: i64,
    /// Where the table differs from what the relay relies on (column types, NOT NULL
    /// constraints, fence table, wake trigger), each with what to do; empty when all is well.
    pub schema_problems: Vec<String>,
    /// The transaction holding the oldest snapshot in the database, which keeps Postgres from
    /// removing dead rows (delivered or deleted events) and so slows the relay's reservations;
    /// `None` when no other session holds a snapshot. A session of another role is named with
    /// its pid and application name only, unless this role has `pg_read_all_stats` (see
    /// [`OldestTransaction::age`]).
    pub oldest_transaction: Option<OldestTransaction>,
}

/// A session holding back cleanup of dead rows, from [`OutboxStatus::oldest_transaction`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OldestTransaction {
    /// Backend pid (`pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// Its `application_name` (may be empty).
    pub application_name: String,
    /// Its state (`active`, `idle in transaction`, …); empty when `age` is `None`.
    pub state: String,
    /// Time since its transaction (else its statement) began; `None` for a session of another
    /// role when this role lacks `pg_read_all_stats` (Postgres shows such a session's snapshot
    /// to every role, its state and times only to those; it read as 0 s before).
    pub age: Option<Duration>,
}

impl Admin {
    /// Connects to Postgres for `table`.
    ///
    /// # Errors
    /// [`Error::InvalidIdentifier`] for a bad table name; [`Error::Postgres`] when Postgres is
    /// unreachable; [`Error::Config`] naming the server's version when it is older than Postgres
    /// 13; [`Error::Schema`] when the table is not migrated, or the role cannot read
    /// `outbox_tables` (the message names the grant).
    pub async fn connect(pg: tokio_postgres::Config, table: &str) -> Result<Admin> {
        Self::connect_pg(Pg::plain(pg), table).await
    }

    /// [`connect`](Self::connect) over TLS (rustls; honours `sslmode` in the config).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    #[cfg(feature = "postgres-rustls")]
    pub async fn connect_rustls(
        pg: tokio_postgres::Config,
        tls: rustls::ClientConfig,
        table: &str,
    ) -> Result<Admin> {
        let tls = crate::pg::Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(tls));
        let timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(crate::pg::DEFAULT_TIMEOUT);
        Self::connect_pg(Pg::new(pg, tls, timeout), table).await
    }

    async fn connect_pg(pg: Pg, table: &str) -> Result<Admin> {
        crate::schema::validate_identifier("table", table)?;
        let client = pg.connect_bounded("admin").await?;
        crate::schema::refuse_old_server(&client, Some(pg.timeout)).await?;
        // Row-level security that applies to this role makes every query fail (its sessions run
        // with `row_security = off`): say so, with the fix, rather than the bare refusal.
        let rls = bounded(
            "schema check",
            pg.timeout,
            crate::schema_check::row_security_problems(&client, table),
        )
        .await?;
        if !rls.is_empty() {
            return Err(Error::Schema(rls.join("; ")));
        }
        let channel = bounded(
            "schema check",
            pg.timeout,
            crate::schema::check_migrated(&client, table),
        )
        .await?;
        let sql = Arc::new(AdminSql::new(table, &channel));
        Ok(Admin::from_parts(sql, pg, client))
    }

    /// Creates or upgrades `table` with its wake trigger on `channel`, like
    /// [`migrate_table`](crate::migrate_table), over a connection of its own made with the
    /// crate's connection defaults (connect timeout, TCP keepalives, `tcp_user_timeout`; see
    /// [`OutboxBuilder::postgres_timeout`](crate::OutboxBuilder::postgres_timeout)).
    ///
    /// Connecting is bounded by the connection string's `connect_timeout` (default 10 s); the
    /// migration itself by [`MIGRATE_TIMEOUT_FACTOR`] times that (5 min by default), since
    /// index builds on a large table take real time (waiting for the table's lock is bounded on
    /// its own, see [`migrate_table`](crate::migrate_table)).
    ///
    /// # Errors
    /// As [`migrate_table`](crate::migrate_table); [`Error::Timeout`] (`connect` or `migrate`)
    /// when Postgres does not answer in time.
    pub async fn migrate(
        pg: tokio_postgres::Config,
        table: &str,
        channel: &str,
    ) -> Result<crate::MigrationReport> {
        let pg = Pg::plain(pg);
        let client = pg.connect_bounded("migrate").await?;
        bounded(
            "migrate",
            pg.timeout * MIGRATE_TIMEOUT_FACTOR,
            crate::schema::migrate_table(&client, table, channel),
        )
        .await
    }

    pub(crate) fn from_parts(sql: Arc<AdminSql>, pg: Pg, client: Client) -> Self {
        Admin {
            sql,
            pg,
            client: Arc::new(Mutex::new(Some(client))),
        }
    }

    /// Runs `op` on the connection (re-established when it was lost), all within the Postgres
    /// timeout; a missed deadline drops the connection, so the next call opens a new one.
    async fn call<T>(
        &self,
        what: &'static str,
        op: impl AsyncFnOnce(&Client) -> Result<T>,
    ) -> Result<T> {
        let after = self.pg.timeout;
        let deadline = tokio::time::Instant::now() + after;
        let Ok(mut guard) = tokio::time::timeout_at(deadline, self.client.lock()).await else {
            return Err(Error::Timeout { what, after });
        };
        let result = tokio::time::timeout_at(deadline, async {
            let client = match guard.take().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => self.pg.connect("admin").await?,
            };
            let client = guard.insert(client);
            // Before any statement that could call a planted function or operator.
            let untrusted =
                crate::schema_check::untrusted_creators(&*client, &self.sql.table).await?;
            if !untrusted.is_empty() {
                return Err(Error::Schema(untrusted.join("; ")));
            }
            op(client).await
        })
        .await;
        match result {
            Ok(r) => r,
            Err(_) => {
                // The connection may be half-open: never reuse it.
                *guard = None;
                Err(Error::Timeout { what, after })
            }
        }
    }

    /// Finds events matching `filter`, ordered by `seq`, at most the filter's limit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`limit`) for a limit outside 1..=10,000;
    /// [`Error::Postgres`] when the query fails.
    pub async fn find(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        if let Some(limit) = filter.limit {
            if limit == 0 || limit > MAX_FIND_LIMIT {
                return Err(Error::InvalidArgument {
                    name: "limit",
                    reason: format!("{limit} is out of range 1..={MAX_FIND_LIMIT}"),
                });
            }
        }
        let (query, params) = self.sql.find_query(filter);
        let refs: Vec<&(dyn postgres_types::ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn postgres_types::ToSql + Sync))
            .collect();
        let rows = self
            .call("find", async |client: &Client| {
                Ok(client.query(&query, &refs).await?)
            })
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Turns dead letters (`status = 'failed'`) matching `filter` back into pending events and
    /// wakes the relays; returns how many were requeued. Their attempts restart at 0;
    /// `last_error` is kept until the next attempt.
    ///
    /// Requeued events keep their `seq`, so order holds: under
    /// [`DeadLetterPolicy::BlockAggregate`](crate::DeadLetterPolicy::BlockAggregate) the
    /// aggregate's later events, which waited behind the dead letter, go out after it. Under
    /// `Continue` those later events were already published, so the requeued event arrives
    /// after them.
    ///
    /// # Errors
    /// [`Error::Postgres`] when the update fails.
    pub async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let c = &filter.criteria;
        let ids: Option<&[Uuid]> = (!c.ids.is_empty()).then_some(c.ids.as_slice());
        self.call("requeue", async |client: &Client| {
            let n = client
                .execute(&self.sql.requeue, &[&ids, &c.aggregate_id, &c.topic])
                .await?;
            if n > 0 {
                client
                    .execute(&self.sql.notify, &[&self.sql.channel])
                    .await?;
            }
            Ok(n)
        })
        .await
    }

    /// The backlog per topic: pending, retrying, dead letters, oldest pending age; plus the
    /// relay transactions open now and any deviation of the schema from what the relay relies
    /// on. Reads the open (not delivered) rows only.
    ///
    /// # Errors
    /// [`Error::Postgres`] when the query fails.
    pub async fn status(&self) -> Result<OutboxStatus> {
        let (rows, extra) = self
            .call("status", async |client: &Client| {
                let rows = client.query(&self.sql.status, &[]).await?;
                let extra = client.query_one(&self.sql.status_relays, &[]).await?;
                let oldest = client.query_opt(&self.sql.oldest_transaction, &[]).await?;
                let schema_problems =
                    crate::schema_check::schema_deviations(client, &self.sql.table).await?;
                Ok((rows, (extra, oldest, schema_problems)))
            })
            .await?;
        let (extra, oldest, schema_problems) = extra;
        // Never panics: NaN and negative ages read as 0, ages beyond `Duration` as its maximum.
        let age = |secs: Option<f64>| {
            secs.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX))
        };
        let topics: Vec<TopicStatus> = rows
            .iter()
            .map(|r| TopicStatus {
                topic: r.get(0),
                pending: r.get(1),
                retrying: r.get(2),
                dead_letters: r.get(3),
                oldest_pending_age: age(r.get(4)),
            })
            .collect();
        Ok(OutboxStatus {
            pending: topics.iter().map(|t| t.pending).sum(),
            retrying: topics.iter().map(|t| t.retrying).sum(),
            dead_letters: topics.iter().map(|t| t.dead_letters).sum(),
            oldest_pending_age: topics.iter().filter_map(|t| t.oldest_pending_age).max(),
            open_batches: extra.get(0),
            legacy_reservations: extra.get(1),
            schema_problems,
            oldest_transaction: oldest.map(|r| OldestTransaction {
                pid: r.get(0),
                application_name: r.get(1),
                state: r.get(2),
                age: age(r.get(3)),
            }),
            topics,
        })
    }
}
