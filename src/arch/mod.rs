//! The network's shape before any weights exist: the per-stage description of a residual-encoder
//! U-Net (spec), nnU-Net's topology rules (plan), its parameter names and shapes (params), and how
//! much memory training it takes (size). Below the layers: nn builds what this describes.

pub mod autoplan;
pub mod params;
pub mod plan;
pub mod size;
pub mod spec;

/// Squeeze-excitation's pooling is part of an architecture; the descriptor lives with the ops.
pub use crate::device::op::{SePool, se_reduced_channels};
pub use params::ParamSpec;
pub use plan::{Topology, get_pool_and_conv_props};
pub use size::MemoryEstimate;
pub use spec::{
    ArchConfig, Architecture, Axes, Block, BlockKind, DecoderStage, EncoderBlock, Nonlin, Norm, PerStage,
    Target,
};
