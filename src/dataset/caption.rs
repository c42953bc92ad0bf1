//! Captions: groups of `(count, colour, shape)` joined by "and", e.g.
//! "two red circles and one blue square".
//!
//! Grammar: `caption := group ("and" group)*`, `group := count colour noun`, where `count` is
//! a number word ("one".."four"; parsing also accepts "a"/"an" for one), and `noun` is
//! singular for one and plural otherwise. Generated captions name each (colour, shape) pair
//! once, largest count first, then in [`Color::ALL`] and [`ShapeKind::ALL`] order.

use super::scene::{Color, Scene, ShapeKind};

/// Number words for counts 1–4.
pub const COUNT_WORDS: [&str; 4] = ["one", "two", "three", "four"];

/// `count` shapes of one colour and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Group {
    pub count: usize,
    pub color: Color,
    pub kind: ShapeKind,
}

/// The groups of a scene, in caption order.
pub fn groups(scene: &Scene) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for s in &scene.shapes {
        match groups.iter_mut().find(|g| g.color == s.color && g.kind == s.kind) {
            Some(g) => g.count += 1,
            None => groups.push(Group { count: 1, color: s.color, kind: s.kind }),
        }
    }
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.color.cmp(&b.color)).then(a.kind.cmp(&b.kind)));
    groups
}

/// The caption of a scene.
pub fn caption(scene: &Scene) -> String {
    groups(scene)
        .iter()
        .map(|g| format!("{} {} {}", COUNT_WORDS[g.count - 1], g.color.as_str(), g.kind.noun(g.count)))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Parses a caption (any case and spacing) into its groups, in the order written. `None` if
/// any part is not `<count> <colour> <shape>`.
pub fn parse_caption(text: &str) -> Option<Vec<Group>> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    words.split(|w| *w == "and").map(parse_group).collect()
}

fn parse_group(words: &[&str]) -> Option<Group> {
    let [n, c, k] = words else { return None };
    let count = match *n {
        "a" | "an" => 1,
        _ => COUNT_WORDS.iter().position(|w| w == n)? + 1,
    };
    Some(Group { count, color: Color::parse(c)?, kind: ShapeKind::parse(k)? })
}

/// Total number of shapes the groups name.
pub fn total_count(groups: &[Group]) -> usize {
    groups.iter().map(|g| g.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_variants_and_rejects_other_text() {
        let g = parse_caption("Two red circles  and a blue square").unwrap();
        assert_eq!(total_count(&g), 3);
        assert_eq!(g[1], Group { count: 1, color: Color::Blue, kind: ShapeKind::Square });
        for bad in ["", "a photo of a cat", "two red circles and", "five red circles", "one red"] {
            assert!(parse_caption(bad).is_none(), "{bad}");
        }
    }
}
