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

use crate::device::Device;
use crate::device::kernels::GpuTensor;
use crate::tensor::Tensor;
use anyhow::Result;

/// The device every tensor of `ts` lives on; an error naming `op` and both devices when two differ.
pub(crate) fn same_device(op: &str, ts: &[&Tensor]) -> Result<Device> {
    let first = ts.first().map_or(Device::Cpu, |t| t.device());
    if let Some(other) = ts.iter().map(|t| t.device()).find(|&d| d != first) {
        anyhow::bail!(
            "{op}: operands on different devices ({first} and {other}); move them to one with to_device"
        );
    }
    Ok(first)
}

/// A kernel result as a tensor.
pub(crate) fn dev(t: GpuTensor) -> Tensor {
    Tensor::from_gpu(t)
}
