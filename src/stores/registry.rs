//! The adapter registry: which blob (and so which sha256) each adapter name serves, with its
//! sidecar metadata. Every change bumps a registry-wide revision; replicas poll it (and hear
//! `NOTIFY` on Postgres) to serve the new version everywhere.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use utoipa::ToSchema;

use super::align_jobs::AlignJobStore;
use super::db::{Change, Db};
use super::unix_now;
use crate::align::jobs::AlignStatus;

/// Names refused because a route under `/v1/adapters/` has them.
pub const RESERVED_NAMES: &[&str] = &["reload"];

/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$` and not reserved.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !RESERVED_NAMES.contains(&name)
}

/// Why [`valid_name`] refuses a name, for error messages.
pub fn name_problem(name: &str) -> String {
    if RESERVED_NAMES.contains(&name) {
        format!("adapter name {name:?} is reserved (it is a route of /v1/adapters)")
    } else {
        format!("invalid adapter name {name:?}: names are 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    }
}

/// Where an adapter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdapterSource {
    /// A file in the adapters folder or an upload.
    #[default]
    File,
    /// Written by an /align fine-tuning job.
    AlignJob,
}

/// An adapter's metadata (the JSON sidecar `<name>.json` in a local folder). Unknown keys are kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    #[serde(default)]
    pub source: AdapterSource,
    /// The /align job that wrote the adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// Model the adapter was trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl AdapterMeta {
    /// Metadata for an adapter written now by an AlignProp run (/align job `job_id`, or the
    /// CLI when `None`).
    pub fn align_job(job_id: Option<String>, base_model: Option<String>) -> Self {
        Self {
            source: AdapterSource::AlignJob,
            job_id,
            created: Some(unix_now()),
            base_model,
            extra: Default::default(),
        }
    }
}

/// One registered adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRecord {
    pub name: String,
    pub sha256: String,
    /// Where its bytes are in the blob store.
    pub blob_key: String,
    pub size_bytes: u64,
    pub meta: AdapterMeta,
    /// Unix seconds.
    pub created_at: u64,
    pub updated_at: u64,
    pub revision: i64,
}

/// Registry changes since a revision: `(name, None)` for a deletion.
pub struct Changes {
    pub revision: i64,
    pub changed: Vec<(String, Option<AdapterRecord>)>,
}

const COLUMNS: &str = "name, sha256, blob_key, size_bytes, meta, created_at, updated_at, revision, deleted";

fn record(row: &sqlx::any::AnyRow) -> Result<(String, Option<AdapterRecord>)> {
    let name: String = row.try_get("name")?;
    if row.try_get::<i64, _>("deleted")? != 0 {
        return Ok((name, None));
    }
    let meta: String = row.try_get("meta")?;
    let rec = AdapterRecord {
        name: name.clone(),
        sha256: row.try_get("sha256")?,
        blob_key: row.try_get("blob_key")?,
        size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
        meta: serde_json::from_str(&meta).unwrap_or_default(),
        created_at: row.try_get::<i64, _>("created_at")? as u64,
        updated_at: row.try_get::<i64, _>("updated_at")? as u64,
        revision: row.try_get("revision")?,
    };
    Ok((name, Some(rec)))
}

/// The /align job whose result is being registered.
pub struct JobGuard<'a> {
    pub id: &'a str,
    /// The trainer that must still own it.
    pub owner: &'a str,
    pub stop_reason: &'a str,
}

/// What [`Registry::publish`] did.
pub enum Publish {
    Done { stored: Box<AdapterRecord>, old: Option<Box<AdapterRecord>> },
    Exists,
    JobLost,
}

/// The registry table.
#[derive(Clone)]
pub struct Registry {
    db: Db,
}

impl Registry {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The current revision (changes with every write).
    pub async fn revision(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT value FROM counters WHERE name = 'adapters'").fetch_one(&self.db.pool).await?.try_get(0)?)
    }

    /// Everything changed after `revision` (all live adapters for revision 0).
    pub async fn changes_since(&self, revision: i64) -> Result<Changes> {
        let current = self.revision().await?;
        if current == revision {
            return Ok(Changes { revision, changed: Vec::new() });
        }
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM adapters WHERE revision > $1 ORDER BY revision"))
            .bind(revision)
            .fetch_all(&self.db.pool)
            .await?;
        let changed = rows.iter().map(record).collect::<Result<Vec<_>>>()?;
        let revision = changed.iter().filter_map(|(_, r)| r.as_ref().map(|r| r.revision)).max().unwrap_or(0).max(current);
        Ok(Changes { revision, changed })
    }

    /// Writes `rec` (a new name, or a new version of one) in `conn`'s transaction; returns the
    /// record as stored and the version it replaced.
    pub async fn upsert(conn: &mut AnyConnection, rec: &AdapterRecord) -> Result<(AdapterRecord, Option<AdapterRecord>)> {
        // Write first: SQLite then holds the write lock for the whole transaction.
        let revision = bump(conn).await?;
        let old = current(conn, &rec.name).await?;
        let now = unix_now() as i64;
        let created = old.as_ref().map(|o| o.created_at as i64).unwrap_or(now);
        sqlx::query(
            "INSERT INTO adapters (name, sha256, blob_key, size_bytes, meta, created_at, updated_at, revision, deleted) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0) \
             ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, blob_key = excluded.blob_key, \
             size_bytes = excluded.size_bytes, meta = excluded.meta, created_at = excluded.created_at, \
             updated_at = excluded.updated_at, revision = excluded.revision, deleted = 0",
        )
        .bind(&rec.name)
        .bind(&rec.sha256)
        .bind(&rec.blob_key)
        .bind(rec.size_bytes as i64)
        .bind(serde_json::to_string(&rec.meta)?)
        .bind(created)
        .bind(now)
        .bind(revision)
        .execute(&mut *conn)
        .await?;
        let stored = AdapterRecord { created_at: created as u64, updated_at: now as u64, revision, ..rec.clone() };
        Ok((stored, old))
    }

    /// Deletes `name` in `conn`'s transaction (a tombstone others see); returns what it was.
    pub async fn delete(conn: &mut AnyConnection, name: &str) -> Result<Option<AdapterRecord>> {
        let revision = bump(conn).await?;
        let old = current(conn, name).await?;
        if old.is_some() {
            sqlx::query("UPDATE adapters SET deleted = 1, revision = $1, updated_at = $2 WHERE name = $3")
                .bind(revision)
                .bind(unix_now() as i64)
                .bind(name)
                .execute(&mut *conn)
                .await?;
        }
        Ok(old)
    }

    /// Whether any live adapter still serves this blob.
    pub async fn blob_in_use(&self, key: &str) -> Result<bool> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM adapters WHERE blob_key = $1 AND deleted = 0").bind(key).fetch_one(&self.db.pool).await?.try_get(0)?;
        Ok(n > 0)
    }

    /// Registers `rec` in one transaction, then tells every replica. Refused (nothing written)
    /// when the name exists and `overwrite` is false, or when `job` is given and is no longer
    /// that trainer's running job; the job then ends `succeeded` in the same commit.
    pub async fn publish(&self, rec: &AdapterRecord, overwrite: bool, job: Option<&JobGuard<'_>>) -> Result<Publish> {
        let mut tx = self.db.pool.begin().await?;
        if let Some(job) = job {
            if !AlignJobStore::finish_in(&mut tx, job.id, job.owner, AlignStatus::Succeeded, None, Some(job.stop_reason)).await? {
                tx.rollback().await?;
                return Ok(Publish::JobLost);
            }
        }
        let (stored, old) = Self::upsert(&mut tx, rec).await?;
        if old.is_some() && !overwrite {
            tx.rollback().await?;
            return Ok(Publish::Exists);
        }
        tx.commit().await?;
        self.db.notify(Change::Adapters(rec.name.clone())).await;
        if let Some(job) = job {
            self.db.notify(Change::Job(job.id.to_string())).await;
        }
        Ok(Publish::Done { stored: Box::new(stored), old: old.map(Box::new) })
    }

    /// `delete` in a transaction of its own, then tells every replica.
    pub async fn remove(&self, name: &str) -> Result<Option<AdapterRecord>> {
        let mut tx = self.db.pool.begin().await?;
        let old = Self::delete(&mut tx, name).await?;
        tx.commit().await?;
        if old.is_some() {
            self.db.notify(Change::Adapters(name.to_string())).await;
        }
        Ok(old)
    }
}

async fn current(conn: &mut AnyConnection, name: &str) -> Result<Option<AdapterRecord>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM adapters WHERE name = $1")).bind(name).fetch_optional(&mut *conn).await?;
    Ok(match row {
        Some(row) => record(&row)?.1,
        None => None,
    })
}

/// The next registry revision (the counter row's lock orders concurrent writers).
async fn bump(conn: &mut AnyConnection) -> Result<i64> {
    Ok(sqlx::query("UPDATE counters SET value = value + 1 WHERE name = 'adapters' RETURNING value").fetch_one(&mut *conn).await?.try_get(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "A-b_c.d", "7", &"n".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a b", "a/b", "..", &"n".repeat(65), "reload"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(name_problem("reload").contains("reserved"));
        assert!(name_problem("a b").contains("invalid"));
    }
}
