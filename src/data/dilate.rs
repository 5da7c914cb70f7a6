//! The seed's `dilate_label`: grey dilation of label maps with skimage's `ball(5)` footprint (the
//! 515 offsets with |o|^2 <= 25 in an 11^3 box).
//!
//! A flat footprint's grey dilation splits by threshold: out >= k iff some voxel >= k lies within
//! the ball. Each level is a squared Euclidean distance transform truncated at the radius, and that
//! separates into three 1-D min-plus passes of 2r + 1 steps per voxel (33 instead of 515).

/// Ball radius in voxels.
pub const RADIUS: usize = 5;

/// Squared distances above the ball's are all "far"; small enough that far + r^2 fits in a u8.
const FAR: u8 = (RADIUS * RADIUS + 1) as u8;

/// Dilates the channels-last `data` of spatial `shape` in place, each channel on its own: every
/// voxel takes the largest value within the ball around it. Voxels outside `shape` do not exist
/// (as with skimage's reflecting border, which only repeats values already inside the ball).
/// Values <= 0 are background and never spread.
pub fn dilate_labels(data: &mut [f32], shape: [usize; 3], channels: usize) {
    let n: usize = shape.iter().product();
    assert_eq!(data.len(), n * channels, "dilate_labels: data does not match {shape:?} x {channels}");
    for c in 0..channels {
        let values: Vec<f32> = data[c..].iter().step_by(channels).copied().collect();
        let mut levels: Vec<f32> = values.iter().copied().filter(|&v| v > 0.0).collect();
        levels.sort_by(f32::total_cmp);
        levels.dedup();
        // Ascending, so each voxel ends with the highest level whose dilation reaches it.
        for &level in &levels {
            let reached = within_ball(values.iter().map(|&v| v >= level), shape);
            for (i, r) in reached.into_iter().enumerate() {
                if r {
                    data[i * channels + c] = level;
                }
            }
        }
    }
}

/// Whether each voxel is within the ball of some voxel of `mask`.
fn within_ball(mask: impl Iterator<Item = bool>, shape: [usize; 3]) -> Vec<bool> {
    let mut d: Vec<u8> = mask.map(|m| if m { 0 } else { FAR }).collect();
    for axis in 0..3 {
        d = min_plus_pass(&d, shape, axis);
    }
    d.into_iter().map(|v| v < FAR).collect()
}

/// out[p] = min over |t| <= r (inside the volume) of src[p + t e_axis] + t^2, capped at FAR.
fn min_plus_pass(src: &[u8], shape: [usize; 3], axis: usize) -> Vec<u8> {
    let len = shape[axis];
    let stride: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let mut out = vec![FAR; src.len()];
    for o in 0..outer {
        let base = o * len * stride;
        for p in 0..len {
            let dst = &mut out[base + p * stride..][..stride];
            for q in p.saturating_sub(RADIUS)..(p + RADIUS + 1).min(len) {
                let t = p.abs_diff(q);
                let add = (t * t) as u8;
                let row = &src[base + q * stride..][..stride];
                dst.iter_mut().zip(row).for_each(|(d, &s)| *d = (*d).min(s.saturating_add(add).min(FAR)));
            }
        }
    }
    out
}
