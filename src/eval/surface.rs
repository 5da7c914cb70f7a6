//! Surface distances between two binary masks in millimetres: the 95th-percentile Hausdorff
//! distance (HD95) and the normalised surface Dice (NSD) at a tolerance.
//!
//! Definitions (docs/evaluation.md): a mask's surface is its foreground voxels with a face
//! neighbour in the background, voxels outside the volume counting as background (scipy's
//! `mask & ~binary_erosion(mask)`). The distance of a surface voxel to the other mask is the
//! Euclidean distance in mm, with the voxel spacing, to the nearest voxel of the other surface.
//! HD95 is the larger of the two directed 95th percentiles (linear interpolation, numpy's default),
//! as MONAI's `compute_hausdorff_distance(percentile=95)`; NSD is the fraction of both surfaces
//! within the tolerance of the other (Nikolov et al. 2021, on voxels instead of surfels).

use rayon::prelude::*;

use crate::device::cpu::reduce::percentile;

/// The voxels of `mask` (D, H, W row-major) with a face neighbour outside it.
pub fn surface(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [d, h, w] = shape;
    let mut out = vec![false; mask.len()];
    out.par_chunks_mut(h * w).enumerate().for_each(|(z, plane)| {
        for y in 0..h {
            for x in 0..w {
                let at = (z * h + y) * w + x;
                if !mask[at] {
                    continue;
                }
                let inside = |dz: isize, dy: isize, dx: isize| {
                    let (zz, yy, xx) = (z as isize + dz, y as isize + dy, x as isize + dx);
                    zz >= 0
                        && yy >= 0
                        && xx >= 0
                        && (zz as usize) < d
                        && (yy as usize) < h
                        && (xx as usize) < w
                        && mask[((zz as usize) * h + yy as usize) * w + xx as usize]
                };
                let interior = inside(-1, 0, 0)
                    && inside(1, 0, 0)
                    && inside(0, -1, 0)
                    && inside(0, 1, 0)
                    && inside(0, 0, -1)
                    && inside(0, 0, 1);
                plane[y * w + x] = !interior;
            }
        }
    });
    out
}

/// The squared Euclidean distance (mm^2) of every voxel to the nearest `true` voxel of `sites`,
/// infinite where `sites` is empty: Felzenszwalb and Huttenlocher's separable lower envelope of
/// parabolas, one pass per axis, exact for any spacing.
pub fn squared_distance(sites: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let [d, h, w] = shape;
    let mut f: Vec<f64> = sites.iter().map(|&s| if s { 0.0 } else { f64::INFINITY }).collect();
    // Along x: rows are contiguous.
    f.par_chunks_mut(w).for_each(|row| envelope_in_place(row, spacing[2]));
    // Along y and z: gather each line, transform it, scatter it back.
    let along = |f: &mut Vec<f64>, axis: usize| {
        let (n, stride) = if axis == 1 { (h, w) } else { (d, h * w) };
        let lines: Vec<usize> = (0..f.len()).filter(|&i| (i / stride) % n == 0).collect();
        let done: Vec<Vec<f64>> = lines
            .par_iter()
            .map(|&start| {
                let mut line: Vec<f64> = (0..n).map(|k| f[start + k * stride]).collect();
                envelope_in_place(&mut line, spacing[axis]);
                line
            })
            .collect();
        for (&start, line) in lines.iter().zip(done) {
            for (k, v) in line.into_iter().enumerate() {
                f[start + k * stride] = v;
            }
        }
    };
    along(&mut f, 1);
    along(&mut f, 0);
    f
}

/// One axis of the transform: `g[i] = min_q (s (i - q))^2 + f[q]` over the finite `f[q]`.
fn envelope_in_place(f: &mut [f64], s: f64) {
    let n = f.len();
    let sites: Vec<usize> = (0..n).filter(|&q| f[q].is_finite()).collect();
    if sites.is_empty() {
        return;
    }
    let x = |q: usize| q as f64 * s;
    // Where parabola q overtakes parabola p (p < q).
    let cross =
        |p: usize, q: usize, f: &[f64]| ((f[q] + x(q) * x(q)) - (f[p] + x(p) * x(p))) / (2.0 * (x(q) - x(p)));
    let mut hull: Vec<usize> = Vec::with_capacity(sites.len());
    let mut from: Vec<f64> = Vec::with_capacity(sites.len());
    for &q in &sites {
        while let Some(&p) = hull.last() {
            let z = cross(p, q, f);
            if z <= *from.last().expect("one bound per hull entry") {
                hull.pop();
                from.pop();
            } else {
                hull.push(q);
                from.push(z);
                break;
            }
        }
        if hull.is_empty() {
            hull.push(q);
            from.push(f64::NEG_INFINITY);
        }
    }
    let mut out = vec![0.0; n];
    let mut k = 0;
    for (i, o) in out.iter_mut().enumerate() {
        while k + 1 < hull.len() && from[k + 1] < x(i) {
            k += 1;
        }
        let q = hull[k];
        *o = (x(i) - x(q)).powi(2) + f[q];
    }
    f.copy_from_slice(&out);
}

/// HD95 and NSD of one pair of masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SurfaceScores {
    /// None when either mask is empty (no distance exists).
    pub hd95: Option<f64>,
    /// None when both masks are empty; 0 when only one is.
    pub nsd: Option<f64>,
}

/// The surface scores of `pred` against `reference`, at `tolerance` mm for NSD.
pub fn scores(
    pred: &[bool],
    reference: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    tolerance: f64,
) -> SurfaceScores {
    let (sp, sr) = (surface(pred, shape), surface(reference, shape));
    let (np, nr) = (sp.iter().filter(|&&b| b).count(), sr.iter().filter(|&&b| b).count());
    match (np, nr) {
        (0, 0) => return SurfaceScores { hd95: None, nsd: None },
        (0, _) | (_, 0) => return SurfaceScores { hd95: None, nsd: Some(0.0) },
        _ => {}
    }
    // Both transforms over the bounding box of both surfaces only: every site lies inside it, so
    // the distances inside it are exact, and a small structure in a large volume costs little.
    let (lo, hi) = bounding_box(&sp, &sr, shape);
    let boxed: [usize; 3] = std::array::from_fn(|a| hi[a] - lo[a]);
    let crop = |m: &[bool]| {
        let mut out = Vec::with_capacity(boxed.iter().product());
        for z in lo[0]..hi[0] {
            for y in lo[1]..hi[1] {
                let at = (z * shape[1] + y) * shape[2];
                out.extend_from_slice(&m[at + lo[2]..at + hi[2]]);
            }
        }
        out
    };
    let (sp, sr) = (crop(&sp), crop(&sr));
    let to_ref = squared_distance(&sr, boxed, spacing);
    let to_pred = squared_distance(&sp, boxed, spacing);
    let directed = |from: &[bool], to: &[f64]| -> Vec<f64> {
        from.iter().zip(to).filter(|(s, _)| **s).map(|(_, d2)| d2.sqrt()).collect()
    };
    let (mut a, mut b) = (directed(&sp, &to_ref), directed(&sr, &to_pred));
    let within = a.iter().chain(&b).filter(|&&d| d <= tolerance).count();
    let nsd = within as f64 / (a.len() + b.len()) as f64;
    let hd95 = percentile(&mut a, 95.0).max(percentile(&mut b, 95.0));
    SurfaceScores { hd95: Some(hd95), nsd: Some(nsd) }
}

/// The half-open box holding every `true` voxel of both masks (at least one is non-empty).
fn bounding_box(a: &[bool], b: &[bool], shape: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let (mut lo, mut hi) = (shape, [0; 3]);
    let [_, h, w] = shape;
    for (i, _) in a.iter().zip(b).enumerate().filter(|(_, (x, y))| **x || **y) {
        let p = [i / (h * w), (i / w) % h, i % w];
        for k in 0..3 {
            lo[k] = lo[k].min(p[k]);
            hi[k] = hi[k].max(p[k] + 1);
        }
    }
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(shape: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Vec<bool> {
        let [_, h, w] = shape;
        (0..shape.iter().product::<usize>())
            .map(|i| {
                let p = [i / (h * w), (i / w) % h, i % w];
                (0..3).all(|a| p[a] >= lo[a] && p[a] < hi[a])
            })
            .collect()
    }

    /// The transform against brute force over every site, with anisotropic spacing.
    #[test]
    fn distance_transform_is_exact() {
        let shape = [5, 6, 7];
        let spacing = [2.5, 0.7, 1.0];
        let n = 5 * 6 * 7;
        let sites: Vec<bool> = (0..n).map(|i| (i * 37 + 11) % 23 == 0).collect();
        let got = squared_distance(&sites, shape, spacing);
        let pos = |i: usize| [i / 42, (i / 7) % 6, i % 7];
        for (i, &d2) in got.iter().enumerate() {
            let best = (0..n)
                .filter(|&j| sites[j])
                .map(|j| {
                    let (a, b) = (pos(i), pos(j));
                    (0..3).map(|k| ((a[k] as f64 - b[k] as f64) * spacing[k]).powi(2)).sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min);
            assert!((d2 - best).abs() < 1e-9, "voxel {i}: {d2} vs {best}");
        }
        assert!(squared_distance(&vec![false; n], shape, spacing).iter().all(|d| d.is_infinite()));
    }

    #[test]
    fn surface_of_a_cube_is_its_shell() {
        let shape = [6, 6, 6];
        let s = surface(&cube(shape, [1; 3], [5; 3]), shape);
        // A 4^3 cube: 64 voxels, 2^3 interior.
        assert_eq!(s.iter().filter(|&&b| b).count(), 64 - 8);
        // Touching the border: the border face is surface too.
        let s = surface(&cube(shape, [0; 3], [6; 3]), shape);
        assert_eq!(s.iter().filter(|&&b| b).count(), 216 - 64);
    }

    /// A cube against the same cube shifted by one voxel along z, at 3 mm slices: every surface
    /// voxel of one lies within one slice of the other's surface, and the two z faces are 3 mm away.
    #[test]
    fn shifted_cube_with_anisotropic_spacing() {
        let shape = [10, 8, 8];
        let a = cube(shape, [2, 2, 2], [6, 6, 6]);
        let b = cube(shape, [3, 2, 2], [7, 6, 6]);
        let s = scores(&a, &b, shape, [3.0, 1.0, 1.0], 1.0);
        // a's surface: 56 voxels. The 16 of its z = 2 face are 3 mm from b (which starts at z = 3);
        // the 4 in the middle of its z = 5 face lie inside b, 1 mm (one row in y or x) from b's
        // surface; the other 36 lie on b's surface. Likewise from b.
        assert_eq!(s.nsd, Some((56.0 - 16.0) * 2.0 / 112.0));
        // 16/56 = 28.6% of each direction is at 3 mm, so the 95th percentile is 3 mm.
        assert_eq!(s.hd95, Some(3.0));
        let s = scores(&a, &b, shape, [3.0, 1.0, 1.0], 3.0);
        assert_eq!(s.nsd, Some(1.0));
    }

    #[test]
    fn empty_masks() {
        let shape = [4, 4, 4];
        let none = vec![false; 64];
        let some = cube(shape, [1; 3], [3; 3]);
        assert_eq!(scores(&none, &none, shape, [1.0; 3], 1.0), SurfaceScores { hd95: None, nsd: None });
        assert_eq!(scores(&some, &none, shape, [1.0; 3], 1.0), SurfaceScores { hd95: None, nsd: Some(0.0) });
        assert_eq!(
            scores(&some, &some, shape, [1.0; 3], 0.0),
            SurfaceScores { hd95: Some(0.0), nsd: Some(1.0) }
        );
    }

    #[test]
    fn percentile_interpolates_as_numpy() {
        // np.percentile([1, 2, 3, 4, 10], 95) = 8.8
        assert!((percentile(&mut [10.0, 1.0, 3.0, 2.0, 4.0], 95.0) - 8.8).abs() < 1e-12);
        assert_eq!(percentile(&mut [7.0], 95.0), 7.0);
    }
}
