//! The CLIP-based rewards (`aesthetic`, `clip_score`, `hps`) on small random checkpoints in
//! the transformers layout, built through the registry: the bilinear resize, scores against
//! direct computations, gradients against finite differences, and missing-file errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};
use sdserve::lora::LoraSet;
use sdserve::model::clip::{ClipTextModel, ClipVisionModel};
use sdserve::model::config::{ClipTextConfig, ClipVisionConfig};
use sdserve::model::tokenizer::ClipTokenizer;
use sdserve::model::weights;
use sdserve::rewards::aesthetic::{AestheticHead, HEAD_FILE};
use sdserve::rewards::clip_input::{bilinear_matrix, pixel_values, CLIP_MEAN, CLIP_STD};
use sdserve::rewards::registry::{build, RewardModels, REWARDS};
use sdserve::rewards::Reward;

const HIDDEN: usize = 32;
const PROJECTION: usize = 16;
const IMAGE_SIZE: usize = 32;
/// `(nn.Sequential index, out, in)` of the aesthetic head's linear layers.
const HEAD: [(usize, usize, usize); 5] = [(0, 1024, PROJECTION), (2, 128, 1024), (4, 64, 128), (6, 16, 64), (7, 1, 16)];

fn vision_json() -> Value {
    json!({
        "hidden_size": HIDDEN, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 8, "hidden_act": "gelu",
    })
}

/// The fixture tokenizer's vocabulary; `num_attention_heads` is left to transformers' default (8).
fn text_json() -> Value {
    json!({ "vocab_size": 576, "hidden_size": HIDDEN, "intermediate_size": 48, "num_hidden_layers": 2 })
}

fn vision_config() -> ClipVisionConfig {
    ClipVisionConfig { projection_dim: Some(PROJECTION), ..serde_json::from_value(vision_json()).unwrap() }
}

fn text_config() -> ClipTextConfig {
    let mut cfg = text_json();
    cfg["num_attention_heads"] = 8.into();
    cfg["projection_dim"] = PROJECTION.into();
    serde_json::from_value(cfg).unwrap()
}

/// Deterministic values in (-1, 1) seeded by `name`.
fn pseudo_random(name: &str, shape: &[usize]) -> Tensor {
    let seed = name.bytes().fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % 10007;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((((i as f64 + 1.0) * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).rem_euclid(1.0) * 2.0 - 1.0) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Matrices scaled by 1/√fan_in, norm weights near 1, other vectors small.
fn random_weight(name: &str, shape: &[usize]) -> Tensor {
    let t = pseudo_random(name, shape);
    if shape.len() > 1 {
        (t / (shape[1..].iter().product::<usize>() as f64).sqrt()).unwrap()
    } else if name.contains("norm") && name.ends_with("weight") {
        ((t * 0.2).unwrap() + 1.0).unwrap()
    } else {
        (t * 0.2).unwrap()
    }
}

/// Writes a random transformers checkpoint into `dir`: a `CLIPModel` with the fixture
/// tokenizer when `text`, else a `CLIPVisionModelWithProjection`. The weights depend only on
/// their names, so every folder holds the same model.
fn write_clip(dir: &Path, text: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    vb.get((PROJECTION, HIDDEN), "visual_projection.weight").unwrap();
    ClipVisionModel::new(vb.clone(), &vision_config()).unwrap();
    let config = if text {
        vb.get((PROJECTION, HIDDEN), "text_projection.weight").unwrap();
        ClipTextModel::new(vb.clone(), &text_config()).unwrap();
        let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1/tokenizer");
        for file in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            std::fs::copy(tokenizer.join(file), dir.join(file)).unwrap();
        }
        json!({
            "architectures": ["CLIPModel"], "projection_dim": PROJECTION,
            "vision_config": vision_json(), "text_config": text_json(),
        })
    } else {
        let mut cfg = vision_json();
        cfg["model_type"] = "clip_vision_model".into();
        cfg["projection_dim"] = PROJECTION.into();
        cfg
    };
    for (name, var) in varmap.data().lock().unwrap().iter() {
        var.set(&random_weight(name, var.dims())).unwrap();
    }
    varmap.save(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Writes the aesthetic head: random, or layer `k` with every weight `constants[k].0` and
/// every bias `constants[k].1`.
fn write_head(dir: &Path, constants: Option<[(f32, f32); 5]>) {
    let mut tensors = HashMap::new();
    for (k, (index, out, inp)) in HEAD.into_iter().enumerate() {
        let (w, b) = match constants {
            Some(c) => (
                Tensor::full(c[k].0, (out, inp), &Device::Cpu).unwrap(),
                Tensor::full(c[k].1, out, &Device::Cpu).unwrap(),
            ),
            None => (random_weight(&format!("w{index}"), &[out, inp]), random_weight(&format!("b{index}"), &[out])),
        };
        tensors.insert(format!("layers.{index}.weight"), w);
        tensors.insert(format!("layers.{index}.bias"), b);
    }
    candle_core::safetensors::save(&tensors, dir.join(HEAD_FILE)).unwrap();
}

/// A reward models folder under the temp dir, removed on drop.
struct TempModels(PathBuf);

impl TempModels {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sdserve-rewards-clip-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn models(&self) -> RewardModels {
        RewardModels::new(&self.0)
    }
}

impl Drop for TempModels {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reward(models: &RewardModels, name: &str) -> Box<dyn Reward> {
    build(&serde_json::from_value(json!({ "reward": name })).unwrap(), models).unwrap()
}

fn build_error(models: &RewardModels, name: &str) -> String {
    let spec = serde_json::from_value(json!({ "reward": name })).unwrap();
    format!("{:#}", build(&spec, models).err().expect("build should fail"))
}

/// `[2, 3, 16, 16]` f64 pixels inside (0.1, 0.9), so the clamp is inactive.
fn images() -> Tensor {
    let v: Vec<f64> = (0..2 * 3 * 16 * 16).map(|i| 0.5 + 0.4 * (i as f64 * 0.37).sin()).collect();
    Tensor::from_vec(v, (2, 3, 16, 16), &Device::Cpu).unwrap()
}

fn prompts() -> Vec<String> {
    vec!["two red circles".into(), "a blue square and a green triangle".into()]
}

fn vision_model(dir: &Path) -> ClipVisionModel {
    let vb = weights::open(&dir.join("model.safetensors"), DType::F64, &Device::Cpu).unwrap();
    ClipVisionModel::new(vb, &vision_config()).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

fn unit(v: &[f64]) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
    }
}

#[test]
fn bilinear_resize_matches_torch() {
    // torch `F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)`: output i
    // reads input position max((i + 0.5)·2/4 − 0.5, 0) = 0, 0.25, 0.75, 1.25 (clamped to the
    // last sample), so each axis maps [a, b] to [a, 0.75a + 0.25b, 0.25a + 0.75b, b] and
    // [[1, 2], [3, 4]] becomes:
    let expected = [
        [1.0, 1.25, 1.75, 2.0],
        [1.5, 1.75, 2.25, 2.5],
        [2.5, 2.75, 3.25, 3.5],
        [3.0, 3.25, 3.75, 4.0],
    ];
    // Channel 0 is [[1, 2], [3, 4]] / 10, channel 1 that plus 0.5, channel 2 is 1.5 (clamped to 1).
    let c0 = [0.1, 0.2, 0.3, 0.4];
    let mut pixels: Vec<f64> = c0.to_vec();
    pixels.extend(c0.iter().map(|v| v + 0.5));
    pixels.extend([1.5; 4]);
    let x = Tensor::from_vec(pixels, (1, 3, 2, 2), &Device::Cpu).unwrap();
    let out = pixel_values(&x, 4).unwrap();
    assert_eq!(out.dims(), &[1, 3, 4, 4]);
    let out: Vec<Vec<Vec<f64>>> = out.squeeze(0).unwrap().to_vec3().unwrap();
    for (c, channel) in out.iter().enumerate() {
        for (i, row) in channel.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let want = [expected[i][j] / 10.0, expected[i][j] / 10.0 + 0.5, 1.0][c];
                let got = v * CLIP_STD[c] + CLIP_MEAN[c];
                assert!((got - want).abs() < 1e-12, "channel {c} ({i}, {j}): {got} vs {want}");
            }
        }
    }

    // Downsampling 5 → 2: positions (0 + 0.5)·2.5 − 0.5 = 0.75 and (1 + 0.5)·2.5 − 0.5 = 3.25.
    let m = bilinear_matrix(5, 2);
    assert_close(&m, &[0.25, 0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.75, 0.25], 1e-15);

    // A 2×4 image: the shorter side is already 2, so only the central 2 columns remain.
    let x = Tensor::from_vec((0..24).map(|i| i as f64 / 24.0).collect::<Vec<_>>(), (1, 3, 2, 4), &Device::Cpu).unwrap();
    let cropped = pixel_values(&x, 2).unwrap();
    let want = pixel_values(&x.narrow(3, 1, 2).unwrap(), 2).unwrap();
    let err = (cropped - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(err < 1e-15, "centre crop differs by {err}");
}

#[test]
fn rewards_are_registered() {
    for name in ["aesthetic", "clip_score", "hps"] {
        assert!(REWARDS.iter().any(|r| r.name == name), "{name} is not in REWARDS");
    }
}

#[test]
fn aesthetic_matches_hand_computation() {
    // With every layer's weights and biases constant, each layer's outputs are equal:
    // for a unit embedding e with S = Σ e_i,
    // h0 = 1·S + 0, h1 = 1024·h0/1024 + 1, h2 = 128·h1/128 + 0, h3 = 64·h2/64 − 1,
    // score = 16·h3/16 + 0.5 = S + 0.5.
    let constants = [(1.0, 0.0), (1.0 / 1024.0, 1.0), (1.0 / 128.0, 0.0), (1.0 / 64.0, -1.0), (1.0 / 16.0, 0.5)];

    // The head alone on embeddings [1, 2, …, 16] (S = 136) and zeros.
    let tmp = TempModels::new("aesthetic-hand");
    let dir = tmp.0.join("aesthetic");
    std::fs::create_dir_all(&dir).unwrap();
    write_head(&dir, Some(constants));
    let vb = weights::open(&dir.join(HEAD_FILE), DType::F64, &Device::Cpu).unwrap();
    let head = AestheticHead::new(vb, PROJECTION).unwrap();
    let x = Tensor::arange(1.0f64, 17.0, &Device::Cpu).unwrap().reshape((1, PROJECTION)).unwrap();
    let x = Tensor::cat(&[&x, &x.zeros_like().unwrap()], 0).unwrap();
    assert_eq!(head.forward(&x).unwrap().to_vec1::<f64>().unwrap(), vec![136.5, 0.5]);

    // The whole reward, on a full CLIPModel checkpoint.
    write_clip(&dir, true);
    let score = reward(&tmp.models(), "aesthetic").score(&images(), &[]).unwrap();
    assert_eq!(score.dims(), &[2]);
    let embeds = vision_model(&dir).image_embeds(&pixel_values(&images(), IMAGE_SIZE).unwrap()).unwrap();
    let want: Vec<f64> = rows(&embeds).iter().map(|e| unit(e).iter().sum::<f64>() + 0.5).collect();
    assert_close(&score.to_vec1().unwrap(), &want, 1e-12);
}

#[test]
fn clip_score_is_the_embedding_cosine() {
    let tmp = TempModels::new("clip-cosine");
    for sub in ["clip", "hps"] {
        write_clip(&tmp.0.join(sub), true);
    }
    let dir = tmp.0.join("clip");
    let image = rows(&vision_model(&dir).image_embeds(&pixel_values(&images(), IMAGE_SIZE).unwrap()).unwrap());
    let vb = weights::open(&dir.join("model.safetensors"), DType::F64, &Device::Cpu).unwrap();
    let text_model = ClipTextModel::new(vb, &text_config()).unwrap();
    let tokenizer = ClipTokenizer::from_dir(&dir).unwrap();
    let ids: Vec<Vec<u32>> = prompts().iter().map(|p| tokenizer.encode(p).unwrap()).collect();
    let text = rows(&text_model.text_embeds(&Tensor::new(ids, &Device::Cpu).unwrap(), LoraSet::none()).unwrap());
    let cosine = |i: usize, t: usize| dot(&unit(&image[i]), &unit(&text[t]));

    let models = tmp.models();
    for name in ["clip_score", "hps"] {
        let r = reward(&models, name);
        assert_eq!(r.name(), name);
        let score = r.score(&images(), &prompts()).unwrap();
        assert_eq!(score.dims(), &[2]);
        assert_close(&score.to_vec1().unwrap(), &[cosine(0, 0), cosine(1, 1)], 1e-12);
        // Each image is paired with its own prompt; cached text embeddings are reused.
        let swapped: Vec<String> = prompts().into_iter().rev().collect();
        let score = r.score(&images(), &swapped).unwrap();
        assert_close(&score.to_vec1().unwrap(), &[cosine(0, 1), cosine(1, 0)], 1e-12);
        // f32 images load the models again in f32.
        let score = r.score(&images().to_dtype(DType::F32).unwrap(), &prompts()).unwrap();
        assert_eq!(score.dtype(), DType::F32);
        assert_close(&rows(&score.unsqueeze(0).unwrap())[0], &[cosine(0, 0), cosine(1, 1)], 1e-4);
        let err = r.score(&images(), &prompts()[..1]).unwrap_err().to_string();
        assert!(err.contains("1 prompts for 2 images"), "{err}");
    }
}

/// The reward's gradient w.r.t. the pixels against central differences (relative error,
/// floored at 1% of the largest gradient entry).
fn check_gradient(r: &dyn Reward, prompts: &[String]) {
    let x = Var::from_tensor(&images()).unwrap();
    let score = r.score(x.as_tensor(), prompts).unwrap();
    assert_eq!(score.dims(), &[2]);
    let grads = score.sum_all().unwrap().backward().unwrap();
    let grad: Vec<f64> = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
    assert!(scale > 0.0, "{}: zero gradient", r.name());
    let base: Vec<f64> = images().flatten_all().unwrap().to_vec1().unwrap();
    let total = |d: f64, idx: usize| {
        let mut v = base.clone();
        v[idx] += d;
        let x = Tensor::from_vec(v, (2, 3, 16, 16), &Device::Cpu).unwrap();
        r.score(&x, prompts).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for idx in [0, 77, 300, 511, 767, 1000, 1300, 1535] {
        let fd = (total(h, idx) - total(-h, idx)) / (2.0 * h);
        worst = worst.max((grad[idx] - fd).abs() / fd.abs().max(0.01 * scale));
    }
    println!("{} gradient max rel err {worst:e}", r.name());
    assert!(worst <= 1e-4, "{} gradient max rel err {worst}", r.name());
}

#[test]
fn gradients_match_finite_differences() {
    let tmp = TempModels::new("gradients");
    // aesthetic from a vision-only checkpoint with a random head.
    write_clip(&tmp.0.join("aesthetic"), false);
    write_head(&tmp.0.join("aesthetic"), None);
    write_clip(&tmp.0.join("clip"), true);
    let models = tmp.models();
    check_gradient(reward(&models, "aesthetic").as_ref(), &[]);
    check_gradient(reward(&models, "clip_score").as_ref(), &prompts());
}

#[test]
fn missing_weights_name_the_path() {
    let err = build_error(&RewardModels::default(), "aesthetic");
    assert!(err.contains("reward aesthetic") && err.contains("reward models folder"), "{err}");

    let tmp = TempModels::new("missing");
    let models = tmp.models();
    for (name, sub) in [("aesthetic", "aesthetic"), ("clip_score", "clip"), ("hps", "hps")] {
        let err = build_error(&models, name);
        let path = tmp.0.join(sub).join("config.json");
        assert!(err.contains(name) && err.contains(&path.display().to_string()), "{err}");
    }

    // Config without weights, then weights without the head.
    let dir = tmp.0.join("aesthetic");
    write_clip(&dir, false);
    std::fs::rename(dir.join("model.safetensors"), tmp.0.join("moved.safetensors")).unwrap();
    let err = build_error(&models, "aesthetic");
    assert!(err.contains(&dir.display().to_string()) && err.contains("model.safetensors"), "{err}");
    std::fs::rename(tmp.0.join("moved.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = build_error(&models, "aesthetic");
    assert!(err.contains(&dir.join(HEAD_FILE).display().to_string()), "{err}");

    // clip_score needs the text tower and the tokenizer.
    let dir = tmp.0.join("clip");
    write_clip(&dir, false);
    let err = build_error(&models, "clip_score");
    assert!(err.contains("clip_score") && err.contains("text_projection"), "{err}");
    write_clip(&dir, true);
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let err = build_error(&models, "clip_score");
    assert!(err.contains(&dir.join("vocab.json").display().to_string()), "{err}");
}
