//! The UNet against diffusers' output for the fixture model.

mod common;

use candle_core::{DType, Device};
use sdserve::lora::LoraSet;
use sdserve::model::config::{read_json, UNetConfig};
use sdserve::model::unet::{Conditioning, UNet2DConditionModel};
use sdserve::model::weights;

fn load(dtype: DType) -> UNet2DConditionModel {
    let dir = common::fixture_dir().join("unet");
    let cfg: UNetConfig = read_json(&dir.join("config.json")).unwrap();
    let vb = weights::open(&dir.join("diffusion_pytorch_model.safetensors"), dtype, &Device::Cpu).unwrap();
    UNet2DConditionModel::new(vb, &cfg).unwrap()
}

#[test]
fn unet_matches_diffusers() {
    let refs = common::components();
    let unet = load(DType::F32);
    let t = refs["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let out = unet.forward(&refs["unet_sample"], t, &Conditioning::text(refs["text_embeddings"].clone()), LoraSet::none()).unwrap();
    let err = common::max_abs_diff(&out, &refs["unet_out"]);
    println!("unet max abs err {err:e}");
    assert!(err <= 1e-4, "unet max abs err {err}");
}

#[test]
fn unet_rejects_wrong_shapes() {
    let dir = common::fixture_dir().join("unet");
    let mut cfg: UNetConfig = read_json(&dir.join("config.json")).unwrap();
    cfg.cross_attention_dim = 48;
    let vb = weights::open(&dir.join("diffusion_pytorch_model.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let err = UNet2DConditionModel::new(vb, &cfg).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}
