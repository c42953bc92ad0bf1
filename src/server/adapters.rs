//! The adapters this replica serves: a snapshot of the shared registry (`crate::stores`), kept
//! current by [`AdapterRegistry::sync`] (run on every change notification and poll), and the
//! parsed adapters in an LRU cache bounded by bytes (with pinning), keyed by name and sha256.
//!
//! A request resolves each adapter once, at submission, to one complete version (its bytes hash
//! to the registered sha256) and holds it as an `Arc<LoraAdapter>`: replacing, deleting or
//! evicting an adapter never affects a job that already has it.
//!
//! Files put into the store by hand (`<name>.safetensors`, optional `<name>.json` sidecar) are
//! registered by a rescan: on every list and reload, and in a local folder also when a request
//! names a new or changed file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lru::LruCache;

use super::api::{AdapterInfo, AdapterReload};
use super::error::ApiError;
use super::model::ModelSlot;
use crate::engine::pipeline::StableDiffusion;
use crate::lora::LoraAdapter;
use crate::stores::blobs::{sha256_hex, BlobStore, FetchError, StagedFile};
use crate::stores::registry::{name_problem, valid_name, JobGuard, Publish};
use crate::stores::{AdapterMeta, AdapterRecord, Registry};

/// Registry failures (mapped to HTTP statuses by `From<AdapterError> for ApiError`).
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{}", name_problem(.0))]
    InvalidName(String),
    #[error("adapter {0:?} not found")]
    NotFound(String),
    #[error("adapter {0:?} already exists; pass ?overwrite=true to replace it")]
    Exists(String),
    #[error("adapter {name:?} is not a valid LoRA adapter for this model: {message}")]
    Invalid { name: String, message: String },
    #[error("the model is still loading")]
    ModelNotReady,
    #[error("the align job no longer owns its run (it was cancelled or declared interrupted)")]
    JobLost,
    #[error("adapter storage error: {0}")]
    Io(String),
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        let msg = e.to_string();
        match e {
            AdapterError::InvalidName(_) => ApiError::invalid("name", msg).code("invalid_adapter_name"),
            AdapterError::NotFound(_) => ApiError::not_found(msg).code("adapter_not_found"),
            AdapterError::Exists(_) => ApiError::conflict(msg).code("adapter_exists"),
            AdapterError::Invalid { .. } => ApiError::bad_request(msg).code("invalid_adapter"),
            AdapterError::ModelNotReady => ApiError::unavailable(msg, 5),
            AdapterError::JobLost | AdapterError::Io(_) => ApiError::internal(msg),
        }
    }
}

fn io(e: impl std::fmt::Display) -> AdapterError {
    AdapterError::Io(format!("{e:#}"))
}

/// What the parsed adapter says about itself.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub format: String,
    pub rank: Option<u32>,
    pub alpha: Option<f64>,
    pub target_modules: Vec<String>,
    pub num_params: u64,
    /// Bytes held in memory by its tensors.
    pub memory_bytes: u64,
}

impl AdapterSummary {
    pub fn of(a: &LoraAdapter) -> Self {
        Self {
            format: a.format().to_string(),
            rank: Some(a.rank() as u32),
            alpha: a.alpha(),
            target_modules: a.target_modules(),
            num_params: a.num_params() as u64,
            memory_bytes: a.size_bytes() as u64,
        }
    }
}

/// An adapter resolved for one request.
#[derive(Clone)]
pub struct ResolvedAdapter {
    pub name: String,
    pub adapter: Arc<LoraAdapter>,
    pub sha256: String,
}

struct Entry {
    record: AdapterRecord,
    summary: Option<AdapterSummary>,
    error: Option<String>,
}

struct Cached {
    adapter: Arc<LoraAdapter>,
    sha256: String,
    bytes: u64,
}

struct Inner {
    entries: BTreeMap<String, Entry>,
    /// Registry revision the snapshot reflects.
    revision: i64,
    cache: LruCache<String, Cached>,
    cached_bytes: u64,
    pinned: BTreeSet<String>,
    /// Listing version of each hand-put object when it was last hashed.
    seen: BTreeMap<String, String>,
}

/// The adapters of this replica. Async methods; parsing and hashing run on blocking threads.
pub struct AdapterRegistry {
    registry: Registry,
    blobs: Arc<BlobStore>,
    model: ModelSlot,
    budget_bytes: u64,
    inner: Mutex<Inner>,
    /// Serialises this process's writers (upload, publish, delete, rescan).
    write_lock: tokio::sync::Mutex<()>,
}

/// Parses an adapter file (mapped, so that a large upload is never copied into memory first).
fn parse_file(model: &StableDiffusion, name: &str, path: &Path) -> Result<LoraAdapter, AdapterError> {
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the files mapped here are sdserve's own staged uploads and cache entries, which
    // nothing modifies once written.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    parse_bytes(model, name, &map)
}

fn parse_bytes(model: &StableDiffusion, name: &str, bytes: &[u8]) -> Result<LoraAdapter, AdapterError> {
    LoraAdapter::from_bytes(bytes, &model.lora_targets, &model.device)
        .map_err(|e| AdapterError::Invalid { name: name.to_string(), message: format!("{e:#}") })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, AdapterError> {
    tokio::task::spawn_blocking(f).await.map_err(io)
}

impl AdapterRegistry {
    /// A registry over the shared registry and blob store, with a cache of `budget_bytes`;
    /// `pinned` adapters are never evicted. Reads the registry and rescans the store.
    pub async fn open(registry: Registry, blobs: Arc<BlobStore>, model: ModelSlot, budget_bytes: u64, pinned: &[String]) -> anyhow::Result<Self> {
        let reg = Self {
            registry,
            blobs,
            model,
            budget_bytes,
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                revision: 0,
                cache: LruCache::unbounded(),
                cached_bytes: 0,
                pinned: pinned.iter().cloned().collect(),
                seen: BTreeMap::new(),
            }),
            write_lock: tokio::sync::Mutex::new(()),
        };
        reg.sync().await?;
        if let Err(e) = reg.rescan().await {
            tracing::warn!("cannot scan the adapter store {}: {e}", reg.blobs.describe());
        }
        Ok(reg)
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn model(&self) -> Result<Arc<StableDiffusion>, AdapterError> {
        self.model.get().ok_or(AdapterError::ModelNotReady)
    }

    /// Applies the registry's changes since the last sync; returns the names that changed.
    pub async fn sync(&self) -> anyhow::Result<Vec<String>> {
        let revision = self.lock().revision;
        let changes = self.registry.changes_since(revision).await?;
        let mut names = Vec::new();
        let mut inner = self.lock();
        for (name, record) in changes.changed {
            if self.apply(&mut inner, &name, record) {
                names.push(name);
            }
        }
        inner.revision = inner.revision.max(changes.revision);
        Ok(names)
    }

    /// Puts a registry record (or a deletion) into the snapshot; false if nothing changed.
    fn apply(&self, inner: &mut Inner, name: &str, record: Option<AdapterRecord>) -> bool {
        let old = inner.entries.get(name).map(|e| e.record.clone());
        match record {
            Some(r) if old.as_ref().is_some_and(|o| o.revision >= r.revision) => false,
            Some(r) => {
                let same_version = old.as_ref().is_some_and(|o| o.sha256 == r.sha256);
                let entry = inner.entries.entry(name.to_string()).or_insert(Entry { record: r.clone(), summary: None, error: None });
                entry.record = r;
                if !same_version {
                    entry.summary = None;
                    entry.error = None;
                    self.forget_version(inner, name, old.as_ref());
                }
                true
            }
            None => match inner.entries.remove(name) {
                Some(e) => {
                    self.forget_version(inner, name, Some(&e.record));
                    true
                }
                None => false,
            },
        }
    }

    /// Drops the parsed copy and the download of a version that is no longer served.
    fn forget_version(&self, inner: &mut Inner, name: &str, old: Option<&AdapterRecord>) {
        Self::uncache(inner, name);
        if let Some(old) = old {
            if !inner.entries.values().any(|e| e.record.sha256 == old.sha256) {
                self.blobs.evict_cached(&old.sha256);
            }
        }
    }

    fn uncache(inner: &mut Inner, name: &str) {
        if let Some(c) = inner.cache.pop(name) {
            inner.cached_bytes = inner.cached_bytes.saturating_sub(c.bytes);
        }
        metrics::gauge!("sdserve_adapter_cache_bytes").set(inner.cached_bytes as f64);
    }

    /// Inserts into the cache and evicts least-recently-used unpinned adapters beyond the
    /// budget (the newcomer included, if it alone exceeds it).
    fn cache_insert(&self, inner: &mut Inner, name: &str, cached: Cached) {
        Self::uncache(inner, name);
        inner.cached_bytes += cached.bytes;
        inner.cache.put(name.to_string(), cached);
        while inner.cached_bytes > self.budget_bytes {
            let victim = inner.cache.iter().rev().map(|(k, _)| k).find(|k| !inner.pinned.contains(*k)).cloned();
            match victim {
                Some(v) => {
                    tracing::debug!("adapter cache: evicting {v:?}");
                    Self::uncache(inner, &v);
                }
                None => break,
            }
        }
        metrics::gauge!("sdserve_adapter_cache_bytes").set(inner.cached_bytes as f64);
    }

    /// Registers what was put into the store by hand since the last scan, and forgets
    /// hand-put adapters that were removed. `only`: look at this one name.
    async fn scan(&self, only: Option<&str>) -> Result<AdapterReload, AdapterError> {
        let _w = self.write_lock.lock().await;
        self.sync().await.map_err(io)?;
        let listed = match only {
            None => self.blobs.list_dropped().await.map_err(io)?,
            Some(name) => self.blobs.stat_dropped(name).await.map_err(io)?.into_iter().collect(),
        };
        let mut reload = AdapterReload { count: 0, added: vec![], removed: vec![], changed: vec![] };
        let listed_names: BTreeSet<&str> = listed.iter().map(|l| l.name.as_str()).collect();
        let hand_put: Vec<String> = {
            let inner = self.lock();
            inner
                .entries
                .values()
                .filter(|e| e.record.blob_key == BlobStore::dropped_key(&e.record.name))
                .filter(|e| only.is_none_or(|n| n == e.record.name))
                .map(|e| e.record.name.clone())
                .collect()
        };
        for name in hand_put.iter().filter(|n| !listed_names.contains(n.as_str())) {
            if self.registry.remove(name).await.map_err(io)?.is_some() {
                reload.removed.push(name.clone());
            }
            self.lock().seen.remove(name);
        }
        for l in &listed {
            let known = {
                let inner = self.lock();
                let entry = inner.entries.get(&l.name).map(|e| e.record.clone());
                match entry {
                    // A version sdserve wrote elsewhere (a bucket's blobs/) wins over a hand-put object.
                    Some(r) if r.blob_key != BlobStore::dropped_key(&l.name) => continue,
                    Some(_) if inner.seen.get(&l.name) == Some(&l.version) => continue,
                    other => other,
                }
            };
            let key = BlobStore::dropped_key(&l.name);
            let bytes = match self.blobs.read(&key).await {
                Ok(b) => b,
                Err(FetchError::NotFound) => continue,
                Err(e) => return Err(io(e)),
            };
            let sha = blocking(move || sha256_hex(&bytes)).await?;
            if known.as_ref().is_some_and(|r| r.sha256 == sha) {
                self.lock().seen.insert(l.name.clone(), l.version.clone());
                continue;
            }
            let meta = self.blobs.read_sidecar(&l.name).await.unwrap_or_default();
            let record = AdapterRecord { name: l.name.clone(), sha256: sha, blob_key: key, size_bytes: l.size, meta, created_at: 0, updated_at: 0, revision: 0 };
            match self.registry.publish(&record, true, None).await.map_err(io)? {
                Publish::Done { stored, .. } => {
                    let mut inner = self.lock();
                    self.apply(&mut inner, &l.name, Some(*stored));
                    inner.seen.insert(l.name.clone(), l.version.clone());
                }
                Publish::Exists | Publish::JobLost => unreachable!("overwrite without a job"),
            }
            if known.is_some() {
                reload.changed.push(l.name.clone());
            } else {
                tracing::info!("adapter {:?} found in {}", l.name, self.blobs.describe());
                reload.added.push(l.name.clone());
            }
        }
        self.sync().await.map_err(io)?;
        reload.count = self.lock().entries.len();
        Ok(reload)
    }

    /// Rescans the whole store (see [`Self::scan`]).
    pub async fn rescan(&self) -> Result<AdapterReload, AdapterError> {
        self.scan(None).await
    }

    /// The parsed adapter `name`: from the cache, or fetched (once per replica and version)
    /// and parsed.
    pub async fn resolve(&self, name: &str) -> Result<ResolvedAdapter, AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::NotFound(name.to_string()));
        }
        let model = self.model()?;
        self.resolve_with(&model, name).await
    }

    async fn resolve_with(&self, model: &Arc<StableDiffusion>, name: &str) -> Result<ResolvedAdapter, AdapterError> {
        if self.blobs.is_local() {
            // A file dropped in, changed or removed by hand is seen by the next request.
            self.scan(Some(name)).await?;
        } else if !self.lock().entries.contains_key(name) {
            self.sync().await.map_err(io)?;
        }
        for attempt in 0..2 {
            let record = {
                let mut inner = self.lock();
                let record = inner.entries.get(name).map(|e| e.record.clone()).ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
                if let Some(c) = inner.cache.get(name).filter(|c| c.sha256 == record.sha256) {
                    metrics::counter!("sdserve_adapter_cache_hits_total").increment(1);
                    return Ok(ResolvedAdapter { name: name.to_string(), adapter: c.adapter.clone(), sha256: c.sha256.clone() });
                }
                record
            };
            metrics::counter!("sdserve_adapter_cache_misses_total").increment(1);
            match self.load(model, &record).await {
                Ok(resolved) => return Ok(resolved),
                // Replaced or removed while we fetched it: take the registry's word again.
                Err(AdapterError::Io(msg)) if attempt == 0 => {
                    tracing::debug!("adapter {name:?}: {msg}; re-reading the registry");
                    self.sync().await.map_err(io)?;
                    if self.blobs.is_local() {
                        self.scan(Some(name)).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(AdapterError::NotFound(name.to_string()))
    }

    /// Fetches, verifies and parses one version; notes a parse error on its entry.
    async fn fetch_parse(&self, model: &Arc<StableDiffusion>, record: &AdapterRecord) -> Result<LoraAdapter, AdapterError> {
        let path = match self.blobs.fetch(&record.blob_key, &record.sha256).await {
            Ok(p) => p,
            Err(FetchError::NotFound) => return Err(io(format!("the blob {} is missing", record.blob_key))),
            Err(e) => return Err(io(e)),
        };
        let (m, n, sha) = (model.clone(), record.name.clone(), record.sha256.clone());
        let local = self.blobs.is_local();
        let parsed = blocking(move || {
            if local {
                // A folder file may be rewritten in place by hand: read it, never map it.
                let bytes = std::fs::read(&path).map_err(io)?;
                if sha256_hex(&bytes) != sha {
                    return Err(io("the file changed since it was registered"));
                }
                parse_bytes(&m, &n, &bytes)
            } else {
                parse_file(&m, &n, &path)
            }
        })
        .await?;
        let mut inner = self.lock();
        if let Some(entry) = inner.entries.get_mut(&record.name).filter(|e| e.record.sha256 == record.sha256) {
            match &parsed {
                Ok(a) => {
                    entry.summary = Some(AdapterSummary::of(a));
                    entry.error = None;
                }
                Err(e @ AdapterError::Invalid { .. }) => entry.error = Some(e.to_string()),
                Err(_) => {}
            }
        }
        parsed
    }

    /// [`Self::fetch_parse`], then caches the adapter while its version is still the one served.
    async fn load(&self, model: &Arc<StableDiffusion>, record: &AdapterRecord) -> Result<ResolvedAdapter, AdapterError> {
        let start = Instant::now();
        let adapter = Arc::new(self.fetch_parse(model, record).await?);
        let name = record.name.clone();
        let bytes = (adapter.size_bytes() as u64).max(1);
        let mut inner = self.lock();
        if inner.entries.get(&name).is_some_and(|e| e.record.sha256 == record.sha256) {
            self.cache_insert(&mut inner, &name, Cached { adapter: adapter.clone(), sha256: record.sha256.clone(), bytes });
        }
        drop(inner);
        let secs = start.elapsed().as_secs_f64();
        metrics::histogram!("sdserve_adapter_load_seconds").record(secs);
        tracing::info!("adapter {name:?} loaded in {:.1} ms", secs * 1e3);
        Ok(ResolvedAdapter { name, adapter, sha256: record.sha256.clone() })
    }

    /// Whether an adapter of that name is registered.
    pub async fn exists(&self, name: &str) -> bool {
        if !valid_name(name) {
            return false;
        }
        if self.blobs.is_local() {
            let _ = self.scan(Some(name)).await;
        } else {
            let _ = self.sync().await;
        }
        self.lock().entries.contains_key(name)
    }

    fn info_locked(&self, inner: &Inner, name: &str) -> Option<AdapterInfo> {
        let e = inner.entries.get(name)?;
        let r = &e.record;
        let s = e.summary.as_ref();
        Some(AdapterInfo {
            name: name.to_string(),
            object: "adapter".into(),
            format: s.map(|s| s.format.clone()),
            rank: s.and_then(|s| s.rank),
            alpha: s.and_then(|s| s.alpha),
            target_modules: s.map(|s| s.target_modules.clone()).unwrap_or_default(),
            num_params: s.map(|s| s.num_params),
            size_bytes: r.size_bytes,
            sha256: Some(r.sha256.clone()),
            source: r.meta.source,
            job_id: r.meta.job_id.clone(),
            base_model: r.meta.base_model.clone(),
            created: r.meta.created.unwrap_or(r.created_at),
            loaded: inner.cache.peek(name).is_some_and(|c| c.sha256 == r.sha256),
            pinned: inner.pinned.contains(name),
            error: e.error.clone(),
        })
    }

    /// Fills in the summary of an entry that lacks one (parses without caching).
    async fn describe(&self, name: &str) {
        let Some(model) = self.model.get() else { return };
        let record = {
            let inner = self.lock();
            match inner.entries.get(name) {
                Some(e) if e.summary.is_none() && e.error.is_none() => e.record.clone(),
                _ => return,
            }
        };
        if let Err(e @ AdapterError::Io(_)) = self.fetch_parse(&model, &record).await {
            tracing::warn!("cannot describe adapter {name:?}: {e}");
        }
    }

    /// Every adapter (rescans first).
    pub async fn list(&self) -> Result<Vec<AdapterInfo>, AdapterError> {
        self.rescan().await?;
        let names: Vec<String> = self.lock().entries.keys().cloned().collect();
        for name in &names {
            self.describe(name).await;
        }
        let inner = self.lock();
        Ok(names.iter().filter_map(|n| self.info_locked(&inner, n)).collect())
    }

    /// One adapter.
    pub async fn info(&self, name: &str) -> Result<AdapterInfo, AdapterError> {
        if !self.exists(name).await {
            return Err(AdapterError::NotFound(name.to_string()));
        }
        self.describe(name).await;
        self.info_locked(&self.lock(), name).ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Validates a staged file against the model, uploads it and registers it as the new
    /// version of `name` (with `job`: as the result of that /align job, in the same commit).
    /// Returns the new info and whether the name is new.
    pub async fn install(
        &self,
        name: &str,
        staged: StagedFile,
        meta: Option<AdapterMeta>,
        overwrite: bool,
        job: Option<&JobGuard<'_>>,
    ) -> Result<(AdapterInfo, bool), AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::InvalidName(name.to_string()));
        }
        let _w = self.write_lock.lock().await;
        self.sync().await.map_err(io)?;
        if !overwrite && self.lock().entries.contains_key(name) {
            return Err(AdapterError::Exists(name.to_string()));
        }
        let model = self.model()?;
        let staged = Arc::new(staged);
        let (m, n, s) = (model.clone(), name.to_string(), staged.clone());
        let adapter = Arc::new(blocking(move || parse_file(&m, &n, &s.path)).await??);
        let pending = self.blobs.upload(name, &staged).await.map_err(io)?;
        let record = AdapterRecord {
            name: name.to_string(),
            sha256: staged.sha256.clone(),
            blob_key: pending.key.clone(),
            size_bytes: staged.size,
            meta: meta.clone().unwrap_or_default(),
            created_at: 0,
            updated_at: 0,
            revision: 0,
        };
        let (stored, old) = match self.registry.publish(&record, overwrite, job).await {
            Ok(Publish::Done { stored, old }) => (*stored, old),
            other => {
                self.blobs.abort(&pending).await;
                return Err(match other {
                    Ok(Publish::Exists) => AdapterError::Exists(name.to_string()),
                    Ok(Publish::JobLost) => AdapterError::JobLost,
                    Err(e) => io(e),
                    Ok(Publish::Done { .. }) => unreachable!(),
                });
            }
        };
        self.blobs.commit(&pending).await.map_err(io)?;
        self.blobs.write_sidecar(name, meta.as_ref()).await.map_err(io)?;
        if let Some(old) = old.as_ref().filter(|o| o.blob_key != stored.blob_key) {
            self.delete_blob_if_unused(&old.blob_key).await;
        }
        let summary = AdapterSummary::of(&adapter);
        let bytes = summary.memory_bytes.max(1);
        let mut inner = self.lock();
        if self.blobs.is_local() {
            // Our own write replaced the file: forget the version seen before it, so that the
            // next scan reads the new file (finding the version just registered).
            inner.seen.remove(name);
        }
        self.apply(&mut inner, name, Some(stored.clone()));
        if let Some(entry) = inner.entries.get_mut(name) {
            entry.summary = Some(summary);
        }
        self.cache_insert(&mut inner, name, Cached { adapter, sha256: stored.sha256.clone(), bytes });
        let info = self.info_locked(&inner, name).expect("just inserted");
        tracing::info!("adapter {name:?} {}", if old.is_some() { "replaced" } else { "added" });
        Ok((info, old.is_none()))
    }

    async fn delete_blob_if_unused(&self, key: &str) {
        match self.registry.blob_in_use(key).await {
            Ok(false) => {
                if let Err(e) = self.blobs.delete(key).await {
                    tracing::warn!("{e:#}");
                }
            }
            Ok(true) => {}
            Err(e) => tracing::warn!("cannot check whether {key} is still used: {e:#}"),
        }
    }

    /// Removes the adapter from the registry and its blob (and sidecar) from the store. Jobs
    /// holding it keep their copy.
    pub async fn delete(&self, name: &str) -> Result<(), AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::NotFound(name.to_string()));
        }
        if self.blobs.is_local() {
            self.scan(Some(name)).await?;
        }
        let _w = self.write_lock.lock().await;
        let old = self.registry.remove(name).await.map_err(io)?.ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        {
            let mut inner = self.lock();
            self.apply(&mut inner, name, None);
            inner.pinned.remove(name);
            inner.seen.remove(name);
        }
        self.delete_blob_if_unused(&old.blob_key).await;
        self.blobs.write_sidecar(name, None).await.map_err(io)?;
        tracing::info!("adapter {name:?} deleted");
        Ok(())
    }

    /// Parses and caches the pinned adapters with `model` (called once it has loaded, before
    /// the server reports ready).
    pub async fn preload_pinned(&self, model: &Arc<StableDiffusion>) {
        let pinned: Vec<String> = self.lock().pinned.iter().cloned().collect();
        for name in pinned {
            if !valid_name(&name) {
                tracing::warn!("pinned adapter {name:?}: invalid name");
                continue;
            }
            if let Err(e) = self.resolve_with(model, &name).await {
                tracing::warn!("pinned adapter {name:?} not loaded: {e}");
            }
        }
    }

    /// Bytes held by the cache.
    pub fn cached_bytes(&self) -> u64 {
        self.lock().cached_bytes
    }
}
