//! The engine: seeded noise, schedulers, guidance, the text-to-image pipeline and edits
//! (image-to-image, inpainting).

pub mod denoise;
pub mod device;
pub mod edit;
pub mod image;
pub mod noise;
pub mod pipeline;
mod prompt;
pub mod scheduler;
