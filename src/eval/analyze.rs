//! Segmenting an image into coloured objects.

use image::RgbImage;
use serde::Serialize;

use crate::dataset::{Color, ShapeKind};

/// One detected object.
#[derive(Clone, Debug, Serialize)]
pub struct Object {
    pub color: Color,
    pub shape: ShapeKind,
    pub area: usize,
    /// `(x0, y0, x1, y1)`, inclusive.
    pub bbox: (u32, u32, u32, u32),
}

/// What an image shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Analysis {
    pub objects: Vec<Object>,
    /// The colour with the most objects (ties: largest area).
    pub dominant_color: Option<Color>,
}

impl Analysis {
    pub fn count(&self) -> usize {
        self.objects.len()
    }
}

/// Minimum object area, as a fraction of a 64×64 image (about 12 pixels there).
const MIN_AREA_FRACTION: f64 = 12.0 / 4096.0;

fn dist2(a: [u8; 3], b: [u8; 3]) -> i32 {
    (0..3).map(|i| (a[i] as i32 - b[i] as i32).pow(2)).sum()
}

/// The palette colour of a pixel, or `None` for background.
fn classify(p: [u8; 3], background: [u8; 3]) -> Option<Color> {
    let (best, d) = Color::ALL.into_iter().map(|c| (c, dist2(p, c.rgb()))).min_by_key(|(_, d)| *d)?;
    // Closer to the background than to any palette colour, or far from every colour.
    (d < dist2(p, background) && d < 110 * 110).then_some(best)
}

fn median(mut v: Vec<u8>) -> u8 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Finds the objects of an image.
pub fn analyze(img: &RgbImage) -> Analysis {
    let (w, h) = img.dimensions();
    let border: Vec<[u8; 3]> = img
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x == w - 1 || *y == h - 1)
        .map(|(_, _, p)| p.0)
        .collect();
    let background = [0, 1, 2].map(|c| median(border.iter().map(|p| p[c]).collect()));
    let labels: Vec<Option<Color>> = img.pixels().map(|p| classify(p.0, background)).collect();
    let min_area = ((w * h) as f64 * MIN_AREA_FRACTION).ceil() as usize;

    let mut seen = vec![false; labels.len()];
    let mut objects = Vec::new();
    for start in 0..labels.len() {
        let Some(color) = labels[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let (mut area, mut x0, mut y0, mut x1, mut y1) = (0usize, u32::MAX, u32::MAX, 0u32, 0u32);
        while let Some(i) = stack.pop() {
            let (x, y) = ((i as u32) % w, (i as u32) / w);
            area += 1;
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            let neighbours = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
            for (nx, ny) in neighbours {
                if nx < w && ny < h {
                    let j = (ny * w + nx) as usize;
                    if !seen[j] && labels[j] == Some(color) {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if area >= min_area {
            let fill = area as f64 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
            let shape = if fill > 0.88 {
                ShapeKind::Square
            } else if fill > 0.64 {
                ShapeKind::Circle
            } else {
                ShapeKind::Triangle
            };
            objects.push(Object { color, shape, area, bbox: (x0, y0, x1, y1) });
        }
    }
    let dominant_color = Color::ALL
        .into_iter()
        .map(|c| {
            let of = objects.iter().filter(|o| o.color == c);
            (c, of.clone().count(), of.map(|o| o.area).sum::<usize>())
        })
        .filter(|(_, n, _)| *n > 0)
        .max_by_key(|(_, n, a)| (*n, *a))
        .map(|(c, _, _)| c);
    Analysis { objects, dominant_color }
}
