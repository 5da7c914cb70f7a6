//! Everything between files on disk and a batch on the device: stored arrays (Zarr, NIfTI import),
//! the dataset of volumes, patch sampling, normalisation, augmentation and the threaded loader.

pub mod array;
pub mod augment;
pub mod batch;
pub mod convert;
pub mod dataset;
pub mod dilate;
pub mod example;
pub mod fingerprint;
pub mod finite;
pub mod loader;
pub mod nifti;
pub mod normalize;
pub mod ome;
pub mod sampling;
pub mod store;
pub mod volume;
pub mod zarr;

pub use array::{DType, InMemoryArray, VolumeArray};
pub use batch::{Batch, Patch, PatchTarget, TargetBatch, TargetKind};
