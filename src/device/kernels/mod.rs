//! The kernels of kernels/*.cu as typed operations on [`GpuTensor`]s, one module per .cu file:
//! shape checks with messages that name the op and both shapes, launch sizes, then one launch
//! through [`Gpu::launch`]. Each has the same math as its CPU reference in `device::cpu`, which the
//! tests (tests/sim_kernels.rs) compare it with on the sim and, when enabled, on a GPU.

pub mod activation;
pub mod bench;
pub mod blend;
pub mod conv;
pub mod elementwise;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod reduce;
pub mod se;

use std::sync::Arc;

use anyhow::{Result, ensure};

use super::launch::{Arg, Gpu, GpuBuffer, Kernel, LaunchConfig};
use crate::device::shape::Shape;

/// Threads per block of the grid-stride kernels.
const THREADS: u32 = 256;

/// A grid-stride launch over `n` items.
fn items(n: usize) -> LaunchConfig {
    LaunchConfig::for_items(n, THREADS)
}

/// A float32 tensor in a kernel device's memory, channels-last like its host counterpart. Cloning
/// shares the buffer (as [`Tensor`] shares host storage); kernels write only unshared buffers.
#[derive(Clone)]
pub struct GpuTensor {
    gpu: Gpu,
    shape: Shape,
    buf: Arc<GpuBuffer<f32>>,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTensor({}, {})", self.shape, self.gpu.describe())
    }
}

impl GpuTensor {
    /// Copies `data` (shaped `shape`) to `gpu`.
    pub fn from_host(gpu: &Gpu, shape: impl Into<Shape>, data: &[f32]) -> Result<Self> {
        let shape = shape.into();
        ensure!(shape.numel() == data.len(), "upload: {} elements for shape {shape}", data.len());
        Ok(GpuTensor { gpu: gpu.clone(), shape, buf: Arc::new(gpu.upload(data)?) })
    }

    pub fn zeros(gpu: &Gpu, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        Ok(GpuTensor { gpu: gpu.clone(), buf: Arc::new(gpu.zeros(shape.numel())?), shape })
    }

    /// `value` everywhere, filled on the device (nothing is copied from the host).
    pub fn full(gpu: &Gpu, shape: impl Into<Shape>, value: f32) -> Result<Self> {
        let mut y = Self::output(gpu, shape)?;
        let n = y.numel();
        gpu.launch(Kernel::EW_FILL, items(n), &[Arg::write(y.out()?), Arg::val(value), Arg::val(n as i64)])?;
        Ok(y)
    }

    /// A tensor every element of which the next kernel writes.
    fn output(gpu: &Gpu, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        Ok(GpuTensor { gpu: gpu.clone(), buf: Arc::new(gpu.alloc(shape.numel())?), shape })
    }

    /// The elements on the host (waiting for the kernels that write them).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.gpu.download(&self.buf)
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

    /// The buffer, for a kernel to read.
    pub fn buf(&self) -> &GpuBuffer<f32> {
        &self.buf
    }

    /// The buffer for a kernel to write: a buffer shared with another tensor is copied first
    /// (copy-on-write, as host tensors do), so no other tensor sees the write.
    pub fn out(&mut self) -> Result<&mut GpuBuffer<f32>> {
        if Arc::get_mut(&mut self.buf).is_none() {
            self.buf = Arc::new(copy(&self.gpu, &self.buf)?);
        }
        Ok(Arc::get_mut(&mut self.buf).expect("unshared after the copy"))
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

/// A device-side copy of `src`.
fn copy(gpu: &Gpu, src: &GpuBuffer<f32>) -> Result<GpuBuffer<f32>> {
    let n = src.len();
    let mut dst = gpu.alloc::<f32>(n)?;
    gpu.launch(
        Kernel::EW_SCALE,
        items(n),
        &[Arg::read(src), Arg::write(&mut dst), Arg::val(1.0f32), Arg::val(n as i64)],
    )?;
    Ok(dst)
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
