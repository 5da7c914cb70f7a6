//! Average pooling with kernel = stride over channels-last (N, D, H, W, C) volumes, no padding,
//! rounding down as PyTorch's AvgPool3d with ceil_mode=False: trailing voxels that do not fill a
//! window are dropped (and get zero gradient).

use super::Real;
use super::elementwise::for_units;

/// Output dims of pooling an (N, D, H, W, C) volume with windows `k` (floor division per axis).
pub fn avg_pool_out_dims(dims: [usize; 5], k: [usize; 3]) -> [usize; 5] {
    assert!(k.iter().all(|&k| k > 0), "avg pool: zero window {k:?}");
    [dims[0], dims[1] / k[0], dims[2] / k[1], dims[3] / k[2], dims[4]]
}

/// `y` = the mean of each non-overlapping `k` window of `x` (dims `dims`).
pub fn avg_pool_forward<T: Real>(y: &mut [T], x: &[T], dims: [usize; 5], k: [usize; 3]) {
    let [_, d, h, w, c] = dims;
    let [_, od, oh, ow, _] = avg_pool_out_dims(dims, k);
    assert_eq!(x.len(), dims.iter().product::<usize>(), "avg pool: input length");
    assert_eq!(y.len(), dims[0] * od * oh * ow * c, "avg pool: output length");
    let inv = T::c(1.0 / (k[0] * k[1] * k[2]) as f64);
    // One unit is an output plane (one sample, one output depth).
    for_units(y, oh * ow * c, |first, run| {
        for (p, plane) in run.chunks_exact_mut(oh * ow * c).enumerate() {
            let (n, z) = ((first + p) / od, (first + p) % od);
            for (q, out) in plane.chunks_exact_mut(c).enumerate() {
                let (yy, xx) = (q / ow, q % ow);
                out.fill(T::zero());
                for i in 0..k[0] {
                    for j in 0..k[1] {
                        let row = ((n * d + z * k[0] + i) * h + yy * k[1] + j) * w + xx * k[2];
                        for v in x[row * c..(row + k[2]) * c].chunks_exact(c) {
                            out.iter_mut().zip(v).for_each(|(o, &v)| *o = *o + v);
                        }
                    }
                }
                out.iter_mut().for_each(|o| *o = *o * inv);
            }
        }
    });
}

/// `gx` of [`avg_pool_forward`]: each window's gradient spread evenly, zero on dropped voxels.
pub fn avg_pool_backward<T: Real>(gx: &mut [T], gy: &[T], dims: [usize; 5], k: [usize; 3]) {
    let [_, d, h, w, c] = dims;
    let [_, od, oh, ow, _] = avg_pool_out_dims(dims, k);
    assert_eq!(gx.len(), dims.iter().product::<usize>(), "avg pool backward: gx length");
    assert_eq!(gy.len(), dims[0] * od * oh * ow * c, "avg pool backward: gy length");
    let inv = T::c(1.0 / (k[0] * k[1] * k[2]) as f64);
    // One unit is an input plane (one sample, one input depth).
    for_units(gx, h * w * c, |first, run| {
        for (p, plane) in run.chunks_exact_mut(h * w * c).enumerate() {
            let (n, z) = ((first + p) / d, (first + p) % d);
            let z = z / k[0];
            for (q, out) in plane.chunks_exact_mut(c).enumerate() {
                let (yy, xx) = (q / w / k[1], q % w / k[2]);
                if z < od && yy < oh && xx < ow {
                    let g = &gy[(((n * od + z) * oh + yy) * ow + xx) * c..][..c];
                    out.iter_mut().zip(g).for_each(|(o, &g)| *o = g * inv);
                } else {
                    out.fill(T::zero());
                }
            }
        }
    });
}
