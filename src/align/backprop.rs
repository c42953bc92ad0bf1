//! Truncated reward backpropagation through a batch of DDIM trajectories.
//!
//! Only the last `k` denoising steps of a trajectory carry gradient (AlignProp's truncation).
//! Two equivalent ways to get the LoRA gradient are provided: [`full_graph`] records every
//! grad step, the VAE decode and the reward in one autograd graph; [`recompute`] runs it all
//! without a graph, keeping only the tensors between layers, and then recomputes one layer at
//! a time backwards, chaining vector-Jacobian products (see [`chain`](super::chain)): peak
//! memory is one UNet or VAE layer's graph (candle has no gradient checkpointing).
//!
//! The trajectories of a batch share each UNet call (batch 2B with guidance).

use std::time::Instant;

use candle_core::{DType, Result, Tensor, Var};

use super::chain;
use crate::optim::grad_or_zeros;
use crate::engine::denoise::{combine_guidance, guidance_input};
use crate::engine::scheduler::Ddim;
use crate::lora::{LoraSet, TrainableLora};
use crate::model::staged::{self, run_to_one, Staged};
use crate::model::unet::{Conditioning, UNet2DConditionModel};

/// A batch of B trajectories sampled together: the frozen UNet, the DDIM schedule and the
/// conditioning.
pub struct Trajectory<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub scheduler: &'a Ddim,
    /// Batch 2B (the B unconditional rows first, then the B prompts) with guidance, else B.
    pub cond: &'a Conditioning,
    pub guidance_scale: f64,
    /// Per-step noise `[B, C, h, w]` for DDIM with eta > 0 (drawn once so a recompute sees the
    /// same).
    pub step_noise: Vec<Option<Tensor>>,
}

impl Trajectory<'_> {
    /// Number of denoising steps.
    pub fn len(&self) -> usize {
        self.scheduler.timesteps().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One guided DDIM step from `x` at step index `i`.
    pub fn step(&self, i: usize, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        run_to_one(&self.step_pass(i, lora)?, x.clone())
    }

    /// Runs steps `range` from `x` with `lora`, returning the end latents.
    pub fn run(&self, range: std::ops::Range<usize>, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        range.into_iter().try_fold(x.clone(), |x, i| self.step(i, &x, lora))
    }

    /// Step `i` as layers: the guidance input, the UNet's layers, guidance and the DDIM update.
    fn step_pass<'b>(&'b self, i: usize, lora: &'b LoraSet) -> Result<StepPass<'b>> {
        let timesteps = vec![self.scheduler.timesteps()[i]; self.cond.batch()?];
        Ok(StepPass { traj: self, i, lora, timesteps })
    }
}

/// One denoising step over the stack `[x]` → `[x, UNet input]` → UNet layers above `x` →
/// `[x_prev]`.
struct StepPass<'a> {
    traj: &'a Trajectory<'a>,
    i: usize,
    lora: &'a LoraSet,
    timesteps: Vec<f64>,
}

impl Staged for StepPass<'_> {
    fn layers(&self) -> usize {
        self.traj.unet.pass(&self.timesteps, self.traj.cond, self.lora).layers() + 2
    }

    fn reads(&self, i: usize) -> usize {
        let unet = self.traj.unet.pass(&self.timesteps, self.traj.cond, self.lora);
        match i {
            0 => 1,
            i if i <= unet.layers() => unet.reads(i - 1),
            _ => 2,
        }
    }

    fn run(&self, i: usize, top: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let traj = self.traj;
        let unet = traj.unet.pass(&self.timesteps, traj.cond, self.lora);
        if i > 0 && i <= unet.layers() {
            return unet.run(i - 1, top);
        }
        match (i, <[Tensor; 1]>::try_from(top)) {
            (0, Ok([x])) => Ok(vec![x.clone(), guidance_input(&x, traj.guidance_scale)?]),
            (_, Err(top)) if top.len() == 2 => {
                let eps = combine_guidance(&top[1], traj.guidance_scale)?;
                let noise = traj.step_noise.get(self.i).and_then(Option::as_ref);
                Ok(vec![traj.scheduler.step_pure(&eps, self.i, &top[0], noise)?])
            }
            _ => candle_core::bail!("denoising step: unexpected stack at layer {i}"),
        }
    }
}

/// What the end of a trajectory is scored with.
pub struct Objective<'a> {
    /// Final latents → decoded images (the VAE decoder, recomputed layer by layer).
    pub decoder: &'a dyn Staged,
    /// Decoded images (about `[-1, 1]`) → (scalar loss, `[B]` rewards).
    pub score: &'a dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
}

/// What one backward pass produced.
pub struct Backprop {
    pub loss: f64,
    pub rewards: Vec<f64>,
    /// Gradients aligned with [`TrainableLora::vars`].
    pub grads: Vec<Tensor>,
}

fn check_k(traj: &Trajectory, k: usize) -> Result<()> {
    if k == 0 || k > traj.len() {
        candle_core::bail!("truncation k must be in 1..={}, got {k}", traj.len());
    }
    Ok(())
}

fn summarize(loss: &Tensor, rewards: &Tensor) -> Result<(f64, Vec<f64>)> {
    let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let rewards = rewards.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((loss, rewards))
}

/// Backpropagates through the last `k` steps of every trajectory in a single autograd graph.
pub fn full_graph(traj: &Trajectory, lora: &TrainableLora, x_t: &Tensor, k: usize, objective: &Objective) -> Result<Backprop> {
    check_k(traj, k)?;
    let first = traj.len() - k;
    let x = traj.run(0..first, &x_t.detach(), &lora.detached_set())?;
    let x0 = traj.run(first..traj.len(), &x, &lora.lora_set())?;
    let (loss, rewards) = (objective.score)(&run_to_one(objective.decoder, x0)?)?;
    let store = loss.backward()?;
    let grads = lora.vars().into_iter().map(|v| grad_or_zeros(&store, v)).collect::<Result<_>>()?;
    let (loss, rewards) = summarize(&loss, &rewards)?;
    Ok(Backprop { loss, rewards, grads })
}

/// The same gradient as [`full_graph`], recomputing one layer at a time during the backward
/// pass; trajectory `b` of the batch carries gradient through its last `ks[b]` steps.
pub fn recompute(traj: &Trajectory, lora: &TrainableLora, x_t: &Tensor, ks: &[usize], objective: &Objective) -> Result<Backprop> {
    if ks.len() != x_t.dim(0)? {
        candle_core::bail!("{} truncations for a batch of {}", ks.len(), x_t.dim(0)?);
    }
    for &k in ks {
        check_k(traj, k)?;
    }
    let len = traj.len();
    let first = len - ks.iter().copied().max().unwrap_or(1);
    let frozen = lora.detached_set();
    let clock = Instant::now();
    let mut x = traj.run(0..first, &x_t.detach(), &frozen)?;
    let mut tapes = Vec::with_capacity(len - first);
    for i in first..len {
        let tape = chain::record(&traj.step_pass(i, &frozen)?, vec![x])?;
        x = staged::single(&tape.output)?;
        tapes.push(tape);
    }
    tracing::debug!("{len} denoising steps in {:.2} s", clock.elapsed().as_secs_f64());

    let clock = Instant::now();
    let decoded = chain::record(objective.decoder, vec![x])?;
    let images = Var::from_tensor(&staged::single(&decoded.output)?)?;
    let (loss, rewards) = (objective.score)(images.as_tensor())?;
    let image_grad = grad_or_zeros(&loss.backward()?, &images)?;
    let (loss, rewards) = summarize(&loss, &rewards)?;
    drop(images);
    tracing::debug!("decode and reward with its backward in {:.2} s", clock.elapsed().as_secs_f64());
    let clock = Instant::now();
    let mut upstream = chain::backward(objective.decoder, decoded, vec![Some(image_grad)], &[], &mut [])?.pop().flatten();
    tracing::debug!("decoder backward in {:.2} s", clock.elapsed().as_secs_f64());

    let vars = lora.vars();
    let mut grads: Vec<Tensor> = vars.iter().map(|v| v.zeros_like()).collect::<Result<_>>()?;
    let live = lora.lora_set();
    for (i, tape) in (first..len).zip(tapes).rev() {
        let Some(g) = upstream else { break };
        // Trajectories whose window starts later pass no gradient back from here on.
        let active: Vec<f64> = ks.iter().map(|&k| if i + k >= len { 1.0 } else { 0.0 }).collect();
        let g = if active.iter().all(|&a| a == 1.0) {
            g
        } else {
            let mask = Tensor::from_vec(active, (ks.len(), 1, 1, 1), g.device())?.to_dtype(g.dtype())?;
            g.broadcast_mul(&mask)?
        };
        let clock = Instant::now();
        upstream = chain::backward(&traj.step_pass(i, &live)?, tape, vec![Some(g)], &vars, &mut grads)?.pop().flatten();
        tracing::debug!("step {i} backward in {:.2} s", clock.elapsed().as_secs_f64());
    }
    Ok(Backprop { loss, rewards, grads })
}
