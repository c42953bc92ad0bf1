//! Image job records. A job runs on the replica that accepted it (its `owner`, which holds the
//! resolved adapters in memory); the record here lets every replica read, follow and cancel it,
//! and keeps finished jobs across restarts. The owner writes each state with a growing
//! `version` (also the job's SSE event id), so late writes never overwrite newer ones.

use anyhow::Result;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::db::{Change, Db};
use super::{now_ms, unix_now};

/// A job as stored. `parameters` and `result` are JSON of the API's types.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageJobRecord {
    pub id: String,
    pub status: String,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub owner: String,
    pub cancel_requested: bool,
    pub version: u64,
    pub step: u32,
    pub total_steps: u32,
    pub images_done: u32,
    pub parameters: String,
    pub result: Option<String>,
    /// `(code, message)`.
    pub error: Option<(String, String)>,
}

const COLUMNS: &str = "id, status, created_at, started_at, finished_at, owner, cancel_requested, version, step, total_steps, \
    images_done, parameters, result, error_code, error_message";

const LIVE: &str = "status IN ('queued', 'running')";

fn record(row: &AnyRow) -> Result<ImageJobRecord> {
    let code: Option<String> = row.try_get("error_code")?;
    let message: Option<String> = row.try_get("error_message")?;
    Ok(ImageJobRecord {
        id: row.try_get("id")?,
        status: row.try_get("status")?,
        created_at: row.try_get::<i64, _>("created_at")? as u64,
        started_at: row.try_get::<Option<i64>, _>("started_at")?.map(|v| v as u64),
        finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(|v| v as u64),
        owner: row.try_get("owner")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        version: row.try_get::<i64, _>("version")? as u64,
        step: row.try_get::<i64, _>("step")? as u32,
        total_steps: row.try_get::<i64, _>("total_steps")? as u32,
        images_done: row.try_get::<i64, _>("images_done")? as u32,
        parameters: row.try_get("parameters")?,
        result: row.try_get("result")?,
        error: code.map(|c| (c, message.unwrap_or_default())),
    })
}

/// The image job table.
#[derive(Clone)]
pub struct ImageJobStore {
    db: Db,
}

impl ImageJobStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn insert(&self, r: &ImageJobRecord) -> Result<()> {
        sqlx::query(&format!("INSERT INTO image_jobs ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"))
            .bind(&r.id)
            .bind(&r.status)
            .bind(r.created_at as i64)
            .bind(r.started_at.map(|v| v as i64))
            .bind(r.finished_at.map(|v| v as i64))
            .bind(&r.owner)
            .bind(r.cancel_requested as i64)
            .bind(r.version as i64)
            .bind(r.step as i64)
            .bind(r.total_steps as i64)
            .bind(r.images_done as i64)
            .bind(&r.parameters)
            .bind(r.result.clone())
            .bind(r.error.as_ref().map(|e| e.0.clone()))
            .bind(r.error.as_ref().map(|e| e.1.clone()))
            .execute(&self.db.pool)
            .await?;
        self.db.notify(Change::Job(r.id.clone())).await;
        Ok(())
    }

    /// Writes the owner's newer state of a live job (older versions and ended jobs stay).
    pub async fn update(&self, r: &ImageJobRecord) -> Result<bool> {
        let done = sqlx::query(&format!(
            "UPDATE image_jobs SET status = $1, started_at = $2, finished_at = $3, version = $4, step = $5, total_steps = $6, \
             images_done = $7, result = $8, error_code = $9, error_message = $10, finished_ms = $13 \
             WHERE id = $11 AND owner = $12 AND version < $4 AND {LIVE}"
        ))
        .bind(&r.status)
        .bind(r.started_at.map(|v| v as i64))
        .bind(r.finished_at.map(|v| v as i64))
        .bind(r.version as i64)
        .bind(r.step as i64)
        .bind(r.total_steps as i64)
        .bind(r.images_done as i64)
        .bind(r.result.clone())
        .bind(r.error.as_ref().map(|e| e.0.clone()))
        .bind(r.error.as_ref().map(|e| e.1.clone()))
        .bind(&r.id)
        .bind(&r.owner)
        .bind(r.finished_at.map(|_| now_ms()))
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        self.db.notify(Change::Job(r.id.clone())).await;
        Ok(done == 1)
    }

    /// Forgets a job that was never queued.
    pub async fn delete(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM image_jobs WHERE id = $1").bind(id).execute(&self.db.pool).await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<ImageJobRecord>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM image_jobs WHERE id = $1")).bind(id).fetch_optional(&self.db.pool).await?;
        row.as_ref().map(record).transpose()
    }

    /// Cancels a job another replica owns: a queued one at once, a running one when its owner
    /// sees the request (within a second). Returns the record afterwards.
    pub async fn request_cancel(&self, id: &str) -> Result<Option<ImageJobRecord>> {
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "UPDATE image_jobs SET status = 'cancelled', finished_at = $1, version = version + 1, error_code = 'cancelled', \
             error_message = 'the job was cancelled', finished_ms = $3 WHERE id = $2 AND status = 'queued'",
        )
        .bind(unix_now() as i64)
        .bind(id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE image_jobs SET cancel_requested = 1, version = version + 1 WHERE id = $1 AND status = 'running'").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        self.db.notify(Change::Job(id.to_string())).await;
        self.get(id).await
    }

    /// Which of these live jobs another replica asked to cancel (or cancelled while queued).
    pub async fn cancel_requests(&self, ids: &[String]) -> Result<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!("SELECT id FROM image_jobs WHERE (cancel_requested = 1 OR status = 'cancelled') AND id IN ({})", marks.join(", "));
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id);
        }
        let rows = query.fetch_all(&self.db.pool).await?;
        Ok(rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
    }

    /// Marks `failed` (code `interrupted`) the live jobs of owners that are not live instances.
    pub async fn interrupt_orphans(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(&format!(
            "UPDATE image_jobs SET status = 'failed', finished_at = $1, version = version + 1, error_code = 'interrupted', \
             error_message = 'the server running the job stopped', finished_ms = $2 \
             WHERE {LIVE} AND owner NOT IN (SELECT id FROM instances) RETURNING id"
        ))
        .bind(unix_now() as i64)
        .bind(now_ms())
        .fetch_all(&self.db.pool)
        .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?;
        for id in &ids {
            self.db.notify(Change::Job(id.clone())).await;
        }
        Ok(ids)
    }

    /// Keeps the `keep` most recently finished jobs, deleting older finished ones.
    pub async fn prune(&self, keep: usize) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM image_jobs WHERE finished_at IS NOT NULL AND id NOT IN \
             (SELECT id FROM image_jobs WHERE finished_at IS NOT NULL ORDER BY finished_ms DESC, id DESC LIMIT $1)",
        )
        .bind(keep as i64)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
