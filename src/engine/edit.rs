//! Image-to-image and inpainting, as diffusers' `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` with a 4-channel UNet (the known region is re-noised to
//! the next step's level and put back after every step).

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::pipeline::{GenerateParams, StableDiffusion};
use super::scheduler::Scheduler;
use crate::lora::PipelineLora;

/// An edit: the generation parameters plus the image, an optional mask and the strength.
#[derive(Clone, Debug)]
pub struct EditParams {
    /// Prompt, steps, guidance, seed, size (the image's), scheduler. `latents`, if given, is
    /// the noise added to the image latents (diffusers draws it after the encoder's sample).
    pub generate: GenerateParams,
    /// The input image `[1, 3, H, W]` in `[0, 1]`, at the output size.
    pub image: Tensor,
    /// Where to repaint, `[1, 1, H, W]`: 1 repaints, 0 keeps (binarised already); `None`
    /// edits the whole image (image-to-image).
    pub mask: Option<Tensor>,
    /// How much of the schedule is redone, in `(0, 1]`: the last `⌊steps · strength⌋` steps.
    pub strength: f64,
    /// The VAE encoder's posterior sample noise `[1, C, h, w]` (drawn first from the seed
    /// when `None`).
    pub posterior_noise: Option<Tensor>,
}

/// The first step index that runs when `strength` of `steps` steps is redone (diffusers'
/// `get_timesteps`): the last `⌊steps · strength⌋` steps run.
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        bail!("strength must be in (0, 1], got {strength}");
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        bail!("strength {strength} of {steps} steps leaves no step to run; raise strength or steps");
    }
    Ok(steps - run)
}

/// A pixel mask `[B, 1, H, W]` at latent resolution, as torch's nearest interpolation picks
/// it: every `factor`-th pixel, starting at 0.
fn latent_mask(mask: &Tensor, factor: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    mask.reshape((b, c, h / factor, factor, w / factor, factor))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, h / factor, w / factor))
}

impl StableDiffusion {
    /// Images `[B, 3, H, W]` in `[-1, 1]` → scaled latents in the model's dtype, with the
    /// posterior sampled by `noise` (diffusers' `retrieve_latents(..., sample_mode="sample")`
    /// times the scaling factor), computed in the VAE's dtype.
    pub fn encode(&self, images: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
        let vae = |t: &Tensor| t.to_dtype(self.vae_dtype);
        let z = self.vae.encode(&vae(images)?)?.sample(&vae(noise)?)?;
        self.vae.scale(&z)?.to_dtype(self.dtype)
    }

    /// Runs an edit; `on_step(done, total)` as in [`StableDiffusion::generate`], over the
    /// steps that run.
    pub fn edit(
        &self,
        params: &EditParams,
        lora: &PipelineLora,
        on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let g = &params.generate;
        let shape = self.latent_shape(g.width, g.height)?;
        if params.image.dims() != [1, 3, g.height, g.width] {
            bail!("the image must be [1, 3, {}, {}], got {:?}", g.height, g.width, params.image.dims());
        }
        if let Some(m) = &params.mask {
            if m.dims() != [1, 1, g.height, g.width] {
                bail!("the mask must be [1, 1, {}, {}], got {:?}", g.height, g.width, m.dims());
            }
        }
        let start = first_step(g.steps, params.strength)?;
        let mut sampler = self.sampler(g, lora)?;
        let draw = |given: &Option<Tensor>, sampler: &mut super::pipeline::Sampler| match given {
            Some(n) => self.check_latents(n, shape),
            None => Ok(sampler.rng.randn(shape, self.dtype, &self.device)?),
        };
        let posterior_noise = draw(&params.posterior_noise, &mut sampler)?;
        let image = params.image.to_dtype(self.dtype)?.to_device(&self.device)?.affine(2.0, -1.0)?;
        let image_latents = self.encode(&image, &posterior_noise)?;
        let noise = draw(&g.latents, &mut sampler)?;
        let latents = match &params.mask {
            // inpainting at full strength starts from pure noise, as diffusers does
            Some(_) if params.strength == 1.0 => (&noise * sampler.scheduler.init_noise_sigma())?,
            _ => sampler.scheduler.add_noise(&image_latents, &noise, start)?,
        };
        let latents = match &params.mask {
            None => self.denoise(&mut sampler, latents, start, &lora.unet, &mut |_, _, l| Ok(l), on_step)?,
            Some(mask) => {
                let keep_mask = latent_mask(mask, self.vae_scale())?.to_dtype(self.dtype)?.to_device(&self.device)?;
                let keep = keep_mask.affine(-1.0, 1.0)?;
                let last = sampler.scheduler.timesteps().len() - 1;
                let mut blend = |scheduler: &dyn Scheduler, i: usize, latents: Tensor| -> Result<Tensor> {
                    let known = if i < last {
                        scheduler.add_noise(&image_latents, &noise, i + 1)?
                    } else {
                        image_latents.clone()
                    };
                    Ok((known.broadcast_mul(&keep)? + latents.broadcast_mul(&keep_mask)?)?)
                };
                self.denoise(&mut sampler, latents, start, &lora.unet, &mut blend, on_step)?
            }
        };
        Ok(self.decode(&latents)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_that_run_follow_diffusers() {
        assert_eq!(first_step(10, 0.6).unwrap(), 4);
        assert_eq!(first_step(10, 0.7).unwrap(), 3);
        assert_eq!(first_step(10, 1.0).unwrap(), 0);
        assert_eq!(first_step(50, 0.75).unwrap(), 13);
        assert_eq!(first_step(3, 0.34).unwrap(), 2);
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(first_step(10, bad).is_err(), "{bad}");
        }
        assert!(format!("{:#}", first_step(3, 0.3).unwrap_err()).contains("no step"));
    }

    #[test]
    fn latent_mask_picks_every_factor_th_pixel() {
        let v: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let m = Tensor::from_vec(v, (1, 1, 8, 8), &candle_core::Device::Cpu).unwrap();
        let small = latent_mask(&m, 4).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(small, [0.0, 4.0, 32.0, 36.0]);
    }
}
