//! nnU-Net's Gaussian importance map (reference-spec 4.6), which weights a window's centre over
//! its border when windows are blended.

/// nnU-Net's `sigma_scale`: sigma = patch / 8 per axis.
pub const SIGMA_SCALE: f64 = 0.125;

/// The (D, H, W) weights of a window of `patch`, peak 1 at `patch / 2`.
///
/// nnU-Net filters a centred delta with scipy's truncated Gaussian and divides by the maximum,
/// which is exactly the product of unnormalised 1-D Gaussians: its truncation radius
/// (`int(4 sigma + 0.5)`) always reaches the border for sigma = patch / 8. Computed in float64 and
/// stored as float32 (nnU-Net's float16 would underflow the corners to 0); zeros are still
/// replaced by the smallest non-zero weight, as nnU-Net, so every voxel of a window has weight.
pub fn importance_map(patch: [usize; 3]) -> Vec<f32> {
    let axis = |a: usize| -> Vec<f64> {
        let sigma = patch[a] as f64 * SIGMA_SCALE;
        let centre = (patch[a] / 2) as f64;
        (0..patch[a]).map(|i| (-(i as f64 - centre).powi(2) / (2.0 * sigma * sigma)).exp()).collect()
    };
    let [gz, gy, gx] = [axis(0), axis(1), axis(2)];
    let mut map = Vec::with_capacity(patch.iter().product());
    for z in &gz {
        for y in &gy {
            map.extend(gx.iter().map(|x| (z * y * x) as f32));
        }
    }
    let smallest = map.iter().copied().filter(|&v| v > 0.0).fold(f32::INFINITY, f32::min);
    map.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = smallest);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_one_at_the_centre_and_symmetric() {
        let m = importance_map([4, 5, 6]);
        let at = |z: usize, y: usize, x: usize| m[(z * 5 + y) * 6 + x];
        assert_eq!(at(2, 2, 3), 1.0);
        assert!(m.iter().all(|&v| v > 0.0 && v <= 1.0));
        assert_eq!(at(1, 2, 3), at(3, 2, 3));
        assert_eq!(at(2, 1, 2), at(2, 3, 4));
    }
}
