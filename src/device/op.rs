//! The ops' descriptors, shared by every backend: what an op computes (conv geometry, activation,
//! broadcast, the pointwise and softmax losses, optimizer hyper-parameters, squeeze-excitation
//! pooling), independent of where it runs. The CPU backend (device::cpu) and the CUDA kernel
//! wrappers (device::kernels) both take these; each adds its own methods in its own module.

use serde::{Deserialize, Serialize};

/// The activation fused after a normalisation, or applied on its own.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Act {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `x` for `x > 0`, `slope * x` otherwise (nnU-Net uses 0.01).
    LeakyRelu(f64),
}

impl Act {
    /// The slope for `x <= 0`: every `Act` is a leaky ReLU (identity has slope 1, ReLU slope 0), so
    /// one branch-free loop serves all three.
    pub fn slope(self) -> f64 {
        match self {
            Act::None => 1.0,
            Act::Relu => 0.0,
            Act::LeakyRelu(s) => s,
        }
    }
}

/// A conv3d with "same" padding `(k - 1) / 2` per axis, as nnU-Net builds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub n: usize,
    /// Input spatial size (D, H, W).
    pub input: [usize; 3],
    pub cin: usize,
    pub cout: usize,
    /// Kernel size (T, R, S).
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
}

impl ConvDims {
    pub fn pad(&self) -> [usize; 3] {
        self.kernel.map(|k| k.saturating_sub(1) / 2)
    }

    /// Output spatial size, `floor((n + 2p - k) / s) + 1` per axis.
    pub fn output(&self) -> [usize; 3] {
        let p = self.pad();
        std::array::from_fn(|a| (self.input[a] + 2 * p[a] - self.kernel[a]) / self.stride[a] + 1)
    }

    /// Fails unless kernel and stride are positive and the kernel fits in the padded input.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = self.pad();
        anyhow::ensure!(
            self.kernel.iter().all(|&k| k > 0) && self.stride.iter().all(|&s| s > 0),
            "kernel {:?} and stride {:?} must be positive",
            self.kernel,
            self.stride
        );
        anyhow::ensure!(
            (0..3).all(|a| self.input[a] + 2 * p[a] >= self.kernel[a]),
            "kernel {:?} does not fit in the input {:?} padded by {p:?}",
            self.kernel,
            self.input
        );
        Ok(())
    }

    pub fn x_len(&self) -> usize {
        self.n * self.input.iter().product::<usize>() * self.cin
    }

    pub fn y_len(&self) -> usize {
        self.n * self.output().iter().product::<usize>() * self.cout
    }

    pub fn w_len(&self) -> usize {
        self.cout * self.kernel.iter().product::<usize>() * self.cin
    }
}

/// A transposed conv3d whose kernel equals its stride: every input voxel paints one disjoint
/// `kernel`-sized block of the output, which is `input * kernel` per axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransposedDims {
    pub n: usize,
    /// Input spatial size (D, H, W).
    pub input: [usize; 3],
    pub cin: usize,
    pub cout: usize,
    /// Kernel size = stride (T, R, S).
    pub kernel: [usize; 3],
}

impl TransposedDims {
    pub fn output(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.input[a] * self.kernel[a])
    }

    pub fn x_len(&self) -> usize {
        self.n * self.input.iter().product::<usize>() * self.cin
    }

    pub fn y_len(&self) -> usize {
        self.n * self.output().iter().product::<usize>() * self.cout
    }

    pub fn w_len(&self) -> usize {
        self.cin * self.kernel.iter().product::<usize>() * self.cout
    }
}

/// A broadcast seen as (outer, mid, inner): the full operand holds `outer * mid * inner` elements
/// and the small one `outer * inner`, repeated over `mid`. Both channels-last cases of the U-Net
/// (a per-sample channel gate (N,1,1,1,C) and the (N,1,1,W,C) gate of the D,H-pooled
/// squeeze-excitation) are this view, and so is every mean over a contiguous run of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bcast {
    pub outer: usize,
    pub mid: usize,
    pub inner: usize,
}

impl Bcast {
    /// The view of `small` broadcast against `full` (same rank, each axis equal or 1), or None when
    /// the broadcast axes do not form one contiguous run.
    pub fn of(full: &[usize], small: &[usize]) -> Option<Bcast> {
        if full.len() != small.len() || full.iter().zip(small).any(|(&f, &s)| s != f && s != 1) {
            return None;
        }
        let bcast: Vec<usize> = (0..full.len()).filter(|&i| small[i] != full[i]).collect();
        let (lo, hi) = match (bcast.first(), bcast.last()) {
            (Some(&lo), Some(&hi)) => (lo, hi + 1),
            _ => (full.len(), full.len()),
        };
        if small[lo..hi].iter().any(|&s| s != 1) {
            return None;
        }
        let p = |d: &[usize]| d.iter().product::<usize>();
        Some(Bcast { outer: p(&full[..lo]), mid: p(&full[lo..hi]), inner: p(&full[hi..]) })
    }

    /// Elements of the full operand.
    pub fn full_len(&self) -> usize {
        self.outer * self.mid * self.inner
    }

    /// Elements of the broadcast operand.
    pub fn small_len(&self) -> usize {
        self.outer * self.inner
    }
}

/// How targets are smoothed before BCE with logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LabelSmoothing {
    None,
    /// One factor everywhere (the seed's BCEWithLogitsLossLabelSmoothing).
    Constant(f64),
    /// The seed's BCEWithLogitsLossZSmooth: `s(z) = center + (edge - center) |z - (D-1)/2| / (D//2)`.
    /// With D = 1 the seed divides by zero (NaN); here the single slice takes `center`.
    ZSlices {
        center: f64,
        edge: f64,
    },
}

impl LabelSmoothing {
    /// The smoothing factor of each of `depth` slices along D.
    pub fn per_slice(&self, depth: usize) -> Vec<f64> {
        match *self {
            LabelSmoothing::None => vec![0.0; depth],
            LabelSmoothing::Constant(s) => vec![s; depth],
            LabelSmoothing::ZSlices { center, edge } => {
                let mid = (depth as f64 - 1.0) / 2.0;
                let max_dist = (depth / 2) as f64;
                (0..depth)
                    .map(|z| {
                        if depth / 2 == 0 {
                            center
                        } else {
                            center + (edge - center) * (z as f64 - mid).abs() / max_dist
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Element `i` of a tensor lies in slice `(i / len) % depth` along D (depth 1: no D axis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slices {
    pub depth: usize,
    pub len: usize,
}

/// Losses that are a mean (or sum) of one term per element.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pointwise {
    Mse,
    L1,
    /// PyTorch's SmoothL1: `0.5 d^2 / beta` below `beta`, `|d| - 0.5 beta` above (beta 0 is L1).
    SmoothL1 {
        beta: f64,
    },
    BceWithLogits(LabelSmoothing),
    /// BCE on probabilities; PyTorch clamps each log at -100 and the backward denominator at 1e-12.
    Bce,
}

/// Cross-entropy and nnU-Net's MemoryEfficientSoftDiceLoss on softmax probabilities, fused:
/// `ce_scale * sum(CE) - dice_weight * mean(dc)`, `dc = (2I + smooth) / max(G + P + smooth, 1e-8)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxLoss {
    /// Multiplies the sum of per-voxel CE (weight / voxel count for nnU-Net's mean).
    pub ce_scale: f64,
    /// 0 leaves the Dice term out (plain cross-entropy).
    pub dice_weight: f64,
    /// Sum I, P, G over the batch before forming dc.
    pub batch_dice: bool,
    /// Include class 0 in the Dice mean.
    pub do_bg: bool,
    pub smooth: f64,
}

/// The seed's BCEDiceLoss: `alpha * BCE_ls + beta * (1 - mean_c 2 I_c / max(sum p^2 + sum t^2, 1e-6))`
/// with `p = sigmoid(x)`, sums per channel over batch and space, BCE against smoothed targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BceDice {
    pub alpha: f64,
    pub beta: f64,
    pub smoothing: f64,
}

/// torch.optim.SGD hyperparameters (dampening is 0).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    /// L2 penalty, added to the gradient: `g + weight_decay * p`.
    pub weight_decay: f64,
}

/// torch.optim.Adam / AdamW hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: decay the parameter by `1 - lr * weight_decay` before the update, instead of adding
    /// `weight_decay * p` to the gradient (Adam's L2 penalty).
    pub decoupled: bool,
}

/// Which spatial axes squeeze-excitation averages over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SePool {
    /// D, H and W: the textbook block.
    #[default]
    Dhw,
    /// D and H only, leaving a gate that varies along W: dynamic_network_architectures' quirk.
    Dh,
}

/// make_divisible(v, 8, round_limit 0) of dynamic_network_architectures / timm on v = C / 16.
pub fn se_reduced_channels(channels: usize) -> usize {
    ((channels + 64) / 16 / 8 * 8).max(8)
}
