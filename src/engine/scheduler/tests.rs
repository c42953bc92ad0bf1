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

/// Runs `s` from noise with the exact v-prediction for a fixed x0; returns `(x0, result)`.
fn v_oracle(s: &mut Ddim) -> (Tensor, Tensor) {
    let (x0, noise) = tensors();
    let mut x = noise;
    let mut rng = NoiseRng::new(1);
    for i in 0..s.timesteps().len() {
        let (a, _) = s.alphas(i);
        let eps = ((&x - (&x0 * a.sqrt()).unwrap()).unwrap() / (1.0 - a).sqrt()).unwrap();
        let v = ((eps * a.sqrt()).unwrap() - (&x0 * (1.0 - a).sqrt()).unwrap()).unwrap();
        x = Scheduler::step(s, &v, i, &x, &mut rng).unwrap();
    }
    (x0, x)
}

#[test]
fn ddim_recovers_x0_from_an_exact_noise_prediction() {
    let mut cfg = sd_config();
    cfg.set_alpha_to_one = Some(true);
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
    cfg.set_alpha_to_one = Some(true);
    cfg.prediction_type = "v_prediction".into();
    let (x0, x) = v_oracle(&mut Ddim::new(&cfg, 5, 0.0).unwrap());
    assert!(max_diff(&x, &x0) < 1e-9);
}

#[test]
fn euler_ancestral_sigmas_and_denoising() {
    let mut cfg = sd_config();
    let mut s = Euler::ancestral(&cfg, 10).unwrap();
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
    // Trailing spacing starts at t = 999, SD's sigma_max, which is also the initial noise scale.
    cfg.timestep_spacing = "trailing".into();
    let s = Euler::ancestral(&cfg, 10).unwrap();
    assert_eq!(s.timesteps()[0], 999.0);
    assert!((s.sigmas()[0] - 14.6146).abs() < 1e-4, "{}", s.sigmas()[0]);
    assert_eq!(s.init_noise_sigma(), s.sigmas()[0]);
}

#[test]
fn euler_ancestral_scales_the_model_input() {
    let s = Euler::ancestral(&sd_config(), 10).unwrap();
    let (x, _) = tensors();
    let sigma = s.sigmas()[3];
    // diffusers computes √(σ² + 1) of its f32 sigma in f32.
    let expected = (&x / ((sigma * sigma) as f32 + 1.0).sqrt() as f64).unwrap();
    assert!(max_diff(&s.scale_model_input(&x, 3).unwrap(), &expected) < 1e-15);
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
        for (i, sigma) in sig[..20].iter().enumerate() {
            let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
            let eps = ((&x - (&x0 * alpha).unwrap()).unwrap() / (sigma * alpha)).unwrap();
            x = s.step(&eps, i, &x, &mut rng).unwrap();
        }
        assert!(max_diff(&x, &x0) < 1e-9, "karras {karras}: {}", max_diff(&x, &x0));
    }
    let karras = DpmSolverMultistep::new(&cfg, 20, true).unwrap();
    let train = schedule::train_sigmas(&cfg).unwrap();
    assert!((karras.sigmas()[0] - train[999]).abs() < 1e-5 && (karras.sigmas()[19] - train[0]).abs() < 1e-6);
    assert_eq!((karras.timesteps()[0], karras.timesteps()[19]), (999.0, 0.0));
}

#[test]
fn dpm_solver_steps_match_the_dpm_solver_pp_formulas() {
    // 10 steps: diffusers' `lower_order_final` only makes the last (σ = 0) step first order.
    let mut cfg = sd_config();
    let mut s = DpmSolverMultistep::new(&cfg, 10, false).unwrap();
    assert_eq!(s.timesteps(), [901.0, 811.0, 721.0, 631.0, 541.0, 451.0, 361.0, 271.0, 181.0, 91.0]);
    cfg.timestep_spacing = "linspace".into();
    let linspace = DpmSolverMultistep::new(&cfg, 10, false).unwrap();
    assert_eq!(linspace.timesteps(), [999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0]);
    let sig = s.sigmas().to_vec();
    let mut rng = NoiseRng::new(4);
    let mut x = rng.randn((1, 2, 3, 3), DType::F64, &Device::Cpu).unwrap();
    let mut prev_x0: Option<Tensor> = None;
    for i in 0..10 {
        let eps = rng.randn((1, 2, 3, 3), DType::F64, &Device::Cpu).unwrap();
        let (a_s, a_t) = (1.0 / (sig[i].powi(2) + 1.0).sqrt(), 1.0 / (sig[i + 1].powi(2) + 1.0).sqrt());
        let x0 = ((&x - (&eps * (sig[i] * a_s)).unwrap()).unwrap() / a_s).unwrap();
        let out = s.step(&eps, i, &x, &mut rng).unwrap();
        let expected = if i == 9 {
            x0.clone()
        } else {
            // VP σ_t = σ α_t, λ = -ln σ, h = λ_t - λ_s: x_t = (σ_t/σ_s) x - α_t (e^{-h} - 1) D.
            let h = sig[i].ln() - sig[i + 1].ln();
            let d = match &prev_x0 {
                None => x0.clone(),
                Some(m1) => {
                    let r = (sig[i - 1].ln() - sig[i].ln()) / h;
                    ((&x0 * (1.0 + 0.5 / r)).unwrap() - (m1 * (0.5 / r)).unwrap()).unwrap()
                }
            };
            ((&x * (sig[i + 1] * a_t / (sig[i] * a_s))).unwrap() - (d * (a_t * ((-h).exp() - 1.0))).unwrap()).unwrap()
        };
        assert!(max_diff(&out, &expected) < 1e-10, "step {i}: {}", max_diff(&out, &expected));
        prev_x0 = Some(x0);
        x = out;
    }
}

#[test]
fn zero_snr_schedules() {
    let mut cfg = sd_config();
    cfg.rescale_betas_zero_snr = true;
    cfg.timestep_spacing = "trailing".into();
    cfg.prediction_type = "v_prediction".into();
    cfg.set_alpha_to_one = Some(true);
    let ac = schedule::alphas_cumprod(&cfg).unwrap();
    assert_eq!(ac[999], 0.0);
    assert!((ac[0] - 0.99915).abs() < 1e-5, "{}", ac[0]);
    // Euler and DPM-Solver replace the last ᾱ by 2^-24: σ_max ≈ 4096.
    let euler = Euler::ancestral(&cfg, 5).unwrap();
    let dpm = DpmSolverMultistep::new(&cfg, 5, true).unwrap();
    assert!((euler.sigmas()[0] - 4096.0).abs() < 0.01, "{}", euler.sigmas()[0]);
    assert!((dpm.sigmas()[0] - 4096.0).abs() < 0.01, "{}", dpm.sigmas()[0]);
    // DDIM with v-prediction starts from pure noise (ᾱ = 0) and still lands on x0.
    let mut s = Ddim::new(&cfg, 5, 0.0).unwrap();
    assert_eq!(s.timesteps()[0], 999.0);
    let (x0, x) = v_oracle(&mut s);
    assert!(max_diff(&x, &x0) < 1e-5, "{}", max_diff(&x, &x0));
}

#[test]
fn unsupported_settings_are_errors() {
    let mut cfg = sd_config();
    cfg.beta_schedule = "sigmoid".into();
    assert!(Ddim::new(&cfg, 10, 0.0).is_err());
    let mut cfg = sd_config();
    cfg.prediction_type = "x".into();
    assert!(SchedulerKind::ALL.iter().all(|k| k.build(&cfg, 10, 0.0).is_err()));
    let mut cfg = sd_config();
    cfg.timestep_spacing = "uniform".into();
    assert!(SchedulerKind::ALL.iter().all(|k| k.build(&cfg, 10, 0.0).is_err()));
    assert!(Ddim::new(&sd_config(), 10, -1.0).is_err());
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

#[test]
fn leading_spacing_past_the_last_training_timestep_is_an_error() {
    let cfg = sd_config();
    assert_eq!(schedule::spaced_timesteps(&cfg, 999).unwrap()[0], 999.0);
    let err = Ddim::new(&cfg, 1000, 0.0).err().unwrap().to_string();
    assert!(err.contains("use at most 999 steps"), "{err}");
}

#[test]
fn euler_matches_diffusers_schedules() {
    // EulerDiscreteScheduler(scaled_linear 0.00085..0.012, steps_offset 1).set_timesteps(5),
    // diffusers 0.42.1.
    type Case = (&'static str, bool, &'static str, [f64; 5], [f64; 6], f64);
    let cases: [Case; 7] = [
        ("leading", false, "zero", [801.0, 601.0, 401.0, 201.0, 1.0], [5.13443, 2.29285, 1.16822, 0.57405, 0.04131, 0.0], 5.23091),
        ("leading", false, "sigma_min", [801.0, 601.0, 401.0, 201.0, 1.0], [5.13443, 2.29285, 1.16822, 0.57405, 0.04131, 0.02917], 5.23091),
        ("leading", true, "zero", [801.0, 565.8301, 248.593, 38.4223, 1.0], [5.13443, 2.02481, 0.69215, 0.19469, 0.04131, 0.0], 5.23091),
        ("trailing", false, "zero", [999.0, 799.0, 599.0, 399.0, 199.0], [14.61465, 5.08777, 2.27646, 1.16058, 0.56929, 0.0], 14.61465),
        ("trailing", true, "zero", [999.0, 876.5876, 710.2963, 475.3398, 199.0], [14.61465, 7.39392, 3.47553, 1.49103, 0.56929, 0.0], 14.61465),
        ("linspace", false, "zero", [999.0, 749.25, 499.5, 249.75, 0.0], [14.61465, 4.08609, 1.61558, 0.69515, 0.02917, 0.0], 14.61465),
        ("linspace", true, "zero", [999.0, 785.954, 427.4898, 58.8915, 0.0], [14.61465, 4.79654, 1.27411, 0.24795, 0.02917, 0.0], 14.61465),
    ];
    for (spacing, karras, last, timesteps, sigmas, init) in cases {
        let mut cfg = sd_config();
        cfg.timestep_spacing = spacing.into();
        cfg.use_karras_sigmas = karras;
        cfg.final_sigmas_type = last.into();
        let s = Euler::new(&cfg, 5).unwrap();
        let case = format!("{spacing} karras={karras} {last}");
        assert!(s.timesteps().iter().zip(timesteps).all(|(a, b)| (a - b).abs() < 1e-3), "{case}: {:?}", s.timesteps());
        assert!(s.sigmas().iter().zip(sigmas).all(|(a, b)| (a - b).abs() < 1e-4), "{case}: {:?}", s.sigmas());
        assert!((s.init_noise_sigma() - init).abs() < 1e-4, "{case}: {}", s.init_noise_sigma());
    }
}

#[test]
fn euler_steps_follow_the_ode_and_denoise() {
    let cfg = sd_config();
    let mut s = Euler::new(&cfg, 10).unwrap();
    let (x0, noise) = tensors();
    let mut x = (&noise * s.init_noise_sigma()).unwrap();
    let mut rng = NoiseRng::new(2);
    for i in 0..10 {
        let (sigma, next) = (s.sigmas()[i], s.sigmas()[i + 1]);
        let eps = ((&x - &x0).unwrap() / sigma).unwrap();
        let input = s.scale_model_input(&x, i).unwrap();
        assert!(max_diff(&input, &(&x / (sigma * sigma + 1.0).sqrt()).unwrap()) < 1e-6);
        let out = s.step(&eps, i, &x, &mut rng).unwrap();
        // x + (x - x0) / σ · (σ' - σ), exactly x0 + σ' ε for the exact ε.
        assert!(max_diff(&out, &(&x0 + (&eps * next).unwrap()).unwrap()) < 1e-9, "step {i}");
        x = out;
    }
    assert!(max_diff(&x, &x0) < 1e-9);
    let mut bad = sd_config();
    bad.interpolation_type = "log_linear".into();
    assert!(Euler::new(&bad, 10).unwrap_err().to_string().contains("interpolation_type"));
}
