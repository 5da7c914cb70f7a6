//! Float32 tensors with a shape, a device tag and shared, copy-on-write storage.

pub mod io;
pub mod layout;
pub mod memory;
mod shape;

pub use shape::Shape;

use crate::device::Device;
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

/// A float32 tensor. Cloning is cheap (the storage is shared); writing copies shared storage first.
#[derive(Clone)]
pub struct Tensor {
    shape: Shape,
    data: Arc<Buffer>,
    device: Device,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}, {})", self.shape, self.device)
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
        Ok(Tensor { shape, data: Arc::new(Buffer::new(data)), device: Device::Cpu })
    }

    pub fn zeros(shape: impl Into<Shape>) -> Self {
        Self::full(shape, 0.0)
    }

    pub fn full(shape: impl Into<Shape>, value: f32) -> Self {
        let shape = shape.into();
        let n = shape.numel();
        Tensor { shape, data: Arc::new(Buffer::new(vec![value; n])), device: Device::Cpu }
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
        self.device
    }

    pub fn data(&self) -> &[f32] {
        &self.data.0
    }

    /// Mutable access; copies the storage first if another tensor shares it.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut Arc::make_mut(&mut self.data).0
    }

    pub fn to_vec(&self) -> Vec<f32> {
        self.data.0.clone()
    }

    /// Takes the storage out, copying only if it is shared.
    pub fn into_vec(self) -> Vec<f32> {
        match Arc::try_unwrap(self.data) {
            Ok(mut b) => std::mem::take(&mut b.0),
            Err(shared) => shared.0.clone(),
        }
    }

    /// The value of a one-element tensor.
    pub fn item(&self) -> anyhow::Result<f32> {
        anyhow::ensure!(self.numel() == 1, "item() needs one element, tensor has shape {}", self.shape);
        Ok(self.data.0[0])
    }

    /// Same storage under a new shape with the same element count.
    pub fn reshape(&self, shape: impl Into<Shape>) -> anyhow::Result<Self> {
        let shape = shape.into();
        anyhow::ensure!(
            shape.numel() == self.numel(),
            "cannot reshape {} into {shape}: element counts differ",
            self.shape
        );
        Ok(Tensor { shape, data: self.data.clone(), device: self.device })
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
        anyhow::ensure!(self.device == Device::Cpu, "{what}: tensor is on {}, expected cpu", self.device);
        Ok(())
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
