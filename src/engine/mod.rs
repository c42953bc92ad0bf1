//! The text-to-image engine: seeded noise, schedulers and the pipeline.

pub mod noise;
pub mod scheduler;
