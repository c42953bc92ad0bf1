//! Generation workers: dedicated OS threads that pull jobs from the queue and run the
//! (blocking, CPU-bound) pipeline, off the async runtime.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;

use super::api::{ImageData, ImagesResponse, JobError};
use super::jobs::{unix_now, Job, JobQueue};
use crate::engine::edit::EditParams;
use crate::engine::image::{encode, to_rgb};
use crate::engine::pipeline::{GenerateParams, StableDiffusion};
use crate::lora::PipelineLora;

/// The error an `on_step` callback returns to stop a cancelled job.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
struct Cancelled;

/// Starts `n` worker threads; they exit once the queue is closed.
pub fn spawn_workers(
    n: usize,
    queue: Arc<JobQueue>,
    model: Arc<StableDiffusion>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n.max(1))
        .map(|i| {
            let queue = queue.clone();
            let model = model.clone();
            std::thread::Builder::new()
                .name(format!("sdserve-worker-{i}"))
                .spawn(move || {
                    while let Some(job) = queue.next() {
                        let started = Instant::now();
                        run(&model, &job);
                        queue.done(&job, started.elapsed());
                    }
                })
                .expect("cannot spawn a worker thread")
        })
        .collect()
}

/// Runs one job to its end (never panics).
pub fn run(model: &StableDiffusion, job: &Job) {
    if !job.start() {
        job.finish(Err(JobError {
            code: "cancelled".into(),
            message: "the job was cancelled".into(),
        }));
        return;
    }
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| generate(model, job)));
    let outcome = match outcome {
        Ok(Ok(resp)) => {
            metrics::histogram!("sdserve_generation_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("sdserve_images_generated_total").increment(resp.data.len() as u64);
            Ok(resp)
        }
        Ok(Err(e)) if e.downcast_ref::<Cancelled>().is_some() => {
            tracing::info!(job = %job.id, "cancelled while running");
            Err(JobError {
                code: "cancelled".into(),
                message: "the job was cancelled while running".into(),
            })
        }
        Ok(Err(e)) => {
            tracing::error!(job = %job.id, "generation failed: {e:#}");
            Err(JobError {
                code: "generation_failed".into(),
                message: format!("{e:#}"),
            })
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(job = %job.id, "generation panicked: {msg}");
            Err(JobError {
                code: "internal_error".into(),
                message: format!("the engine panicked: {msg}"),
            })
        }
    };
    job.finish(outcome);
}

/// Builds the per-request adapter set: cheap, never touches the base weights.
pub fn build_lora(job: &Job) -> PipelineLora {
    let start = Instant::now();
    let mut lora = PipelineLora::default();
    for (a, weight) in &job.spec.loras {
        a.adapter.add_to(*weight, &mut lora);
    }
    metrics::histogram!("sdserve_adapter_apply_seconds").record(start.elapsed().as_secs_f64());
    lora
}

fn generate(model: &StableDiffusion, job: &Job) -> anyhow::Result<ImagesResponse> {
    let spec = &job.spec;
    let lora = build_lora(job);
    let mut data = Vec::with_capacity(spec.seeds.len());
    let mut last_total = spec.steps_run().max(1);
    for (i, &seed) in spec.seeds.iter().enumerate() {
        let params = GenerateParams {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            steps: spec.steps,
            guidance_scale: spec.guidance_scale,
            seed,
            width: spec.width,
            height: spec.height,
            scheduler: spec.scheduler,
            eta: spec.eta,
            latents: None,
        };
        if job.cancel_requested() {
            return Err(Cancelled.into());
        }
        let mut on_step = |done, total| {
            last_total = total;
            job.progress(i, done, total);
            if job.cancel_requested() {
                return Err(Cancelled.into());
            }
            Ok(())
        };
        let image = match &spec.edit {
            None => model.generate(&params, &lora, &mut on_step)?,
            Some(edit) => {
                let params = EditParams {
                    generate: params,
                    image: edit.image.clone(),
                    mask: edit.mask.clone(),
                    strength: edit.strength,
                    posterior_noise: None,
                };
                model.edit(&params, &lora, &mut on_step)?
            }
        };
        let bytes = encode(&to_rgb(&image)?, spec.output_format, spec.quality)?;
        data.push(ImageData {
            b64_json: base64::engine::general_purpose::STANDARD.encode(bytes),
            seed,
        });
        job.progress(i + 1, 0, last_total);
    }
    Ok(ImagesResponse {
        created: unix_now(),
        data,
        output_format: spec.parameters.output_format,
        size: spec.parameters.size.clone(),
        parameters: spec.parameters.clone(),
    })
}
