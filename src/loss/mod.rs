//! The losses: nnU-Net's Dice + CE with deep supervision (reference-spec 4.2), the seed's BCE and
//! Dice family and masked cosine (1.7), and PyTorch's regression losses. Each loss is one fused
//! differentiable op whose kernels live in `device::cpu::loss`.

mod config;
mod deep_supervision;
mod ops;

pub use crate::device::op::{LabelSmoothing, Pointwise};
pub use config::LOSS_NAMES;
pub use deep_supervision::{
    LabelResample, deep_supervision, deep_supervision_labels, deep_supervision_weights, downsample_labels,
};
pub use ops::{DiceCe, Reduction, bce_dice, cross_entropy, dice_ce, masked_cosine, pointwise, weighted_sum};

use crate::autograd::{Graph, Var};
use crate::tensor::Tensor;
use anyhow::Result;

/// A loss as a task's `loss_fn` and `loss_kwargs` configure it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// nnU-Net's DC_and_CE_loss on softmax logits against a label map.
    DiceCe(DiceCe),
    /// PyTorch's CrossEntropyLoss against a label map of class indices.
    CrossEntropy(Reduction),
    /// The seed's BCEDiceLoss; the target is shaped like the logits.
    BceDice { alpha: f64, beta: f64 },
    /// MSE, L1, SmoothL1, BCE on probabilities and the BCE-with-logits family; the target is
    /// shaped like the input.
    Pointwise(Pointwise, Reduction),
    /// The seed's MaskedCosineLoss on vectors along the channel axis.
    MaskedCosine,
}

impl Loss {
    /// The loss named `name` (one of [`LOSS_NAMES`]) with `kwargs`, a JSON object or null. Unknown
    /// names, unknown kwargs and wrongly typed or out-of-range values are errors that name them.
    pub fn from_config(name: &str, kwargs: &serde_json::Value) -> Result<Loss> {
        config::from_config(name, kwargs)
    }

    /// Records the loss of channels-last `input` against `target` on `g`; returns the scalar.
    /// Label-map losses take (N, D, H, W, 1) or (N, D, H, W) class indices stored as floats.
    pub fn apply(&self, g: &mut Graph, input: Var, target: &Tensor) -> Result<Var> {
        match *self {
            Loss::DiceCe(cfg) => dice_ce(g, input, target, &cfg),
            Loss::CrossEntropy(r) => cross_entropy(g, input, target, r),
            Loss::BceDice { alpha, beta } => bce_dice(g, input, target, alpha, beta),
            Loss::Pointwise(kind, r) => pointwise(g, input, target, kind, r),
            Loss::MaskedCosine => masked_cosine(g, input, target),
        }
    }
}
