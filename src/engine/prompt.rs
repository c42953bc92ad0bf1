//! Prompts → UNet conditioning, as diffusers' pipelines encode them: the last hidden state
//! of one text encoder (SD 1.x / 2.x), or for SDXL both encoders' penultimate hidden states
//! concatenated, the second's pooled projection and the micro-conditioning time ids.

use anyhow::Result;
use candle_core::{Tensor, D};

use super::denoise::uses_guidance;
use super::pipeline::{SdxlText, StableDiffusion};
use crate::lora::PipelineLora;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{AddedConditions, Conditioning};

impl StableDiffusion {
    /// The conditioning of one image: batch 2 (negative first) when guidance is on, else 1.
    /// `negative: None` is diffusers' `negative_prompt=None` (see [`SdxlText`]); `size` is
    /// `(width, height)`, SDXL's original and target size.
    pub fn conditioning(
        &self,
        prompt: &str,
        negative: Option<&str>,
        guidance_scale: f64,
        size: (usize, usize),
        lora: &PipelineLora,
    ) -> Result<Conditioning> {
        let guided = uses_guidance(guidance_scale);
        let mut texts = vec![prompt];
        let Some(sdxl) = &self.sdxl else {
            if guided {
                texts.insert(0, negative.unwrap_or(""));
            }
            let ids = self.token_ids(&self.tokenizer, &texts)?;
            return Ok(Conditioning::text(self.text_encoder.forward(&ids, &lora.text_encoder)?));
        };
        let zero_negative = guided && negative.is_none() && sdxl.force_zeros_for_empty_prompt;
        if guided && !zero_negative {
            texts.insert(0, negative.unwrap_or(""));
        }
        let (mut context, mut pooled) = self.encode_sdxl(sdxl, &texts, lora)?;
        if zero_negative {
            context = Tensor::cat(&[&context.zeros_like()?, &context], 0)?;
            pooled = Tensor::cat(&[&pooled.zeros_like()?, &pooled], 0)?;
        }
        let (w, h) = (size.0 as f32, size.1 as f32);
        let time_ids = Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &self.device)?
            .to_dtype(self.dtype)?
            .repeat((context.dim(0)?, 1))?;
        Ok(Conditioning { context, added: Some(AddedConditions { text_embeds: pooled, time_ids }) })
    }

    /// `(prompt_embeds [n, T, D1 + D2], pooled_prompt_embeds [n, P])` of SDXL's `encode_prompt`.
    fn encode_sdxl(&self, sdxl: &SdxlText, texts: &[&str], lora: &PipelineLora) -> Result<(Tensor, Tensor)> {
        let ids = self.token_ids(&self.tokenizer, texts)?;
        let (hidden, _) = self.text_encoder.forward_penultimate(&ids, &lora.text_encoder)?;
        let ids_2 = self.token_ids(&sdxl.tokenizer_2, texts)?;
        let (hidden_2, last_2) = sdxl.text_encoder_2.forward_penultimate(&ids_2, &lora.text_encoder_2)?;
        let pooled = sdxl.text_encoder_2.project_pooled(&last_2, &ids_2, &lora.text_encoder_2)?;
        Ok((Tensor::cat(&[&hidden, &hidden_2], D::Minus1)?, pooled))
    }

    /// `[n, max_length]` token ids of `texts`.
    fn token_ids(&self, tokenizer: &ClipTokenizer, texts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(texts.len() * tokenizer.max_length());
        for t in texts {
            ids.extend(tokenizer.encode(t)?);
        }
        Ok(Tensor::from_vec(ids, (texts.len(), tokenizer.max_length()), &self.device)?)
    }
}
