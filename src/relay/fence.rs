//! Batch fences: before a batch sends anything, the relay records (committed, on a connection of
//! its own) which aggregates the batch publishes and until when its messages can still land, so
//! that a lost batch session cannot let another relay publish those aggregates meanwhile. The
//! confirm statement deletes the fence; a batch that could not confirm removes it once its held
//! messages settled; the rest expire (see `maintenance`). A confirm does not wait for its WAL
//! flush, so one lost with a server crash brings its fence back: the relay deletes the fences of
//! the batches it confirmed lately, with nothing in flight, again when it opens a batch session
//! ([`Fences::remove_recent`]), and so the fences it could not remove.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres_types::Type;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::pg::Pg;
use crate::store::RelaySql;

use super::shared::{Session, Shared, SharedSession};
use super::timing::{millis, round_trip, Stop, Timing};

/// The fence connection and its prepared statements.
struct FenceConn {
    client: Arc<Client>,
    insert: Statement,
    delete: Statement,
    server: usize,
    live: AtomicUsize,
}

impl Session for FenceConn {
    fn client(&self) -> &Arc<Client> {
        &self.client
    }
    fn server(&self) -> usize {
        self.server
    }
}

impl SharedSession for FenceConn {
    fn live(&self) -> &AtomicUsize {
        &self.live
    }
}

/// The relay's fence connection, (re)connected on demand and shared by the batches.
pub(crate) struct Fences {
    pg: Pg,
    sql: Arc<RelaySql>,
    lifetime_ms: i64,
    round_trip: std::time::Duration,
    stop: Arc<Stop>,
    conn: Shared<FenceConn>,
    /// How long a settled batch's fence is deleted again ([`Fences::remove_recent`]): the
    /// fence's lifetime (`Timing::fence`), after which it has expired anyway. (A window counted
    /// from the crash's end would not do: an outage longer than it, or a reconnect's backoff,
    /// brought the 33 s wait back — found by a breaker helper with a 10 s window.)
    lifetime: Duration,
    /// Batches settled (see [`settled`](Fences::settled)) within `lifetime`, oldest first.
    recent: Mutex<VecDeque<(Instant, Uuid)>>,
}

/// The most settled batches remembered (a relay that keeps up at 1k events/s confirms about 700
/// a second, 23,000 over the default fence lifetime of 33 s): older ones are forgotten first,
/// and their fences, if a crash brought them back, expire by themselves. 32 bytes each.
const MAX_RECENT: usize = 32_768;

impl Fences {
    pub(crate) fn new(pg: Pg, sql: Arc<RelaySql>, timing: &Timing, stop: Arc<Stop>) -> Self {
        Fences {
            pg,
            sql,
            lifetime_ms: millis(timing.fence),
            lifetime: timing.fence,
            round_trip: timing.round_trip,
            stop,
            conn: Shared::new(),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// Remembers batch `batch_id`, with none of its messages in flight (confirmed, or its fence
    /// could not be removed once they settled): its fence may be deleted again at any time (see
    /// [`remove_recent`](Self::remove_recent)).
    pub(crate) fn settled(&self, batch_id: Uuid) {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        while (recent.front()).is_some_and(|(at, _)| now.duration_since(*at) > self.lifetime)
            || recent.len() >= MAX_RECENT
        {
            recent.pop_front();
        }
        recent.push_back((now, batch_id));
    }

    /// Deletes the fences of the batches settled within the fence's lifetime (see
    /// [`settled`](Self::settled)): called when the relay has opened a batch session, so that
    /// after a server crash that lost confirms their aggregates do not wait for the fences to
    /// expire (33 s with the defaults). Returns whether there were any.
    ///
    /// # Errors
    /// As [`insert`](Self::insert).
    pub(crate) async fn remove_recent(&self) -> crate::Result<bool> {
        let ids: Vec<Uuid> = {
            let now = Instant::now();
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            (recent.iter())
                .filter(|(at, _)| now.duration_since(*at) <= self.lifetime)
                .map(|(_, id)| *id)
                .collect()
        };
        if ids.is_empty() {
            return Ok(false);
        }
        self.remove(&ids).await.map(|()| true)
    }

    /// Records the fence of batch `batch_id` over `aggregates` (autocommit), within the round
    /// trip deadline.
    ///
    /// # Errors
    /// The Postgres error, or [`Error::Timeout`](crate::Error::Timeout) (the connection is then
    /// dropped and the next fence opens a new one).
    pub(crate) async fn insert(&self, batch_id: &Uuid, aggregates: &[&str]) -> crate::Result<()> {
        let f = self.conn().await?;
        let params: [&(dyn postgres_types::ToSql + Sync); 3] =
            [batch_id, &self.lifetime_ms, &aggregates];
        let op = f.client.execute(&f.insert, &params);
        self.conn
            .round_trip(&self.pg, &f, &self.stop, "fence", self.round_trip, op)
            .await
            .map(drop)
    }

    /// Removes the fences of batches with nothing in flight: one that did not confirm, once its
    /// messages settled, or those confirmed lately (see [`remove_recent`](Self::remove_recent)).
    ///
    /// # Errors
    /// As [`insert`](Self::insert).
    pub(crate) async fn remove(&self, batch_ids: &[Uuid]) -> crate::Result<()> {
        let f = self.conn().await?;
        let params: [&(dyn postgres_types::ToSql + Sync); 1] = [&batch_ids];
        let op = f.client.execute(&f.delete, &params);
        self.conn
            .round_trip(&self.pg, &f, &self.stop, "unfence", self.round_trip, op)
            .await
            .map(drop)
    }

    async fn conn(&self) -> crate::Result<Arc<FenceConn>> {
        self.conn.get(|| self.open()).await
    }

    async fn open(&self) -> crate::Result<FenceConn> {
        let client = round_trip(
            &self.stop,
            "connect",
            self.pg.connect_deadline(),
            self.pg.connect("fence"),
        )
        .await?;
        let server = self.pg.server_of_last_connect();
        let prepare = async {
            let insert = client
                .prepare_typed(&self.sql.fence, &[Type::UUID, Type::INT8, Type::TEXT_ARRAY])
                .await?;
            let delete = client
                .prepare_typed(&self.sql.unfence, &[Type::UUID_ARRAY])
                .await?;
            Ok::<_, tokio_postgres::Error>((insert, delete))
        };
        let (insert, delete) =
            round_trip(&self.stop, "fence session setup", self.round_trip, prepare).await?;
        Ok(FenceConn {
            client: Arc::new(client),
            insert,
            delete,
            server,
            live: AtomicUsize::new(0),
        })
    }
}
