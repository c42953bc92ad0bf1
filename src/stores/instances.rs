//! The processes of a deployment: each registers itself with its role and heartbeats; any of
//! them removes those silent for longer than the lease timeout and ends the jobs they owned.

use std::time::Duration;

use anyhow::Result;

use super::align_jobs::AlignJobStore;
use super::db::Db;
use super::image_jobs::ImageJobStore;
use super::unix_now;

/// The instance table.
#[derive(Clone)]
pub struct Instances {
    db: Db,
}

impl Instances {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Registers (or re-registers, after it was declared dead) this process.
    pub async fn heartbeat(&self, id: &str, role: &str) -> Result<()> {
        let sql = format!("UPDATE instances SET heartbeat_ms = {} WHERE id = $1", self.db.now_ms());
        if sqlx::query(&sql).bind(id).execute(&self.db.pool).await?.rows_affected() == 0 {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into());
            let sql = format!("INSERT INTO instances (id, role, host, started_at, heartbeat_ms) VALUES ($1, $2, $3, $4, {})", self.db.now_ms());
            sqlx::query(&sql).bind(id).bind(role).bind(host).bind(unix_now() as i64).execute(&self.db.pool).await?;
        }
        Ok(())
    }

    /// Forgets this process (a clean shutdown); its unfinished jobs end at the next reap.
    pub async fn deregister(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM instances WHERE id = $1").bind(id).execute(&self.db.pool).await?;
        Ok(())
    }

    /// Removes instances silent for longer than `lease`, then ends every running job (align)
    /// and live image job whose owner is gone. Returns the ids of the jobs it ended.
    pub async fn reap(&self, lease: Duration) -> Result<Vec<String>> {
        let sql = format!("DELETE FROM instances WHERE heartbeat_ms < {} - $1", self.db.now_ms());
        let dead = sqlx::query(&sql).bind(lease.as_millis() as i64).execute(&self.db.pool).await?.rows_affected();
        if dead > 0 {
            tracing::warn!("{dead} sdserve process(es) stopped heartbeating; ending their jobs");
        }
        let mut ended = AlignJobStore::new(self.db.clone()).interrupt_orphans().await?;
        ended.extend(ImageJobStore::new(self.db.clone()).interrupt_orphans().await?);
        Ok(ended)
    }
}
