//! Batch fences: before a batch sends anything, the relay records (committed, on a connection of
//! its own) which aggregates the batch publishes and until when its messages can still land, so
//! that a lost batch session cannot let another relay publish those aggregates meanwhile. The
//! confirm statement deletes the fence; a batch that could not confirm removes it once its held
//! messages settled; the rest expire (see `maintenance`).

use std::sync::Arc;

use postgres_types::Type;
use tokio::sync::Mutex;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::pg::Pg;
use crate::store::RelaySql;

use super::timing::{millis, Timing};

/// The fence connection and its prepared statements.
struct FenceConn {
    client: Client,
    insert: Statement,
    delete: Statement,
}

/// The relay's fence connection, (re)connected on demand and shared by the batches.
pub(crate) struct Fences {
    pg: Pg,
    sql: Arc<RelaySql>,
    lifetime_ms: i64,
    conn: Mutex<Option<Arc<FenceConn>>>,
}

impl Fences {
    pub(crate) fn new(pg: Pg, sql: Arc<RelaySql>, timing: &Timing) -> Self {
        Fences {
            pg,
            sql,
            lifetime_ms: millis(timing.fence),
            conn: Mutex::new(None),
        }
    }

    /// Records the fence of batch `batch_id` over `aggregates` (autocommit).
    pub(crate) async fn insert(
        &self,
        batch_id: &Uuid,
        aggregates: &[&str],
    ) -> Result<(), tokio_postgres::Error> {
        let f = self.conn().await?;
        f.client
            .execute(&f.insert, &[batch_id, &self.lifetime_ms, &aggregates])
            .await?;
        Ok(())
    }

    /// Removes the fence of a batch that did not confirm, once nothing of it is in flight.
    pub(crate) async fn remove(&self, batch_id: &Uuid) -> Result<(), tokio_postgres::Error> {
        let f = self.conn().await?;
        f.client.execute(&f.delete, &[batch_id]).await?;
        Ok(())
    }

    async fn conn(&self) -> Result<Arc<FenceConn>, tokio_postgres::Error> {
        let mut guard = self.conn.lock().await;
        if let Some(f) = guard.as_ref().filter(|f| !f.client.is_closed()) {
            return Ok(f.clone());
        }
        let client = self.pg.connect("fence").await?;
        let insert = client
            .prepare_typed(&self.sql.fence, &[Type::UUID, Type::INT8, Type::TEXT_ARRAY])
            .await?;
        let delete = client
            .prepare_typed(&self.sql.unfence, &[Type::UUID])
            .await?;
        let f = Arc::new(FenceConn {
            client,
            insert,
            delete,
        });
        *guard = Some(f.clone());
        Ok(f)
    }
}
