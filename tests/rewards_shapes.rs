//! The shapes-data rewards: `object_count` (the committed CNN counts held-out renders, prefers
//! the right count, ignores correctly counted images, exact f64 gradients; `train-counter`
//! learns from a model's samples and resumes) and `prompt_match` (prefers the named colours,
//! exact f64 gradients), and their errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use sdserve::dataset::{Color, Scene, Split};
use sdserve::noise::NoiseRng;
use sdserve::pretrain::Params;
use sdserve::rewards::object_count::{ObjectCount, ObjectCountConfig, ObjectCounter};
use sdserve::rewards::object_count_train::{self, held_out_accuracy, renders, TrainCounterArgs};
use sdserve::rewards::prompt_match::PromptMatch;
use sdserve::rewards::registry::{build, RewardModels, RewardSpec};
use sdserve::rewards::Reward;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rewards")
}

fn committed_counter() -> ObjectCount {
    ObjectCount::load(&models_dir().join(ObjectCount::DIR), &Device::Cpu).unwrap()
}

fn scores(reward: &dyn Reward, images: &Tensor, prompts: &[String]) -> Vec<f32> {
    reward.score(images, prompts).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

fn spec(name: &str) -> RewardSpec {
    RewardSpec { reward: name.into(), weight: 1.0, color: None }
}

/// Checks the gradient of `Σ reward(x)` against a central difference with step `eps` along
/// random directions (f64, relative tolerance 1e-5).
fn check_gradient(reward: &dyn Reward, x: &Tensor, prompts: &[String], eps: f64) {
    let var = Var::from_tensor(x).unwrap();
    let total = |t: &Tensor| reward.score(t, prompts).unwrap().sum_all().unwrap();
    let grads = total(var.as_tensor()).backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap();
    assert!(g.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() > 0.0);
    let mut rng = NoiseRng::new(3);
    for _ in 0..3 {
        let dir = rng.randn(x.shape(), DType::F64, &Device::Cpu).unwrap();
        let plus = total(&(x + (&dir * eps).unwrap()).unwrap()).to_scalar::<f64>().unwrap();
        let minus = total(&(x - (&dir * eps).unwrap()).unwrap()).to_scalar::<f64>().unwrap();
        let numeric = (plus - minus) / (2.0 * eps);
        let analytic = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!((numeric - analytic).abs() <= 1e-5 * analytic.abs() + 1e-10, "numeric {numeric} vs analytic {analytic}");
    }
}

/// A caption naming a count at least two away from `scene`'s.
fn wrong_count_caption(scene: &Scene) -> String {
    if scene.shapes.len() <= 2 { "four red circles" } else { "one red circle" }.to_string()
}

#[test]
fn object_count_counts_held_out_renders() {
    let reward = committed_counter();
    let accuracy = held_out_accuracy(reward.counter(), 2024, 100).unwrap();
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}");
}

#[test]
fn object_count_prefers_the_named_count() {
    let reward = build(&spec("object_count"), &RewardModels::new(models_dir())).unwrap();
    let (images, scenes) = renders(Split::HeldOut, 77, 0, 12, 64, &Device::Cpu).unwrap();
    let right: Vec<String> = scenes.iter().map(Scene::caption).collect();
    let wrong: Vec<String> = scenes.iter().map(wrong_count_caption).collect();
    let (r, w) = (scores(reward.as_ref(), &images, &right), scores(reward.as_ref(), &images, &wrong));
    for i in 0..scenes.len() {
        assert!(r[i] > w[i], "{}: right {} vs wrong {}", right[i], r[i], w[i]);
    }
    assert!(r.iter().sum::<f32>() / r.len() as f32 > -0.5, "{r:?}");
    // 128×128 images are pooled down to the counter's 64×64 input.
    let (big, _) = renders(Split::HeldOut, 77, 0, 12, 128, &Device::Cpu).unwrap();
    let r_big = scores(reward.as_ref(), &big, &right);
    assert!(r_big.iter().zip(&w).all(|(a, b)| a > b), "{r_big:?}");
}

#[test]
fn object_count_leaves_correctly_counted_images_alone() {
    let reward = committed_counter();
    let (images, scenes) = renders(Split::HeldOut, 78, 0, 8, 64, &Device::Cpu).unwrap();
    let counted = reward.counter().expected_count(&images, 1.0).unwrap().to_vec1::<f32>().unwrap();
    let right: Vec<String> = scenes.iter().map(Scene::caption).collect();
    let wrong: Vec<String> = scenes.iter().map(wrong_count_caption).collect();
    for (i, scene) in scenes.iter().enumerate() {
        let image = images.narrow(0, i, 1).unwrap();
        let var = Var::from_tensor(&image).unwrap();
        let reward_and_squared_gradient = |caption: &String| {
            let r = reward.score(var.as_tensor(), std::slice::from_ref(caption)).unwrap();
            let g = r.sum_all().unwrap().backward().unwrap();
            let norm = g.get(var.as_tensor()).map_or(0.0, |g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
            (r.to_vec1::<f32>().unwrap()[0], norm)
        };
        let (r, g) = reward_and_squared_gradient(&right[i]);
        if (counted[i] - scene.shapes.len() as f32).abs() < 0.5 {
            assert_eq!((r, g), (0.0, 0.0), "{}: counted {}", right[i], counted[i]);
        } else {
            assert!(r < 0.0 && g > 0.0, "{}: counted {}, reward {r}", right[i], counted[i]);
        }
        let (r, g) = reward_and_squared_gradient(&wrong[i]);
        assert!(r < -0.5 && g > 0.0, "{}: reward {r}, squared gradient {g}", wrong[i]);
    }
}

#[test]
fn object_count_gradient_matches_finite_differences_f64() {
    let cfg = ObjectCountConfig::default();
    let counter = ObjectCounter::new(Params::new(5).var_builder(DType::F64, &Device::Cpu), &cfg).unwrap();
    let reward = ObjectCount::new(counter);
    let x = NoiseRng::new(1).uniform((2, 3, 128, 128), DType::F64, &Device::Cpu).unwrap();
    // The untrained CNN's gradient is tiny, so a larger step keeps rounding noise below it.
    check_gradient(&reward, &x, &["two red circles".into(), "one blue square and three green triangles".into()], 1e-4);
}

#[test]
fn train_counter_learns_from_model_samples_and_resumes() {
    let tmp = common::TempDir::new("counter");
    let mut args = TrainCounterArgs {
        out: tmp.0.join("object_count"),
        steps: 2,
        batch: 4,
        lr: 2e-3,
        seed: 0,
        eval_samples: 8,
        model: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(sdserve::DEFAULT_MODEL_DIR)),
        model_samples: 3,
        model_eval_samples: 4,
        sample_steps: vec![2],
        sample_guidance: 7.5,
        label_smoothing: 0.1,
    };
    let state = object_count_train::run(&args).unwrap();
    assert_eq!(state.step, 2);
    assert!(state.held_out_accuracy.is_some_and(|a| (0.0..=1.0).contains(&a)), "{state:?}");
    assert!(state.model_agreement.is_some_and(|a| (0.0..=1.0).contains(&a)), "{state:?}");
    let reward = ObjectCount::load(&args.out, &Device::Cpu).unwrap();
    assert_eq!(reward.counter().config(), &ObjectCountConfig::default());
    let first = std::fs::read(args.out.join("model.safetensors")).unwrap();

    args.steps = 3;
    assert_eq!(object_count_train::run(&args).unwrap().step, 3);
    assert_ne!(std::fs::read(args.out.join("model.safetensors")).unwrap(), first, "the resumed run must train on");
}

#[test]
fn prompt_match_prefers_the_named_colours() {
    let (images, scenes) = renders(Split::HeldOut, 78, 0, 12, 64, &Device::Cpu).unwrap();
    let right: Vec<String> = scenes.iter().map(Scene::caption).collect();
    let wrong: Vec<String> = scenes
        .iter()
        .map(|s| {
            let absent = Color::ALL.into_iter().find(|c| s.shapes.iter().all(|p| p.color != *c)).unwrap();
            format!("one {} circle", absent.as_str())
        })
        .collect();
    let (r, w) = (scores(&PromptMatch, &images, &right), scores(&PromptMatch, &images, &wrong));
    for i in 0..scenes.len() {
        assert!(r[i] > 0.9 && w[i] < -0.9, "{}: right {} vs wrong {}", right[i], r[i], w[i]);
    }
}

#[test]
fn prompt_match_gradient_matches_finite_differences_f64() {
    let (images, scenes) = renders(Split::HeldOut, 79, 0, 2, 64, &Device::Cpu).unwrap();
    let noise = (NoiseRng::new(2).randn(images.shape(), DType::F64, &Device::Cpu).unwrap() * 0.05).unwrap();
    let x = (images.to_dtype(DType::F64).unwrap() + noise).unwrap();
    let prompts: Vec<String> = scenes.iter().map(Scene::caption).collect();
    check_gradient(&PromptMatch, &x, &prompts, 1e-6);
}

#[test]
fn bad_prompts_and_inputs_are_errors() {
    let (images, _) = renders(Split::HeldOut, 80, 0, 1, 64, &Device::Cpu).unwrap();
    let counter = committed_counter();
    let err = |r: &dyn Reward, x: &Tensor, p: &str| r.score(x, &[p.to_string()]).unwrap_err().to_string();
    assert!(err(&counter, &images, "a photo of a cat").contains("cannot read a count"));
    assert!(err(&PromptMatch, &images, "two circles").contains("names no colour"));
    assert!(counter.score(&images, &[]).is_err());
    assert!(PromptMatch.score(&images, &["one red circle".into(), "one red circle".into()]).is_err());
    let odd = Tensor::zeros((1, 3, 50, 50), DType::F32, &Device::Cpu).unwrap();
    assert!(err(&counter, &odd, "one red circle").contains("multiple of 64"));

    let no_dir = build(&spec("object_count"), &RewardModels::default()).err().unwrap().to_string();
    assert!(no_dir.contains("reward models folder"), "{no_dir}");
    let empty = std::env::temp_dir().join(format!("sdserve-no-rewards-{}", std::process::id()));
    let missing = build(&spec("object_count"), &RewardModels::new(&empty)).err().unwrap().to_string();
    assert!(missing.contains(&empty.join("object_count").display().to_string()), "{missing}");
}
