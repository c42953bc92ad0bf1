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
        self.map(|t| t.to_dtype(dtype))
    }

    /// Batch items `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, len))
    }

    /// The batch items of every conditioning in `conds`, in order.
    pub fn cat(conds: &[Conditioning]) -> Result<Self> {
        let cat = |part: &dyn Fn(&Conditioning) -> Option<&Tensor>| -> Result<Option<Tensor>> {
            match conds.iter().map(part).collect::<Option<Vec<_>>>() {
                Some(parts) => Tensor::cat(&parts, 0).map(Some),
                None if conds.iter().all(|c| part(c).is_none()) => Ok(None),
                None => candle_core::bail!("conditionings with and without added conditions"),
            }
        };
        let context = cat(&|c| Some(&c.context))?.ok_or_else(|| candle_core::Error::Msg("no conditioning".into()))?;
        let added = match (cat(&|c| c.added.as_ref().map(|a| &a.text_embeds))?, cat(&|c| c.added.as_ref().map(|a| &a.time_ids))?) {
            (Some(text_embeds), Some(time_ids)) => Some(AddedConditions { text_embeds, time_ids }),
            _ => None,
        };
        Ok(Self { context, added })
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let added = match &self.added {
            Some(a) => Some(AddedConditions { text_embeds: f(&a.text_embeds)?, time_ids: f(&a.time_ids)? }),
            None => None,
        };
        Ok(Self { context: f(&self.context)?, added })
    }
}
