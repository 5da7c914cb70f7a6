//! The spatial half of nnU-Net's augmentation (batchgeneratorsv2 `SpatialTransform` and
//! `MirrorTransform`): the enlarged source box, one rotation + scaling resample per patch, the
//! centre crop used when neither fires, and mirroring.
//!
//! Coordinates are array axes (0, 1, 2) = (D, H, W). Vector targets follow the seed's layout
//! (reference-spec 1.8, `RandomFlipWithNormals`): n = (nx, ny, nz) in channels (0, 1, 2), so channel
//! k holds the component along array axis 2 - k.

use anyhow::{Result, ensure};
use rayon::prelude::*;

use crate::data::{Patch, PatchTarget, TargetKind};

pub type Mat3 = [[f64; 3]; 3];

/// nnU-Net's trainer passes a fixed scale range (0.85, 1.25) to `get_patch_size`, not the
/// (0.7, 1.4) that `SpatialTransform` samples (reference-spec 4.5, step 0); kept so source boxes
/// match nnU-Net's (128^3 -> 205^3 at +-30 degrees). Zoomed-out patches can thus reach
/// past the box and read zeros there, as in nnU-Net.
pub const INITIAL_PATCH_MIN_SCALE: f64 = 0.85;

/// Source coordinates within this many voxels of a grid point are snapped to it, so maps that land
/// on the grid (90-degree rotations, unit scale) copy voxels exactly instead of blending in 1e-16 of
/// a neighbour.
const SNAP: f64 = 1e-6;

/// The vector channel holding the component along array axis `axis`.
pub fn vector_channel(axis: usize) -> usize {
    2 - axis
}

fn rot_x(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
}

fn rot_y(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]
}

fn rot_z(a: f64) -> Mat3 {
    let (s, c) = a.sin_cos();
    [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
}

fn mat_mul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut m = [[0.0; 3]; 3];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    m
}

/// nnU-Net's initial patch size (`get_patch_size`): the patch-size vector rotated about each axis
/// alone by the largest angle (capped at 90 degrees, row vector times matrix as batchgenerators
/// does), the component-wise maximum of their absolute values and the patch itself, divided by
/// `min_scale` and truncated.
pub fn initial_patch_size(patch_size: [usize; 3], max_rotation_degrees: f64, min_scale: f64) -> [usize; 3] {
    let angle = max_rotation_degrees.abs().to_radians().min(std::f64::consts::FRAC_PI_2);
    let p = patch_size.map(|v| v as f64);
    let mut extent = p;
    for r in [rot_x(angle), rot_y(angle), rot_z(angle)] {
        for (j, e) in extent.iter_mut().enumerate() {
            let v: f64 = (0..3).map(|i| p[i] * r[i][j]).sum();
            *e = e.max(v.abs());
        }
    }
    extent.map(|e| (e / min_scale) as usize)
}

/// One sampled spatial transform.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpatialParams {
    /// Radians. `angles[a]` rotates within the plane of the two other axes, leaving array axis `a`
    /// fixed (batchgeneratorsv2's Rx, Ry, Rz act on (D, H, W) coordinates in this order).
    pub angles: [f64; 3],
    /// One zoom factor for all axes; > 1 samples a larger region (zooms out).
    pub scale: f64,
}

impl SpatialParams {
    /// R = Rz Ry Rx. Content at source offset p (from the centre) lands at output offset R p / scale,
    /// so vectors turn by R.
    pub fn rotation(&self) -> Mat3 {
        let [a, b, c] = self.angles;
        mat_mul(&rot_z(c), &mat_mul(&rot_y(b), &rot_x(a)))
    }
}

/// Where output voxel o samples the source: `a o + offset`, in source voxels.
struct Affine {
    a: Mat3,
    offset: [f64; 3],
}

impl Affine {
    /// batchgeneratorsv2: the centred output grid g (row vectors) times R S, shifted to the source
    /// centre; with align_corners=False that is source voxel `(R S)^T g + (S - 1) / 2`.
    fn new(params: &SpatialParams, src: [usize; 3], out: [usize; 3]) -> Affine {
        let r = params.rotation();
        let mut a = [[0.0; 3]; 3];
        for (i, row) in a.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = r[j][i] * params.scale;
            }
        }
        let offset = std::array::from_fn(|i| {
            (src[i] as f64 - 1.0) / 2.0 - (0..3).map(|j| a[i][j] * (out[j] as f64 - 1.0) / 2.0).sum::<f64>()
        });
        Affine { a, offset }
    }
}

/// One axis of a source position: the lower voxel and the weights of it and of the next one,
/// snapped to the grid within [`SNAP`].
#[inline]
fn axis_weights(p: f64) -> (i64, [f32; 2]) {
    // floor by truncation: f64::floor is a libm call on baseline x86-64 (no SSE4.1 round).
    let mut i0 = p as i64;
    if (i0 as f64) > p {
        i0 -= 1;
    }
    let mut t = p - i0 as f64;
    if t < SNAP {
        t = 0.0;
    } else if t > 1.0 - SNAP {
        i0 += 1;
        t = 0.0;
    }
    (i0, [1.0 - t as f32, t as f32])
}

/// The trilinear blend of 8 corner values (corner k = 4 dz + 2 dy + dx), the one formula for
/// images and for every label's mask, so a label map and a one-hot image of it agree exactly.
#[inline]
fn blend(c: &[f32; 8], w: &[[f32; 2]; 3]) -> f32 {
    let x = |k: usize| c[k] * w[2][0] + c[k + 1] * w[2][1];
    let y = |k: usize| x(k) * w[1][0] + x(k + 2) * w[1][1];
    y(0) * w[0][0] + y(4) * w[0][1]
}

/// How an array is resampled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    Linear,
    /// batchgeneratorsv2 (bg_style_seg_sampling off): every label's mask sampled trilinearly, the
    /// voxel takes the label above 0.7, else the argmax (first, i.e. smallest, label on ties); a
    /// voxel that sees no source voxel gets the smallest label present. Masks at one voxel sum to
    /// at most 1, so a label above 0.7 is the argmax and the argmax decides alone.
    Labels,
}

/// Output tile (D, H, W) walked as a unit, so the source region it reads stays in cache.
const TILE: [usize; 3] = [4, 16, 32];

/// Samples one array at source positions.
struct Sampler<'a> {
    src: &'a [f32],
    size: [usize; 3],
    strides: [usize; 3],
    /// Offset of corner k = 4 dz + 2 dy + dx from the lower corner.
    corner_offset: [usize; 8],
    rule: Rule,
    /// Per channel, the label of voxels that see no source voxel (the smallest present).
    fallback: Vec<f32>,
}

impl Sampler<'_> {
    fn new(src: &[f32], size: [usize; 3], channels: usize, rule: Rule) -> Sampler<'_> {
        let strides = [size[1] * size[2] * channels, size[2] * channels, channels];
        let corner_offset = std::array::from_fn(|k| {
            (k >> 2) * strides[0] + ((k >> 1) & 1) * strides[1] + (k & 1) * strides[2]
        });
        let fallback = match rule {
            Rule::Linear => Vec::new(),
            Rule::Labels => (0..channels)
                .map(|c| src.iter().skip(c).step_by(channels).copied().fold(f32::INFINITY, f32::min))
                .map(|m| if m.is_finite() { m } else { 0.0 })
                .collect(),
        };
        Sampler { src, size, strides, corner_offset, rule, fallback }
    }

    /// Writes the `channels` values at source position `p` into `voxel`.
    #[inline]
    fn sample(&self, p: [f64; 3], voxel: &mut [f32]) {
        let axes = p.map(axis_weights);
        let w = axes.map(|(_, w)| w);
        let (src, size, strides) = (self.src, self.size, self.strides);
        if (0..3).all(|i| axes[i].0 >= 0 && axes[i].0 + 1 < size[i] as i64) {
            let base: usize = (0..3).map(|i| axes[i].0 as usize * strides[i]).sum();
            for (c, o) in voxel.iter_mut().enumerate() {
                let values = self.corner_offset.map(|k| src[base + k + c]);
                *o = match self.rule {
                    Rule::Linear => blend(&values, &w),
                    Rule::Labels if values.iter().all(|&l| l == values[0]) => values[0],
                    Rule::Labels => label_argmax(&values, &[true; 8], &w, self.fallback[c]),
                };
            }
            return;
        }
        // Near or past the border: corners outside read 0 and belong to no label.
        let corners: [Option<usize>; 8] = std::array::from_fn(|k| {
            let d = [k >> 2, (k >> 1) & 1, k & 1];
            let at: [i64; 3] = std::array::from_fn(|i| axes[i].0 + d[i] as i64);
            (0..3)
                .all(|i| at[i] >= 0 && at[i] < size[i] as i64)
                .then(|| (0..3).map(|i| at[i] as usize * strides[i]).sum())
        });
        let valid = corners.map(|at| at.is_some());
        for (c, o) in voxel.iter_mut().enumerate() {
            let values = corners.map(|at| at.map_or(0.0, |at| src[at + c]));
            *o = match self.rule {
                Rule::Linear => blend(&values, &w),
                Rule::Labels => label_argmax(&values, &valid, &w, self.fallback[c]),
            };
        }
    }
}

/// One pass over the output grid in [`TILE`]s, rayon over slabs of output z slices; source
/// positions advance by the affine's x column along each row. Corners outside the source read 0
/// (grid_sample's zero padding) and belong to no label.
fn resample(
    src: &[f32],
    src_size: [usize; 3],
    channels: usize,
    out_size: [usize; 3],
    affine: &Affine,
    rule: Rule,
) -> Vec<f32> {
    let [_, oh, ow] = out_size;
    let row_len = ow * channels;
    let slice_len = oh * row_len;
    let mut out = vec![0.0f32; out_size[0] * slice_len];
    if slice_len == 0 {
        return out;
    }
    let sampler = Sampler::new(src, src_size, channels, rule);
    let a = &affine.a;
    let step = [a[0][2], a[1][2], a[2][2]];
    out.par_chunks_mut(TILE[0] * slice_len).enumerate().for_each(|(zb, slab)| {
        for y0 in (0..oh).step_by(TILE[1]) {
            for x0 in (0..ow).step_by(TILE[2]) {
                let x1 = (x0 + TILE[2]).min(ow);
                for (dz, plane) in slab.chunks_exact_mut(slice_len).enumerate() {
                    let z = (zb * TILE[0] + dz) as f64;
                    for y in y0..(y0 + TILE[1]).min(oh) {
                        let row = &mut plane[y * row_len + x0 * channels..y * row_len + x1 * channels];
                        let mut p: [f64; 3] = std::array::from_fn(|i| {
                            affine.offset[i] + a[i][0] * z + a[i][1] * y as f64 + a[i][2] * x0 as f64
                        });
                        for voxel in row.chunks_exact_mut(channels) {
                            sampler.sample(p, voxel);
                            p = std::array::from_fn(|i| p[i] + step[i]);
                        }
                    }
                }
            }
        }
    });
    out
}

/// The label with the largest blended mask among the valid corners' labels (smallest on ties), or
/// `fallback` when every mask is 0.
fn label_argmax(labels: &[f32; 8], valid: &[bool; 8], w: &[[f32; 2]; 3], fallback: f32) -> f32 {
    let mut best = (fallback, 0.0f32);
    for k in (0..8).filter(|&k| valid[k]) {
        let l = labels[k];
        if (0..k).any(|j| valid[j] && labels[j] == l) {
            continue;
        }
        let mask = std::array::from_fn(|j| if valid[j] && labels[j] == l { 1.0 } else { 0.0 });
        let mass = blend(&mask, w);
        if mass > best.1 || (mass > 0.0 && mass == best.1 && l < best.0) {
            best = (l, mass);
        }
    }
    best.0
}

/// The centre crop batchgeneratorsv2 takes when no transform fires: integer centre floor(S / 2),
/// start `floor(S / 2) - s / 2`.
fn centre_crop(src: &[f32], src_size: [usize; 3], channels: usize, out_size: [usize; 3]) -> Vec<f32> {
    if src_size == out_size {
        return src.to_vec();
    }
    let start: [usize; 3] = std::array::from_fn(|i| src_size[i] / 2 - out_size[i] / 2);
    let row = out_size[2] * channels;
    let mut out = vec![0.0f32; out_size.iter().product::<usize>() * channels];
    if row == 0 {
        return out;
    }
    out.par_chunks_mut(out_size[1] * row).enumerate().for_each(|(z, slice)| {
        for (y, dst) in slice.chunks_exact_mut(row).enumerate() {
            let at = (((start[0] + z) * src_size[1] + start[1] + y) * src_size[2] + start[2]) * channels;
            dst.copy_from_slice(&src[at..at + row]);
        }
    });
    out
}

/// Rotates every voxel's vector (channels in the seed's (x, y, z) order) by `r`.
fn rotate_vectors(data: &mut [f32], r: &Mat3) {
    // r in channel order: channel k is axis 2 - k.
    let m: [[f32; 3]; 3] =
        std::array::from_fn(|i| std::array::from_fn(|j| r[vector_channel(i)][vector_channel(j)] as f32));
    data.par_chunks_mut(3 * 4096).for_each(|chunk| {
        for v in chunk.chunks_exact_mut(3) {
            let u = [v[0], v[1], v[2]];
            for (i, o) in v.iter_mut().enumerate() {
                *o = m[i][0] * u[0] + m[i][1] * u[1] + m[i][2] * u[2];
            }
        }
    });
}

/// The patch of `patch.size` (the source box) mapped onto `out_size`: resampled by `params`, or
/// centre-cropped when `params` is None. Images, values and vectors are trilinear, labels follow
/// the label rule, vectors are also turned by the rotation.
pub fn spatial_transform(
    patch: &Patch,
    out_size: [usize; 3],
    params: Option<&SpatialParams>,
) -> Result<Patch> {
    let src_size = patch.size;
    let apply = |data: &[f32], channels: usize, kind: Option<TargetKind>| -> Vec<f32> {
        let Some(params) = params else {
            return centre_crop(data, src_size, channels, out_size);
        };
        let affine = Affine::new(params, src_size, out_size);
        let rule = if kind == Some(TargetKind::Labels) { Rule::Labels } else { Rule::Linear };
        let mut out = resample(data, src_size, channels, out_size, &affine, rule);
        if kind == Some(TargetKind::Vectors) {
            rotate_vectors(&mut out, &params.rotation());
        }
        out
    };
    if params.is_none() {
        ensure!(
            (0..3).all(|i| src_size[i] >= out_size[i]),
            "augmentation: patch of size {src_size:?} is smaller than the output patch {out_size:?}"
        );
    }
    Ok(Patch {
        size: out_size,
        input: apply(&patch.input, patch.in_channels, None),
        in_channels: patch.in_channels,
        targets: patch
            .targets
            .iter()
            .map(|t| PatchTarget {
                data: apply(&t.data, t.channels, Some(t.kind)),
                channels: t.channels,
                kind: t.kind,
            })
            .collect(),
    })
}

/// Reverses channels-last (D, H, W, C) `data` along the `axes` marked true, in place and in
/// parallel (the loader's mirroring and inference's mirroring TTA).
pub fn flip_in_place(data: &mut [f32], [d, h, w]: [usize; 3], channels: usize, axes: [bool; 3]) {
    let row = w * channels;
    let slice = h * row;
    if slice == 0 {
        return;
    }
    if axes[0] {
        let (lo, rest) = data.split_at_mut(d / 2 * slice);
        let hi = &mut rest[d % 2 * slice..];
        lo.par_chunks_mut(slice).zip(hi.par_chunks_mut(slice).rev()).for_each(|(a, b)| a.swap_with_slice(b));
    }
    if axes[1] || axes[2] {
        data.par_chunks_mut(slice).for_each(|plane| {
            if axes[1] {
                let (lo, rest) = plane.split_at_mut(h / 2 * row);
                let hi = &mut rest[h % 2 * row..];
                lo.chunks_exact_mut(row)
                    .zip(hi.chunks_exact_mut(row).rev())
                    .for_each(|(a, b)| a.swap_with_slice(b));
            }
            if axes[2] {
                for r in plane.chunks_exact_mut(row) {
                    r.reverse();
                    r.chunks_exact_mut(channels).for_each(<[f32]>::reverse);
                }
            }
        });
    }
}

/// Flips the input and every target along `axes` (true = flipped); a vector target also has its
/// component along each flipped axis negated.
pub fn mirror(patch: &mut Patch, axes: [bool; 3]) {
    if !axes.contains(&true) {
        return;
    }
    flip_in_place(&mut patch.input, patch.size, patch.in_channels, axes);
    for t in &mut patch.targets {
        flip_in_place(&mut t.data, patch.size, t.channels, axes);
        if t.kind == TargetKind::Vectors {
            let negate: [bool; 3] = std::array::from_fn(|c| axes[vector_channel(c)]);
            t.data.par_chunks_mut(3 * 4096).for_each(|chunk| {
                for v in chunk.chunks_exact_mut(3) {
                    for (x, &n) in v.iter_mut().zip(&negate) {
                        if n {
                            *x = -*x;
                        }
                    }
                }
            });
        }
    }
}
