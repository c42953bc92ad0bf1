//! Noise schedules shared by the schedulers: betas, cumulative alphas, timestep spacing and
//! sigma ↔ timestep conversion, computed as diffusers does (betas and their cumulative
//! product in f32, like torch).

use anyhow::{bail, Result};

use crate::model::config::SchedulerConfig;

/// `alphas_cumprod` of the training noise schedule.
pub fn alphas_cumprod(cfg: &SchedulerConfig) -> Result<Vec<f64>> {
    let n = cfg.num_train_timesteps;
    if n < 2 {
        bail!("num_train_timesteps must be at least 2");
    }
    let mut betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule.as_str()) {
        (Some(b), _) if b.len() == n => b.iter().map(|&v| v as f32).collect(),
        (Some(b), _) => bail!("trained_betas has {} entries, expected {n}", b.len()),
        (None, "linear") => linspace(cfg.beta_start, cfg.beta_end, n).into_iter().map(|v| v as f32).collect(),
        (None, "scaled_linear") => linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
            .into_iter()
            .map(|v| (v as f32) * (v as f32))
            .collect(),
        (None, "squaredcos_cap_v2") => {
            let bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
            (0..n)
                .map(|i| (1.0 - bar((i + 1) as f64 / n as f64) / bar(i as f64 / n as f64)).min(0.999) as f32)
                .collect()
        }
        (None, other) => bail!("unsupported beta_schedule {other:?}"),
    };
    if cfg.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let mut acc = 1f32;
    Ok(betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc as f64
        })
        .collect())
}

/// Zero terminal SNR rescaling (Lin et al. 2023), as diffusers' `rescale_zero_terminal_snr`
/// (in f32, like torch).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f32;
    let mut sqrt_bar: Vec<f32> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = vec![1.0 - bar[0]];
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// `np.linspace(a, b, n)`.
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
}

/// Timesteps for `steps` sampling steps by the config's `timestep_spacing` (DDIM and Euler
/// use this rule), highest first.
pub fn spaced_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<f64>> {
    let n = cfg.num_train_timesteps;
    check_steps(steps, n)?;
    Ok(match cfg.timestep_spacing.as_str() {
        "leading" => {
            let ratio = n / steps;
            let last = (steps - 1) * ratio + cfg.steps_offset;
            if last >= n {
                bail!("{steps} steps with steps_offset {} reach timestep {last}, beyond the {n} training timesteps; use at most {} steps", cfg.steps_offset, steps - 1);
            }
            (0..steps).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
        }
        "trailing" => trailing(n, steps),
        "linspace" => linspace(0.0, (n - 1) as f64, steps).into_iter().rev().collect(),
        other => bail!("unsupported timestep_spacing {other:?}"),
    })
}

/// "trailing" spacing: `round(np.arange(n, 0, -n / steps)) - 1`. numpy's arange length
/// `ceil(n / (n / steps))` can come out one too long (62 for 61 steps, ending at -1); only
/// the first `steps` are kept.
pub fn trailing(n: usize, steps: usize) -> Vec<f64> {
    let (n, ratio) = (n as f64, n as f64 / steps as f64);
    (0..steps).map(|i| (n - ratio * i as f64).round_ties_even() - 1.0).collect()
}

pub fn check_steps(steps: usize, train_steps: usize) -> Result<()> {
    if steps == 0 || steps > train_steps {
        bail!("steps must be between 1 and {train_steps}, got {steps}");
    }
    Ok(())
}

/// `((1 - ᾱ) / ᾱ)^½` for every training timestep, in f32 like torch, as the sigma-space
/// schedulers (Euler, DPM-Solver) compute it: with zero-SNR rescaling they first set the
/// last ᾱ to 2⁻²⁴ so the first sigma is finite.
pub fn train_sigmas(cfg: &SchedulerConfig) -> Result<Vec<f64>> {
    let mut ac = alphas_cumprod(cfg)?;
    if let (true, Some(last)) = (cfg.rescale_betas_zero_snr, ac.last_mut()) {
        *last = 2f64.powi(-24);
    }
    Ok(ac
        .iter()
        .map(|&a| {
            let a = a as f32;
            ((1.0 - a) / a).sqrt() as f64
        })
        .collect())
}

/// `np.interp(x, arange(len(ys)), ys)`, in numpy's slope form.
pub fn interp(x: f64, ys: &[f64]) -> f64 {
    let last = ys.len() - 1;
    if x <= 0.0 {
        return ys[0];
    }
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    if x == i as f64 {
        return ys[i];
    }
    (ys[i + 1] - ys[i]) * (x - i as f64) + ys[i]
}

/// Karras et al. sigmas between `sigma_max` and `sigma_min` (rho = 7).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n).into_iter().map(|r| (hi + r * (lo - hi)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional timestep of `sigma` by log-sigma interpolation.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last = log_sigmas.len() - 2;
    let low = log_sigmas.iter().rposition(|&l| log_sigma - l >= 0.0).unwrap_or(0).min(last);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sd_config() -> SchedulerConfig {
        serde_json::from_str(
            r#"{"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear","steps_offset":1,
                "set_alpha_to_one":false,"clip_sample":false,"num_train_timesteps":1000}"#,
        )
        .unwrap()
    }

    #[test]
    fn sd_alphas_cumprod_match_diffusers() {
        let ac = alphas_cumprod(&sd_config()).unwrap();
        assert!((ac[0] - 0.99915).abs() < 1e-6, "{}", ac[0]);
        assert!((ac[999] - 0.00466).abs() < 1e-6, "{}", ac[999]);
    }

    #[test]
    fn leading_spacing_matches_diffusers() {
        let cfg = sd_config();
        let t = spaced_timesteps(&cfg, 10).unwrap();
        assert_eq!(t, vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
        let t50 = spaced_timesteps(&cfg, 50).unwrap();
        assert_eq!((t50[0], t50[1], t50[49]), (981.0, 961.0, 1.0));
        assert!(spaced_timesteps(&cfg, 0).is_err() && spaced_timesteps(&cfg, 1001).is_err());
    }

    #[test]
    fn trailing_and_linspace_spacing() {
        let mut cfg = sd_config();
        cfg.timestep_spacing = "trailing".into();
        assert_eq!(spaced_timesteps(&cfg, 4).unwrap(), vec![999.0, 749.0, 499.0, 249.0]);
        // numpy's arange yields 62 values for 61 steps (the last -1); 19 and 61 are both
        // cases where a float loop would run one step too far.
        for steps in 1..=1000 {
            let t = spaced_timesteps(&cfg, steps).unwrap();
            assert_eq!(t.len(), steps);
            assert!(t.windows(2).all(|w| w[0] > w[1]) && t[steps - 1] >= 0.0, "{steps}");
        }
        assert_eq!(spaced_timesteps(&cfg, 3).unwrap(), vec![999.0, 666.0, 332.0]);
        cfg.timestep_spacing = "linspace".into();
        assert_eq!(spaced_timesteps(&cfg, 3).unwrap(), vec![999.0, 499.5, 0.0]);
    }

    #[test]
    fn other_beta_schedules() {
        let mut cfg = sd_config();
        cfg.beta_schedule = "linear".into();
        cfg.beta_start = 0.0001;
        cfg.beta_end = 0.02;
        let ac = alphas_cumprod(&cfg).unwrap();
        assert!((ac[0] - 0.9999).abs() < 1e-7 && (ac[999] - 4.036e-5).abs() < 1e-7, "{}", ac[999]);
        cfg.beta_schedule = "squaredcos_cap_v2".into();
        let ac = alphas_cumprod(&cfg).unwrap();
        let bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
        assert!((ac[0] - bar(0.001) / bar(0.0)).abs() < 1e-7 && ac[999] < 1e-4);
        cfg.trained_betas = Some(vec![0.5; 1000]);
        assert!((alphas_cumprod(&cfg).unwrap()[1] - 0.25).abs() < 1e-12);
        cfg.trained_betas = Some(vec![0.5; 10]);
        assert!(alphas_cumprod(&cfg).is_err());
        cfg.trained_betas = None;
        cfg.beta_schedule = "sigmoid".into();
        assert!(alphas_cumprod(&cfg).is_err());
    }

    #[test]
    fn interp_matches_numpy() {
        let ys = [1.0, 3.0, 7.0];
        assert_eq!([interp(-1.0, &ys), interp(0.5, &ys), interp(1.0, &ys), interp(1.75, &ys), interp(9.0, &ys)], [1.0, 2.0, 3.0, 6.0, 7.0]);
    }

    #[test]
    fn sigma_to_t_inverts_the_schedule() {
        let s = train_sigmas(&sd_config()).unwrap();
        let logs: Vec<f64> = s.iter().map(|v| v.ln()).collect();
        for t in [0usize, 10, 500, 998] {
            assert!((sigma_to_t(s[t], &logs) - t as f64).abs() < 1e-6);
        }
        assert!((sigma_to_t(interp(123.25, &s), &logs) - 123.25).abs() < 0.01);
    }
}
