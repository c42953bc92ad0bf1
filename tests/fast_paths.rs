//! The CPU kernels of `model::ops` and the composed candle ops they replace (the path on
//! other devices, forced here by `with_composed_ops`) give the same fixture (SD 1.x and SDXL)
//! text encoder, UNet and VAE outputs, with and without an autograd graph, and the same gradients.

mod common;
#[path = "common/training.rs"]
mod training;

use candle_core::{DType, Device, Tensor, Var};
use sdserve::noise::NoiseRng;
use sdserve::engine::pipeline::StableDiffusion;
use sdserve::lora::{LoraSet, PipelineLora};
use sdserve::model::unet::Conditioning;
use sdserve::model::ops::with_composed_ops;

/// Largest absolute difference relative to the largest magnitude of `b`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scalar = |t: Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let diff = scalar((a - b).unwrap().abs().unwrap().max_all().unwrap());
    diff / scalar(b.abs().unwrap().max_all().unwrap()).max(1e-30)
}

/// Runs `f` four ways: kernels / composed ops, each without and with an autograd graph on
/// its input; returns the three outputs that differ from the plain kernel run, and that run.
fn four_ways(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, [Tensor; 3]) {
    let var = Var::from_tensor(x).unwrap();
    let fast = f(x);
    let fast_graph = f(var.as_tensor());
    let composed = with_composed_ops(|| f(x));
    let composed_graph = with_composed_ops(|| f(var.as_tensor()));
    (fast, [fast_graph, composed, composed_graph])
}

#[test]
fn kernels_and_composed_ops_agree_on_the_fixture_models() {
    let sd = StableDiffusion::load(&common::fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let ids = Tensor::new(sd.tokenizer.encode("a red circle").unwrap(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let text = sd.text_encoder.forward(&ids, LoraSet::none()).unwrap();
    let composed = with_composed_ops(|| sd.text_encoder.forward(&ids, LoraSet::none()).unwrap());
    assert!(rel_diff(&text, &composed) < 1e-5, "text encoder: {}", rel_diff(&text, &composed));
    check_unet(&sd, &Conditioning::text(Tensor::cat(&[&text, &text], 0).unwrap()), "unet");

    let z = NoiseRng::new(2).randn((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let (fast, others) = four_ways(&z, |z| sd.vae.decode(z).unwrap());
    for (name, o) in ["vae with graph", "vae composed", "vae composed with graph"].iter().zip(&others) {
        assert!(rel_diff(o, &fast) < 1e-5, "{name}: {}", rel_diff(o, &fast));
    }

    // SDXL: the added text/time embedding, two transformer layers per block, both encoders.
    let xl = StableDiffusion::load(&common::sdxl_fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let cond = xl.conditioning("a red circle", None, 5.0, (64, 64), &PipelineLora::default()).unwrap();
    let composed = with_composed_ops(|| xl.conditioning("a red circle", None, 5.0, (64, 64), &PipelineLora::default()).unwrap());
    assert!(rel_diff(&cond.context, &composed.context) < 1e-5, "sdxl text encoders: {}", rel_diff(&cond.context, &composed.context));
    check_unet(&xl, &cond, "sdxl unet");
}

/// The UNet on batch-2 latents agrees four ways.
fn check_unet(sd: &StableDiffusion, cond: &Conditioning, what: &str) {
    let latents = NoiseRng::new(1).randn((2, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let (fast, others) = four_ways(&latents, |x| sd.unet.forward(x, 500.0, cond, LoraSet::none()).unwrap());
    for (name, o) in ["with graph", "composed", "composed with graph"].iter().zip(&others) {
        assert!(rel_diff(o, &fast) < 1e-5, "{what} {name}: {}", rel_diff(o, &fast));
    }
}

/// Gradients of a reward-like loss through UNet → VAE decode (batch 2) w.r.t. the latents and
/// the text embeddings (cross-attention keys and values) are the same through the kernels'
/// backward passes and through the composed ops' (f64), on the SD 1.x and the SDXL fixture.
/// Batch 2 matters: candle-nn's linear layer on strided batched input (the VAE attention's
/// tokens) has a wrong input gradient.
#[test]
fn kernels_and_composed_ops_give_the_same_gradients() {
    for (fixture, fx) in [("sd1", training::training_fixture(DType::F64)), ("sdxl", training::sdxl_training_fixture(DType::F64))] {
        let latents = Var::from_tensor(&NoiseRng::new(3).randn((2, 4, 8, 8), DType::F64, &Device::Cpu).unwrap()).unwrap();
        let context = Var::from_tensor(&fx.cond.context).unwrap();
        let cond = Conditioning { context: context.as_tensor().clone(), added: fx.cond.added.clone() };
        let grads = || {
            let eps = fx.unet.forward(latents.as_tensor(), 700.0, &cond, LoraSet::none()).unwrap();
            let img = fx.vae.decode(&(latents.as_tensor() - eps).unwrap()).unwrap();
            let loss = img.sqr().unwrap().mean_all().unwrap();
            let store = loss.backward().unwrap();
            [&latents, &context].map(|v| store.get(v).unwrap().clone())
        };
        let fast = grads();
        let composed = with_composed_ops(grads);
        for (name, (a, b)) in ["latents", "context"].iter().zip(fast.iter().zip(&composed)) {
            let d = rel_diff(a, b);
            println!("{fixture} {name}: relative difference {d:.2e}");
            // Not 1e-12: candle's gelu_erf backward rounds 1/√(2π) to 0.398942.
            assert!(d < 2e-7, "{fixture} {name}: {d}");
        }
    }
}

/// f16 keeps working: the norms, softmax and attention run their f32 kernels on upcast
/// inputs, the rest in f16; the fixture UNet and VAE stay close to f32. (bf16 cannot run on
/// the CPU: candle has no bf16 CPU matmul.)
#[test]
fn half_precision_stays_close_to_f32() {
    let run = |dtype: DType| {
        let fx = training::training_fixture(dtype);
        let x = NoiseRng::new(6).randn((2, 4, 8, 8), DType::F32, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let eps = fx.unet.forward(&x, 500.0, &fx.cond, LoraSet::none()).unwrap();
        let img = fx.vae.decode(&x.narrow(0, 0, 1).unwrap()).unwrap();
        [eps, img].map(|t| t.to_dtype(DType::F32).unwrap())
    };
    let full = run(DType::F32);
    for (dtype, tol) in [(DType::F16, 1e-2)] {
        for (name, (a, b)) in ["unet", "vae"].iter().zip(run(dtype).iter().zip(&full)) {
            let d = rel_diff(a, b);
            println!("{dtype:?} {name}: {d:.2e}");
            assert!(d < tol, "{dtype:?} {name}: {d}");
        }
    }
}
