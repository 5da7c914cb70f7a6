//! nnU-Net v2's network topology rules (`get_pool_and_conv_props`, reference-spec 3.2).

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

/// nnU-Net's smallest bottleneck edge (`UNet_featuremap_min_edge_length`).
pub const MIN_FEATURE_MAP_SIZE: usize = 4;
/// nnU-Net v2 does not cap the number of poolings.
pub const MAX_NUMPOOL: usize = 999_999;

/// Per-stage strides and kernels for a patch, as nnU-Net plans them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Poolings per axis (D, H, W).
    pub num_pool_per_axis: [usize; 3],
    /// Stride of each encoder stage; stage 0 is always [1, 1, 1].
    pub strides: Vec<[usize; 3]>,
    /// Kernel size of each stage's convolutions.
    pub kernel_sizes: Vec<[usize; 3]>,
    /// The input patch rounded up so that `must_divide` divides it (nnU-Net's `pad_shape`).
    pub patch_size: [usize; 3],
    /// 2^poolings per axis: every valid patch is a multiple of this.
    pub must_divide: [usize; 3],
}

impl Topology {
    pub fn n_stages(&self) -> usize {
        self.strides.len()
    }
}

/// nnU-Net v2's `get_pool_and_conv_props` on a (D, H, W) spacing and patch, including the rule that
/// a single remaining pooling axis must be at least 3 * `min_feature_map_size` long.
pub fn get_pool_and_conv_props(
    spacing: [f64; 3],
    patch_size: [usize; 3],
    min_feature_map_size: usize,
    max_numpool: usize,
) -> Result<Topology> {
    ensure!(
        spacing.iter().all(|s| s.is_finite() && *s > 0.0),
        "get_pool_and_conv_props: spacing {spacing:?} must be positive and finite on every axis"
    );
    ensure!(
        patch_size.iter().all(|&p| p > 0),
        "get_pool_and_conv_props: patch size {patch_size:?} must be positive on every axis"
    );
    ensure!(min_feature_map_size > 0, "get_pool_and_conv_props: min_feature_map_size must be positive");
    Ok(topology(spacing, patch_size, min_feature_map_size, max_numpool))
}

/// The planning loop on inputs already checked to be positive.
pub(crate) fn topology(spacing: [f64; 3], patch: [usize; 3], min_fm: usize, max_numpool: usize) -> Topology {
    let mut cur_spacing = spacing;
    let mut size = patch;
    let mut strides = vec![[1; 3]];
    let mut kernel_sizes = Vec::new();
    let mut num_pool = [0; 3];
    let mut kernel = [1; 3];
    loop {
        let by_size: Vec<usize> = (0..3).filter(|&d| size[d] >= 2 * min_fm).collect();
        if by_size.is_empty() {
            break;
        }
        let min_valid = by_size.iter().map(|&d| cur_spacing[d]).fold(f64::INFINITY, f64::min);
        let valid: Vec<usize> = by_size
            .into_iter()
            .filter(|&d| cur_spacing[d] / min_valid < 2.0 && num_pool[d] < max_numpool)
            .collect();
        match valid[..] {
            [] => break,
            [d] if size[d] < 3 * min_fm => break,
            _ => {}
        }
        // Kernels become 3 once an axis is within a factor 2 of the finest spacing, and stay 3.
        let min_all = cur_spacing.iter().copied().fold(f64::INFINITY, f64::min);
        for d in 0..3 {
            if kernel[d] != 3 && cur_spacing[d] / min_all < 2.0 {
                kernel[d] = 3;
            }
        }
        let mut stride = [1; 3];
        for &d in &valid {
            stride[d] = 2;
            num_pool[d] += 1;
            cur_spacing[d] *= 2.0;
            size[d] = size[d].div_ceil(2);
        }
        strides.push(stride);
        kernel_sizes.push(kernel);
    }
    kernel_sizes.push([3; 3]); // the bottleneck
    let must_divide = num_pool.map(|n| 1usize << n);
    Topology {
        num_pool_per_axis: num_pool,
        strides,
        kernel_sizes,
        patch_size: pad_shape(patch, must_divide),
        must_divide,
    }
}

/// Rounds each axis up to a multiple of `must_divide` (unchanged where it already divides).
pub fn pad_shape(shape: [usize; 3], must_divide: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|d| shape[d].next_multiple_of(must_divide[d]))
}

/// The nearest patch sizes below and above `patch` that `must_divide_for` divides on every axis.
/// `must_divide_for` maps a patch to its divisor because autoconfigure's topology, and so the
/// divisor, changes with the patch; the rounding repeats until the divisor of the rounded patch
/// divides it. Below is None where an axis would round down to zero.
pub fn nearest_valid_patches(
    patch: [usize; 3],
    must_divide_for: impl Fn([usize; 3]) -> [usize; 3],
) -> (Option<[usize; 3]>, Option<[usize; 3]>) {
    // Rounding down only shrinks the patch and rounding up only doubles divisors, so a fixed
    // point comes within a few rounds; the bound only guards against a pathological divisor map.
    let settle = |round: fn(usize, usize) -> usize| {
        let mut p = patch;
        for _ in 0..64 {
            let m = must_divide_for(p);
            let q: [usize; 3] = std::array::from_fn(|d| round(p[d], m[d]));
            if q.contains(&0) {
                return None;
            }
            if q == p {
                return Some(p);
            }
            p = q;
        }
        None
    };
    (settle(|p, m| p / m * m), settle(|p, m| p.next_multiple_of(m)))
}
