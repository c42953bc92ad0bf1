//! Objects of an image: connected components of the colour labels, classified by shape.

use image::RgbImage;
use serde::Serialize;

use super::segment::{labels, Labels};
use crate::dataset::{Color, ShapeKind};

/// One detected object.
#[derive(Clone, Debug, Serialize)]
pub struct Object {
    pub color: Color,
    pub shape: ShapeKind,
    /// Pixels.
    pub area: usize,
    /// `(x0, y0, x1, y1)`, inclusive.
    pub bbox: (u32, u32, u32, u32),
    /// Centroid `(x, y)`; pixel `(i, j)` covers `[i, i + 1) × [j, j + 1)`, as in scenes.
    pub center: (f64, f64),
}

/// What an image shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Analysis {
    pub objects: Vec<Object>,
    /// The colour with the most objects (ties: largest total area), the quantity a caption
    /// states.
    pub dominant_color: Option<Color>,
}

impl Analysis {
    /// Number of objects.
    pub fn count(&self) -> usize {
        self.objects.len()
    }
}

/// Minimum object area as a fraction of the image (16 px at 64×64; the smallest dataset
/// shape covers about 70).
const MIN_AREA_FRACTION: f64 = 16.0 / 4096.0;

/// Half-size of the `kind` template of `area` px, and the vertical offset from its centroid
/// to its box centre (an upward triangle's centroid lies a third of its half-size lower).
fn template(kind: ShapeKind, area: f64) -> (f64, f64) {
    match kind {
        ShapeKind::Circle => ((area / std::f64::consts::PI).sqrt(), 0.0),
        ShapeKind::Square => (area.sqrt() / 2.0, 0.0),
        ShapeKind::Triangle => {
            let r = (area / 2.0).sqrt();
            (r, -r / 3.0)
        }
    }
}

/// Intersection over union of a component (pixel set, with centroid `center`) and the
/// `kind` template of the same area and centroid.
fn iou(kind: ShapeKind, pixels: &[(u32, u32)], center: (f64, f64)) -> f64 {
    let (r, dy) = template(kind, pixels.len() as f64);
    let (cx, cy) = (center.0, center.1 + dy);
    let inside = |x: i64, y: i64| kind.contains(x as f64 + 0.5 - cx, y as f64 + 0.5 - cy, r);
    let inter = pixels.iter().filter(|&&(x, y)| inside(x.into(), y.into())).count();
    let span = |c: f64| (c - r - 1.0).floor() as i64..=(c + r + 1.0).ceil() as i64;
    let area = span(cy).flat_map(|y| span(cx).map(move |x| (x, y))).filter(|&(x, y)| inside(x, y)).count();
    inter as f64 / (pixels.len() + area - inter) as f64
}

/// The 4-connected component of `labels` containing `start`, marking it in `seen`.
fn component(labels: &Labels, seen: &mut [bool], w: u32, h: u32, start: usize) -> Vec<(u32, u32)> {
    let color = labels[start];
    let mut pixels = Vec::new();
    let mut stack = vec![start];
    seen[start] = true;
    while let Some(i) = stack.pop() {
        let (x, y) = ((i as u32) % w, (i as u32) / w);
        pixels.push((x, y));
        for (nx, ny) in [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)] {
            if nx >= w || ny >= h {
                continue;
            }
            let j = (ny * w + nx) as usize;
            if !seen[j] && labels[j] == color {
                seen[j] = true;
                stack.push(j);
            }
        }
    }
    pixels
}

/// Describes a component of `color`; its shape is the kind whose same-area, same-centroid
/// template overlaps it best, which stays robust to ragged, blurred edges.
fn object(color: Color, pixels: &[(u32, u32)]) -> Object {
    let bbox = pixels
        .iter()
        .fold((u32::MAX, u32::MAX, 0, 0), |(x0, y0, x1, y1), &(x, y)| (x0.min(x), y0.min(y), x1.max(x), y1.max(y)));
    let mean = |f: fn(&(u32, u32)) -> u32| pixels.iter().map(|p| f(p) as f64 + 0.5).sum::<f64>() / pixels.len() as f64;
    let center = (mean(|p| p.0), mean(|p| p.1));
    let shape = ShapeKind::ALL
        .into_iter()
        .map(|k| (k, iou(k, pixels, center)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(ShapeKind::Circle, |(k, _)| k);
    Object { color, shape, area: pixels.len(), bbox, center }
}

/// Finds the objects of an image.
pub fn analyze(img: &RgbImage) -> Analysis {
    let (w, h) = img.dimensions();
    let labels = labels(img);
    let min_area = ((w * h) as f64 * MIN_AREA_FRACTION).ceil() as usize;
    let mut seen = vec![false; labels.len()];
    let mut objects = Vec::new();
    for start in 0..labels.len() {
        let Some(color) = labels[start] else { continue };
        if !seen[start] {
            let pixels = component(&labels, &mut seen, w, h, start);
            if pixels.len() >= min_area {
                objects.push(object(color, &pixels));
            }
        }
    }
    let dominant_color = Color::ALL
        .into_iter()
        .map(|c| {
            let of: Vec<&Object> = objects.iter().filter(|o| o.color == c).collect();
            (c, of.len(), of.iter().map(|o| o.area).sum::<usize>())
        })
        .filter(|(_, n, _)| *n > 0)
        .max_by_key(|(_, n, a)| (*n, *a))
        .map(|(c, _, _)| c);
    Analysis { objects, dominant_color }
}
