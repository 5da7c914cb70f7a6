//! kernels/pool.cu: average pooling with kernel = stride over channels-last volumes.

use anyhow::{Result, ensure};

use super::{GpuTensor, items};
use crate::device::cpu::pool::avg_pool_out_dims;
use crate::device::launch::{Arg, Kernel, to_i32};
use crate::device::shape::Shape;

/// The `int` arguments both kernels take: input dims, output dims, window.
fn dims_args(op: &str, dims: [usize; 5], k: [usize; 3]) -> Result<Vec<Arg<'static>>> {
    ensure!(k.iter().all(|&k| k > 0), "{op}: zero window {k:?}");
    let [_, od, oh, ow, _] = avg_pool_out_dims(dims, k);
    [dims[1], dims[2], dims[3], dims[4], od, oh, ow, k[0], k[1], k[2]]
        .iter()
        .map(|&v| Ok(Arg::val(to_i32(v, op)?)))
        .collect()
}

/// The mean of each non-overlapping window `k` of an (N, D, H, W, C) volume.
pub fn avg_pool(x: &GpuTensor, k: [usize; 3]) -> Result<GpuTensor> {
    let dims = x.shape.ndhwc()?;
    let ints = dims_args("avg pool", dims, k)?;
    let out = avg_pool_out_dims(dims, k);
    let mut y = GpuTensor::output(&x.gpu, out)?;
    let n = y.numel();
    let mut args = vec![Arg::read(x.buf()), Arg::write(y.out()?)];
    args.extend(ints);
    args.push(Arg::val(n as i64));
    x.gpu.launch(Kernel::POOL_AVG_FWD, items(n), &args)?;
    Ok(y)
}

/// Backward of [`avg_pool`] for an input of shape `input`: each window's gradient spread evenly,
/// zero on the voxels no window covers.
pub fn avg_pool_backward(gy: &GpuTensor, input: impl Into<Shape>, k: [usize; 3]) -> Result<GpuTensor> {
    let input = input.into();
    let dims = input.ndhwc()?;
    let ints = dims_args("avg pool backward", dims, k)?;
    let out = avg_pool_out_dims(dims, k);
    ensure!(
        gy.dims() == out,
        "avg pool backward: gradient of shape {}, expected {}",
        gy.shape,
        Shape::new(&out)
    );
    let mut gx = GpuTensor::output(&gy.gpu, input)?;
    let n = gx.numel();
    let mut args = vec![Arg::read(gy.buf()), Arg::write(gx.out()?)];
    args.extend(ints);
    args.push(Arg::val(n as i64));
    gy.gpu.launch(Kernel::POOL_AVG_BWD, items(n), &args)?;
    Ok(gx)
}
