//! Float32 tensors with a shape and shared, copy-on-write storage on the device they live on.

pub mod io;
pub mod layout;
pub mod memory;
pub use crate::device::shape::Shape;

use crate::device::Device;
use crate::device::kernels::{GpuTensor, elementwise};
use crate::device::launch::Gpu;
use std::sync::Arc;

/// Storage whose bytes are counted by [`memory`] for as long as it lives.
struct Buffer(Vec<f32>);

impl Buffer {
    fn new(data: Vec<f32>) -> Self {
        memory::track_alloc(data.capacity() * 4);
        Buffer(data)
    }
}

impl Clone for Buffer {
    fn clone(&self) -> Self {
        Buffer::new(self.0.clone())
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        memory::track_free(self.0.capacity() * 4);
    }
}

/// Where a tensor's elements are: host memory, or a kernel device's buffer.
#[derive(Clone)]
enum Storage {
    Host(Arc<Buffer>),
    Device(GpuTensor),
}

/// A float32 tensor on the CPU or on a kernel device (`sim`, `cuda:N`). Cloning is cheap (the
/// storage is shared); writing copies shared storage first. Elements move between host and device
/// only through [`Tensor::to_device`] (and [`Tensor::item`], which reads one element).
#[derive(Clone)]
pub struct Tensor {
    shape: Shape,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}, {})", self.shape, self.device())
    }
}

impl Tensor {
    /// A CPU tensor over `data`; fails when the element count does not match the shape.
    pub fn from_vec(shape: impl Into<Shape>, data: Vec<f32>) -> anyhow::Result<Self> {
        let shape = shape.into();
        anyhow::ensure!(
            shape.numel() == data.len(),
            "tensor data has {} elements but shape {shape} needs {}",
            data.len(),
            shape.numel()
        );
        Ok(Tensor { shape, storage: Storage::Host(Arc::new(Buffer::new(data))) })
    }

    /// A tensor over a kernel device's buffer.
    pub fn from_gpu(t: GpuTensor) -> Self {
        Tensor { shape: t.shape().clone(), storage: Storage::Device(t) }
    }

    pub fn zeros(shape: impl Into<Shape>) -> Self {
        Self::full(shape, 0.0)
    }

    pub fn full(shape: impl Into<Shape>, value: f32) -> Self {
        let shape = shape.into();
        let n = shape.numel();
        Tensor { shape, storage: Storage::Host(Arc::new(Buffer::new(vec![value; n]))) }
    }

    /// `value` everywhere, made on `device` (filled there: nothing is copied from the host).
    pub fn full_on(shape: impl Into<Shape>, value: f32, device: Device) -> anyhow::Result<Self> {
        match Gpu::of(device)? {
            None => Ok(Self::full(shape, value)),
            Some(gpu) => Ok(Self::from_gpu(GpuTensor::full(&gpu, shape, value)?)),
        }
    }

    pub fn zeros_on(shape: impl Into<Shape>, device: Device) -> anyhow::Result<Self> {
        Self::full_on(shape, 0.0, device)
    }

    pub fn scalar(value: f32) -> Self {
        Self::full(Shape::new(&[]), value)
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

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            Storage::Device(t) => t.gpu().device(),
        }
    }

    /// The elements in host memory. Only CPU tensors have them: the backends check the device at
    /// every op boundary, so reaching this with a device tensor is a bug in unet3d, not bad input.
    pub fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::Host(b) => &b.0,
            Storage::Device(_) => self.not_on_host(),
        }
    }

    /// Mutable access; copies the storage first if another tensor shares it. CPU tensors only.
    pub fn data_mut(&mut self) -> &mut [f32] {
        if matches!(self.storage, Storage::Device(_)) {
            self.not_on_host()
        }
        match &mut self.storage {
            Storage::Host(b) => &mut Arc::make_mut(b).0,
            Storage::Device(_) => unreachable!("checked above"),
        }
    }

    fn not_on_host(&self) -> ! {
        panic!(
            "tensor {} is on {}, not in host memory: copy it with to_device(Device::Cpu)",
            self.shape,
            self.device()
        )
    }

    /// The device buffer of a tensor on a kernel device; an error naming `what` for a CPU tensor.
    pub fn gpu(&self, what: &str) -> anyhow::Result<&GpuTensor> {
        match &self.storage {
            Storage::Device(t) => Ok(t),
            Storage::Host(_) => {
                anyhow::bail!("{what}: tensor {} is on cpu, expected a kernel device", self.shape)
            }
        }
    }

    /// The device buffer for a kernel to write in place (copied first if shared).
    pub fn gpu_mut(&mut self, what: &str) -> anyhow::Result<&mut GpuTensor> {
        match &mut self.storage {
            Storage::Device(t) => Ok(t),
            Storage::Host(_) => {
                anyhow::bail!("{what}: tensor {} is on cpu, expected a kernel device", self.shape)
            }
        }
    }

    /// The tensor on `device`: itself when it is there already, otherwise a copy (upload or
    /// download; between two kernel devices through the host).
    pub fn to_device(&self, device: Device) -> anyhow::Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let host = match &self.storage {
            Storage::Host(_) => self.clone(),
            Storage::Device(t) => t.to_host()?.reshape(self.shape.clone())?,
        };
        match Gpu::of(device)? {
            None => Ok(host),
            Some(gpu) => Ok(Tensor::from_gpu(GpuTensor::from_host(&gpu, self.shape.clone(), host.data())?)),
        }
    }

    /// A copy of the host elements (CPU tensors only, as [`data`](Self::data)).
    pub fn to_vec(&self) -> Vec<f32> {
        self.data().to_vec()
    }

    /// Takes the host storage out, copying only if it is shared (CPU tensors only).
    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Host(b) => match Arc::try_unwrap(b) {
                Ok(mut b) => std::mem::take(&mut b.0),
                Err(shared) => shared.0.clone(),
            },
            Storage::Device(t) => {
                panic!("tensor {} is on {}, not in host memory", self.shape, t.gpu().device())
            }
        }
    }

    /// The value of a one-element tensor (read from the device when it lives on one).
    pub fn item(&self) -> anyhow::Result<f32> {
        anyhow::ensure!(self.numel() == 1, "item() needs one element, tensor has shape {}", self.shape);
        match &self.storage {
            Storage::Host(b) => Ok(b.0[0]),
            Storage::Device(t) => Ok(t.to_vec()?[0]),
        }
    }

    /// Same storage under a new shape with the same element count.
    pub fn reshape(&self, shape: impl Into<Shape>) -> anyhow::Result<Self> {
        let shape = shape.into();
        anyhow::ensure!(
            shape.numel() == self.numel(),
            "cannot reshape {} into {shape}: element counts differ",
            self.shape
        );
        let storage = match &self.storage {
            Storage::Host(b) => Storage::Host(b.clone()),
            Storage::Device(t) => Storage::Device(t.clone().reshape(shape.clone())?),
        };
        Ok(Tensor { shape, storage })
    }

    /// `self += x` element-wise, in place on the tensors' device (same shape and device).
    pub fn add_assign(&mut self, x: &Tensor, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.device() == x.device(),
            "{what}: tensors on {} and {}",
            self.device(),
            x.device()
        );
        anyhow::ensure!(self.shape == x.shape, "{what}: shapes {} and {} differ", self.shape, x.shape);
        match &x.storage {
            Storage::Host(b) => self.data_mut().iter_mut().zip(&b.0).for_each(|(a, v)| *a += *v),
            Storage::Device(g) => elementwise::axpy_in_place(self.gpu_mut(what)?, 1.0, g)?,
        }
        Ok(())
    }

    /// `self *= s` in place on the tensor's device.
    pub fn scale_in_place(&mut self, s: f32, what: &str) -> anyhow::Result<()> {
        match self.storage {
            Storage::Host(_) => crate::device::cpu::optim::scale_in_place(self.data_mut(), s),
            Storage::Device(_) => elementwise::scale_in_place(self.gpu_mut(what)?, s)?,
        }
        Ok(())
    }

    /// Fails with a message naming `what` unless the shape is exactly `expected`.
    pub fn expect_shape(&self, what: &str, expected: &[usize]) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.dims() == expected,
            "{what}: expected shape {}, got {}",
            Shape::new(expected),
            self.shape
        );
        Ok(())
    }

    /// Fails unless the tensor lives on the CPU; the ops of this backend read host memory.
    pub fn expect_cpu(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(self.device() == Device::Cpu, "{what}: tensor is on {}, expected cpu", self.device());
        Ok(())
    }
}

/// The device every tensor of `ts` lives on; an error naming `op` and both devices when two differ.
pub fn same_device(op: &str, ts: &[&Tensor]) -> anyhow::Result<Device> {
    let first = ts.first().map_or(Device::Cpu, |t| t.device());
    if let Some(other) = ts.iter().map(|t| t.device()).find(|&d| d != first) {
        anyhow::bail!(
            "{op}: operands on different devices ({first} and {other}); move them to one with to_device"
        );
    }
    Ok(first)
}

/// The host<->device copies of a kernel device's tensors, at the tensor layer (the kernels below
/// know buffers and shapes, not host tensors).
impl GpuTensor {
    /// Copies a host tensor's data to `gpu`.
    pub fn upload(gpu: &Gpu, t: &Tensor) -> anyhow::Result<Self> {
        Self::from_host(gpu, t.shape().clone(), t.data())
    }

    /// Copies the tensor to the host (waiting for the kernels that write it).
    pub fn to_host(&self) -> anyhow::Result<Tensor> {
        Tensor::from_vec(self.shape().clone(), self.to_vec()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_mismatch_is_a_clear_error() {
        let e = Tensor::from_vec([2, 3], vec![0.0; 5]).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains('5'), "{e}");
        let t = Tensor::zeros([2, 3]);
        assert!(t.reshape([4, 2]).is_err());
        let e = t.expect_shape("conv weight", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("conv weight") && e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
    }

    #[test]
    fn writes_copy_shared_storage() {
        let a = Tensor::full([4], 1.0);
        let mut b = a.clone();
        b.data_mut()[0] = 5.0;
        assert_eq!(a.data()[0], 1.0);
        assert_eq!(b.data()[0], 5.0);
    }
}
