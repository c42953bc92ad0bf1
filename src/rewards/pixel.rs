//! Simple pixel-statistics rewards, useful for tests and demos.

use candle_core::{Device, Result, Tensor, D};

use super::Reward;

/// Mean pixel value of each image.
pub struct Brightness;

impl Reward for Brightness {
    fn name(&self) -> &str {
        "brightness"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor> {
        images.flatten_from(1)?.mean(1)
    }
}

/// Mean colourfulness: per pixel, max minus min over the RGB channels.
pub struct Saturation;

impl Reward for Saturation {
    fn name(&self) -> &str {
        "saturation"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor> {
        let spread = (images.max_keepdim(1)? - images.min_keepdim(1)?)?;
        spread.flatten_from(1)?.mean(1)
    }
}

/// Closeness to a target colour: minus the mean squared RGB distance of every pixel to it.
pub struct TargetColor {
    rgb: [f64; 3],
}

impl TargetColor {
    pub fn new(rgb: [f64; 3]) -> Self {
        Self { rgb }
    }
}

impl Reward for TargetColor {
    fn name(&self) -> &str {
        "target_color"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor> {
        let target = Tensor::new(&self.rgb, &Device::Cpu)?
            .to_dtype(images.dtype())?
            .to_device(images.device())?
            .reshape((1, 3, 1, 1))?;
        let dist = images.broadcast_sub(&target)?.sqr()?.sum_keepdim(1)?;
        dist.flatten_from(1)?.mean(D::Minus1)?.neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(rgb: [f32; 3]) -> Tensor {
        Tensor::new(&rgb, &Device::Cpu).unwrap().reshape((1, 3, 1, 1)).unwrap().repeat((2, 1, 4, 4)).unwrap()
    }

    fn scores(r: &dyn Reward, img: &Tensor) -> Vec<f32> {
        r.score(img, &[]).unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn pixel_rewards_order_images_as_expected() {
        let red = image([1.0, 0.0, 0.0]);
        let grey = image([0.5, 0.5, 0.5]);
        assert_eq!(scores(&Brightness, &grey), vec![0.5, 0.5]);
        assert!(scores(&Saturation, &red)[0] > scores(&Saturation, &grey)[0]);
        let to_red = TargetColor::new([1.0, 0.0, 0.0]);
        assert_eq!(scores(&to_red, &red), vec![0.0, 0.0]);
        assert!(scores(&to_red, &grey)[0] < 0.0);
    }
}
