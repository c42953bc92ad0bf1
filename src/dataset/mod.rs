//! The procedural shapes dataset: 64×64 images of 1–4 flat circles, squares and triangles in
//! four colours on a light background, each with a caption such as
//! "two red circles and one blue square". Deterministic from `(seed, index)`.

mod caption;
mod scene;
mod split;

pub use caption::{caption, groups, parse_caption, total_count, Group, COUNT_WORDS};
pub use scene::{Color, Placed, Scene, ShapeKind};
pub use split::{sample, scene, split_of, Split};

/// Every word a caption can use (the default model's tokenizer vocabulary); "a" and "an" are
/// accepted for "one" in prompts but never generated.
pub const VOCABULARY: [&str; 17] = [
    "one",
    "two",
    "three",
    "four",
    "a",
    "an",
    "and",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "circles",
    "square",
    "squares",
    "triangle",
    "triangles",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_use_the_vocabulary_and_round_trip() {
        for i in 0..300 {
            let s = scene(1, i);
            let caption = s.caption();
            assert!(caption.split(' ').all(|w| VOCABULARY.contains(&w)), "{caption}");
            let parsed = parse_caption(&caption).unwrap();
            assert_eq!(parsed, groups(&s), "{caption}");
            assert_eq!(total_count(&parsed), s.shapes.len());
        }
    }
}
