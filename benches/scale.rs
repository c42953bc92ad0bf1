//! Real-scale benchmark: text encode, one UNet step (CFG batch 2), VAE decode, a whole
//! generation and one AlignProp step on a real-size model, each row in its own process so its
//! peak RSS (weights included) is its own.
//!
//! ```sh
//! cargo bench --bench scale -- --model bench-models/sd15-random
//! ```
//!
//! The model folder is written first (an SD 1.5-architecture pipeline with seeded random
//! weights, `sdserve::pretrain::sd15`) when it does not exist. `scripts/bench_scale.py` runs
//! the same rows in diffusers / PyTorch, interleaved, and prints the ratios.
//!
//! Rows: `text`, `unet@SIZE`, `vae@SIZE`, `generate@SIZE/sSTEPS` and
//! `align@SIZE/kK/sSTEPS[/bBATCH]` (one optimiser step as `sdserve align` takes it: DDIM
//! `STEPS` steps from the initial latents, gradient through the last `K`, brightness reward,
//! clipping, AdamW; the batch's trajectories share each UNet call). `--in-process` runs the
//! rows here and prints one JSON line each (what the script reads).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use sdserve::optim::{clip_grad_norm, AdamW, AdamWConfig};
use sdserve::align::trainer::{backprop_batch, Batch};
use sdserve::engine::denoise::guided_noise_pred;
use sdserve::noise::NoiseRng;
use sdserve::engine::pipeline::{GenerateParams, StableDiffusion};
use sdserve::engine::scheduler::Ddim;
use sdserve::lora::{LoraSet, PipelineLora, TrainableLora};
use sdserve::rewards::{pixel::Brightness, WeightedRewards};
use serde_json::json;

const PROMPT: &str = "a photo of an astronaut riding a horse on the moon";
const GUIDANCE: f64 = 7.5;
/// The timestep of the single UNet-step rows.
const UNET_T: f64 = 501.0;

#[derive(Parser, Debug)]
struct Args {
    /// diffusers model folder (written first, with random SD 1.5-size weights, if missing).
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated rows (default: the SD 1.5 table).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<Row>,
    /// Runs per row; the fastest is reported.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// A safetensors file with the initial latents `latents_{h}x{w}` (`[1, 4, h, w]`);
    /// seeded noise when absent.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Run the rows in this process and print JSON lines.
    #[arg(long)]
    in_process: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

const DEFAULT_ROWS: &str = "text,unet@256,unet@512,vae@256,vae@512,generate@512/s4,align@256/k1/s4,align@256/k2/s4";

#[derive(Clone, Debug, PartialEq)]
enum Row {
    Text,
    Unet { size: usize },
    Vae { size: usize },
    Generate { size: usize, steps: usize },
    Align { size: usize, k: usize, steps: usize, batch: usize },
}

impl FromStr for Row {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad row {s:?} (text, unet@SIZE, vae@SIZE, generate@SIZE/sN, align@SIZE/kK/sN[/bB])");
        if s == "text" {
            return Ok(Row::Text);
        }
        let (kind, rest) = s.split_once('@').ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let size: usize = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let (mut k, mut steps, mut batch) = (None, None, 1);
        for p in parts {
            let (key, value) = p.split_at(1);
            let value: usize = value.parse().map_err(|_| bad())?;
            match key {
                "k" => k = Some(value),
                "s" => steps = Some(value),
                "b" => batch = value,
                _ => return Err(bad()),
            }
        }
        match (kind, k, steps) {
            ("unet", None, None) => Ok(Row::Unet { size }),
            ("vae", None, None) => Ok(Row::Vae { size }),
            ("generate", None, Some(steps)) => Ok(Row::Generate { size, steps }),
            ("align", Some(k), Some(steps)) => Ok(Row::Align { size, k, steps, batch }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Row::Text => write!(f, "text"),
            Row::Unet { size } => write!(f, "unet@{size}"),
            Row::Vae { size } => write!(f, "vae@{size}"),
            Row::Generate { size, steps } => write!(f, "generate@{size}/s{steps}"),
            Row::Align { size, k, steps, batch: 1 } => write!(f, "align@{size}/k{k}/s{steps}"),
            Row::Align { size, k, steps, batch } => write!(f, "align@{size}/k{k}/s{steps}/b{batch}"),
        }
    }
}

/// `VmHWM` / `VmRSS` of this process in bytes (Linux).
fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The initial latents `[batch, C, h, w]` for a `size`² image: from the inputs file, or
/// seeded noise.
fn latents(sd: &StableDiffusion, inputs: Option<&Path>, size: usize, batch: usize) -> Result<Tensor> {
    let (_, c, h, w) = sd.latent_shape(size, size)?;
    let one = match inputs {
        Some(path) => {
            let key = format!("latents_{h}x{w}");
            let mut all = candle_core::safetensors::load(path, &Device::Cpu)?;
            all.remove(&key).with_context(|| format!("{} has no {key}", path.display()))?
        }
        None => NoiseRng::new(0).randn((1, c, h, w), DType::F32, &Device::Cpu)?,
    };
    Ok(Tensor::cat(&vec![&one; batch], 0)?.to_dtype(sd.dtype)?.to_device(&sd.device)?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Runs `work` `reps` times; returns every duration in seconds and the first run's check value.
fn timed(reps: usize, mut work: impl FnMut() -> Result<f64>) -> Result<(Vec<f64>, f64)> {
    let mut times = Vec::with_capacity(reps);
    let mut check = f64::NAN;
    for i in 0..reps {
        let start = Instant::now();
        let value = work()?;
        times.push(start.elapsed().as_secs_f64());
        if i == 0 {
            check = value;
        }
    }
    Ok((times, check))
}

/// One row in this process: JSON with the times, a check value to compare with diffusers
/// (a mean of the output, or the loss) and the peak RSS.
fn run_row(sd: &StableDiffusion, row: &Row, args: &Args) -> Result<serde_json::Value> {
    let inputs = args.inputs.as_deref();
    // The size only matters to SDXL's time ids.
    let encode = |size: usize| sd.conditioning(PROMPT, Some(""), GUIDANCE, (size, size), &PipelineLora::default());
    let (times, check) = match *row {
        Row::Text => timed(args.reps, || {
            scalar(&encode(sd.native_size())?.context.abs()?.mean_all()?)
        })?,
        Row::Unet { size } => {
            let (x, cond) = (latents(sd, inputs, size, 1)?, encode(size)?);
            timed(args.reps, || {
                let eps = guided_noise_pred(&sd.unet, &x, UNET_T, &cond, GUIDANCE, LoraSet::none())?;
                scalar(&eps.abs()?.mean_all()?)
            })?
        }
        Row::Vae { size } => {
            let x = latents(sd, inputs, size, 1)?;
            timed(args.reps, || scalar(&sd.decode(&x)?.mean_all()?))?
        }
        Row::Generate { size, steps } => {
            let mut params = GenerateParams::new(PROMPT, 0, size, size);
            params.steps = steps;
            params.latents = Some(latents(sd, inputs, size, 1)?);
            timed(args.reps, || scalar(&sd.generate(&params, &PipelineLora::default(), &mut |_, _| Ok(()))?.mean_all()?))?
        }
        Row::Align { size, k, steps, batch } => {
            let targets = sdserve::align::attention_targets(&sd.lora_targets);
            let lora = TrainableLora::new(&targets, 4, 4.0, &mut NoiseRng::new(3), sd.dtype, &sd.device)?;
            let mut opt = AdamW::new(lora.vars().into_iter().cloned().collect(), AdamWConfig { weight_decay: 1e-4, ..Default::default() })?;
            let scheduler = Ddim::new(&sd.scheduler_config, steps, 0.0)?;
            let rewards = WeightedRewards::new(vec![(Box::new(Brightness), 1.0)]);
            let batch = Batch {
                prompts: vec![PROMPT.to_string(); batch],
                conds: vec![encode(size)?; batch],
                x_t: latents(sd, inputs, size, batch)?,
                step_noise: vec![],
                ks: vec![k; batch],
            };
            timed(args.reps, || {
                let mut bp = backprop_batch(sd, &scheduler, GUIDANCE, &batch, &rewards, &lora)?;
                clip_grad_norm(&mut bp.grads, 1.0)?;
                opt.step(&bp.grads)?;
                Ok(bp.loss)
            })?
        }
    };
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(json!({
        "row": row.to_string(),
        "seconds": best,
        "times": times,
        "check": check,
        "peak_rss": proc_status("VmHWM:"),
        "threads": candle_core::utils::get_num_threads(),
    }))
}

fn ensure_model(dir: &Path) -> Result<()> {
    if dir.join("model_index.json").is_file() {
        return Ok(());
    }
    eprintln!("writing an SD 1.5-architecture model with random weights to {} (about 4.3 GB)", dir.display());
    sdserve::pretrain::sd15::write_random(dir, 0)
}

fn main() -> Result<()> {
    // `RUST_LOG=sdserve=debug` shows where an AlignProp step spends its time.
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let mut args = Args::parse();
    if args.rows.is_empty() {
        args.rows = DEFAULT_ROWS.split(',').map(|r| r.parse().expect("valid default row")).collect();
    }
    ensure_model(&args.model)?;
    if args.in_process {
        let start = Instant::now();
        let sd = StableDiffusion::load(&args.model, &Device::Cpu, DType::F32)?;
        let load = start.elapsed().as_secs_f64();
        for row in &args.rows {
            let mut out = run_row(&sd, row, &args)?;
            out["load_seconds"] = json!(load);
            println!("{out}");
        }
        return Ok(());
    }

    println!("{} ({} threads)", args.model.display(), candle_core::utils::get_num_threads());
    println!("{:<24} {:>10} {:>14} {:>14}", "row", "seconds", "peak RSS GB", "check");
    for row in &args.rows {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["--in-process", "--model"]).arg(&args.model).args(["--rows", &row.to_string(), "--reps", &args.reps.to_string()]);
        if let Some(inputs) = &args.inputs {
            cmd.arg("--inputs").arg(inputs);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            eprintln!("{row}: failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            continue;
        }
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).context("child output")?;
        let gb = line["peak_rss"].as_f64().unwrap_or(f64::NAN) / 1e9;
        println!("{:<24} {:>10.3} {:>14.2} {:>14.6}", row.to_string(), line["seconds"].as_f64().unwrap_or(f64::NAN), gb, line["check"].as_f64().unwrap_or(f64::NAN));
    }
    Ok(())
}
