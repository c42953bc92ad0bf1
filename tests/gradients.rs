//! LoRA gradients through UNet step → DDIM update → VAE decode → reward are correct: f64
//! finite-difference checks (SD 1.x and SDXL UNets), and the step-by-step recompute equals
//! full-graph backprop.

mod common;
#[path = "common/training.rs"]
mod training;

use candle_core::{DType, Device, Tensor};
use sdserve::align::attention_targets;
use sdserve::align::backprop::{full_graph, recompute, Trajectory};
use sdserve::engine::noise::NoiseRng;
use sdserve::engine::scheduler::Ddim;
use sdserve::lora::TrainableLora;

/// A rank-2 adapter on every attention projection with non-zero `up`, so both factors get
/// gradient.
fn adapter(fx: &training::TrainingFixture) -> TrainableLora {
    let lora =
        TrainableLora::new(&attention_targets(&fx.targets), 2, 2.0, &mut NoiseRng::new(7), DType::F64, &Device::Cpu)
            .unwrap();
    let mut rng = NoiseRng::new(8);
    for m in lora.modules() {
        m.up.set(&(rng.randn(m.up.shape(), DType::F64, &Device::Cpu).unwrap() * 0.1).unwrap()).unwrap();
    }
    lora
}

/// Loss = −mean of a non-linear pixel statistic of the unclamped decode.
fn objective(fx: &training::TrainingFixture) -> impl Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)> + '_ {
    move |x0: &Tensor| {
        let img = ((fx.vae.decode(&(x0 / fx.scaling)?)? / 2.0)? + 0.5)?;
        let r = img.sqr()?.flatten_from(1)?.mean(1)?;
        Ok((r.mean_all()?.neg()?, r))
    }
}

fn dot(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x * y).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()).sum()
}

/// Directional derivatives of the loss along random directions in the down and in the up
/// factors: the analytic gradient against central differences.
fn check_finite_differences(fx: &training::TrainingFixture) {
    let lora = adapter(fx);
    let scheduler = Ddim::new(&fx.scheduler, 2, 0.0).unwrap();
    let traj = Trajectory { unet: &fx.unet, scheduler: &scheduler, cond: &fx.cond, guidance_scale: 3.0, step_noise: vec![] };
    let x_t = NoiseRng::new(1).randn((1, 4, 8, 8), DType::F64, &Device::Cpu).unwrap();
    let obj = objective(fx);
    let bp = full_graph(&traj, &lora, &x_t, 2, &obj).unwrap();

    let vars = lora.vars();
    let mut rng = NoiseRng::new(9);
    // Directions touching only the down (A) factors, then only the up (B) factors.
    for (which, parity) in [("A/down", 0), ("B/up", 1)] {
        let dirs: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let d = rng.randn(v.shape(), DType::F64, &Device::Cpu).unwrap();
                if i % 2 == parity { d } else { d.zeros_like().unwrap() }
            })
            .collect();
        let analytic = dot(&bp.grads, &dirs);
        let originals: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
        let h = 1e-4;
        let loss_at = |eps: f64| {
            for ((v, o), d) in vars.iter().zip(&originals).zip(&dirs) {
                v.set(&(o + (d * eps).unwrap()).unwrap()).unwrap();
            }
            full_graph(&traj, &lora, &x_t, 2, &obj).unwrap().loss
        };
        let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h);
        loss_at(0.0);
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
        println!("{which}: analytic {analytic:.10e} numeric {numeric:.10e} rel err {rel:.2e}");
        assert!(analytic.abs() > 1e-8, "{which}: gradient is zero");
        assert!(rel <= 1e-4, "{which}: relative error {rel:e}");
    }
}

#[test]
fn lora_gradients_match_finite_differences_f64() {
    check_finite_differences(&training::training_fixture(DType::F64));
}

#[test]
fn sdxl_lora_gradients_match_finite_differences_f64() {
    // Through the SDXL UNet: pooled text embedding and time ids in the time embedding, two
    // transformer layers per block, cross-attention over both encoders' states.
    let fx = training::sdxl_training_fixture(DType::F64);
    assert!(fx.unet.takes_added_conditions());
    check_finite_differences(&fx);
}

#[test]
fn recompute_equals_full_graph_f64() {
    let fx = training::training_fixture(DType::F64);
    let lora = adapter(&fx);
    let scheduler = Ddim::new(&fx.scheduler, 4, 0.0).unwrap();
    let traj = Trajectory { unet: &fx.unet, scheduler: &scheduler, cond: &fx.cond, guidance_scale: 3.0, step_noise: vec![] };
    let x_t = NoiseRng::new(2).randn((1, 4, 8, 8), DType::F64, &Device::Cpu).unwrap();
    let obj = objective(&fx);
    let full = full_graph(&traj, &lora, &x_t, 3, &obj).unwrap();
    let chained = recompute(&traj, &lora, &x_t, 3, &obj).unwrap();
    assert_eq!(full.loss, chained.loss);
    let num = full.grads.iter().zip(&chained.grads).map(|(a, b)| (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()).sum::<f64>();
    let den = dot(&full.grads, &full.grads);
    let rel = (num / den).sqrt();
    println!("recompute vs full graph: relative L2 error {rel:.2e}");
    assert!(den > 0.0 && rel <= 1e-10, "relative L2 error {rel:e}");
}
