//! Comparing an analysis with the caption the image was generated for.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::Analysis;
use crate::dataset::{parse_caption, total_count, Color, ShapeKind};

/// How one image matches its caption.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Match {
    /// The detected dominant colour is (one of) the most numerous colour(s) named.
    pub dominant_color_ok: bool,
    /// The set of shape kinds detected equals the set named.
    pub shapes_ok: bool,
    /// The number of objects equals the number named.
    pub count_exact: bool,
}

/// Scores `analysis` against `caption`; `None` when the caption does not parse.
pub fn score(analysis: &Analysis, caption: &str) -> Option<Match> {
    let groups = parse_caption(caption)?;
    let per_color = |c: Color| groups.iter().filter(|g| g.color == c).map(|g| g.count).sum::<usize>();
    let top = Color::ALL.into_iter().map(per_color).max().unwrap_or(0);
    let dominant_color_ok = analysis.dominant_color.is_some_and(|c| per_color(c) == top);
    let named: BTreeSet<ShapeKind> = groups.iter().map(|g| g.kind).collect();
    let found: BTreeSet<ShapeKind> = analysis.objects.iter().map(|o| o.shape).collect();
    Some(Match { dominant_color_ok, shapes_ok: named == found, count_exact: analysis.count() == total_count(&groups) })
}

/// Rates over many images.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Accuracy {
    pub images: usize,
    pub dominant_color: usize,
    pub shapes: usize,
    pub count_exact: usize,
}

impl Accuracy {
    pub fn add(&mut self, m: Match) {
        self.images += 1;
        self.dominant_color += m.dominant_color_ok as usize;
        self.shapes += m.shapes_ok as usize;
        self.count_exact += m.count_exact as usize;
    }

    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.images.max(1) as f64
    }

    pub fn dominant_color_rate(&self) -> f64 {
        self.rate(self.dominant_color)
    }

    pub fn shapes_rate(&self) -> f64 {
        self.rate(self.shapes)
    }

    pub fn count_rate(&self) -> f64 {
        self.rate(self.count_exact)
    }
}

impl fmt::Display for Accuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} images: dominant colour {:.1}%, shapes {:.1}%, count exact {:.1}%",
            self.images,
            100.0 * self.dominant_color_rate(),
            100.0 * self.shapes_rate(),
            100.0 * self.count_rate()
        )
    }
}
