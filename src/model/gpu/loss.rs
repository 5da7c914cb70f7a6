//! The losses of [`Loss`] on a kernel device, with the scaling and checks of `loss::ops` on the
//! CPU: each is a forward that leaves its gradient constants on the device and a one-pass backward.

use anyhow::{Context, Result, ensure};

use crate::device::cpu::loss::{BceDice, LabelSmoothing, Pointwise, Slices, SoftmaxLoss};
use crate::device::kernels::GpuTensor;
use crate::device::kernels::loss::{self as k, GpuBceDiceGrad, GpuCosineGrad, GpuSoftmaxGrad};
use crate::loss::{Loss, Reduction};

/// What a loss's backward needs of its forward.
pub(super) enum LossGrad {
    Softmax(GpuSoftmaxGrad),
    Pointwise { kind: Pointwise, slices: Slices, scale: f64 },
    BceDice(GpuBceDiceGrad),
    Cosine(GpuCosineGrad),
}

fn mean_scale(r: Reduction, count: usize) -> f64 {
    match r {
        Reduction::Mean => 1.0 / count as f64,
        Reduction::Sum => 1.0,
    }
}

/// The value of `loss` of channels-last `x` against `target` (on `x`'s device), and what its
/// backward needs.
pub(super) fn forward(loss: &Loss, x: &GpuTensor, target: &GpuTensor) -> Result<(f64, LossGrad)> {
    let softmax = |cfg: SoftmaxLoss| -> Result<(f64, LossGrad)> {
        let (value, grad) = k::softmax_loss_forward(x, target, &cfg)?;
        Ok((value.value()?, LossGrad::Softmax(grad)))
    };
    match *loss {
        Loss::DiceCe(cfg) => {
            ensure!(
                cfg.do_bg || x.shape().last() >= 2,
                "DC_and_CE_loss without background needs at least 2 classes, logits have shape {}",
                x.shape()
            );
            softmax(SoftmaxLoss {
                ce_scale: cfg.weight_ce / target.numel() as f64,
                dice_weight: cfg.weight_dice,
                batch_dice: cfg.batch_dice,
                do_bg: cfg.do_bg,
                smooth: cfg.smooth,
            })
        }
        Loss::CrossEntropy(r) => softmax(SoftmaxLoss {
            ce_scale: mean_scale(r, target.numel()),
            dice_weight: 0.0,
            batch_dice: false,
            do_bg: true,
            smooth: 0.0,
        }),
        Loss::Pointwise(kind, r) => {
            let slices = if let Pointwise::BceWithLogits(LabelSmoothing::ZSlices { .. }) = kind {
                let [_, d, h, w, c] = x.shape().ndhwc().context("BCEWithLogitsLoss with z smoothing")?;
                Slices { depth: d, len: h * w * c }
            } else {
                Slices { depth: 1, len: x.numel() }
            };
            let scale = mean_scale(r, x.numel());
            let value = k::pointwise_forward(kind, x, target, slices, scale)?.value()?;
            Ok((value, LossGrad::Pointwise { kind, slices, scale }))
        }
        Loss::BceDice { alpha, beta } => {
            let (value, grad) = k::bce_dice_forward(x, target, &BceDice { alpha, beta, smoothing: 0.1 })?;
            Ok((value.value()?, LossGrad::BceDice(grad)))
        }
        Loss::MaskedCosine => {
            let (value, grad) = k::masked_cosine_forward(x, target)?;
            Ok((value.value()?, LossGrad::Cosine(grad)))
        }
    }
}

/// `gy * d loss / d x` of [`forward`].
pub(super) fn backward(grad: &LossGrad, x: &GpuTensor, target: &GpuTensor, gy: f32) -> Result<GpuTensor> {
    match grad {
        LossGrad::Softmax(g) => k::softmax_loss_backward(x, target, g, gy),
        LossGrad::Pointwise { kind, slices, scale } => {
            k::pointwise_backward(*kind, x, target, *slices, *scale as f32 * gy)
        }
        LossGrad::BceDice(g) => k::bce_dice_backward(x, target, g, gy),
        LossGrad::Cosine(g) => k::masked_cosine_backward(x, target, g, gy),
    }
}
