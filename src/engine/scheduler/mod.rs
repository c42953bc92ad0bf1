//! Diffusion schedulers.
