//! `sdserve evaluate`: prompt following of a shapes model, measured by the analytic evaluator
//! on held-out captions (or given prompts) and fixed seeds, optionally with LoRA adapters;
//! can save the images as a grid.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};

use super::{DeviceArgs, LoraArg};
use crate::dataset::{sample, Split};
use crate::engine::image::{from_rgb, to_rgb};
use crate::engine::pipeline::GenerateParams;
use crate::engine::scheduler::SchedulerKind;
use crate::eval::{analyze, score, Accuracy};
use crate::lora::{LoraAdapter, PipelineLora};
use crate::rewards::object_count::ObjectCount;

#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {
    /// diffusers-layout model folder (a shapes model such as the embedded default).
    #[arg(long, env = "SDSERVE_MODEL", default_value = crate::DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// A LoRA adapter as FILE[:WEIGHT]; repeatable.
    #[arg(long = "lora")]
    pub loras: Vec<LoraArg>,
    /// Prompts to evaluate, each with every seed (default: held-out captions, one seed each).
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// Images: held-out captions, or seeds per given prompt.
    #[arg(long, default_value_t = 64)]
    pub images: usize,
    /// First seed; image i uses seed + i.
    #[arg(long, default_value_t = 1_000_000)]
    pub seed: u64,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    #[arg(long, default_value = "ddim")]
    pub scheduler: SchedulerKind,
    /// Save the images as a PNG grid (8 per row).
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Also print, per image, its prompt, seed, the objects found and how they match (JSON lines).
    #[arg(long)]
    pub details: bool,
    /// An object counter folder (as the object_count reward uses): also report how often its
    /// rounded count equals the evaluator's, and its count per image in --details.
    #[arg(long)]
    pub counter: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl EvaluateArgs {
    /// `(prompt, seed)` of every image.
    fn cases(&self) -> Vec<(String, u64)> {
        if self.prompts.is_empty() {
            (0..self.images as u64).map(|i| (sample(Split::HeldOut, self.seed, i).caption(), self.seed + i)).collect()
        } else {
            self.prompts.iter().flat_map(|p| (0..self.images as u64).map(move |i| (p.clone(), self.seed + i))).collect()
        }
    }
}

/// Tiles equally sized images, `columns` per row.
fn grid(images: &[RgbImage], columns: usize) -> RgbImage {
    let (w, h) = images.first().map_or((0, 0), |i| i.dimensions());
    let rows = images.len().div_ceil(columns) as u32;
    let mut out = RgbImage::new(w * columns.min(images.len()) as u32, h * rows);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % columns) as u32 * w, (i / columns) as u32 * h);
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    out
}

/// The counter's expected count (temperature 1) for one image.
fn counter_count(counter: &ObjectCount, img: &RgbImage, device: &Device) -> Result<f64> {
    let x = from_rgb(img, device)?;
    Ok(counter.counter().expected_count(&x, 1.0)?.to_vec1::<f32>()?[0] as f64)
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    if args.images == 0 {
        bail!("--images must be at least 1");
    }
    let sd = args.device.load(&args.model)?;
    let device = sd.device.clone();
    let mut lora = PipelineLora::default();
    for l in &args.loras {
        LoraAdapter::from_file(&l.path, &sd.lora_targets, &device)?.add_to(l.weight, &mut lora);
    }
    let counter = args.counter.as_deref().map(|dir| ObjectCount::load(dir, &device)).transpose()?;
    let mut counter_agrees = 0;
    let cases = args.cases();
    let bar = ProgressBar::new(cases.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:40} {pos}/{len} images [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let mut accuracy = Accuracy::default();
    let mut images = Vec::new();
    let size = crate::pretrain::IMAGE_SIZE;
    for (prompt, seed) in &cases {
        let params = GenerateParams {
            steps: args.steps,
            guidance_scale: args.guidance,
            scheduler: args.scheduler,
            ..GenerateParams::new(prompt.clone(), *seed, size, size)
        };
        let img = to_rgb(&sd.generate(&params, &lora, &mut |_, _| Ok(()))?)?;
        let analysis = analyze(&img);
        let m = score(&analysis, prompt).with_context(|| format!("{prompt:?} is not a shapes caption"))?;
        let counted = match &counter {
            Some(c) => Some(counter_count(c, &img, &device)?),
            None => None,
        };
        counter_agrees += counted.is_some_and(|n| n.round() == analysis.count() as f64) as usize;
        if args.details {
            let found: Vec<String> = analysis.objects.iter().map(|o| format!("{} {}", o.color.as_str(), o.shape.as_str())).collect();
            bar.suspend(|| println!("{}", serde_json::json!({"prompt": prompt, "seed": seed, "found": found, "match": m, "counter": counted})));
        }
        accuracy.add(m);
        images.push(img);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(path) = &args.grid {
        grid(&images, 8).save(path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{accuracy}");
    if counter.is_some() {
        println!("counter agrees with the evaluator's count on {counter_agrees}/{} images", cases.len());
    }
    println!("{}", serde_json::to_string(&accuracy)?);
    Ok(())
}
