//! Stage 2: the text encoder and UNet, trained together on the epsilon-prediction loss over
//! latents of the frozen VAE, with 10% of captions dropped so classifier-free guidance works.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::Checkpointer;
use super::data::batch;
use super::params::Params;
use crate::optim::{AdamW, AdamWConfig};
use crate::noise::NoiseRng;
use crate::engine::scheduler::schedule::alphas_cumprod;
use crate::lora::LoraSet;
use crate::model::clip::ClipTextModel;
use crate::model::config::{read_json, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{Conditioning, UNet2DConditionModel};
use crate::model::vae::AutoencoderKL;
use crate::model::weights::open;

/// Options of the diffusion stage.
pub struct DiffusionStage {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// The last steps, over which the learning rate falls linearly to a tenth.
    pub decay_steps: usize,
    pub caption_dropout: f64,
    pub seed: u64,
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

impl DiffusionStage {
    /// The learning rate of `step`: constant, then a linear fall to `lr / 10` over the last
    /// `decay_steps`.
    fn lr_at(&self, step: usize) -> f64 {
        let start = self.steps.saturating_sub(self.decay_steps);
        let progress = step.saturating_sub(start) as f64 / self.decay_steps.max(1) as f64;
        self.lr * (1.0 - 0.9 * progress.min(1.0))
    }
}

/// Trains (or resumes) `unet/` and `text_encoder/` of the model folder `dir`.
pub fn train(dir: &Path, opts: &DiffusionStage, device: &Device, bar: &ProgressBar) -> Result<()> {
    let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;
    let vae = AutoencoderKL::new(open(&dir.join("vae").join(WEIGHTS), DType::F32, device)?, &vae_cfg)?;
    let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
    let sched: SchedulerConfig = read_json(&dir.join("scheduler/scheduler_config.json"))?;
    let ac = alphas_cumprod(&sched)?;

    let text_params = Params::new(opts.seed);
    let te_cfg: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let text = ClipTextModel::new(text_params.var_builder(DType::F32, device), &te_cfg)?;
    let unet_params = Params::new(opts.seed + 1);
    let unet_cfg: UNetConfig = read_json(&dir.join("unet/config.json"))?;
    let unet = UNet2DConditionModel::new(unet_params.var_builder(DType::F32, device), &unet_cfg)?;

    let te_file = dir.join("text_encoder/model.safetensors");
    let unet_file = dir.join("unet").join(WEIGHTS);
    let state_dir = dir.join("unet");
    let mut run = Checkpointer::open(&state_dir, &[&te_file, &unet_file], opts.steps, bar)?;
    if run.resuming() {
        text_params.load(&te_file)?;
        unet_params.load(&unet_file)?;
    }
    let vars: Vec<_> = text_params.vars().into_iter().chain(unet_params.vars()).collect();
    let mut opt = AdamW::new(vars, AdamWConfig { lr: opts.lr, weight_decay: 1e-4, ..Default::default() })?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ (run.step() as u64) << 20);
    let mut noise = NoiseRng::new(opts.seed ^ 0xd1ff ^ run.step() as u64);
    let scaling = vae_cfg.scaling_factor;
    let mut ema_loss = None;
    while run.running() {
        let (images, captions) = batch(opts.seed, (run.step() * opts.batch) as u64 + 1_000_000, opts.batch, super::arch::IMAGE_SIZE, device)?;
        let latents = (vae.encode(&images)?.mean * scaling)?.detach();
        let mut ids = Vec::with_capacity(opts.batch * tokenizer.max_length());
        for c in &captions {
            let text = if rng.random::<f64>() < opts.caption_dropout { "" } else { c.as_str() };
            ids.extend(tokenizer.encode(text)?);
        }
        let ids = Tensor::from_vec(ids, (opts.batch, tokenizer.max_length()), device)?;
        let cond = Conditioning::text(text.forward(&ids, LoraSet::none())?);

        let ts: Vec<usize> = (0..opts.batch).map(|_| rng.random_range(0..ac.len())).collect();
        let coef = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = ts.iter().map(|&t| f(ac[t]) as f32).collect();
            Ok(Tensor::from_vec(v, (opts.batch, 1, 1, 1), device)?)
        };
        let eps = noise.randn(latents.shape(), DType::F32, device)?;
        let noisy = (latents.broadcast_mul(&coef(&|a| a.sqrt())?)? + eps.broadcast_mul(&coef(&|a| (1.0 - a).sqrt())?)?)?;
        let t_f: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        let pred = unet.forward_timesteps(&noisy, &t_f, &cond, LoraSet::none())?;
        let loss = (pred - eps)?.sqr()?.mean_all()?;
        let lr = opts.lr_at(run.step());
        opt.set_lr(lr);
        opt.minimize(&loss, 1.0)?;
        let l = loss.to_scalar::<f32>()? as f64;
        let smoothed = ema_loss.map_or(l, |e: f64| 0.98 * e + 0.02 * l);
        ema_loss = Some(smoothed);
        run.advance(smoothed, format!("diffusion loss {smoothed:.4}, lr {lr:.1e}"), || {
            text_params.save(&te_file)?;
            unet_params.save(&unet_file)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DiffusionStage;

    #[test]
    fn learning_rate_is_constant_then_falls_to_a_tenth() {
        let opts = DiffusionStage { steps: 100, batch: 1, lr: 1.0, decay_steps: 40, caption_dropout: 0.0, seed: 0 };
        for (step, lr) in [(0, 1.0), (60, 1.0), (80, 0.55), (100, 0.1)] {
            assert!((opts.lr_at(step) - lr).abs() < 1e-12, "step {step}: {}", opts.lr_at(step));
        }
    }
}
