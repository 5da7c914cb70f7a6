//! Scoring predictions against references: overlap and surface metrics of label maps, error
//! metrics of regression targets, and a summary in nnU-Net's `evaluate_folder` layout.

pub mod metrics;
pub mod summary;
pub mod surface;
