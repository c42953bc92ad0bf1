//! One AlignProp run end to end, shared by the server's job runner and `sdserve align`:
//! build the trainable LoRA (fresh on the attention projections, or from an adapter), train,
//! write the adapter in diffusers keys, and describe the run for the adapter's sidecar.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use super::request::AlignRequest;
use super::trainer::{train, AlignConfig, StepReport, StopReason};
use super::validation::Selection;
use crate::noise::NoiseRng;
use crate::engine::pipeline::StableDiffusion;
use crate::lora::{save_diffusers, LoraAdapter, TrainableLora};
use crate::rewards::WeightedRewards;

/// What a finished run reports.
pub struct RunOutcome {
    pub stop: StopReason,
    /// The validated state kept, when the run validated.
    pub selection: Option<Selection>,
    /// Sidecar fields: rewards, hyperparameters, seed, stop reason and reward curve.
    pub metadata: Map<String, Value>,
}

/// The LoRA a run starts from: `init` continued, or rank-`rank` factors on every attention
/// projection (`down ~ N(0, 1/rank²)`, `up = 0`) drawn from `seed`.
pub fn initial_lora(sd: &StableDiffusion, request: &AlignRequest, init: Option<&LoraAdapter>, seed: u64) -> Result<TrainableLora> {
    match init {
        Some(adapter) => TrainableLora::from_adapter(adapter, sd.dtype, &sd.device),
        None => {
            let targets = super::attention_targets(&sd.lora_targets);
            anyhow::ensure!(!targets.is_empty(), "the model's UNet has no attention projections to adapt");
            let mut rng = NoiseRng::new(seed ^ 0x1a_0a_1e);
            Ok(TrainableLora::new(&targets, request.lora_rank, request.alpha(), &mut rng, sd.dtype, &sd.device)?)
        }
    }
}

/// Trains with `cfg` and writes the adapter to `out` (atomically). `on_step` sees every step
/// and may stop the run by returning an error.
pub fn run(
    sd: &StableDiffusion,
    request: &AlignRequest,
    cfg: &AlignConfig,
    rewards: &WeightedRewards,
    init: Option<&LoraAdapter>,
    out: &Path,
    on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
) -> Result<RunOutcome> {
    let lora = initial_lora(sd, request, init, cfg.seed)?;
    let mut curve = Vec::new();
    let trained = train(sd, cfg, rewards, &lora, &mut |r| {
        curve.push(r.clone());
        on_step(r)
    })?;
    let header = HashMap::from([
        ("sdserve.rewards".to_string(), serde_json::to_string(&request.rewards)?),
        ("sdserve.lora_rank".to_string(), lora.rank().to_string()),
        ("sdserve.lora_alpha".to_string(), lora.alpha().to_string()),
    ]);
    save_diffusers(out, &lora.export()?, &header).with_context(|| format!("cannot save the adapter to {}", out.display()))?;

    let mut metadata = Map::new();
    metadata.insert("rewards".into(), serde_json::to_value(&request.rewards)?);
    metadata.insert("hyperparameters".into(), hyperparameters(request, cfg, &lora));
    metadata.insert("seed".into(), json!(cfg.seed));
    metadata.insert("stop_reason".into(), serde_json::to_value(trained.stop)?);
    if let Some(selection) = &trained.selection {
        metadata.insert("validation".into(), serde_json::to_value(selection)?);
    }
    metadata.insert("reward_curve".into(), serde_json::to_value(&curve)?);
    Ok(RunOutcome { stop: trained.stop, selection: trained.selection, metadata })
}

fn hyperparameters(request: &AlignRequest, cfg: &AlignConfig, lora: &TrainableLora) -> Value {
    json!({
        "prompts": cfg.prompts,
        "negative_prompt": cfg.negative_prompt,
        "steps": cfg.steps,
        "learning_rate": cfg.adamw.lr,
        "weight_decay": cfg.adamw.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "lora_rank": lora.rank(),
        "lora_alpha": lora.alpha(),
        "truncation": request.truncation,
        "sampler": "ddim",
        "sampler_steps": cfg.sampler_steps,
        "guidance_scale": cfg.guidance_scale,
        "eta": cfg.eta,
        "width": cfg.width,
        "height": cfg.height,
        "init_adapter": request.init_adapter,
        "time_budget_s": cfg.time_budget_s,
        "validation": cfg.validation,
    })
}
