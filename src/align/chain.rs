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
