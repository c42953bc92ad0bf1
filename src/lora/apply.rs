//! Adding a module's adapter deltas to its base layer's output, without touching the base
//! weight: low-rank updates as two small layers, the other factorisations as their dense
//! update (rebuilt on the fly), DoRA by its renormalisation. Every product runs through the
//! model's own [`Kernel`], so adapters take the base layers' fast paths.

use candle_core::{Result, Tensor};
use candle_nn::Conv2dConfig;

use super::update::Update;
use super::LoraDelta;

/// The kind of layer a delta is applied to.
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    Linear,
    Conv2d(&'a Conv2dConfig),
}

/// How the model runs an input through a weight of its dtype, without bias, as a layer of the
/// given kind.
pub type Kernel = fn(Layer, &Tensor, &Tensor) -> Result<Tensor>;

impl Layer<'_> {
    /// `x` through the weight `w`, without bias.
    pub fn run(self, kernel: Kernel, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        kernel(self, x, &w.to_dtype(x.dtype())?)
    }

    /// A per-channel vector `[n]` laid out to broadcast over the layer's channel dimension.
    pub fn channels(self, v: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Linear => Ok(v.clone()),
            Layer::Conv2d(_) => v.reshape((1, (), 1, 1)),
        }
    }
}

/// A base layer: its kind and kernel, weight and output without bias (`wx`).
#[derive(Clone, Copy)]
pub struct Base<'a> {
    pub layer: Layer<'a>,
    pub kernel: Kernel,
    pub weight: &'a Tensor,
    pub wx: &'a Tensor,
}

/// The output of the unscaled `update` for `x`, on a layer whose weight has shape `base`.
fn update_output(layer: Layer, kernel: Kernel, x: &Tensor, update: &Update, base: &[usize]) -> Result<Tensor> {
    match (update, layer) {
        (Update::LowRank { down, up }, Layer::Linear) => layer.run(kernel, &layer.run(kernel, x, down)?, up),
        (Update::LowRank { down, up }, Layer::Conv2d(_)) => {
            let as_kernel = |t: &Tensor| match t.rank() {
                2 => t.unsqueeze(2)?.unsqueeze(3),
                _ => Ok(t.clone()),
            };
            let h = layer.run(kernel, x, &as_kernel(down)?)?;
            Layer::Conv2d(&Conv2dConfig::default()).run(kernel, &h, &as_kernel(up)?)
        }
        _ => layer.run(kernel, x, &update.weight(base)?),
    }
}

/// `y`, the base layer's output for `x` (bias included), plus every delta. `weight` and
/// `bias` are the base layer's, `kernel` how it runs.
pub fn apply(
    layer: Layer,
    kernel: Kernel,
    x: &Tensor,
    y: Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    deltas: &[LoraDelta],
) -> Result<Tensor> {
    let base = weight.dims();
    let wx = if deltas.iter().any(|d| d.dora.is_some()) {
        Some(match bias {
            Some(b) => y.broadcast_sub(&layer.channels(&b.to_dtype(y.dtype())?)?)?,
            None => y.clone(),
        })
    } else {
        None
    };
    let mut out = y;
    for d in deltas {
        let change = match (&d.dora, &wx) {
            (Some(dora), Some(wx)) => {
                let dense = d.update.weight(base)?;
                let layer_base = Base { layer, kernel, weight, wx };
                // A dense update (LoHa, LoKr, Tucker) runs with the weight built once above.
                let delta = |x: &Tensor| match &d.update {
                    Update::LowRank { .. } => update_output(layer, kernel, x, &d.update, base),
                    _ => layer.run(kernel, x, &dense),
                };
                dora.output(&layer_base, x, &dense, d.scale, delta)?
            }
            _ => (update_output(layer, kernel, x, &d.update, base)? * d.scale)?,
        };
        out = (out + change)?;
    }
    Ok(out)
}
