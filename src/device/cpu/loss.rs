//! Fused loss kernels: one pass computes the loss from f64 sums, one pass computes d loss / d input.
//!
//! Inputs are channels-last, so a voxel's C values are contiguous and each per-voxel term (softmax,
//! sigmoid-Dice, cosine) reads one run of memory. Sums are formed per block of voxels in parallel
//! and added in block order, so the result does not depend on the number of threads.
//! Label maps hold class indices as floats; callers check that they are integers in 0..C.

use super::Real;
use super::activation::sigmoid;
use crate::device::op::{BceDice, LabelSmoothing, Pointwise, Slices, SoftmaxLoss};
use rayon::prelude::*;
use std::ops::Range;

/// Voxels per parallel task: large enough to amortise scheduling, small enough to balance.
const BLOCK: usize = 4096;

fn f64_of<T: Real>(v: T) -> f64 {
    v.to_f64().expect("float converts to f64")
}

fn class<T: Real>(label: T) -> usize {
    label.to_usize().expect("label is a validated class index")
}

/// Sums of `width` statistics for each of `groups` runs of `len` consecutive voxels.
/// `f(group, voxels, acc)` adds the statistics of a range of global voxel indices to `acc`.
fn group_sums(
    groups: usize,
    len: usize,
    width: usize,
    f: impl Fn(usize, Range<usize>, &mut [f64]) + Sync,
) -> Vec<f64> {
    let blocks = len.div_ceil(BLOCK);
    let partials: Vec<Vec<f64>> = (0..groups * blocks)
        .into_par_iter()
        .map(|task| {
            let (g, b) = (task / blocks, task % blocks);
            let start = g * len + b * BLOCK;
            let mut acc = vec![0.0; width];
            f(g, start..start + BLOCK.min(len - b * BLOCK), &mut acc);
            acc
        })
        .collect();
    let mut sums = vec![0.0; groups * width];
    for (task, p) in partials.iter().enumerate() {
        let g = task / blocks;
        sums[g * width..(g + 1) * width].iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    sums
}

/// Runs `f(first_voxel, chunk)` in parallel over blocks of `gx`, which holds `c` values per voxel.
fn for_blocks<T: Real>(gx: &mut [T], c: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    gx.par_chunks_mut(BLOCK * c).enumerate().for_each(|(b, chunk)| f(b * BLOCK, chunk));
}

/// BCE with logits, `max(x, 0) - x t + log(1 + exp(-|x|))`: PyTorch's overflow-free form.
fn bce_logits<T: Real>(x: T, t: T) -> T {
    x.max(T::zero()) - x * t + (-x.abs()).exp().ln_1p()
}

/// The seed's label smoothing `t (1 - 2s) + s`.
fn smooth_target<T: Real>(t: T, s: T) -> T {
    t * (T::one() - T::c(2.0) * s) + s
}

/// Softmax of one voxel's logits into `p`; returns log-sum-exp.
fn softmax_into<T: Real>(x: &[T], p: &mut [T]) -> T {
    let m = x.iter().copied().fold(T::neg_infinity(), T::max);
    let mut sum = T::zero();
    for (pi, &xi) in p.iter_mut().zip(x) {
        *pi = (xi - m).exp();
        sum = sum + *pi;
    }
    p.iter_mut().for_each(|pi| *pi = *pi / sum);
    m + sum.ln()
}

impl Pointwise {
    fn smoothing_table<T: Real>(&self, depth: usize) -> Vec<T> {
        let s = match self {
            Pointwise::BceWithLogits(s) => *s,
            _ => LabelSmoothing::None,
        };
        s.per_slice(depth).into_iter().map(T::c).collect()
    }

    fn value<T: Real>(&self, x: T, t: T, s: T) -> T {
        match *self {
            Pointwise::Mse => (x - t) * (x - t),
            Pointwise::L1 => (x - t).abs(),
            Pointwise::SmoothL1 { beta } => {
                let (d, beta) = ((x - t).abs(), T::c(beta));
                if d < beta { T::c(0.5) * d * d / beta } else { d - T::c(0.5) * beta }
            }
            Pointwise::BceWithLogits(_) => bce_logits(x, smooth_target(t, s)),
            Pointwise::Bce => {
                let floor = T::c(-100.0);
                -(t * x.ln().max(floor) + (T::one() - t) * (-x).ln_1p().max(floor))
            }
        }
    }

    fn grad<T: Real>(&self, x: T, t: T, s: T) -> T {
        let sign = |d: T| if d == T::zero() { d } else { d.signum() };
        match *self {
            Pointwise::Mse => T::c(2.0) * (x - t),
            Pointwise::L1 => sign(x - t),
            Pointwise::SmoothL1 { beta } => {
                let (d, beta) = (x - t, T::c(beta));
                if d.abs() < beta { d / beta } else { sign(d) }
            }
            Pointwise::BceWithLogits(_) => sigmoid(x) - smooth_target(t, s),
            Pointwise::Bce => (x - t) / (x * (T::one() - x)).max(T::c(1e-12)),
        }
    }
}

/// `scale` times the sum of the loss terms (scale 1/numel for a mean).
pub fn pointwise_forward<T: Real>(kind: Pointwise, x: &[T], t: &[T], slices: Slices, scale: f64) -> f64 {
    assert_eq!(x.len(), t.len(), "pointwise loss: prediction and target lengths");
    let s = kind.smoothing_table::<T>(slices.depth);
    let sums = group_sums(1, x.len(), 1, |_, r, acc| {
        acc[0] += r.map(|i| f64_of(kind.value(x[i], t[i], s[(i / slices.len) % slices.depth]))).sum::<f64>();
    });
    scale * sums[0]
}

/// `gx = scale * d(sum of terms)/dx`; pass the forward scale times the upstream gradient.
pub fn pointwise_backward<T: Real>(
    kind: Pointwise,
    x: &[T],
    t: &[T],
    slices: Slices,
    scale: T,
    gx: &mut [T],
) {
    assert!(x.len() == t.len() && x.len() == gx.len(), "pointwise loss backward: lengths");
    let s = kind.smoothing_table::<T>(slices.depth);
    for_blocks(gx, 1, |first, chunk| {
        for (k, g) in chunk.iter_mut().enumerate() {
            let i = first + k;
            *g = scale * kind.grad(x[i], t[i], s[(i / slices.len) % slices.depth]);
        }
    });
}

/// Per-(sample, class) sums of one softmax pass over channels-last logits, row-major (n, c).
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxSums {
    pub ce: f64,
    /// Sum of p over voxels labelled with the class.
    pub inter: Vec<f64>,
    /// Sum of p.
    pub pred: Vec<f64>,
    /// Voxels labelled with the class.
    pub gt: Vec<f64>,
}

/// What the backward pass of a [`SoftmaxLoss`] needs: d loss / d I and d loss / d P per (n, c).
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxGrad<T> {
    pub ce_scale: T,
    pub d_inter: Vec<T>,
    pub d_pred: Vec<T>,
}

/// One pass of softmax over `logits` (n samples of `labels.len() / n` voxels, `c` classes).
pub fn softmax_sums<T: Real>(logits: &[T], labels: &[T], n: usize, c: usize) -> SoftmaxSums {
    assert_eq!(logits.len(), labels.len() * c, "softmax loss: logits and labels lengths");
    let voxels = labels.len() / n;
    let width = 1 + 3 * c;
    let sums = group_sums(n, voxels, width, |_, r, acc| {
        let mut p = vec![T::zero(); c];
        for v in r {
            let x = &logits[v * c..(v + 1) * c];
            let y = class(labels[v]);
            let lse = softmax_into(x, &mut p);
            acc[0] += f64_of(lse - x[y]);
            acc[1 + y] += f64_of(p[y]);
            acc[1 + c..1 + 2 * c].iter_mut().zip(&p).for_each(|(a, &pk)| *a += f64_of(pk));
            acc[1 + 2 * c + y] += 1.0;
        }
    });
    let mut out = SoftmaxSums { ce: 0.0, inter: vec![], pred: vec![], gt: vec![] };
    for row in sums.chunks_exact(width) {
        out.ce += row[0];
        out.inter.extend_from_slice(&row[1..1 + c]);
        out.pred.extend_from_slice(&row[1 + c..1 + 2 * c]);
        out.gt.extend_from_slice(&row[1 + 2 * c..]);
    }
    out
}

/// `-weight * mean(dc)` over the Dice entries and its derivatives w.r.t. each (sample, class) I and P.
fn soft_dice(s: &SoftmaxSums, n: usize, c: usize, cfg: &SoftmaxLoss) -> (f64, Vec<f64>, Vec<f64>) {
    let first = usize::from(!cfg.do_bg);
    // Each Dice entry is a set of (sample, class) cells whose sums are added.
    let entries: Vec<Vec<usize>> = if cfg.batch_dice {
        (first..c).map(|k| (0..n).map(|b| b * c + k).collect()).collect()
    } else {
        (0..n).flat_map(|b| (first..c).map(move |k| vec![b * c + k])).collect()
    };
    let (mut value, mut d_inter, mut d_pred) = (0.0, vec![0.0; n * c], vec![0.0; n * c]);
    let w = cfg.dice_weight / entries.len() as f64;
    for cells in &entries {
        let sum = |v: &[f64]| cells.iter().map(|&i| v[i]).sum::<f64>();
        let (i, p, g) = (sum(&s.inter), sum(&s.pred), sum(&s.gt));
        let raw = g + p + cfg.smooth;
        let den = raw.max(1e-8);
        let num = 2.0 * i + cfg.smooth;
        value -= w * num / den;
        // clamp passes the gradient where its input is at or above the bound (PyTorch's clip).
        let dp = if raw >= 1e-8 { w * num / (den * den) } else { 0.0 };
        for &cell in cells {
            d_inter[cell] = -w * 2.0 / den;
            d_pred[cell] = dp;
        }
    }
    (value, d_inter, d_pred)
}

/// The loss and what its backward needs. `labels` hold class indices in 0..c.
pub fn softmax_loss_forward<T: Real>(
    logits: &[T],
    labels: &[T],
    n: usize,
    c: usize,
    cfg: &SoftmaxLoss,
) -> (f64, SoftmaxGrad<T>) {
    let sums = softmax_sums(logits, labels, n, c);
    let (dice, d_inter, d_pred) = if cfg.dice_weight == 0.0 {
        (0.0, vec![0.0; n * c], vec![0.0; n * c])
    } else {
        soft_dice(&sums, n, c, cfg)
    };
    let cast = |v: Vec<f64>| v.into_iter().map(T::c).collect();
    let grad = SoftmaxGrad { ce_scale: T::c(cfg.ce_scale), d_inter: cast(d_inter), d_pred: cast(d_pred) };
    (cfg.ce_scale * sums.ce + dice, grad)
}

/// `gx = gy * d loss / d logits`: CE's `p - onehot` plus the softmax Jacobian applied to the Dice
/// derivative `dL/dp_k = d_pred[k] + [k == y] d_inter[k]`.
pub fn softmax_loss_backward<T: Real>(
    logits: &[T],
    labels: &[T],
    grad: &SoftmaxGrad<T>,
    gy: T,
    gx: &mut [T],
) {
    let c = logits.len() / labels.len();
    let voxels = labels.len() / (grad.d_inter.len() / c);
    assert_eq!(gx.len(), logits.len(), "softmax loss backward: gradient length");
    for_blocks(gx, c, |first, chunk| {
        let (mut p, mut dp) = (vec![T::zero(); c], vec![T::zero(); c]);
        for (k, gv) in chunk.chunks_exact_mut(c).enumerate() {
            let v = first + k;
            let y = class(labels[v]);
            softmax_into(&logits[v * c..(v + 1) * c], &mut p);
            let cells = (v / voxels) * c..(v / voxels + 1) * c;
            dp.copy_from_slice(&grad.d_pred[cells.clone()]);
            dp[y] = dp[y] + grad.d_inter[cells][y];
            let dot = p.iter().zip(&dp).fold(T::zero(), |a, (&pk, &dk)| a + pk * dk);
            for j in 0..c {
                let onehot = if j == y { T::one() } else { T::zero() };
                gv[j] = gy * (grad.ce_scale * (p[j] - onehot) + p[j] * (dp[j] - dot));
            }
        }
    });
}

/// What the backward of [`BceDice`] needs: `dL/dp = coef_t[c] t + coef_p[c] p` per channel.
#[derive(Clone, Debug, PartialEq)]
pub struct BceDiceGrad<T> {
    pub bce_scale: T,
    pub smoothing: T,
    pub coef_t: Vec<T>,
    pub coef_p: Vec<T>,
}

/// The loss over channels-last `x` and `t` with `c` channels, and what its backward needs.
pub fn bce_dice_forward<T: Real>(x: &[T], t: &[T], c: usize, cfg: &BceDice) -> (f64, BceDiceGrad<T>) {
    assert_eq!(x.len(), t.len(), "BCEDiceLoss: logits and target lengths");
    let s = T::c(cfg.smoothing);
    let sums = group_sums(1, x.len() / c, 1 + 3 * c, |_, r, acc| {
        for v in r {
            for k in 0..c {
                let (xi, ti) = (x[v * c + k], t[v * c + k]);
                let p = sigmoid(xi);
                acc[0] += f64_of(bce_logits(xi, smooth_target(ti, s)));
                acc[1 + k] += f64_of(p * ti);
                acc[1 + c + k] += f64_of(p * p);
                acc[1 + 2 * c + k] += f64_of(ti * ti);
            }
        }
    });
    let cf = c as f64;
    let (mut dice_sum, mut coef_t, mut coef_p) = (0.0, Vec::with_capacity(c), Vec::with_capacity(c));
    for k in 0..c {
        let (i, raw) = (sums[1 + k], sums[1 + c + k] + sums[1 + 2 * c + k]);
        let den = raw.max(1e-6);
        dice_sum += 2.0 * i / den;
        coef_t.push(T::c(-2.0 * cfg.beta / (cf * den)));
        coef_p.push(T::c(if raw >= 1e-6 { 4.0 * cfg.beta * i / (cf * den * den) } else { 0.0 }));
    }
    let bce_scale = cfg.alpha / x.len() as f64;
    let value = bce_scale * sums[0] + cfg.beta * (1.0 - dice_sum / cf);
    (value, BceDiceGrad { bce_scale: T::c(bce_scale), smoothing: s, coef_t, coef_p })
}

/// `gx = gy * d loss / d x` for [`bce_dice_forward`].
pub fn bce_dice_backward<T: Real>(x: &[T], t: &[T], grad: &BceDiceGrad<T>, gy: T, gx: &mut [T]) {
    let c = grad.coef_t.len();
    assert!(x.len() == t.len() && x.len() == gx.len(), "BCEDiceLoss backward: lengths");
    for_blocks(gx, c, |first, chunk| {
        for (j, g) in chunk.iter_mut().enumerate() {
            let (i, k) = (first * c + j, j % c);
            let p = sigmoid(x[i]);
            let dice = grad.coef_t[k] * t[i] + grad.coef_p[k] * p;
            *g =
                gy * (grad.bce_scale * (p - smooth_target(t[i], grad.smoothing)) + p * (T::one() - p) * dice);
        }
    });
}

const COS_EPS: f64 = 1e-8;

/// `x / max(|x|, eps)`: returns (|x|, the clamped norm).
fn norm_clamped<T: Real>(x: &[T]) -> (T, T) {
    let n = x.iter().fold(T::zero(), |a, &v| a + v * v).sqrt();
    (n, n.max(T::c(COS_EPS)))
}

/// Backward of `y = x / max(|x|, eps)` for upstream `up`, into `out`. `through_clamp` false is
/// torch.cosine_similarity's no-grad clamp: the norm's gradient flows even below eps.
fn normalize_vjp<T: Real>(x: &[T], norm: T, clamped: T, through_clamp: bool, up: &[T], out: &mut [T]) {
    let dot = x.iter().zip(up).fold(T::zero(), |a, (&xi, &ui)| a + xi * ui);
    let flows = norm > T::zero() && (!through_clamp || norm >= T::c(COS_EPS));
    let k = if flows { dot / (clamped * clamped * norm) } else { T::zero() };
    for ((o, &xi), &ui) in out.iter_mut().zip(x).zip(up) {
        *o = ui / clamped - k * xi;
    }
}

/// The seed's MaskedCosineLoss on one voxel: the target's unit vector `u` if its norm exceeds 1e-6
/// (the mask), with the prediction's normalised vector `q = p / max(|p|, 1e-8)`; cos = q/max(|q|,1e-8) . u.
/// Returns cos and the norms (|p|, clamped |p|, |q|, clamped |q|) the backward needs.
fn cosine_parts<T: Real>(p: &[T], t: &[T], q: &mut [T], u: &mut [T]) -> Option<(T, [T; 4])> {
    let (nt, ct) = norm_clamped(t);
    if nt <= T::c(1e-6) {
        return None;
    }
    let (np, cp) = norm_clamped(p);
    q.iter_mut().zip(p).for_each(|(qi, &pi)| *qi = pi / cp);
    u.iter_mut().zip(t).for_each(|(ui, &ti)| *ui = ti / ct);
    let (nq, cq) = norm_clamped(q);
    let cos = q.iter().zip(u.iter()).fold(T::zero(), |a, (&qi, &ui)| a + qi * ui) / cq;
    Some((cos, [np, cp, nq, cq]))
}

/// `1 - sum(cos * mask) / (sum(mask) + 1e-8)` over channels-last `p`, `t` with `c` channels; also
/// returns the backward scale `1 / (sum(mask) + 1e-8)`.
pub fn masked_cosine_forward<T: Real>(p: &[T], t: &[T], c: usize) -> (f64, T) {
    assert_eq!(p.len(), t.len(), "MaskedCosineLoss: prediction and target lengths");
    let sums = group_sums(1, p.len() / c, 2, |_, r, acc| {
        let (mut q, mut u) = (vec![T::zero(); c], vec![T::zero(); c]);
        for v in r {
            let cells = v * c..(v + 1) * c;
            if let Some((cos, ..)) = cosine_parts(&p[cells.clone()], &t[cells], &mut q, &mut u) {
                acc[0] += f64_of(cos);
                acc[1] += 1.0;
            }
        }
    });
    let scale = 1.0 / (sums[1] + 1e-8);
    (1.0 - sums[0] * scale, T::c(scale))
}

/// `gx = -scale * d(sum of masked cos) / dp`, where `scale` is the forward's times the upstream gradient.
pub fn masked_cosine_backward<T: Real>(p: &[T], t: &[T], c: usize, scale: T, gx: &mut [T]) {
    assert!(p.len() == t.len() && p.len() == gx.len(), "MaskedCosineLoss backward: lengths");
    for_blocks(gx, c, |first, chunk| {
        let (mut q, mut u, mut gq) = (vec![T::zero(); c], vec![T::zero(); c], vec![T::zero(); c]);
        for (k, gv) in chunk.chunks_exact_mut(c).enumerate() {
            let cells = (first + k) * c..(first + k + 1) * c;
            let (pv, tv) = (&p[cells.clone()], &t[cells]);
            match cosine_parts(pv, tv, &mut q, &mut u) {
                None => gv.iter_mut().for_each(|g| *g = T::zero()),
                Some((_, [np, cp, nq, cq])) => {
                    u.iter_mut().for_each(|ui| *ui = -scale * *ui);
                    normalize_vjp(&q, nq, cq, false, &u, &mut gq);
                    normalize_vjp(pv, np, cp, true, &gq, gv);
                }
            }
        }
    });
}
