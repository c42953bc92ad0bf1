//! transformers' CLIP text and vision towers (`CLIPTextModel`, `CLIPVisionModel`, with
//! their projections when the file has them), built from differentiable ops only.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

use crate::lora::LoraSet;
use crate::model::config::{ClipTextConfig, ClipVisionConfig};
use crate::model::nn::{attention, LayerNorm, Linear};

/// transformers' default `projection_dim`, used when the config leaves it out.
const DEFAULT_PROJECTION_DIM: usize = 512;

/// The MLP activation named by `hidden_act`.
#[derive(Clone, Copy, Debug)]
enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            _ => bail!("unsupported CLIP hidden_act {name:?}"),
        })
    }

    fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::GeluErf => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
        })
    }
}

/// The sizes shared by the text and vision encoders.
struct EncoderDims<'a> {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    eps: f64,
    act: &'a str,
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, hidden: usize, heads: usize) -> Result<Self> {
        if heads == 0 || !hidden.is_multiple_of(heads) {
            bail!("CLIP hidden_size {hidden} is not a multiple of num_attention_heads {heads}");
        }
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), hidden, hidden, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), hidden, hidden, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), hidden, hidden, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), hidden, hidden, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, lora: &LoraSet) -> Result<Tensor> {
        let (b, s, hidden) = x.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, hidden / self.heads))?
                .transpose(1, 2)
        };
        let q = split(self.q_proj.forward(x, lora)?)?;
        let k = split(self.k_proj.forward(x, lora)?)?;
        let v = split(self.v_proj.forward(x, lora)?)?;
        let out = attention(&q, &k, &v, mask, true)?
            .transpose(1, 2)?
            .reshape((b, s, hidden))?;
        Ok(self.out_proj.forward(&out, lora)?)
    }
}

struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, d: &EncoderDims) -> Result<Self> {
        Ok(Self {
            self_attn: SelfAttention::new(vb.pp("self_attn"), d.hidden, d.heads)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d.hidden, d.eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), d.hidden, d.intermediate, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), d.intermediate, d.hidden, true)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d.hidden, d.eps)?,
            act: Activation::parse(d.act)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, lora: &LoraSet) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask, lora)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?, lora)?;
        let h = self.fc2.forward(&self.act.forward(&h)?, lora)?;
        Ok((x + h)?)
    }
}

/// `encoder.layers.{i}`: pre-norm transformer blocks.
struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    fn new(vb: VarBuilder, d: &EncoderDims) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..d.layers)
            .map(|i| EncoderLayer::new(vb.pp(i), d))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, lora: &LoraSet) -> Result<Tensor> {
        Ok(self.forward_last_two(x, mask, lora)?.1)
    }

    /// The input and output of the last layer (transformers' `hidden_states[-2]` and `[-1]`).
    fn forward_last_two(&self, x: &Tensor, mask: Option<&Tensor>, lora: &LoraSet) -> Result<(Tensor, Tensor)> {
        let (mut prev, mut x) = (x.clone(), x.clone());
        for layer in &self.layers {
            prev = x;
            x = layer.forward(&prev, mask, lora)?;
        }
        Ok((prev, x))
    }
}

/// transformers `CLIPTextModel` (plus `text_projection` of `CLIPTextModelWithProjection` /
/// `CLIPModel` files when present).
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    projection_dim: usize,
    eos_token_id: u32,
}

impl ClipTextModel {
    /// `vb` is the root of the weight file (`text_model.*`, optionally `text_projection`).
    /// LoRA deltas are looked up as `text_model.encoder.layers.{i}.self_attn.q_proj` etc.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let projection_dim = cfg.projection_dim.unwrap_or(DEFAULT_PROJECTION_DIM);
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            Some(Linear::new(
                vb.pp("text_projection"),
                cfg.hidden_size,
                projection_dim,
                false,
            )?)
        } else {
            None
        };
        let vb = under_prefix(vb, "text_model", "embeddings.token_embedding.weight");
        let emb = vb.pp("embeddings");
        let dims = EncoderDims {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: &cfg.hidden_act,
        };
        Ok(Self {
            token_embedding: emb
                .get((cfg.vocab_size, cfg.hidden_size), "token_embedding.weight")?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, cfg.hidden_size),
                "position_embedding.weight",
            )?,
            encoder: Encoder::new(vb.pp("encoder"), &dims)?,
            final_layer_norm: LayerNorm::new(
                vb.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            text_projection,
            projection_dim,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// `last_hidden_state` (after `final_layer_norm`) for `[batch, seq]` u32 or i64 token ids.
    pub fn forward(&self, input_ids: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        Ok(self.forward_penultimate(input_ids, lora)?.1)
    }

    /// The penultimate hidden state (`hidden_states[-2]`, no final norm), which SDXL
    /// conditions on, and `last_hidden_state`.
    pub fn forward_penultimate(&self, input_ids: &Tensor, lora: &LoraSet) -> Result<(Tensor, Tensor)> {
        let (b, s) = input_ids
            .dims2()
            .context("CLIP input_ids must be [batch, seq]")?;
        let max_positions = self.position_embedding.dim(0)?;
        if s > max_positions {
            bail!("CLIP input of {s} tokens exceeds max_position_embeddings {max_positions}");
        }
        let ids = input_ids
            .to_device(self.token_embedding.device())?
            .to_dtype(DType::U32)?
            .flatten_all()?;
        let tokens = self
            .token_embedding
            .index_select(&ids, 0)?
            .reshape((b, s, ()))?;
        let x = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        let mask = causal_mask(s, x.dtype(), x.device())?;
        let (penultimate, last) = self.encoder.forward_last_two(&x, Some(&mask), lora)?;
        Ok((penultimate, self.final_layer_norm.forward(&last)?))
    }

    /// `pooler_output`: the hidden state at each sequence's first `eos_token_id` (transformers
    /// ≥ 4.30), or at its largest token id when the config has the legacy `eos_token_id` 2.
    pub fn pooled(&self, hidden: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let pos = if self.eos_token_id == 2 {
                    argmax(row.iter().copied())
                } else {
                    argmax(
                        row.iter()
                            .map(|&t| i64::from(t == i64::from(self.eos_token_id))),
                    )
                };
                hidden.i((b, pos))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// `text_embeds`: the projected pooled output (`CLIPTextModelWithProjection`).
    pub fn text_embeds(&self, input_ids: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        self.project_pooled(&self.forward(input_ids, lora)?, input_ids, lora)
    }

    /// `text_embeds` from an already computed `last_hidden_state`.
    pub fn project_pooled(&self, hidden: &Tensor, input_ids: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let proj = self
            .text_projection
            .as_ref()
            .context("the CLIP weights have no text_projection")?;
        Ok(proj.forward(&self.pooled(hidden, input_ids)?, lora)?)
    }

    /// Width of `text_embeds`, when the weights have `text_projection`.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection.is_some().then_some(self.projection_dim)
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.token_embedding.dims()[1]
    }
}

/// transformers `CLIPVisionModel` (plus `visual_projection` when present).
pub struct ClipVisionModel {
    class_embedding: Tensor,
    /// The stride-`patch` convolution kernel as a `[hidden, channels·patch·patch]` matrix.
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    channels: usize,
    image_size: usize,
    patch: usize,
}

impl ClipVisionModel {
    /// `vb` is the root of the weight file (`vision_model.*`, optionally `visual_projection`).
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let (hidden, channels, patch) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        if patch == 0 || !cfg.image_size.is_multiple_of(patch) {
            bail!(
                "CLIP image_size {} is not a multiple of patch_size {patch}",
                cfg.image_size
            );
        }
        let visual_projection = if vb.contains_tensor("visual_projection.weight") {
            let dim = cfg.projection_dim.unwrap_or(DEFAULT_PROJECTION_DIM);
            Some(Linear::new(vb.pp("visual_projection"), hidden, dim, false)?)
        } else {
            None
        };
        let vb = under_prefix(vb, "vision_model", "embeddings.class_embedding");
        let emb = vb.pp("embeddings");
        let positions = (cfg.image_size / patch).pow(2) + 1;
        let dims = EncoderDims {
            hidden,
            intermediate: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: &cfg.hidden_act,
        };
        Ok(Self {
            class_embedding: emb.get(hidden, "class_embedding")?,
            patch_embedding: emb
                .get((hidden, channels, patch, patch), "patch_embedding.weight")?
                .reshape((hidden, ()))?,
            position_embedding: emb.get((positions, hidden), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), hidden, cfg.layer_norm_eps)?,
            encoder: Encoder::new(vb.pp("encoder"), &dims)?,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), hidden, cfg.layer_norm_eps)?,
            visual_projection,
            channels,
            image_size: cfg.image_size,
            patch,
        })
    }

    /// `pooler_output`: `post_layernorm` of the class token, for `[batch, channels, size, size]`
    /// pixels already normalised with CLIP's mean and std.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let patch_embeds = self.patch_embeds(pixel_values)?;
        let (b, _, hidden) = patch_embeds.dims3()?;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let x =
            Tensor::cat(&[&class, &patch_embeds], 1)?.broadcast_add(&self.position_embedding)?;
        let x = self.pre_layrnorm.forward(&x)?;
        let x = self.encoder.forward(&x, None, LoraSet::none())?;
        Ok(self.post_layernorm.forward(&x.i((.., 0))?)?)
    }

    /// The stride-`patch` convolution as a matmul over non-overlapping patches:
    /// `[batch, patches, hidden]`, patches in row-major order.
    fn patch_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values
            .dims4()
            .context("CLIP pixel_values must be [batch, channels, height, width]")?;
        if c != self.channels || h != self.image_size || w != self.image_size {
            bail!(
                "CLIP vision input is {c}x{h}x{w}, expected {}x{size}x{size}",
                self.channels,
                size = self.image_size
            );
        }
        let (p, g) = (self.patch, self.image_size / self.patch);
        let patches = pixel_values
            .to_dtype(self.patch_embedding.dtype())?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        Ok(patches.broadcast_matmul(&self.patch_embedding.t()?)?)
    }

    /// `image_embeds`: the projected pooled output (`CLIPVisionModelWithProjection`).
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let proj = self
            .visual_projection
            .as_ref()
            .context("the CLIP weights have no visual_projection")?;
        Ok(proj.forward(&self.forward(pixel_values)?, LoraSet::none())?)
    }
}

/// `vb.pp(prefix)`, also for files that store the tower without the prefix (transformers v5
/// saves `CLIPTextModel` as `embeddings.*`, `encoder.*`), so that module paths and the LoRA
/// keys matched against them are always `prefix.…`. `probe` is a tensor every file has.
fn under_prefix<'a>(vb: VarBuilder<'a>, prefix: &str, probe: &str) -> VarBuilder<'a> {
    if vb.contains_tensor(&format!("{prefix}.{probe}")) || !vb.contains_tensor(probe) {
        return vb.pp(prefix);
    }
    let strip = format!("{prefix}.");
    vb.rename_f(move |name| name.strip_prefix(&strip).unwrap_or(name).to_owned())
        .pp(prefix)
}

/// The additive causal mask `[1, 1, seq, seq]`: 0 on and below the diagonal, the most
/// negative f32 above it (transformers uses the dtype's minimum; in f16 this becomes -inf).
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (1, 1, seq, seq), device)?.to_dtype(dtype)?)
}

/// Index of the first maximum (`torch.argmax`).
fn argmax(values: impl Iterator<Item = i64>) -> usize {
    let mut best = (0, i64::MIN);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_nn::VarMap;

    use super::*;

    #[test]
    fn patch_embedding_is_the_strided_conv() -> Result<()> {
        let cfg: ClipVisionConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 0,
            "num_attention_heads": 2, "image_size": 6, "patch_size": 3,
        }))?;
        let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F64, &Device::Cpu);
        let kernel = Tensor::randn(0f64, 1.0, (8, 3, 3, 3), &Device::Cpu)?;
        let model = ClipVisionModel {
            patch_embedding: kernel.reshape((8, ()))?,
            ..ClipVisionModel::new(vb, &cfg)?
        };
        let x = Tensor::randn(0f64, 1.0, (2, 3, 6, 6), &Device::Cpu)?;
        let conv = x
            .conv2d(&kernel, 0, 3, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let err = (model.patch_embeds(&x)? - conv)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(
            err < 1e-12,
            "patch embedding differs from the conv by {err}"
        );
        Ok(())
    }
}
