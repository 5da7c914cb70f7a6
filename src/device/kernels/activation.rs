//! kernels/activation.cu: the leaky-ReLU family, sigmoid, softmax over channels.

use anyhow::{Result, ensure};

use super::{GpuTensor, items, same_shape};
use crate::device::launch::{Arg, Kernel, to_i32};
use crate::device::op::Act;

/// `act(x)`: identity, ReLU and leaky ReLU are one kernel with the slope below zero.
pub fn act_forward(x: &GpuTensor, act: Act) -> Result<GpuTensor> {
    let mut y = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let n = x.numel();
    let args = [Arg::read(x.buf()), Arg::write(y.out()?), Arg::val(act.slope() as f32), Arg::val(n as i64)];
    x.gpu.launch(Kernel::ACT_LEAKY_FWD, items(n), &args)?;
    Ok(y)
}

/// `gy * act'(x)` with `x` the activation's input.
pub fn act_backward(gy: &GpuTensor, x: &GpuTensor, act: Act) -> Result<GpuTensor> {
    same_shape("activation backward", gy, x)?;
    let mut gx = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let n = x.numel();
    let args = [
        Arg::read(gy.buf()),
        Arg::read(x.buf()),
        Arg::write(gx.out()?),
        Arg::val(act.slope() as f32),
        Arg::val(n as i64),
    ];
    x.gpu.launch(Kernel::ACT_LEAKY_BWD, items(n), &args)?;
    Ok(gx)
}

pub fn sigmoid_forward(x: &GpuTensor) -> Result<GpuTensor> {
    let mut y = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let n = x.numel();
    x.gpu.launch(
        Kernel::ACT_SIGMOID_FWD,
        items(n),
        &[Arg::read(x.buf()), Arg::write(y.out()?), Arg::val(n as i64)],
    )?;
    Ok(y)
}

/// `gy * y * (1 - y)` from the forward output `y`.
pub fn sigmoid_backward(gy: &GpuTensor, y: &GpuTensor) -> Result<GpuTensor> {
    backward_from_output(Kernel::ACT_SIGMOID_BWD, "sigmoid backward", gy, y, None)
}

/// Softmax over the last axis (the channels).
pub fn softmax_forward(x: &GpuTensor) -> Result<GpuTensor> {
    let c = x.shape.last();
    ensure!(c > 0, "softmax: tensor of shape {} has no channels", x.shape);
    let rows = x.numel() / c;
    let mut y = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let args = [
        Arg::read(x.buf()),
        Arg::write(y.out()?),
        Arg::val(rows as i64),
        Arg::val(to_i32(c, "softmax channels")?),
    ];
    x.gpu.launch(Kernel::ACT_SOFTMAX_FWD, items(rows), &args)?;
    Ok(y)
}

/// `y * (gy - sum_c gy * y)` per voxel, from the forward output `y`.
pub fn softmax_backward(gy: &GpuTensor, y: &GpuTensor) -> Result<GpuTensor> {
    let c = y.shape.last();
    ensure!(c > 0, "softmax backward: tensor of shape {} has no channels", y.shape);
    backward_from_output(Kernel::ACT_SOFTMAX_BWD, "softmax backward", gy, y, Some(c))
}

/// The launch both backward passes share: `(gy, y) -> gx` over the elements, or over rows of
/// `channels` when given.
fn backward_from_output(
    kernel: Kernel,
    op: &str,
    gy: &GpuTensor,
    y: &GpuTensor,
    channels: Option<usize>,
) -> Result<GpuTensor> {
    same_shape(op, gy, y)?;
    let mut gx = GpuTensor::output(&y.gpu, y.shape.clone())?;
    let (work, tail) = match channels {
        Some(c) => (y.numel() / c, Some(to_i32(c, op)?)),
        None => (y.numel(), None),
    };
    let mut args =
        vec![Arg::read(gy.buf()), Arg::read(y.buf()), Arg::write(gx.out()?), Arg::val(work as i64)];
    args.extend(tail.map(Arg::val));
    y.gpu.launch(kernel, items(work), &args)?;
    Ok(gx)
}
