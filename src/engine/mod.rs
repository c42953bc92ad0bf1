//! The text-to-image engine: seeded noise, schedulers, guidance and the pipeline.

pub mod denoise;
pub mod device;
pub mod image;
pub mod noise;
pub mod pipeline;
mod prompt;
pub mod scheduler;
