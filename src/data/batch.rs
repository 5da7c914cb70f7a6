//! What the loader hands the training step.

pub use crate::config::TargetKind;
use crate::tensor::Tensor;

/// One target's labels or values for a batch, at every deep-supervision scale.
#[derive(Debug, Clone)]
pub struct TargetBatch {
    pub name: String,
    /// (N, D, H, W, C_target) channels-last, full resolution first, then one per deep-supervision
    /// output (`loss::deep_supervision_labels` sizes). Segmentation label maps hold class indices
    /// as floats with C_target = 1.
    pub scales: Vec<Tensor>,
}

/// A batch of patches: the normalised (and, in training, augmented) input and every target.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (N, D, H, W, C_in).
    pub input: Tensor,
    /// In `dataset_config.targets` order.
    pub targets: Vec<TargetBatch>,
    /// Where each patch came from (volume index, start voxel D, H, W), for logs and GIFs.
    pub origins: Vec<(usize, [usize; 3])>,
}

/// One patch before batching: channels-last (D, H, W, C) values of the input and every target.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    pub size: [usize; 3],
    /// Normalised input, (D, H, W, C_in).
    pub input: Vec<f32>,
    pub in_channels: usize,
    /// In `dataset_config.targets` order.
    pub targets: Vec<PatchTarget>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PatchTarget {
    /// (D, H, W, channels).
    pub data: Vec<f32>,
    pub channels: usize,
    pub kind: TargetKind,
}
