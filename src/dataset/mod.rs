//! Procedural shapes dataset.
