//! The VAE against diffusers' output for the fixture model.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use sdserve::model::config::{read_json, VaeConfig};
use sdserve::model::vae::AutoencoderKL;
use sdserve::model::weights;

fn config() -> VaeConfig {
    read_json(&common::fixture_dir().join("vae/config.json")).unwrap()
}

fn weight_path() -> std::path::PathBuf {
    weights::find_weights(&common::fixture_dir().join("vae"), "diffusion_pytorch_model").unwrap()
}

fn load(dtype: DType) -> AutoencoderKL {
    let vb = weights::open(&weight_path(), dtype, &Device::Cpu).unwrap();
    AutoencoderKL::new(vb, &config()).unwrap()
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(weight_path(), &Device::Cpu).unwrap()
}

fn from_tensors(ts: HashMap<String, Tensor>) -> anyhow::Result<AutoencoderKL> {
    AutoencoderKL::new(VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu), &config())
}

fn scaled_latents(dtype: DType) -> Tensor {
    let refs = common::components();
    (refs["vae_latents"].to_dtype(dtype).unwrap() / config().scaling_factor).unwrap()
}

#[test]
fn vae_decode_matches_diffusers() {
    let refs = common::components();
    let out = load(DType::F32).decode(&scaled_latents(DType::F32)).unwrap();
    assert_eq!(out.dims(), refs["vae_decoded"].dims());
    let err = common::max_abs_diff(&out, &refs["vae_decoded"]);
    println!("vae decode max abs err {err:e}");
    assert!(err <= 1e-4, "vae decode max abs err {err}");
}

/// Each image of a batch decodes as it does alone (the mid-block attention once mixed up the
/// rows after the first), and `decode_scaled` divides by the scaling factor.
#[test]
fn vae_decodes_every_batch_item_as_alone() {
    let vae = load(DType::F32);
    let latents = common::components()["vae_latents"].clone();
    let other = (latents.flip(&[3]).unwrap() * 0.5).unwrap();
    let batch = vae.decode_scaled(&Tensor::cat(&[&latents, &other], 0).unwrap()).unwrap();
    for (i, z) in [&latents, &other].into_iter().enumerate() {
        let alone = vae.decode(&(z / config().scaling_factor).unwrap()).unwrap();
        let diff = common::max_abs_diff(&alone, &batch.narrow(0, i, 1).unwrap());
        assert!(diff <= 1e-5, "batch item {i} differs by {diff}");
    }
}

#[test]
fn vae_reads_legacy_attention_names() {
    // SD 1.5 / 2.1 files: query/key/value/proj_attn, here stored as 1×1 conv kernels.
    let legacy: HashMap<String, Tensor> = tensors()
        .into_iter()
        .map(|(k, t)| {
            let names = [
                ("to_q.", "query."),
                ("to_k.", "key."),
                ("to_v.", "value."),
                ("to_out.0.", "proj_attn."),
            ];
            match names.iter().find(|(new, _)| k.contains(new)) {
                Some((new, old)) => {
                    let t = if t.rank() == 2 {
                        t.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
                    } else {
                        t
                    };
                    (k.replace(new, old), t)
                }
                None => (k, t),
            }
        })
        .collect();
    assert!(legacy.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let z = scaled_latents(DType::F32);
    let a = from_tensors(legacy).unwrap().decode(&z).unwrap();
    let b = load(DType::F32).decode(&z).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
}

#[test]
fn vae_encoder_shapes_and_values() {
    let vae = load(DType::F32);
    let x = Tensor::rand(-1f32, 1f32, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let dist = vae.encode(&x).unwrap();
    let stored = &common::components()["vae_encoded_mean"];
    assert_eq!(dist.mean.dims(), stored.dims());
    assert_eq!(dist.logvar.dims(), &[1, 4, 16, 16]);
    let finite = |t: &Tensor| {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())
    };
    assert!(finite(&dist.mean) && finite(&dist.logvar));
    let logvar = dist.logvar.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(logvar.iter().all(|v| (-30.0..=20.0).contains(v)));
    // Zero noise samples the mean; the encoder treats batch items independently.
    let sample = dist.sample(&dist.mean.zeros_like().unwrap()).unwrap();
    assert_eq!(common::max_abs_diff(&sample, &dist.mean), 0.0);
    let pair = vae.encode(&Tensor::cat(&[&x, &x.neg().unwrap()], 0).unwrap()).unwrap();
    let first = pair.mean.narrow(0, 0, 1).unwrap();
    let err = common::max_abs_diff(&first, &dist.mean);
    assert!(err <= 1e-5, "batched encode differs by {err}");
    // Round trip: encoding a decoded image gives latents of the decoder's input shape.
    let image = vae.decode(&dist.mean).unwrap();
    assert_eq!(image.dims(), x.dims());
    assert_eq!(vae.encode(&image).unwrap().mean.dims(), dist.mean.dims());
}

#[test]
fn vae_rejects_missing_or_misshaped_weights() {
    let mut missing = tensors();
    missing.remove("decoder.up_blocks.1.resnets.0.conv2.weight").unwrap();
    let err = from_tensors(missing).unwrap_err().to_string();
    assert!(err.contains("conv2"), "{err}");

    let mut misshaped = tensors();
    let key = "encoder.mid_block.attentions.0.to_q.weight";
    let t = misshaped[key].reshape((32, 128)).unwrap();
    misshaped.insert(key.into(), t);
    let err = from_tensors(misshaped).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}

/// `d mean(decode(z)) / dz` from autograd against a central finite difference, in f64.
#[test]
fn vae_decode_is_differentiable() {
    let vae = load(DType::F64);
    let z0 = scaled_latents(DType::F64);
    let loss = |z: &Tensor| vae.decode(z).unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap();
    let z = Var::from_tensor(&z0).unwrap();
    let grads = vae.decode(z.as_tensor()).unwrap().mean_all().unwrap().backward().unwrap();
    let grad = grads.get(z.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let flat = z0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-3;
    for idx in [37, 3 * 256 + 200] {
        let at = |d: f64| {
            let mut v = flat.clone();
            v[idx] += d;
            loss(&Tensor::from_vec(v, z0.dims(), &Device::Cpu).unwrap())
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let rel = (grad[idx] - fd).abs() / fd.abs().max(1e-12);
        println!("vae grad[{idx}] autograd {:e} finite-diff {fd:e} rel err {rel:e}", grad[idx]);
        assert!(rel <= 1e-6, "gradient at {idx}: autograd {} vs finite difference {fd}", grad[idx]);
    }
}

/// diffusers' `enable_tiling()` decode of a latent larger than one tile (two rows of four
/// tiles, the last ones cut short; `scripts/make_vae_tiling_reference.py`).
#[test]
fn vae_tiled_decode_matches_diffusers() {
    let path = common::fixture_dir().join("reference/vae_tiled.safetensors");
    let refs = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let vae = load(DType::F32);
    let tiled = vae.decode_tiled(&refs["latents"]).unwrap();
    let err = common::max_abs_diff(&tiled, &refs["tiled"]);
    println!("tiled decode max abs err {err:e}, tiled vs full {:e}", common::max_abs_diff(&refs["tiled"], &refs["full"]));
    assert!(err <= 1e-4, "tiled decode max abs err {err}");
    let full = vae.decode(&refs["latents"]).unwrap();
    assert!(common::max_abs_diff(&full, &refs["full"]) <= 1e-4);
    // A latent that fits in one tile is decoded whole.
    let small = refs["latents"].narrow(3, 0, 16).unwrap().narrow(2, 0, 16).unwrap();
    assert_eq!(common::max_abs_diff(&vae.decode_tiled(&small).unwrap(), &vae.decode(&small).unwrap()), 0.0);
}

#[test]
fn vae_sliced_decode_equals_batched_decode() {
    let vae = load(DType::F32);
    let z = sdserve::noise::NoiseRng::new(5).randn((3, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = common::max_abs_diff(&vae.decode_sliced(&z).unwrap(), &vae.decode(&z).unwrap());
    assert!(err <= 1e-6, "sliced decode differs by {err}");
}
