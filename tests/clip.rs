//! The CLIP tokenizer and text encoder against transformers' output for the fixture model,
//! and the vision tower's gradient against finite differences.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdserve::lora::{LoraDelta, LoraSet};
use sdserve::model::clip::{ClipTextModel, ClipVisionModel};
use sdserve::model::config::{read_json, ClipTextConfig, ClipVisionConfig};
use sdserve::model::tokenizer::ClipTokenizer;
use sdserve::model::weights;

const PROMPTS: [&str; 2] = ["two red circles and a blue square", ""];

fn text_config() -> ClipTextConfig {
    read_json(&common::fixture_dir().join("text_encoder/config.json")).unwrap()
}

fn text_weights() -> std::path::PathBuf {
    weights::find_weights(&common::fixture_dir().join("text_encoder"), "model").unwrap()
}

fn text_model(dtype: DType) -> ClipTextModel {
    let vb = weights::open(&text_weights(), dtype, &Device::Cpu).unwrap();
    ClipTextModel::new(vb, &text_config()).unwrap()
}

fn input_ids() -> Tensor {
    common::components()["input_ids"].clone()
}

#[test]
fn tokenizer_matches_transformers() {
    let tok = ClipTokenizer::from_dir(&common::fixture_dir().join("tokenizer")).unwrap();
    assert_eq!(tok.max_length(), 77);
    let expected = input_ids().to_vec2::<i64>().unwrap();
    for (prompt, want) in PROMPTS.iter().zip(expected) {
        let ids: Vec<i64> = tok
            .encode(prompt)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ids, want, "{prompt:?}");
    }
}

#[test]
fn text_encoder_matches_transformers() {
    let want = &common::components()["text_embeddings"];
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-4), (DType::F16, 3e-2)] {
        let out = text_model(dtype)
            .forward(&input_ids(), LoraSet::none())
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_eq!(out.dims(), want.dims());
        let err = common::max_abs_diff(&out, want);
        println!("text encoder {dtype:?} max abs err {err:e}");
        assert!(err <= tol, "text encoder {dtype:?} max abs err {err}");
    }
    // u32 ids (as the pipeline passes them) give the same result.
    let ids_u32 = input_ids().to_dtype(DType::U32).unwrap();
    let out = text_model(DType::F32)
        .forward(&ids_u32, LoraSet::none())
        .unwrap();
    assert!(common::max_abs_diff(&out, want) <= 1e-4);
}

#[test]
fn text_encoder_prefixed_layout_and_lora_paths() {
    // SD 1.5 / 2.1 files store the tower under `text_model.`; the fixture (transformers v5) does not.
    let prefixed: HashMap<String, Tensor> =
        candle_core::safetensors::load(text_weights(), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (format!("text_model.{k}"), t))
            .collect();
    let vb = VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu);
    let model = ClipTextModel::new(vb, &text_config()).unwrap();
    let base = text_model(DType::F32)
        .forward(&input_ids(), LoraSet::none())
        .unwrap();
    let out = model.forward(&input_ids(), LoraSet::none()).unwrap();
    assert_eq!(common::max_abs_diff(&out, &base), 0.0);

    // Both layouts look LoRA deltas up under `text_model.`.
    let mut lora = LoraSet::default();
    lora.push(
        "text_model.encoder.layers.0.self_attn.q_proj",
        LoraDelta::low_rank(
            Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones((32, 1), DType::F32, &Device::Cpu).unwrap(),
            0.1,
        ),
    );
    for m in [&model, &text_model(DType::F32)] {
        let out = m.forward(&input_ids(), &lora).unwrap();
        assert!(common::max_abs_diff(&out, &base) > 1e-3);
    }
}

#[test]
fn pooled_output_is_the_first_eos() {
    let model = text_model(DType::F32);
    let ids = input_ids();
    let hidden = model.forward(&ids, LoraSet::none()).unwrap();
    let pooled = model.pooled(&hidden, &ids).unwrap();
    assert_eq!(pooled.dims(), &[2, 32]);
    // The prompt's eos is at 8 (bos + 7 tokens); the empty prompt's at 1.
    for (b, pos) in [(0, 8), (1, 1)] {
        let want = hidden.i((b, pos)).unwrap();
        assert_eq!(common::max_abs_diff(&pooled.i(b).unwrap(), &want), 0.0);
    }
    let err = model.text_embeds(&ids, LoraSet::none()).err().unwrap();
    assert!(err.to_string().contains("text_projection"), "{err}");
}

/// Deterministic pseudo-random weights for any requested name and shape.
struct Synthetic;

impl SimpleBackend for Synthetic {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let seed = name
            .bytes()
            .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let values: Vec<f64> = (0..s.elem_count())
            .map(|i| ((i as f64 + 1.0) * 12.9898 + (seed % 10007) as f64 * 78.233).sin())
            .collect();
        let t = Tensor::from_vec(values, s.clone(), dev)?;
        let is_norm = name.contains("norm") || name.contains("layrnorm");
        let t = match (s.rank(), is_norm && name.ends_with("weight")) {
            (1, true) => ((t * 0.2)? + 1.0)?,
            (1, false) => (t * 0.2)?,
            _ => (t / (s.dims()[1..].iter().product::<usize>() as f64).sqrt())?,
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn vision_config() -> ClipVisionConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 8,
        "patch_size": 4,
        "projection_dim": 8,
        "hidden_act": "quick_gelu",
    }))
    .unwrap()
}

fn vision_model(act: &str) -> ClipVisionModel {
    let vb = VarBuilder::from_backend(Box::new(Synthetic), DType::F64, Device::Cpu);
    let cfg = ClipVisionConfig {
        hidden_act: act.into(),
        ..vision_config()
    };
    ClipVisionModel::new(vb, &cfg).unwrap()
}

fn pixels() -> Tensor {
    let v: Vec<f64> = (0..2 * 3 * 8 * 8)
        .map(|i| (i as f64 * 0.37).sin() * 1.5)
        .collect();
    Tensor::from_vec(v, (2, 3, 8, 8), &Device::Cpu).unwrap()
}

#[test]
fn vision_gradient_matches_finite_differences() {
    for act in ["quick_gelu", "gelu", "gelu_new"] {
        let model = vision_model(act);
        let x = Var::from_tensor(&pixels()).unwrap();
        let embeds = model.image_embeds(x.as_tensor()).unwrap();
        assert_eq!(embeds.dims(), &[2, 8]);
        let grads = embeds.sum_all().unwrap().backward().unwrap();
        let grad = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();

        let grad_scale = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
        let loss = |x: &Tensor| -> f64 {
            model
                .image_embeds(x)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let base = pixels().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-5;
        let mut worst: f64 = 0.0;
        for idx in [0, 37, 100, 191, 250, 383] {
            let shifted = |d: f64| {
                let mut v = base.clone();
                v[idx] += d;
                Tensor::from_vec(v, (2, 3, 8, 8), &Device::Cpu).unwrap()
            };
            let fd = (loss(&shifted(h)) - loss(&shifted(-h))) / (2.0 * h);
            // Relative error, floored at 1% of the largest gradient entry for near-zero entries.
            let rel = (grad[idx] - fd).abs() / fd.abs().max(0.01 * grad_scale);
            worst = worst.max(rel);
        }
        println!("vision {act} gradient max rel err {worst:e}");
        assert!(worst <= 1e-6, "vision {act} gradient max rel err {worst}");
    }
}

#[test]
fn vision_rejects_bad_input() {
    let model = vision_model("quick_gelu");
    let wrong = Tensor::zeros((1, 3, 16, 16), DType::F64, &Device::Cpu).unwrap();
    assert!(model.forward(&wrong).is_err());
    let cfg = ClipVisionConfig {
        hidden_act: "relu6".into(),
        ..vision_config()
    };
    let vb = VarBuilder::from_backend(Box::new(Synthetic), DType::F64, Device::Cpu);
    assert!(ClipVisionModel::new(vb, &cfg).is_err());
}
