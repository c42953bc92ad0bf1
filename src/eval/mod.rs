//! An analytic evaluator for shapes images (no learning): colour segmentation against the
//! dataset palette, connected components, and shape classification from the fill ratio of
//! each component's bounding box. Used to measure prompt following.

mod analyze;
mod score;

pub use analyze::{analyze, Analysis, Object};
pub use score::{score, Accuracy, Match};
