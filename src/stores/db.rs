//! The database: SQLite (a file under `--data-dir`, the default) or PostgreSQL
//! (`--database-url postgres://…`), one code path through sqlx's `Any` driver, plus change
//! notifications between processes (Postgres `LISTEN/NOTIFY`; everyone also polls).

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::AnyPool;
use tokio::sync::broadcast;

/// Which engine a [`Db`] talks to (the few statements that differ ask it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Something changed in the shared state; consumers re-read the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The adapter registry (payload: the adapter's name).
    Adapters(String),
    /// A job's record or events (payload: the job id).
    Job(String),
}

const ADAPTERS_CHANNEL: &str = "sdserve_adapters";
const JOBS_CHANNEL: &str = "sdserve_jobs";

/// A connection pool and the change feed. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    url: String,
    changes: broadcast::Sender<Change>,
}

/// The default database of a data folder.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("sdserve.db").display())
}

fn migrator() -> Migrator {
    let migration = Migration::new(
        1,
        Cow::Borrowed("stores"),
        MigrationType::Simple,
        Cow::Borrowed(include_str!("../../migrations/0001_stores.sql")),
        false,
    );
    Migrator {
        migrations: Cow::Owned(vec![migration]),
        ..Migrator::DEFAULT
    }
}

impl Db {
    /// Connects and brings the schema up to date (safe when several processes start at once).
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            anyhow::bail!("unsupported database URL {:?}: use sqlite://PATH or postgres://…", redact(url))
        };
        let options: AnyConnectOptions = url.parse().with_context(|| format!("invalid database URL {:?}", redact(url)))?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Readers never wait for the writer; writers wait instead of failing.
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .with_context(|| format!("cannot connect to the database {}", redact(url)))?;
        migrator().run(&pool).await.context("cannot apply the database schema")?;
        Ok(Self { pool, backend, url: url.to_string(), changes: broadcast::channel(4096).0 })
    }

    /// The URL without its password, for logs.
    pub fn display_url(&self) -> String {
        redact(&self.url)
    }

    /// SQL for "now" in milliseconds on the database's clock (one clock for every process).
    pub fn now_ms(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Row locking for a claim subquery (SQLite has one writer at a time and needs none).
    pub fn skip_locked(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Tells this process at once, and the others through `NOTIFY` (Postgres) or their polling.
    pub async fn notify(&self, change: Change) {
        let _ = self.changes.send(change.clone());
        if self.backend != Backend::Postgres {
            return;
        }
        let (channel, payload) = match &change {
            Change::Adapters(name) => (ADAPTERS_CHANNEL, name),
            Change::Job(id) => (JOBS_CHANNEL, id),
        };
        let sent = sqlx::query("SELECT pg_notify($1, $2)").bind(channel).bind(payload.as_str()).execute(&self.pool).await;
        if let Err(e) = sent {
            tracing::warn!("cannot notify {channel}: {e}");
        }
    }

    /// Changes made by this process and, with Postgres, by the others.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// With Postgres, forwards other processes' notifications into [`Self::subscribe`] until
    /// the runtime stops, reconnecting after errors. Without, polling is all there is.
    pub fn start_listener(&self) {
        if self.backend != Backend::Postgres {
            return;
        }
        let db = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = db.listen().await {
                    tracing::warn!("database notifications interrupted ({e:#}); polling until they resume");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn listen(&self) -> Result<()> {
        let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
        listener.listen_all([ADAPTERS_CHANNEL, JOBS_CHANNEL]).await?;
        loop {
            let n = listener.recv().await?;
            let change = match n.channel() {
                ADAPTERS_CHANNEL => Change::Adapters(n.payload().to_string()),
                _ => Change::Job(n.payload().to_string()),
            };
            let _ = self.changes.send(change);
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(redact("postgres://sd:hunter2@db:5432/sd"), "postgres://sd:***@db:5432/sd");
        assert_eq!(redact("postgres://db/sd"), "postgres://db/sd");
        assert_eq!(redact("sqlite:///data/sdserve.db?mode=rwc"), "sqlite:///data/sdserve.db?mode=rwc");
    }
}
