//! The patch and batch nnU-Net v2's ResEnc planners choose from a dataset's fingerprint
//! (`determine_fullres_target_spacing`, `get_plans_for_configuration`; docs/planning.md): the
//! target spacing, the cases' median shape at it, the patch that fits the VRAM reference and the
//! batch the reference leaves room for.

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::plan::{MAX_NUMPOOL, MIN_FEATURE_MAP_SIZE, Topology, topology};
use super::size::{REFERENCE_VRAM_GB, RESENC_M_REFERENCE_VAL};
use super::spec::{ArchConfig, Architecture, Target};

/// nnU-Net's ANISO_THRESHOLD: an axis this many times coarser than the others is anisotropic.
pub const ANISOTROPY_THRESHOLD: f64 = 3.0;

/// The patch search starts from this many voxels (256^3), shaped by the spacing.
const INITIAL_PATCH_VOXELS: f64 = 256.0 * 256.0 * 256.0;

/// A plan for the full-resolution configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The spacing the network trains at (D, H, W) in mm.
    pub spacing: [f64; 3],
    /// The cases' median shape (cropped) at that spacing.
    pub median_shape: [f64; 3],
    pub patch_size: [usize; 3],
    pub batch_size: usize,
    pub topology: Topology,
    /// nnU-Net's VRAM proxy of the planned network at the patch, and the reference it fits.
    pub feature_map_size: u64,
    pub reference: f64,
}

/// The target spacing: the per-axis median, except that an axis more than 3 times coarser than
/// the others with under a third of their voxels takes its 10th percentile (kept above the
/// others' spacing), so anisotropic data is not resampled to its worst axis.
pub fn target_spacing(spacings: &[[f64; 3]], shapes: &[[usize; 3]]) -> Result<[f64; 3]> {
    ensure!(!spacings.is_empty() && spacings.len() == shapes.len(), "planning needs one spacing per case");
    let axis = |a: usize| -> Vec<f64> { spacings.iter().map(|s| s[a]).collect() };
    let mut target: [f64; 3] = std::array::from_fn(|a| percentile(&axis(a), 50.0));
    let size: [f64; 3] =
        std::array::from_fn(|a| percentile(&shapes.iter().map(|s| s[a] as f64).collect::<Vec<_>>(), 50.0));
    // np.argmax: the first of equal maxima.
    let worst = (0..3).fold(0, |w, a| if target[a] > target[w] { a } else { w });
    let others: Vec<usize> = (0..3).filter(|&a| a != worst).collect();
    let max_other = others.iter().map(|&a| target[a]).fold(f64::NEG_INFINITY, f64::max);
    let min_other_size = others.iter().map(|&a| size[a]).fold(f64::INFINITY, f64::min);
    if target[worst] > ANISOTROPY_THRESHOLD * max_other && size[worst] * ANISOTROPY_THRESHOLD < min_other_size
    {
        let mut t = percentile(&axis(worst), 10.0);
        if t < max_other {
            t = max_other.max(t) + 1e-5;
        }
        target[worst] = t;
    }
    Ok(target)
}

/// The median over cases of each case's shape resampled to `target` (rounded per case, as
/// nnU-Net's `compute_new_shape`).
pub fn median_shape(spacings: &[[f64; 3]], shapes: &[[usize; 3]], target: [f64; 3]) -> [f64; 3] {
    let resampled: Vec<[f64; 3]> = spacings
        .iter()
        .zip(shapes)
        .map(|(s, n)| std::array::from_fn(|a| (s[a] / target[a] * n[a] as f64).round()))
        .collect();
    std::array::from_fn(|a| percentile(&resampled.iter().map(|r| r[a]).collect::<Vec<_>>(), 50.0))
}

/// nnU-Net ResEnc's patch search and batch size for a network built by `arch` (its spacing
/// replaced by `spacing`) with `in_channels` and `targets`, at most `vram_gb` of GPU memory, over
/// `cases` training cases of `median` shape.
pub fn plan(
    arch: &ArchConfig,
    in_channels: usize,
    targets: &[Target],
    spacing: [f64; 3],
    median: [f64; 3],
    cases: usize,
    vram_gb: f64,
) -> Result<Plan> {
    ensure!(vram_gb.is_finite() && vram_gb > 0.0, "planning: VRAM target {vram_gb} GB must be positive");
    let config = ArchConfig { spacing, autoconfigure: true, ..arch.clone() };
    let build = |patch: [usize; 3]| -> Result<Architecture> {
        let a = config
            .build(in_channels, targets.to_vec(), patch)
            .with_context(|| format!("planning patch {patch:?}"))?;
        // The planner sizes the network without deep supervision.
        Ok(Architecture { deep_supervision: false, ..a })
    };
    let inverse: [f64; 3] = spacing.map(|s| 1.0 / s);
    let scale = (INITIAL_PATCH_VOXELS / inverse.iter().product::<f64>()).cbrt();
    let initial: [usize; 3] = std::array::from_fn(|a| {
        // Python's round (half to even), then clipped to the median shape.
        ((inverse[a] * scale).round_ties_even().min(median[a])).round_ties_even().max(1.0) as usize
    });
    let topo = |p: [usize; 3]| topology(spacing, p, MIN_FEATURE_MAP_SIZE, MAX_NUMPOOL);
    let mut t = topo(initial);
    let mut patch = t.patch_size;
    let reference = RESENC_M_REFERENCE_VAL * vram_gb / REFERENCE_VRAM_GB;
    let mut estimate = build(patch)?.feature_map_size(patch);
    while estimate as f64 > reference {
        // The axis largest against the median shape (the last of ties, as np.argsort) shrinks by
        // the divisor the smaller patch needs.
        let ratio = |a: usize| patch[a] as f64 / median[a];
        let axis = (0..3).fold(0, |b, a| if ratio(a) >= ratio(b) { a } else { b });
        let mut smaller = patch;
        smaller[axis] = smaller[axis].saturating_sub(t.must_divide[axis]);
        ensure!(smaller[axis] > 0, "planning: no patch fits {vram_gb} GB (at {patch:?})");
        patch[axis] -= topo(smaller).must_divide[axis];
        t = topo(patch);
        patch = t.patch_size;
        estimate = build(patch)?.feature_map_size(patch);
    }
    let network = build(patch)?;
    let dataset_voxels = (median.iter().product::<f64>() * cases as f64) as u64;
    let batch_size = network.nnunet_batch_size(patch, vram_gb, Some(dataset_voxels))?;
    Ok(Plan {
        spacing,
        median_shape: median,
        patch_size: patch,
        batch_size,
        topology: t,
        feature_map_size: estimate,
        reference,
    })
}

/// numpy's default (linear) percentile of `values`.
fn percentile(values: &[f64], q: f64) -> f64 {
    crate::device::cpu::reduce::percentile(&mut values.to_vec(), q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_numpy() {
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 50.0), 2.5);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 10.0), 1.4);
    }
}
