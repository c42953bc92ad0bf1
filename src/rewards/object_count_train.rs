//! `sdserve train-counter`: trains the object-count CNN on augmented renders of the
//! procedural training split (blur, down/up-scaling, flips, colour jitter, noise: what a
//! small diffusion model's samples look like), on crowded renders with more shapes than any
//! caption names, and optionally on a model's own samples of training captions counted by the
//! analytic evaluator; measures it on clean held-out renders and on held-out model samples.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::object_count::{ObjectCountConfig, ObjectCounter};
use crate::optim::{AdamW, AdamWConfig};
use crate::pretrain::checkpoint::{Checkpointer, TrainState};
use crate::dataset::{sample, Scene, Split};
use crate::engine::image::{rgb_planes, to_rgb};
use crate::engine::pipeline::{GenerateParams, StableDiffusion};
use crate::eval::analyze;
use crate::lora::PipelineLora;
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
    /// Also train on this diffusers model's samples of training captions, each counted by the
    /// analytic evaluator, so that the counter sees what the model really draws (extra
    /// shapes, fragments); half of every batch comes from them.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Model samples to train on (generated at every start, not saved).
    #[arg(long, default_value_t = 2000)]
    pub model_samples: usize,
    /// Held-out model samples (held-out captions, other seeds) on which the counter's
    /// agreement with the evaluator is measured at the end.
    #[arg(long, default_value_t = 256)]
    pub model_eval_samples: usize,
    /// DDIM steps of the model samples, used in turn.
    #[arg(long, value_delimiter = ',', default_value = "10,20")]
    pub sample_steps: Vec<usize>,
    /// Classifier-free guidance of the model samples.
    #[arg(long, default_value_t = 7.5)]
    pub sample_guidance: f64,
    /// Label smoothing of the cross-entropy: keeps the logits a few units apart, so that the
    /// reward's expected count still has a gradient on confidently wrong images.
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
}

/// Seeds of the model samples: training ones from here, held-out ones from here + 1e6 (the
/// evaluator's `sdserve evaluate` seeds start at 1e6 and are not reused).
const SAMPLE_SEED: u64 = 5_000_000;

/// Seed of the held-out renders the final accuracy is measured on.
pub const EVAL_SEED: u64 = 0xc0417;

/// `[N, 3, H, W]` f32 pixels in `[0, 1]` from channel-major pixel buffers of `size`² pixels.
fn stack(pixels: Vec<f32>, n: usize, size: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(pixels, (n, 3, size, size), &Device::Cpu)?.to_device(device)?)
}

/// Clean renders of items `first..first + n` of `split` at `size`, and their scenes.
pub fn renders(split: Split, seed: u64, first: u64, n: usize, size: usize, device: &Device) -> Result<(Tensor, Vec<Scene>)> {
    let scenes: Vec<_> = (first..first + n as u64).map(|i| sample(split, seed, i)).collect();
    let pixels = scenes.iter().flat_map(|s| rgb_planes(&s.render(size as u32))).collect();
    Ok((stack(pixels, n, size, device)?, scenes))
}

/// `img`, flipped horizontally and vertically each with probability ½ (counts do not change).
fn flip(mut img: RgbImage, rng: &mut impl Rng) -> RgbImage {
    if rng.random_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut img);
    }
    if rng.random_bool(0.5) {
        imageops::flip_vertical_in_place(&mut img);
    }
    img
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
    img = flip(img, rng);
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

/// Images labelled with their object count.
type Labelled = Vec<(RgbImage, usize)>;

/// `n` 64×64 samples of `sd`, of `split` captions and seeds from `first_seed`, each labelled
/// with the analytic evaluator's count (at most `max_count`).
fn model_samples(args: &TrainCounterArgs, sd: &StableDiffusion, split: Split, first_seed: u64, n: usize, max_count: usize) -> Result<Labelled> {
    let size = crate::pretrain::IMAGE_SIZE;
    let bar = crate::pretrain::progress_bar("samples");
    bar.set_length(n as u64);
    let steps = if args.sample_steps.is_empty() { vec![10] } else { args.sample_steps.clone() };
    let samples = (0..n)
        .map(|i| {
            let seed = first_seed + i as u64;
            let params = GenerateParams {
                steps: steps[i % steps.len()],
                guidance_scale: args.sample_guidance,
                ..GenerateParams::new(sample(split, seed, 0).caption(), seed, size, size)
            };
            let img = to_rgb(&sd.generate(&params, &PipelineLora::default(), &mut |_, _| Ok(()))?)?;
            let count = analyze(&img).count().min(max_count);
            bar.inc(1);
            if bar.is_hidden() && (i + 1) % 250 == 0 {
                eprintln!("samples {}/{n}, {:.0} s", i + 1, bar.elapsed().as_secs_f64());
            }
            Ok((img, count))
        })
        .collect::<Result<_>>();
    bar.finish_and_clear();
    samples
}

/// The training batch of `step`: half augmented renders (of training scenes, or crowded ones
/// with more than 4 shapes where the head counts further), half flipped model samples when
/// there are any; images and count labels.
fn train_batch(args: &TrainCounterArgs, step: usize, cfg: &ObjectCountConfig, samples: &Labelled, device: &Device) -> Result<(Tensor, Vec<u32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0xa46e);
    rng.set_stream(step as u64);
    let size = cfg.image_size as u32;
    let mut pixels = Vec::with_capacity(args.batch * 3 * (size * size) as usize);
    let mut labels = Vec::with_capacity(args.batch);
    for j in 0..args.batch {
        if !samples.is_empty() && j % 2 == 1 {
            let (img, count) = &samples[rng.random_range(0..samples.len())];
            pixels.extend(rgb_planes(&flip(img.clone(), &mut rng)));
            labels.push(*count as u32);
            continue;
        }
        let n = rng.random_range(1..=cfg.max_count.max(1));
        let scene = if n <= 4 { sample(Split::Train, args.seed, (step * args.batch + j) as u64) } else { Scene::with_count(&mut rng, n) };
        pixels.extend(augment(scene.render(size), &mut rng));
        labels.push(scene.shapes.len() as u32);
    }
    Ok((stack(pixels, args.batch, size as usize, device)?, labels))
}

/// Cross-entropy against `targets` with `smoothing` of the probability mass spread evenly
/// over all classes.
fn smoothed_cross_entropy(logits: &Tensor, targets: &Tensor, smoothing: f64) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, 1)?;
    let nll = log_p.gather(&targets.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    let uniform = log_p.mean(1)?.neg()?.mean_all()?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}

/// Share of `samples` whose counter count (rounded expectation at temperature 1) equals the
/// label.
fn agreement(counter: &ObjectCounter, samples: &Labelled) -> Result<f64> {
    let mut agree = 0;
    for chunk in samples.chunks(100) {
        let pixels = chunk.iter().flat_map(|(img, _)| rgb_planes(img)).collect();
        let images = stack(pixels, chunk.len(), counter.config().image_size, &Device::Cpu)?;
        let predicted = counter.expected_count(&images, 1.0)?.to_vec1::<f32>()?;
        agree += predicted.iter().zip(chunk).filter(|(p, (_, n))| p.round() == *n as f32).count();
    }
    Ok(agree as f64 / samples.len().max(1) as f64)
}

/// Share of `n` clean held-out renders (seed `seed`) whose rounded expected count is right
/// (for an f32 counter).
pub fn held_out_accuracy(counter: &ObjectCounter, seed: u64, n: usize) -> Result<f64> {
    let size = counter.config().image_size as u32;
    let renders: Labelled = (0..n as u64)
        .map(|i| {
            let scene = sample(Split::HeldOut, seed, i);
            (scene.render(size), scene.shapes.len())
        })
        .collect();
    agreement(counter, &renders)
}

/// Trains (or resumes) the counter in `args.out`, then measures it (held-out renders, and
/// held-out samples of `args.model`) and returns its final state.
pub fn run(args: &TrainCounterArgs) -> Result<TrainState> {
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
    let sd = match &args.model {
        Some(model) => Some(StableDiffusion::load(model, &device, DType::F32)?),
        None => None,
    };
    let samples = match &sd {
        Some(sd) if run.running() => model_samples(args, sd, Split::Train, SAMPLE_SEED, args.model_samples, cfg.max_count)?,
        _ => Vec::new(),
    };
    let mut opt = AdamW::new(params.vars(), AdamWConfig { lr: args.lr, weight_decay: 1e-4, ..Default::default() })?;

    while run.running() {
        let (images, labels) = train_batch(args, run.step(), &cfg, &samples, &device)?;
        let target = Tensor::new(labels.as_slice(), &device)?;
        let logits = counter.forward(&images)?;
        // Cross-entropy for a peaked distribution, plus L1 on its expectation (what the
        // reward uses).
        let ce = smoothed_cross_entropy(&logits, &target, args.label_smoothing)?;
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
    println!(
        "object_count: {} steps in {:.0} s, held-out accuracy {:.1}% on {} clean renders; weights in {}",
        state.step,
        state.seconds,
        accuracy * 100.0,
        args.eval_samples,
        weights.display()
    );
    if let (Some(sd), Some(model)) = (&sd, &args.model) {
        let held_out = model_samples(args, sd, Split::HeldOut, SAMPLE_SEED + 1_000_000, args.model_eval_samples, cfg.max_count)?;
        let agreement = agreement(&counter, &held_out)?;
        state.model_agreement = Some(agreement);
        println!(
            "object_count: agrees with the analytic evaluator on {:.1}% of {} held-out samples of {}",
            agreement * 100.0,
            held_out.len(),
            model.display()
        );
    }
    state.save(out)?;
    Ok(state)
}
