//! nnU-Net's intensity transforms (batchgeneratorsv2 `noise`, `intensity` and `low_resolution`
//! modules) on one image channel stored as its own (D, H, W) array.

use rand::{Rng, SeedableRng, rngs::SmallRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;

/// Voxels per parallel work item of the element-wise passes and reductions. Fixed so reductions
/// add in the same order on any thread count.
const CHUNK: usize = 1 << 14;

/// Mean and unbiased standard deviation (torch.std), summed in f64 in a fixed order.
pub fn mean_std(data: &[f32]) -> (f64, f64) {
    let n = data.len() as f64;
    let sum: f64 = data
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>())
        .collect::<Vec<_>>()
        .iter()
        .sum();
    let mean = sum / n;
    let sq: f64 = data
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
        .collect::<Vec<_>>()
        .iter()
        .sum();
    (mean, (sq / (n - 1.0).max(1.0)).sqrt())
}

fn min_max(data: &[f32]) -> (f32, f32) {
    data.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn map_in_place(data: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    data.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

/// GaussianNoiseTransform with synchronised channels: one N(0, sigma^2) field added to every
/// channel. Each z slice draws from its own generator seeded by (`seed`, z), so the field is
/// reproducible and made in parallel.
pub fn add_noise(channels: &mut [Vec<f32>], size: [usize; 3], sigma: f32, seed: u64) {
    let slice = size[1] * size[2];
    if slice == 0 || channels.is_empty() {
        return;
    }
    let mut noise = vec![0.0f32; size[0] * slice];
    noise.par_chunks_mut(slice).enumerate().for_each(|(z, n)| {
        let mut rng = SmallRng::seed_from_u64(seed ^ (z as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        n.iter_mut().for_each(|v| *v = sigma * rng.sample::<f32, _>(StandardNormal));
    });
    for ch in channels {
        ch.par_chunks_mut(CHUNK).zip(noise.par_chunks(CHUNK)).for_each(|(c, n)| {
            c.iter_mut().zip(n).for_each(|(v, n)| *v += n);
        });
    }
}

/// batchgeneratorsv2 `_build_kernel`: a normalised Gaussian over `nearest odd(round(6 sigma + 0.5))`
/// taps (blur_dimension's truncate = 6).
pub fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let mut size = (6.0 * sigma + 0.5).round_ties_even() as usize;
    if size.is_multiple_of(2) {
        size += 1;
    }
    let half = (size / 2) as f64;
    let k: Vec<f64> = (0..size).map(|i| (-0.5 * ((i as f64 - half) / sigma).powi(2)).exp()).collect();
    let sum: f64 = k.iter().sum();
    k.iter().map(|v| (v / sum) as f32).collect()
}

/// torch `reflect` padding index (the edge voxel is not repeated), folded again for pads longer
/// than the axis.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// Separable Gaussian blur with `sigmas` per axis (D, H, W), reflect padding; one pass per axis.
pub fn gaussian_blur(data: &mut [f32], size: [usize; 3], sigmas: [f64; 3]) {
    for (axis, &sigma) in sigmas.iter().enumerate() {
        blur_axis(data, size, axis, &gaussian_kernel(sigma));
    }
}

fn blur_axis(data: &mut [f32], size: [usize; 3], axis: usize, kernel: &[f32]) {
    let [d, h, w] = size;
    let slice = h * w;
    if slice == 0 || d == 0 {
        return;
    }
    let r = (kernel.len() / 2) as isize;
    let src = data.to_vec();
    data.par_chunks_mut(slice).enumerate().for_each(|(z, out)| match axis {
        0 => {
            out.fill(0.0);
            for (j, &k) in kernel.iter().enumerate() {
                let zs = reflect(z as isize + j as isize - r, d);
                out.iter_mut().zip(&src[zs * slice..(zs + 1) * slice]).for_each(|(o, s)| *o += k * s);
            }
        }
        1 => {
            let plane = &src[z * slice..(z + 1) * slice];
            for (y, row) in out.chunks_exact_mut(w).enumerate() {
                row.fill(0.0);
                for (j, &k) in kernel.iter().enumerate() {
                    let ys = reflect(y as isize + j as isize - r, h);
                    row.iter_mut().zip(&plane[ys * w..(ys + 1) * w]).for_each(|(o, s)| *o += k * s);
                }
            }
        }
        _ => {
            let plane = &src[z * slice..(z + 1) * slice];
            for (row, line) in out.chunks_exact_mut(w).zip(plane.chunks_exact(w)) {
                for (x, o) in row.iter_mut().enumerate() {
                    *o = kernel
                        .iter()
                        .enumerate()
                        .map(|(j, &k)| k * line[reflect(x as isize + j as isize - r, w)])
                        .sum();
                }
            }
        }
    });
}

/// MultiplicativeBrightnessTransform: x *= factor.
pub fn scale_brightness(data: &mut [f32], factor: f32) {
    map_in_place(data, |v| v * factor);
}

/// ContrastTransform with preserve_range: (x - mean) * factor + mean, clamped to the channel's
/// original [min, max].
pub fn contrast(data: &mut [f32], factor: f32) {
    if data.is_empty() {
        return;
    }
    let mean = mean_std(data).0 as f32;
    let (lo, hi) = min_max(data);
    map_in_place(data, |v| ((v - mean) * factor + mean).clamp(lo, hi));
}

/// The (lower tap, upper tap, upper weight) of each output index for PyTorch's linear
/// interpolation with align_corners=False (float32 scale = input / output, negative sources at 0).
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// SimulateLowResolutionTransform: nearest-exact down to round(size * scale) (at least 1 voxel),
/// trilinear back up (align_corners=False).
pub fn simulate_low_resolution(data: &mut [f32], size: [usize; 3], scale: f64) {
    let small: [usize; 3] = size.map(|s| ((s as f64 * scale).round_ties_even() as usize).max(1));
    if small == size || size.contains(&0) {
        return;
    }
    let nearest = |a: usize| -> Vec<usize> {
        let s = size[a] as f32 / small[a] as f32;
        (0..small[a]).map(|i| (((i as f32 + 0.5) * s).floor() as usize).min(size[a] - 1)).collect()
    };
    let (nz, ny, nx) = (nearest(0), nearest(1), nearest(2));
    let mut low = Vec::with_capacity(small.iter().product());
    for &z in &nz {
        for &y in &ny {
            let row = (z * size[1] + y) * size[2];
            low.extend(nx.iter().map(|&x| data[row + x]));
        }
    }
    let (tz, ty, tx) =
        (linear_taps(small[0], size[0]), linear_taps(small[1], size[1]), linear_taps(small[2], size[2]));
    let (sh, sw) = (small[1], small[2]);
    data.par_chunks_mut(size[1] * size[2]).zip(&tz).for_each(|(out, &(z0, z1, wz))| {
        for (row, &(y0, y1, wy)) in out.chunks_exact_mut(size[2]).zip(&ty) {
            let at = |z: usize, y: usize, x: usize| low[(z * sh + y) * sw + x];
            for (o, &(x0, x1, wx)) in row.iter_mut().zip(&tx) {
                let lerp = |z: usize, y: usize| at(z, y, x0) * (1.0 - wx) + at(z, y, x1) * wx;
                let plane = |z: usize| lerp(z, y0) * (1.0 - wy) + lerp(z, y1) * wy;
                *o = plane(z0) * (1.0 - wz) + plane(z1) * wz;
            }
        }
    });
}

/// GammaTransform on one channel: optionally on -x; with `retain_stats` the mean and (unbiased)
/// std are restored afterwards; x = ((x - min) / max(range, 1e-7))^gamma * range + min.
pub fn gamma(data: &mut [f32], gamma: f32, invert: bool, retain_stats: bool) {
    if data.is_empty() {
        return;
    }
    if invert {
        map_in_place(data, |v| -v);
    }
    let stats = retain_stats.then(|| mean_std(data));
    let (lo, hi) = min_max(data);
    let range = hi - lo;
    map_in_place(data, |v| ((v - lo) / range.max(1e-7)).powf(gamma) * range + lo);
    if let Some((mean, std)) = stats {
        let (mean_here, std_here) = mean_std(data);
        let factor = (std / std_here.max(1e-7)) as f32;
        let (mean, mean_here) = (mean as f32, mean_here as f32);
        map_in_place(data, |v| (v - mean_here) * factor + mean);
    }
    if invert {
        map_in_place(data, |v| -v);
    }
}
