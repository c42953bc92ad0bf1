//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) with global gradient-norm clipping.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// AdamW hyperparameters.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// AdamW state for a fixed list of variables.
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u32,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self { cfg, vars, m, v, t: 0 })
    }

    /// Changes the learning rate of the following steps (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// One update with `grads` aligned with the variables.
    pub fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!("expected {} gradients, got {}", self.vars.len(), grads.len());
        }
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            // Detached, so the moments never keep a step's graph alive.
            let g = g.detach();
            let var = &self.vars[i];
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&self.m[i] / bc1)? / ((&self.v[i] / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_detached_tensor() * (1.0 - c.lr * c.weight_decay))?;
            var.set(&(decayed - (update * c.lr)?)?)?;
        }
        Ok(())
    }
}

impl AdamW {
    /// Backpropagates `loss`, clips the gradients of the optimiser's variables to
    /// `max_grad_norm` and takes a step; returns the norm before clipping.
    pub fn minimize(&mut self, loss: &Tensor, max_grad_norm: f64) -> Result<f64> {
        let store = loss.backward()?;
        let mut grads = self.vars.iter().map(|v| grad_or_zeros(&store, v)).collect::<Result<Vec<_>>>()?;
        let norm = clip_grad_norm(&mut grads, max_grad_norm)?;
        self.step(&grads)?;
        Ok(norm)
    }
}

/// The gradient of `v` in `store`, zeros where the loss does not depend on it.
pub fn grad_or_zeros(store: &GradStore, v: &Var) -> Result<Tensor> {
    match store.get(v.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => v.zeros_like(),
    }
}

/// The global L2 norm of `grads`.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0;
    for g in grads {
        sum += g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (as `clip_grad_norm_`);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn minimises_a_quadratic_and_matches_the_torch_update() {
        let x = Var::new(&[3.0f64, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.0, ..Default::default() };
        let mut opt = AdamW::new(vec![x.clone()], cfg).unwrap();
        // First step of Adam moves every coordinate by lr against the gradient sign.
        let g = (x.as_tensor() * 2.0).unwrap();
        opt.step(&[g]).unwrap();
        let after = x.as_tensor().to_vec1::<f64>().unwrap();
        assert!((after[0] - 2.9).abs() < 1e-6 && (after[1] + 1.9).abs() < 1e-6, "{after:?}");
        for _ in 0..300 {
            let g = (x.as_tensor() * 2.0).unwrap();
            opt.step(&[g]).unwrap();
        }
        let end = x.as_tensor().to_vec1::<f64>().unwrap();
        assert!(end.iter().all(|v| v.abs() < 0.05), "{end:?}");
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let x = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let mut opt = AdamW::new(vec![x.clone()], cfg).unwrap();
        opt.step(&[Tensor::new(&[0.0f64], &Device::Cpu).unwrap()]).unwrap();
        let v = x.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((v - 0.95).abs() < 1e-12, "{v}");
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap()];
        let before = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-12);
        assert!((grad_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
