//! Truncated reward backpropagation through a DDIM trajectory.
//!
//! Only the last `k` denoising steps carry gradient (AlignProp's truncation). Two equivalent
//! ways to get the LoRA gradient are provided: [`full_graph`] records every grad step in one
//! autograd graph; [`recompute`] runs the trajectory without a graph and then re-runs one
//! step at a time backwards, chaining vector-Jacobian products, so peak memory is one step's
//! graph (candle has no gradient checkpointing).

use candle_core::{Result, Tensor, Var};

use super::optim::grad_or_zeros;
use crate::engine::denoise::guided_noise_pred;
use crate::engine::scheduler::Ddim;
use crate::lora::{LoraSet, TrainableLora};
use crate::model::unet::{Conditioning, UNet2DConditionModel};

/// One sampled trajectory: the frozen UNet, the DDIM schedule and the conditioning.
pub struct Trajectory<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub scheduler: &'a Ddim,
    /// Batch 2 (unconditional first), or 1 when guidance is off.
    pub cond: &'a Conditioning,
    pub guidance_scale: f64,
    /// Per-step noise for DDIM with eta > 0 (drawn once so a recompute sees the same).
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
        let t = self.scheduler.timesteps()[i];
        let eps = guided_noise_pred(self.unet, x, t, self.cond, self.guidance_scale, lora)?;
        let noise = self.step_noise.get(i).and_then(Option::as_ref);
        self.scheduler.step_pure(&eps, i, x, noise)
    }

    /// Runs steps `range` from `x` with `lora`, returning the end latents.
    pub fn run(&self, range: std::ops::Range<usize>, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        range.into_iter().try_fold(x.clone(), |x, i| self.step(i, &x, lora))
    }
}

/// The objective of one trajectory: final latents → (scalar loss, `[B]` rewards).
pub type Objective<'a> = dyn Fn(&Tensor) -> Result<(Tensor, Tensor)> + 'a;

/// What one backward pass produced.
pub struct Backprop {
    pub loss: f64,
    pub rewards: Vec<f64>,
    /// Gradients aligned with [`TrainableLora::vars`].
    pub grads: Vec<Tensor>,
}

fn first_grad_step(traj: &Trajectory, k: usize) -> Result<usize> {
    if k == 0 || k > traj.len() {
        candle_core::bail!("truncation k must be in 1..={}, got {k}", traj.len());
    }
    Ok(traj.len() - k)
}

fn summarize(loss: &Tensor, rewards: &Tensor) -> Result<(f64, Vec<f64>)> {
    let loss = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let rewards = rewards.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((loss, rewards))
}

/// Backpropagates through the last `k` steps in a single autograd graph.
pub fn full_graph(traj: &Trajectory, lora: &TrainableLora, x_t: &Tensor, k: usize, objective: &Objective) -> Result<Backprop> {
    let first = first_grad_step(traj, k)?;
    let x = traj.run(0..first, &x_t.detach(), &lora.detached_set())?;
    let x0 = traj.run(first..traj.len(), &x, &lora.lora_set())?;
    let (loss, rewards) = objective(&x0)?;
    let store = loss.backward()?;
    let grads = lora.vars().into_iter().map(|v| grad_or_zeros(&store, v)).collect::<Result<_>>()?;
    let (loss, rewards) = summarize(&loss, &rewards)?;
    Ok(Backprop { loss, rewards, grads })
}

/// Same gradient as [`full_graph`], recomputing one step at a time during the backward pass.
pub fn recompute(traj: &Trajectory, lora: &TrainableLora, x_t: &Tensor, k: usize, objective: &Objective) -> Result<Backprop> {
    let first = first_grad_step(traj, k)?;
    let frozen = lora.detached_set();
    let mut x = traj.run(0..first, &x_t.detach(), &frozen)?;
    let mut inputs = Vec::with_capacity(k);
    for i in first..traj.len() {
        inputs.push(x.clone());
        x = traj.step(i, &x, &frozen)?;
    }

    let x0 = Var::from_tensor(&x)?;
    let (loss, rewards) = objective(x0.as_tensor())?;
    let mut upstream = grad_or_zeros(&loss.backward()?, &x0)?;
    let (loss, rewards) = summarize(&loss, &rewards)?;

    let vars = lora.vars();
    let mut grads: Vec<Tensor> = vars.iter().map(|v| v.zeros_like()).collect::<Result<_>>()?;
    let live = lora.lora_set();
    for (i, x_in) in (first..traj.len()).zip(inputs).rev() {
        let x_in = Var::from_tensor(&x_in)?;
        let out = traj.step(i, x_in.as_tensor(), &live)?;
        let store = (out * &upstream)?.sum_all()?.backward()?;
        for (g, v) in grads.iter_mut().zip(&vars) {
            *g = (&*g + grad_or_zeros(&store, v)?)?;
        }
        upstream = grad_or_zeros(&store, &x_in)?;
    }
    Ok(Backprop { loss, rewards, grads })
}
