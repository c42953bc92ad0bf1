//! `sdserve train-counter`: trains the object-count CNN on augmented renders of the
//! procedural training split (blur, down/up-scaling, flips, colour jitter, noise: what a
//! small diffusion model's samples look like) and measures it on clean held-out renders.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::object_count::{ObjectCountConfig, ObjectCounter};
use crate::align::optim::{AdamW, AdamWConfig};
use crate::pretrain::checkpoint::Checkpointer;
use crate::dataset::{sample, Scene, Split};
use crate::pretrain::Params;

/// `sdserve train-counter` options.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainCounterArgs {
    /// Output folder (resumes when it holds a partial run).
    #[arg(long, default_value = "models/rewards/object_count")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Clean held-out renders the final accuracy is measured on.
    #[arg(long, default_value_t = 1000)]
    pub eval_samples: usize,
}

/// Seed of the held-out renders the final accuracy is measured on.
pub const EVAL_SEED: u64 = 0xc0417;

/// `[N, 3, H, W]` f32 pixels in `[0, 1]` from channel-major pixel buffers of `size`² pixels.
fn stack(pixels: Vec<f32>, n: usize, size: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(pixels, (n, 3, size, size), &Device::Cpu)?.to_device(device)?)
}

/// Channel-major `[0, 1]` values of an image.
fn chw(img: &RgbImage) -> Vec<f32> {
    (0..3).flat_map(|c| img.pixels().map(move |p| p.0[c] as f32 / 255.0)).collect()
}

/// Clean renders of items `first..first + n` of `split` at `size`, and their scenes.
pub fn renders(split: Split, seed: u64, first: u64, n: usize, size: usize, device: &Device) -> Result<(Tensor, Vec<Scene>)> {
    let scenes: Vec<_> = (first..first + n as u64).map(|i| sample(split, seed, i)).collect();
    let pixels = scenes.iter().flat_map(|s| chw(&s.render(size as u32))).collect();
    Ok((stack(pixels, n, size, device)?, scenes))
}

/// A randomly degraded copy of `img`, channel-major in `[0, 1]`.
fn augment(mut img: RgbImage, rng: &mut impl Rng) -> Vec<f32> {
    let (w, h) = img.dimensions();
    if rng.random_bool(0.3) {
        let side = [w / 3, w / 2, w * 3 / 4][rng.random_range(0..3)];
        img = imageops::resize(&imageops::resize(&img, side, side, FilterType::Triangle), w, h, FilterType::Triangle);
    }
    if rng.random_bool(0.6) {
        img = imageops::blur(&img, rng.random_range(0.3..1.5));
    }
    if rng.random_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut img);
    }
    if rng.random_bool(0.5) {
        imageops::flip_vertical_in_place(&mut img);
    }
    let gain: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.85..1.15));
    let offset: f32 = rng.random_range(-0.08..0.08);
    let desaturate: f32 = rng.random_range(0.0..0.3);
    let noise: f32 = rng.random_range(0.0..0.06);
    let mut out = vec![0f32; 3 * (w * h) as usize];
    let plane = (w * h) as usize;
    for (i, p) in img.pixels().enumerate() {
        let v = p.0.map(|c| c as f32 / 255.0);
        let grey = (v[0] + v[1] + v[2]) / 3.0;
        for c in 0..3 {
            let jittered = (v[c] + desaturate * (grey - v[c])) * gain[c] + offset;
            let n: f32 = rng.sample(StandardNormal);
            out[c * plane + i] = (jittered + noise * n).clamp(0.0, 1.0);
        }
    }
    out
}

/// The augmented training batch of `step`: images and count labels.
fn train_batch(args: &TrainCounterArgs, step: usize, size: usize, device: &Device) -> Result<(Tensor, Vec<u32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0xa46e);
    rng.set_stream(step as u64);
    let first = (step * args.batch) as u64;
    let scenes: Vec<_> = (first..first + args.batch as u64).map(|i| sample(Split::Train, args.seed, i)).collect();
    let pixels = scenes.iter().flat_map(|s| augment(s.render(size as u32), &mut rng)).collect();
    Ok((stack(pixels, args.batch, size, device)?, scenes.iter().map(|s| s.shapes.len() as u32).collect()))
}

/// Share of `n` clean held-out renders (seed `seed`) whose rounded expected count is right
/// (for an f32 counter).
pub fn held_out_accuracy(counter: &ObjectCounter, seed: u64, n: usize) -> Result<f64> {
    let size = counter.config().image_size;
    let mut correct = 0;
    for first in (0..n).step_by(100) {
        let m = 100.min(n - first);
        let (images, scenes) = renders(Split::HeldOut, seed, first as u64, m, size, &Device::Cpu)?;
        let predicted = counter.expected_count(&images, 1.0)?.to_vec1::<f32>()?;
        correct += predicted.iter().zip(&scenes).filter(|(p, s)| p.round() == s.shapes.len() as f32).count();
    }
    Ok(correct as f64 / n.max(1) as f64)
}

/// Trains (or resumes) the counter in `args.out`, then reports its held-out accuracy.
pub fn run(args: &TrainCounterArgs) -> Result<()> {
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cfg_path = out.join("config.json");
    let cfg: ObjectCountConfig = if cfg_path.is_file() {
        crate::model::config::read_json(&cfg_path)?
    } else {
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&ObjectCountConfig::default())?)?;
        ObjectCountConfig::default()
    };
    let device = Device::Cpu;
    let params = Params::new(args.seed);
    let counter = ObjectCounter::new(params.var_builder(DType::F32, &device), &cfg)?;
    let weights = out.join("model.safetensors");
    let bar = crate::pretrain::progress_bar("count");
    let mut run = Checkpointer::open(out, &[&weights], args.steps, &bar)?;
    if run.resuming() {
        params.load(&weights)?;
    }
    let mut opt = AdamW::new(params.vars(), AdamWConfig { lr: args.lr, weight_decay: 1e-4, ..Default::default() })?;

    while run.running() {
        let (images, labels) = train_batch(args, run.step(), cfg.image_size, &device)?;
        let target = Tensor::new(labels.as_slice(), &device)?;
        let logits = counter.forward(&images)?;
        // Cross-entropy for a sharp distribution, plus L1 on its expectation (what the
        // reward uses).
        let ce = candle_nn::loss::cross_entropy(&logits, &target)?;
        let expected = counter.expected_from_logits(&logits, 1.0)?;
        let l1 = (expected - target.to_dtype(DType::F32)?)?.abs()?.mean_all()?;
        let loss = (ce + l1)?;
        opt.minimize(&loss, 1.0)?;
        let loss = loss.to_scalar::<f32>()? as f64;
        run.advance(loss, format!("loss {loss:.4}"), || params.save(&weights))?;
    }
    bar.finish();
    let mut state = run.state;
    let accuracy = held_out_accuracy(&counter, EVAL_SEED, args.eval_samples)?;
    state.held_out_accuracy = Some(accuracy);
    state.save(out)?;
    println!(
        "object_count: {} steps in {:.0} s, held-out accuracy {:.1}% on {} clean renders; weights in {}",
        state.step,
        state.seconds,
        accuracy * 100.0,
        args.eval_samples,
        weights.display()
    );
    Ok(())
}
