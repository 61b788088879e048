//! Operator calls that need Postgres only: find, requeue, status.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{Event, EventFilter, MAX_FIND_LIMIT};
use crate::pg::Pg;
use crate::store::{event_from_row, AdminSql};

/// Find, requeue and status for one outbox table, over one Postgres connection (re-established
/// when lost). Needs no Kafka; [`Outbox`](crate::Outbox) offers the same calls.
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
    ids: Vec<Uuid>,
    aggregate_id: Option<String>,
    topic: Option<String>,
}

impl RequeueFilter {
    /// Every dead letter.
    pub fn all() -> Self {
        Self::default()
    }
    /// Only these event ids.
    pub fn ids(mut self, ids: impl IntoIterator<Item = Uuid>) -> Self {
        self.ids.extend(ids);
        self
    }
    /// Only this aggregate's dead letters.
    pub fn aggregate_id(mut self, aggregate_id: impl Into<String>) -> Self {
        self.aggregate_id = Some(aggregate_id.into());
        self
    }
    /// Only dead letters for this topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The same selection as an [`EventFilter`] over dead letters (for a dry run).
    pub fn to_event_filter(&self) -> EventFilter {
        let mut f = EventFilter::new()
            .status(crate::EventStatus::Failed)
            .ids(self.ids.iter().copied())
            .limit(MAX_FIND_LIMIT);
        if let Some(a) = &self.aggregate_id {
            f = f.aggregate_id(a.clone());
        }
        if let Some(t) = &self.topic {
            f = f.topic(t.clone());
        }
        f
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
    /// Rows reserved by the original Go relay whose lease has not run out.
    pub legacy_reservations: i64,
}

impl Admin {
    /// Connects to Postgres for `table`.
    ///
    /// # Errors
    /// [`Error::InvalidIdentifier`] for a bad table name; [`Error::Postgres`] when Postgres is
    /// unreachable; [`Error::Schema`] when the table is not migrated.
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
        Self::connect_pg(Pg { config: pg, tls }, table).await
    }

    async fn connect_pg(pg: Pg, table: &str) -> Result<Admin> {
        crate::schema::validate_identifier("table", table)?;
        let client = pg.connect("admin").await?;
        let channel = crate::schema::check_migrated(&client, table).await?;
        let sql = Arc::new(AdminSql::new(table, &channel));
        Ok(Admin::from_parts(sql, pg, client))
    }

    pub(crate) fn from_parts(sql: Arc<AdminSql>, pg: Pg, client: Client) -> Self {
        Admin {
            sql,
            pg,
            client: Arc::new(Mutex::new(Some(client))),
        }
    }

    /// The connection, re-established when it was lost.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.pg.connect("admin").await?);
        }
        Ok(guard)
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
        let guard = self.client().await?;
        let client = guard.as_ref().expect("client() connects");
        let rows = client.query(&query, &refs).await?;
        Ok(rows.iter().map(event_from_row).collect())
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
        let guard = self.client().await?;
        let client = guard.as_ref().expect("client() connects");
        let ids: Option<&[Uuid]> = (!filter.ids.is_empty()).then_some(filter.ids.as_slice());
        let n = client
            .execute(
                &self.sql.requeue,
                &[&ids, &filter.aggregate_id, &filter.topic],
            )
            .await?;
        if n > 0 {
            client.execute(&self.sql.notify, &[]).await?;
        }
        Ok(n)
    }

    /// The backlog per topic: pending, retrying, dead letters, oldest pending age; plus the
    /// relay transactions open now. Reads the open (not delivered) rows only.
    ///
    /// # Errors
    /// [`Error::Postgres`] when the query fails.
    pub async fn status(&self) -> Result<OutboxStatus> {
        let guard = self.client().await?;
        let client = guard.as_ref().expect("client() connects");
        let rows = client.query(&self.sql.status, &[]).await?;
        let age = |secs: Option<f64>| secs.map(|s| Duration::from_secs_f64(s.max(0.0)));
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
        let extra = client.query_one(&self.sql.status_relays, &[]).await?;
        Ok(OutboxStatus {
            pending: topics.iter().map(|t| t.pending).sum(),
            retrying: topics.iter().map(|t| t.retrying).sum(),
            dead_letters: topics.iter().map(|t| t.dead_letters).sum(),
            oldest_pending_age: topics.iter().filter_map(|t| t.oldest_pending_age).max(),
            open_batches: extra.get(0),
            legacy_reservations: extra.get(1),
            topics,
        })
    }
}
