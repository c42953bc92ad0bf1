//! The adapter registry: the adapters folder, parsed lazily into an LRU cache bounded by
//! bytes (with pinning), plus validated uploads, deletes and rescans.
//!
//! Files are `<dir>/<name>.safetensors`, with an optional JSON sidecar `<dir>/<name>.json`
//! ([`AdapterMeta`]: source, align job id, creation time, base model). Files dropped into the
//! folder are found on the next list, reload or request that names them; a file changed on disk
//! is re-parsed on its next use (its size or modification time changed).
//!
//! Requests hold an `Arc<LoraAdapter>` from submission on, so replacing, deleting or evicting
//! an adapter never affects a job that already has it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::api::{AdapterInfo, AdapterReload, AdapterSource};
use super::error::ApiError;
use super::model::ModelSlot;
use crate::engine::pipeline::StableDiffusion;
use crate::lora::LoraAdapter;

/// The JSON sidecar `<name>.json` next to an adapter file. Unknown keys are kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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

/// Registry failures (mapped to HTTP statuses by `From<AdapterError> for ApiError`).
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("invalid adapter name {0:?}: names are 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")]
    InvalidName(String),
    #[error("adapter {0:?} not found")]
    NotFound(String),
    #[error("adapter {0:?} already exists; pass ?overwrite=true to replace it")]
    Exists(String),
    #[error("adapter {name:?} is not a valid LoRA adapter for this model: {message}")]
    Invalid { name: String, message: String },
    #[error("the model is still loading")]
    ModelNotReady,
    #[error("adapter storage error: {0}")]
    Io(String),
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        let msg = e.to_string();
        match e {
            AdapterError::InvalidName(_) => {
                ApiError::invalid("name", msg).code("invalid_adapter_name")
            }
            AdapterError::NotFound(_) => ApiError::not_found(msg).code("adapter_not_found"),
            AdapterError::Exists(_) => ApiError::conflict(msg).code("adapter_exists"),
            AdapterError::Invalid { .. } => ApiError::bad_request(msg).code("invalid_adapter"),
            AdapterError::ModelNotReady => ApiError::unavailable(msg, 5),
            AdapterError::Io(_) => ApiError::internal(msg),
        }
    }
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

/// Size and modification time: a file whose fingerprint changed is re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

struct Entry {
    fingerprint: Fingerprint,
    meta: Option<AdapterMeta>,
    sha256: Option<String>,
    summary: Option<AdapterSummary>,
    error: Option<String>,
}

struct Cached {
    adapter: Arc<LoraAdapter>,
    fingerprint: Fingerprint,
    sha256: String,
    bytes: u64,
}

struct Inner {
    entries: BTreeMap<String, Entry>,
    cache: LruCache<String, Cached>,
    cached_bytes: u64,
    pinned: BTreeSet<String>,
}

/// The adapters folder and its parsed-adapter cache. Methods block (file I/O, parsing): call
/// them from a blocking thread.
pub struct AdapterRegistry {
    dir: PathBuf,
    model: ModelSlot,
    budget_bytes: u64,
    inner: Mutex<Inner>,
    /// Serialises writers (upload, register, delete) so that exists-checks hold.
    write_lock: Mutex<()>,
}

/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> AdapterError {
    AdapterError::Io(format!("{what} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so
/// readers never see a partial file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("adapter");
    let tmp = dir.join(format!(
        ".{file_name}.{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("cannot write", path, e));
    }
    Ok(())
}

impl AdapterRegistry {
    /// A registry over `dir` (created if missing) with a cache of `budget_bytes`; `pinned`
    /// adapters are never evicted. Nothing is parsed until the model is ready.
    pub fn new(
        dir: impl Into<PathBuf>,
        model: ModelSlot,
        budget_bytes: u64,
        pinned: &[String],
    ) -> Self {
        let dir = dir.into();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("cannot create adapters folder {}: {e}", dir.display());
        }
        let reg = Self {
            dir,
            model,
            budget_bytes,
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                cache: LruCache::unbounded(),
                cached_bytes: 0,
                pinned: pinned.iter().cloned().collect(),
            }),
            write_lock: Mutex::new(()),
        };
        reg.rescan();
        reg
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the adapter `name` lives (whether or not it exists).
    pub fn path_for(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.safetensors"))
    }

    fn sidecar_for(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_meta(&self, name: &str) -> Option<AdapterMeta> {
        let path = self.sidecar_for(name);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("ignoring malformed adapter sidecar {}: {e}", path.display());
                None
            }
        }
    }

    /// Names and fingerprints of the adapter files on disk.
    fn list_files(&self) -> BTreeMap<String, Fingerprint> {
        let mut found = BTreeMap::new();
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return found;
        };
        for entry in read.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if !valid_name(name) {
                continue;
            }
            if let Ok(meta) = std::fs::metadata(&path) {
                if meta.is_file() {
                    found.insert(name.to_string(), Fingerprint::of(&meta));
                }
            }
        }
        found
    }

    /// Re-reads the folder: new files are registered, missing ones forgotten, changed ones
    /// dropped from the cache (re-parsed on next use).
    pub fn rescan(&self) -> AdapterReload {
        let files = self.list_files();
        let mut added = Vec::new();
        let mut changed = Vec::new();
        let mut fresh_meta = BTreeMap::new();
        {
            let inner = self.lock();
            for (name, fp) in &files {
                match inner.entries.get(name) {
                    None => added.push(name.clone()),
                    Some(e) if e.fingerprint != *fp => changed.push(name.clone()),
                    Some(_) => {}
                }
            }
        }
        for name in added.iter().chain(&changed) {
            fresh_meta.insert(name.clone(), self.read_meta(name));
        }
        let mut inner = self.lock();
        let removed: Vec<String> = inner
            .entries
            .keys()
            .filter(|n| !files.contains_key(*n))
            .cloned()
            .collect();
        for name in &removed {
            inner.entries.remove(name);
            Self::uncache(&mut inner, name);
        }
        for (name, fp) in files {
            let stale = inner.entries.get(&name).is_none_or(|e| e.fingerprint != fp);
            if stale {
                let meta = fresh_meta
                    .remove(&name)
                    .unwrap_or_else(|| self.read_meta(&name));
                inner.entries.insert(
                    name.clone(),
                    Entry {
                        fingerprint: fp,
                        meta,
                        sha256: None,
                        summary: None,
                        error: None,
                    },
                );
                if inner.cache.peek(&name).is_some_and(|c| c.fingerprint != fp) {
                    Self::uncache(&mut inner, &name);
                }
            }
        }
        let count = inner.entries.len();
        drop(inner);
        for name in &added {
            tracing::info!("adapter {name:?} found in {}", self.dir.display());
        }
        AdapterReload {
            count,
            added,
            removed,
            changed,
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
            let victim = inner
                .cache
                .iter()
                .rev()
                .map(|(k, _)| k)
                .find(|k| !inner.pinned.contains(*k))
                .cloned();
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

    fn model(&self) -> Result<Arc<StableDiffusion>, AdapterError> {
        self.model.get().ok_or(AdapterError::ModelNotReady)
    }

    fn parse(
        &self,
        model: &StableDiffusion,
        name: &str,
        bytes: &[u8],
    ) -> Result<LoraAdapter, AdapterError> {
        LoraAdapter::from_bytes(bytes, &model.lora_targets, &model.device).map_err(|e| {
            AdapterError::Invalid {
                name: name.to_string(),
                message: format!("{e:#}"),
            }
        })
    }

    /// The parsed adapter `name`, from the cache or the folder (picking up files dropped in
    /// since the last scan).
    pub fn resolve(&self, name: &str) -> Result<ResolvedAdapter, AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::NotFound(name.to_string()));
        }
        let model = self.model()?;
        self.resolve_with(&model, name)
    }

    fn resolve_with(
        &self,
        model: &StableDiffusion,
        name: &str,
    ) -> Result<ResolvedAdapter, AdapterError> {
        let path = self.path_for(name);
        let fingerprint = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Fingerprint::of(&m),
            _ => {
                let mut inner = self.lock();
                inner.entries.remove(name);
                Self::uncache(&mut inner, name);
                return Err(AdapterError::NotFound(name.to_string()));
            }
        };
        {
            let mut inner = self.lock();
            if let Some(c) = inner.cache.get(name) {
                if c.fingerprint == fingerprint {
                    let resolved = ResolvedAdapter {
                        name: name.to_string(),
                        adapter: c.adapter.clone(),
                        sha256: c.sha256.clone(),
                    };
                    metrics::counter!("sdserve_adapter_cache_hits_total").increment(1);
                    return Ok(resolved);
                }
            }
        }
        metrics::counter!("sdserve_adapter_cache_misses_total").increment(1);
        let start = Instant::now();
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AdapterError::NotFound(name.to_string()),
            _ => io_err("cannot read", &path, e),
        })?;
        let sha256 = sha256_hex(&bytes);
        let parsed = self.parse(model, name, &bytes);
        let meta = self.read_meta(name);
        let mut inner = self.lock();
        let entry = Entry {
            fingerprint,
            meta,
            sha256: Some(sha256.clone()),
            summary: None,
            error: None,
        };
        inner.entries.insert(name.to_string(), entry);
        let entry = inner.entries.get_mut(name).expect("just inserted");
        let adapter = match parsed {
            Ok(a) => Arc::new(a),
            Err(e) => {
                entry.error = Some(e.to_string());
                return Err(e);
            }
        };
        let summary = AdapterSummary::of(&adapter);
        let bytes_in_memory = summary.memory_bytes.max(1);
        entry.summary = Some(summary);
        self.cache_insert(
            &mut inner,
            name,
            Cached {
                adapter: adapter.clone(),
                fingerprint,
                sha256: sha256.clone(),
                bytes: bytes_in_memory,
            },
        );
        drop(inner);
        let secs = start.elapsed().as_secs_f64();
        metrics::histogram!("sdserve_adapter_load_seconds").record(secs);
        tracing::info!("adapter {name:?} loaded in {:.1} ms", secs * 1e3);
        Ok(ResolvedAdapter {
            name: name.to_string(),
            adapter,
            sha256,
        })
    }

    /// Whether an adapter of that name exists in the folder.
    pub fn exists(&self, name: &str) -> bool {
        valid_name(name) && self.path_for(name).is_file()
    }

    fn info_locked(&self, inner: &Inner, name: &str) -> Option<AdapterInfo> {
        let e = inner.entries.get(name)?;
        let meta = e.meta.clone().unwrap_or_default();
        let mtime = e
            .fingerprint
            .modified
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let s = e.summary.as_ref();
        Some(AdapterInfo {
            name: name.to_string(),
            object: "adapter".into(),
            format: s.map(|s| s.format.clone()),
            rank: s.and_then(|s| s.rank),
            alpha: s.and_then(|s| s.alpha),
            target_modules: s.map(|s| s.target_modules.clone()).unwrap_or_default(),
            num_params: s.map(|s| s.num_params),
            size_bytes: e.fingerprint.len,
            sha256: e.sha256.clone(),
            source: meta.source,
            job_id: meta.job_id,
            base_model: meta.base_model,
            created: meta.created.or(mtime).unwrap_or(0),
            loaded: inner
                .cache
                .peek(name)
                .is_some_and(|c| c.fingerprint == e.fingerprint),
            pinned: inner.pinned.contains(name),
            error: e.error.clone(),
        })
    }

    /// Fills in hash and summary of the entries that lack them (reads and parses the file
    /// without caching it).
    fn describe(&self, name: &str) {
        let (need_hash, need_summary, fingerprint) = {
            let inner = self.lock();
            let Some(e) = inner.entries.get(name) else {
                return;
            };
            let cached = inner
                .cache
                .peek(name)
                .filter(|c| c.fingerprint == e.fingerprint);
            (
                e.sha256.is_none(),
                e.summary.is_none()
                    && e.error.is_none()
                    && cached.is_none()
                    && self.model.get().is_some(),
                e.fingerprint,
            )
        };
        if !need_hash && !need_summary {
            return;
        }
        let Ok(bytes) = std::fs::read(self.path_for(name)) else {
            return;
        };
        let sha = sha256_hex(&bytes);
        let parsed = if need_summary {
            self.model
                .get()
                .map(|m| self.parse(&m, name, &bytes).map(|a| AdapterSummary::of(&a)))
        } else {
            None
        };
        let mut inner = self.lock();
        if let Some(e) = inner
            .entries
            .get_mut(name)
            .filter(|e| e.fingerprint == fingerprint)
        {
            e.sha256 = Some(sha);
            match parsed {
                Some(Ok(s)) => e.summary = Some(s),
                Some(Err(err)) => e.error = Some(err.to_string()),
                None => {}
            }
        }
    }

    /// Every adapter in the folder (rescans first).
    pub fn list(&self) -> Vec<AdapterInfo> {
        self.rescan();
        let names: Vec<String> = self.lock().entries.keys().cloned().collect();
        for name in &names {
            self.describe(name);
        }
        let inner = self.lock();
        names
            .iter()
            .filter_map(|n| self.info_locked(&inner, n))
            .collect()
    }

    /// One adapter (rescans it first).
    pub fn info(&self, name: &str) -> Result<AdapterInfo, AdapterError> {
        if !self.exists(name) {
            return Err(AdapterError::NotFound(name.to_string()));
        }
        self.rescan();
        self.describe(name);
        self.info_locked(&self.lock(), name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Validates `bytes` against the model, then writes `<name>.safetensors` atomically (and the
    /// sidecar when `meta` is given, removing a stale one otherwise) and caches the parsed
    /// adapter. Returns the new info and whether the name is new.
    pub fn install(
        &self,
        name: &str,
        bytes: &[u8],
        meta: Option<AdapterMeta>,
        overwrite: bool,
    ) -> Result<(AdapterInfo, bool), AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::InvalidName(name.to_string()));
        }
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path_for(name);
        let existed = path.exists();
        if existed && !overwrite {
            return Err(AdapterError::Exists(name.to_string()));
        }
        let model = self.model()?;
        let adapter = Arc::new(self.parse(&model, name, bytes)?);
        let sha256 = sha256_hex(bytes);
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("cannot create", &self.dir, e))?;
        write_atomic(&path, bytes)?;
        let sidecar = self.sidecar_for(name);
        match &meta {
            Some(m) => write_atomic(
                &sidecar,
                &serde_json::to_vec_pretty(m).expect("serialisable"),
            )?,
            None if sidecar.exists() => {
                std::fs::remove_file(&sidecar).map_err(|e| io_err("cannot remove", &sidecar, e))?
            }
            None => {}
        }
        let fingerprint = Fingerprint::of(
            &std::fs::metadata(&path).map_err(|e| io_err("cannot stat", &path, e))?,
        );
        let summary = AdapterSummary::of(&adapter);
        let memory = summary.memory_bytes.max(1);
        let mut inner = self.lock();
        inner.entries.insert(
            name.to_string(),
            Entry {
                fingerprint,
                meta,
                sha256: Some(sha256.clone()),
                summary: Some(summary),
                error: None,
            },
        );
        self.cache_insert(
            &mut inner,
            name,
            Cached {
                adapter,
                fingerprint,
                sha256,
                bytes: memory,
            },
        );
        let info = self.info_locked(&inner, name).expect("just inserted");
        tracing::info!(
            "adapter {name:?} {}",
            if existed { "replaced" } else { "added" }
        );
        Ok((info, !existed))
    }

    /// Registers an adapter file already written to [`Self::path_for`]`(name)` (e.g. by an
    /// /align job): writes the sidecar, validates the file against the model and caches it.
    pub fn register(&self, name: &str, meta: AdapterMeta) -> Result<AdapterInfo, AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::InvalidName(name.to_string()));
        }
        {
            let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            if !self.path_for(name).is_file() {
                return Err(AdapterError::NotFound(name.to_string()));
            }
            write_atomic(
                &self.sidecar_for(name),
                &serde_json::to_vec_pretty(&meta).expect("serialisable"),
            )?;
            let mut inner = self.lock();
            inner.entries.remove(name);
            Self::uncache(&mut inner, name);
        }
        self.rescan();
        self.resolve(name)?;
        self.info(name)
    }

    /// Removes the adapter's file and sidecar and drops it from the cache. Jobs holding it
    /// keep their copy.
    pub fn delete(&self, name: &str) -> Result<(), AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::NotFound(name.to_string()));
        }
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path_for(name);
        let result = std::fs::remove_file(&path);
        let mut inner = self.lock();
        inner.entries.remove(name);
        Self::uncache(&mut inner, name);
        inner.pinned.remove(name);
        drop(inner);
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AdapterError::NotFound(name.to_string()))
            }
            Err(e) => return Err(io_err("cannot remove", &path, e)),
        }
        let sidecar = self.sidecar_for(name);
        if sidecar.exists() {
            let _ = std::fs::remove_file(&sidecar);
        }
        tracing::info!("adapter {name:?} deleted");
        Ok(())
    }

    /// Parses and caches the pinned adapters with `model` (called once it has loaded, before
    /// the server reports ready).
    pub fn preload_pinned(&self, model: &StableDiffusion) {
        let pinned: Vec<String> = self.lock().pinned.iter().cloned().collect();
        for name in pinned {
            if !valid_name(&name) {
                tracing::warn!("pinned adapter {name:?}: invalid name");
                continue;
            }
            if let Err(e) = self.resolve_with(model, &name) {
                tracing::warn!("pinned adapter {name:?} not loaded: {e}");
            }
        }
    }

    /// Bytes held by the cache.
    pub fn cached_bytes(&self) -> u64 {
        self.lock().cached_bytes
    }
}
