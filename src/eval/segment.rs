//! Per-pixel colour labels: background estimate, hue/chroma classification against the
//! palette, and a 3×3 majority cleanup.

use image::RgbImage;

use crate::dataset::Color;

/// Minimum chroma (max − min channel) of a shape pixel; palette fills have 140–205.
const CHROMA_MIN: i32 = 64;
/// Largest hue distance, in degrees, from a pixel to its palette colour.
const HUE_MAX: f64 = 40.0;

/// A pixel label per pixel, row-major: `None` for background.
pub type Labels = Vec<Option<Color>>;

/// The background colour: the per-channel median of the border pixels.
pub fn background(img: &RgbImage) -> [u8; 3] {
    let (w, h) = img.dimensions();
    let border: Vec<[u8; 3]> = img
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == w || *y + 1 == h)
        .map(|(_, _, p)| p.0)
        .collect();
    [0, 1, 2].map(|c| {
        let mut v: Vec<u8> = border.iter().map(|p| p[c]).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(255)
    })
}

fn chroma(p: [u8; 3]) -> i32 {
    *p.iter().max().unwrap_or(&0) as i32 - *p.iter().min().unwrap_or(&0) as i32
}

/// HSV hue in degrees; `None` for greys.
fn hue(p: [u8; 3]) -> Option<f64> {
    let [r, g, b] = p.map(f64::from);
    let c = chroma(p) as f64;
    if c == 0.0 {
        return None;
    }
    let max = r.max(g).max(b);
    let h = if max == r {
        (g - b) / c
    } else if max == g {
        (b - r) / c + 2.0
    } else {
        (r - g) / c + 4.0
    };
    Some((60.0 * h).rem_euclid(360.0))
}

fn hue_distance(a: f64, b: f64) -> f64 {
    let d = (a - b).abs();
    d.min(360.0 - d)
}

/// The palette colour of a pixel: clearly more saturated than the background and close in
/// hue to a palette colour (so brightness shifts and blur toward the background still count).
fn classify(p: [u8; 3], background_chroma: i32) -> Option<Color> {
    if chroma(p) < CHROMA_MIN.max(background_chroma + CHROMA_MIN / 2) {
        return None;
    }
    let h = hue(p)?;
    let (color, d) = Color::ALL
        .into_iter()
        .filter_map(|c| Some((c, hue_distance(h, hue(c.rgb())?))))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    (d <= HUE_MAX).then_some(color)
}

/// Sets each pixel to the label held by at least 6 of its 3×3 neighbourhood, if any: removes
/// speckles and fills pinholes without moving straight edges.
fn majority(labels: &Labels, w: usize, h: usize) -> Labels {
    (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let mut votes: Vec<(Option<Color>, usize)> = Vec::with_capacity(9);
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let l = labels[ny * w + nx];
                    match votes.iter_mut().find(|(v, _)| *v == l) {
                        Some((_, n)) => *n += 1,
                        None => votes.push((l, 1)),
                    }
                }
            }
            votes.into_iter().find(|(_, n)| *n >= 6).map_or(labels[i], |(l, _)| l)
        })
        .collect()
}

/// Labels every pixel of `img`, after cleanup.
pub fn labels(img: &RgbImage) -> Labels {
    let background_chroma = chroma(background(img));
    let raw: Labels = img.pixels().map(|p| classify(p.0, background_chroma)).collect();
    majority(&raw, img.width() as usize, img.height() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_and_shifted_palette_classify() {
        for c in Color::ALL {
            assert_eq!(classify(c.rgb(), 0), Some(c));
            assert_eq!(classify(c.rgb().map(|v| v / 2 + 20), 0), Some(c), "darker {c:?}");
        }
        for other in [[240, 240, 240], [128, 128, 128], [20, 20, 20], [200, 40, 200], [40, 200, 200]] {
            assert_eq!(classify(other, 0), None, "{other:?}");
        }
    }
}
