//! The procedural shapes dataset: 64×64 images of 1–4 flat circles, squares and triangles in
//! four colours on a light background, each with a caption such as
//! "two red circles and one blue square". Deterministic from `(seed, index)`.

mod caption;
mod scene;

pub use caption::{caption, groups, parse_caption, total_count, Group, COUNT_WORDS};
pub use scene::{Color, Placed, Scene, ShapeKind};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Every word a caption can use (the default model's tokenizer vocabulary).
pub const VOCABULARY: [&str; 17] = [
    "one", "two", "three", "four", "a", "and", "red", "green", "blue", "yellow", "circle", "circles", "square",
    "squares", "triangle", "triangles", "an",
];

/// Training captions vs. captions held out for evaluation (one in ten caption strings,
/// chosen by a fixed hash, never appears in training).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

/// The split a caption belongs to.
pub fn split_of(caption: &str) -> Split {
    // FNV-1a: stable across platforms and releases.
    let h = caption.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    if h % 10 == 3 {
        Split::HeldOut
    } else {
        Split::Train
    }
}

/// Scene `index` of `seed` within `split`.
pub fn sample(split: Split, seed: u64, index: u64) -> Scene {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e3779b97f4a7c15) ^ index);
    loop {
        let scene = Scene::random(&mut rng);
        if split_of(&scene.caption()) == split {
            return scene;
        }
    }
}
