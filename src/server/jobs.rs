//! Image jobs and the bounded queue the workers pull from.
//!
//! A job is created with fully resolved parameters (seeds drawn, adapters parsed and held),
//! waits in a FIFO of bounded capacity, runs on a worker thread and ends `succeeded`,
//! `failed` or `cancelled`. Every state change bumps a `watch` channel, which the sync
//! endpoint and the SSE stream wait on. Async (retained) jobs are also written to the shared
//! image job table (`crate::stores::image_jobs`), so that other replicas can read and cancel
//! them and they outlive the process; finished ones are kept up to a bound.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::watch;

use super::adapters::ResolvedAdapter;
use super::api::{
    GenerationParameters, ImageJob, ImagesResponse, JobError, JobProgress, JobStatus,
};
use crate::engine::edit::first_step;
use crate::engine::image::OutputFormat;
use crate::engine::scheduler::SchedulerKind;
use crate::stores::image_jobs::{ImageJobRecord, ImageJobStore};
pub use crate::stores::unix_now;

/// Writes a retained job's states to the shared table, in the background (progress at most
/// a few times a second; the version guard keeps late writes from undoing newer ones).
struct Persist {
    store: ImageJobStore,
    owner: Arc<str>,
    history: usize,
    rt: tokio::runtime::Handle,
    last_progress: Mutex<Option<Instant>>,
}

/// Shortest interval between two progress writes of a job.
const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_millis(250);

/// Everything a worker needs to run a job.
#[derive(Clone)]
pub struct JobSpec {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    pub scheduler: SchedulerKind,
    pub eta: f64,
    /// One per image.
    pub seeds: Vec<u64>,
    /// Adapters with their weights, captured at submission.
    pub loras: Vec<(ResolvedAdapter, f64)>,
    pub output_format: OutputFormat,
    /// JPEG quality.
    pub quality: u8,
    /// The effective parameters, echoed in responses.
    pub parameters: GenerationParameters,
    /// The input of an edit (`None` for text-to-image).
    pub edit: Option<EditInput>,
}

/// What an edit starts from, decoded and resized to the output size.
#[derive(Clone)]
pub struct EditInput {
    /// `[1, 3, H, W]` in `[0, 1]`, on the CPU.
    pub image: Tensor,
    /// `[1, 1, H, W]`, 1 = repaint; `None` for image-to-image.
    pub mask: Option<Tensor>,
    pub strength: f64,
}

impl JobSpec {
    /// Denoising steps one image runs: all of them, or an edit's last `⌊steps × strength⌋`.
    pub fn steps_run(&self) -> usize {
        match &self.edit {
            Some(e) => self.steps - first_step(self.steps, e.strength).unwrap_or(0),
            None => self.steps,
        }
    }
}

#[derive(Debug, Clone)]
struct JobState {
    status: JobStatus,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    step: u32,
    total_steps: u32,
    images_done: u32,
    result: Option<Arc<ImagesResponse>>,
    error: Option<JobError>,
    enqueued: Instant,
}

/// One image job.
pub struct Job {
    pub id: String,
    pub created: u64,
    pub spec: JobSpec,
    /// Kept for polling once finished (async jobs); synchronous requests are forgotten as
    /// soon as they end, since their caller already has the result.
    pub retained: bool,
    cancel: AtomicBool,
    state: Mutex<JobState>,
    /// Bumped on every change (state or queue position); also the job's SSE event id.
    version: watch::Sender<u64>,
    persist: Option<Arc<Persist>>,
}

/// The terminal outcome of a job as seen by a waiter.
pub enum JobOutcome {
    Succeeded(Arc<ImagesResponse>),
    Failed(JobError),
    Cancelled(JobError),
}

impl Job {
    pub fn new(spec: JobSpec, retained: bool) -> Arc<Self> {
        let total = (spec.steps_run() * spec.seeds.len()) as u32;
        Arc::new(Self {
            id: format!("imgjob_{}", uuid::Uuid::new_v4().simple()),
            created: unix_now(),
            spec,
            retained,
            cancel: AtomicBool::new(false),
            state: Mutex::new(JobState {
                status: JobStatus::Queued,
                started_at: None,
                finished_at: None,
                step: 0,
                total_steps: total,
                images_done: 0,
                result: None,
                error: None,
                enqueued: Instant::now(),
            }),
            version: watch::channel(0).0,
            persist: None,
        })
    }

    /// The job as the shared table stores it.
    pub fn record(&self, owner: &str) -> ImageJobRecord {
        let s = self.lock().clone();
        ImageJobRecord {
            id: self.id.clone(),
            status: s.status.as_str().into(),
            created_at: self.created,
            started_at: s.started_at,
            finished_at: s.finished_at,
            owner: owner.to_string(),
            cancel_requested: self.cancel_requested(),
            version: *self.version.borrow(),
            step: s.step,
            total_steps: s.total_steps,
            images_done: s.images_done,
            parameters: serde_json::to_string(&self.spec.parameters).expect("serialisable"),
            result: s.result.as_deref().map(|r| serde_json::to_string(r).expect("serialisable")),
            error: s.error.map(|e| (e.code, e.message)),
        }
    }

    /// Writes the current state to the shared table (`force`: also when a progress write was
    /// made a moment ago). Terminal states also prune old finished jobs.
    fn persist(&self, force: bool) {
        let Some(p) = &self.persist else { return };
        if !force {
            let mut last = p.last_progress.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < PROGRESS_WRITE_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let record = self.record(&p.owner);
        let terminal = self.status().is_terminal();
        let p = p.clone();
        p.rt.clone().spawn(async move {
            if let Err(e) = p.store.update(&record).await {
                tracing::warn!(job = %record.id, "cannot save the job's state: {e:#}");
            }
            if terminal {
                if let Err(e) = p.store.prune(p.history).await {
                    tracing::warn!("cannot prune finished image jobs: {e:#}");
                }
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// Whether a cancel was requested (workers poll this between steps).
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// A receiver that changes whenever the job does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Moves a queued job to running; false if it was cancelled meanwhile.
    pub(crate) fn start(&self) -> bool {
        let mut s = self.lock();
        if s.status != JobStatus::Queued || self.cancel_requested() {
            return false;
        }
        s.status = JobStatus::Running;
        s.started_at = Some(unix_now());
        metrics::histogram!("sdserve_queue_wait_seconds")
            .record(s.enqueued.elapsed().as_secs_f64());
        drop(s);
        self.bump();
        self.persist(true);
        true
    }

    /// Records progress: `step` of `total` steps done on image `image`.
    pub(crate) fn progress(&self, image: usize, step: usize, total: usize) {
        let mut s = self.lock();
        let n = self.spec.seeds.len();
        s.total_steps = (total * n) as u32;
        s.step = (image * total + step) as u32;
        s.images_done = image as u32;
        drop(s);
        self.bump();
        self.persist(false);
    }

    pub(crate) fn finish(&self, outcome: Result<ImagesResponse, JobError>) {
        let mut s = self.lock();
        if s.status.is_terminal() {
            return;
        }
        s.finished_at = Some(unix_now());
        match outcome {
            Ok(result) => {
                s.status = JobStatus::Succeeded;
                s.images_done = result.data.len() as u32;
                s.step = s.total_steps;
                s.result = Some(Arc::new(result));
            }
            Err(e) if e.code == "cancelled" => {
                s.status = JobStatus::Cancelled;
                s.error = Some(e);
            }
            Err(e) => {
                s.status = JobStatus::Failed;
                s.error = Some(e);
            }
        }
        metrics::counter!("sdserve_image_jobs_total", "status" => s.status.as_str()).increment(1);
        drop(s);
        self.bump();
        self.persist(true);
    }

    fn cancel_error() -> JobError {
        JobError {
            code: "cancelled".into(),
            message: "the job was cancelled".into(),
        }
    }

    /// The job as returned by the API; `queue_position` comes from the queue.
    pub fn view(&self, queue_position: Option<u32>, with_result: bool) -> ImageJob {
        let s = self.lock().clone();
        let [poll_url, events_url, cancel_url] = job_urls(&self.id);
        ImageJob {
            id: self.id.clone(),
            object: "image.job".into(),
            status: s.status,
            created: self.created,
            started_at: s.started_at,
            finished_at: s.finished_at,
            queue_position: if s.status == JobStatus::Queued {
                queue_position
            } else {
                None
            },
            cancel_requested: self.cancel_requested() && s.status == JobStatus::Running,
            progress: JobProgress::new(s.step, s.total_steps, s.images_done),
            parameters: self.spec.parameters.clone(),
            result: if with_result {
                s.result.as_deref().cloned()
            } else {
                None
            },
            error: s.error.clone(),
            poll_url,
            events_url,
            cancel_url,
        }
    }

    /// Waits until the job ends.
    pub async fn wait(&self) -> JobOutcome {
        let mut rx = self.subscribe();
        loop {
            {
                let s = self.lock();
                match s.status {
                    JobStatus::Succeeded => {
                        return JobOutcome::Succeeded(s.result.clone().expect("result set"))
                    }
                    JobStatus::Failed => {
                        return JobOutcome::Failed(s.error.clone().expect("error set"))
                    }
                    JobStatus::Cancelled => {
                        return JobOutcome::Cancelled(
                            s.error.clone().unwrap_or_else(Self::cancel_error),
                        )
                    }
                    _ => {}
                }
            }
            rx.borrow_and_update();
            if rx.changed().await.is_err() {
                return JobOutcome::Failed(JobError {
                    code: "internal_error".into(),
                    message: "job dropped".into(),
                });
            }
        }
    }
}

/// The API view of a stored job (one another replica owns, or one from before a restart).
pub fn view_record(r: &ImageJobRecord, with_result: bool) -> anyhow::Result<ImageJob> {
    let status = JobStatus::parse(&r.status).ok_or_else(|| anyhow::anyhow!("unknown job status {:?}", r.status))?;
    let [poll_url, events_url, cancel_url] = job_urls(&r.id);
    Ok(ImageJob {
        id: r.id.clone(),
        object: "image.job".into(),
        status,
        created: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        queue_position: None,
        cancel_requested: r.cancel_requested && status == JobStatus::Running,
        progress: JobProgress::new(r.step, r.total_steps, r.images_done),
        parameters: serde_json::from_str(&r.parameters)?,
        result: match (&r.result, with_result) {
            (Some(json), true) => Some(serde_json::from_str(json)?),
            _ => None,
        },
        error: r.error.clone().map(|(code, message)| JobError { code, message }),
        poll_url,
        events_url,
        cancel_url,
    })
}

/// A job's poll, events and cancel URLs.
fn job_urls(id: &str) -> [String; 3] {
    let base = format!("/v1/images/jobs/{id}");
    [base.clone(), format!("{base}/events"), format!("{base}/cancel")]
}

/// Why a submission was refused.
pub enum SubmitError {
    /// The queue is full; retry after this many seconds.
    Full { retry_after: u64, capacity: usize },
    /// The server is shutting down.
    Closed,
}

/// What a cancel did.
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running and stops at its next step.
    Requested,
    /// The job had already ended.
    AlreadyFinished(JobStatus),
    NotFound,
}

struct QueueInner {
    pending: VecDeque<Arc<Job>>,
    running: usize,
    closed: bool,
}

struct Store {
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
}

/// The bounded FIFO plus the table of known jobs.
pub struct JobQueue {
    capacity: usize,
    workers: usize,
    history: usize,
    queue: Mutex<QueueInner>,
    available: Condvar,
    store: Mutex<Store>,
    /// Moving average of job seconds, for Retry-After.
    avg_job_secs: Mutex<f64>,
    records: ImageJobStore,
    /// This process's instance id: the owner of its jobs.
    owner: Arc<str>,
}

impl JobQueue {
    /// Must be called inside a tokio runtime (retained jobs are saved on it).
    pub fn new(capacity: usize, workers: usize, history: usize, records: ImageJobStore, owner: Arc<str>) -> Self {
        Self {
            capacity,
            workers: workers.max(1),
            history,
            queue: Mutex::new(QueueInner {
                pending: VecDeque::new(),
                running: 0,
                closed: false,
            }),
            available: Condvar::new(),
            store: Mutex::new(Store {
                jobs: HashMap::new(),
                finished: VecDeque::new(),
            }),
            avg_job_secs: Mutex::new(5.0),
            records,
            owner,
        }
    }

    /// This process's instance id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The shared image job table.
    pub fn records(&self) -> &ImageJobStore {
        &self.records
    }

    /// Saves a new retained job's first state; from then on its changes are saved as they
    /// happen. Call before [`Self::submit`].
    pub async fn save_new(&self, job: &mut Arc<Job>) -> anyhow::Result<()> {
        let record = job.record(&self.owner);
        self.records.insert(&record).await?;
        let persist = Arc::new(Persist {
            store: self.records.clone(),
            owner: self.owner.clone(),
            history: self.history,
            rt: tokio::runtime::Handle::current(),
            last_progress: Mutex::new(None),
        });
        Arc::get_mut(job).expect("a new job has one owner").persist = Some(persist);
        Ok(())
    }

    /// Ids of the retained jobs this process holds that have not ended.
    pub fn live_ids(&self) -> Vec<String> {
        self.s().jobs.values().filter(|j| j.retained && !j.status().is_terminal()).map(|j| j.id.clone()).collect()
    }

    fn q(&self) -> MutexGuard<'_, QueueInner> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn s(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// (queued, running).
    pub fn depth(&self) -> (usize, usize) {
        let q = self.q();
        (q.pending.len(), q.running)
    }

    fn publish_depth(q: &QueueInner) {
        metrics::gauge!("sdserve_queue_depth").set(q.pending.len() as f64);
        metrics::gauge!("sdserve_jobs_running").set(q.running as f64);
    }

    /// Seconds until a slot is likely to free up.
    pub fn retry_after(&self) -> u64 {
        let (queued, running) = self.depth();
        let avg = *self.avg_job_secs.lock().unwrap_or_else(|p| p.into_inner());
        let ahead = (queued + running).max(1) as f64;
        ((avg * ahead / self.workers as f64).ceil() as u64).clamp(1, 3600)
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Arc<Job>) -> Result<(), SubmitError> {
        let mut q = self.q();
        if q.closed {
            return Err(SubmitError::Closed);
        }
        if q.pending.len() >= self.capacity {
            drop(q);
            metrics::counter!("sdserve_queue_rejections_total").increment(1);
            return Err(SubmitError::Full {
                retry_after: self.retry_after(),
                capacity: self.capacity,
            });
        }
        self.s().jobs.insert(job.id.clone(), job.clone());
        q.pending.push_back(job);
        Self::publish_depth(&q);
        drop(q);
        self.available.notify_one();
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.s().jobs.get(id).cloned()
    }

    /// 1-based position of a queued job.
    pub fn position(&self, id: &str) -> Option<u32> {
        self.q()
            .pending
            .iter()
            .position(|j| j.id == id)
            .map(|i| i as u32 + 1)
    }

    /// The API view of a job.
    pub fn view(&self, job: &Job, with_result: bool) -> ImageJob {
        job.view(self.position(&job.id), with_result)
    }

    /// Blocks until a job is available; `None` once the queue is closed.
    pub(crate) fn next(&self) -> Option<Arc<Job>> {
        let mut q = self.q();
        loop {
            if q.closed {
                return None;
            }
            if let Some(job) = q.pending.pop_front() {
                q.running += 1;
                Self::publish_depth(&q);
                let rest: Vec<Arc<Job>> = q.pending.iter().cloned().collect();
                drop(q);
                // Queue positions moved: wake the watchers of the jobs still waiting.
                for j in rest {
                    j.bump();
                }
                return Some(job);
            }
            q = self.available.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Called by a worker when a job it took has ended.
    pub(crate) fn done(&self, job: &Job, elapsed: Duration) {
        let mut q = self.q();
        q.running = q.running.saturating_sub(1);
        Self::publish_depth(&q);
        drop(q);
        {
            let mut avg = self.avg_job_secs.lock().unwrap_or_else(|p| p.into_inner());
            *avg = 0.7 * *avg + 0.3 * elapsed.as_secs_f64();
        }
        self.retire(job);
    }

    /// Keeps a finished job for polling, forgetting the oldest beyond the history bound.
    fn retire(&self, job: &Job) {
        let mut s = self.s();
        if !job.retained {
            s.jobs.remove(&job.id);
            return;
        }
        s.finished.push_back(job.id.clone());
        while s.finished.len() > self.history {
            if let Some(old) = s.finished.pop_front() {
                s.jobs.remove(&old);
            }
        }
    }

    /// Cancels a job: a queued one at once, a running one at its next step.
    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let Some(job) = self.get(id) else {
            return CancelOutcome::NotFound;
        };
        let mut q = self.q();
        if let Some(i) = q.pending.iter().position(|j| j.id == id) {
            q.pending.remove(i);
            Self::publish_depth(&q);
            let rest: Vec<Arc<Job>> = q.pending.iter().skip(i).cloned().collect();
            drop(q);
            job.cancel.store(true, Ordering::SeqCst);
            job.finish(Err(Job::cancel_error()));
            self.retire(&job);
            for j in rest {
                j.bump();
            }
            return CancelOutcome::Cancelled;
        }
        drop(q);
        let status = job.status();
        if status.is_terminal() {
            return CancelOutcome::AlreadyFinished(status);
        }
        job.cancel.store(true, Ordering::SeqCst);
        job.bump();
        CancelOutcome::Requested
    }

    /// Stops the workers after their current job; queued jobs are cancelled.
    pub fn close(&self) {
        let mut q = self.q();
        q.closed = true;
        let pending: Vec<Arc<Job>> = q.pending.drain(..).collect();
        Self::publish_depth(&q);
        drop(q);
        self.available.notify_all();
        for j in pending {
            j.cancel.store(true, Ordering::SeqCst);
            j.finish(Err(JobError {
                code: "cancelled".into(),
                message: "the server is shutting down".into(),
            }));
        }
    }
}
