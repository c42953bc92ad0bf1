//! Stage 1: the autoencoder, trained on random crops for reconstruction (L1 + MSE) with a
//! small KL term.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::Checkpointer;
use super::data::batch;
use super::params::Params;
use crate::optim::{AdamW, AdamWConfig};
use crate::noise::NoiseRng;
use crate::model::config::VaeConfig;
use crate::model::vae::AutoencoderKL;

/// Options of the VAE stage.
pub struct VaeStage {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub kl_weight: f64,
    /// Side of the random square crop trained on (the VAE is convolutional).
    pub crop: usize,
    pub seed: u64,
}

/// Trains (or resumes) the VAE in `dir` (`config.json` must exist), saving every
/// `save_every` steps.
pub fn train(dir: &Path, opts: &VaeStage, device: &Device, bar: &ProgressBar) -> Result<()> {
    let cfg: VaeConfig = crate::model::config::read_json(&dir.join("config.json"))?;
    let params = Params::new(opts.seed);
    let vae = AutoencoderKL::new(params.var_builder(DType::F32, device), &cfg)?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let mut run = Checkpointer::open(dir, &[&weights], opts.steps, bar)?;
    if run.resuming() {
        params.load(&weights)?;
    }
    let mut opt = AdamW::new(params.vars(), AdamWConfig { lr: opts.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut noise = NoiseRng::new(opts.seed ^ 0x5eed ^ run.step() as u64);
    let mut crops = ChaCha8Rng::seed_from_u64(opts.seed ^ run.step() as u64);
    let size = super::arch::IMAGE_SIZE;
    while run.running() {
        let (x, _) = batch(opts.seed, (run.step() * opts.batch) as u64, opts.batch, size, device)?;
        let crop = opts.crop.min(size);
        let (dy, dx) = (crops.random_range(0..=size - crop), crops.random_range(0..=size - crop));
        let x = x.narrow(2, dy, crop)?.narrow(3, dx, crop)?.contiguous()?;
        let posterior = vae.encode(&x)?;
        let z = posterior.sample(&noise.randn(posterior.mean.shape(), DType::F32, device)?)?;
        let recon = vae.decode(&z)?;
        let diff = (&recon - &x)?;
        let rec = (diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?;
        let kl = ((posterior.mean.sqr()? + posterior.logvar.exp()?)? - posterior.logvar)?;
        let kl = ((kl - 1.0)? * 0.5)?.mean_all()?;
        let loss = (rec + (kl * opts.kl_weight)?)?;
        opt.minimize(&loss, 1.0)?;
        let loss = loss.to_scalar::<f32>()? as f64;
        run.advance(loss, format!("vae loss {loss:.4}"), || params.save(&weights))?;
    }
    Ok(())
}

/// `1 / std` of the latent means over a few batches (as SD's 0.18215 was chosen).
pub fn scaling_factor(vae: &AutoencoderKL, seed: u64, device: &Device) -> Result<f64> {
    let mut sum = 0.0;
    let mut sq = 0.0;
    let mut n = 0.0;
    for b in 0..8u64 {
        let (x, _) = batch(seed ^ 0xa11, b * 32, 32, super::arch::IMAGE_SIZE, device)?;
        let m = vae.encode(&x)?.mean.flatten_all()?.to_dtype(DType::F64)?;
        sum += m.sum_all()?.to_scalar::<f64>()?;
        sq += m.sqr()?.sum_all()?.to_scalar::<f64>()?;
        n += m.elem_count() as f64;
    }
    let var = sq / n - (sum / n).powi(2);
    Ok(1.0 / var.sqrt())
}
