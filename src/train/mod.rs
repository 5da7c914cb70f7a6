//! Training: the loop, checkpoints, validation metrics and logs.

pub mod checkpoint;
pub mod data;
pub mod folder;
pub mod folds;
pub mod gif;
pub mod log;
pub mod metrics;
pub mod monitor;
pub mod plan;
pub mod tensorboard;
pub mod trainer;
