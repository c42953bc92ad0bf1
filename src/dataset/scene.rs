//! Scenes of flat shapes and their rendering.

use image::{Rgb, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A shape colour: a saturated flat RGB fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
}

impl Color {
    /// Every colour, in caption order.
    pub const ALL: [Color; 4] = [Color::Red, Color::Green, Color::Blue, Color::Yellow];

    /// The caption word.
    pub fn as_str(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
        }
    }

    /// The fill colour.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [30, 170, 50],
            Color::Blue => [40, 80, 220],
            Color::Yellow => [235, 200, 30],
        }
    }

    /// Parses a caption word.
    pub fn parse(word: &str) -> Option<Self> {
        Color::ALL.into_iter().find(|c| c.as_str() == word)
    }
}

/// A shape kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

impl ShapeKind {
    /// Every kind, in caption order.
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

    /// The singular caption noun.
    pub fn as_str(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }

    /// The caption noun for `count` shapes ("circle" or "circles").
    pub fn noun(self, count: usize) -> String {
        if count == 1 {
            self.as_str().to_string()
        } else {
            format!("{}s", self.as_str())
        }
    }

    /// Parses a singular or plural noun.
    pub fn parse(word: &str) -> Option<Self> {
        let singular = word.strip_suffix('s').unwrap_or(word);
        ShapeKind::ALL.into_iter().find(|k| k.as_str() == singular)
    }

    /// Whether offset `(dx, dy)` from the centre lies inside a shape of half-size `r`.
    pub(crate) fn contains(self, dx: f64, dy: f64, r: f64) -> bool {
        match self {
            ShapeKind::Circle => dx * dx + dy * dy <= r * r,
            ShapeKind::Square => dx.abs() <= r && dy.abs() <= r,
            // An isosceles triangle pointing up, filling the [-r, r]² box.
            ShapeKind::Triangle => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
        }
    }
}

/// One shape in a scene: kind, colour, centre and half-size, in pixels of a 64×64 canvas.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub kind: ShapeKind,
    pub color: Color,
    pub cx: f64,
    pub cy: f64,
    pub r: f64,
}

/// A light background and 1–4 non-overlapping shapes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: [u8; 3],
    pub shapes: Vec<Placed>,
}

/// White, warm off-white and cool light grey.
const BACKGROUNDS: [[u8; 3]; 3] = [[245, 245, 245], [238, 232, 220], [226, 234, 240]];
/// Half-sizes (circle radius, half the side of a square or triangle box).
const SIZES: [f64; 3] = [6.0, 8.0, 10.0];
/// Minimum gap between the bounding boxes of two shapes.
const GAP: f64 = 4.0;
/// Placement attempts before a scene is started over.
const MAX_TRIES: usize = 200;
/// The canvas the coordinates refer to; `render` scales it to any size.
const CANVAS: f64 = 64.0;

impl Scene {
    /// A random scene: 1–4 shapes of random kind, colour and size, placed by rejection
    /// sampling so that their bounding boxes stay at least `GAP` px apart and 1 px inside
    /// the canvas.
    pub fn random(rng: &mut impl Rng) -> Self {
        let n = rng.random_range(1..=4);
        Self::with_count(rng, n)
    }

    /// A random scene of `n` shapes, placed as in [`Self::random`] (which draws `n` in 1–4;
    /// up to 6 fit the canvas easily).
    pub fn with_count(rng: &mut impl Rng, n: usize) -> Self {
        let background = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())];
        let mut shapes: Vec<Placed> = Vec::with_capacity(n);
        let mut tries = 0;
        while shapes.len() < n {
            tries += 1;
            if tries > MAX_TRIES {
                (shapes, tries) = (Vec::with_capacity(n), 0);
            }
            let r = SIZES[rng.random_range(0..SIZES.len())];
            let cx = rng.random_range(r + 1.0..CANVAS - r - 1.0);
            let cy = rng.random_range(r + 1.0..CANVAS - r - 1.0);
            let clear = shapes.iter().all(|s| (s.cx - cx).abs().max((s.cy - cy).abs()) > s.r + r + GAP);
            if clear {
                let kind = ShapeKind::ALL[rng.random_range(0..ShapeKind::ALL.len())];
                let color = Color::ALL[rng.random_range(0..Color::ALL.len())];
                shapes.push(Placed { kind, color, cx, cy, r });
            }
        }
        Self { background, shapes }
    }

    /// The scene's caption (see [`super::caption`]).
    pub fn caption(&self) -> String {
        super::caption(self)
    }

    /// Renders at `size`×`size` pixels: flat fills sampled at pixel centres, no antialiasing.
    pub fn render(&self, size: u32) -> RgbImage {
        let scale = CANVAS / size as f64;
        RgbImage::from_fn(size, size, |x, y| {
            let (px, py) = ((x as f64 + 0.5) * scale, (y as f64 + 0.5) * scale);
            let hit = self.shapes.iter().find(|s| s.kind.contains(px - s.cx, py - s.cy, s.r));
            Rgb(hit.map_or(self.background, |s| s.color.rgb()))
        })
    }
}
