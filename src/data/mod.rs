//! Everything between files on disk and a batch on the device: stored arrays (Zarr, NIfTI import),
//! the dataset of volumes, patch sampling, normalisation, augmentation and the threaded loader.

pub mod array;
pub mod batch;

pub use array::{DType, InMemoryArray, VolumeArray};
pub use batch::{Batch, Patch, PatchTarget, TargetBatch, TargetKind};
