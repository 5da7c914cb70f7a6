//! kernels/norm.cu: instance norm of channels-last data fused with the affine map, a leaky-ReLU-family
//! activation and, for BasicBlockD's last norm, the residual add before it. Forward: two passes over
//! the input (statistics, then apply); backward: two passes (sums, then dx). Statistics and sums are
//! combined in a fixed order, so results are deterministic for a given shape.

use anyhow::{Result, ensure};

use super::{GpuTensor, same_device, same_shape};
use crate::device::launch::{Arg, Kernel, LaunchConfig, to_i32};
use crate::device::op::Act;

/// Threads per block of the channel-tiled kernels (`kTileThreads` in kernels/fused.cuh).
const TILE_THREADS: usize = 256;
/// Blocks per pass to aim for: a few waves on the largest GPUs; fewer chunks when the data is small.
const TARGET_BLOCKS: usize = 1024;
const MAX_GRID_YZ: usize = 65535;

/// The launch of a channel-tiled pass over `groups` runs of `voxels` voxels with `c` channels: grid
/// (channel tiles, chunks of `rows_per_chunk` voxels, groups).
pub(super) struct TileGrid {
    pub cfg: LaunchConfig,
    pub rows_per_chunk: i64,
    pub chunks: usize,
}

pub(super) fn tile_grid(op: &str, c: usize, groups: usize, voxels: usize) -> Result<TileGrid> {
    ensure!(c > 0 && voxels > 0, "{op}: no channels or no voxels");
    ensure!(groups <= MAX_GRID_YZ, "{op}: {groups} samples exceed the grid limit {MAX_GRID_YZ}");
    let cols = c.min(32);
    let rows = TILE_THREADS / cols;
    let tiles = c.div_ceil(cols);
    let want = TARGET_BLOCKS.div_ceil(groups * tiles).clamp(1, MAX_GRID_YZ);
    let per = voxels.div_ceil(want).div_ceil(rows) * rows;
    let per = per.max(voxels.div_ceil(MAX_GRID_YZ));
    let chunks = voxels.div_ceil(per);
    Ok(TileGrid {
        cfg: LaunchConfig {
            grid: [tiles as u32, chunks as u32, groups as u32],
            block: [TILE_THREADS as u32, 1, 1],
            shared_bytes: 0,
        },
        rows_per_chunk: per as i64,
        chunks,
    })
}

/// One warp per entry, for the finish kernels.
fn warp_per_entry(entries: usize) -> LaunchConfig {
    LaunchConfig::linear((entries * 32).div_ceil(256).max(1) as u32, 256)
}

/// Per-(sample, channel) mean and 1/sqrt(var + eps), (N, C) each, saved for the backward.
pub struct GpuNormStats {
    pub mean: GpuTensor,
    pub rstd: GpuTensor,
}

/// (samples, voxels per sample, channels) of `x`, with gamma and beta checked against it.
fn layout(op: &str, x: &GpuTensor, gamma: &GpuTensor, beta: &GpuTensor) -> Result<(usize, usize, usize)> {
    same_device(op, x, gamma)?;
    same_device(op, x, beta)?;
    ensure!(x.shape.rank() >= 3, "{op}: input {} is not (N, spatial..., C)", x.shape);
    let (n, c) = (x.dims()[0], x.shape.last());
    ensure!(n > 0 && c > 0 && x.numel() >= n * c, "{op}: input {} has no voxels", x.shape);
    ensure!(
        gamma.numel() == c && beta.numel() == c,
        "{op}: gamma {} and beta {} must have the {c} channels of input {}",
        gamma.shape,
        beta.shape,
        x.shape
    );
    Ok((n, x.numel() / (n * c), c))
}

/// `act(instance_norm(x) * gamma + beta [+ residual])` over (N, D, H, W, C) `x`, with its statistics.
/// `residual` is BasicBlockD's shortcut, added before the activation.
pub fn instance_norm_forward(
    x: &GpuTensor,
    gamma: &GpuTensor,
    beta: &GpuTensor,
    eps: f64,
    act: Act,
    residual: Option<&GpuTensor>,
) -> Result<(GpuTensor, GpuNormStats)> {
    let op = "instance norm";
    let (n, s, c) = layout(op, x, gamma, beta)?;
    if let Some(r) = residual {
        same_shape("instance norm residual", x, r)?;
    }
    let gpu = &x.gpu;
    let grid = tile_grid(op, c, n, s)?;
    let (s64, ci, rpc) = (s as i64, to_i32(c, "instance norm channels")?, grid.rows_per_chunk);
    let mut partial = gpu.alloc::<f64>(n * grid.chunks * 2 * c)?;
    gpu.launch(
        Kernel::NORM_STATS_PARTIALS,
        grid.cfg,
        &[Arg::read(x.buf()), Arg::write(&mut partial), Arg::val(s64), Arg::val(ci), Arg::val(rpc)],
    )?;
    let mut mean = GpuTensor::output(gpu, [n, c])?;
    let mut rstd = GpuTensor::output(gpu, [n, c])?;
    gpu.launch(
        Kernel::NORM_STATS_FINISH,
        warp_per_entry(n * c),
        &[
            Arg::read(&partial),
            Arg::read(x.buf()),
            Arg::write(mean.out()?),
            Arg::write(rstd.out()?),
            Arg::val(to_i32(n, "instance norm samples")?),
            Arg::val(ci),
            Arg::val(s64),
            Arg::val(grid.chunks as i32),
            Arg::val(eps),
        ],
    )?;
    let mut y = GpuTensor::output(gpu, x.shape.clone())?;
    let mut args = vec![Arg::read(x.buf())];
    args.extend(residual.map(|r| Arg::read(r.buf())));
    args.extend([
        Arg::read(mean.buf()),
        Arg::read(rstd.buf()),
        Arg::read(gamma.buf()),
        Arg::read(beta.buf()),
        Arg::write(y.out()?),
        Arg::val(s64),
        Arg::val(ci),
        Arg::val(rpc),
        Arg::val(act.slope() as f32),
    ]);
    let kernel = if residual.is_some() { Kernel::NORM_APPLY_RES_FWD } else { Kernel::NORM_APPLY_FWD };
    gpu.launch(kernel, grid.cfg, &args)?;
    Ok((y, GpuNormStats { mean, rstd }))
}

/// Gradients of [`instance_norm_forward`]; `dresidual` is set when the forward had a residual.
pub struct NormGrads {
    pub gx: GpuTensor,
    pub dgamma: GpuTensor,
    pub dbeta: GpuTensor,
    pub dresidual: Option<GpuTensor>,
}

/// Backward of [`instance_norm_forward`] from its input `x` and statistics. `residual_output` is
/// the forward's output `y` when it added a residual (the activation's derivative is read off it,
/// and the residual's gradient comes back in `dresidual`); None when it did not.
pub fn instance_norm_backward(
    gy: &GpuTensor,
    x: &GpuTensor,
    stats: &GpuNormStats,
    gamma: &GpuTensor,
    beta: &GpuTensor,
    act: Act,
    residual_output: Option<&GpuTensor>,
) -> Result<NormGrads> {
    let op = "instance norm backward";
    let (n, s, c) = layout(op, x, gamma, beta)?;
    same_shape(op, gy, x)?;
    if let Some(y) = residual_output {
        same_shape(op, y, x)?;
    }
    for t in [&stats.mean, &stats.rstd] {
        same_device(op, x, t)?;
        ensure!(t.numel() == n * c, "{op}: statistics {} do not match input {}", t.shape, x.shape);
    }
    let gpu = &x.gpu;
    let grid = tile_grid(op, c, n, s)?;
    let (s64, ci, ni, rpc) = (s as i64, to_i32(c, op)?, to_i32(n, op)?, grid.rows_per_chunk);
    let slope = act.slope() as f32;
    let mut partial = gpu.alloc::<f64>(n * grid.chunks * 2 * c)?;
    let mut gz = match residual_output {
        Some(y) => {
            let mut gz = GpuTensor::output(gpu, x.shape.clone())?;
            let args = [
                Arg::read(gy.buf()),
                Arg::read(x.buf()),
                Arg::read(y.buf()),
                Arg::read(&stats.mean.buf),
                Arg::write(gz.out()?),
                Arg::write(&mut partial),
                Arg::val(s64),
                Arg::val(ci),
                Arg::val(rpc),
                Arg::val(slope),
            ];
            gpu.launch(Kernel::NORM_BWD_PARTIALS_RES, grid.cfg, &args)?;
            Some(gz)
        }
        None => {
            let args = [
                Arg::read(gy.buf()),
                Arg::read(x.buf()),
                Arg::read(&stats.mean.buf),
                Arg::read(&stats.rstd.buf),
                Arg::read(gamma.buf()),
                Arg::read(beta.buf()),
                Arg::write(&mut partial),
                Arg::val(s64),
                Arg::val(ci),
                Arg::val(rpc),
                Arg::val(slope),
            ];
            gpu.launch(Kernel::NORM_BWD_PARTIALS_ACT, grid.cfg, &args)?;
            None
        }
    };
    let mut coef = gpu.alloc::<f32>(2 * n * c)?;
    let mut dgamma = GpuTensor::output(gpu, gamma.shape.clone())?;
    let mut dbeta = GpuTensor::output(gpu, beta.shape.clone())?;
    gpu.launch(
        Kernel::NORM_BWD_FINISH,
        warp_per_entry(c),
        &[
            Arg::read(&partial),
            Arg::read(&stats.rstd.buf),
            Arg::write(&mut coef),
            Arg::write(dgamma.out()?),
            Arg::write(dbeta.out()?),
            Arg::val(ni),
            Arg::val(ci),
            Arg::val(s64),
            Arg::val(grid.chunks as i32),
        ],
    )?;
    let mut gx = GpuTensor::output(gpu, x.shape.clone())?;
    match &mut gz {
        Some(gz) => {
            let args = [
                Arg::read(gz.buf()),
                Arg::read(x.buf()),
                Arg::read(&stats.mean.buf),
                Arg::read(&stats.rstd.buf),
                Arg::read(gamma.buf()),
                Arg::read(&coef),
                Arg::write(gx.out()?),
                Arg::val(ni),
                Arg::val(s64),
                Arg::val(ci),
                Arg::val(rpc),
            ];
            gpu.launch(Kernel::NORM_BWD_APPLY_RES, grid.cfg, &args)?;
        }
        None => {
            let args = [
                Arg::read(gy.buf()),
                Arg::read(x.buf()),
                Arg::read(&stats.mean.buf),
                Arg::read(&stats.rstd.buf),
                Arg::read(gamma.buf()),
                Arg::read(beta.buf()),
                Arg::read(&coef),
                Arg::write(gx.out()?),
                Arg::val(ni),
                Arg::val(s64),
                Arg::val(ci),
                Arg::val(rpc),
                Arg::val(slope),
            ];
            gpu.launch(Kernel::NORM_BWD_APPLY_ACT, grid.cfg, &args)?;
        }
    }
    Ok(NormGrads { gx, dgamma, dbeta, dresidual: gz })
}
