//! A forward pass as a sequence of layers over a stack of tensors, so that training can keep
//! only the tensors between layers and recompute one layer at a time during the backward pass
//! (candle has no gradient checkpointing; see `align::chain`).
//!
//! Layer `i` reads the top [`Staged::reads`] tensors of the stack and replaces them with the
//! tensors it returns; the rest of the stack passes through untouched (the UNet keeps its skip
//! connections there).

use candle_core::{Result, Tensor};

/// A forward pass split into layers.
pub trait Staged {
    /// Number of layers.
    fn layers(&self) -> usize;
    /// How many tensors from the top of the stack layer `i` reads and replaces.
    fn reads(&self, i: usize) -> usize;
    /// Runs layer `i` on the top of the stack (`reads(i)` tensors, bottom first) and returns
    /// the tensors that replace them.
    fn run(&self, i: usize, top: Vec<Tensor>) -> Result<Vec<Tensor>>;
}

/// Runs layer `i` on `stack` in place.
pub fn step(pass: &dyn Staged, i: usize, stack: &mut Vec<Tensor>) -> Result<()> {
    let reads = pass.reads(i);
    if reads > stack.len() {
        candle_core::bail!("layer {i} reads {reads} tensors from a stack of {}", stack.len());
    }
    let top = stack.split_off(stack.len() - reads);
    stack.extend(pass.run(i, top)?);
    Ok(())
}

/// Runs every layer: the whole forward pass from `input` to the final stack.
pub fn run_all(pass: &dyn Staged, input: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let mut stack = input;
    for i in 0..pass.layers() {
        step(pass, i, &mut stack)?;
    }
    Ok(stack)
}

/// The single tensor a pass ends with.
pub fn run_to_one(pass: &dyn Staged, input: Tensor) -> Result<Tensor> {
    single(&run_all(pass, vec![input])?)
}

/// The one tensor of a finished pass's stack (an error when it holds more or none).
pub fn single(stack: &[Tensor]) -> Result<Tensor> {
    match stack {
        [t] => Ok(t.clone()),
        _ => candle_core::bail!("the pass did not end with a single tensor"),
    }
}
