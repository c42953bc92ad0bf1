//! Built-in training prompt sets.

/// The 45 animals of AlignProp's `simple_animals` prompt list.
const SIMPLE_ANIMALS: &[&str] = &[
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
];

/// Training-split captions of the procedural shapes dataset (the embedded default model's
/// domain); `sdserve evaluate` measures on held-out captions.
fn shapes() -> Vec<String> {
    use crate::dataset::{sample, Split};
    (0..64).map(|i| sample(Split::Train, 0, i).caption()).collect()
}

/// The prompts of a named set.
pub fn prompt_set(name: &str) -> Option<Vec<String>> {
    match name {
        "simple_animals" => Some(SIMPLE_ANIMALS.iter().map(|s| s.to_string()).collect()),
        "shapes" => Some(shapes()),
        _ => None,
    }
}
