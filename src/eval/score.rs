//! Comparing an analysis with the caption the image was generated for.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::Analysis;
use crate::dataset::{parse_caption, total_count, Color, Group, ShapeKind};

/// How one image matches its caption.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    /// The detected dominant colour is (one of) the most numerous colour(s) named.
    pub dominant_color_ok: bool,
    /// The set of colours detected equals the set named.
    pub colors_ok: bool,
    /// The set of shape kinds detected equals the set named.
    pub shapes_ok: bool,
    /// The number of objects equals the number named.
    pub count_exact: bool,
    /// Every (count, colour, shape) group matches: the image shows exactly the caption.
    pub exact: bool,
}

/// `(count, colour, kind)` groups, merged and sorted, for comparison.
fn canonical(items: impl IntoIterator<Item = (Color, ShapeKind, usize)>) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for (color, kind, count) in items {
        match out.iter_mut().find(|g| g.color == color && g.kind == kind) {
            Some(g) => g.count += count,
            None => out.push(Group { count, color, kind }),
        }
    }
    out.sort();
    out
}

/// Scores `analysis` against `caption`; `None` when the caption does not parse.
pub fn score(analysis: &Analysis, caption: &str) -> Option<Match> {
    let groups = parse_caption(caption)?;
    let per_color = |c: Color| groups.iter().filter(|g| g.color == c).map(|g| g.count).sum::<usize>();
    let top = Color::ALL.into_iter().map(per_color).max().unwrap_or(0);
    let named_colors: BTreeSet<Color> = groups.iter().map(|g| g.color).collect();
    let found_colors: BTreeSet<Color> = analysis.objects.iter().map(|o| o.color).collect();
    let named_shapes: BTreeSet<ShapeKind> = groups.iter().map(|g| g.kind).collect();
    let found_shapes: BTreeSet<ShapeKind> = analysis.objects.iter().map(|o| o.shape).collect();
    let named = canonical(groups.iter().map(|g| (g.color, g.kind, g.count)));
    let found = canonical(analysis.objects.iter().map(|o| (o.color, o.shape, 1)));
    Some(Match {
        dominant_color_ok: analysis.dominant_color.is_some_and(|c| per_color(c) == top),
        colors_ok: named_colors == found_colors,
        shapes_ok: named_shapes == found_shapes,
        count_exact: analysis.count() == total_count(&groups),
        exact: named == found,
    })
}

/// Match rates over many images.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Accuracy {
    pub images: usize,
    pub dominant_color: usize,
    pub colors: usize,
    pub shapes: usize,
    pub count_exact: usize,
    pub exact: usize,
}

impl Accuracy {
    /// Counts one image.
    pub fn add(&mut self, m: Match) {
        self.images += 1;
        self.dominant_color += m.dominant_color_ok as usize;
        self.colors += m.colors_ok as usize;
        self.shapes += m.shapes_ok as usize;
        self.count_exact += m.count_exact as usize;
        self.exact += m.exact as usize;
    }

    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.images.max(1) as f64
    }

    /// Fraction of images whose dominant colour is right.
    pub fn dominant_color_rate(&self) -> f64 {
        self.rate(self.dominant_color)
    }

    /// Fraction of images with the right set of colours.
    pub fn colors_rate(&self) -> f64 {
        self.rate(self.colors)
    }

    /// Fraction of images with the right set of shape kinds.
    pub fn shapes_rate(&self) -> f64 {
        self.rate(self.shapes)
    }

    /// Fraction of images with the right number of objects.
    pub fn count_rate(&self) -> f64 {
        self.rate(self.count_exact)
    }

    /// Fraction of images that match their caption exactly.
    pub fn exact_rate(&self) -> f64 {
        self.rate(self.exact)
    }
}

impl fmt::Display for Accuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} images: dominant colour {:.1}%, colours {:.1}%, shapes {:.1}%, count exact {:.1}%, exact {:.1}%",
            self.images,
            100.0 * self.dominant_color_rate(),
            100.0 * self.colors_rate(),
            100.0 * self.shapes_rate(),
            100.0 * self.count_rate(),
            100.0 * self.exact_rate()
        )
    }
}
