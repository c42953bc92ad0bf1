//! Timings on the fixture model: one UNet step, a 20-step 64×64 generation and one truncated
//! AlignProp step (K = 1 and K = 2), each with its peak heap use.
//!
//! Run with `cargo bench --bench engine`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use sdserve::align::backprop::{full_graph, recompute, Objective, Trajectory};
use sdserve::engine::pipeline::{to_pixels, GenerateParams, StableDiffusion};
use sdserve::noise::NoiseRng;
use sdserve::engine::scheduler::Ddim;
use sdserve::lora::{LoraSet, PipelineLora, TrainableLora};
use sdserve::memory::PeakAlloc;
use sdserve::rewards::{pixel::Brightness, Reward};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc::new();

/// Runs `f` `reps` times after one warm-up; prints the mean seconds and peak heap growth.
fn bench(name: &str, reps: usize, mut f: impl FnMut()) {
    f();
    let base = ALLOC.current();
    ALLOC.reset_peak();
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    let peak_mb = (ALLOC.peak() - base) as f64 / 1e6;
    println!("{name:<44} {secs:>9.4} s   peak +{peak_mb:>8.1} MB");
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    let sd = StableDiffusion::load(&dir, &Device::Cpu, DType::F32)?;
    println!("fixture model {}, {} threads", dir.display(), candle_core::utils::get_num_threads());

    let cond = sd.conditioning("two red circles and a blue square", None, 7.5, (64, 64), &PipelineLora::default())?;
    let latents = NoiseRng::new(0).randn((2, 4, 16, 16), DType::F32, &Device::Cpu)?;
    bench("unet step (batch 2, 16x16 latent)", 10, || {
        sd.unet.forward(&latents, 500.0, &cond, LoraSet::none()).unwrap();
    });

    let params = GenerateParams::new("two red circles and a blue square", 1, 64, 64);
    bench("generation 64x64, 20 DDIM steps, cfg 7.5", 3, || {
        sd.generate(&params, &PipelineLora::default(), &mut |_, _| Ok(())).unwrap();
    });

    let targets = sdserve::align::attention_targets(&sd.lora_targets);
    let lora = TrainableLora::new(&targets, 4, 4.0, &mut NoiseRng::new(3), DType::F32, &Device::Cpu)?;
    let scheduler = Ddim::new(&sd.scheduler_config, 10, 0.0)?;
    let traj = Trajectory { unet: &sd.unet, scheduler: &scheduler, cond: &cond, guidance_scale: 7.5, step_noise: vec![] };
    let score = |decoded: &candle_core::Tensor| {
        let r = Brightness.score(&to_pixels(decoded)?, &[])?;
        Ok((r.mean_all()?.neg()?, r))
    };
    let decoder = sd.vae.scaled_decoder();
    let objective = Objective { decoder: &decoder, score: &score };
    let x_t = NoiseRng::new(4).randn((1, 4, 16, 16), DType::F32, &Device::Cpu)?;
    for k in [1, 2] {
        bench(&format!("truncated training step, 10 steps, K={k}"), 2, || {
            recompute(&traj, &lora, &x_t, &[k], &objective).unwrap();
        });
        bench(&format!("  same, one graph through all K={k} steps"), 2, || {
            full_graph(&traj, &lora, &x_t, k, &objective).unwrap();
        });
    }
    Ok(())
}
