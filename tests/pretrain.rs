//! `sdserve pretrain` on a few steps: it writes a diffusers-layout model the ordinary loader
//! reads, and a second run resumes where the first stopped.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::TempDir;
use sdserve::engine::image::to_rgb;
use sdserve::engine::pipeline::{GenerateParams, StableDiffusion};
use sdserve::lora::PipelineLora;
use sdserve::pretrain::{self, PretrainArgs};
use serde_json::Value;

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn steps(model: &Path, stage: &str) -> u64 {
    json(&model.join(stage).join("train_state.json"))["step"].as_u64().unwrap()
}

#[test]
fn pretrain_writes_a_loadable_model_and_resumes() {
    let tmp = TempDir::new("pretrain");
    let out = tmp.0.join("model");
    let mut args = PretrainArgs {
        out: out.clone(),
        vae_steps: 2,
        vae_batch: 2,
        vae_crop: 16,
        unet_steps: 2,
        unet_decay_steps: 1,
        unet_batch: 2,
        lr: 1e-3,
        seed: 0,
    };
    pretrain::run(&args).unwrap();
    assert_eq!((steps(&out, "vae"), steps(&out, "unet")), (2, 2));
    let scale = json(&out.join("vae/config.json"))["scaling_factor"].as_f64().unwrap();
    assert!(scale.is_finite() && scale > 0.0 && scale != 1.0, "scaling_factor {scale}");

    // transformers' `CLIPTextModel` keys only, as in SD's text encoder.
    let text = candle_core::safetensors::load(out.join("text_encoder/model.safetensors"), &Device::Cpu).unwrap();
    assert!(text.keys().all(|k| k.starts_with("text_model.")), "{:?}", text.keys().collect::<Vec<_>>());

    let vae_file = out.join("vae/diffusion_pytorch_model.safetensors");
    let unet_file = out.join("unet/diffusion_pytorch_model.safetensors");
    let (vae_before, unet_before) = (std::fs::read(&vae_file).unwrap(), std::fs::read(&unet_file).unwrap());
    args.unet_steps = 3;
    pretrain::run(&args).unwrap();
    assert_eq!((steps(&out, "vae"), steps(&out, "unet")), (2, 3));
    assert_eq!(std::fs::read(&vae_file).unwrap(), vae_before, "a finished stage must not train again");
    assert_ne!(std::fs::read(&unet_file).unwrap(), unet_before, "the resumed stage must train on");

    let sd = StableDiffusion::load(&out, &Device::Cpu, DType::F32).unwrap();
    let params = GenerateParams { steps: 2, ..GenerateParams::new("two red circles and one blue square", 1, 64, 64) };
    let img = to_rgb(&sd.generate(&params, &PipelineLora::default(), &mut |_, _| Ok(())).unwrap()).unwrap();
    assert_eq!(img.dimensions(), (64, 64));
}
