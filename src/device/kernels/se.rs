//! kernels/se.cu: squeeze-excitation (src/nn/residual.rs `SqueezeExcite`): the pooled means
//! (reduce.cu), both 1x1 layers with ReLU and sigmoid in one kernel, the gate multiply
//! (elementwise.cu); backward: the gate's gradient (reduce.cu), both layers' backward in one
//! kernel, the parameter gradients, and dx in one pass.

use anyhow::{Result, ensure};

use super::elementwise::{bcast_mul, bcast_view};
use super::reduce::{mean_over, sum_mid};
use super::{GpuTensor, items, same_device, same_shape};
use crate::device::launch::{Arg, Kernel, LaunchConfig, MAX_DYNAMIC_SHARED, to_i32};
use crate::device::op::SePool;
use crate::device::shape::Shape;

/// Threads per block of the per-row layer kernels (rows are at most a few hundred channels).
const ROW_THREADS: u32 = 128;

/// The two 1x1 layers: `w1` (R, C) or (R, C, 1, 1, 1) and `b1` (R); `w2` (C, R...) and `b2` (C).
pub struct SeParams<'a> {
    pub w1: &'a GpuTensor,
    pub b1: &'a GpuTensor,
    pub w2: &'a GpuTensor,
    pub b2: &'a GpuTensor,
}

/// What the backward needs of a forward: pooled rows, hidden activations and the gate.
pub struct SeSaved {
    pub pooled: GpuTensor,
    pub hidden: GpuTensor,
    pub gate: GpuTensor,
}

/// Gradients of [`se_forward`], shaped as the input and the parameters.
pub struct SeGrads {
    pub gx: GpuTensor,
    pub gw1: GpuTensor,
    pub gb1: GpuTensor,
    pub gw2: GpuTensor,
    pub gb2: GpuTensor,
}

/// (channels, reduced channels) of the layers, checked against `x`.
fn widths(op: &str, x: &GpuTensor, p: &SeParams) -> Result<(usize, usize)> {
    for t in [p.w1, p.b1, p.w2, p.b2] {
        same_device(op, x, t)?;
    }
    let (c, r) = (x.shape.last(), p.b1.numel());
    ensure!(
        r > 0
            && p.w1.numel() == r * c
            && p.w1.dims()[0] == r
            && p.w2.numel() == c * r
            && p.w2.dims()[0] == c
            && p.b2.numel() == c,
        "{op}: layers w1 {}, b1 {}, w2 {}, b2 {} do not map the {c} channels of input {} to {r} and back",
        p.w1.shape,
        p.b1.shape,
        p.w2.shape,
        p.b2.shape,
        x.shape
    );
    Ok((c, r))
}

/// The gate's shape: one value per (sample, channel), or per (sample, w, channel) for `SePool::Dh`.
fn gate_shape(x: &GpuTensor, pool: SePool) -> Result<Shape> {
    let [n, _, _, w, c] = x.shape.ndhwc()?;
    Ok(match pool {
        SePool::Dhw => [n, 1, 1, 1, c].into(),
        SePool::Dh => [n, 1, 1, w, c].into(),
    })
}

/// One block per pooled row, with the row and its hidden vector in shared memory.
fn row_launch(op: &str, rows: usize, c: usize, r: usize) -> Result<LaunchConfig> {
    let bytes = 4 * (c + r);
    ensure!(
        bytes <= MAX_DYNAMIC_SHARED as usize,
        "{op}: {c} + {r} channels exceed the shared memory of one block"
    );
    Ok(LaunchConfig::linear(to_i32(rows, op)?.max(1) as u32, ROW_THREADS).with_shared(bytes as u32))
}

/// `x * sigmoid(W2 relu(W1 mean(x) + b1) + b2)` over (N, D, H, W, C) `x`, the mean over D, H, W
/// (`SePool::Dhw`) or over D, H (`SePool::Dh`, a gate per (sample, w)).
pub fn se_forward(x: &GpuTensor, p: &SeParams, pool: SePool) -> Result<(GpuTensor, SeSaved)> {
    let op = "squeeze-excitation";
    let (c, r) = widths(op, x, p)?;
    let gshape = gate_shape(x, pool)?;
    let pooled = mean_over(x, gshape.clone())?;
    let rows = pooled.numel() / c;
    let mut hidden = GpuTensor::output(&x.gpu, [rows, r])?;
    let mut gate = GpuTensor::output(&x.gpu, gshape)?;
    let args = [
        Arg::read(pooled.buf()),
        Arg::read(&p.w1.buf),
        Arg::read(&p.b1.buf),
        Arg::read(&p.w2.buf),
        Arg::read(&p.b2.buf),
        Arg::write(hidden.out()?),
        Arg::write(gate.out()?),
        Arg::val(to_i32(c, op)?),
        Arg::val(to_i32(r, op)?),
    ];
    x.gpu.launch(Kernel::SE_MLP_FWD, row_launch(op, rows, c, r)?, &args)?;
    let y = bcast_mul(x, &gate)?;
    Ok((y, SeSaved { pooled, hidden, gate }))
}

/// Backward of [`se_forward`] from its input `x` and what it saved.
pub fn se_backward(gy: &GpuTensor, x: &GpuTensor, p: &SeParams, saved: &SeSaved) -> Result<SeGrads> {
    let op = "squeeze-excitation backward";
    let (c, r) = widths(op, x, p)?;
    same_shape(op, gy, x)?;
    let bc = bcast_view(op, &x.shape, &saved.gate.shape)?;
    let rows = saved.gate.numel() / c;
    ensure!(
        saved.pooled.numel() == rows * c && saved.hidden.numel() == rows * r,
        "{op}: saved tensors do not belong to input {}",
        x.shape
    );
    let gpu = &x.gpu;
    let gg = sum_mid(gy, Some(x), bc, 1.0)?;
    let (mut d2, mut d1, mut ds) =
        (gpu.alloc::<f32>(rows * c)?, gpu.alloc::<f32>(rows * r)?, gpu.alloc::<f32>(rows * c)?);
    let (ci, ri) = (to_i32(c, op)?, to_i32(r, op)?);
    gpu.launch(
        Kernel::SE_MLP_BWD,
        row_launch(op, rows, c, r)?,
        &[
            Arg::read(gg.buf()),
            Arg::read(&saved.gate.buf),
            Arg::read(&saved.hidden.buf),
            Arg::read(&p.w1.buf),
            Arg::read(&p.w2.buf),
            Arg::write(&mut d2),
            Arg::write(&mut d1),
            Arg::write(&mut ds),
            Arg::val(ci),
            Arg::val(ri),
        ],
    )?;
    let mut gw1 = GpuTensor::output(gpu, p.w1.shape.clone())?;
    let mut gb1 = GpuTensor::output(gpu, p.b1.shape.clone())?;
    let mut gw2 = GpuTensor::output(gpu, p.w2.shape.clone())?;
    let mut gb2 = GpuTensor::output(gpu, p.b2.shape.clone())?;
    gpu.launch(
        Kernel::SE_WEIGHT_GRADS,
        items(2 * r * c + r + c),
        &[
            Arg::read(&d1),
            Arg::read(&d2),
            Arg::read(&saved.pooled.buf),
            Arg::read(&saved.hidden.buf),
            Arg::write(gw1.out()?),
            Arg::write(gb1.out()?),
            Arg::write(gw2.out()?),
            Arg::write(gb2.out()?),
            Arg::val(rows as i64),
            Arg::val(ci),
            Arg::val(ri),
        ],
    )?;
    let mut gx = GpuTensor::output(gpu, x.shape.clone())?;
    let n = x.numel();
    gpu.launch(
        Kernel::SE_INPUT_GRAD,
        items(n),
        &[
            Arg::read(gy.buf()),
            Arg::read(&saved.gate.buf),
            Arg::read(&ds),
            Arg::write(gx.out()?),
            Arg::val(bc.mid as i64),
            Arg::val(bc.inner as i64),
            Arg::val((1.0 / bc.mid as f64) as f32),
            Arg::val(n as i64),
        ],
    )?;
    Ok(SeGrads { gx, gw1, gb1, gw2, gb2 })
}
