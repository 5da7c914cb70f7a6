//! kernels/blend.cu: sliding-window inference on the device — one window's Gaussian-weighted
//! logits added into the box being predicted, the division by the weights, and the flips of
//! mirroring test-time augmentation.

use anyhow::{Result, ensure};

use super::{GpuTensor, items, same_device};
use crate::device::launch::{Arg, Kernel, to_i32};

/// The part of one window inside a box (z, y, x): where it starts in the box and in the window,
/// and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowPart {
    pub in_box: [usize; 3],
    pub in_window: [usize; 3],
    pub size: [usize; 3],
}

/// The box (D, H, W) and channels of an accumulator of shape (D, H, W, C).
fn box_of(op: &str, acc: &GpuTensor) -> Result<([usize; 3], usize)> {
    let d = acc.dims();
    ensure!(d.len() == 4, "{op}: the box accumulator must be (D, H, W, C), got {}", acc.shape);
    Ok(([d[0], d[1], d[2]], d[3]))
}

fn check_part(op: &str, part: &WindowPart, bx: [usize; 3], patch: [usize; 3]) -> Result<()> {
    ensure!(
        (0..3)
            .all(|a| part.in_box[a] + part.size[a] <= bx[a] && part.in_window[a] + part.size[a] <= patch[a]),
        "{op}: {part:?} does not fit the box {bx:?} and the window {patch:?}"
    );
    Ok(())
}

/// One launch of blend_add: `logits` None adds the Gaussian itself (the weight map).
fn add(
    op: &str,
    acc: &mut GpuTensor,
    logits: Option<(&GpuTensor, usize)>,
    gauss: &GpuTensor,
    part: WindowPart,
) -> Result<()> {
    let (bx, c) = box_of(op, acc)?;
    ensure!(gauss.dims().len() == 3, "{op}: the Gaussian must be (D, H, W), got {}", gauss.shape);
    same_device(op, acc, gauss)?;
    let patch = [gauss.dims()[0], gauss.dims()[1], gauss.dims()[2]];
    check_part(op, &part, bx, patch)?;
    let (src, offset) = match logits {
        Some((l, sample)) => {
            same_device(op, acc, l)?;
            let d = l.dims();
            ensure!(
                d.len() == 5 && d[1..4] == patch && d[4] == c && sample < d[0],
                "{op}: logits {} do not hold sample {sample} of a window {patch:?} with {c} channels",
                l.shape
            );
            (l, sample * patch.iter().product::<usize>() * c)
        }
        None => {
            ensure!(c == 1, "{op}: the weight map has one channel, got {c}");
            (gauss, 0)
        }
    };
    let n = part.size.iter().product::<usize>() * c;
    if n == 0 {
        return Ok(());
    }
    let i = |v: usize, what: &str| to_i32(v, what).map(Arg::val);
    let gpu = acc.gpu.clone();
    let mut args = vec![
        Arg::write(acc.out()?),
        Arg::read(src.buf()),
        Arg::val(offset as i64),
        Arg::read(gauss.buf()),
        Arg::val(i32::from(logits.is_none())),
        i(c, "channels")?,
        i(bx[1], "box height")?,
        i(bx[2], "box width")?,
        i(patch[1], "window height")?,
        i(patch[2], "window width")?,
    ];
    for v in [part.in_box, part.in_window, part.size] {
        for a in v {
            args.push(i(a, "window part")?);
        }
    }
    gpu.launch(Kernel::BLEND_ADD, items(n), &args)
}

/// `acc[box voxel] += gauss[window voxel] * logits[sample, window voxel]` over `part`: one window's
/// weighted logits into the box accumulator (D, H, W, C); `gauss` is the window's (D, H, W)
/// importance map, `logits` the batch (N, D, H, W, C).
pub fn add_window(
    acc: &mut GpuTensor,
    logits: &GpuTensor,
    sample: usize,
    gauss: &GpuTensor,
    part: WindowPart,
) -> Result<()> {
    add("blend window", acc, Some((logits, sample)), gauss, part)
}

/// `weights[box voxel] += gauss[window voxel]` over `part`; `weights` is (D, H, W, 1).
pub fn add_weight(weights: &mut GpuTensor, gauss: &GpuTensor, part: WindowPart) -> Result<()> {
    add("blend weight", weights, None, gauss, part)
}

/// `acc /= weights` voxel by voxel: the blended logits.
pub fn divide(acc: &mut GpuTensor, weights: &GpuTensor) -> Result<()> {
    let op = "blend divide";
    let (bx, c) = box_of(op, acc)?;
    same_device(op, acc, weights)?;
    ensure!(weights.dims() == [bx[0], bx[1], bx[2], 1], "{op}: weights {} for a box {bx:?}", weights.shape);
    let n = acc.numel();
    let gpu = acc.gpu.clone();
    let args = [
        Arg::write(acc.out()?),
        Arg::read(weights.buf()),
        Arg::val(to_i32(c, "channels")?),
        Arg::val(n as i64),
    ];
    gpu.launch(Kernel::BLEND_DIVIDE, items(n), &args)
}

/// A channels-last (N, D, H, W, C) tensor reversed along the chosen spatial axes (z, y, x), with
/// channel k negated where bit k of `negate` is set.
pub fn flip(x: &GpuTensor, axes: [bool; 3], negate: u32) -> Result<GpuTensor> {
    let [_, d, h, w, c] = x.shape.ndhwc().map_err(|e| anyhow::anyhow!("flip: {e}"))?;
    let mut y = GpuTensor::output(&x.gpu, x.shape.clone())?;
    let n = x.numel();
    let mut args = vec![Arg::read(x.buf()), Arg::write(y.out()?)];
    for (v, what) in [(d, "depth"), (h, "height"), (w, "width"), (c, "channels")] {
        args.push(Arg::val(to_i32(v, what)?));
    }
    args.extend(axes.map(|f| Arg::val(i32::from(f))));
    args.push(Arg::val(negate));
    args.push(Arg::val(n as i64));
    x.gpu.launch(Kernel::BLEND_FLIP, items(n), &args)?;
    Ok(y)
}
