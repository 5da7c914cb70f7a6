//! kernels/conv.cu: conv3d forward, backward-data and backward-weight with "same" padding and any
//! stride, and the transposed conv3d whose kernel equals its stride, as implicit GEMMs on
//! channels-last tensors, in the layouts and with the math of `device::cpu::conv`.
//!
//! The transposed conv is the blocked conv (kernel = stride, no padding) from its output space to
//! its input space with the passes exchanged, as on the CPU: its forward is that conv's
//! backward-data, its backward-data that conv's forward, its weight gradient that conv's with the
//! operands swapped.
//!
//! Per shape the launch picks the 64 x 64 tile (two blocks per SM) or the 128 x 128 one (half the
//! shared-memory traffic per multiply-add) and, when the grid is too small to fill a GPU (deep
//! layers: few voxels, a long reduction), splits the reduction into ranges whose partial sums
//! `conv_split_sum` adds in a fixed order; the weight gradient always reduces over voxel ranges
//! that way. No atomics: every pass is deterministic for a given shape.

use anyhow::{Context, Result, ensure};

use super::{GpuTensor, items, reduce, same_device};
use crate::device::launch::{Arg, Gpu, GpuBuffer, Kernel, LaunchConfig, to_i32};
use crate::device::op::{ConvDims, TransposedDims};

/// The multiply of a conv kernel: fp32 on CUDA cores (the exact fallback), or TF32 tensor cores
/// (operands rounded to 10 mantissa bits, sums in fp32: about 1e-3 relative error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPrecision {
    Fp32,
    Tf32,
}

/// Multiply-adds from which TF32 pays for itself; below, launch overhead and partial tiles dominate.
const TF32_MIN_MACS: usize = 1 << 28;

impl ConvPrecision {
    /// TF32 where tensor cores pay: channel counts that are multiples of 8 (whole k8 steps and
    /// aligned vector loads) on a large problem; fp32 otherwise.
    pub fn for_conv(d: &ConvDims) -> Self {
        let macs = d.y_len() * d.kernel.iter().product::<usize>() * d.cin;
        if d.cin.is_multiple_of(8) && d.cout.is_multiple_of(8) && macs >= TF32_MIN_MACS {
            ConvPrecision::Tf32
        } else {
            ConvPrecision::Fp32
        }
    }
}

/// The two square GEMM tiles of kernels/conv.cu: 64 (two blocks of 256 threads per SM) and 128
/// (one block, but twice the multiply-adds per shared-memory load).
const SMALL: usize = 64;
const LARGE: usize = 128;
const THREADS: u32 = 256;
/// Blocks a grid of large tiles needs to take them: two waves on a 132-SM H100.
const LARGE_MIN_BLOCKS: usize = 264;
/// Voxels per shared-memory stage of the backward-weight.
const DEPTH_STAGE: usize = 16;
/// Blocks the backward-weight aims for: about two waves of either tile on a 132-SM H100.
const WGRAD_TARGET_BLOCKS: [usize; 2] = [528, 264];
/// Voxels a split sums at least, so that its partial sum is worth the extra memory traffic.
const WGRAD_MIN_VOXELS: usize = 64;
/// Floats of partial sums a pass may allocate.
const MAX_WORKSPACE: usize = 1 << 26;
/// Blocks under which a forward or backward-data GEMM splits its depth: two waves of two.
const SPLIT_TARGET_BLOCKS: usize = 264;
/// GEMM depth a split takes at least (16 stages), to be worth its extra pass over the output.
const SPLIT_MIN_DEPTH: usize = 256;

/// A conv as the kernels take it: x (n, input, c) to y (n, output, k), weight (k, kernel, c).
#[derive(Clone, Copy, Debug)]
struct Problem {
    n: usize,
    input: [usize; 3],
    c: usize,
    output: [usize; 3],
    k: usize,
    kernel: [usize; 3],
    stride: [usize; 3],
    pad: [usize; 3],
}

impl Problem {
    fn conv(d: &ConvDims) -> Self {
        Problem {
            n: d.n,
            input: d.input,
            c: d.cin,
            output: d.output(),
            k: d.cout,
            kernel: d.kernel,
            stride: d.stride,
            pad: d.pad(),
        }
    }

    /// The blocked conv from the transposed conv's output space to its input space.
    fn blocked(d: &TransposedDims) -> Self {
        Problem {
            n: d.n,
            input: d.output(),
            c: d.cout,
            output: d.input,
            k: d.cin,
            kernel: d.kernel,
            stride: d.kernel,
            pad: [0; 3],
        }
    }

    /// A 1x1x1 stride-1 conv: the activations are the im2col matrix itself.
    fn pointwise(&self) -> bool {
        self.kernel == [1; 3] && self.stride == [1; 3]
    }

    fn out_voxels(&self) -> usize {
        self.n * self.output.iter().product::<usize>()
    }

    fn kdim(&self) -> usize {
        self.kernel.iter().product::<usize>() * self.c
    }

    /// The 18 trailing int parameters of every conv kernel.
    fn args(&self) -> Result<Vec<Arg<'static>>> {
        let mut v = vec![self.n];
        v.extend(self.input);
        v.push(self.c);
        v.extend(self.output);
        v.push(self.k);
        v.extend(self.kernel);
        v.extend(self.stride);
        v.extend(self.pad);
        v.into_iter().map(|x| Ok(Arg::val(to_i32(x, "conv dimension")?))).collect()
    }
}

/// [64, 128 tile] x [fp32, tf32] x [general, 1x1x1] kernels of each pass.
type Variants = [[[Kernel; 2]; 2]; 2];
const FORWARD: Variants = [
    [[Kernel::CONV_FWD_F32, Kernel::CONV_FWD_1X1_F32], [Kernel::CONV_FWD_TF32, Kernel::CONV_FWD_1X1_TF32]],
    [
        [Kernel::CONV_FWD_F32_128, Kernel::CONV_FWD_1X1_F32_128],
        [Kernel::CONV_FWD_TF32_128, Kernel::CONV_FWD_1X1_TF32_128],
    ],
];
const DATA: Variants = [
    [
        [Kernel::CONV_DGRAD_F32, Kernel::CONV_DGRAD_1X1_F32],
        [Kernel::CONV_DGRAD_TF32, Kernel::CONV_DGRAD_1X1_TF32],
    ],
    [
        [Kernel::CONV_DGRAD_F32_128, Kernel::CONV_DGRAD_1X1_F32_128],
        [Kernel::CONV_DGRAD_TF32_128, Kernel::CONV_DGRAD_1X1_TF32_128],
    ],
];
const WEIGHT: Variants = [
    [
        [Kernel::CONV_WGRAD_F32, Kernel::CONV_WGRAD_1X1_F32],
        [Kernel::CONV_WGRAD_TF32, Kernel::CONV_WGRAD_1X1_TF32],
    ],
    [
        [Kernel::CONV_WGRAD_F32_128, Kernel::CONV_WGRAD_1X1_F32_128],
        [Kernel::CONV_WGRAD_TF32_128, Kernel::CONV_WGRAD_1X1_TF32_128],
    ],
];

/// How a pass runs: its precision, and the tile and depth splits unless chosen by shape.
#[derive(Clone, Copy, Debug)]
struct Plan {
    precision: ConvPrecision,
    tile: Option<usize>,
    splits: Option<usize>,
}

impl Plan {
    fn auto(precision: ConvPrecision) -> Self {
        Plan { precision, tile: None, splits: None }
    }
}

fn pick(v: &Variants, tile: usize, pr: &Problem, p: ConvPrecision) -> Kernel {
    v[(tile == LARGE) as usize][(p == ConvPrecision::Tf32) as usize][pr.pointwise() as usize]
}

/// Whether `cols` GEMM columns waste at most 1/8 of a row of large tiles.
fn fills_large(cols: usize) -> bool {
    cols >= LARGE && cols.div_ceil(LARGE) * LARGE <= cols + cols / 8
}

/// The tile of a forward or backward-data GEMM: large where its columns fill it and its grid
/// still covers the GPU, else small.
fn tile_for(rows: usize, cols: usize, layers: usize) -> usize {
    let blocks = rows.div_ceil(LARGE) * cols.div_ceil(LARGE) * layers;
    if fills_large(cols) && blocks >= LARGE_MIN_BLOCKS { LARGE } else { SMALL }
}

fn config(grid: [usize; 3]) -> Result<LaunchConfig> {
    let g = |v: usize| u32::try_from(v.max(1)).context("conv grid dimension overflows u32");
    Ok(LaunchConfig {
        grid: [g(grid[0])?, g(grid[1])?, g(grid[2])?],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    })
}

/// A pass about to launch: the device, the problem and how it runs.
struct Pass<'a> {
    gpu: &'a Gpu,
    pr: &'a Problem,
    plan: Plan,
}

/// The inputs of a forward or backward-data kernel.
struct Operands<'a> {
    src: &'a GpuBuffer<f32>,
    w: &'a GpuBuffer<f32>,
    bias: Option<&'a GpuBuffer<f32>>,
}

/// Depth ranges of a forward or backward-data GEMM of `blocks` tiles: one when the grid fills the
/// GPU, else enough to, each at least [`SPLIT_MIN_DEPTH`] deep, the partial sums of `len` floats
/// each within [`MAX_WORKSPACE`].
fn depth_splits(blocks: usize, depth: usize, len: usize) -> usize {
    if blocks >= SPLIT_TARGET_BLOCKS {
        return 1;
    }
    SPLIT_TARGET_BLOCKS.div_ceil(blocks).min(depth / SPLIT_MIN_DEPTH).min(MAX_WORKSPACE / len.max(1)).max(1)
}

/// `out` = the sum of the `splits` partial sums in `ws`, in order.
fn sum_splits(gpu: &Gpu, ws: &GpuBuffer<f32>, out: &mut GpuBuffer<f32>, splits: usize) -> Result<()> {
    let len = out.len();
    let args = [Arg::read(ws), Arg::write(out), Arg::val(splits as i32), Arg::val(len as i64)];
    gpu.launch(Kernel::CONV_SPLIT_SUM, items(len), &args)
}

/// Launches a forward or backward-data kernel on `grid` tiles (z: residue classes) of a GEMM at
/// most `depth` deep, split into partial sums when the grid alone would leave the GPU idle.
fn launch_gemm(
    pass: &Pass,
    kernel: Kernel,
    grid: [usize; 3],
    depth: usize,
    ops: Operands,
    out: &mut GpuBuffer<f32>,
) -> Result<()> {
    let gpu = pass.gpu;
    // The kernels index voxels with 32-bit ints.
    to_i32(pass.pr.n * pass.pr.input.iter().product::<usize>(), "conv input voxels")?;
    to_i32(pass.pr.out_voxels(), "conv output voxels")?;
    let blocks = grid.iter().product();
    let splits = pass.plan.splits.unwrap_or_else(|| depth_splits(blocks, depth, out.len()));
    let splits = splits.clamp(1, 65535 / grid[2].max(1));
    let mut ws = if splits > 1 { Some(gpu.alloc::<f32>(splits * out.len())?) } else { None };
    let cfg = config([grid[0], grid[1], grid[2] * splits])?;
    let mut args = vec![
        Arg::read(ops.src),
        Arg::read(ops.w),
        Arg::read(ops.bias.unwrap_or(ops.w)),
        Arg::write(ws.as_mut().unwrap_or(&mut *out)),
        Arg::val(ops.bias.is_some() as i32),
        Arg::val(splits as i32),
    ];
    args.extend(pass.pr.args()?);
    gpu.launch(kernel, cfg, &args)?;
    match &ws {
        Some(ws) => sum_splits(gpu, ws, out, splits),
        None => Ok(()),
    }
}

/// y (n, output, k) = the conv of `src` (n, input, c) with `w` (+ bias per k).
fn launch_forward(pass: &Pass, ops: Operands, y: &mut GpuBuffer<f32>) -> Result<()> {
    let pr = pass.pr;
    let tile = pass.plan.tile.unwrap_or_else(|| tile_for(pr.out_voxels(), pr.k, 1));
    let kernel = pick(&FORWARD, tile, pr, pass.plan.precision);
    let grid = [pr.out_voxels().div_ceil(tile), pr.k.div_ceil(tile), 1];
    launch_gemm(pass, kernel, grid, pr.kdim(), ops, y)
}

/// gx (n, input, c) of the conv from gy (n, output, k), one residue class of the input
/// coordinates modulo the stride per grid layer (+ bias per c).
fn launch_data(pass: &Pass, ops: Operands, gx: &mut GpuBuffer<f32>) -> Result<()> {
    let pr = pass.pr;
    let rows = pr.n * (0..3).map(|a| pr.input[a].div_ceil(pr.stride[a])).product::<usize>();
    let phases = pr.stride.iter().product();
    let tile = pass.plan.tile.unwrap_or_else(|| tile_for(rows, pr.c, phases));
    let kernel = pick(&DATA, tile, pr, pass.plan.precision);
    // The deepest residue class sees ceil(T / s) taps per axis.
    let depth = (0..3).map(|a| pr.kernel[a].div_ceil(pr.stride[a])).product::<usize>() * pr.k;
    launch_gemm(pass, kernel, [rows.div_ceil(tile), pr.c.div_ceil(tile), phases], depth, ops, gx)
}

/// Voxel ranges of the backward-weight: enough blocks to fill the GPU, each range at least
/// [`WGRAD_MIN_VOXELS`] long, the partial sums within [`MAX_WORKSPACE`].
fn weight_splits(voxels: usize, k: usize, kdim: usize, tile: usize) -> usize {
    let tiles = k.div_ceil(tile) * kdim.div_ceil(tile);
    WGRAD_TARGET_BLOCKS[(tile == LARGE) as usize]
        .div_ceil(tiles)
        .min(voxels / WGRAD_MIN_VOXELS)
        .min(MAX_WORKSPACE / (k * kdim))
        .min(voxels.div_ceil(DEPTH_STAGE))
        .clamp(1, 65535)
}

/// gw (k, kernel, c) = sum over output voxels of gy (n, output, k) times the gathered `src`
/// (n, input, c), shaped `w_dims`.
fn launch_weight(
    pass: &Pass,
    gy: &GpuBuffer<f32>,
    src: &GpuBuffer<f32>,
    w_dims: [usize; 5],
) -> Result<GpuTensor> {
    let (gpu, pr) = (pass.gpu, pass.pr);
    let (voxels, kdim) = (pr.out_voxels(), pr.kdim());
    to_i32(voxels, "conv backward-weight voxels")?;
    // The rows are the output channels, the columns the weight's (tap, channel) entries.
    let tile = pass.plan.tile.unwrap_or(if fills_large(pr.k) && fills_large(kdim) { LARGE } else { SMALL });
    let splits = pass.plan.splits.unwrap_or_else(|| weight_splits(voxels, pr.k, kdim, tile));
    let mut gw = GpuTensor::output(gpu, w_dims)?;
    let mut ws = if splits > 1 { Some(gpu.alloc::<f32>(splits * pr.k * kdim)?) } else { None };
    let cfg = config([kdim.div_ceil(tile), pr.k.div_ceil(tile), splits])?;
    let mut args = vec![Arg::read(gy), Arg::read(src), Arg::write(ws.as_mut().unwrap_or(gw.out()?))];
    args.extend(pr.args()?);
    gpu.launch(pick(&WEIGHT, tile, pr, pass.plan.precision), cfg, &args)?;
    if let Some(ws) = &ws {
        sum_splits(gpu, ws, gw.out()?, splits)?;
    }
    Ok(gw)
}

/// A fresh output of `dims` that `launch` of `pr` fills: every public conv but the
/// backward-weights.
fn launch_into(
    gpu: &Gpu,
    pr: Problem,
    p: ConvPrecision,
    launch: fn(&Pass, Operands, &mut GpuBuffer<f32>) -> Result<()>,
    ops: Operands,
    dims: [usize; 5],
) -> Result<GpuTensor> {
    let mut y = GpuTensor::output(gpu, dims)?;
    launch(&Pass { gpu, pr: &pr, plan: Plan::auto(p) }, ops, y.out()?)?;
    Ok(y)
}

/// The weight gradient of `pr` (`launch_weight` of its output-side and input-side buffers,
/// shaped `w_dims`) and, when `with_bias`, the bias gradient of the layer's output gradient `gy`.
fn weight_grads(
    pr: Problem,
    p: ConvPrecision,
    [rows, cols]: [&GpuBuffer<f32>; 2],
    w_dims: [usize; 5],
    gy: &GpuTensor,
    with_bias: bool,
) -> Result<(GpuTensor, Option<GpuTensor>)> {
    let gw = launch_weight(&Pass { gpu: &gy.gpu, pr: &pr, plan: Plan::auto(p) }, rows, cols, w_dims)?;
    Ok((gw, with_bias.then(|| bias_grad(gy)).transpose()?))
}

/// The per-channel sum of `gy` over every voxel (the bias gradient), deterministic.
pub fn bias_grad(gy: &GpuTensor) -> Result<GpuTensor> {
    let c = gy.shape.last();
    reduce::sum_over(gy, [1, 1, 1, 1, c])?.reshape([c])
}

fn dims5(op: &str, what: &str, t: &GpuTensor) -> Result<[usize; 5]> {
    let d: [usize; 5] = t
        .dims()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{op}: {what} must have 5 dimensions, got {}", t.shape))?;
    ensure!(d.iter().all(|&v| v > 0), "{op}: {what} {} is empty", t.shape);
    Ok(d)
}

fn check_bias(op: &str, bias: Option<&GpuTensor>, x: &GpuTensor, channels: usize) -> Result<()> {
    if let Some(b) = bias {
        same_device(op, x, b)?;
        ensure!(b.dims() == [channels], "{op}: bias {} must be [{channels}]", b.shape);
    }
    Ok(())
}

/// The conv of x (N, D, H, W, C) with weight w (K, T, R, S, C) and `stride`, its dims checked.
fn conv_dims(op: &str, x: &GpuTensor, w: &GpuTensor, stride: [usize; 3]) -> Result<ConvDims> {
    same_device(op, x, w)?;
    let (xd, wd) = (dims5(op, "input", x)?, dims5(op, "weight", w)?);
    ensure!(
        wd[4] == xd[4],
        "{op}: weight {} expects {} input channels, input {} has {}",
        w.shape,
        wd[4],
        x.shape,
        xd[4]
    );
    let d = ConvDims {
        n: xd[0],
        input: [xd[1], xd[2], xd[3]],
        cin: xd[4],
        cout: wd[0],
        kernel: [wd[1], wd[2], wd[3]],
        stride,
    };
    d.validate().with_context(|| format!("{op} of input {} with weight {}", x.shape, w.shape))?;
    Ok(d)
}

fn check_output(op: &str, gy: &GpuTensor, n: usize, spatial: [usize; 3], c: usize) -> Result<()> {
    let want = [n, spatial[0], spatial[1], spatial[2], c];
    ensure!(gy.dims() == want, "{op}: output gradient {} should be {want:?}", gy.shape);
    Ok(())
}

/// `y = conv3d(x, w) + bias` with "same" padding `(k - 1) / 2` per axis: x (N, D, H, W, C),
/// w (K, T, R, S, C), bias (K) give (N, D', H', W', K), `D' = floor((D + 2p - T) / stride) + 1`.
pub fn conv3d_forward(
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
    stride: [usize; 3],
    p: ConvPrecision,
) -> Result<GpuTensor> {
    let op = "conv3d forward";
    let d = conv_dims(op, x, w, stride)?;
    check_bias(op, bias, x, d.cout)?;
    let [od, oh, ow] = d.output();
    let ops = Operands { src: x.buf(), w: w.buf(), bias: bias.map(|b| b.buf()) };
    launch_into(&x.gpu, Problem::conv(&d), p, launch_forward, ops, [d.n, od, oh, ow, d.cout])
}

/// The input gradient of [`conv3d_forward`] for an input of spatial size `input`.
pub fn conv3d_backward_data(
    gy: &GpuTensor,
    w: &GpuTensor,
    input: [usize; 3],
    stride: [usize; 3],
    p: ConvPrecision,
) -> Result<GpuTensor> {
    let op = "conv3d backward-data";
    same_device(op, gy, w)?;
    let (gd, wd) = (dims5(op, "output gradient", gy)?, dims5(op, "weight", w)?);
    let d = ConvDims { n: gd[0], input, cin: wd[4], cout: wd[0], kernel: [wd[1], wd[2], wd[3]], stride };
    d.validate().with_context(|| format!("{op} to input size {input:?} with weight {}", w.shape))?;
    check_output(op, gy, d.n, d.output(), d.cout)?;
    let ops = Operands { src: gy.buf(), w: w.buf(), bias: None };
    launch_into(&gy.gpu, Problem::conv(&d), p, launch_data, ops, [d.n, input[0], input[1], input[2], d.cin])
}

/// The weight gradient (K, T, R, S, C) of [`conv3d_forward`] with kernel size `kernel`, and the
/// bias gradient (K) when `with_bias`.
pub fn conv3d_backward_weight(
    gy: &GpuTensor,
    x: &GpuTensor,
    kernel: [usize; 3],
    stride: [usize; 3],
    p: ConvPrecision,
    with_bias: bool,
) -> Result<(GpuTensor, Option<GpuTensor>)> {
    let op = "conv3d backward-weight";
    same_device(op, gy, x)?;
    let (xd, gd) = (dims5(op, "input", x)?, dims5(op, "output gradient", gy)?);
    let d = ConvDims { n: xd[0], input: [xd[1], xd[2], xd[3]], cin: xd[4], cout: gd[4], kernel, stride };
    d.validate().with_context(|| format!("{op} of input {} with kernel {kernel:?}", x.shape))?;
    check_output(op, gy, d.n, d.output(), d.cout)?;
    let w_dims = [d.cout, kernel[0], kernel[1], kernel[2], d.cin];
    weight_grads(Problem::conv(&d), p, [gy.buf(), x.buf()], w_dims, gy, with_bias)
}

/// The kernel of a transposed-conv weight (C_in, T, R, S, C_out), which must equal `stride`.
fn transposed_kernel(op: &str, w: &GpuTensor, stride: [usize; 3]) -> Result<[usize; 5]> {
    let wd = dims5(op, "weight", w)?;
    let kernel = [wd[1], wd[2], wd[3]];
    ensure!(
        kernel == stride,
        "{op}: only kernel = stride is supported, got weight {} and stride {stride:?}",
        w.shape
    );
    Ok(wd)
}

/// The transposed conv of x (N, D, H, W, C_in) with weight w (C_in, T, R, S, C_out), its dims checked.
fn transposed_dims(op: &str, x: &GpuTensor, w: &GpuTensor, stride: [usize; 3]) -> Result<TransposedDims> {
    same_device(op, x, w)?;
    let (xd, wd) = (dims5(op, "input", x)?, transposed_kernel(op, w, stride)?);
    ensure!(
        wd[0] == xd[4],
        "{op}: weight {} expects {} input channels, input {} has {}",
        w.shape,
        wd[0],
        x.shape,
        xd[4]
    );
    Ok(TransposedDims { n: xd[0], input: [xd[1], xd[2], xd[3]], cin: xd[4], cout: wd[4], kernel: stride })
}

/// `y = conv_transpose3d(x, w) + bias` with kernel = stride: x (N, D, H, W, C_in), w (C_in, T, R, S,
/// C_out), bias (C_out) give (N, D*T, H*R, W*S, C_out).
pub fn conv_transpose3d_forward(
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
    stride: [usize; 3],
    p: ConvPrecision,
) -> Result<GpuTensor> {
    let op = "conv_transpose3d forward";
    let d = transposed_dims(op, x, w, stride)?;
    check_bias(op, bias, x, d.cout)?;
    let [od, oh, ow] = d.output();
    let ops = Operands { src: x.buf(), w: w.buf(), bias: bias.map(|b| b.buf()) };
    launch_into(&x.gpu, Problem::blocked(&d), p, launch_data, ops, [d.n, od, oh, ow, d.cout])
}

/// The input grid of a transposed conv whose output gradient is `gy`.
fn transposed_input(op: &str, gy: &GpuTensor, stride: [usize; 3]) -> Result<[usize; 3]> {
    let gd = dims5(op, "output gradient", gy)?;
    ensure!(
        (0..3).all(|a| stride[a] > 0 && gd[a + 1].is_multiple_of(stride[a])),
        "{op}: output gradient {} is not a multiple of the stride {stride:?}",
        gy.shape
    );
    Ok(std::array::from_fn(|a| gd[a + 1] / stride[a]))
}

/// The input gradient of [`conv_transpose3d_forward`].
pub fn conv_transpose3d_backward_data(
    gy: &GpuTensor,
    w: &GpuTensor,
    stride: [usize; 3],
    p: ConvPrecision,
) -> Result<GpuTensor> {
    let op = "conv_transpose3d backward-data";
    same_device(op, gy, w)?;
    let input = transposed_input(op, gy, stride)?;
    let wd = transposed_kernel(op, w, stride)?;
    let d = TransposedDims { n: gy.dims()[0], input, cin: wd[0], cout: wd[4], kernel: stride };
    check_output(op, gy, d.n, d.output(), d.cout)?;
    let ops = Operands { src: gy.buf(), w: w.buf(), bias: None };
    let dims = [d.n, input[0], input[1], input[2], d.cin];
    launch_into(&gy.gpu, Problem::blocked(&d), p, launch_forward, ops, dims)
}

/// The weight gradient (C_in, T, R, S, C_out) of [`conv_transpose3d_forward`], and the bias
/// gradient (C_out) when `with_bias`.
pub fn conv_transpose3d_backward_weight(
    gy: &GpuTensor,
    x: &GpuTensor,
    stride: [usize; 3],
    p: ConvPrecision,
    with_bias: bool,
) -> Result<(GpuTensor, Option<GpuTensor>)> {
    let op = "conv_transpose3d backward-weight";
    same_device(op, gy, x)?;
    let (xd, gd) = (dims5(op, "input", x)?, dims5(op, "output gradient", gy)?);
    let d =
        TransposedDims { n: xd[0], input: [xd[1], xd[2], xd[3]], cin: xd[4], cout: gd[4], kernel: stride };
    ensure!(stride.iter().all(|&s| s > 0), "{op}: stride {stride:?} must be positive");
    check_output(op, gy, d.n, d.output(), d.cout)?;
    let w_dims = [d.cin, stride[0], stride[1], stride[2], d.cout];
    weight_grads(Problem::blocked(&d), p, [x.buf(), gy.buf()], w_dims, gy, with_bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::naive;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(gpu: &Gpu, n: usize, seed: u64) -> (GpuBuffer<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        (gpu.upload(&v).unwrap(), v)
    }

    fn assert_close(what: &str, gpu: &Gpu, got: &GpuBuffer<f32>, want: &[f32], tol: f64) {
        let got = gpu.download(got).unwrap();
        let diff: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        let e = (diff / norm).sqrt();
        assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    }

    /// The 128 x 128 tiles and depth splits, which the shape rules only pick at real sizes,
    /// forced on small odd shapes with partial row and column tiles.
    #[test]
    fn large_tiles_and_splits_match_the_naive_loops() {
        let gpu = Gpu::sim();
        let cd = |cin, cout, kernel, stride| ConvDims { n: 1, input: [5, 6, 7], cin, cout, kernel, stride };
        for (d, precision, tile, splits, tol) in [
            (cd(17, 130, [3, 3, 3], [1, 2, 2]), ConvPrecision::Fp32, LARGE, 1, 1e-5),
            (cd(3, 5, [3, 3, 3], [2, 1, 2]), ConvPrecision::Fp32, LARGE, 3, 1e-5),
            (cd(8, 16, [1, 1, 1], [1, 1, 1]), ConvPrecision::Tf32, LARGE, 2, 1e-3),
            (cd(8, 12, [3, 1, 3], [1, 1, 1]), ConvPrecision::Tf32, LARGE, 1, 1e-3),
            (cd(5, 9, [3, 3, 3], [2, 2, 2]), ConvPrecision::Fp32, SMALL, 4, 1e-5),
        ] {
            let pass = Pass {
                gpu: &gpu,
                pr: &Problem::conv(&d),
                plan: Plan { precision, tile: Some(tile), splits: Some(splits) },
            };
            let what = format!("{d:?} {precision:?} tile {tile}, {splits} splits");
            let ((x, xv), (w, wv), (b, bv), (gy, gyv)) = (
                random(&gpu, d.x_len(), 1),
                random(&gpu, d.w_len(), 2),
                random(&gpu, d.cout, 3),
                random(&gpu, d.y_len(), 4),
            );
            let mut want = vec![0.0; d.y_len()];
            naive::conv3d_forward(&mut want, &xv, &wv, Some(&bv), &d);
            let mut y = gpu.alloc(d.y_len()).unwrap();
            launch_forward(&pass, Operands { src: &x, w: &w, bias: Some(&b) }, &mut y).unwrap();
            assert_close(&format!("{what} forward"), &gpu, &y, &want, tol);
            let mut want = vec![0.0; d.x_len()];
            naive::conv3d_backward_data(&mut want, &gyv, &wv, &d);
            let mut gx = gpu.alloc(d.x_len()).unwrap();
            launch_data(&pass, Operands { src: &gy, w: &w, bias: None }, &mut gx).unwrap();
            assert_close(&format!("{what} backward-data"), &gpu, &gx, &want, tol);
            let mut want = vec![0.0; d.w_len()];
            naive::conv3d_backward_weight(&mut want, &gyv, &xv, &d);
            let w_dims = [d.cout, d.kernel[0], d.kernel[1], d.kernel[2], d.cin];
            let gw = launch_weight(&pass, &gy, &x, w_dims).unwrap();
            assert_close(&format!("{what} backward-weight"), &gpu, gw.buf(), &want, tol);
        }
    }

    #[test]
    fn tiles_and_splits_follow_the_shape() {
        // 2 x 32^3 voxels x 128 channels fill large tiles; 32 or 320 channels do not (waste).
        assert_eq!(tile_for(65536, 128, 1), LARGE);
        assert_eq!(tile_for(65536, 32, 1), SMALL);
        assert_eq!(tile_for(65536, 320, 1), SMALL);
        // 2 x 16^3 x 256: 128 large blocks are under two waves, 512 small ones are not.
        assert_eq!(tile_for(8192, 256, 1), SMALL);
        // The weight gradient of 2 x 128^3 x 32: few tiles, so many voxel ranges; never more
        // ranges than voxels allow, nor fewer than one.
        assert_eq!(weight_splits(1 << 22, 32, 864, SMALL), 38);
        assert_eq!(weight_splits(100, 32, 864, SMALL), 1);
        assert_eq!(weight_splits(128, 320, 8640, SMALL), 1);
        // The forward of 2 x 4^3 x 320 -> 320: 10 blocks, a depth of 8640, so 27 ranges (of 320).
        assert_eq!(depth_splits(10, 8640, 128 * 320), 27);
        assert_eq!(depth_splits(512, 8640, 1 << 20), 1);
        assert_eq!(depth_splits(10, 200, 1000), 1);
    }
}
