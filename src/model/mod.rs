//! The network's shape before any weights exist: nnU-Net's topology rules, the per-stage
//! description of a residual-encoder U-Net, its parameter names and counts, and how much memory
//! training it takes.

pub mod arch;
pub mod init;
pub mod network;
pub mod params;
pub mod plan;
pub mod size;
pub mod weights;

/// Squeeze-excitation's pooling is part of an architecture; the descriptor lives with the ops.
pub use crate::device::op::{SePool, se_reduced_channels};
pub use arch::{
    ArchConfig, Architecture, Axes, Block, BlockKind, DecoderStage, EncoderBlock, Nonlin, Norm, PerStage,
    Target,
};
pub use network::{Network, apply_activation};
pub use params::ParamSpec;
pub use plan::{Topology, get_pool_and_conv_props};
pub use size::MemoryEstimate;
