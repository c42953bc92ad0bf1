//! What every process of a deployment shares: the database (jobs, the adapter registry, the
//! live processes) and the adapter blob store. Below both `server/` and `cli/`.
//!
//! - [`db`]: SQLite by default, PostgreSQL for clusters; change notifications.
//! - [`align_jobs`]: the /align queue with exactly-once claiming; [`image_jobs`]: image job
//!   records; [`instances`]: heartbeats and the end of dead processes' jobs.
//! - [`registry`]: adapter names → blobs and metadata; [`blobs`]: the bytes (`object_store`:
//!   local folder or S3), cached locally by sha256.

pub mod align_jobs;
pub mod blobs;
pub mod db;
pub mod image_jobs;
pub mod instances;
pub mod registry;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;

pub use align_jobs::AlignJobStore;
pub use blobs::BlobStore;
pub use db::{Change, Db};
pub use image_jobs::ImageJobStore;
pub use instances::Instances;
pub use registry::{AdapterMeta, AdapterRecord, AdapterSource, Registry};

/// Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Milliseconds since the Unix epoch on this machine (ordering within a second).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Where the shared state lives (flags of `sdserve serve`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Job and adapter-registry database: `postgres://user:password@host/db` for a cluster;
    /// default: the SQLite file `<data-dir>/sdserve.db`.
    #[arg(long, env = "SDSERVE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Adapter blobs: `s3://bucket/prefix` (credentials, region and endpoint from the usual
    /// `AWS_*` variables); default: the adapters folder.
    #[arg(long, env = "SDSERVE_ADAPTER_STORE")]
    pub adapter_store: Option<String>,
    /// Seconds without a heartbeat after which a process counts as dead and its running jobs
    /// end as `interrupted` (default 30).
    #[arg(long, env = "SDSERVE_LEASE_TIMEOUT_S")]
    pub lease_timeout_s: Option<f64>,
    /// Seconds between polls of the shared state (adapter changes, cancels), the fallback to
    /// Postgres notifications (default 1).
    #[arg(long, env = "SDSERVE_POLL_INTERVAL_S")]
    pub poll_interval_s: Option<f64>,
}

impl StoreArgs {
    pub fn lease_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.lease_timeout_s.unwrap_or(30.0))
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.poll_interval_s.unwrap_or(1.0))
    }

    /// Heartbeats come a few times per lease.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.lease_timeout() / 5).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    pub fn validate(&self) -> Result<()> {
        let lease = self.lease_timeout_s.unwrap_or(30.0);
        anyhow::ensure!(lease.is_finite() && lease >= 0.5, "--lease-timeout-s must be at least 0.5");
        let poll = self.poll_interval_s.unwrap_or(1.0);
        anyhow::ensure!(poll.is_finite() && (0.01..=60.0).contains(&poll), "--poll-interval-s must be between 0.01 and 60");
        Ok(())
    }
}

/// The shared state of one process.
#[derive(Clone)]
pub struct Stores {
    pub db: Db,
    pub align: AlignJobStore,
    pub images: ImageJobStore,
    pub registry: Registry,
    pub instances: Instances,
}

impl Stores {
    /// Connects to `--database-url`, or the SQLite file of `data_dir`.
    pub async fn open(args: &StoreArgs, data_dir: &Path) -> Result<Self> {
        let url = match &args.database_url {
            Some(url) => url.clone(),
            None => {
                std::fs::create_dir_all(data_dir)?;
                db::sqlite_url(data_dir)
            }
        };
        let db = Db::connect(&url).await?;
        tracing::info!("database: {}", db.display_url());
        Ok(Self::with_db(db))
    }

    pub fn with_db(db: Db) -> Self {
        Self {
            align: AlignJobStore::new(db.clone()),
            images: ImageJobStore::new(db.clone()),
            registry: Registry::new(db.clone()),
            instances: Instances::new(db.clone()),
            db,
        }
    }
}

/// Downloads and upload staging of a process: `<data_dir>/adapter-cache`.
pub fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("adapter-cache")
}
