//! The /align job runner inside the server: trains on the served model, writes
//! `adapters/<name>.safetensors` with its sidecar and registers it, so the very next
//! generation request can name it.
//!
//! CPU sharing: training runs on its own thread(s) (`--align-workers`, default 1) next to the
//! generation workers; both use candle's CPU kernels, which split each op over the machine's
//! cores, so the OS time-slices them and generation keeps being served, only slower.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};

use super::adapters::AdapterMeta;
use super::state::AppState;
use crate::align::jobs::{RunContext, Runner};
use crate::align::request::AlignLimits;
use crate::align::runner;
use crate::align::trainer::StopReason;
use crate::rewards::registry::build_all;

/// Starts the runner threads (call once the model is loaded).
pub fn start(state: &AppState) {
    let runner_state = state.clone();
    let runner: Arc<Runner> = Arc::new(move |ctx: RunContext| run_job(&runner_state, ctx));
    state.align.start(state.config.align_workers, runner);
}

fn run_job(state: &AppState, ctx: RunContext) -> Result<StopReason> {
    let sd = state.model.get().context("the model is not loaded")?;
    let request = ctx.request;
    let cfg = request.to_config(&AlignLimits::default(), ctx.seed, sd.native_size()).map_err(|(param, msg)| anyhow!("invalid request ({param}): {msg}"))?;
    let rewards = build_all(&request.rewards, &state.reward_models)?;
    let init = match &request.init_adapter {
        Some(name) => Some(state.adapters.resolve(name)?),
        None => None,
    };
    let out = state.adapters.path_for(&request.adapter_name);
    let outcome = runner::run(&sd, request, &cfg, &rewards, init.as_ref().map(|r| &*r.adapter), &out, ctx.report)?;
    let mut meta = AdapterMeta::align_job(Some(ctx.job_id.to_string()), Some(state.model_id.to_string()));
    meta.extra = outcome.metadata;
    state.adapters.register(&request.adapter_name, meta)?;
    Ok(outcome.stop)
}
