//! Captions: groups of `(count, colour, shape)` in a canonical order, e.g.
//! "two red circles and one blue square".

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

/// Groups of a scene: largest count first, then colour and shape order.
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
        .map(|g| {
            let noun = g.kind.as_str();
            let plural = if g.count > 1 { "s" } else { "" };
            format!("{} {} {noun}{plural}", COUNT_WORDS[g.count - 1], g.color.as_str())
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Parses a caption back into groups; "a"/"an" count as one. `None` if any part is not
/// `<count> <colour> <shape>`.
pub fn parse_caption(text: &str) -> Option<Vec<Group>> {
    let lower = text.to_lowercase();
    let mut out = Vec::new();
    for part in lower.split(" and ") {
        let words: Vec<&str> = part.split_whitespace().collect();
        let [n, c, k] = words[..] else { return None };
        let count = match n {
            "a" | "an" => 1,
            _ => COUNT_WORDS.iter().position(|w| *w == n)? + 1,
        };
        out.push(Group { count, color: Color::parse(c)?, kind: ShapeKind::parse(k)? });
    }
    Some(out)
}

/// Total number of shapes the groups name.
pub fn total_count(groups: &[Group]) -> usize {
    groups.iter().map(|g| g.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{sample, Split};

    #[test]
    fn captions_round_trip() {
        for i in 0..300 {
            let scene = sample(Split::Train, 1, i);
            let parsed = parse_caption(&scene.caption()).unwrap();
            assert_eq!(parsed, groups(&scene), "{}", scene.caption());
            assert_eq!(total_count(&parsed), scene.shapes.len());
        }
        let fixture = parse_caption("two red circles and a blue square").unwrap();
        assert_eq!(total_count(&fixture), 3);
        assert!(parse_caption("a photo of a cat").is_none());
    }
}
