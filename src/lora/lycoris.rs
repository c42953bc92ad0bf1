//! LyCORIS factorisations: LoHa (`hada_*`) and LoKr (`lokr_*`), with their optional Tucker
//! cores, rebuilt exactly as LyCORIS, A1111 and peft do; and their shape checks.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

use super::keys::Role;

/// `einsum("i j k l, i p, j r -> p r k l", t, a, b)`: a Tucker core `t` `[R1, R2, kh, kw]`
/// expanded by `a` `[R1, P]` and `b` `[R2, Q]` into `[P, Q, kh, kw]`.
pub fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let (p, q) = (a.dim(1)?, b.dim(1)?);
    let k = kh * kw;
    let first = a.t()?.matmul(&t.reshape((r1, r2 * k))?)?; // [P, R2·k]
    let first = first.reshape((p, r2, k))?.transpose(1, 2)?.contiguous()?; // [P, k, R2]
    let both = first.reshape((p * k, r2))?.matmul(b)?; // [P·k, Q]
    both.reshape((p, k, q))?.transpose(1, 2)?.contiguous()?.reshape((p, q, kh, kw))
}

/// The Kronecker product of two matrices (`torch.kron`).
pub fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, n) = a.dims2()?;
    let (p, q) = b.dims2()?;
    a.reshape((m, 1, n, 1))?
        .broadcast_mul(&b.reshape((1, p, 1, q))?)?
        .reshape((m * p, n * q))
}

/// One LoHa product: `a · b` with a `[out, r]`, b `[r, in·kh·kw]`; or, with a Tucker core
/// `t` `[r, r, kh, kw]`, `tucker(t, a, b)` with a `[r, out]`, b `[r, in]`.
#[derive(Clone, Debug)]
pub struct HadaPair {
    pub a: Tensor,
    pub b: Tensor,
    pub t: Option<Tensor>,
}

impl HadaPair {
    fn weight(&self) -> Result<Tensor> {
        match &self.t {
            Some(t) => tucker(t, &self.a, &self.b),
            None => self.a.matmul(&self.b),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        [Some(&self.a), Some(&self.b), self.t.as_ref()].into_iter().flatten().collect()
    }
}

/// LoHa: `(w1a · w1b) ⊙ (w2a · w2b)`; LyCORIS divides alpha by the rank of `w1b`.
#[derive(Clone, Debug)]
pub struct Hadamard {
    pub w1: HadaPair,
    pub w2: HadaPair,
}

impl Hadamard {
    pub fn weight(&self) -> Result<Tensor> {
        self.w1.weight()? * self.w2.weight()?
    }

    pub fn rank(&self) -> usize {
        self.w1.b.dims()[0]
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        [self.w1.tensors(), self.w2.tensors()].concat()
    }
}

/// One LoKr factor: full, low-rank `a · b`, or (the second factor of a convolution) a Tucker
/// core `t` `[r, r, kh, kw]` with a `[r, out₂]`, b `[r, in₂]`.
#[derive(Clone, Debug)]
pub enum KronFactor {
    Full(Tensor),
    LowRank { a: Tensor, b: Tensor },
    Tucker { t: Tensor, a: Tensor, b: Tensor },
}

impl KronFactor {
    pub fn weight(&self) -> Result<Tensor> {
        match self {
            KronFactor::Full(w) => Ok(w.clone()),
            KronFactor::LowRank { a, b } => a.matmul(b),
            KronFactor::Tucker { t, a, b } => tucker(t, a, b),
        }
    }

    fn rank(&self) -> Option<usize> {
        match self {
            KronFactor::Full(_) => None,
            KronFactor::LowRank { b, .. } | KronFactor::Tucker { b, .. } => Some(b.dims()[0]),
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            KronFactor::Full(w) => vec![w],
            KronFactor::LowRank { a, b } => vec![a, b],
            KronFactor::Tucker { t, a, b } => vec![t, a, b],
        }
    }
}

/// LoKr: `w1 ⊗ w2` (w1 `[out₁, in₁]`, w2 `[out₂, in₂(, kh, kw)]`). Alpha is divided by the
/// rank of the low-rank factor (`w2`'s first); with two full factors it is not applied.
#[derive(Clone, Debug)]
pub struct Kronecker {
    pub w1: KronFactor,
    pub w2: KronFactor,
}

impl Kronecker {
    pub fn rank(&self) -> Option<usize> {
        self.w2.rank().or(self.w1.rank())
    }
}

/// The shapes of a module's tensors, by role.
pub type Shapes<'a> = BTreeMap<Role, &'a [usize]>;

/// The base weight's `(out, in, kernel)`, kernel empty for a linear layer.
fn split(base: &[usize]) -> (usize, usize, &[usize]) {
    (base[0], base[1], &base[2..])
}

/// Whether a LoHa module's shapes fit the base weight `base`.
pub fn fits_hadamard(base: &[usize], shapes: &Shapes) -> bool {
    let (out, input, kernel) = split(base);
    let k: usize = kernel.iter().product();
    let tucker = shapes.contains_key(&Role::HadaT1) || shapes.contains_key(&Role::HadaT2);
    let pairs = [
        (Role::HadaW1A, Role::HadaW1B, Role::HadaT1),
        (Role::HadaW2A, Role::HadaW2B, Role::HadaT2),
    ];
    for (ra, rb, rt) in pairs {
        let (Some(a), Some(b)) = (shapes.get(&ra), shapes.get(&rb)) else {
            return false;
        };
        let ok = match (tucker, shapes.get(&rt)) {
            (false, _) => matches!((*a, *b), ([o, r], [r2, i]) if *o == out && r == r2 && *r > 0 && *i == input * k),
            (true, Some(t)) => {
                matches!((*t, *a, *b), ([r1, r2, kh, kw], [ra, o], [rb, i])
                    if kernel == [*kh, *kw] && r1 == ra && r2 == rb && *o == out && *i == input && *ra > 0 && *rb > 0)
            }
            (true, None) => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether a LoKr module's shapes fit the base weight `base`.
pub fn fits_kronecker(base: &[usize], shapes: &Shapes) -> bool {
    let (out, input, kernel) = split(base);
    let k: usize = kernel.iter().product();
    let get = |r: Role| shapes.get(&r).copied();
    // (rows, columns) of w1
    let w1 = match (get(Role::LokrW1), get(Role::LokrW1A), get(Role::LokrW1B)) {
        (Some([o, i]), None, None) => Some((*o, *i)),
        (None, Some([o, r]), Some([r2, i])) if r == r2 && *r > 0 => Some((*o, *i)),
        _ => None,
    };
    // (rows, input channels) of w2, whose columns carry the kernel
    let per_kernel = |cols: usize| cols.is_multiple_of(k).then_some(cols / k);
    let w2 = match (get(Role::LokrW2), get(Role::LokrW2A), get(Role::LokrW2B), get(Role::LokrT2)) {
        (Some([o, cols]), None, None, None) => per_kernel(*cols).map(|i| (*o, i)),
        (Some([o, i, kh, kw]), None, None, None) if kernel == [*kh, *kw] => Some((*o, *i)),
        (None, Some([o, r]), Some([r2, cols]), None) if r == r2 && *r > 0 => per_kernel(*cols).map(|i| (*o, i)),
        (None, Some([ra, o]), Some([rb, i]), Some([r1, r2, kh, kw]))
            if kernel == [*kh, *kw] && r1 == ra && r2 == rb && *ra > 0 && *rb > 0 =>
        {
            Some((*o, *i))
        }
        _ => None,
    };
    matches!((w1, w2), (Some((o1, i1)), Some((o2, i2))) if o1 * o2 == out && i1 * i2 == input)
}

/// Builds the LoHa factors from the module's (checked) tensors.
pub fn hadamard(mut t: BTreeMap<Role, Tensor>) -> Hadamard {
    let mut pair = |a, b, c| HadaPair {
        a: t.remove(&a).expect("checked"),
        b: t.remove(&b).expect("checked"),
        t: t.remove(&c),
    };
    Hadamard {
        w1: pair(Role::HadaW1A, Role::HadaW1B, Role::HadaT1),
        w2: pair(Role::HadaW2A, Role::HadaW2B, Role::HadaT2),
    }
}

/// Builds the LoKr factors from the module's (checked) tensors.
pub fn kronecker(mut t: BTreeMap<Role, Tensor>) -> Kronecker {
    let w1 = match t.remove(&Role::LokrW1) {
        Some(w) => KronFactor::Full(w),
        None => KronFactor::LowRank {
            a: t.remove(&Role::LokrW1A).expect("checked"),
            b: t.remove(&Role::LokrW1B).expect("checked"),
        },
    };
    let w2 = match (t.remove(&Role::LokrW2), t.remove(&Role::LokrT2)) {
        (Some(w), _) => KronFactor::Full(w),
        (None, core) => {
            let a = t.remove(&Role::LokrW2A).expect("checked");
            let b = t.remove(&Role::LokrW2B).expect("checked");
            match core {
                Some(core) => KronFactor::Tucker { t: core, a, b },
                None => KronFactor::LowRank { a, b },
            }
        }
    };
    Kronecker { w1, w2 }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn t(shape: &[usize], seed: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|i| ((i as f64 + 1.0) * seed).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn tucker_matches_the_einsum() {
        let (core, a, b) = (t(&[2, 3, 2, 2], 0.7), t(&[2, 5], 1.3), t(&[3, 4], 0.4));
        let got = tucker(&core, &a, &b).unwrap();
        assert_eq!(got.dims(), [5, 4, 2, 2]);
        let (av, bv) = (a.to_vec2::<f64>().unwrap(), b.to_vec2::<f64>().unwrap());
        let core4: Vec<f64> = core.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
        for p in 0..5 {
            for r in 0..4 {
                for kl in 0..4 {
                    let mut want = 0.0;
                    for i in 0..2 {
                        for j in 0..3 {
                            want += core4[(i * 3 + j) * 4 + kl] * av[i][p] * bv[j][r];
                        }
                    }
                    let have = g[(p * 4 + r) * 4 + kl];
                    assert!((have - want).abs() < 1e-12, "{p} {r} {kl}: {have} vs {want}");
                }
            }
        }
    }

    #[test]
    fn kron_matches_the_definition() {
        let (a, b) = (t(&[2, 3], 0.3), t(&[4, 5], 0.9));
        let k = kron(&a, &b).unwrap().to_vec2::<f64>().unwrap();
        let (av, bv) = (a.to_vec2::<f64>().unwrap(), b.to_vec2::<f64>().unwrap());
        for i in 0..8 {
            for j in 0..15 {
                assert_eq!(k[i][j], av[i / 4][j / 5] * bv[i % 4][j % 5]);
            }
        }
        assert_eq!(kron(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap()).unwrap().dims(), [8, 15]);
    }

    #[test]
    fn shape_checks() {
        use Role::*;
        let fits = |kron: bool, base: &[usize], v: &[(Role, &'static [usize])]| {
            let shapes: Shapes = v.iter().copied().collect();
            if kron {
                fits_kronecker(base, &shapes)
            } else {
                fits_hadamard(base, &shapes)
            }
        };
        let (linear, conv) = ([64, 32], [64, 32, 3, 3]);
        assert!(fits(false, &linear, &[(HadaW1A, &[64, 4]), (HadaW1B, &[4, 32]), (HadaW2A, &[64, 4]), (HadaW2B, &[4, 32])]));
        assert!(fits(false, &conv, &[(HadaW1A, &[64, 4]), (HadaW1B, &[4, 288]), (HadaW2A, &[64, 2]), (HadaW2B, &[2, 288])]));
        let tucker = [
            (HadaW1A, &[4, 64][..]), (HadaW1B, &[4, 32]), (HadaT1, &[4, 4, 3, 3]),
            (HadaW2A, &[4, 64]), (HadaW2B, &[4, 32]), (HadaT2, &[4, 4, 3, 3]),
        ];
        assert!(fits(false, &conv, &tucker));
        assert!(!fits(false, &[64, 32, 1, 1], &tucker));
        assert!(!fits(false, &conv, &tucker[..5]));
        assert!(!fits(false, &linear, &[(HadaW1A, &[64, 4]), (HadaW1B, &[4, 32])]));
        assert!(!fits(false, &linear, &[(HadaW1A, &[64, 4]), (HadaW1B, &[3, 32]), (HadaW2A, &[64, 4]), (HadaW2B, &[4, 32])]));

        assert!(fits(true, &linear, &[(LokrW1, &[8, 4]), (LokrW2, &[8, 8])]));
        assert!(fits(true, &linear, &[(LokrW1A, &[8, 2]), (LokrW1B, &[2, 4]), (LokrW2A, &[8, 2]), (LokrW2B, &[2, 8])]));
        assert!(fits(true, &conv, &[(LokrW1, &[8, 4]), (LokrW2, &[8, 8, 3, 3])]));
        assert!(fits(true, &conv, &[(LokrW1, &[8, 4]), (LokrW2A, &[8, 2]), (LokrW2B, &[2, 72])]));
        assert!(fits(true, &conv, &[(LokrW1, &[8, 4]), (LokrW2A, &[2, 8]), (LokrW2B, &[2, 8]), (LokrT2, &[2, 2, 3, 3])]));
        assert!(!fits(true, &conv, &[(LokrW1, &[8, 4]), (LokrW2A, &[8, 2]), (LokrW2B, &[2, 71])]));
        assert!(!fits(true, &linear, &[(LokrW1, &[8, 4]), (LokrW2, &[8, 9])]));
        assert!(!fits(true, &linear, &[(LokrW1, &[8, 4])]));
        assert!(!fits(true, &linear, &[(LokrW1, &[8, 4]), (LokrW1A, &[8, 1]), (LokrW2, &[8, 8])]));
    }
}
