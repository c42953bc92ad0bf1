//! An analytic evaluator for shapes images (no learning): hue/chroma segmentation against the
//! dataset palette with a majority cleanup, connected components, and shape classification
//! from each component's bounding-box fill ratio and centroid offset. Measures prompt
//! following.

mod analyze;
mod score;
mod segment;

pub use analyze::{analyze, Analysis, Object};
pub use score::{score, Accuracy, Match};
