//! kernels/loss.cu: the fused losses of `device::cpu::loss` on a kernel device. Each forward is a
//! pass of per-block partial sums, then a finish kernel that adds them in a fixed order and leaves
//! the loss value and the constants of its gradient on the device (no host round trip between the
//! forward and the backward); each backward is one pass.

use anyhow::{Result, bail, ensure};

use super::norm::tile_grid;
use super::{GpuTensor, items, same_device, same_shape};
use crate::device::launch::{
    Arg, DeviceScalar, Gpu, GpuBuffer, Kernel, LaunchConfig, MAX_DYNAMIC_SHARED, to_i32,
};
use crate::device::op::{BceDice, LabelSmoothing, Pointwise, Slices, SoftmaxLoss};
use crate::device::shape::Shape;

/// Threads per block of the voxel-parallel loss kernels (`kLossThreads`).
const THREADS: usize = 256;
/// Blocks of partial sums per pass (over all samples): enough to fill a large GPU, few enough that
/// the finish kernel adds them quickly.
const PARTIAL_BLOCKS: usize = 1024;

/// A loss value on the device: `scale * out[0]`; for the softmax losses out[1] counts label values
/// that are not class indices, which makes reading the value an error.
pub struct GpuLoss {
    gpu: Gpu,
    out: GpuBuffer<f64>,
    scale: f64,
    classes: Option<usize>,
}

impl GpuLoss {
    /// Copies the value to the host (waiting for the kernels).
    pub fn value(&self) -> Result<f64> {
        let out = self.gpu.download(&self.out)?;
        if let Some(c) = self.classes
            && out[1] > 0.0
        {
            bail!("softmax loss: {} label values are not class indices in 0..{c}", out[1]);
        }
        Ok(self.scale * out[0])
    }

    /// The value as a one-element float32 tensor on the device (nothing is copied): what a loss
    /// op records on the tape. An invalid label count makes it NaN.
    pub fn to_tensor(&self) -> Result<GpuTensor> {
        let mut y = GpuTensor::output(&self.gpu, Shape::new(&[]))?;
        self.gpu.launch(
            Kernel::LOSS_VALUE,
            LaunchConfig::linear(1, 32),
            &[
                Arg::read(&self.out),
                Arg::write(y.out()?),
                Arg::val(self.scale),
                Arg::val(i32::from(self.classes.is_some())),
            ],
        )?;
        Ok(y)
    }
}

/// Fails unless `gy` is one element on `x`'s device: the upstream gradient a loss backward reads.
fn upstream(op: &str, x: &GpuTensor, gy: &GpuTensor) -> Result<()> {
    same_device(op, x, gy)?;
    ensure!(gy.numel() == 1, "{op}: upstream gradient {} is not one element", gy.shape);
    Ok(())
}

/// What [`softmax_loss_backward`] needs: d loss / d I and d loss / d P per (sample, class).
pub struct GpuSoftmaxGrad {
    coef: GpuBuffer<f32>,
    n: usize,
    c: usize,
    ce_scale: f32,
}

/// The kernels for `c` classes: per-thread accumulators are sized at compile time.
fn softmax_kernels(c: usize) -> Result<(Kernel, Kernel)> {
    Ok(match c {
        1..=4 => (Kernel::LOSS_SOFTMAX_PARTIALS_C4, Kernel::LOSS_SOFTMAX_BWD_C4),
        5..=8 => (Kernel::LOSS_SOFTMAX_PARTIALS_C8, Kernel::LOSS_SOFTMAX_BWD_C8),
        9..=16 => (Kernel::LOSS_SOFTMAX_PARTIALS_C16, Kernel::LOSS_SOFTMAX_BWD_C16),
        _ => bail!("softmax loss: {c} classes; the kernels support 1 to 16"),
    })
}

/// (samples, voxels per sample, classes) of channels-last logits and their (N, ..., 1) label map.
fn softmax_layout(op: &str, logits: &GpuTensor, labels: &GpuTensor) -> Result<(usize, usize, usize)> {
    same_device(op, logits, labels)?;
    let (n, c) = (logits.dims().first().copied().unwrap_or(0), logits.shape.last());
    ensure!(
        n > 0 && c > 0 && labels.numel() * c == logits.numel() && labels.dims().first() == Some(&n),
        "{op}: logits {} and label map {} do not match (N, ..., C) against (N, ..., 1)",
        logits.shape,
        labels.shape
    );
    Ok((n, labels.numel() / n, c))
}

/// Softmax, cross-entropy and the soft Dice partial sums in one pass over the logits, then the loss
/// `cfg.ce_scale * sum(CE) - cfg.dice_weight * mean(dc)` and its gradient constants.
pub fn softmax_loss_forward(
    logits: &GpuTensor,
    labels: &GpuTensor,
    cfg: &SoftmaxLoss,
) -> Result<(GpuLoss, GpuSoftmaxGrad)> {
    let op = "softmax loss";
    let (n, voxels, c) = softmax_layout(op, logits, labels)?;
    let (partials, _) = softmax_kernels(c)?;
    ensure!(n <= 65535, "{op}: {n} samples exceed the grid limit 65535");
    let width = 2 + 3 * c;
    let shared = 8 * n * width;
    ensure!(
        shared <= MAX_DYNAMIC_SHARED as usize,
        "{op}: {n} samples x {c} classes exceed one block's shared memory"
    );
    let gpu = &logits.gpu;
    let blocks = voxels.div_ceil(THREADS).clamp(1, (PARTIAL_BLOCKS / n).max(1));
    let mut partial = gpu.alloc::<f64>(n * blocks * width)?;
    let cfg_p =
        LaunchConfig { grid: [blocks as u32, n as u32, 1], block: [THREADS as u32, 1, 1], shared_bytes: 0 };
    let ci = to_i32(c, op)?;
    gpu.launch(
        partials,
        cfg_p,
        &[
            Arg::read(logits.buf()),
            Arg::read(labels.buf()),
            Arg::write(&mut partial),
            Arg::val(voxels as i64),
            Arg::val(ci),
        ],
    )?;
    let mut coef = gpu.alloc::<f32>(2 * n * c)?;
    let mut out = gpu.alloc::<f64>(2)?;
    gpu.launch(
        Kernel::LOSS_SOFTMAX_FINISH,
        LaunchConfig::linear(1, THREADS as u32).with_shared(shared as u32),
        &[
            Arg::read(&partial),
            Arg::write(&mut coef),
            Arg::write(&mut out),
            Arg::val(n as i32),
            Arg::val(ci),
            Arg::val(blocks as i32),
            Arg::val(cfg.ce_scale),
            Arg::val(cfg.dice_weight),
            Arg::val(i32::from(cfg.batch_dice)),
            Arg::val(i32::from(cfg.do_bg)),
            Arg::val(cfg.smooth),
        ],
    )?;
    let loss = GpuLoss { gpu: gpu.clone(), out, scale: 1.0, classes: Some(c) };
    Ok((loss, GpuSoftmaxGrad { coef, n, c, ce_scale: cfg.ce_scale as f32 }))
}

/// `gy * d loss / d logits` of [`softmax_loss_forward`], in one pass.
pub fn softmax_loss_backward(
    logits: &GpuTensor,
    labels: &GpuTensor,
    grad: &GpuSoftmaxGrad,
    gy: &GpuTensor,
) -> Result<GpuTensor> {
    let op = "softmax loss backward";
    let (n, voxels, c) = softmax_layout(op, logits, labels)?;
    upstream(op, logits, gy)?;
    ensure!(
        (n, c) == (grad.n, grad.c),
        "{op}: logits {} do not match the forward's {} samples x {} classes",
        logits.shape,
        grad.n,
        grad.c
    );
    let (_, bwd) = softmax_kernels(c)?;
    let mut gx = GpuTensor::output(&logits.gpu, logits.shape.clone())?;
    let args = [
        Arg::read(logits.buf()),
        Arg::read(labels.buf()),
        Arg::read(&grad.coef),
        Arg::write(gx.out()?),
        Arg::val(n as i32),
        Arg::val(voxels as i64),
        Arg::val(to_i32(c, op)?),
        Arg::val(grad.ce_scale),
        Arg::read(gy.buf()),
    ];
    logits.gpu.launch(bwd, items(n * voxels), &args)?;
    Ok(gx)
}

/// The kernel's kind code, SmoothL1's beta, and the smoothing factor of each slice.
fn pointwise_args(kind: Pointwise, slices: Slices) -> (i32, f32, Vec<f32>) {
    let depth = slices.depth.max(1);
    let (code, beta, smoothing) = match kind {
        Pointwise::Mse => (0, 0.0, LabelSmoothing::None),
        Pointwise::L1 => (1, 0.0, LabelSmoothing::None),
        Pointwise::SmoothL1 { beta } => (2, beta as f32, LabelSmoothing::None),
        Pointwise::BceWithLogits(s) => (3, 0.0, s),
        Pointwise::Bce => (4, 0.0, LabelSmoothing::None),
    };
    (code, beta, smoothing.per_slice(depth).into_iter().map(|s| s as f32).collect())
}

/// The per-slice smoothing factors on the device: filled there when they are all one value (every
/// kind but z-slice smoothing), so only that one costs an upload.
fn smoothing_table(gpu: &Gpu, table: &[f32]) -> Result<GpuTensor> {
    match table {
        [first, rest @ ..] if rest.iter().all(|v| v == first) => GpuTensor::full(gpu, [table.len()], *first),
        _ => GpuTensor::from_host(gpu, [table.len()], table),
    }
}

/// Launches pointwise kernel `kernel` of `kind` over `x` against `t` into `out`: the forward's
/// partial sums, or the backward's gradient, which takes the forward's `scale` and the upstream
/// gradient as its last arguments.
fn pointwise_launch<T: DeviceScalar>(
    op: &str,
    (kernel, cfg): (Kernel, LaunchConfig),
    (kind, slices): (Pointwise, Slices),
    x: &GpuTensor,
    t: &GpuTensor,
    out: &mut GpuBuffer<T>,
    scale: Option<(f32, &GpuTensor)>,
) -> Result<()> {
    same_shape(op, x, t)?;
    ensure!(
        slices.depth.max(1) * slices.len.max(1) <= x.numel().max(1) && slices.len > 0,
        "{op}: slices {slices:?} do not fit a tensor of shape {}",
        x.shape
    );
    let (code, beta, table) = pointwise_args(kind, slices);
    let smooth = smoothing_table(&x.gpu, &table)?;
    let mut args = vec![
        Arg::val(code),
        Arg::read(x.buf()),
        Arg::read(t.buf()),
        Arg::read(smooth.buf()),
        Arg::val(slices.len as i64),
        Arg::val(to_i32(table.len(), op)?),
        Arg::write(out),
        Arg::val(x.numel() as i64),
        Arg::val(beta),
    ];
    if let Some((scale, gy)) = scale {
        upstream(op, x, gy)?;
        args.extend([Arg::val(scale), Arg::read(gy.buf())]);
    }
    x.gpu.launch(kernel, cfg, &args)
}

/// `scale` times the sum of the loss terms of `kind` (scale 1/numel for a mean).
pub fn pointwise_forward(
    kind: Pointwise,
    x: &GpuTensor,
    t: &GpuTensor,
    slices: Slices,
    scale: f64,
) -> Result<GpuLoss> {
    let gpu = &x.gpu;
    let blocks = x.numel().div_ceil(THREADS).clamp(1, PARTIAL_BLOCKS);
    let mut partial = gpu.alloc::<f64>(blocks)?;
    let cfg = LaunchConfig::linear(blocks as u32, THREADS as u32);
    let kernel = (Kernel::LOSS_POINTWISE_PARTIALS, cfg);
    pointwise_launch("pointwise loss", kernel, (kind, slices), x, t, &mut partial, None)?;
    let mut out = gpu.alloc::<f64>(1)?;
    gpu.launch(
        Kernel::REDUCE_PARTIALS_F64,
        LaunchConfig::linear(1, THREADS as u32),
        &[Arg::read(&partial), Arg::write(&mut out), Arg::val(blocks as i64)],
    )?;
    Ok(GpuLoss { gpu: gpu.clone(), out, scale, classes: None })
}

/// `gy * scale * d(sum of terms) / dx`, with the forward's `scale` and the upstream gradient `gy`.
pub fn pointwise_backward(
    kind: Pointwise,
    x: &GpuTensor,
    t: &GpuTensor,
    slices: Slices,
    scale: f32,
    gy: &GpuTensor,
) -> Result<GpuTensor> {
    let mut gx = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let kernel = (Kernel::LOSS_POINTWISE_BWD, items(x.numel()));
    let up = Some((scale, gy));
    pointwise_launch("pointwise loss backward", kernel, (kind, slices), x, t, gx.out()?, up)?;
    Ok(gx)
}

/// (channels, voxels) of channels-last `x`, whose targets `t` must have its shape.
fn channels_and_voxels(op: &str, x: &GpuTensor, t: &GpuTensor) -> Result<(usize, usize)> {
    same_shape(op, x, t)?;
    let c = x.shape.last();
    Ok((c, x.numel().checked_div(c).unwrap_or(0)))
}

/// What [`bce_dice_backward`] needs: `dL/dp = coef_t[c] t + coef_p[c] p` per channel.
pub struct GpuBceDiceGrad {
    coef: GpuBuffer<f32>,
    c: usize,
    bce_scale: f32,
    smoothing: f32,
}

/// The seed's BCEDiceLoss over channels-last logits `x` and targets `t`.
pub fn bce_dice_forward(x: &GpuTensor, t: &GpuTensor, cfg: &BceDice) -> Result<(GpuLoss, GpuBceDiceGrad)> {
    let op = "BCEDiceLoss";
    let (c, voxels) = channels_and_voxels(op, x, t)?;
    let grid = tile_grid(op, c, 1, voxels)?;
    let gpu = &x.gpu;
    let ci = to_i32(c, op)?;
    let smoothing = cfg.smoothing as f32;
    let mut partial = gpu.alloc::<f64>(grid.chunks * 4 * c)?;
    gpu.launch(
        Kernel::LOSS_BCE_DICE_PARTIALS,
        grid.cfg,
        &[
            Arg::read(x.buf()),
            Arg::read(t.buf()),
            Arg::write(&mut partial),
            Arg::val(voxels as i64),
            Arg::val(ci),
            Arg::val(grid.rows_per_chunk),
            Arg::val(smoothing),
        ],
    )?;
    let shared = 8 * 4 * c;
    ensure!(shared <= MAX_DYNAMIC_SHARED as usize, "{op}: {c} channels exceed one block's shared memory");
    let bce_scale = cfg.alpha / x.numel() as f64;
    let mut coef = gpu.alloc::<f32>(2 * c)?;
    let mut out = gpu.alloc::<f64>(1)?;
    gpu.launch(
        Kernel::LOSS_BCE_DICE_FINISH,
        LaunchConfig::linear(1, THREADS as u32).with_shared(shared as u32),
        &[
            Arg::read(&partial),
            Arg::write(&mut coef),
            Arg::write(&mut out),
            Arg::val(ci),
            Arg::val(grid.chunks as i32),
            Arg::val(cfg.beta),
            Arg::val(bce_scale),
        ],
    )?;
    let loss = GpuLoss { gpu: gpu.clone(), out, scale: 1.0, classes: None };
    Ok((loss, GpuBceDiceGrad { coef, c, bce_scale: bce_scale as f32, smoothing }))
}

/// `gy * d loss / d x` of [`bce_dice_forward`].
pub fn bce_dice_backward(
    x: &GpuTensor,
    t: &GpuTensor,
    grad: &GpuBceDiceGrad,
    gy: &GpuTensor,
) -> Result<GpuTensor> {
    let op = "BCEDiceLoss backward";
    let (c, voxels) = channels_and_voxels(op, x, t)?;
    upstream(op, x, gy)?;
    ensure!(c == grad.c, "{op}: input {} does not have the forward's {} channels", x.shape, grad.c);
    let grid = tile_grid(op, c, 1, voxels)?;
    let mut gx = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let args = [
        Arg::read(x.buf()),
        Arg::read(t.buf()),
        Arg::read(&grad.coef),
        Arg::write(gx.out()?),
        Arg::val(voxels as i64),
        Arg::val(to_i32(c, op)?),
        Arg::val(grid.rows_per_chunk),
        Arg::val(grad.bce_scale),
        Arg::val(grad.smoothing),
        Arg::read(gy.buf()),
    ];
    x.gpu.launch(Kernel::LOSS_BCE_DICE_BWD, grid.cfg, &args)?;
    Ok(gx)
}

/// What [`masked_cosine_backward`] needs: `1 / (mask count + 1e-8)`, on the device.
pub struct GpuCosineGrad {
    scale: GpuBuffer<f64>,
}

/// The seed's MaskedCosineLoss over channels-last `p` and `t`.
pub fn masked_cosine_forward(p: &GpuTensor, t: &GpuTensor) -> Result<(GpuLoss, GpuCosineGrad)> {
    let op = "MaskedCosineLoss";
    let (c, voxels) = channels_and_voxels(op, p, t)?;
    let gpu = &p.gpu;
    let blocks = voxels.div_ceil(THREADS).clamp(1, PARTIAL_BLOCKS);
    let mut partial = gpu.alloc::<f64>(2 * blocks)?;
    gpu.launch(
        Kernel::LOSS_COSINE_PARTIALS,
        LaunchConfig::linear(blocks as u32, THREADS as u32),
        &[
            Arg::read(p.buf()),
            Arg::read(t.buf()),
            Arg::write(&mut partial),
            Arg::val(voxels as i64),
            Arg::val(to_i32(c, op)?),
        ],
    )?;
    let (mut out, mut scale) = (gpu.alloc::<f64>(1)?, gpu.alloc::<f64>(1)?);
    gpu.launch(
        Kernel::LOSS_COSINE_FINISH,
        LaunchConfig::linear(1, 64),
        &[Arg::read(&partial), Arg::write(&mut out), Arg::write(&mut scale), Arg::val(blocks as i32)],
    )?;
    Ok((GpuLoss { gpu: gpu.clone(), out, scale: 1.0, classes: None }, GpuCosineGrad { scale }))
}

/// `gy * d loss / d p` of [`masked_cosine_forward`].
pub fn masked_cosine_backward(
    p: &GpuTensor,
    t: &GpuTensor,
    grad: &GpuCosineGrad,
    gy: &GpuTensor,
) -> Result<GpuTensor> {
    let op = "MaskedCosineLoss backward";
    let (c, voxels) = channels_and_voxels(op, p, t)?;
    upstream(op, p, gy)?;
    let mut gx = GpuTensor::output(&p.gpu, p.shape.clone())?;
    let args = [
        Arg::read(p.buf()),
        Arg::read(t.buf()),
        Arg::read(&grad.scale),
        Arg::write(gx.out()?),
        Arg::val(voxels as i64),
        Arg::val(to_i32(c, op)?),
        Arg::read(gy.buf()),
    ];
    p.gpu.launch(Kernel::LOSS_COSINE_BWD, items(voxels), &args)?;
    Ok(gx)
}
