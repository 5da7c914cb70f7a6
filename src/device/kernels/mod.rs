//! The kernels of kernels/*.cu as typed operations on [`GpuTensor`]s, one module per .cu file:
//! shape checks with messages that name the op and both shapes, launch sizes, then one launch
//! through [`Gpu::launch`]. Each has the same math as its CPU reference in `device::cpu`, which the
//! tests (tests/sim_kernels.rs) compare it with on the sim and, when enabled, on a GPU.

pub mod activation;
pub mod bench;
pub mod conv;
pub mod elementwise;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod reduce;
pub mod se;

use anyhow::{Result, ensure};

use super::launch::{Gpu, GpuBuffer, LaunchConfig};
use crate::tensor::{Shape, Tensor};

/// Threads per block of the grid-stride kernels.
const THREADS: u32 = 256;

/// A grid-stride launch over `n` items.
fn items(n: usize) -> LaunchConfig {
    LaunchConfig::for_items(n, THREADS)
}

/// A float32 tensor in a kernel device's memory, channels-last like its host counterpart.
pub struct GpuTensor {
    gpu: Gpu,
    shape: Shape,
    buf: GpuBuffer<f32>,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTensor({}, {})", self.shape, self.gpu.describe())
    }
}

impl GpuTensor {
    pub fn upload(gpu: &Gpu, t: &Tensor) -> Result<Self> {
        Ok(GpuTensor { gpu: gpu.clone(), shape: t.shape().clone(), buf: gpu.upload(t.data())? })
    }

    pub fn zeros(gpu: &Gpu, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        Ok(GpuTensor { gpu: gpu.clone(), buf: gpu.zeros(shape.numel())?, shape })
    }

    /// A tensor every element of which the next kernel writes.
    fn output(gpu: &Gpu, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        Ok(GpuTensor { gpu: gpu.clone(), buf: gpu.alloc(shape.numel())?, shape })
    }

    /// Copies the tensor to the host (waiting for the kernels that write it).
    pub fn to_host(&self) -> Result<Tensor> {
        Tensor::from_vec(self.shape.clone(), self.gpu.download(&self.buf)?)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn buffer(&self) -> &GpuBuffer<f32> {
        &self.buf
    }

    pub fn buffer_mut(&mut self) -> &mut GpuBuffer<f32> {
        &mut self.buf
    }

    /// The same storage under a shape with the same element count.
    pub fn reshape(self, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        ensure!(
            shape.numel() == self.numel(),
            "cannot reshape {} into {shape}: element counts differ",
            self.shape
        );
        Ok(GpuTensor { shape, ..self })
    }
}

/// Fails unless `b` is on `a`'s device.
fn same_device(op: &str, a: &GpuTensor, b: &GpuTensor) -> Result<()> {
    ensure!(
        a.gpu.same(&b.gpu),
        "{op}: operands on different devices ({} and {})",
        a.gpu.describe(),
        b.gpu.describe()
    );
    Ok(())
}

/// Fails unless `b` is on `a`'s device and has its shape.
fn same_shape(op: &str, a: &GpuTensor, b: &GpuTensor) -> Result<()> {
    same_device(op, a, b)?;
    ensure!(a.shape == b.shape, "{op}: shapes differ: {} and {}", a.shape, b.shape);
    Ok(())
}
