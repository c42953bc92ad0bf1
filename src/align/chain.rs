//! Chained vector-Jacobian products through a [`Staged`] pass, candle's stand-in for gradient
//! checkpointing: [`record`] runs the pass without a graph and keeps the stack before every
//! layer; [`backward`] then recomputes one layer at a time with a graph, last first, and
//! backpropagates the surrogate `Σ out · upstream`, so memory holds one layer's graph at a
//! time. The gradients are those of one graph through the whole pass.

use candle_core::{Result, Tensor, Var};

use crate::model::staged::{step, Staged};

/// A pass run without a graph: the stack before each layer, and the final stack.
pub struct Tape {
    stacks: Vec<Vec<Tensor>>,
    pub output: Vec<Tensor>,
}

/// Runs `pass` on `input` (which must carry no graph) and records its layer boundaries.
pub fn record(pass: &dyn Staged, input: Vec<Tensor>) -> Result<Tape> {
    let mut stack = input;
    let mut stacks = Vec::with_capacity(pass.layers());
    for i in 0..pass.layers() {
        stacks.push(stack.clone());
        step(pass, i, &mut stack)?;
    }
    Ok(Tape { stacks, output: stack })
}

/// Backpropagates `upstream`, the gradients of the tape's output stack (`None` for zero),
/// through `pass`, recomputing it layer by layer. The gradients of `vars` are added to
/// `grads` (aligned with them); returns the gradients of the input stack.
pub fn backward(
    pass: &dyn Staged,
    tape: Tape,
    mut upstream: Vec<Option<Tensor>>,
    vars: &[&Var],
    grads: &mut [Tensor],
) -> Result<Vec<Option<Tensor>>> {
    let Tape { mut stacks, output } = tape;
    if upstream.len() != output.len() {
        candle_core::bail!("{} upstream gradients for an output stack of {}", upstream.len(), output.len());
    }
    drop(output);
    for i in (0..pass.layers()).rev() {
        let stack = stacks.pop().ok_or_else(|| candle_core::Error::Msg("tape shorter than the pass".into()))?;
        let prefix = stack.len() - pass.reads(i);
        let out_grads = upstream.split_off(prefix);
        if out_grads.iter().all(Option::is_none) {
            upstream.extend((prefix..stack.len()).map(|_| None));
            continue;
        }
        let live = stack[prefix..].iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
        drop(stack);
        let out = pass.run(i, live.iter().map(|v| v.as_tensor().clone()).collect())?;
        if out.len() != out_grads.len() {
            candle_core::bail!("layer {i} returned {} tensors, {} gradients recorded", out.len(), out_grads.len());
        }
        let mut terms = out.iter().zip(&out_grads).filter_map(|(o, g)| g.as_ref().map(|g| (o * g)?.sum_all()));
        let first = terms.next().expect("some upstream gradient is set")?;
        let surrogate = terms.try_fold(first, |acc, t| acc + t?)?;
        let store = surrogate.backward()?;
        for (g, v) in grads.iter_mut().zip(vars) {
            if let Some(d) = store.get(v.as_tensor()) {
                *g = (&*g + d)?;
            }
        }
        upstream.extend(live.iter().map(|v| store.get(v.as_tensor()).cloned()));
    }
    Ok(upstream)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::model::staged::run_all;

    /// `[a]` → `[a, a·w]` → `[a, sin(a·w)·a]` → `[Σ]`: a tensor waiting below the top, one
    /// used twice, and a variable inside a layer.
    struct Toy<'a> {
        w: &'a Var,
    }

    impl Staged for Toy<'_> {
        fn layers(&self) -> usize {
            3
        }

        fn reads(&self, i: usize) -> usize {
            [1, 1, 2][i]
        }

        fn run(&self, i: usize, top: Vec<Tensor>) -> Result<Vec<Tensor>> {
            Ok(match i {
                0 => vec![top[0].clone(), top[0].broadcast_mul(self.w.as_tensor())?],
                1 => vec![top[0].sin()?],
                _ => vec![(&top[0] * &top[1])?.sum_all()?],
            })
        }
    }

    #[test]
    fn chained_products_equal_one_graph() {
        let w = Var::new(&[0.3f64, -1.2, 2.0], &Device::Cpu).unwrap();
        let a = Tensor::new(&[0.5f64, 1.5, -0.7], &Device::Cpu).unwrap();
        let pass = Toy { w: &w };

        let x = Var::from_tensor(&a).unwrap();
        let out = run_all(&pass, vec![x.as_tensor().clone()]).unwrap().remove(0);
        let store = out.backward().unwrap();
        let (dw, dx) = (store.get(w.as_tensor()).unwrap(), store.get(x.as_tensor()).unwrap());

        let tape = record(&pass, vec![a]).unwrap();
        assert_eq!(tape.output[0].to_scalar::<f64>().unwrap(), out.to_scalar::<f64>().unwrap());
        let mut grads = vec![w.zeros_like().unwrap()];
        let one = Tensor::ones((), DType::F64, &Device::Cpu).unwrap();
        let input = backward(&pass, tape, vec![Some(one)], &[&w], &mut grads).unwrap();
        let close = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-14;
        assert!(close(&grads[0], dw));
        assert!(close(input[0].as_ref().unwrap(), dx));

        // No upstream gradient: nothing is recomputed, every gradient is absent.
        let tape = record(&pass, vec![Tensor::new(&[1f64, 2.0, 3.0], &Device::Cpu).unwrap()]).unwrap();
        let none = backward(&pass, tape, vec![None], &[&w], &mut grads).unwrap();
        assert!(none.iter().all(Option::is_none));
    }
}
