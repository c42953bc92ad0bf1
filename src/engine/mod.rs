//! The engine: schedulers, guidance, the text-to-image pipeline and edits
//! (image-to-image, inpainting).

pub mod denoise;
pub mod device;
pub mod edit;
pub mod image;
pub mod pipeline;
mod prompt;
pub mod scheduler;
