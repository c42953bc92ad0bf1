//! Micro-benchmarks of the SD 1.5-shaped hot ops and of a UNet step / VAE decode on an SD 1.5
//! architecture with random weights, forward and (where marked) forward + backward.
//!
//! `cargo bench --bench ops -- [CASE ...]` runs the named cases (all when none are given) and
//! prints one JSON line per case: `{"case", "secs", "reps"}`. `scripts/bench_ops.py` runs
//! the same cases in PyTorch, interleaved with this binary, and prints the ratios.

use std::time::Instant;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdserve::noise::NoiseRng;
use sdserve::lora::LoraSet;
use sdserve::model::config::{UNetConfig, VaeConfig};
use sdserve::model::nn::{self, GroupNorm};
use sdserve::model::unet::{Conditioning, UNet2DConditionModel};
use sdserve::model::vae::AutoencoderKL;

/// Random frozen weights (uniform in ±1/√fan_in; norms at 1 and 0), generated per tensor.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let dims = s.dims();
        let is_norm = name.contains("norm");
        if is_norm && name.ends_with("weight") {
            return Tensor::ones(s, dtype, dev);
        }
        if name.ends_with("bias") {
            return Tensor::zeros(s, dtype, dev);
        }
        let fan_in: usize = if dims.len() >= 2 { dims[1..].iter().product() } else { dims[0] };
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let mut state = name.bytes().fold(0x9e3779b97f4a7c15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        let data: Vec<f32> = (0..s.elem_count())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect();
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn vb() -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu)
}

fn randn(seed: u64, shape: impl Into<Shape>) -> Result<Tensor> {
    NoiseRng::new(seed).randn(shape, DType::F32, &Device::Cpu)
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Times `f` (after one warm-up) and prints a JSON line with wall and CPU seconds per run.
fn time(case: &str, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    f()?;
    let (start, cpu) = (Instant::now(), cpu_seconds());
    for _ in 0..reps {
        f()?;
    }
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    let cpu = (cpu_seconds() - cpu) / reps as f64;
    println!("{{\"case\": \"{case}\", \"secs\": {secs:.6}, \"cpu\": {cpu:.3}, \"reps\": {reps}}}");
    Ok(())
}

/// `loss = Σ out · r` for a fixed random `r`, so the backward pass sees a dense gradient.
fn backward_through(out: &Tensor, r: &Tensor) -> Result<()> {
    (out * r)?.sum_all()?.backward()?;
    Ok(())
}

fn run(case: &str) -> Result<()> {
    match case {
        "attention" | "attention_bwd" => {
            let [q, k, v] = [1, 2, 3].map(|s| randn(s, (2, 8, 4096, 40)));
            let (q, k, v) = (Var::from_tensor(&q?)?, Var::from_tensor(&k?)?, Var::from_tensor(&v?)?);
            if case == "attention" {
                let (q, k, v) = (q.as_detached_tensor(), k.as_detached_tensor(), v.as_detached_tensor());
                time(case, 3, || nn::attention(&q, &k, &v, None, false).map(drop))
            } else {
                let r = randn(4, (2, 8, 4096, 40))?;
                time(case, 2, || backward_through(&nn::attention(&q, &k, &v, None, false)?, &r))
            }
        }
        "groupnorm_silu_320" | "groupnorm_silu_128" | "groupnorm_silu_320_bwd" => {
            let (shape, c) = if case.contains("128") { ((1, 128, 512, 512), 128) } else { ((2, 320, 64, 64), 320) };
            let gn = GroupNorm::new(vb().pp("norm"), 32, c, 1e-6)?;
            let x = randn(5, shape)?;
            if case.ends_with("bwd") {
                let x = Var::from_tensor(&x)?;
                let r = randn(6, shape)?;
                time(case, 5, || backward_through(&gn.forward_silu(&x)?, &r))
            } else {
                time(case, 5, || gn.forward_silu(&x).map(drop))
            }
        }
        "conv3x3_320" | "conv3x3_320_bwd" => {
            let conv = nn::Conv2d::new(vb().pp("conv"), 320, 320, 3, 1, 1, true)?;
            let x = randn(7, (2, 320, 64, 64))?;
            if case.ends_with("bwd") {
                let x = Var::from_tensor(&x)?;
                let r = randn(8, (2, 320, 64, 64))?;
                time(case, 3, || backward_through(&conv.forward(&x, LoraSet::none())?, &r))
            } else {
                time(case, 5, || conv.forward(&x, LoraSet::none()).map(drop))
            }
        }
        "unet_512" | "unet_256" => {
            let cfg: UNetConfig = serde_json::from_value(sdserve::pretrain::sd15::unet_config()).map_err(candle_core::Error::wrap)?;
            let unet = UNet2DConditionModel::new(vb(), &cfg).map_err(candle_core::Error::wrap)?;
            let side = if case == "unet_512" { 64 } else { 32 };
            let x = randn(9, (2, 4, side, side))?;
            let ctx = Conditioning::text(randn(10, (2, 77, 768))?);
            time(case, 1, || unet.forward(&x, 500.0, &ctx, LoraSet::none()).map(drop))
        }
        "vae_decode_512" | "vae_decode_256" => {
            let cfg: VaeConfig = serde_json::from_value(sdserve::pretrain::sd15::vae_config()).map_err(candle_core::Error::wrap)?;
            let vae = AutoencoderKL::new(vb(), &cfg).map_err(candle_core::Error::wrap)?;
            let side = if case == "vae_decode_512" { 64 } else { 32 };
            let z = randn(11, (1, 4, side, side))?;
            time(case, 1, || vae.decode(&z).map(drop))
        }
        other => candle_core::bail!("unknown case {other}"),
    }
}

const ALL: &[&str] = &[
    "attention",
    "attention_bwd",
    "groupnorm_silu_320",
    "groupnorm_silu_320_bwd",
    "groupnorm_silu_128",
    "conv3x3_320",
    "conv3x3_320_bwd",
    "unet_256",
    "vae_decode_256",
    "unet_512",
    "vae_decode_512",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let cases: Vec<&str> = if args.is_empty() { ALL.to_vec() } else { args.iter().map(String::as_str).collect() };
    for case in cases {
        run(case)?;
    }
    Ok(())
}
