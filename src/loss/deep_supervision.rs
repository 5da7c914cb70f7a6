//! nnU-Net's deep supervision: one loss per decoder output (full resolution first), weighted
//! `1/2^i` with the lowest resolution at 0 and normalised to sum 1, each against the label map
//! downsampled to that output's size.

use super::{Loss, weighted_sum};
use crate::autograd::{Graph, Var};
use crate::tensor::Tensor;
use anyhow::{Context, Result, ensure};

/// nnU-Net's weights for `n` outputs: `[8/15, 4/15, 2/15, 1/15, 0]` for 5. One output keeps weight 1
/// (nnU-Net would divide by zero).
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![1.0; n];
    }
    let mut w: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32)).collect();
    w[n - 1] = 0.0;
    let sum: f64 = w.iter().sum();
    w.iter_mut().for_each(|x| *x /= sum);
    w
}

/// How a label map is sampled at another size (PyTorch `interpolate` modes, computed as PyTorch does
/// in float32 with scale = input / output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelResample {
    /// `mode='nearest'`: source `floor(i * scale)`, i.e. every k-th voxel from 0. The loss and model
    /// fixtures were made this way.
    Nearest,
    /// `mode='nearest-exact'`: source `floor((i + 0.5) * scale)`, the voxel under each output centre.
    /// This is what nnU-Net v2 runs (batchgeneratorsv2 DownsampleSegForDSTransform).
    NearestExact,
}

impl LabelResample {
    fn source(self, i: usize, input: usize, output: usize) -> usize {
        if input == output {
            return i;
        }
        let scale = input as f32 / output as f32;
        let src = match self {
            LabelResample::Nearest => i as f32 * scale,
            LabelResample::NearestExact => (i as f32 + 0.5) * scale,
        };
        (src.floor() as usize).min(input - 1)
    }
}

/// The spatial size (D, H, W) of a label map (N, D, H, W) or (N, D, H, W, C).
fn spatial(label: &Tensor) -> Result<[usize; 3]> {
    let dims = label.dims();
    ensure!(
        dims.len() == 4 || dims.len() == 5,
        "label map must be (N, D, H, W) or (N, D, H, W, C), got shape {}",
        label.shape()
    );
    Ok([dims[1], dims[2], dims[3]])
}

/// The label map (N, D, H, W) or (N, D, H, W, C) resampled to spatial `size` (D, H, W).
pub fn downsample_labels(label: &Tensor, size: [usize; 3], mode: LabelResample) -> Result<Tensor> {
    let src = spatial(label)?;
    let dims = label.dims();
    ensure!(
        size.iter().all(|&s| s > 0),
        "label map of shape {} cannot be resampled to size {size:?}",
        label.shape()
    );
    let (n, c) = (dims[0], if dims.len() == 5 { dims[4] } else { 1 });
    let index = |a: usize| -> Vec<usize> { (0..size[a]).map(|i| mode.source(i, src[a], size[a])).collect() };
    let (zi, yi, xi) = (index(0), index(1), index(2));
    let data = label.data();
    let mut out = Vec::with_capacity(n * size.iter().product::<usize>() * c);
    for b in 0..n {
        for &z in &zi {
            for &y in &yi {
                for &x in &xi {
                    let v = (((b * src[0] + z) * src[1] + y) * src[2] + x) * c;
                    out.extend_from_slice(&data[v..v + c]);
                }
            }
        }
    }
    let mut shape = vec![n, size[0], size[1], size[2]];
    if dims.len() == 5 {
        shape.push(c);
    }
    Tensor::from_vec(shape, out)
}

/// The label map for each deep-supervision output, full resolution first, as nnU-Net makes them:
/// output `i` has size `round(shape / prod(strides[..=i]))` (round half to even, as Python).
/// `strides` are the network's per-stage strides, stage 0 first (the plans' pool_op_kernel_sizes);
/// there is one output per stage but the last.
pub fn deep_supervision_labels(
    label: &Tensor,
    strides: &[[usize; 3]],
    mode: LabelResample,
) -> Result<Vec<Tensor>> {
    ensure!(strides.len() >= 2, "deep supervision needs at least 2 stages, got strides {strides:?}");
    ensure!(
        strides.iter().flatten().all(|&s| s > 0),
        "deep supervision strides must be positive, got {strides:?}"
    );
    let size0 = spatial(label)?;
    let mut cum = [1usize; 3];
    let mut maps = Vec::with_capacity(strides.len() - 1);
    for (i, s) in strides[..strides.len() - 1].iter().enumerate() {
        (0..3).for_each(|a| cum[a] *= s[a]);
        if cum == [1, 1, 1] {
            maps.push(label.clone());
            continue;
        }
        let size = [0, 1, 2].map(|a| (size0[a] as f64 * (1.0 / cum[a] as f64)).round_ties_even() as usize);
        maps.push(
            downsample_labels(label, size, mode).with_context(|| format!("deep supervision output {i}"))?,
        );
    }
    Ok(maps)
}

/// `sum_i weights[i] * loss(outputs[i], targets[i])`; terms with weight 0 are not computed (as
/// nnU-Net), so their outputs get no gradient.
pub fn deep_supervision(
    g: &mut Graph,
    loss: &Loss,
    outputs: &[Var],
    targets: &[Tensor],
    weights: &[f64],
) -> Result<Var> {
    ensure!(
        outputs.len() == targets.len() && outputs.len() == weights.len(),
        "deep supervision: {} outputs, {} targets and {} weights; the counts must match",
        outputs.len(),
        targets.len(),
        weights.len()
    );
    let mut terms = Vec::with_capacity(outputs.len());
    for (i, ((&out, target), &w)) in outputs.iter().zip(targets).zip(weights).enumerate() {
        if w != 0.0 {
            let l = loss.apply(g, out, target).with_context(|| format!("deep supervision output {i}"))?;
            terms.push((l, w));
        }
    }
    ensure!(!terms.is_empty(), "deep supervision: every weight is 0 in {weights:?}");
    weighted_sum(g, &terms)
}
