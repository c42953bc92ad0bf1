//! The CPU kernels of `model::ops`: their outputs equal the composed candle ops they replace,
//! and every hand-written backward pass matches f64 finite differences for each
//! differentiable input.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::max_abs_diff;
use sdserve::noise::NoiseRng;
use sdserve::model::nn;
use sdserve::model::ops::with_composed_ops;

fn randn(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    NoiseRng::new(seed).randn(shape, dtype, &Device::Cpu).unwrap()
}

/// Checks the gradient of `loss = Σ f(inputs) ∘ r` w.r.t. each input (all f64 `Var`s) along
/// a random direction against central differences.
fn check_gradients(name: &str, inputs: &[Var], f: impl Fn(&[Tensor]) -> Tensor) {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors);
    let r = randn(99, out.dims(), DType::F64);
    let loss = |ts: &[Tensor]| (f(ts) * &r).unwrap().sum_all().unwrap();
    let grads = loss(&tensors).backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let dir = randn(100 + i as u64, v.dims(), DType::F64);
        let g = grads.get(v).unwrap_or_else(|| panic!("{name}: no gradient for input {i}"));
        let analytic = (g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let h = 1e-5;
        let at = |eps: f64| {
            let mut ts: Vec<Tensor> = inputs.iter().map(|v| v.as_detached_tensor()).collect();
            ts[i] = (&ts[i] + (&dir * eps).unwrap()).unwrap();
            loss(&ts).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-8);
        println!("{name} input {i}: analytic {analytic:.10e} numeric {numeric:.10e} rel {rel:.2e}");
        assert!(analytic.abs() > 1e-6, "{name}: zero gradient for input {i}");
        assert!(rel < 1e-6, "{name} input {i}: relative error {rel:e}");
    }
}

fn vars(shapes: &[&[usize]], seed: u64) -> Vec<Var> {
    shapes.iter().enumerate().map(|(i, s)| Var::from_tensor(&randn(seed + i as u64, s, DType::F64)).unwrap()).collect()
}

#[test]
fn softmax_matches_composed_and_finite_differences() {
    for dtype in [DType::F32, DType::F64] {
        let x = (randn(1, &[3, 5, 37], dtype) * 3.0).unwrap();
        let fast = nn::softmax_last_dim(&x).unwrap();
        let slow = candle_nn::ops::softmax(&x, candle_core::D::Minus1).unwrap();
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
        assert!(max_abs_diff(&fast, &slow) < tol, "{dtype:?}: {}", max_abs_diff(&fast, &slow));
    }
    let x = vars(&[&[2, 3, 19]], 1);
    check_gradients("softmax", &x, |t| nn::softmax_last_dim(&(&t[0] * 2.0).unwrap()).unwrap());
}

/// `[b, s, h·d]` projections viewed as `[b, h, s, d]` (strided), as the models pass them.
fn heads(t: &Tensor, h: usize) -> Tensor {
    let (b, s, c) = t.dims3().unwrap();
    t.reshape((b, s, h, c / h)).unwrap().transpose(1, 2).unwrap()
}

#[test]
fn attention_matches_composed() {
    for dtype in [DType::F32, DType::F64] {
        // Long enough keys to use several query chunks per head; a mask as CLIP builds it.
        for (q_len, k_len) in [(300, 300), (70, 9), (1100, 1030)] {
            let q = heads(&randn(1, &[2, q_len, 24], dtype), 3);
            let k = heads(&randn(2, &[2, k_len, 24], dtype), 3);
            let v = heads(&randn(3, &[2, k_len, 24], dtype), 3);
            let causal: Vec<f32> =
                (0..q_len * k_len).map(|i| if i % k_len > i / k_len { f32::NEG_INFINITY } else { 0.0 }).collect();
            let mask = Tensor::from_vec(causal, (1, 1, q_len, k_len), &Device::Cpu).unwrap();
            for m in [None, Some(&mask)] {
                if m.is_some() && q_len > k_len {
                    continue;
                }
                let fast = nn::attention(&q, &k, &v, m, false).unwrap();
                let slow = with_composed_ops(|| nn::attention(&q, &k, &v, m, false).unwrap());
                let tol = if dtype == DType::F32 { 2e-6 } else { 1e-13 };
                let diff = max_abs_diff(&fast, &slow);
                assert!(diff < tol, "{dtype:?} {q_len}x{k_len} mask {}: {diff}", m.is_some());
            }
        }
    }
}

#[test]
fn attention_gradients_match_finite_differences() {
    // 40 query rows in chunks of 16 (the kernel's minimum) would need 64 Ki keys; instead a
    // small problem exercises the same per-chunk recompute with one chunk per head.
    let qkv = vars(&[&[2, 5, 12], &[2, 7, 12], &[2, 7, 12]], 10);
    check_gradients("attention", &qkv, |t| nn::attention(&heads(&t[0], 2), &heads(&t[1], 2), &heads(&t[2], 2), None, false).unwrap());
    let mask = Tensor::from_vec((0..35).map(|i| if i % 7 > i / 7 + 2 { -1e9 } else { 0.0 }).collect::<Vec<f64>>(), (5, 7), &Device::Cpu)
        .unwrap();
    check_gradients("masked attention", &qkv, |t| {
        nn::attention(&heads(&t[0], 2), &heads(&t[1], 2), &heads(&t[2], 2), Some(&mask), false).unwrap()
    });
}

fn norm_params(c: usize, dtype: DType, seed: u64) -> (Tensor, Tensor) {
    let w = randn(seed, &[c], dtype).affine(0.5, 1.0).unwrap();
    let b = (randn(seed + 1, &[c], dtype) * 0.5).unwrap();
    (w, b)
}

fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
    let vb = candle_nn::VarBuilder::from_tensors(
        [("weight".to_string(), w.clone()), ("bias".to_string(), b.clone())].into(),
        x.dtype(),
        &Device::Cpu,
    );
    let gn = nn::GroupNorm::new(vb, groups, w.dim(0).unwrap(), 1e-5).unwrap();
    if silu {
        gn.forward_silu(x).unwrap()
    } else {
        gn.forward(x).unwrap()
    }
}

fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let vb = candle_nn::VarBuilder::from_tensors(
        [("weight".to_string(), w.clone()), ("bias".to_string(), b.clone())].into(),
        x.dtype(),
        &Device::Cpu,
    );
    nn::LayerNorm::new(vb, w.dim(0).unwrap(), 1e-5).unwrap().forward(x).unwrap()
}

#[test]
fn norms_match_composed() {
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 3e-5 } else { 1e-12 };
        let x = randn(1, &[2, 12, 9, 7], dtype).affine(3.0, 1.0).unwrap();
        let (w, b) = norm_params(12, dtype, 2);
        for silu in [false, true] {
            let fast = group_norm(&x, &w, &b, 4, silu);
            let slow = with_composed_ops(|| group_norm(&x, &w, &b, 4, silu));
            assert!(max_abs_diff(&fast, &slow) < tol, "group norm {dtype:?} silu {silu}: {}", max_abs_diff(&fast, &slow));
        }
        // A strided input (the transformer hands over permuted tokens).
        let t = x.reshape((2, 12, 63)).unwrap().transpose(1, 2).unwrap();
        let fast = layer_norm(&t, &w, &b);
        let slow = with_composed_ops(|| layer_norm(&t, &w, &b));
        assert!(max_abs_diff(&fast, &slow) < tol, "layer norm {dtype:?}: {}", max_abs_diff(&fast, &slow));
    }
}

#[test]
fn norm_gradients_match_finite_differences() {
    for silu in [false, true] {
        let v = vars(&[&[2, 6, 5, 3], &[6], &[6]], 20);
        check_gradients(&format!("group norm (silu {silu})"), &v, |t| {
            let w = (&t[1] + 1.0).unwrap();
            group_norm(&(&t[0] * 2.0).unwrap(), &w, &t[2], 3, silu)
        });
    }
    let v = vars(&[&[3, 4, 7], &[7], &[7]], 30);
    check_gradients("layer norm", &v, |t| layer_norm(&t[0], &(&t[1] + 1.0).unwrap(), &t[2]));
}

fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Tensor {
    let (co, ci, k, _) = w.dims4().unwrap();
    let mut ts = vec![("weight".to_string(), w.clone())];
    if let Some(b) = b {
        ts.push(("bias".to_string(), b.clone()));
    }
    let vb = candle_nn::VarBuilder::from_tensors(ts.into_iter().collect(), x.dtype(), &Device::Cpu);
    nn::Conv2d::new(vb, ci, co, k, stride, padding, b.is_some())
        .unwrap()
        .forward(x, sdserve::lora::LoraSet::none())
        .unwrap()
}

/// (kernel, stride, padding, height, width) of the convolutions the models use.
const CONVS: [(usize, usize, usize, usize, usize); 6] =
    [(3, 1, 1, 9, 7), (3, 2, 1, 9, 8), (3, 2, 0, 10, 9), (1, 1, 0, 5, 6), (3, 1, 0, 6, 5), (1, 2, 0, 7, 7)];

#[test]
fn linear_and_conv_match_composed() {
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
        let x = randn(1, &[2, 7, 11], dtype);
        let (w, b) = (randn(2, &[5, 11], dtype), randn(3, &[5], dtype));
        let lin = |x: &Tensor| nn::linear(x, &candle_nn::Linear::new(w.clone(), Some(b.clone()))).unwrap();
        let diff = max_abs_diff(&lin(&x), &with_composed_ops(|| lin(&x)));
        assert!(diff < tol, "linear {dtype:?}: {diff}");
        for (k, s, p, h, wd) in CONVS {
            let x = randn(4, &[2, 6, h, wd], dtype);
            let (w, b) = (randn(5, &[4, 6, k, k], dtype), randn(6, &[4], dtype));
            for bias in [None, Some(&b)] {
                let fast = conv(&x, &w, bias, s, p);
                let slow = with_composed_ops(|| conv(&x, &w, bias, s, p));
                let diff = max_abs_diff(&fast, &slow);
                assert!(diff < tol, "conv {dtype:?} k{k} s{s} p{p}: {diff}");
            }
        }
    }
}

#[test]
fn linear_and_conv_gradients_match_finite_differences() {
    let v = vars(&[&[2, 3, 6], &[4, 6], &[4]], 40);
    check_gradients("linear", &v, |t| nn::linear(&t[0], &candle_nn::Linear::new(t[1].clone(), Some(t[2].clone()))).unwrap());
    for (i, (k, s, p, h, w)) in CONVS.into_iter().enumerate() {
        let v = vars(&[&[2, 3, h, w], &[4, 3, k, k], &[4]], 50 + 10 * i as u64);
        check_gradients(&format!("conv k{k} s{s} p{p}"), &v, |t| conv(&t[0], &t[1], Some(&t[2]), s, p));
    }
}

/// A frozen (plain tensor) weight gets no gradient entry: the backward pass computes only
/// the input's gradient.
#[test]
fn frozen_weights_get_no_gradient() {
    let x = Var::from_tensor(&randn(1, &[1, 3, 6, 6], DType::F32)).unwrap();
    let (w, b) = (randn(2, &[4, 3, 3, 3], DType::F32), randn(3, &[4], DType::F32));
    let y = conv(x.as_tensor(), &w, Some(&b), 1, 1);
    let lw = randn(4, &[5, 36], DType::F32);
    let z = nn::linear(&y.flatten_from(2).unwrap(), &candle_nn::Linear::new(lw.clone(), None)).unwrap();
    let grads = z.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_some());
    for t in [&w, &b, &lw] {
        assert!(grads.get(t).is_none(), "a frozen weight got a gradient");
    }
}

#[test]
fn geglu_matches_composed_and_finite_differences() {
    for dtype in [DType::F32, DType::F64] {
        let h = randn(1, &[2, 9, 22], dtype).affine(2.0, 0.0).unwrap();
        let fast = nn::geglu(&h).unwrap();
        let slow = with_composed_ops(|| nn::geglu(&h).unwrap());
        let tol = if dtype == DType::F32 { 3e-6 } else { 1e-14 };
        assert!(max_abs_diff(&fast, &slow) < tol, "{dtype:?}: {}", max_abs_diff(&fast, &slow));
    }
    let h = vars(&[&[3, 4, 10]], 60);
    check_gradients("geglu", &h, |t| nn::geglu(&(&t[0] * 2.0).unwrap()).unwrap());
}
