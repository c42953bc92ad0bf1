//! `/align` jobs in the database: the shared queue, exactly-once claiming by trainers, per-step
//! records and events, cancellation from any replica, and the end of jobs whose trainer died.
//!
//! A job is `queued` until one trainer's guarded `UPDATE … WHERE status = 'queued'` moves it to
//! `running` with itself as `owner` (Postgres locks the candidate row `FOR UPDATE SKIP LOCKED`,
//! SQLite has one writer at a time), so no two trainers ever run the same job. Every later write
//! of the trainer is guarded by `owner` and `status = 'running'`: once the job was cancelled or
//! declared interrupted, the trainer's writes, its final status included, change nothing.

use anyhow::Result;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::db::{Change, Db};
use super::{now_ms, unix_now};
use crate::align::jobs::{AlignError, AlignEvent, AlignJob, AlignStatus};
use crate::align::request::AlignRequest;
use crate::align::trainer::StepReport;

/// Why a cancel request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelError {
    NotFound,
    Terminal(AlignStatus),
}

/// What the trainer learns when it records a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepVerdict {
    Continue,
    /// Someone asked to cancel the job.
    Cancel,
    /// The job is no longer this trainer's (it was declared interrupted): stop, publish nothing.
    Lost,
}

/// The error code of a job whose trainer stopped before finishing it.
pub const INTERRUPTED: &str = "interrupted";

const COLUMNS: &str = "id, status, adapter_name, created_at, started_at, finished_at, seed, step, total_steps, metrics, \
    stop_reason, fine_tuned_adapter, error_code, error_message, request, cancel_requested, queued_ms";

fn opt_u64(row: &AnyRow, col: &str) -> Result<Option<u64>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(|v| v as u64))
}

fn job_from_row(row: &AnyRow) -> Result<AlignJob> {
    let status: String = row.try_get("status")?;
    let code: Option<String> = row.try_get("error_code")?;
    let message: Option<String> = row.try_get("error_message")?;
    Ok(AlignJob {
        object: "align.job".into(),
        id: row.try_get("id")?,
        status: AlignStatus::parse(&status).ok_or_else(|| anyhow::anyhow!("unknown job status {status:?}"))?,
        created_at: row.try_get::<i64, _>("created_at")? as u64,
        started_at: opt_u64(row, "started_at")?,
        finished_at: opt_u64(row, "finished_at")?,
        adapter_name: row.try_get("adapter_name")?,
        fine_tuned_adapter: row.try_get("fine_tuned_adapter")?,
        seed: row.try_get::<String, _>("seed")?.parse()?,
        step: row.try_get::<i64, _>("step")? as usize,
        total_steps: row.try_get::<i64, _>("total_steps")? as usize,
        metrics: serde_json::from_str(&row.try_get::<String, _>("metrics")?)?,
        stop_reason: row.try_get("stop_reason")?,
        error: code.map(|code| AlignError { code, message: message.unwrap_or_default() }),
        queue_position: None,
        request: serde_json::from_str(&row.try_get::<String, _>("request")?)?,
        events: Vec::new(),
    })
}

fn event_from_row(row: &AnyRow) -> Result<AlignEvent> {
    let data: Option<String> = row.try_get("data")?;
    Ok(AlignEvent {
        id: row.try_get::<i64, _>("seq")? as u64,
        created_at: row.try_get::<i64, _>("created_at")? as u64,
        kind: row.try_get("kind")?,
        message: row.try_get("message")?,
        data: data.map(|d| serde_json::from_str(&d)).transpose()?,
    })
}

/// Appends an event with the next id of its job (retrying when a concurrent writer took it).
async fn append_event(conn: &mut AnyConnection, job_id: &str, kind: &str, message: &str, data: Option<&StepReport>) -> Result<()> {
    let data = data.map(serde_json::to_string).transpose()?;
    let mut tries = 0;
    loop {
        let inserted = sqlx::query(
            "INSERT INTO align_events (job_id, seq, created_at, kind, message, data) \
             SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5 FROM align_events WHERE job_id = $1",
        )
        .bind(job_id)
        .bind(unix_now() as i64)
        .bind(kind)
        .bind(message)
        .bind(data.clone())
        .execute(&mut *conn)
        .await;
        match inserted {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && tries < 20 => tries += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

fn final_message(status: AlignStatus, error: Option<&AlignError>) -> String {
    match error {
        Some(e) => format!("job {}: {}", status.as_str(), e.message),
        None => format!("job {}", status.as_str()),
    }
}

/// The align job table and its events.
#[derive(Clone)]
pub struct AlignJobStore {
    db: Db,
}

/// How every /align job id begins (image job ids begin otherwise).
const ID_PREFIX: &str = "alignjob-";

/// Whether `id` names an /align job.
pub fn is_align_job(id: &str) -> bool {
    id.starts_with(ID_PREFIX)
}

impl AlignJobStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    async fn changed(&self, id: &str) {
        self.db.notify(Change::Job(id.to_string())).await;
    }

    /// Queues a validated request.
    pub async fn submit(&self, request: &AlignRequest, seed: u64) -> Result<AlignJob> {
        let id = format!("{ID_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO align_jobs (id, status, adapter_name, created_at, queued_ms, seed, total_steps, metrics, request) \
             VALUES ($1, 'queued', $2, $3, $4, $5, $6, '[]', $7)",
        )
        .bind(&id)
        .bind(&request.adapter_name)
        .bind(unix_now() as i64)
        .bind(now_ms())
        .bind(seed.to_string())
        .bind(request.steps as i64)
        .bind(serde_json::to_string(request)?)
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, &id, "message", "job queued", None).await?;
        tx.commit().await?;
        self.changed(&id).await;
        metrics::counter!("sdserve_align_jobs_submitted_total").increment(1);
        Ok(self.get(&id).await?.expect("just inserted"))
    }

    /// A job with its events and, when queued, its queue position.
    pub async fn get(&self, id: &str) -> Result<Option<AlignJob>> {
        let Some(row) = sqlx::query(&format!("SELECT {COLUMNS} FROM align_jobs WHERE id = $1")).bind(id).fetch_optional(&self.db.pool).await? else {
            return Ok(None);
        };
        let mut job = job_from_row(&row)?;
        job.events = self.events(id, 0).await?;
        if job.status == AlignStatus::Queued {
            let queued_ms: i64 = row.try_get("queued_ms")?;
            let ahead: i64 = sqlx::query("SELECT COUNT(*) FROM align_jobs WHERE status = 'queued' AND (queued_ms < $1 OR (queued_ms = $1 AND id < $2))")
                .bind(queued_ms)
                .bind(id)
                .fetch_one(&self.db.pool)
                .await?
                .try_get(0)?;
            job.queue_position = Some(ahead as usize + 1);
        }
        Ok(Some(job))
    }

    /// A job's status.
    pub async fn status(&self, id: &str) -> Result<Option<AlignStatus>> {
        let row = sqlx::query("SELECT status FROM align_jobs WHERE id = $1").bind(id).fetch_optional(&self.db.pool).await?;
        Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?.and_then(|s| AlignStatus::parse(&s)))
    }

    /// Every job, newest first, without events.
    pub async fn list(&self) -> Result<Vec<AlignJob>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM align_jobs ORDER BY created_at DESC, queued_ms DESC, id DESC")).fetch_all(&self.db.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// A job's events after id `after`.
    pub async fn events(&self, id: &str, after: u64) -> Result<Vec<AlignEvent>> {
        let rows = sqlx::query("SELECT seq, created_at, kind, message, data FROM align_events WHERE job_id = $1 AND seq > $2 ORDER BY seq")
            .bind(id)
            .bind(after as i64)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Number of jobs with the given status.
    pub async fn count(&self, status: AlignStatus) -> Result<usize> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM align_jobs WHERE status = $1").bind(status.as_str()).fetch_one(&self.db.pool).await?.try_get(0)?;
        Ok(n as usize)
    }

    /// Whether a queued or running job writes this adapter.
    pub async fn adapter_busy(&self, adapter: &str) -> Result<bool> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM align_jobs WHERE adapter_name = $1 AND status IN ('queued', 'running')")
            .bind(adapter)
            .fetch_one(&self.db.pool)
            .await?
            .try_get(0)?;
        Ok(n > 0)
    }

    /// Cancels a queued job at once; asks the trainer of a running one to stop after its step.
    pub async fn cancel(&self, id: &str) -> Result<Result<AlignJob, CancelError>> {
        let mut tx = self.db.pool.begin().await?;
        let cancelled = sqlx::query("UPDATE align_jobs SET status = 'cancelled', finished_at = $1 WHERE id = $2 AND status = 'queued'")
            .bind(unix_now() as i64)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if cancelled == 1 {
            append_event(&mut tx, id, AlignStatus::Cancelled.as_str(), &final_message(AlignStatus::Cancelled, None), None).await?;
        } else {
            let requested = sqlx::query("UPDATE align_jobs SET cancel_requested = 1 WHERE id = $1 AND status = 'running'").bind(id).execute(&mut *tx).await?.rows_affected();
            if requested == 1 {
                append_event(&mut tx, id, "message", "cancellation requested", None).await?;
            }
        }
        tx.commit().await?;
        self.changed(id).await;
        match self.get(id).await? {
            None => Ok(Err(CancelError::NotFound)),
            Some(job) if cancelled == 0 && job.status.is_terminal() => Ok(Err(CancelError::Terminal(job.status))),
            Some(job) => Ok(Ok(job)),
        }
    }

    /// Takes the oldest queued job for trainer `owner`, or `None` when the queue is empty.
    pub async fn claim(&self, owner: &str) -> Result<Option<AlignJob>> {
        let mut tx = self.db.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE align_jobs SET status = 'running', owner = $1, started_at = $2 \
             WHERE status = 'queued' AND id = (SELECT id FROM align_jobs WHERE status = 'queued' ORDER BY queued_ms, id LIMIT 1{}) \
             RETURNING id",
            self.db.skip_locked()
        ))
        .bind(owner)
        .bind(unix_now() as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let id: String = row.try_get(0)?;
        append_event(&mut tx, &id, "message", "job started", None).await?;
        tx.commit().await?;
        self.changed(&id).await;
        self.get(&id).await
    }

    /// Records a finished optimisation step (`metrics` is the whole curve so far).
    pub async fn record_step(&self, id: &str, owner: &str, report: &StepReport, metrics: &[StepReport]) -> Result<StepVerdict> {
        let mut tx = self.db.pool.begin().await?;
        let row = sqlx::query("UPDATE align_jobs SET step = $1, metrics = $2 WHERE id = $3 AND owner = $4 AND status = 'running' RETURNING cancel_requested, total_steps")
            .bind(report.step as i64)
            .bind(serde_json::to_string(metrics)?)
            .bind(id)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(StepVerdict::Lost);
        };
        let total: i64 = row.try_get("total_steps")?;
        let msg = format!("step {}/{total}: reward {:.5} ± {:.5}", report.step, report.reward_mean, report.reward_std);
        append_event(&mut tx, id, "metrics", &msg, Some(report)).await?;
        tx.commit().await?;
        self.changed(id).await;
        Ok(if row.try_get::<i64, _>("cancel_requested")? != 0 { StepVerdict::Cancel } else { StepVerdict::Continue })
    }

    /// Ends a running job of `owner` in `conn`'s transaction; false when it was not (any more)
    /// this trainer's running job, in which case nothing changed.
    pub async fn finish_in(
        conn: &mut AnyConnection,
        id: &str,
        owner: &str,
        status: AlignStatus,
        error: Option<&AlignError>,
        stop_reason: Option<&str>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE align_jobs SET status = $1, finished_at = $2, error_code = $3, error_message = $4, stop_reason = $5, \
             fine_tuned_adapter = CASE WHEN $1 = 'succeeded' THEN adapter_name ELSE NULL END \
             WHERE id = $6 AND owner = $7 AND status = 'running'",
        )
        .bind(status.as_str())
        .bind(unix_now() as i64)
        .bind(error.map(|e| e.code.clone()))
        .bind(error.map(|e| e.message.clone()))
        .bind(stop_reason.map(str::to_string))
        .bind(id)
        .bind(owner)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if done == 1 {
            append_event(conn, id, status.as_str(), &final_message(status, error), None).await?;
        }
        Ok(done == 1)
    }

    /// [`Self::finish_in`] in a transaction of its own.
    pub async fn finish(&self, id: &str, owner: &str, status: AlignStatus, error: Option<&AlignError>, stop_reason: Option<&str>) -> Result<bool> {
        let mut tx = self.db.pool.begin().await?;
        let done = Self::finish_in(&mut tx, id, owner, status, error, stop_reason).await?;
        tx.commit().await?;
        self.changed(id).await;
        Ok(done)
    }

    /// Marks `failed` (code `interrupted`) every running job whose owner is not a live
    /// instance; returns their ids. They are not re-queued: a run that died may die again, and
    /// a new submission is one request away.
    pub async fn interrupt_orphans(&self) -> Result<Vec<String>> {
        let mut tx = self.db.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE align_jobs SET status = 'failed', finished_at = $1, error_code = $2, error_message = $3 \
             WHERE status = 'running' AND (owner IS NULL OR owner NOT IN (SELECT id FROM instances)) RETURNING id",
        )
        .bind(unix_now() as i64)
        .bind(INTERRUPTED)
        .bind("the trainer running the job stopped (no heartbeat within the lease timeout, or a restart)")
        .fetch_all(&mut *tx)
        .await?;
        let ids = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<Vec<_>, _>>()?;
        let error = AlignError { code: INTERRUPTED.into(), message: "the trainer running the job stopped".into() };
        for id in &ids {
            append_event(&mut tx, id, AlignStatus::Failed.as_str(), &final_message(AlignStatus::Failed, Some(&error)), None).await?;
        }
        tx.commit().await?;
        for id in &ids {
            tracing::warn!("align job {id} interrupted: its trainer stopped");
            self.changed(id).await;
        }
        Ok(ids)
    }
}
