//! Decoding latents in pieces to bound memory, as diffusers' `AutoencoderKL` does after
//! `enable_slicing()` / `enable_tiling()`: one image of the batch at a time (the same result),
//! or overlapping spatial tiles blended linearly at the seams (an approximation of the full
//! decode, with diffusers' algorithm and defaults, so it matches diffusers' tiled output).

use candle_core::{Result, Tensor};

use crate::model::vae::AutoencoderKL;

/// Fraction of a tile that overlaps its neighbour (diffusers' `tile_overlap_factor`).
const OVERLAP: f64 = 0.25;

/// `b` with its first `extent` rows (`dim` 2) or columns (`dim` 3) blended from the last
/// `extent` of `a`: `a·(1 − y/extent) + b·(y/extent)` (diffusers' `blend_v` / `blend_h`).
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let ramp = |f: &dyn Fn(f64) -> f64| {
        let w: Vec<f64> = (0..extent).map(|y| f(y as f64 / extent as f64)).collect();
        let shape = if dim == 2 { (1, 1, extent, 1) } else { (1, 1, 1, extent) };
        Tensor::from_vec(w, shape, b.device())?.to_dtype(b.dtype())
    };
    let (wa, wb) = (ramp(&|t| 1.0 - t)?, ramp(&|t| t)?);
    let tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = (tail.broadcast_mul(&wa)? + b.narrow(dim, 0, extent)?.broadcast_mul(&wb)?)?;
    Tensor::cat(&[&head, &b.narrow(dim, extent, b.dim(dim)? - extent)?], dim)
}

impl AutoencoderKL {
    /// Latent side of one tile: the config's `sample_size` in latent cells.
    fn tile_latent(&self) -> usize {
        (self.config().sample_size / self.config().downscale()).max(1)
    }

    /// [`AutoencoderKL::decode`] one batch item at a time (diffusers' slicing): the same
    /// images with the activations of one image in memory.
    pub fn decode_sliced(&self, z: &Tensor) -> Result<Tensor> {
        let images = (0..z.dim(0)?).map(|i| self.decode(&z.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }

    /// [`AutoencoderKL::decode`] in overlapping tiles of `sample_size` pixels (diffusers'
    /// `tiled_decode`): memory of one tile whatever the image size, seams blended over a
    /// quarter tile. Latents no larger than a tile are decoded whole.
    pub fn decode_tiled(&self, z: &Tensor) -> Result<Tensor> {
        let tile = self.tile_latent();
        let (_, _, h, w) = z.dims4()?;
        if h <= tile && w <= tile {
            return self.decode(z);
        }
        let step = ((tile as f64 * (1.0 - OVERLAP)) as usize).max(1);
        let tile_px = self.config().sample_size;
        let extent = (tile_px as f64 * OVERLAP) as usize;
        let keep = tile_px - extent;
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..h).step_by(step) {
            let mut row: Vec<Tensor> = Vec::new();
            for j in (0..w).step_by(step) {
                let part = z.narrow(2, i, tile.min(h - i))?.narrow(3, j, tile.min(w - j))?;
                let mut t = self.decode(&part)?;
                if let Some(above) = rows.last() {
                    t = blend(&above[row.len()], &t, extent, 2)?;
                }
                if let Some(left) = row.last() {
                    t = blend(left, &t, extent, 3)?;
                }
                row.push(t);
            }
            rows.push(row);
        }
        let crop = |t: &Tensor| t.narrow(2, 0, keep.min(t.dim(2)?))?.narrow(3, 0, keep.min(t.dim(3)?));
        let bands = rows
            .iter()
            .map(|row| Tensor::cat(&row.iter().map(crop).collect::<Result<Vec<_>>>()?, 3))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&bands, 2)
    }
}
