//! Each loss as one fused op on the [`Graph`]: the forward kernel pass gives the scalar, the recorded
//! backward runs one kernel pass for d loss / d input. Targets are constants and get no gradient.

use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::loss as k;
use crate::device::kernels::{GpuTensor, elementwise as kge, loss as kg};
use crate::device::op::{BceDice, LabelSmoothing, Pointwise, Slices, SoftmaxLoss};
use crate::ops::{elementwise::scaled, same_device};
use crate::tensor::{Shape, Tensor};
use anyhow::{Result, ensure};

/// How per-element terms are reduced to the scalar loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    #[default]
    Mean,
    Sum,
}

impl Reduction {
    fn scale(self, count: usize) -> f64 {
        match self {
            Reduction::Mean => 1.0 / count as f64,
            Reduction::Sum => 1.0,
        }
    }
}

/// nnU-Net's DC_and_CE_loss with MemoryEfficientSoftDiceLoss: `weight_ce * CE + weight_dice * (-Dice)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiceCe {
    /// Sum the Dice statistics over the batch (nnU-Net takes this from the plans).
    pub batch_dice: bool,
    /// Include the background class in the Dice mean (nnU-Net: false).
    pub do_bg: bool,
    pub smooth: f64,
    pub weight_ce: f64,
    pub weight_dice: f64,
}

impl Default for DiceCe {
    /// nnU-Net's values; batch Dice off as planned for 3d_fullres without a 3d_lowres stage.
    fn default() -> Self {
        DiceCe { batch_dice: false, do_bg: false, smooth: 1e-5, weight_ce: 1.0, weight_dice: 1.0 }
    }
}

/// The tensor of a loss op's input, checked to be non-empty and on the target's device.
fn operands(g: &Graph, op: &str, input: Var, target: &Tensor) -> Result<Tensor> {
    let x = g.value(input).clone();
    same_device(op, &[&x, target])?;
    ensure!(x.numel() > 0, "{op}: input of shape {} is empty", x.shape());
    Ok(x)
}

/// Records a loss computed on a kernel device: its value stays there as a one-element tensor, and
/// the backward reads the upstream gradient there too.
fn record_gpu(
    g: &mut Graph,
    op: &'static str,
    input: Var,
    value: &kg::GpuLoss,
    backward: impl FnOnce(&GpuTensor) -> Result<GpuTensor> + 'static,
) -> Result<Var> {
    let y = Tensor::from_gpu(value.to_tensor()?);
    Ok(g.record(op, y, &[input], move |gy| Ok(vec![Some(Tensor::from_gpu(backward(gy.gpu(op)?)?))])))
}

fn same_shape(op: &str, x: &Tensor, target: &Tensor) -> Result<()> {
    ensure!(
        x.dims() == target.dims(),
        "{op}: input has shape {} but target has shape {}; they must match",
        x.shape(),
        target.shape()
    );
    Ok(())
}

/// Checks a label map against channels-last logits (N, D, H, W, C): it must be (N, D, H, W, 1) or
/// (N, D, H, W) and hold class indices in 0..C. Returns (N, C).
fn label_dims(op: &str, logits: &Tensor, label: &Tensor) -> Result<(usize, usize)> {
    let [n, d, h, w, c] = logits.shape().ndhwc().map_err(|e| anyhow::anyhow!("{op} logits: {e}"))?;
    ensure!(
        label.dims() == [n, d, h, w, 1] || label.dims() == [n, d, h, w],
        "{op}: label map has shape {} but logits have shape {}; expected [{n}, {d}, {h}, {w}, 1] or \
         [{n}, {d}, {h}, {w}]",
        label.shape(),
        logits.shape()
    );
    // A label map on a kernel device is checked by the loss kernel itself, which makes the loss
    // NaN for a value outside 0..C (reading the labels back here would cost a download).
    if label.device() == Device::Cpu
        && let Some((i, v)) =
            label.data().iter().enumerate().find(|(_, v)| !(v.fract() == 0.0 && **v >= 0.0 && **v < c as f32))
    {
        anyhow::bail!("{op}: label value {v} at index {i} is not a class index in 0..{c}");
    }
    Ok((n, c))
}

/// Records a scalar loss whose gradient w.r.t. `input` is `backward(upstream)`.
fn record(
    g: &mut Graph,
    op: &'static str,
    input: Var,
    value: f64,
    backward: impl FnOnce(f32) -> Result<Tensor> + 'static,
) -> Var {
    g.record(op, Tensor::scalar(value as f32), &[input], move |gy| Ok(vec![Some(backward(gy.item()?)?)]))
}

/// A kernel's gradient written into a fresh tensor shaped like `like`.
fn grad_like(like: &Tensor, fill: impl FnOnce(&mut [f32])) -> Result<Tensor> {
    let mut gx = vec![0.0; like.numel()];
    fill(&mut gx);
    Tensor::from_vec(like.shape().clone(), gx)
}

fn softmax_op(g: &mut Graph, op: &'static str, logits: Var, label: &Tensor, cfg: SoftmaxLoss) -> Result<Var> {
    let x = operands(g, op, logits, label)?;
    let (n, c) = label_dims(op, &x, label)?;
    if x.device() != Device::Cpu {
        let (value, grad) = kg::softmax_loss_forward(x.gpu(op)?, label.gpu(op)?, &cfg)?;
        let label = label.clone();
        return record_gpu(g, op, logits, &value, move |gy| {
            kg::softmax_loss_backward(x.gpu(op)?, label.gpu(op)?, &grad, gy)
        });
    }
    let (value, grad) = k::softmax_loss_forward(x.data(), label.data(), n, c, &cfg);
    let label = label.clone();
    Ok(record(g, op, logits, value, move |gy| {
        grad_like(&x, |gx| k::softmax_loss_backward(x.data(), label.data(), &grad, gy, gx))
    }))
}

/// nnU-Net's Dice + CE on channels-last logits (N, D, H, W, C) against a label map.
pub fn dice_ce(g: &mut Graph, logits: Var, label: &Tensor, cfg: &DiceCe) -> Result<Var> {
    let op = "DC_and_CE_loss";
    let c = g.shape(logits).last();
    ensure!(
        cfg.do_bg || c >= 2,
        "{op} without background needs at least 2 classes, logits have shape {}",
        g.shape(logits)
    );
    let kcfg = SoftmaxLoss {
        ce_scale: cfg.weight_ce / label.numel() as f64,
        dice_weight: cfg.weight_dice,
        batch_dice: cfg.batch_dice,
        do_bg: cfg.do_bg,
        smooth: cfg.smooth,
    };
    softmax_op(g, op, logits, label, kcfg)
}

/// PyTorch's CrossEntropyLoss with class-index targets (a label map), channels-last logits.
pub fn cross_entropy(g: &mut Graph, logits: Var, label: &Tensor, reduction: Reduction) -> Result<Var> {
    let kcfg = SoftmaxLoss {
        ce_scale: reduction.scale(label.numel()),
        dice_weight: 0.0,
        batch_dice: false,
        do_bg: true,
        smooth: 0.0,
    };
    softmax_op(g, "CrossEntropyLoss", logits, label, kcfg)
}

/// A loss with one term per element (MSE, L1, SmoothL1, BCE, BCE with logits and smoothing);
/// prediction and target have one shape. Z-slice smoothing needs (N, D, H, W, C).
pub fn pointwise(
    g: &mut Graph,
    pred: Var,
    target: &Tensor,
    kind: Pointwise,
    reduction: Reduction,
) -> Result<Var> {
    let op = match kind {
        Pointwise::Mse => "MSELoss",
        Pointwise::L1 => "L1Loss",
        Pointwise::SmoothL1 { .. } => "SmoothL1Loss",
        Pointwise::BceWithLogits(_) => "BCEWithLogitsLoss",
        Pointwise::Bce => "BCELoss",
    };
    let x = operands(g, op, pred, target)?;
    same_shape(op, &x, target)?;
    let slices = if let Pointwise::BceWithLogits(LabelSmoothing::ZSlices { .. }) = kind {
        let [_, d, h, w, c] = x.shape().ndhwc().map_err(|e| anyhow::anyhow!("{op} with z smoothing: {e}"))?;
        Slices { depth: d, len: h * w * c }
    } else {
        Slices { depth: 1, len: x.numel() }
    };
    let scale = reduction.scale(x.numel());
    if x.device() != Device::Cpu {
        // BCELoss on a kernel device: the kernel clamps the log terms as PyTorch does; inputs come
        // from a sigmoid, so the host-side range check is left to the CPU backend.
        let value = kg::pointwise_forward(kind, x.gpu(op)?, target.gpu(op)?, slices, scale)?;
        let target = target.clone();
        return record_gpu(g, op, pred, &value, move |gy| {
            kg::pointwise_backward(kind, x.gpu(op)?, target.gpu(op)?, slices, scale as f32, gy)
        });
    }
    if kind == Pointwise::Bce
        && let Some((i, v)) = x.data().iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v))
    {
        anyhow::bail!("{op}: input value {v} at index {i} is not a probability in [0, 1]");
    }
    let value = k::pointwise_forward(kind, x.data(), target.data(), slices, scale);
    let target = target.clone();
    Ok(record(g, op, pred, value, move |gy| {
        grad_like(&x, |gx| {
            k::pointwise_backward(kind, x.data(), target.data(), slices, scale as f32 * gy, gx)
        })
    }))
}

/// The seed's BCEDiceLoss(alpha, beta) on channels-last logits; the channel axis is the last one.
pub fn bce_dice(g: &mut Graph, logits: Var, target: &Tensor, alpha: f64, beta: f64) -> Result<Var> {
    let op = "BCEDiceLoss";
    let x = operands(g, op, logits, target)?;
    same_shape(op, &x, target)?;
    let cfg = BceDice { alpha, beta, smoothing: 0.1 };
    if x.device() != Device::Cpu {
        let (value, grad) = kg::bce_dice_forward(x.gpu(op)?, target.gpu(op)?, &cfg)?;
        let target = target.clone();
        return record_gpu(g, op, logits, &value, move |gy| {
            kg::bce_dice_backward(x.gpu(op)?, target.gpu(op)?, &grad, gy)
        });
    }
    let (value, grad) = k::bce_dice_forward(x.data(), target.data(), x.shape().last(), &cfg);
    let target = target.clone();
    Ok(record(g, op, logits, value, move |gy| {
        grad_like(&x, |gx| k::bce_dice_backward(x.data(), target.data(), &grad, gy, gx))
    }))
}

/// The seed's MaskedCosineLoss over vectors on the last (channel) axis.
pub fn masked_cosine(g: &mut Graph, pred: Var, target: &Tensor) -> Result<Var> {
    let op = "MaskedCosineLoss";
    let x = operands(g, op, pred, target)?;
    same_shape(op, &x, target)?;
    let c = x.shape().last();
    if x.device() != Device::Cpu {
        let (value, grad) = kg::masked_cosine_forward(x.gpu(op)?, target.gpu(op)?)?;
        let target = target.clone();
        return record_gpu(g, op, pred, &value, move |gy| {
            kg::masked_cosine_backward(x.gpu(op)?, target.gpu(op)?, &grad, gy)
        });
    }
    let (value, scale) = k::masked_cosine_forward(x.data(), target.data(), c);
    let target = target.clone();
    Ok(record(g, op, pred, value, move |gy| {
        grad_like(&x, |gx| k::masked_cosine_backward(x.data(), target.data(), c, scale * gy, gx))
    }))
}

/// `sum_i w_i * loss_i` of one-element values: deep-supervision terms, or per-task losses.
pub fn weighted_sum(g: &mut Graph, terms: &[(Var, f64)]) -> Result<Var> {
    ensure!(!terms.is_empty(), "weighted_sum needs at least one term");
    let values: Vec<Tensor> = terms.iter().map(|&(v, _)| g.value(v).clone()).collect();
    if same_device("weighted_sum", &values.iter().collect::<Vec<_>>())? != Device::Cpu {
        return weighted_sum_gpu(g, terms, &values);
    }
    let mut value = 0.0;
    let mut shapes: Vec<(Shape, f32)> = Vec::with_capacity(terms.len());
    for (i, &(v, w)) in terms.iter().enumerate() {
        let t = g.value(v);
        ensure!(t.numel() == 1, "weighted_sum: term {i} has shape {}, expected one element", t.shape());
        value += w * f64::from(t.data()[0]);
        shapes.push((t.shape().clone(), w as f32));
    }
    let vars: Vec<Var> = terms.iter().map(|&(v, _)| v).collect();
    Ok(g.record("weighted_sum", Tensor::scalar(value as f32), &vars, move |gy| {
        let gy = gy.item()?;
        Ok(shapes.into_iter().map(|(s, w)| Some(Tensor::full(s, gy * w))).collect())
    }))
}

/// [`weighted_sum`] of one-element tensors on a kernel device, in float32 there.
fn weighted_sum_gpu(g: &mut Graph, terms: &[(Var, f64)], values: &[Tensor]) -> Result<Var> {
    let op = "weighted_sum";
    for (i, t) in values.iter().enumerate() {
        ensure!(t.numel() == 1, "{op}: term {i} has shape {}, expected one element", t.shape());
    }
    let mut total = scaled(&values[0].reshape(Shape::new(&[]))?, terms[0].1 as f32)?;
    for (t, &(_, w)) in values.iter().zip(terms).skip(1) {
        kge::axpy_in_place(total.gpu_mut(op)?, w as f32, &t.gpu(op)?.clone().reshape(Shape::new(&[]))?)?;
    }
    let shapes: Vec<(Shape, f32)> =
        values.iter().zip(terms).map(|(t, &(_, w))| (t.shape().clone(), w as f32)).collect();
    let vars: Vec<Var> = terms.iter().map(|&(v, _)| v).collect();
    Ok(g.record(op, total, &vars, move |gy| {
        shapes.into_iter().map(|(s, w)| Ok(Some(scaled(gy, w)?.reshape(s)?))).collect()
    }))
}
