//! Built-in training prompt sets.

/// The 45 animals of AlignProp's `simple_animals` prompt list.
const SIMPLE_ANIMALS: &[&str] = &[
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
];

/// Captions in the embedded default model's vocabulary.
const SHAPES: &[&str] = &[
    "one red circle",
    "two blue squares",
    "three green triangles",
    "one yellow square and one red triangle",
    "two red circles and a blue square",
    "four yellow circles",
];

/// The prompts of a named set.
pub fn prompt_set(name: &str) -> Option<Vec<String>> {
    let list = match name {
        "simple_animals" => SIMPLE_ANIMALS,
        "shapes" => SHAPES,
        _ => return None,
    };
    Some(list.iter().map(|s| s.to_string()).collect())
}
