//! Adapter bytes, through the `object_store` crate: the local adapters folder (the default)
//! or an S3-compatible bucket (`--adapter-store s3://bucket/prefix`, with the usual `AWS_*`
//! environment variables). A replica keeps what it downloaded in a local cache keyed by sha256.
//!
//! Layout: `<name>.safetensors` (+ `<name>.json` sidecar) at the top are adapters put there by
//! hand, found by a rescan. What sdserve writes itself goes to `<name>.safetensors` in a local
//! folder (one host, so users find their files where they always were) and to
//! `blobs/<sha256>.safetensors` in a bucket, where the registry's switch to a new version is
//! then one database commit and no reader can see a half-replaced name.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::registry::{valid_name, AdapterMeta};

/// A file written under a private temporary name, with its sha256 and size.
pub struct StagedFile {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

impl StagedFile {
    /// Takes over a file sdserve wrote itself (it is removed with the `StagedFile`).
    pub fn adopt(path: &FsPath) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher)?;
        Ok(Self { path: path.to_path_buf(), sha256: hex::encode(hasher.finalize()), size })
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A blob uploaded but not yet registered.
pub struct PendingBlob {
    upload: String,
    /// Where the registry will find it.
    pub key: String,
}

/// An object found at the top of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub size: u64,
    /// Changes whenever the object does (modification time and e-tag).
    pub version: String,
}

/// The adapter blob store.
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The folder, for a local store.
    local_root: Option<PathBuf>,
    /// Downloads, as `<sha256>.safetensors`; also where uploads are staged.
    cache_dir: PathBuf,
    description: String,
}

/// The hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn listed(object: object_store::ObjectMeta) -> Option<Listed> {
    let name = object.location.filename()?.strip_suffix(".safetensors")?;
    if !valid_name(name) {
        return None;
    }
    let stamp = object.last_modified.timestamp_nanos_opt().unwrap_or_default();
    Some(Listed { name: name.to_string(), size: object.size, version: format!("{stamp}:{}", object.e_tag.unwrap_or_default()) })
}

fn sidecar_key(name: &str) -> Path {
    Path::from(format!("{name}.json"))
}

impl BlobStore {
    /// `url`: `None` for the local folder `adapters_dir`, or `s3://bucket[/prefix]`.
    pub fn open(url: Option<&str>, adapters_dir: &FsPath, cache_dir: &FsPath) -> Result<Self> {
        std::fs::create_dir_all(cache_dir).with_context(|| format!("cannot create {}", cache_dir.display()))?;
        match url {
            None => {
                std::fs::create_dir_all(adapters_dir).with_context(|| format!("cannot create {}", adapters_dir.display()))?;
                let root = adapters_dir.canonicalize()?;
                Ok(Self {
                    store: Arc::new(LocalFileSystem::new_with_prefix(&root)?),
                    description: root.display().to_string(),
                    local_root: Some(root),
                    cache_dir: cache_dir.to_path_buf(),
                })
            }
            Some(url) => {
                let Some(rest) = url.strip_prefix("s3://") else {
                    bail!("unsupported adapter store {url:?}: use s3://bucket/prefix (or leave it unset for the adapters folder)");
                };
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                anyhow::ensure!(!bucket.is_empty(), "no bucket in {url:?}");
                let s3 = AmazonS3Builder::from_env().with_bucket_name(bucket).build().with_context(|| format!("cannot open {url}"))?;
                let prefix = prefix.trim_matches('/');
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
                Ok(Self { store, local_root: None, cache_dir: cache_dir.to_path_buf(), description: url.to_string() })
            }
        }
    }

    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// The local folder or the bucket URL, for logs.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Where sdserve writes a new version of `name` (see the module doc).
    pub fn key_for(&self, name: &str, sha256: &str) -> String {
        if self.is_local() {
            Self::dropped_key(name)
        } else {
            format!("blobs/{sha256}.safetensors")
        }
    }

    /// The key of an adapter put at the top by hand.
    pub fn dropped_key(name: &str) -> String {
        format!("{name}.safetensors")
    }

    /// A path in the local folder, for a local store.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|r| r.join(key))
    }

    /// Streams `body` into a private file of the cache folder, hashing as it goes; fails past
    /// `limit` bytes. Memory stays at one chunk whatever the size.
    pub async fn stage<S, E>(&self, mut body: S, limit: u64) -> Result<StagedFile, StageError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = self.cache_dir.join(format!(".upload-{}.tmp", uuid::Uuid::new_v4().simple()));
        let mut staged = StagedFile { path, sha256: String::new(), size: 0 };
        let mut file = tokio::fs::File::create(&staged.path).await.map_err(|e| StageError::Io(e.to_string()))?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StageError::Body(e.into()))?;
            staged.size += chunk.len() as u64;
            if staged.size > limit {
                return Err(StageError::TooLarge);
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| StageError::Io(e.to_string()))?;
        }
        file.sync_all().await.map_err(|e| StageError::Io(e.to_string()))?;
        staged.sha256 = hex::encode(hasher.finalize());
        Ok(staged)
    }

    /// Stages bytes already in memory (adapters written by a training run).
    pub async fn stage_bytes(&self, bytes: &[u8]) -> Result<StagedFile> {
        let chunk: Result<bytes::Bytes, std::convert::Infallible> = Ok(bytes::Bytes::copy_from_slice(bytes));
        self.stage(futures_util::stream::iter([chunk]), u64::MAX).await.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Copies a staged file to `key` (atomically: readers see the old object or the new one).
    async fn put(&self, key: &str, staged: &StagedFile) -> Result<()> {
        let mut writer = BufWriter::new(self.store.clone(), Path::from(key));
        let mut file = tokio::fs::File::open(&staged.path).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n]).await?;
        }
        writer.shutdown().await.with_context(|| format!("cannot write {key} to {}", self.description))?;
        Ok(())
    }

    /// Uploads a new version of `name` so that it can be registered; [`Self::commit`] after
    /// the registry transaction, [`Self::abort`] if it failed. In a bucket the blob goes to its
    /// final content-addressed key; in a folder it waits under a hidden name until the commit,
    /// since the final name is the current version's file.
    pub async fn upload(&self, name: &str, staged: &StagedFile) -> Result<PendingBlob> {
        let key = self.key_for(name, &staged.sha256);
        let pending = if self.is_local() {
            PendingBlob { upload: format!(".{name}.{}.pending", uuid::Uuid::new_v4().simple()), key }
        } else {
            PendingBlob { upload: key.clone(), key }
        };
        self.put(&pending.upload, staged).await?;
        Ok(pending)
    }

    /// Moves an uploaded blob to its key (a no-op in a bucket).
    pub async fn commit(&self, pending: &PendingBlob) -> Result<()> {
        if pending.upload != pending.key {
            self.store.rename(&Path::from(pending.upload.as_str()), &Path::from(pending.key.as_str())).await?;
        }
        Ok(())
    }

    /// Removes an uploaded blob that was not registered.
    pub async fn abort(&self, pending: &PendingBlob) {
        if let Err(e) = self.delete(&pending.upload).await {
            tracing::warn!("{e:#}");
        }
    }

    /// A local file with the bytes of `key`, which must hash to `sha256`: the file in a local
    /// folder, or a download cached as `<sha256>.safetensors`.
    pub async fn fetch(&self, key: &str, sha256: &str) -> Result<PathBuf, FetchError> {
        if let Some(path) = self.local_path(key) {
            return if path.is_file() { Ok(path) } else { Err(FetchError::NotFound) };
        }
        let cached = self.cached_path(sha256);
        if cached.is_file() {
            return Ok(cached);
        }
        let result = match self.store.get(&Path::from(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(FetchError::NotFound),
            Err(e) => return Err(FetchError::Other(e.into())),
        };
        let staged = self.stage(result.into_stream(), u64::MAX).await.map_err(|e| FetchError::Other(anyhow::anyhow!("cannot download {key}: {e}")))?;
        if staged.sha256 != sha256 {
            return Err(FetchError::Mismatch { found: staged.sha256.clone() });
        }
        std::fs::rename(&staged.path, &cached).map_err(|e| FetchError::Other(e.into()))?;
        Ok(cached)
    }

    fn cached_path(&self, sha256: &str) -> PathBuf {
        self.cache_dir.join(format!("{sha256}.safetensors"))
    }

    /// Drops a download that no adapter serves any more.
    pub fn evict_cached(&self, sha256: &str) {
        if !self.is_local() {
            let _ = std::fs::remove_file(self.cached_path(sha256));
        }
    }

    /// Removes an object (a missing one is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot delete {key} from {}", self.description)),
        }
    }

    /// The adapters at the top of the store (`<name>.safetensors` with a valid name).
    pub async fn list_dropped(&self) -> Result<Vec<Listed>> {
        let listing = self.store.list_with_delimiter(None).await.with_context(|| format!("cannot list {}", self.description))?;
        let mut found: Vec<Listed> = listing.objects.into_iter().filter_map(listed).collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// [`Self::list_dropped`] for one name.
    pub async fn stat_dropped(&self, name: &str) -> Result<Option<Listed>> {
        match self.store.head(&Path::from(Self::dropped_key(name))).await {
            Ok(meta) => Ok(listed(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.description)),
        }
    }

    /// Reads the bytes of a hand-put object (to hash and register it).
    pub async fn read(&self, key: &str) -> Result<Vec<u8>, FetchError> {
        match self.store.get(&Path::from(key)).await {
            Ok(r) => Ok(r.bytes().await.map_err(|e| FetchError::Other(e.into()))?.to_vec()),
            Err(object_store::Error::NotFound { .. }) => Err(FetchError::NotFound),
            Err(e) => Err(FetchError::Other(e.into())),
        }
    }

    /// The sidecar `<name>.json` next to a hand-put adapter, if there is a readable one.
    pub async fn read_sidecar(&self, name: &str) -> Option<AdapterMeta> {
        let bytes = self.store.get(&sidecar_key(name)).await.ok()?.bytes().await.ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("ignoring malformed adapter sidecar {name}.json: {e}");
                None
            }
        }
    }

    /// Writes (or with `None` removes) the sidecar of an adapter in a local folder, so that the
    /// folder stays self-describing; a bucket keeps metadata in the registry only.
    pub async fn write_sidecar(&self, name: &str, meta: Option<&AdapterMeta>) -> Result<()> {
        if !self.is_local() {
            return Ok(());
        }
        match meta {
            Some(m) => {
                self.store.put(&sidecar_key(name), serde_json::to_vec_pretty(m)?.into()).await?;
            }
            None => self.delete(&format!("{name}.json")).await?,
        }
        Ok(())
    }
}

/// Why staging an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("the upload is larger than the limit")]
    TooLarge,
    /// The body's own error, kept whole so that callers can tell a read timeout by its source.
    #[error("cannot read the request body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot write a temporary file: {0}")]
    Io(String),
}

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the adapter's file is missing from the store")]
    NotFound,
    #[error("the stored file has sha256 {found}, not the registered version")]
    Mismatch { found: String },
    #[error("{0:#}")]
    Other(anyhow::Error),
}
