//! Adding a module's adapter deltas to its base layer's output, without touching the base
//! weight: low-rank updates as two small layers, the other factorisations as their dense
//! update (rebuilt on the fly), DoRA by its renormalisation.

use candle_core::{Result, Tensor};
use candle_nn::{Conv2dConfig, Module};

use super::update::Update;
use super::LoraDelta;

/// The kind of layer a delta is applied to.
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    Linear,
    Conv2d(&'a Conv2dConfig),
}

impl Layer<'_> {
    /// `x` through the weight `w`, without bias.
    pub fn run(self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let w = w.to_dtype(x.dtype())?;
        match self {
            Layer::Linear => candle_nn::Linear::new(w, None).forward(x),
            Layer::Conv2d(c) => x.conv2d(&w, c.padding, c.stride, c.dilation, c.groups),
        }
    }

    /// A per-channel vector `[n]` laid out to broadcast over the layer's channel dimension.
    pub fn channels(self, v: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Linear => Ok(v.clone()),
            Layer::Conv2d(_) => v.reshape((1, (), 1, 1)),
        }
    }
}

/// A base layer: its kind, weight and output without bias (`wx`).
#[derive(Clone, Copy)]
pub struct Base<'a> {
    pub layer: Layer<'a>,
    pub weight: &'a Tensor,
    pub wx: &'a Tensor,
}

/// The output of the unscaled `update` for `x`, on a layer whose weight has shape `base`.
fn update_output(layer: Layer, x: &Tensor, update: &Update, base: &[usize]) -> Result<Tensor> {
    match (update, layer) {
        (Update::LowRank { down, up }, Layer::Linear) => {
            let down = candle_nn::Linear::new(down.to_dtype(x.dtype())?, None);
            let up = candle_nn::Linear::new(up.to_dtype(x.dtype())?, None);
            up.forward(&down.forward(x)?)
        }
        (Update::LowRank { down, up }, Layer::Conv2d(_)) => {
            let kernel = |t: &Tensor| match t.rank() {
                2 => t.unsqueeze(2)?.unsqueeze(3),
                _ => Ok(t.clone()),
            };
            let h = layer.run(x, &kernel(down)?)?;
            Layer::Conv2d(&Conv2dConfig::default()).run(&h, &kernel(up)?)
        }
        _ => layer.run(x, &update.weight(base)?),
    }
}

/// `y`, the base layer's output for `x` (bias included), plus every delta. `weight` and
/// `bias` are the base layer's.
pub fn apply(
    layer: Layer,
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
                let layer_base = Base { layer, weight, wx };
                dora.output(&layer_base, x, &dense, d.scale, |x| update_output(layer, x, &d.update, base))?
            }
            _ => (update_output(layer, x, &d.update, base)? * d.scale)?,
        };
        out = (out + change)?;
    }
    Ok(out)
}
