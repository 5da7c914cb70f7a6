//! nnU-Net v2's default training augmentation (reference-spec 4.5) on one patch, with its order,
//! probabilities and ranges taken from `tr_config.augmentation`: rotation + scaling, Gaussian noise,
//! Gaussian blur, brightness, contrast, low resolution, gamma on the inverted image, gamma, mirroring.
//! Labels follow every spatial transform by the label rule; value targets are trilinear; vector
//! targets (normals) are also rotated and flipped as vectors. Not done: nnU-Net's "dummy 2D" mode
//! for strongly anisotropic patches (max(patch) / patch[0] > 3).

pub mod intensity;
pub mod spatial;

use anyhow::{Result, ensure};
use rand::Rng;

pub use spatial::{INITIAL_PATCH_MIN_SCALE, SpatialParams, initial_patch_size, mirror, spatial_transform};

use crate::config::Augmentation;
use crate::data::{Patch, TargetKind};

/// Probability with which blur and low resolution touch each channel once the transform fires.
const P_PER_CHANNEL: f64 = 0.5;

/// np.random.uniform(lo, hi); never panics on an empty range.
fn uniform(rng: &mut impl Rng, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn fires(rng: &mut impl Rng, p: f64) -> bool {
    rng.random::<f64>() < p
}

/// batchgeneratorsv2 `BGContrast`: half the time below 1 (when the range reaches below 1), else
/// at least 1.
fn bg_contrast(rng: &mut impl Rng, (lo, hi): (f64, f64)) -> f64 {
    if rng.random::<f64>() < 0.5 && lo < 1.0 {
        uniform(rng, (lo, 1.0))
    } else {
        uniform(rng, (lo.max(1.0), hi))
    }
}

/// Applies the configured augmentation to patches read at `source_size`.
#[derive(Debug, Clone)]
pub struct Augmenter {
    config: Augmentation,
    patch_size: [usize; 3],
    source_size: [usize; 3],
}

impl Augmenter {
    pub fn new(config: &Augmentation, patch_size: [usize; 3]) -> Augmenter {
        let rotates = config.enabled && config.p_rotation > 0.0;
        let spatial = rotates || (config.enabled && config.p_scaling > 0.0);
        let source_size = if spatial {
            let angle = if rotates { config.rotation_max_degrees } else { 0.0 };
            initial_patch_size(patch_size, angle, INITIAL_PATCH_MIN_SCALE)
        } else {
            patch_size
        };
        Augmenter { config: config.clone(), patch_size, source_size }
    }

    /// The larger box the loader must read so rotation/scaling never sample outside real data
    /// (nnU-Net's initial patch size); equals patch_size when spatial transforms are off.
    pub fn source_size(&self) -> [usize; 3] {
        self.source_size
    }

    pub fn patch_size(&self) -> [usize; 3] {
        self.patch_size
    }

    /// Transforms a patch of source_size into one of patch_size (spatial then intensity
    /// transforms, nnU-Net order); deterministic for a given rng state. The patch may be any size
    /// at least patch_size; the transforms centre on it.
    pub fn apply(&self, patch: Patch, rng: &mut impl Rng) -> Result<Patch> {
        check(&patch, self.patch_size)?;
        let cfg = &self.config;
        if !cfg.enabled {
            return spatial_transform(&patch, self.patch_size, None);
        }
        if let Some(&axis) = cfg.mirror_axes.iter().find(|&&a| a > 2) {
            anyhow::bail!("tr_config.augmentation.mirror_axes: axis {axis} is not one of 0, 1, 2");
        }

        let rotate = fires(rng, cfg.p_rotation);
        let scale = fires(rng, cfg.p_scaling);
        let max_angle = cfg.rotation_max_degrees.to_radians();
        let params = (rotate || scale).then(|| SpatialParams {
            angles: if rotate {
                std::array::from_fn(|_| uniform(rng, (-max_angle, max_angle)))
            } else {
                [0.0; 3]
            },
            scale: if scale { uniform(rng, cfg.scaling_range) } else { 1.0 },
        });
        let mut patch = spatial_transform(&patch, self.patch_size, params.as_ref())?;

        let size = patch.size;
        let mut image = planar(std::mem::take(&mut patch.input), patch.in_channels);
        let n = image.len();
        if fires(rng, cfg.p_noise) {
            let sigma = uniform(rng, (0.0, cfg.noise_max_std)) as f32;
            intensity::add_noise(&mut image, size, sigma, rng.random());
        }
        if fires(rng, cfg.p_blur) {
            let chosen: Vec<bool> = (0..n).map(|_| fires(rng, P_PER_CHANNEL)).collect();
            for (ch, _) in image.iter_mut().zip(chosen).filter(|(_, c)| *c) {
                let sigmas = std::array::from_fn(|_| uniform(rng, cfg.blur_sigma_range));
                intensity::gaussian_blur(ch, size, sigmas);
            }
        }
        if fires(rng, cfg.p_brightness) {
            for ch in &mut image {
                intensity::scale_brightness(ch, bg_contrast(rng, cfg.brightness_range) as f32);
            }
        }
        if fires(rng, cfg.p_contrast) {
            for ch in &mut image {
                intensity::contrast(ch, bg_contrast(rng, cfg.contrast_range) as f32);
            }
        }
        if fires(rng, cfg.p_low_resolution) {
            let chosen: Vec<bool> = (0..n).map(|_| fires(rng, P_PER_CHANNEL)).collect();
            for (ch, _) in image.iter_mut().zip(chosen).filter(|(_, c)| *c) {
                intensity::simulate_low_resolution(ch, size, uniform(rng, cfg.low_resolution_range));
            }
        }
        for (p, invert) in [(cfg.p_gamma_inverted, true), (cfg.p_gamma, false)] {
            if fires(rng, p) {
                for ch in &mut image {
                    intensity::gamma(ch, bg_contrast(rng, cfg.gamma_range) as f32, invert, true);
                }
            }
        }
        patch.input = interleaved(image, size.iter().product());

        let mut axes = [false; 3];
        for &a in &cfg.mirror_axes {
            axes[a] |= fires(rng, 0.5);
        }
        mirror(&mut patch, axes);
        Ok(patch)
    }
}

/// Sizes agree with the data, the patch covers the output, vector targets have 3 components.
fn check(patch: &Patch, patch_size: [usize; 3]) -> Result<()> {
    let voxels: usize = patch.size.iter().product();
    ensure!(
        (0..3).all(|i| patch.size[i] >= patch_size[i]),
        "augmentation: source patch {:?} is smaller than the patch size {patch_size:?}",
        patch.size
    );
    ensure!(
        patch.input.len() == voxels * patch.in_channels,
        "augmentation: input has {} values, patch {:?} x {} channels needs {}",
        patch.input.len(),
        patch.size,
        patch.in_channels,
        voxels * patch.in_channels
    );
    for (i, t) in patch.targets.iter().enumerate() {
        ensure!(
            t.data.len() == voxels * t.channels,
            "augmentation: target {i} has {} values, patch {:?} x {} channels needs {}",
            t.data.len(),
            patch.size,
            t.channels,
            voxels * t.channels
        );
        ensure!(
            t.kind != TargetKind::Vectors || t.channels == 3,
            "augmentation: vector target {i} has {} channels; vectors need 3 (x, y, z)",
            t.channels
        );
    }
    Ok(())
}

/// Channels-last values split into one (D, H, W) array per channel (moved when there is one).
fn planar(data: Vec<f32>, channels: usize) -> Vec<Vec<f32>> {
    if channels == 1 {
        return vec![data];
    }
    (0..channels).map(|c| data.iter().skip(c).step_by(channels).copied().collect()).collect()
}

fn interleaved(mut channels: Vec<Vec<f32>>, voxels: usize) -> Vec<f32> {
    if channels.len() == 1 {
        return channels.pop().unwrap_or_default();
    }
    (0..voxels).flat_map(|v| channels.iter().map(move |ch| ch[v])).collect()
}
