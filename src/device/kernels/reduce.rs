//! kernels/reduce.cu: sums and means over the broadcast axes of a shape (spatial sums and means of
//! channels-last data, the gradient of a gate), deterministic for a given shape.

use anyhow::{Result, ensure};

use super::elementwise::{bcast_expand, bcast_view};
use super::{GpuTensor, items, same_shape};
use crate::device::launch::{Arg, Kernel, LaunchConfig, to_i32};
use crate::device::op::Bcast;
use crate::device::shape::Shape;

/// Rows of the middle axis per partial sum; more when the grid's y limit needs it.
const ROWS_PER_CHUNK: usize = 512;
const MAX_GRID_YZ: usize = 65535;

/// `scale *` the sum over the middle axis of `bc` of `a` (or of `a * b`), as an (outer, inner)
/// tensor: per block of rows a partial sum in f64, then the partials added in order.
pub(crate) fn sum_mid(a: &GpuTensor, b: Option<&GpuTensor>, bc: Bcast, scale: f64) -> Result<GpuTensor> {
    if let Some(b) = b {
        same_shape("sum of products", a, b)?;
    }
    ensure!(a.numel() == bc.full_len(), "sum over {bc:?}: tensor of shape {} does not match", a.shape);
    ensure!(
        bc.outer <= MAX_GRID_YZ,
        "sum over {bc:?}: {} outer rows exceed the grid limit {MAX_GRID_YZ}",
        bc.outer
    );
    let gpu = &a.gpu;
    let rows_per_chunk = ROWS_PER_CHUNK.max(bc.mid.div_ceil(MAX_GRID_YZ));
    let chunks = bc.mid.div_ceil(rows_per_chunk).max(1);
    let cols = bc.inner.clamp(1, 32);
    let mut partial = gpu.alloc::<f64>(bc.outer * chunks * bc.inner)?;
    let cfg = LaunchConfig {
        grid: [bc.inner.div_ceil(cols).max(1) as u32, chunks as u32, bc.outer.max(1) as u32],
        block: [256, 1, 1],
        shared_bytes: 0,
    };
    let (mid, inner, rpc) = (bc.mid as i64, to_i32(bc.inner, "reduced row length")?, rows_per_chunk as i64);
    match b {
        None => gpu.launch(
            Kernel::REDUCE_MID_PARTIALS,
            cfg,
            &[Arg::read(a.buf()), Arg::write(&mut partial), Arg::val(mid), Arg::val(inner), Arg::val(rpc)],
        )?,
        Some(b) => gpu.launch(
            Kernel::REDUCE_MID_PROD_PARTIALS,
            cfg,
            &[
                Arg::read(a.buf()),
                Arg::read(b.buf()),
                Arg::write(&mut partial),
                Arg::val(mid),
                Arg::val(inner),
                Arg::val(rpc),
            ],
        )?,
    }
    let mut y = GpuTensor::output(gpu, [bc.outer, bc.inner])?;
    let args = [
        Arg::read(&partial),
        Arg::write(y.out()?),
        Arg::val(bc.outer as i64),
        Arg::val(inner),
        Arg::val(chunks as i32),
        Arg::val(scale),
    ];
    gpu.launch(Kernel::REDUCE_MID_FINISH, items(bc.small_len()), &args)?;
    Ok(y)
}

fn reduce_to(op: &str, x: &GpuTensor, small: &Shape, mean: bool) -> Result<GpuTensor> {
    let bc = bcast_view(op, &x.shape, small)?;
    let scale = if mean { 1.0 / bc.mid as f64 } else { 1.0 };
    sum_mid(x, None, bc, scale)?.reshape(small.clone())
}

/// Sum of `x` over the axes where `small` has size 1, e.g. (N,D,H,W,C) to (N,1,1,1,C); the
/// reduced axes must form one run.
pub fn sum_over(x: &GpuTensor, small: impl Into<Shape>) -> Result<GpuTensor> {
    reduce_to("sum", x, &small.into(), false)
}

/// Mean of `x` over the axes where `small` has size 1 (a spatial mean: (N,D,H,W,C) to (N,1,1,1,C)).
pub fn mean_over(x: &GpuTensor, small: impl Into<Shape>) -> Result<GpuTensor> {
    reduce_to("mean", x, &small.into(), true)
}

fn expand_to(op: &str, gy: &GpuTensor, full: &Shape, mean: bool) -> Result<GpuTensor> {
    let bc = bcast_view(op, full, &gy.shape)?;
    let scale = if mean { (1.0 / bc.mid as f64) as f32 } else { 1.0 };
    bcast_expand(gy, full, bc, scale)
}

/// Backward of [`sum_over`]: `gy` repeated over the reduced axes of `full`.
pub fn sum_over_backward(gy: &GpuTensor, full: impl Into<Shape>) -> Result<GpuTensor> {
    expand_to("sum backward", gy, &full.into(), false)
}

/// Backward of [`mean_over`]: `gy / count` repeated over the reduced axes of `full`.
pub fn mean_over_backward(gy: &GpuTensor, full: impl Into<Shape>) -> Result<GpuTensor> {
    expand_to("mean backward", gy, &full.into(), true)
}

/// The sum of every element, on the host.
pub fn sum_all(x: &GpuTensor) -> Result<f32> {
    let bc = Bcast { outer: 1, mid: x.numel(), inner: 1 };
    sum_mid(x, None, bc, 1.0)?.to_host()?.item()
}
