//! Scheduler checks against diffusers' values and an oracle denoiser.

use candle_core::{DType, Device, Tensor};

use super::*;

fn sd_config() -> SchedulerConfig {
    serde_json::from_str(
        r#"{"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear","steps_offset":1,
            "set_alpha_to_one":false,"clip_sample":false,"num_train_timesteps":1000}"#,
    )
    .unwrap()
}

fn tensors() -> (Tensor, Tensor) {
    let mut rng = NoiseRng::new(3);
    let x0 = rng.randn((1, 4, 4, 4), DType::F64, &Device::Cpu).unwrap();
    let noise = rng.randn((1, 4, 4, 4), DType::F64, &Device::Cpu).unwrap();
    (x0, noise)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn ddim_recovers_x0_from_an_exact_noise_prediction() {
    let mut cfg = sd_config();
    cfg.set_alpha_to_one = true;
    let (x0, noise) = tensors();
    for eta in [0.0, 1.0] {
        let mut s = Ddim::new(&cfg, 10, eta).unwrap();
        let mut rng = NoiseRng::new(1);
        let mut x = noise.clone();
        for i in 0..s.timesteps().len() {
            let (a, _) = s.alphas(i);
            let eps = ((&x - (&x0 * a.sqrt()).unwrap()).unwrap() / (1.0 - a).sqrt()).unwrap();
            x = Scheduler::step(&mut s, &eps, i, &x, &mut rng).unwrap();
        }
        assert!(max_diff(&x, &x0) < 1e-9, "eta {eta}: {}", max_diff(&x, &x0));
    }
}

#[test]
fn ddim_step_matches_the_formula() {
    let cfg = sd_config();
    let s = Ddim::new(&cfg, 10, 0.0).unwrap();
    let (x, eps) = tensors();
    let out = s.step_pure(&eps, 0, &x, None).unwrap();
    let (a_t, a_prev) = s.alphas(0);
    assert_eq!(s.timesteps()[0], 901.0);
    let ac = schedule::alphas_cumprod(&cfg).unwrap();
    assert_eq!((a_t, a_prev), (ac[901], ac[801]));
    let x0 = ((&x - (&eps * (1.0 - a_t).sqrt()).unwrap()).unwrap() / a_t.sqrt()).unwrap();
    let expected = ((x0 * a_prev.sqrt()).unwrap() + (eps * (1.0 - a_prev).sqrt()).unwrap()).unwrap();
    assert!(max_diff(&out, &expected) < 1e-12);
}

#[test]
fn v_prediction_ddim_recovers_x0() {
    let mut cfg = sd_config();
    cfg.set_alpha_to_one = true;
    cfg.prediction_type = "v_prediction".into();
    let (x0, noise) = tensors();
    let mut s = Ddim::new(&cfg, 5, 0.0).unwrap();
    let mut x = noise.clone();
    let mut rng = NoiseRng::new(1);
    for i in 0..5 {
        let (a, _) = s.alphas(i);
        let eps = ((&x - (&x0 * a.sqrt()).unwrap()).unwrap() / (1.0 - a).sqrt()).unwrap();
        let v = ((eps * a.sqrt()).unwrap() - (&x0 * (1.0 - a).sqrt()).unwrap()).unwrap();
        x = Scheduler::step(&mut s, &v, i, &x, &mut rng).unwrap();
    }
    assert!(max_diff(&x, &x0) < 1e-9);
}

#[test]
fn euler_ancestral_sigmas_and_denoising() {
    let cfg = sd_config();
    let mut s = EulerAncestral::new(&cfg, 10).unwrap();
    let ac = schedule::alphas_cumprod(&cfg).unwrap();
    let sigma_901 = ((1.0 - ac[901]) / ac[901]).sqrt();
    assert!((s.sigmas()[0] - sigma_901).abs() < 1e-5);
    assert_eq!(*s.sigmas().last().unwrap(), 0.0);
    assert!((s.init_noise_sigma() - (sigma_901 * sigma_901 + 1.0).sqrt()).abs() < 1e-4);
    let (x0, noise) = tensors();
    let mut x = (&noise * s.init_noise_sigma()).unwrap();
    let mut rng = NoiseRng::new(2);
    for i in 0..10 {
        let sigma = s.sigmas()[i];
        let eps = ((&x - &x0).unwrap() / sigma).unwrap();
        x = s.step(&eps, i, &x, &mut rng).unwrap();
    }
    assert!(max_diff(&x, &x0) < 1e-9);
}

#[test]
fn dpm_solver_karras_is_monotonic_and_denoises() {
    let cfg = sd_config();
    for karras in [false, true] {
        let mut s = DpmSolverMultistep::new(&cfg, 20, karras).unwrap();
        let sig = s.sigmas().to_vec();
        assert!(sig.windows(2).all(|w| w[0] > w[1]), "{sig:?}");
        assert_eq!(sig[20], 0.0);
        assert!(s.timesteps().windows(2).all(|w| w[0] >= w[1]));
        let (x0, noise) = tensors();
        let mut x = noise.clone();
        let mut rng = NoiseRng::new(2);
        for i in 0..20 {
            let alpha = 1.0 / (sig[i] * sig[i] + 1.0).sqrt();
            let eps = ((&x - (&x0 * alpha).unwrap()).unwrap() / (sig[i] * alpha)).unwrap();
            x = s.step(&eps, i, &x, &mut rng).unwrap();
        }
        assert!(max_diff(&x, &x0) < 1e-9, "karras {karras}: {}", max_diff(&x, &x0));
    }
}

#[test]
fn kinds_parse_and_build() {
    for k in SchedulerKind::ALL {
        assert_eq!(k.as_str().parse::<SchedulerKind>().unwrap(), k);
        assert_eq!(k.build(&sd_config(), 7, 0.0).unwrap().timesteps().len(), 7);
        assert!(k.build(&sd_config(), 0, 0.0).is_err());
    }
    assert!("plms".parse::<SchedulerKind>().is_err());
    assert_eq!(serde_json::to_string(&SchedulerKind::DpmPp2mKarras).unwrap(), "\"dpmpp_2m_karras\"");
}
