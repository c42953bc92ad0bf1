//! `sdserve align`: an AlignProp run offline, with a progress bar; writes the adapter and its
//! sidecar into the adapters folder exactly as the server's /align jobs do.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::DeviceArgs;
use crate::align::request::{AlignLimits, AlignRequest, TruncationRequest};
use crate::align::runner;
use crate::align::validation::Validation;
use crate::noise::random_seed;
use crate::lora::LoraAdapter;
use crate::rewards::registry::{build_all, RewardModels, RewardSpec};
use crate::stores::registry::{name_problem, valid_name};
use crate::stores::AdapterMeta;

#[derive(clap::Args, Debug)]
pub struct AlignArgs {
    /// diffusers-layout model folder.
    #[arg(long, env = "SDSERVE_MODEL", default_value = crate::DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Adapter name: writes `<adapters-dir>/<name>.safetensors` and `<name>.json`.
    #[arg(long)]
    pub name: String,
    #[arg(long, env = "SDSERVE_ADAPTERS_DIR", default_value = crate::server::config::DEFAULT_ADAPTERS_DIR)]
    pub adapters_dir: PathBuf,
    /// A training prompt; repeatable (or give --prompt-set).
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// A built-in prompt list: `shapes` or `simple_animals`.
    #[arg(long)]
    pub prompt_set: Option<String>,
    /// A reward as NAME[:WEIGHT]; repeatable (see `GET /v1/align/rewards`).
    #[arg(long = "reward", required = true)]
    pub rewards: Vec<String>,
    #[arg(long, env = "SDSERVE_REWARD_MODELS", default_value = crate::server::config::DEFAULT_REWARD_MODELS_DIR)]
    pub reward_models: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 4)]
    pub lora_rank: usize,
    /// Final denoising steps that carry gradient.
    #[arg(long, default_value_t = 1, conflicts_with = "k_random")]
    pub k: usize,
    /// Draw K per trajectory from MIN..=MAX instead, e.g. `1,3`.
    #[arg(long, value_name = "MIN,MAX", value_parser = two_numbers)]
    pub k_random: Option<[usize; 2]>,
    #[arg(long, default_value_t = 10)]
    pub sampler_steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Random when omitted (the seed used is printed and recorded).
    #[arg(long)]
    pub seed: Option<u64>,
    /// An adapter file to continue training.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Stop (successfully) after this many seconds.
    #[arg(long)]
    pub time_budget_s: Option<f64>,
    /// Image width; defaults to the model's native size (UNet sample size × VAE scale factor).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height; defaults to the model's native size.
    #[arg(long)]
    pub height: Option<usize>,
    /// Keep the best state on IMAGES fixed validation (prompt, seed) pairs, scored before
    /// training and every EVERY steps, e.g. `32,10`.
    #[arg(long, value_name = "IMAGES,EVERY", value_parser = two_numbers)]
    pub validate: Option<[usize; 2]>,
    /// Replace an existing adapter of the same name.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Parses `A,B` (two whole numbers).
fn two_numbers(arg: &str) -> Result<[usize; 2], String> {
    let parsed = arg.split_once(',').and_then(|(a, b)| Some([a.trim().parse().ok()?, b.trim().parse().ok()?]));
    parsed.ok_or_else(|| format!("{arg:?} is not two whole numbers separated by a comma"))
}

fn reward_spec(arg: &str) -> Result<RewardSpec> {
    let (name, weight) = match arg.rsplit_once(':') {
        Some((n, w)) => (n, w.parse::<f64>().map_err(|_| anyhow!("--reward {arg:?}: weight must be a number"))?),
        None => (arg, 1.0),
    };
    Ok(RewardSpec { reward: name.to_string(), weight, color: None })
}

impl AlignArgs {
    /// The same request the HTTP API takes.
    fn request(&self, seed: u64) -> Result<AlignRequest> {
        let truncation = match self.k_random {
            Some(random) => TruncationRequest::Random { random },
            None => TruncationRequest::Fixed { k: self.k },
        };
        Ok(AlignRequest {
            adapter_name: self.name.clone(),
            prompts: (!self.prompts.is_empty()).then(|| self.prompts.clone()),
            prompt_set: self.prompt_set.clone(),
            negative_prompt: None,
            rewards: self.rewards.iter().map(|r| reward_spec(r)).collect::<Result<_>>()?,
            steps: self.steps,
            learning_rate: self.learning_rate,
            weight_decay: 1e-4,
            max_grad_norm: 1.0,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lora_rank: self.lora_rank,
            lora_alpha: None,
            truncation,
            sampler_steps: self.sampler_steps,
            guidance_scale: self.guidance_scale,
            eta: self.eta,
            seed: Some(seed),
            init_adapter: self.init_adapter.as_ref().map(|p| p.display().to_string()),
            time_budget_s: self.time_budget_s,
            validation: self.validate.map(|[images, every]| Validation { images, every }),
            width: self.width,
            height: self.height,
            overwrite: self.overwrite,
        })
    }
}

pub fn run(args: AlignArgs) -> Result<()> {
    if !valid_name(&args.name) {
        bail!(name_problem(&args.name));
    }
    let out = args.adapters_dir.join(format!("{}.safetensors", args.name));
    if out.exists() && !args.overwrite {
        bail!("{} exists; pass --overwrite to replace it", out.display());
    }
    let seed = args.seed.unwrap_or_else(random_seed);
    let request = args.request(seed)?;
    let rewards = build_all(&request.rewards, &RewardModels::new(&args.reward_models))?;
    let sd = args.device.load(&args.model)?;
    let device = sd.device.clone();
    let cfg = request.to_config(&AlignLimits::default(), seed, sd.native_size()).map_err(|(param, msg)| anyhow!("{param}: {msg}"))?;
    eprintln!("training at {}x{}", cfg.width, cfg.height);
    let init = match &args.init_adapter {
        Some(p) => Some(LoraAdapter::from_file(p, &sd.lora_targets, &device)?),
        None => None,
    };
    std::fs::create_dir_all(&args.adapters_dir).with_context(|| format!("cannot create {}", args.adapters_dir.display()))?;

    eprintln!("seed {seed}");
    let bar = ProgressBar::new(cfg.steps as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template"),
    );
    let outcome = runner::run(&sd, &request, &cfg, &rewards, init.as_ref(), &out, &mut |r| {
        bar.set_position(r.step as u64);
        bar.set_message(format!("reward {:.4} ± {:.4}  loss {:.4}  |g| {:.3}", r.reward_mean, r.reward_std, r.loss, r.grad_norm));
        if !bar.is_hidden() {
            return Ok(());
        }
        let validation = r.validation_reward.map(|v| format!(", validation {v:.4}")).unwrap_or_default();
        eprintln!("step {}/{}: reward {:.4} ± {:.4}{validation} ({:.1} s)", r.step, cfg.steps, r.reward_mean, r.reward_std, r.seconds);
        Ok(())
    })?;
    bar.finish();
    if let Some(s) = outcome.selection {
        eprintln!("kept the state after step {} (validation reward {:.4}; {:.4} before training)", s.step, s.reward, s.start_reward);
    }
    let mut meta = AdapterMeta::align_job(None, Some(args.model.display().to_string()));
    meta.extra = outcome.metadata;
    let sidecar = args.adapters_dir.join(format!("{}.json", args.name));
    std::fs::write(&sidecar, serde_json::to_vec_pretty(&meta)?).with_context(|| format!("cannot write {}", sidecar.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        align: AlignArgs,
    }

    fn parse(extra: &[&str]) -> Result<AlignArgs, clap::Error> {
        let args = ["sdserve", "--name", "x", "--reward", "brightness"].iter().chain(extra);
        Cli::try_parse_from(args).map(|c| c.align)
    }

    #[test]
    fn k_random_and_validate_take_two_comma_separated_numbers() {
        let args = parse(&["--k-random", "1,3"]).unwrap();
        assert_eq!(args.request(0).unwrap().truncation, TruncationRequest::Random { random: [1, 3] });
        assert_eq!(parse(&[]).unwrap().request(0).unwrap().truncation, TruncationRequest::Fixed { k: 1 });
        for bad in ["1", "1,x", ""] {
            assert!(parse(&["--k-random", bad]).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&["--k-random", "1,3", "--k", "2"]).is_err());
        let validation = parse(&["--validate", "32,10"]).unwrap().request(0).unwrap().validation;
        assert_eq!(validation, Some(Validation { images: 32, every: 10 }));
    }

    #[test]
    fn size_defaults_to_the_models_native_size() {
        let size = |extra: &[&str]| {
            let cfg = parse(&[extra, &["--prompt", "a cat"]].concat()).unwrap().request(0).unwrap().to_config(&AlignLimits::default(), 0, 512).unwrap();
            (cfg.width, cfg.height)
        };
        assert_eq!(size(&[]), (512, 512));
        assert_eq!(size(&["--width", "256", "--height", "384"]), (256, 384));
        assert_eq!(size(&["--height", "256"]), (512, 256));
    }
}
