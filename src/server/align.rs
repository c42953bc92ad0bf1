//! The /align trainers of this process (roles `all` and `trainer`): threads that claim jobs
//! from the shared queue, train on the served model and publish the adapter, so that the very
//! next generation request on any replica can name it.
//!
//! Each step is recorded with a guarded write that also tells the trainer whether the job was
//! cancelled (from any replica) or is no longer its own (declared interrupted after a missed
//! lease); the adapter is published in the same commit that ends the job `succeeded`, so a
//! trainer that dies or loses its job never leaves a partial adapter behind.
//!
//! CPU sharing: with role `all`, training runs on its own thread(s) (`--align-workers`,
//! default 1) next to the generation workers, and both split candle's CPU kernels over the
//! cores: generation keeps being served, only slower. Role `trainer` keeps training off the
//! replicas that serve.

use std::sync::atomic::Ordering;

use anyhow::{anyhow, Context, Result};
use tokio::runtime::Handle;

use super::adapters::AdapterError;
use super::state::AppState;
use crate::align::jobs::{AlignError, AlignJob, AlignStatus};
use crate::align::request::AlignLimits;
use crate::align::runner;
use crate::align::trainer::{StepReport, StopReason};
use crate::rewards::registry::build_all;
use crate::stores::align_jobs::{is_align_job, StepVerdict};
use crate::stores::blobs::StagedFile;
use crate::stores::registry::JobGuard;
use crate::stores::{cache_dir, AdapterMeta, Change};

/// Stops a run: the job was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
struct Cancelled;

/// Stops a run: the job is no longer this trainer's.
#[derive(Debug, thiserror::Error)]
#[error("the job was taken from this trainer")]
struct Lost;

/// Starts the trainer threads (call once the model is loaded).
pub fn start(state: &AppState, rt: &Handle) {
    for i in 0..state.config.align_workers.max(1) {
        let (state, rt) = (state.clone(), rt.clone());
        std::thread::Builder::new()
            .name(format!("align-{i}"))
            .spawn(move || trainer_loop(&state, &rt))
            .expect("spawn an align trainer");
    }
}

fn trainer_loop(state: &AppState, rt: &Handle) {
    let poll = state.config.stores.poll_interval();
    let mut changes = state.stores.db.subscribe();
    while !state.stopping.load(Ordering::SeqCst) {
        match rt.block_on(state.stores.align.claim(&state.instance_id)) {
            Ok(Some(job)) => {
                tracing::info!("align job {} claimed by {}", job.id, state.instance_id);
                run_job(state, rt, job);
            }
            // Sleep until an /align job changes anywhere (a submission), this process leaves, or
            // the poll interval passes; image jobs' progress cannot give a trainer work.
            Ok(None) => rt.block_on(async {
                let _ = tokio::time::timeout(poll, async {
                    loop {
                        match changes.recv().await {
                            Ok(Change::Job(id)) if id.is_empty() || is_align_job(&id) => break,
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                })
                .await;
            }),
            Err(e) => {
                tracing::warn!("cannot claim align jobs: {e:#}");
                std::thread::sleep(poll);
            }
        }
    }
}

fn run_job(state: &AppState, rt: &Handle, job: AlignJob) {
    metrics::gauge!("sdserve_align_jobs_running").increment(1.0);
    let owner = state.instance_id.clone();
    let store = &state.stores.align;
    let mut curve: Vec<StepReport> = Vec::new();
    let mut report = |r: &StepReport| -> Result<()> {
        metrics::histogram!("sdserve_align_step_seconds").record(r.seconds);
        curve.push(r.clone());
        match rt.block_on(store.record_step(&job.id, &owner, r, &curve)) {
            Ok(StepVerdict::Continue) => Ok(()),
            Ok(StepVerdict::Cancel) => Err(Cancelled.into()),
            Ok(StepVerdict::Lost) => Err(Lost.into()),
            Err(e) => {
                tracing::warn!("align job {}: cannot record step {}: {e:#}", job.id, r.step);
                Ok(())
            }
        }
    };
    let outcome = train_and_publish(state, rt, &job, &mut report);
    let end = match outcome {
        Ok(()) => None,
        Err(e) if e.is::<Cancelled>() => Some((AlignStatus::Cancelled, None)),
        Err(e) if e.is::<Lost>() || matches!(e.downcast_ref::<AdapterError>(), Some(AdapterError::JobLost)) => {
            tracing::warn!("align job {} was taken from this trainer; its result is dropped", job.id);
            None
        }
        Err(e) => {
            let message = format!("{e:#}");
            let code = match e.downcast_ref::<AdapterError>() {
                Some(AdapterError::Exists(_)) => "adapter_exists",
                _ if message.contains("non-finite") => "non_finite",
                _ => "training_failed",
            };
            tracing::warn!("align job {} failed: {message}", job.id);
            Some((AlignStatus::Failed, Some(AlignError { code: code.into(), message })))
        }
    };
    if let Some((status, error)) = end {
        if let Err(e) = rt.block_on(store.finish(&job.id, &owner, status, error.as_ref(), None)) {
            tracing::warn!("cannot record the end of align job {}: {e:#}", job.id);
        }
    }
    let status = rt.block_on(store.status(&job.id)).ok().flatten().map(AlignStatus::as_str).unwrap_or("unknown");
    metrics::gauge!("sdserve_align_jobs_running").decrement(1.0);
    metrics::counter!("sdserve_align_jobs_total", "status" => status).increment(1);
}

/// Trains and publishes the adapter (ending the job `succeeded` in the same commit).
fn train_and_publish(state: &AppState, rt: &Handle, job: &AlignJob, report: &mut dyn FnMut(&StepReport) -> Result<()>) -> Result<()> {
    let sd = state.model.get().context("the model is not loaded")?;
    let request = &job.request;
    let cfg = request.to_config(&AlignLimits::default(), job.seed, sd.native_size()).map_err(|(param, msg)| anyhow!("invalid request ({param}): {msg}"))?;
    let rewards = build_all(&request.rewards, &state.reward_models)?;
    let init = match &request.init_adapter {
        Some(name) => Some(rt.block_on(state.adapters.resolve(name))?),
        None => None,
    };
    let staging = cache_dir(&state.config.data_dir).join(format!(".{}.safetensors", job.id));
    let outcome = runner::run(&sd, request, &cfg, &rewards, init.as_ref().map(|r| &*r.adapter), &staging, report);
    let staged = outcome.and_then(|o| Ok((o, StagedFile::adopt(&staging)?)));
    let (outcome, staged) = match staged {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
    };
    let mut meta = AdapterMeta::align_job(Some(job.id.clone()), Some(state.model_id.to_string()));
    meta.extra = outcome.metadata;
    let stop_reason = match outcome.stop {
        StopReason::Completed => "completed",
        StopReason::TimeBudget => "time_budget",
    };
    let guard = JobGuard { id: &job.id, owner: &state.instance_id, stop_reason };
    rt.block_on(state.adapters.install(&request.adapter_name, staged, Some(meta), request.overwrite, Some(&guard)))?;
    tracing::info!("align job {} published adapter {:?}", job.id, request.adapter_name);
    Ok(())
}
