//! AlignProp end to end on the fixture model: a short run with a pixel reward raises the
//! reward on evaluation seeds it never trained on, and the saved adapter has diffusers keys;
//! a validated run ends with its best-scoring state.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::TempDir;
use sdserve::align::request::{AlignLimits, AlignRequest};
use sdserve::align::validation::Validator;
use sdserve::align::{attention_targets, runner, trainer};
use sdserve::noise::NoiseRng;
use sdserve::engine::pipeline::StableDiffusion;
use sdserve::lora::{LoraAdapter, LoraSet, PipelineLora, TrainableLora};
use sdserve::rewards::registry::{build_all, RewardModels};
use sdserve::rewards::WeightedRewards;
use serde_json::json;

fn request(body: serde_json::Value) -> AlignRequest {
    serde_json::from_value(body).unwrap()
}

/// Trains `reward` for `steps` on `model` and returns the mean reward on evaluation seeds the
/// run never trained on (training noise comes from the run's seed), before and after, plus
/// the model and the saved adapter file.
fn run(model: &Path, reward: &str, steps: usize, lr: f64, out: &Path) -> (f64, f64, StableDiffusion) {
    let sd = StableDiffusion::load(model, &Device::Cpu, DType::F32).unwrap();
    let req = request(json!({
        "adapter_name": "run",
        "prompts": ["two red circles", "one blue square"],
        "rewards": [{"reward": reward}],
        "steps": steps,
        "learning_rate": lr,
        "sampler_steps": 4,
        "truncation": {"k": 4},
        "guidance_scale": 3.0,
        "width": 32,
        "height": 32,
        "seed": 7
    }));
    let cfg = req.to_config(&AlignLimits::default(), 7, sd.native_size()).unwrap();
    let rewards = build_all(&req.rewards, &RewardModels::default()).unwrap();
    let eval: Vec<(String, u64)> =
        [("two red circles", 90_001), ("one blue square", 90_002), ("three green triangles", 90_003)].map(|(p, s)| (p.to_string(), s)).into();
    let before = trainer::evaluate(&sd, &cfg, &rewards, LoraSet::none(), &eval).unwrap();
    let mut curve = Vec::new();
    let outcome = runner::run(&sd, &req, &cfg, &rewards, None, out, &mut |r| {
        curve.push(r.reward_mean);
        Ok(())
    })
    .unwrap();
    assert_eq!(curve.len(), steps);
    assert_eq!(outcome.metadata["reward_curve"].as_array().unwrap().len(), steps);

    let adapter = LoraAdapter::from_file(out, &sd.lora_targets, &Device::Cpu).unwrap();
    let mut lora = PipelineLora::default();
    adapter.add_to(1.0, &mut lora);
    let after = trainer::evaluate(&sd, &cfg, &rewards, &lora.unet, &eval).unwrap();
    println!("{reward} on held-out seeds of {}: before {before:.5}, after {after:.5}; training curve {curve:?}", model.display());
    (before, after, sd)
}

#[test]
fn fixture_run_improves_held_out_seeds_and_saves_diffusers_keys() {
    // The fixture's random VAE decoder keeps image statistics nearly fixed (its last
    // GroupNorm), so gains are small there, but evaluation is deterministic: any gain is real.
    let tmp = TempDir::new("align");
    let out = tmp.0.join("fixture.safetensors");
    let (before, after, sd) = run(&common::fixture_dir(), "compressibility", 6, 0.01, &out);
    assert!(after > before, "reward did not improve: {before} -> {after}");

    // diffusers `load_lora_weights` keys, one pair per attention projection.
    let bytes = std::fs::read(&out).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let targets = attention_targets(&sd.lora_targets);
    assert_eq!(file.names().len(), 2 * targets.len());
    for (path, in_f, out_f) in &targets {
        let down = file.tensor(&format!("unet.{path}.lora.down.weight")).unwrap();
        let up = file.tensor(&format!("unet.{path}.lora.up.weight")).unwrap();
        assert_eq!(down.shape(), [4, *in_f]);
        assert_eq!(up.shape(), [*out_f, 4]);
    }
}

#[test]
fn default_model_brightness_run_improves_held_out_seeds() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(sdserve::DEFAULT_MODEL_DIR);
    let tmp = TempDir::new("align");
    let (before, after, _) = run(&model, "brightness", 6, 0.01, &tmp.0.join("default.safetensors"));
    assert!(after > before + 0.02, "brightness did not improve enough: {before} -> {after}");
}

#[test]
fn invalid_runs_are_rejected_with_the_field_named() {
    let base = json!({"adapter_name": "x", "prompts": ["a"], "rewards": [{"reward": "brightness"}]});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        request(b)
    };
    let limits = AlignLimits::default();
    for (field, value, param) in [
        ("truncation", json!({"k": 11}), "truncation"),
        ("truncation", json!({"random": [3, 2]}), "truncation"),
        ("steps", json!(0), "steps"),
        ("learning_rate", json!(-1.0), "learning_rate"),
        ("lora_rank", json!(1000), "lora_rank"),
        ("prompts", json!([]), "prompts"),
        ("eta", json!(2.0), "eta"),
        ("validation", json!({"images": 0, "every": 1}), "validation"),
        ("validation", json!({"images": 2, "every": 11}), "validation"),
        ("width", json!(20000), "width"),
        ("height", json!(0), "width"),
    ] {
        let err = with(field, value).to_config(&limits, 0, 64).unwrap_err();
        assert_eq!(err.0, param, "{field}: {}", err.1);
    }
    // The size defaults to the model's native one, per side.
    let native = base.clone();
    assert_eq!(request(native).to_config(&limits, 0, 512).map(|c| (c.width, c.height)).unwrap(), (512, 512));
    assert_eq!(with("width", json!(256)).to_config(&limits, 0, 512).map(|c| (c.width, c.height)).unwrap(), (256, 512));
    let unknown = build_all(&with("rewards", json!([{"reward": "nope"}])).rewards, &RewardModels::default());
    assert!(unknown.err().unwrap().to_string().contains("unknown reward \"nope\""));
    assert!(serde_json::from_value::<AlignRequest>(json!({"adapter_name": "x", "rewards": [], "bogus": 1})).is_err());
}

/// A brightness run on the fixture model that validates on 2 images after every step.
struct Validated {
    sd: StableDiffusion,
    cfg: trainer::AlignConfig,
    rewards: WeightedRewards,
    lora: TrainableLora,
}

impl Validated {
    fn new(steps: usize, seed: u64) -> Self {
        let sd = StableDiffusion::load(&common::fixture_dir(), &Device::Cpu, DType::F32).unwrap();
        let req = request(json!({
            "adapter_name": "v", "prompts": ["two red circles", "one blue square"], "rewards": [{"reward": "brightness"}],
            "steps": steps, "learning_rate": 0.01, "sampler_steps": 3, "truncation": {"k": 3},
            "width": 32, "height": 32, "validation": {"images": 2, "every": 1}
        }));
        let cfg = req.to_config(&AlignLimits::default(), seed, sd.native_size()).unwrap();
        let rewards = build_all(&req.rewards, &RewardModels::default()).unwrap();
        let lora = runner::initial_lora(&sd, &req, None, seed).unwrap();
        Self { sd, cfg, rewards, lora }
    }

    /// The validation reward of the LoRA's current state.
    fn score(&self) -> f64 {
        let cases = Validator::cases(&self.cfg, self.cfg.validation.unwrap());
        trainer::evaluate(&self.sd, &self.cfg, &self.rewards, &self.lora.detached_set(), &cases).unwrap()
    }
}

#[test]
fn validator_restores_the_best_state_it_measured() {
    let run = Validated::new(3, 3);
    let Validated { sd, cfg, rewards, lora } = &run;
    let snapshot = || lora.vars().iter().map(|v| v.as_detached_tensor().copy().unwrap()).collect::<Vec<_>>();
    let set = |state: &[Tensor]| lora.vars().iter().zip(state).for_each(|(v, t)| v.set(t).unwrap());
    let mut validator = Validator::new(sd, cfg, cfg.validation.unwrap(), rewards, lora).unwrap();
    let mut states = vec![snapshot()];
    let mut scores = vec![];
    let mut rng = NoiseRng::new(11);
    for _ in 0..2 {
        for m in lora.modules() {
            m.up.set(&(rng.randn(m.up.shape(), DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap()).unwrap();
        }
        states.push(snapshot());
    }
    // Score the start again (a validator measures its start when built), then both
    // perturbations, then the worst state again, so the best one is never the last measured.
    set(&states[0]);
    scores.push(run.score());
    for (step, state) in states.iter().enumerate().skip(1) {
        set(state);
        scores.push(validator.measure(sd, cfg, rewards, lora, step).unwrap());
    }
    let rank = |pick: fn(f64, f64) -> bool| (0..3).reduce(|a, b| if pick(scores[b], scores[a]) { b } else { a }).unwrap();
    let (best, worst) = (rank(|x, y| x > y), rank(|x, y| x < y));
    assert!(scores[best] > scores[worst], "{scores:?}");
    set(&states[worst]);
    validator.measure(sd, cfg, rewards, lora, 3).unwrap();

    let selection = validator.restore_best(lora).unwrap();
    assert_eq!((selection.step, selection.reward, selection.start_reward), (best, scores[best], scores[0]));
    for (now, kept) in snapshot().iter().zip(&states[best]) {
        assert_eq!(now.to_vec2::<f32>().unwrap(), kept.to_vec2::<f32>().unwrap());
    }
}

#[test]
fn validated_run_reports_validation_and_keeps_the_best() {
    let run = Validated::new(2, 5);
    let mut measured = vec![];
    let outcome = trainer::train(&run.sd, &run.cfg, &run.rewards, &run.lora, &mut |r| {
        measured.push(r.validation_reward.unwrap());
        Ok(())
    })
    .unwrap();
    let selection = outcome.selection.unwrap();
    measured.insert(0, selection.start_reward);
    let best = measured.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(selection.reward, best, "{measured:?}");
    assert_eq!(measured[selection.step], best);
    assert_eq!(run.score(), best);
}
