//! One adapted module of an adapter file: its tensors by role, checked against the base
//! weight (kind, shapes, values) and loaded as an [`Update`] with its scale and DoRA magnitude.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::dora::Dora;
use super::keys::Role;
use super::lycoris::{self, Shapes};
use super::targets::Component;
use super::update::Update;
use super::values::{self, MAX_UPDATE};
use super::LoraModule;

/// What is wrong with a module: a problem class and the keys (with shapes) at fault.
pub type Problem = (&'static str, String);

/// The factorisation a module's keys describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `lora_down` / `lora_up` (LoRA, LoCon), with `lora_mid` a Tucker LoCon.
    LowRank,
    Hadamard,
    Kronecker,
}

/// The tensors found for one module, by role.
pub struct Found<'a> {
    /// The base weight's shape.
    pub base: &'a [usize],
    tensors: BTreeMap<Role, (&'a str, TensorView<'a>)>,
}

/// The alpha a module gets from the file's peft metadata: `(lora_alpha, use_rslora)`.
pub type PeftAlpha = Option<(f64, bool)>;

impl<'a> Found<'a> {
    pub fn new(base: &'a [usize]) -> Self {
        Self { base, tensors: BTreeMap::new() }
    }

    /// Adds a tensor; returns the key that already held `role`, if any.
    pub fn insert(&mut self, role: Role, key: &'a str, view: TensorView<'a>) -> Option<&'a str> {
        self.tensors.insert(role, (key, view)).map(|(k, _)| k)
    }

    fn key(&self, role: Role) -> Option<&'a str> {
        self.tensors.get(&role).map(|(k, _)| *k)
    }

    /// `key [shape], … (base weight [shape])`.
    fn describe(&self, roles: impl Fn(Role) -> bool) -> String {
        let parts: Vec<String> = self
            .tensors
            .iter()
            .filter(|(r, _)| roles(**r))
            .map(|(_, (k, v))| format!("{k} {:?}", v.shape()))
            .collect();
        format!("{} (base weight {:?})", parts.join(" / "), self.base)
    }

    /// Checks which factorisation the keys describe, their shapes, dtypes and values.
    pub fn check(&self) -> Result<Kind, Problem> {
        let any = |f: fn(Role) -> bool| self.tensors.keys().any(|r| f(*r));
        let low_rank = |r: Role| matches!(r, Role::Down | Role::Up | Role::Mid);
        let kind = match (any(low_rank), any(Role::is_hada), any(Role::is_lokr)) {
            (true, false, false) => Kind::LowRank,
            (false, true, false) => Kind::Hadamard,
            (false, false, true) => Kind::Kronecker,
            (false, false, false) => {
                let key = self.tensors.values().next().map_or("", |(k, _)| k);
                return Err(("alpha or DoRA magnitude without weights", key.to_string()));
            }
            _ => return Err(("factors of different kinds (LoRA, LoHa, LoKr) for one module", self.describe(Role::is_factor))),
        };
        for (key, view) in self.tensors.values() {
            if float_dtype(view.dtype()).is_none() {
                return Err(("unsupported dtypes (need a float type)", format!("{key} {:?}", view.dtype())));
            }
        }
        let shapes: Shapes = self.tensors.iter().map(|(r, (_, v))| (*r, v.shape())).collect();
        let fits = match kind {
            Kind::LowRank => return self.check_low_rank(&shapes).and_then(|()| self.check_rest()).map(|()| kind),
            Kind::Hadamard => lycoris::fits_hadamard(self.base, &shapes),
            Kind::Kronecker => lycoris::fits_kronecker(self.base, &shapes),
        };
        if !fits {
            return Err(("shapes that do not fit the base weight", self.describe(Role::is_factor)));
        }
        self.check_rest().map(|()| kind)
    }

    fn check_low_rank(&self, shapes: &Shapes) -> Result<(), Problem> {
        let (down, up) = match (shapes.get(&Role::Down), shapes.get(&Role::Up)) {
            (Some(d), Some(u)) => (*d, *u),
            (Some(_), None) => return Err(("missing up weight", self.key(Role::Down).unwrap_or_default().into())),
            (None, _) => {
                let key = self.key(Role::Up).or(self.key(Role::Mid)).unwrap_or_default();
                return Err(("missing down weight", key.into()));
            }
        };
        let ok = match shapes.get(&Role::Mid) {
            None => fits(self.base, down, up),
            Some(mid) => fits_tucker(self.base, down, mid, up),
        };
        if ok {
            Ok(())
        } else {
            Err(("shapes that do not fit the base weight", self.describe(Role::is_factor)))
        }
    }

    /// Alpha and DoRA magnitude shapes, and every value's magnitude.
    fn check_rest(&self) -> Result<(), Problem> {
        if let Some((key, view)) = self.tensors.get(&Role::Alpha) {
            if view.shape().iter().product::<usize>() != 1 {
                return Err(("alpha is not a scalar", key.to_string()));
            }
        }
        let magnitudes: Vec<_> = [Role::Magnitude, Role::DoraScale]
            .into_iter()
            .filter_map(|r| self.tensors.get(&r).map(|t| (r, t)))
            .collect();
        match magnitudes.as_slice() {
            [] => {}
            [(role, (key, view))] => {
                if Dora::axis(*role, view.shape(), self.base).is_none() {
                    return Err((
                        "DoRA magnitudes that do not fit the base weight",
                        format!("{key} {:?} (base weight {:?})", view.shape(), self.base),
                    ));
                }
            }
            [(_, (a, _)), (_, (b, _))] => return Err(("keys given twice for one module", format!("{a} and {b}"))),
            _ => unreachable!("two magnitude roles"),
        }
        for (key, view) in self.tensors.values() {
            let m = values::max_abs(view);
            if let Some(problem) = values::problem(m) {
                return Err((problem, format!("{key} (largest |value| {m:e})")));
            }
        }
        Ok(())
    }

    /// Loads a checked module as f32 on `device`; `peft` is the metadata alpha, used by
    /// low-rank modules that store none.
    pub fn load(
        self,
        kind: Kind,
        component: Component,
        path: &str,
        peft: PeftAlpha,
        device: &Device,
    ) -> Result<LoraModule, Problem> {
        let failed = |e: candle_core::Error| ("tensors that cannot be loaded", format!("{path}: {e}"));
        let base = self.base;
        let mut tensors = BTreeMap::new();
        let mut alpha = None;
        let mut dora = None;
        for (role, (_, view)) in self.tensors {
            let t = to_f32(&view).map_err(failed)?;
            match role {
                Role::Alpha => alpha = Some(t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(failed)?[0] as f64),
                Role::Magnitude | Role::DoraScale => {
                    let axis = Dora::axis(role, view.shape(), base).expect("checked");
                    dora = Some(Dora { magnitude: t.flatten_all().and_then(|t| t.to_device(device)).map_err(failed)?, axis });
                }
                _ => {
                    // a linear layer's factors may be stored as 1×1 kernels
                    let t = if base.len() == 2 && t.rank() == 4 { t.flatten_from(1).map_err(failed)? } else { t };
                    tensors.insert(role, t.to_device(device).map_err(failed)?);
                }
            }
        }
        let update = match kind {
            Kind::LowRank => {
                let mut take = |r| tensors.remove(&r).expect("checked");
                let (down, up) = (take(Role::Down), take(Role::Up));
                match tensors.remove(&Role::Mid) {
                    Some(mid) => Update::Tucker { down, mid, up },
                    None => Update::LowRank { down, up },
                }
            }
            Kind::Hadamard => Update::Hadamard(lycoris::hadamard(tensors)),
            Kind::Kronecker => Update::Kronecker(lycoris::kronecker(tensors)),
        };
        let rank = update.scale_rank();
        let (alpha, alpha_scale) = match (alpha, kind, peft) {
            (Some(a), _, _) => (Some(a), rank.map_or(1.0, |r| a / r as f64)),
            (None, Kind::LowRank, Some((a, rslora))) => {
                let r = rank.expect("low-rank modules have a rank") as f64;
                (Some(a), if rslora { a / r.sqrt() } else { a / r })
            }
            (None, _, _) => (None, 1.0),
        };
        let bound = values::update_bound(&update).map_err(failed)? * alpha_scale.abs();
        if bound.is_nan() || bound > MAX_UPDATE {
            return Err((
                "updates too large to be real (alpha / rank times the factors' largest values could change a weight by more than 1e4)",
                format!("{component} module {path} (bound {bound:e})"),
            ));
        }
        Ok(LoraModule { component, path: path.to_string(), update, dora, alpha, alpha_scale })
    }
}

/// Whether `down` / `up` fit a base weight of shape `base` (`[out, in]` or `[out, in, kh, kw]`):
/// down `[r, in]` / `[r, in, kh, kw]` and up `[out, r]` / `[out, r, 1, 1]`, with r > 0. A 1×1
/// kernel may be given or left out on either side.
pub fn fits(base: &[usize], down: &[usize], up: &[usize]) -> bool {
    let (out, input, kernel) = (base[0], base[1], &base[2..]);
    let Some(&r) = down.first() else { return false };
    let pointwise = kernel.iter().all(|&k| k == 1);
    let down_ok = match &down[1..] {
        [i] => *i == input && pointwise,
        [i, 1, 1] if pointwise => *i == input,
        [i, kh, kw] => *i == input && kernel == [*kh, *kw],
        _ => false,
    };
    let up_ok = matches!(up, [o, ur] | [o, ur, 1, 1] if *o == out && *ur == r);
    r > 0 && down_ok && up_ok
}

/// Whether a Tucker LoCon fits a convolution of shape `base`: down `[r, in, 1, 1]`, mid
/// `[r', r, kh, kw]` with the base kernel, up `[out, r', 1, 1]`.
fn fits_tucker(base: &[usize], down: &[usize], mid: &[usize], up: &[usize]) -> bool {
    let [out, input, kh, kw] = base else { return false };
    matches!((down, mid, up), ([rd, i, 1, 1], [ru, rm, mh, mw], [o, ru2, 1, 1])
        if i == input && o == out && rm == rd && ru == ru2 && mh == kh && mw == kw && *rd > 0 && *ru > 0)
}

/// The candle dtype of a float tensor in a file; `None` for any other type.
fn float_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Loads a floating-point tensor on the CPU as f32.
fn to_f32(view: &TensorView) -> candle_core::Result<Tensor> {
    let dtype = float_dtype(view.dtype()).ok_or_else(|| candle_core::Error::Msg(format!("not a float tensor ({:?})", view.dtype())))?;
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_fit() {
        assert!(fits(&[32, 16], &[4, 16], &[32, 4]));
        assert!(fits(&[32, 16], &[4, 16, 1, 1], &[32, 4, 1, 1]));
        assert!(fits(&[32, 16, 1, 1], &[4, 16], &[32, 4]));
        assert!(fits(&[32, 16, 3, 3], &[4, 16, 3, 3], &[32, 4, 1, 1]));
        assert!(!fits(&[32, 16, 3, 3], &[4, 16], &[32, 4]));
        assert!(!fits(&[32, 16], &[4, 17], &[32, 4]));
        assert!(!fits(&[32, 16], &[4, 16], &[32, 3]));
        assert!(!fits(&[32, 16], &[0, 16], &[32, 0]));
        assert!(!fits(&[32, 16], &[], &[32, 4]));
    }

    #[test]
    fn tucker_fit() {
        assert!(fits_tucker(&[32, 16, 3, 3], &[4, 16, 1, 1], &[4, 4, 3, 3], &[32, 4, 1, 1]));
        assert!(fits_tucker(&[32, 16, 3, 3], &[2, 16, 1, 1], &[4, 2, 3, 3], &[32, 4, 1, 1]));
        assert!(!fits_tucker(&[32, 16, 3, 3], &[4, 16, 1, 1], &[4, 4, 1, 1], &[32, 4, 1, 1]));
        assert!(!fits_tucker(&[32, 16], &[4, 16, 1, 1], &[4, 4, 3, 3], &[32, 4, 1, 1]));
        assert!(!fits_tucker(&[32, 16, 3, 3], &[4, 16, 3, 3], &[4, 4, 3, 3], &[32, 4, 1, 1]));
    }
}
