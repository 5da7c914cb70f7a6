//! unet3d: dynamic 3D residual U-Nets for multi-task segmentation and regression.
//!
//! Layers, bottom to top: `device` (the compute backends: `cpu`, `cuda` and `sim`, which runs the CUDA sources on the CPU),
//! `tensor` and `autograd` (channels-last float32 tensors and the tape that differentiates them),
//! `ops` (differentiable operations recorded on the tape), `loss` and `optim`, then the CLI.

pub mod arch;
pub mod autograd;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod infer;
pub mod loss;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod tensor;
pub mod train;

pub use autograd::{Graph, ParamId, ParamStore, Var};
pub use device::Device;
pub use tensor::{Shape, Tensor};
