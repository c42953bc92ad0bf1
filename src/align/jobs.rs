//! `/align` jobs: records persisted as JSON, a queue, runner threads, cancellation and
//! per-step events.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use super::request::AlignRequest;
use super::trainer::{StepReport, StopReason};

/// Lifecycle of a job (OpenAI fine-tuning spelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlignStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl AlignStatus {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AlignStatus::Queued => "queued",
            AlignStatus::Running => "running",
            AlignStatus::Succeeded => "succeeded",
            AlignStatus::Failed => "failed",
            AlignStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, AlignStatus::Succeeded | AlignStatus::Failed | AlignStatus::Cancelled)
    }
}

/// Why a job failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AlignError {
    /// `interrupted`, `non_finite`, `invalid_request` or `training_failed`.
    pub code: String,
    pub message: String,
}

/// One entry of a job's event log.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AlignEvent {
    pub id: u64,
    pub created_at: u64,
    /// `message` for state changes, `metrics` for an optimisation step.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<StepReport>,
}

/// A job as stored and returned by the API.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AlignJob {
    /// Always `align.job`.
    pub object: String,
    pub id: String,
    pub status: AlignStatus,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// The adapter this job writes.
    pub adapter_name: String,
    /// Set on success: the adapter name, usable in generation requests at once.
    pub fine_tuned_adapter: Option<String>,
    /// The seed used (drawn when the request gave none).
    pub seed: u64,
    /// Completed optimisation steps and the requested total.
    pub step: usize,
    pub total_steps: usize,
    /// Reward curve: one entry per optimisation step.
    pub metrics: Vec<StepReport>,
    pub stop_reason: Option<String>,
    pub error: Option<AlignError>,
    /// Position in the queue (1 = next) while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    pub request: AlignRequest,
    /// State changes and steps, in order.
    #[serde(default)]
    pub events: Vec<AlignEvent>,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl AlignJob {
    fn new(id: String, request: AlignRequest, seed: u64) -> Self {
        let mut job = Self {
            object: "align.job".into(),
            id,
            status: AlignStatus::Queued,
            created_at: unix_now(),
            started_at: None,
            finished_at: None,
            adapter_name: request.adapter_name.clone(),
            fine_tuned_adapter: None,
            seed,
            step: 0,
            total_steps: request.steps,
            metrics: vec![],
            stop_reason: None,
            error: None,
            queue_position: None,
            request,
            events: vec![],
        };
        job.log("message", "job queued".into(), None);
        job
    }

    fn log(&mut self, kind: &str, message: String, data: Option<StepReport>) -> AlignEvent {
        let event = AlignEvent { id: self.events.len() as u64 + 1, created_at: unix_now(), kind: kind.into(), message, data };
        self.events.push(event.clone());
        event
    }

    fn finish(&mut self, status: AlignStatus, error: Option<AlignError>) -> AlignEvent {
        self.status = status;
        self.finished_at = Some(unix_now());
        let msg = match &error {
            Some(e) => format!("job {}: {}", status.as_str(), e.message),
            None => format!("job {}", status.as_str()),
        };
        self.error = error;
        self.log("message", msg, None)
    }
}

/// A job in memory: its record and its cancellation flag.
struct Handle {
    job: Mutex<AlignJob>,
    cancel: AtomicBool,
}

/// Why a cancel request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelError {
    NotFound,
    Terminal(AlignStatus),
}

struct Inner {
    jobs: BTreeMap<String, Arc<Handle>>,
    queue: VecDeque<String>,
    closed: bool,
}

/// What a runner needs from its host (the server or the CLI).
pub struct RunContext<'a> {
    pub job_id: &'a str,
    pub request: &'a AlignRequest,
    pub seed: u64,
    /// Reports a step; returns `Err` once the job is cancelled.
    pub report: &'a mut dyn FnMut(&StepReport) -> Result<()>,
}

/// Runs one job to completion: trains and writes the adapter.
pub type Runner = dyn Fn(RunContext) -> Result<StopReason> + Send + Sync;

/// The error a runner's `report` returns after cancellation.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// All align jobs of a server, persisted under `dir`.
pub struct AlignJobs {
    dir: PathBuf,
    inner: Mutex<Inner>,
    wake: Condvar,
    events: broadcast::Sender<(String, AlignEvent)>,
}

impl AlignJobs {
    /// Loads the records in `dir`; jobs that were running when the server stopped are marked
    /// failed (`interrupted`), queued ones are queued again.
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut jobs = BTreeMap::new();
        let mut queued = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed: Result<AlignJob> =
                std::fs::read(&path).map_err(Into::into).and_then(|b| serde_json::from_slice(&b).map_err(Into::into));
            let mut job = match parsed {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!("skipping unreadable align job record {}: {e}", path.display());
                    continue;
                }
            };
            match job.status {
                AlignStatus::Running => {
                    job.finish(
                        AlignStatus::Failed,
                        Some(AlignError { code: "interrupted".into(), message: "the server stopped while the job ran".into() }),
                    );
                    write_record(dir, &job)?;
                }
                AlignStatus::Queued => queued.push((job.created_at, job.id.clone())),
                _ => {}
            }
            jobs.insert(job.id.clone(), Arc::new(Handle { job: Mutex::new(job), cancel: AtomicBool::new(false) }));
        }
        queued.sort();
        let queue = queued.into_iter().map(|(_, id)| id).collect();
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner { jobs, queue, closed: false }),
            wake: Condvar::new(),
            events: broadcast::channel(1024).0,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a validated request.
    pub fn submit(&self, request: AlignRequest, seed: u64) -> Result<AlignJob> {
        let id = format!("alignjob-{}", uuid::Uuid::new_v4().simple());
        let job = AlignJob::new(id.clone(), request, seed);
        write_record(&self.dir, &job)?;
        let mut inner = self.lock();
        inner.jobs.insert(id.clone(), Arc::new(Handle { job: Mutex::new(job.clone()), cancel: AtomicBool::new(false) }));
        inner.queue.push_back(id);
        self.wake.notify_all();
        metrics::counter!("sdserve_align_jobs_submitted_total").increment(1);
        Ok(job)
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<AlignJob> {
        let mut all: Vec<AlignJob> = self.lock().jobs.values().map(|h| lock(&h.job).clone()).collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        all
    }

    /// A job, with its queue position when queued.
    pub fn get(&self, id: &str) -> Option<AlignJob> {
        let inner = self.lock();
        let mut job = lock(&inner.jobs.get(id)?.job).clone();
        job.queue_position = inner.queue.iter().position(|q| q == id).map(|p| p + 1);
        Some(job)
    }

    /// Number of jobs with the given status.
    pub fn count(&self, status: AlignStatus) -> usize {
        self.lock().jobs.values().filter(|h| lock(&h.job).status == status).count()
    }

    /// Cancels a queued job at once, or a running one at its next step.
    pub fn cancel(&self, id: &str) -> Result<AlignJob, CancelError> {
        let mut inner = self.lock();
        let handle = inner.jobs.get(id).cloned().ok_or(CancelError::NotFound)?;
        let mut job = lock(&handle.job);
        match job.status {
            AlignStatus::Queued => {
                inner.queue.retain(|q| q != id);
                let ev = job.finish(AlignStatus::Cancelled, None);
                self.publish(&job, ev);
            }
            AlignStatus::Running => {
                handle.cancel.store(true, Ordering::SeqCst);
                let ev = job.log("message", "cancellation requested".into(), None);
                self.publish(&job, ev);
            }
            s => return Err(CancelError::Terminal(s)),
        }
        Ok(job.clone())
    }

    /// Live events of every job (for server-sent events).
    pub fn subscribe(&self) -> broadcast::Receiver<(String, AlignEvent)> {
        self.events.subscribe()
    }

    fn publish(&self, job: &AlignJob, event: AlignEvent) {
        if let Err(e) = write_record(&self.dir, job) {
            tracing::warn!("cannot persist align job {}: {e:#}", job.id);
        }
        let _ = self.events.send((job.id.clone(), event));
    }

    /// Stops the runner threads once they finish their current job.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Starts `threads` runner threads that execute queued jobs with `runner`.
    pub fn start(self: &Arc<Self>, threads: usize, runner: Arc<Runner>) {
        for i in 0..threads.max(1) {
            let jobs = self.clone();
            let runner = runner.clone();
            std::thread::Builder::new()
                .name(format!("align-{i}"))
                .spawn(move || jobs.run_loop(&*runner))
                .expect("spawn align runner");
        }
    }

    fn next(&self) -> Option<Arc<Handle>> {
        let mut inner = self.lock();
        loop {
            if inner.closed {
                return None;
            }
            if let Some(id) = inner.queue.pop_front() {
                if let Some(h) = inner.jobs.get(&id).cloned() {
                    return Some(h);
                }
                continue;
            }
            inner = self.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn run_loop(&self, runner: &Runner) {
        while let Some(handle) = self.next() {
            let (id, request, seed) = {
                let mut job = lock(&handle.job);
                job.status = AlignStatus::Running;
                job.started_at = Some(unix_now());
                let ev = job.log("message", "job started".into(), None);
                self.publish(&job, ev);
                metrics::gauge!("sdserve_align_jobs_running").increment(1.0);
                (job.id.clone(), job.request.clone(), job.seed)
            };
            let mut report = |r: &StepReport| -> Result<()> {
                let mut job = lock(&handle.job);
                job.step = r.step;
                metrics::histogram!("sdserve_align_step_seconds").record(r.seconds);
                job.metrics.push(r.clone());
                let msg = format!("step {}/{}: reward {:.5} ± {:.5}", r.step, job.total_steps, r.reward_mean, r.reward_std);
                let ev = job.log("metrics", msg, Some(r.clone()));
                self.publish(&job, ev);
                if handle.cancel.load(Ordering::SeqCst) {
                    return Err(Cancelled.into());
                }
                Ok(())
            };
            let outcome = runner(RunContext { job_id: &id, request: &request, seed, report: &mut report });
            let mut job = lock(&handle.job);
            let ev = match outcome {
                Ok(reason) => {
                    job.stop_reason = Some(match reason {
                        StopReason::Completed => "completed".into(),
                        StopReason::TimeBudget => "time_budget".into(),
                    });
                    job.fine_tuned_adapter = Some(job.adapter_name.clone());
                    job.finish(AlignStatus::Succeeded, None)
                }
                Err(e) if e.is::<Cancelled>() => job.finish(AlignStatus::Cancelled, None),
                Err(e) => {
                    let message = format!("{e:#}");
                    let code = if message.contains("non-finite") { "non_finite" } else { "training_failed" };
                    tracing::warn!("align job {id} failed: {message}");
                    job.finish(AlignStatus::Failed, Some(AlignError { code: code.into(), message }))
                }
            };
            metrics::gauge!("sdserve_align_jobs_running").decrement(1.0);
            metrics::counter!("sdserve_align_jobs_total", "status" => job.status.as_str()).increment(1);
            self.publish(&job, ev);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_record(dir: &Path, job: &AlignJob) -> Result<()> {
    let path = dir.join(format!("{}.json", job.id));
    let tmp = dir.join(format!(".{}.json.tmp", job.id));
    std::fs::write(&tmp, serde_json::to_vec_pretty(job)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}
