//! nnU-Net augmentation (data::augment): spatial transforms against hand-rolled index maps and the
//! label rule, vector handling, mirroring, probabilities, determinism and the intensity transforms
//! against hand-computed values.

use rand::{SeedableRng, rngs::StdRng};
use std::f64::consts::FRAC_PI_2;
use unet3d::config::Augmentation;
use unet3d::data::augment::{
    Augmenter, INITIAL_PATCH_MIN_SCALE, SpatialParams, initial_patch_size, intensity, mirror,
    spatial_transform,
};
use unet3d::data::{Patch, PatchTarget, TargetKind};

fn index(size: [usize; 3], z: usize, y: usize, x: usize) -> usize {
    (z * size[1] + y) * size[2] + x
}

/// A deterministic pseudo-random value in [0, 1) for voxel `i` (no rng dependency).
fn hash01(i: usize, salt: usize) -> f32 {
    let mut h = (i as u64 ^ (salt as u64).wrapping_mul(0x9E37_79B9)).wrapping_mul(0x2545_F491_4F6C_DD1D);
    h ^= h >> 29;
    (h % 10_000) as f32 / 10_000.0
}

/// Labels in 0..4 made of boxes, so there are constant regions and borders.
fn blob_labels(size: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0.0; size.iter().product()];
    for z in 0..size[0] {
        for y in 0..size[1] {
            for x in 0..size[2] {
                let l = if z < size[0] / 2 && y < size[1] / 2 {
                    1.0
                } else if x > size[2] / 3 && y > size[1] / 3 {
                    2.0
                } else if (z + x) % 7 == 0 {
                    3.0
                } else {
                    0.0
                };
                out[index(size, z, y, x)] = l;
            }
        }
    }
    out
}

/// A unit normal per voxel, varying smoothly, in the seed's (x, y, z) channel order.
fn normals(size: [usize; 3]) -> Vec<f32> {
    let n: usize = size.iter().product();
    (0..n)
        .flat_map(|i| {
            let v = [1.0 + hash01(i, 1), hash01(i, 2) - 0.5, 0.3 + hash01(i, 3)];
            let len = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            v.map(|c| c / len)
        })
        .collect()
}

/// One image channel + labels + values + normals.
fn test_patch(size: [usize; 3]) -> Patch {
    let n: usize = size.iter().product();
    Patch {
        size,
        input: (0..n).map(|i| hash01(i, 7)).collect(),
        in_channels: 1,
        targets: vec![
            PatchTarget { data: blob_labels(size), channels: 1, kind: TargetKind::Labels },
            PatchTarget {
                data: (0..n).map(|i| 5.0 * hash01(i, 9)).collect(),
                channels: 1,
                kind: TargetKind::Values,
            },
            PatchTarget { data: normals(size), channels: 3, kind: TargetKind::Vectors },
        ],
    }
}

fn no_augmentation() -> Augmentation {
    Augmentation {
        enabled: true,
        p_rotation: 0.0,
        p_scaling: 0.0,
        p_noise: 0.0,
        p_blur: 0.0,
        p_brightness: 0.0,
        p_contrast: 0.0,
        p_low_resolution: 0.0,
        p_gamma: 0.0,
        p_gamma_inverted: 0.0,
        mirror_axes: vec![],
        ..Augmentation::default()
    }
}

/// Every transform fires (mirroring stays at nnU-Net's 0.5 per axis).
fn full_augmentation() -> Augmentation {
    Augmentation {
        p_rotation: 1.0,
        p_scaling: 1.0,
        p_noise: 1.0,
        p_blur: 1.0,
        p_brightness: 1.0,
        p_contrast: 1.0,
        p_low_resolution: 1.0,
        p_gamma: 1.0,
        p_gamma_inverted: 1.0,
        ..Augmentation::default()
    }
}

type Mat = [[f64; 3]; 3];

fn mul(a: &Mat, b: &Mat) -> Mat {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

/// Rz Ry Rx in (D, H, W) coordinates, written out independently of the library.
fn rotation(angles: [f64; 3]) -> Mat {
    let [(sa, ca), (sb, cb), (sc, cc)] = angles.map(f64::sin_cos);
    let rx = [[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]];
    let ry = [[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]];
    let rz = [[cc, -sc, 0.0], [sc, cc, 0.0], [0.0, 0.0, 1.0]];
    mul(&rz, &mul(&ry, &rx))
}

#[test]
fn source_size_follows_nnunet_get_patch_size() {
    // reference-spec 4.5's worked examples at +-30 degrees.
    assert_eq!(initial_patch_size([40, 56, 40], 30.0, 0.85), [73, 80, 64]);
    assert_eq!(initial_patch_size([128, 128, 128], 30.0, 0.85), [205, 205, 205]);
    assert_eq!(initial_patch_size([64, 192, 192], 30.0, 0.85), [178, 308, 233]);
    // By hand: no rotation leaves p / 0.85; angles cap at 90 degrees (a 90-degree turn of a cube
    // keeps its extent).
    assert_eq!(initial_patch_size([128, 100, 64], 0.0, 0.85), [150, 117, 75]);
    assert_eq!(initial_patch_size([32, 32, 32], 120.0, 1.0), [32, 32, 32]);
    assert_eq!(INITIAL_PATCH_MIN_SCALE, 0.85);

    let cube = [128, 128, 128];
    assert_eq!(Augmenter::new(&Augmentation::default(), cube).source_size(), [205, 205, 205]);
    let scaling_only = Augmentation { p_rotation: 0.0, ..Augmentation::default() };
    assert_eq!(Augmenter::new(&scaling_only, cube).source_size(), [150, 150, 150]);
    let off = Augmentation { enabled: false, ..Augmentation::default() };
    assert_eq!(Augmenter::new(&off, cube).source_size(), cube);
    assert_eq!(Augmenter::new(&no_augmentation(), cube).source_size(), cube);
}

/// Checks a 90-degree rotation against a hand-rolled index map `src_of(out) -> source voxel` and
/// the vector map in (D, H, W) axis order.
fn check_permutation(
    size: [usize; 3],
    angles: [f64; 3],
    src_of: impl Fn(usize, usize, usize) -> [usize; 3],
    turn: impl Fn([f32; 3]) -> [f32; 3],
) {
    let patch = test_patch(size);
    let out = spatial_transform(&patch, size, Some(&SpatialParams { angles, scale: 1.0 })).unwrap();
    for z in 0..size[0] {
        for y in 0..size[1] {
            for x in 0..size[2] {
                let [sz, sy, sx] = src_of(z, y, x);
                let (o, s) = (index(size, z, y, x), index(size, sz, sy, sx));
                assert_eq!(out.input[o], patch.input[s], "image at {z} {y} {x}");
                assert_eq!(out.targets[0].data[o], patch.targets[0].data[s], "labels at {z} {y} {x}");
                assert_eq!(out.targets[1].data[o], patch.targets[1].data[s], "values at {z} {y} {x}");
                let v = &patch.targets[2].data[3 * s..3 * s + 3];
                // channels (x, y, z) -> axis order (z, y, x) and back
                let t = turn([v[2], v[1], v[0]]);
                assert_eq!(
                    &out.targets[2].data[3 * o..3 * o + 3],
                    &[t[2], t[1], t[0]],
                    "normal at {z} {y} {x}"
                );
            }
        }
    }
}

#[test]
fn ninety_degree_rotations_are_index_permutations() {
    // About axis 0 (Rx, +90): content at (z, y, x) moves to (z, -x, y) around the centre.
    check_permutation([4, 6, 6], [FRAC_PI_2, 0.0, 0.0], |z, y, x| [z, x, 5 - y], |a| [a[0], -a[2], a[1]]);
    // About axis 1 (Ry, +90): (z, y, x) -> (x, y, -z).
    check_permutation([6, 4, 6], [0.0, FRAC_PI_2, 0.0], |z, y, x| [5 - x, y, z], |a| [a[2], a[1], -a[0]]);
    // About axis 2 (Rz, -90): (z, y, x) -> (y, -z, x).
    check_permutation([5, 5, 3], [0.0, 0.0, -FRAC_PI_2], |z, y, x| [4 - y, z, x], |a| [a[1], -a[0], a[2]]);
}

#[test]
fn unit_scale_without_rotation_is_the_identity_or_the_centre_crop() {
    let identity = SpatialParams { angles: [0.0; 3], scale: 1.0 };
    let patch = test_patch([5, 6, 7]);
    assert_eq!(spatial_transform(&patch, patch.size, Some(&identity)).unwrap(), patch);

    // Even size differences put the affine's centre on the crop's integer centre.
    let big = test_patch([9, 8, 11]);
    let out = [5, 6, 7];
    let cropped = spatial_transform(&big, out, None).unwrap();
    assert_eq!(spatial_transform(&big, out, Some(&identity)).unwrap(), cropped);
    // The crop by hand: start floor(S / 2) - s / 2 = (2, 1, 2).
    for z in 0..out[0] {
        for y in 0..out[1] {
            for x in 0..out[2] {
                let s = index(big.size, z + 2, y + 1, x + 2);
                assert_eq!(cropped.input[index(out, z, y, x)], big.input[s]);
                assert_eq!(
                    cropped.targets[2].data[3 * index(out, z, y, x) + 1],
                    big.targets[2].data[3 * s + 1]
                );
            }
        }
    }
}

/// Labels after a transform equal the argmax of the transformed one-hot image (ties to the
/// smaller label, voxels outside the source to the smallest label present), stay integer, and equal
/// the image's label wherever the image is exactly one-hot (constant regions).
fn check_labels_follow_one_hot_image(patch_in: &Patch, out: &Patch, present: &[f32]) {
    let k = out.in_channels;
    let mut exact = 0;
    for (v, &l) in out.targets[0].data.iter().enumerate() {
        assert!(present.contains(&l), "label {l} at voxel {v} is not one of {present:?}");
        let mass = &out.input[v * k..(v + 1) * k];
        let best = mass.iter().cloned().fold(0.0f32, f32::max);
        let want = if best > 0.0 { mass.iter().position(|&m| m == best).unwrap() as f32 } else { present[0] };
        assert_eq!(l, want, "voxel {v}: label {l}, one-hot image {mass:?}");
        if best > 0.999 {
            exact += 1;
        }
    }
    assert!(exact > out.targets[0].data.len() / 10, "too few constant voxels ({exact}) to check");
    assert_eq!(patch_in.in_channels, k);
}

fn one_hot_patch(size: [usize; 3], shift: f32) -> (Patch, Vec<f32>) {
    let labels: Vec<f32> = blob_labels(size).iter().map(|l| l + shift).collect();
    let classes = 4 + shift as usize;
    let input = labels
        .iter()
        .flat_map(|&l| (0..classes).map(move |c| if c as f32 == l { 1.0 } else { 0.0 }))
        .collect();
    let mut present: Vec<f32> = labels.clone();
    present.sort_by(f32::total_cmp);
    present.dedup();
    let patch = Patch {
        size,
        input,
        in_channels: classes,
        targets: vec![PatchTarget { data: labels, channels: 1, kind: TargetKind::Labels }],
    };
    (patch, present)
}

#[test]
fn labels_stay_integer_and_aligned_with_the_image_after_spatial_transforms() {
    let (patch, present) = one_hot_patch([20, 22, 24], 0.0);
    for (i, params) in [
        SpatialParams { angles: [0.3, -0.4, 0.2], scale: 1.0 },
        SpatialParams { angles: [0.0, 0.0, 0.0], scale: 0.73 },
        SpatialParams { angles: [-0.5, 0.1, 0.45], scale: 1.3 },
    ]
    .iter()
    .enumerate()
    {
        let out = spatial_transform(&patch, [12, 14, 16], Some(params)).unwrap();
        assert_eq!(out.size, [12, 14, 16], "case {i}");
        check_labels_follow_one_hot_image(&patch, &out, &present);
    }
    // Labels 1..=4 (no 0): a strong zoom-out samples outside the source, where voxels get the
    // smallest label present (1), as batchgeneratorsv2's argmax over all-zero masks.
    let (shifted, present) = one_hot_patch([20, 22, 24], 1.0);
    let out = spatial_transform(
        &shifted,
        [12, 14, 16],
        Some(&SpatialParams { angles: [0.2, 0.0, 0.7], scale: 2.5 }),
    )
    .unwrap();
    let outside = out.input.chunks(out.in_channels).filter(|m| m.iter().all(|&v| v == 0.0)).count();
    assert!(outside > 100, "the zoom-out should leave the source ({outside} voxels outside)");
    check_labels_follow_one_hot_image(&shifted, &out, &present);

    // The full Augmenter with only spatial transforms (always firing) and mirroring keeps them aligned.
    let cfg =
        Augmentation { p_rotation: 1.0, p_scaling: 1.0, mirror_axes: vec![0, 1, 2], ..no_augmentation() };
    let aug = Augmenter::new(&cfg, [12, 14, 16]);
    for seed in 0..4 {
        let out = aug.apply(patch.clone(), &mut StdRng::seed_from_u64(seed)).unwrap();
        check_labels_follow_one_hot_image(&patch, &out, &[0.0, 1.0, 2.0, 3.0]);
    }
}

#[test]
fn rotated_normals_stay_unit_and_equal_r_times_n() {
    let size = [16, 16, 16];
    let n: usize = size.iter().product();
    let normal = [0.48f32, -0.6, 0.64]; // (x, y, z) channels, unit length
    let mut patch = test_patch(size);
    patch.targets[2].data = (0..n).flat_map(|_| normal).collect();
    let angles = [0.3, -0.2, 0.5];
    let out = spatial_transform(&patch, [8, 8, 8], Some(&SpatialParams { angles, scale: 1.1 })).unwrap();
    let r = rotation(angles);
    let a = [normal[2] as f64, normal[1] as f64, normal[0] as f64];
    let ra: [f64; 3] = std::array::from_fn(|i| (0..3).map(|j| r[i][j] * a[j]).sum());
    for v in out.targets[2].data.chunks(3) {
        let len = v.iter().map(|c| c * c).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-5, "length {len}");
        for (got, want) in [v[2], v[1], v[0]].iter().zip(ra) {
            assert!((*got as f64 - want).abs() < 1e-5, "rotated normal {v:?}, want R n = {ra:?} (z, y, x)");
        }
    }
}

#[test]
fn mirroring_twice_is_the_identity_and_negates_the_flipped_component() {
    let size = [3, 4, 5];
    let patch = test_patch(size);
    let mut twice = patch.clone();
    mirror(&mut twice, [true, false, true]);
    assert_ne!(twice, patch);
    mirror(&mut twice, [true, false, true]);
    assert_eq!(twice, patch);

    for axis in 0..3 {
        let mut flipped = patch.clone();
        let mut axes = [false; 3];
        axes[axis] = true;
        mirror(&mut flipped, axes);
        for z in 0..size[0] {
            for y in 0..size[1] {
                for x in 0..size[2] {
                    let mut s = [z, y, x];
                    s[axis] = size[axis] - 1 - s[axis];
                    let (o, s) = (index(size, z, y, x), index(size, s[0], s[1], s[2]));
                    assert_eq!(flipped.input[o], patch.input[s]);
                    assert_eq!(flipped.targets[0].data[o], patch.targets[0].data[s]);
                    assert_eq!(flipped.targets[1].data[o], patch.targets[1].data[s]);
                    // seed layout: flipping z / y / x negates channel 2 / 1 / 0
                    for c in 0..3 {
                        let want = patch.targets[2].data[3 * s + c];
                        let want = if c == 2 - axis { -want } else { want };
                        assert_eq!(flipped.targets[2].data[3 * o + c], want, "axis {axis} channel {c}");
                    }
                }
            }
        }
    }
}

#[test]
fn probability_zero_leaves_the_patch_untouched() {
    let size = [6, 7, 8];
    let patch = test_patch(size);
    let aug = Augmenter::new(&no_augmentation(), size);
    for seed in 0..3 {
        assert_eq!(aug.apply(patch.clone(), &mut StdRng::seed_from_u64(seed)).unwrap(), patch);
    }
    // Disabled: only the centre crop from the bigger box.
    let off = Augmentation { enabled: false, ..full_augmentation() };
    let big = test_patch([8, 9, 10]);
    let out = Augmenter::new(&off, size).apply(big.clone(), &mut StdRng::seed_from_u64(1)).unwrap();
    assert_eq!(out, spatial_transform(&big, size, None).unwrap());
}

#[test]
fn augmentation_is_deterministic_per_seed() {
    let aug = Augmenter::new(&full_augmentation(), [10, 10, 10]);
    let src = aug.source_size();
    assert_eq!(src, [16, 16, 16]);
    let patch = test_patch(src);
    let run = |seed| aug.apply(patch.clone(), &mut StdRng::seed_from_u64(seed)).unwrap();
    let a = run(5);
    assert_eq!(a.size, [10, 10, 10]);
    assert_eq!(a, run(5));
    assert_ne!(a, run(6));
    assert!(a.input.iter().all(|v| v.is_finite()));
    // Default probabilities too (most transforms do not fire).
    let default = Augmenter::new(&Augmentation::default(), [10, 10, 10]);
    let patch = test_patch(default.source_size());
    let run = |seed| default.apply(patch.clone(), &mut StdRng::seed_from_u64(seed)).unwrap();
    assert_eq!(run(11), run(11));
}

#[test]
fn bad_patches_are_rejected_with_the_target_named() {
    let aug = Augmenter::new(&no_augmentation(), [4, 4, 4]);
    let mut patch = test_patch([4, 4, 4]);
    patch.targets[2].channels = 2;
    patch.targets[2].data.truncate(64 * 2);
    let err = aug.apply(patch, &mut StdRng::seed_from_u64(0)).unwrap_err().to_string();
    assert!(err.contains("vector target 2") && err.contains("3"), "{err}");
    let small = test_patch([3, 4, 4]);
    let err = aug.apply(small, &mut StdRng::seed_from_u64(0)).unwrap_err().to_string();
    assert!(err.contains("smaller than the patch size"), "{err}");
}

#[test]
fn brightness_contrast_and_gamma_match_hand_computed_values() {
    let mut x = vec![0.5f32, -1.0, 2.0];
    intensity::scale_brightness(&mut x, 1.2);
    assert_eq!(x, vec![0.5 * 1.2, -1.2, 2.4]);

    // mean 1.5, factor 2: (x - 1.5) * 2 + 1.5 = [-1.5, 0.5, 2.5, 4.5], clamped to [0, 3].
    let mut x = vec![0.0f32, 1.0, 2.0, 3.0];
    intensity::contrast(&mut x, 2.0);
    assert_eq!(x, vec![0.0, 0.5, 2.5, 3.0]);

    // On [0, 1] data spanning 0..1, plain gamma is x^g; inverted gamma is 1 - (1 - x)^g.
    let base = vec![0.0f32, 0.25, 0.6, 1.0];
    let mut plain = base.clone();
    intensity::gamma(&mut plain, 1.5, false, false);
    let mut inverted = base.clone();
    intensity::gamma(&mut inverted, 1.5, true, false);
    for ((p, i), b) in plain.iter().zip(&inverted).zip(&base) {
        assert!((p - b.powf(1.5)).abs() < 1e-6, "{p} vs {}", b.powf(1.5));
        assert!((i - (1.0 - (1.0 - b).powf(1.5))).abs() < 1e-6);
    }

    // retain_stats keeps mean and unbiased std, while the shape changes.
    let data: Vec<f32> = (0..1000).map(|i| 3.0 + 2.0 * hash01(i, 4) * hash01(i, 5)).collect();
    let (m0, s0) = (mean(&data), std_unbiased(&data));
    for invert in [false, true] {
        let mut g = data.clone();
        intensity::gamma(&mut g, 0.7, invert, true);
        assert!((mean(&g) - m0).abs() < 1e-4 && (std_unbiased(&g) - s0).abs() < 1e-4, "invert {invert}");
        assert!(g.iter().zip(&data).any(|(a, b)| (a - b).abs() > 1e-2));
    }
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

fn std_unbiased(v: &[f32]) -> f64 {
    let m = mean(v);
    (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

#[test]
fn gaussian_blur_is_the_separable_kernel_with_reflect_padding() {
    // sigma 1: round(6.5) = 6 -> 7 taps; sigma 0.5: round(3.5) = 4 -> 5 taps.
    let k1 = intensity::gaussian_kernel(1.0);
    let raw: Vec<f64> = (-3..=3).map(|i: i32| (-0.5 * (i * i) as f64).exp()).collect();
    let sum: f64 = raw.iter().sum();
    assert_eq!(k1.len(), 7);
    for (k, r) in k1.iter().zip(&raw) {
        assert!((*k as f64 - r / sum).abs() < 1e-7);
    }
    assert_eq!(intensity::gaussian_kernel(0.5).len(), 5);

    // A centred delta becomes the outer product of the three kernels.
    let size = [11, 11, 11];
    let mut d = vec![0.0f32; 11 * 11 * 11];
    d[index(size, 5, 5, 5)] = 1.0;
    let sigmas = [1.0, 0.5, 0.7];
    intensity::gaussian_blur(&mut d, size, sigmas);
    let ks = sigmas.map(intensity::gaussian_kernel);
    let r = ks.clone().map(|k| k.len() / 2);
    let tap = |a: usize, i: usize| -> f32 {
        let off = i as isize - 5 + r[a] as isize;
        if off >= 0 && (off as usize) < ks[a].len() { ks[a][off as usize] } else { 0.0 }
    };
    for z in 0..11 {
        for y in 0..11 {
            for x in 0..11 {
                let want = tap(0, z) * tap(1, y) * tap(2, x);
                assert!((d[index(size, z, y, x)] - want).abs() < 1e-7, "{z} {y} {x}");
            }
        }
    }

    // Reflect (edge not repeated: index -1 reads 1) along x: a delta at x = 1 of 8 gives
    // out[0] = k[4] + k[2], out[1] = k[3] + k[1], out[2] = k[2] + k[0].
    let size = [1, 1, 8];
    let mut line = vec![0.0f32; 8];
    line[1] = 1.0;
    intensity::gaussian_blur(&mut line, size, [1.0, 1.0, 1.0]);
    assert!((line[0] - (k1[4] + k1[2])).abs() < 1e-6, "{line:?}");
    assert!((line[1] - (k1[3] + k1[1])).abs() < 1e-6, "{line:?}");
    assert!((line[2] - (k1[2] + k1[0])).abs() < 1e-6, "{line:?}");
}

#[test]
fn low_resolution_is_nearest_exact_down_and_trilinear_up() {
    // f = x + 10 y + 100 z on 4^3 at scale 0.5: nearest-exact keeps indices 1, 3; trilinear
    // (align_corners False) back to 4 puts them at 1, 1.5, 2.5, 3 per axis, exact for an affine f.
    let size = [4, 4, 4];
    let mut d: Vec<f32> = (0..64).map(|i| (i % 4 + 10 * (i / 4 % 4) + 100 * (i / 16)) as f32).collect();
    intensity::simulate_low_resolution(&mut d, size, 0.5);
    let c = [1.0f32, 1.5, 2.5, 3.0];
    for z in 0..4 {
        for y in 0..4 {
            for x in 0..4 {
                assert!((d[index(size, z, y, x)] - (c[x] + 10.0 * c[y] + 100.0 * c[z])).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn noise_is_one_seeded_field_with_the_requested_std() {
    let size = [16, 32, 32];
    let n: usize = size.iter().product();
    let base: Vec<f32> = (0..n).map(|i| hash01(i, 8)).collect();
    let mut chans = vec![base.clone(), base.iter().map(|v| v * 2.0).collect::<Vec<_>>()];
    intensity::add_noise(&mut chans, size, 0.5, 42);
    let noise: Vec<f32> = chans[0].iter().zip(&base).map(|(a, b)| a - b).collect();
    assert!(mean(&noise).abs() < 0.01, "mean {}", mean(&noise));
    assert!((std_unbiased(&noise) - 0.5).abs() < 0.01, "std {}", std_unbiased(&noise));
    for ((a, b), n0) in chans[1].iter().zip(&base).zip(&noise) {
        assert!((a - 2.0 * b - n0).abs() < 1e-5, "channels share the field");
    }
    let mut again = vec![base.clone()];
    intensity::add_noise(&mut again, size, 0.5, 42);
    assert_eq!(again[0], chans[0]);
}

/// ms per 128^3 patch (1 input channel + labels, values, normals), release:
/// `cargo test --release --test augment -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput_128() {
    let patch_size = [128, 128, 128];
    for (name, cfg) in
        [("every transform", full_augmentation()), ("default probabilities", Augmentation::default())]
    {
        let aug = Augmenter::new(&cfg, patch_size);
        let patch = test_patch(aug.source_size());
        let runs = 8;
        let mut times = Vec::new();
        for seed in 0..runs {
            let source = patch.clone();
            let start = std::time::Instant::now();
            aug.apply(source, &mut StdRng::seed_from_u64(seed)).unwrap();
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let mean = times.iter().sum::<f64>() / runs as f64;
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "{name}: {mean:.1} ms per patch mean, {min:.1} min over {runs} (source {:?}, {} threads)",
            aug.source_size(),
            rayon::current_num_threads()
        );
    }
}
