//! What the UNet is conditioned on besides the noisy sample and the timestep.

use candle_core::{DType, Result, Tensor};

/// The text conditioning of a UNet call, one row per batch item.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// `[B, T, cross_attention_dim]` text embeddings for cross-attention
    /// (`encoder_hidden_states`).
    pub context: Tensor,
    /// SDXL's `added_cond_kwargs`, for UNets with `addition_embed_type: "text_time"`.
    pub added: Option<AddedConditions>,
}

/// The pooled text embedding and micro-conditioning time ids of SDXL.
#[derive(Clone, Debug)]
pub struct AddedConditions {
    /// `[B, projection_dim]`: the second text encoder's projected pooled output (`text_embeds`).
    pub text_embeds: Tensor,
    /// `[B, 6]`: original size (h, w), crop top-left (y, x) and target size (h, w) (`time_ids`).
    pub time_ids: Tensor,
}

impl Conditioning {
    /// Cross-attention context alone (SD 1.x / 2.x).
    pub fn text(context: Tensor) -> Self {
        Self { context, added: None }
    }

    /// Number of batch items.
    pub fn batch(&self) -> Result<usize> {
        self.context.dim(0)
    }

    /// Every tensor converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let added = match &self.added {
            Some(a) => Some(AddedConditions { text_embeds: a.text_embeds.to_dtype(dtype)?, time_ids: a.time_ids.to_dtype(dtype)? }),
            None => None,
        };
        Ok(Self { context: self.context.to_dtype(dtype)?, added })
    }
}
