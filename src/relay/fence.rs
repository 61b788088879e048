//! Batch fences: before a batch sends anything, the relay records (committed, on a connection of
//! its own) which aggregates the batch publishes and until when its messages can still land, so
//! that a lost batch session cannot let another relay publish those aggregates meanwhile. The
//! confirm statement deletes the fence; a batch that could not confirm removes it once its held
//! messages settled; the rest expire (see `maintenance`).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use postgres_types::Type;
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
}

impl Fences {
    pub(crate) fn new(pg: Pg, sql: Arc<RelaySql>, timing: &Timing, stop: Arc<Stop>) -> Self {
        Fences {
            pg,
            sql,
            lifetime_ms: millis(timing.fence),
            round_trip: timing.round_trip,
            stop,
            conn: Shared::new(),
        }
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

    /// Removes the fence of a batch that did not confirm, once nothing of it is in flight.
    ///
    /// # Errors
    /// As [`insert`](Self::insert).
    pub(crate) async fn remove(&self, batch_id: &Uuid) -> crate::Result<()> {
        let f = self.conn().await?;
        let params: [&(dyn postgres_types::ToSql + Sync); 1] = [batch_id];
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
                .prepare_typed(&self.sql.unfence, &[Type::UUID])
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
