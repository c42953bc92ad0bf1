//! The layer-by-layer recompute holds one layer's graph at a time: same gradient as the full
//! graph at lower peak heap use (measured with a counting global allocator).

mod common;
#[path = "common/training.rs"]
mod training;

use candle_core::{DType, Device, Tensor};
use sdserve::align::attention_targets;
use sdserve::align::backprop::{full_graph, recompute, Backprop, Objective, Trajectory};
use sdserve::noise::NoiseRng;
use sdserve::engine::scheduler::Ddim;
use sdserve::lora::TrainableLora;
use sdserve::memory::PeakAlloc;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc::new();

#[test]
fn recompute_uses_less_peak_memory_for_the_same_gradient() {
    let fx = training::training_fixture(DType::F32);
    let lora =
        TrainableLora::new(&attention_targets(&fx.targets), 4, 4.0, &mut NoiseRng::new(3), DType::F32, &Device::Cpu)
            .unwrap();
    let scheduler = Ddim::new(&fx.scheduler, 4, 0.0).unwrap();
    let traj = Trajectory { unet: &fx.unet, scheduler: &scheduler, cond: &fx.cond, guidance_scale: 7.5, step_noise: vec![] };
    let x_t = NoiseRng::new(4).randn((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let score = |decoded: &Tensor| {
        let r = ((decoded / 2.0)? + 0.5)?.flatten_from(1)?.mean(1)?;
        Ok((r.mean_all()?.neg()?, r))
    };
    let decoder = fx.vae.scaled_decoder();
    let obj = Objective { decoder: &decoder, score: &score };
    let measure = |f: &dyn Fn() -> Backprop| {
        let base = ALLOC.current();
        ALLOC.reset_peak();
        let out = f();
        (out, ALLOC.peak() - base)
    };
    let (full, full_peak) = measure(&|| full_graph(&traj, &lora, &x_t, 3, &obj).unwrap());
    let (chained, chained_peak) = measure(&|| recompute(&traj, &lora, &x_t, &[3], &obj).unwrap());
    println!("peak heap: full graph {:.1} MB, recompute {:.1} MB", full_peak as f64 / 1e6, chained_peak as f64 / 1e6);
    let mut worst: f32 = 0.0;
    for (a, b) in full.grads.iter().zip(&chained.grads) {
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        worst = worst.max(diff / scale);
    }
    println!("largest relative gradient difference {worst:.2e}");
    assert!(worst <= 1e-3, "gradients differ: {worst:e}");
    assert!(chained_peak < full_peak, "recompute peak {chained_peak} >= full graph peak {full_peak}");
}
