//! LoRA gradients through UNet step → DDIM update → VAE decode → reward are correct: f64
//! finite-difference checks (SD 1.x and SDXL UNets), and the layer-by-layer recompute (also
//! of a batch of trajectories) equals full-graph backprop.

mod common;
#[path = "common/training.rs"]
mod training;

use candle_core::{DType, Device, Tensor};
use sdserve::align::attention_targets;
use sdserve::align::backprop::{full_graph, recompute, Backprop, Objective, Trajectory};
use sdserve::noise::NoiseRng;
use sdserve::engine::scheduler::Ddim;
use sdserve::lora::TrainableLora;
use sdserve::model::unet::{AddedConditions, Conditioning};

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
fn score(decoded: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let img = ((decoded / 2.0)? + 0.5)?;
    let r = img.sqr()?.flatten_from(1)?.mean(1)?;
    Ok((r.mean_all()?.neg()?, r))
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
    let decoder = fx.vae.scaled_decoder();
    let obj = Objective { decoder: &decoder, score: &score };
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

/// Relative L2 distance between two gradient lists.
fn rel_err(a: &[Tensor], b: &[Tensor]) -> f64 {
    let num = a.iter().zip(b).map(|(x, y)| (x - y).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()).sum::<f64>();
    let den = dot(a, a);
    assert!(den > 0.0, "zero gradient");
    (num / den).sqrt()
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

/// The layer-by-layer recompute gives the full graph's loss and gradient.
fn check_recompute(fx: &training::TrainingFixture) {
    let lora = adapter(fx);
    let scheduler = Ddim::new(&fx.scheduler, 4, 0.0).unwrap();
    let traj = Trajectory { unet: &fx.unet, scheduler: &scheduler, cond: &fx.cond, guidance_scale: 3.0, step_noise: vec![] };
    let x_t = NoiseRng::new(2).randn((1, 4, 8, 8), DType::F64, &Device::Cpu).unwrap();
    let decoder = fx.vae.scaled_decoder();
    let obj = Objective { decoder: &decoder, score: &score };
    let full = full_graph(&traj, &lora, &x_t, 3, &obj).unwrap();
    let chained = recompute(&traj, &lora, &x_t, &[3], &obj).unwrap();
    assert_eq!(full.loss, chained.loss);
    let rel = rel_err(&full.grads, &chained.grads);
    println!("layer-by-layer recompute vs full graph: relative L2 error {rel:.2e}");
    assert!(rel <= 1e-12, "relative L2 error {rel:e}");
}

#[test]
fn recompute_equals_full_graph_f64() {
    check_recompute(&training::training_fixture(DType::F64));
}

#[test]
fn sdxl_recompute_equals_full_graph_f64() {
    check_recompute(&training::sdxl_training_fixture(DType::F64));
}

/// Two trajectories sharing every UNet call, with DDIM noise (eta 1) and a different
/// truncation each, give the mean of their separate full-graph gradients.
fn check_batched_recompute(fx: &training::TrainingFixture) {
    let lora = adapter(fx);
    let scheduler = Ddim::new(&fx.scheduler, 4, 1.0).unwrap();
    let mut rng = NoiseRng::new(3);
    let starts: Vec<Tensor> = (0..2).map(|_| rng.randn((1, 4, 8, 8), DType::F64, &Device::Cpu).unwrap()).collect();
    let noises: Vec<Vec<Tensor>> = (0..2).map(|_| (0..4).map(|_| rng.randn((1, 4, 8, 8), DType::F64, &Device::Cpu).unwrap()).collect()).collect();
    // A second prompt: the fixture's conditional row with its text embeddings scaled.
    let uncond = fx.cond.narrow(0, 1).unwrap();
    let prompt = fx.cond.narrow(1, 1).unwrap();
    let other = Conditioning {
        context: (&prompt.context * 0.7).unwrap(),
        added: prompt.added.as_ref().map(|a| AddedConditions { text_embeds: (&a.text_embeds * 0.7).unwrap(), time_ids: a.time_ids.clone() }),
    };
    let prompts = [prompt, other];
    let decoder = fx.vae.scaled_decoder();
    let obj = Objective { decoder: &decoder, score: &score };
    let ks = [1, 3];

    let separate: Vec<Backprop> = (0..2)
        .map(|b| {
            let cond = Conditioning::cat(&[uncond.clone(), prompts[b].clone()]).unwrap();
            let step_noise = noises[b].iter().cloned().map(Some).collect();
            let traj = Trajectory { unet: &fx.unet, scheduler: &scheduler, cond: &cond, guidance_scale: 3.0, step_noise };
            full_graph(&traj, &lora, &starts[b], ks[b], &obj).unwrap()
        })
        .collect();
    let cond = Conditioning::cat(&[uncond.clone(), uncond, prompts[0].clone(), prompts[1].clone()]).unwrap();
    let step_noise = (0..4).map(|i| Some(Tensor::cat(&[&noises[0][i], &noises[1][i]], 0).unwrap())).collect();
    let traj = Trajectory { unet: &fx.unet, scheduler: &scheduler, cond: &cond, guidance_scale: 3.0, step_noise };
    let batched = recompute(&traj, &lora, &Tensor::cat(&starts, 0).unwrap(), &ks, &obj).unwrap();

    let mean_loss = (separate[0].loss + separate[1].loss) / 2.0;
    assert!((batched.loss - mean_loss).abs() <= 1e-12 * mean_loss.abs(), "{} vs {mean_loss}", batched.loss);
    assert_eq!(batched.rewards.len(), 2);
    for (b, sep) in separate.iter().enumerate() {
        assert!((batched.rewards[b] - sep.rewards[0]).abs() <= 1e-12, "reward {b}");
    }
    let mean: Vec<Tensor> = separate[0].grads.iter().zip(&separate[1].grads).map(|(a, b)| ((a + b).unwrap() / 2.0).unwrap()).collect();
    let rel = rel_err(&mean, &batched.grads);
    println!("batched recompute (k = 1 and 3, eta 1) vs separate full graphs: relative L2 error {rel:.2e}");
    assert!(rel <= 1e-12, "relative L2 error {rel:e}");
}

#[test]
fn batched_recompute_equals_separate_full_graphs_f64() {
    check_batched_recompute(&training::training_fixture(DType::F64));
}

#[test]
fn sdxl_batched_recompute_equals_separate_full_graphs_f64() {
    check_batched_recompute(&training::sdxl_training_fixture(DType::F64));
}
