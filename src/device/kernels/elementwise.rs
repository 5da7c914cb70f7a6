//! kernels/elementwise.cu: sums and products, the channels-last gate broadcast, scaling, and
//! channel concat with its backward.

use anyhow::{Result, ensure};

use super::{GpuTensor, items, reduce, same_device, same_shape};
use crate::device::launch::{Arg, Kernel, to_i32};
use crate::device::op::Bcast;
use crate::device::shape::Shape;

fn binary(kernel: Kernel, op: &str, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
    same_shape(op, a, b)?;
    let mut y = GpuTensor::output(&a.gpu, a.shape.clone())?;
    let args = [Arg::read(a.buf()), Arg::read(b.buf()), Arg::write(y.out()?), Arg::val(a.numel() as i64)];
    a.gpu.launch(kernel, items(a.numel()), &args)?;
    Ok(y)
}

/// `a + b` (same shapes). Its backward passes the gradient through to both.
pub fn add(a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
    binary(Kernel::EW_ADD, "add", a, b)
}

/// `a * b` (same shapes).
pub fn mul(a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
    binary(Kernel::EW_MUL, "mul", a, b)
}

/// Gradients of `a * b`: `(gy * b, gy * a)`.
pub fn mul_backward(gy: &GpuTensor, a: &GpuTensor, b: &GpuTensor) -> Result<(GpuTensor, GpuTensor)> {
    Ok((binary(Kernel::EW_MUL, "mul backward", gy, b)?, binary(Kernel::EW_MUL, "mul backward", gy, a)?))
}

/// `x *= s` in place (gradient clipping).
pub fn scale_in_place(x: &mut GpuTensor, s: f32) -> Result<()> {
    let n = x.numel();
    let gpu = x.gpu.clone();
    gpu.launch(Kernel::EW_SCALE_IN_PLACE, items(n), &[Arg::write(x.out()?), Arg::val(s), Arg::val(n as i64)])
}

/// The (outer, mid, inner) view of `small` broadcast against `full`, or an error naming both.
pub(crate) fn bcast_view(op: &str, full: &Shape, small: &Shape) -> Result<Bcast> {
    Bcast::of(full.dims(), small.dims()).ok_or_else(|| {
        anyhow::anyhow!("{op}: shape {small} does not broadcast against {full} over one run of axes")
    })
}

/// `x * g` with the gate `g` broadcast over `x`: (N,1,1,1,C) or (N,1,1,W,C) against (N,D,H,W,C),
/// or any shape whose broadcast axes form one run.
pub fn bcast_mul(x: &GpuTensor, g: &GpuTensor) -> Result<GpuTensor> {
    same_device("bcast_mul", x, g)?;
    let bc = bcast_view("bcast_mul", &x.shape, &g.shape)?;
    let mut y = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let n = x.numel();
    let args = [
        Arg::read(x.buf()),
        Arg::read(g.buf()),
        Arg::write(y.out()?),
        Arg::val(bc.mid as i64),
        Arg::val(bc.inner as i64),
        Arg::val(n as i64),
    ];
    x.gpu.launch(Kernel::EW_BCAST_MUL, items(n), &args)?;
    Ok(y)
}

/// Gradients of [`bcast_mul`]: `(gy * g, sum over the broadcast axes of gy * x)`.
pub fn bcast_mul_backward(gy: &GpuTensor, x: &GpuTensor, g: &GpuTensor) -> Result<(GpuTensor, GpuTensor)> {
    same_shape("bcast_mul backward", gy, x)?;
    let bc = bcast_view("bcast_mul backward", &x.shape, &g.shape)?;
    let gx = bcast_mul(gy, g)?;
    let gg = reduce::sum_mid(gy, Some(x), bc, 1.0)?.reshape(g.shape.clone())?;
    Ok((gx, gg))
}

/// `small * scale` repeated over the middle axis of `bc` into a tensor of shape `full`.
pub(crate) fn bcast_expand(small: &GpuTensor, full: &Shape, bc: Bcast, scale: f32) -> Result<GpuTensor> {
    ensure!(
        small.numel() == bc.small_len() && full.numel() == bc.full_len(),
        "broadcast expand: {} into {full} does not match the view {bc:?}",
        small.shape
    );
    let mut y = GpuTensor::output(&small.gpu, full.clone())?;
    let n = full.numel();
    let args = [
        Arg::read(small.buf()),
        Arg::write(y.out()?),
        Arg::val(scale),
        Arg::val(bc.mid as i64),
        Arg::val(bc.inner as i64),
        Arg::val(n as i64),
    ];
    small.gpu.launch(Kernel::EW_BCAST_EXPAND, items(n), &args)?;
    Ok(y)
}

/// Copies `width` columns per row: from `src` (rows of `src_cols`, from column `src_off`) into `dst`
/// (rows of `dst_cols`, from column `dst_off`).
fn copy_columns(
    src: &GpuTensor,
    dst: &mut GpuTensor,
    width: usize,
    src_at: (usize, usize),
    dst_at: (usize, usize),
) -> Result<()> {
    let rows = src.numel().checked_div(src_at.0).unwrap_or(0);
    let gpu = src.gpu.clone();
    let args = [
        Arg::read(src.buf()),
        Arg::write(dst.out()?),
        Arg::val(rows as i64),
        Arg::val(to_i32(width, "concat width")?),
        Arg::val(to_i32(src_at.0, "concat source channels")?),
        Arg::val(to_i32(src_at.1, "concat source offset")?),
        Arg::val(to_i32(dst_at.0, "concat channels")?),
        Arg::val(to_i32(dst_at.1, "concat offset")?),
    ];
    gpu.launch(Kernel::EW_COPY_COLUMNS, items(rows * width), &args)
}

/// Concatenates tensors along their last axis (channels); all other dims must agree.
pub fn concat_channels(parts: &[&GpuTensor]) -> Result<GpuTensor> {
    let first = parts.first().ok_or_else(|| anyhow::anyhow!("concat: no tensors"))?;
    let lead = &first.dims()[..first.shape.rank().saturating_sub(1)];
    for p in parts {
        same_device("concat", first, p)?;
        ensure!(
            p.shape.rank() == first.shape.rank() && &p.dims()[..lead.len()] == lead,
            "concat: shapes {} and {} differ outside the last axis",
            first.shape,
            p.shape
        );
    }
    let total: usize = parts.iter().map(|p| p.shape.last()).sum();
    let mut dims = lead.to_vec();
    dims.push(total);
    let mut y = GpuTensor::output(&first.gpu, dims)?;
    let mut at = 0;
    for p in parts {
        let w = p.shape.last();
        copy_columns(p, &mut y, w, (w, 0), (total, at))?;
        at += w;
    }
    Ok(y)
}

/// Backward of [`concat_channels`]: `gy` cut back into parts of the given channel counts.
pub fn concat_channels_backward(gy: &GpuTensor, widths: &[usize]) -> Result<Vec<GpuTensor>> {
    let total = gy.shape.last();
    ensure!(
        widths.iter().sum::<usize>() == total,
        "concat backward: widths {widths:?} do not add up to the {total} channels of {}",
        gy.shape
    );
    let lead = &gy.dims()[..gy.shape.rank().saturating_sub(1)];
    let mut at = 0;
    widths
        .iter()
        .map(|&w| {
            let mut dims = lead.to_vec();
            dims.push(w);
            let mut part = GpuTensor::output(&gy.gpu, dims)?;
            copy_columns(gy, &mut part, w, (total, at), (w, 0))?;
            at += w;
            Ok(part)
        })
        .collect()
}

/// `s * x` into a new tensor.
pub fn scale(x: &GpuTensor, s: f32) -> Result<GpuTensor> {
    let mut y = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let n = x.numel();
    let args = [Arg::read(x.buf()), Arg::write(y.out()?), Arg::val(s), Arg::val(n as i64)];
    x.gpu.launch(Kernel::EW_SCALE, items(n), &args)?;
    Ok(y)
}

/// `y += a * x` in place (same shapes): gradient accumulation without a new buffer.
pub fn axpy_in_place(y: &mut GpuTensor, a: f32, x: &GpuTensor) -> Result<()> {
    same_shape("accumulate", y, x)?;
    let n = x.numel();
    let gpu = x.gpu.clone();
    gpu.launch(
        Kernel::EW_AXPY,
        items(n),
        &[Arg::read(x.buf()), Arg::write(y.out()?), Arg::val(a), Arg::val(n as i64)],
    )
}

/// `dst = src` into `dst`'s own buffer (same element count).
pub fn copy_into(dst: &mut GpuTensor, src: &GpuTensor) -> Result<()> {
    same_device("copy", dst, src)?;
    ensure!(dst.numel() == src.numel(), "copy: {} into {}", src.shape, dst.shape);
    let n = src.numel();
    let gpu = src.gpu.clone();
    gpu.launch(
        Kernel::EW_SCALE,
        items(n),
        &[Arg::read(src.buf()), Arg::write(dst.out()?), Arg::val(1.0f32), Arg::val(n as i64)],
    )
}
