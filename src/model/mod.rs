//! The network bound to its weights: nnU-Net's initialisation, the multi-task residual U-Net over
//! a parameter store, and loading and saving its weights in PyTorch's names and layouts.

pub mod init;
pub mod network;
pub mod weights;

pub use network::{Network, apply_activation};
