//! Differentiable operations on [`Var`](crate::Var)s. Each dispatches on its inputs' device: the
//! CPU backend (`device::cpu`) for CPU tensors, the CUDA kernels (`device::kernels`) for `sim` and
//! `cuda:N` tensors, with the same math, and records a backward closure on the
//! [`Graph`](crate::Graph) that runs on the same device.

pub mod activation;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod reduce;

use crate::device::kernels::GpuTensor;
use crate::tensor::Tensor;

pub(crate) use crate::tensor::same_device;

/// A kernel result as a tensor.
pub(crate) fn dev(t: GpuTensor) -> Tensor {
    Tensor::from_gpu(t)
}
