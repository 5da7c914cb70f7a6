//! tr_setup.dilate_label: the separable ball(5) dilation against a brute-force one, and the
//! loader's dilated patches against the whole dilated volume cropped (volume borders and padding
//! included); off by default.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::config::Config;
use unet3d::data::dataset::{Dataset, Volume};
use unet3d::data::dilate::dilate_labels;
use unet3d::data::loader::{Loader, LoaderOptions};
use unet3d::data::{DType, InMemoryArray, VolumeArray};

/// skimage.morphology.ball(5): every offset with |o|^2 <= 25.
fn ball() -> Vec<[isize; 3]> {
    let r = -5..=5isize;
    r.clone()
        .flat_map(|z| r.clone().flat_map(move |y| (-5..=5).map(move |x| [z, y, x])))
        .filter(|o| o.iter().map(|v| v * v).sum::<isize>() <= 25)
        .collect()
}

/// Grey dilation straight from the definition: the largest value under the footprint, offsets
/// outside the volume skipped.
fn brute_force(data: &[f32], shape: [usize; 3], channels: usize) -> Vec<f32> {
    let offsets = ball();
    let mut out = data.to_vec();
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                for o in &offsets {
                    let q = [z as isize + o[0], y as isize + o[1], x as isize + o[2]];
                    if (0..3).any(|a| q[a] < 0 || q[a] >= shape[a] as isize) {
                        continue;
                    }
                    let qi = (q[0] as usize * shape[1] + q[1] as usize) * shape[2] + q[2] as usize;
                    let pi = (z * shape[1] + y) * shape[2] + x;
                    for c in 0..channels {
                        let v = data[qi * channels + c];
                        let d = &mut out[pi * channels + c];
                        *d = d.max(v);
                    }
                }
            }
        }
    }
    out
}

/// Sparse labels: each voxel is a class in 1..=classes with probability `density`, else 0.
fn sparse(n: usize, density: f64, classes: u32, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| if rng.random_bool(density) { rng.random_range(1..=classes) as f32 } else { 0.0 })
        .collect()
}

#[test]
fn footprint_is_the_radius_5_ball() {
    let shape = [13, 13, 13];
    let mut v = vec![0.0; 13 * 13 * 13];
    v[(6 * 13 + 6) * 13 + 6] = 1.0;
    dilate_labels(&mut v, shape, 1);
    // skimage.morphology.ball(5).sum() == 515, and the centre's 11^3 box holds all of it.
    assert_eq!(v.iter().sum::<f32>(), 515.0);
    assert_eq!(ball().len(), 515);
    assert_eq!(
        v,
        brute_force(
            &{
                let mut s = vec![0.0; v.len()];
                s[(6 * 13 + 6) * 13 + 6] = 1.0;
                s
            },
            shape,
            1
        )
    );
}

#[test]
fn equals_brute_force_on_random_sparse_labels() {
    let mut rng = StdRng::seed_from_u64(3);
    // (shape, channels, density, classes): masks, two-channel masks, class maps, an empty map and
    // shapes thinner than the ball.
    let cases: [([usize; 3], usize, f64, u32); 6] = [
        ([9, 13, 11], 1, 0.01, 1),
        ([12, 7, 10], 2, 0.02, 1),
        ([11, 11, 11], 1, 0.004, 3),
        ([3, 14, 2], 1, 0.05, 2),
        ([8, 8, 8], 1, 0.0, 1),
        ([16, 5, 9], 1, 0.006, 1),
    ];
    for (shape, c, density, classes) in cases {
        let n: usize = shape.iter().product();
        let labels = sparse(n * c, density, classes, &mut rng);
        let mut got = labels.clone();
        dilate_labels(&mut got, shape, c);
        assert_eq!(
            got,
            brute_force(&labels, shape, c),
            "{shape:?} x {c}, density {density}, {classes} classes"
        );
        if labels.iter().any(|&v| v > 0.0) {
            assert!(got.iter().sum::<f32>() > labels.iter().sum::<f32>(), "{shape:?}: nothing grew");
        }
    }
}

const YAML: &str = "dataset_config:\n  sampling: random\n  oversample_foreground: 0\n  \
    normalization: zscore\n  use_cache: false\n  targets:\n    \
    mask: {channels: 1, loss_fn: BCEWithLogitsLoss}\n    classes: {channels: 3, loss_fn: DC_and_CE_loss}\n    \
    dist: {channels: 1, loss_fn: MSELoss}\n";

/// Raw target arrays of one volume: a 0/255 uint8 mask, a 0/1/2 class map, a regression map.
fn volume(name: &str, shape: [usize; 3], rng: &mut StdRng) -> (Volume, [Vec<f32>; 3]) {
    let n: usize = shape.iter().product();
    let mask: Vec<f32> = sparse(n, 0.01, 1, rng).iter().map(|v| v * 255.0).collect();
    let classes = sparse(n, 0.01, 2, rng);
    let dist: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..3.0)).collect();
    let arr = |what: &str, dtype: DType, d: &[f32]| -> Arc<dyn VolumeArray> {
        Arc::new(InMemoryArray::new(format!("{name}/{what}"), shape, 1, dtype, d.to_vec()).unwrap())
    };
    let input: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
    let v = Volume {
        name: name.to_string(),
        input: arr("input", DType::U8, &input),
        targets: vec![
            arr("mask", DType::U8, &mask),
            arr("classes", DType::U8, &classes),
            arr("dist", DType::F32, &dist),
        ],
        ref_label: 0,
    };
    (v, [mask, classes, dist])
}

fn options(dilate_label: bool) -> LoaderOptions {
    LoaderOptions {
        patch_size: [8, 8, 8],
        batch_size: 2,
        workers: 0,
        prefetch: 1,
        augmentation: None,
        deep_supervision_strides: Vec::new(),
        seed: 7,
        tr_val_split: 0.8,
        split_seed: 1,
        first_batch: 0,
        dilate_label,
    }
}

/// The `patch` box at `start` of a single-channel volume, 0 outside it.
fn crop(data: &[f32], shape: [usize; 3], start: [isize; 3], patch: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(patch.iter().product());
    for z in 0..patch[0] as isize {
        for y in 0..patch[1] as isize {
            for x in 0..patch[2] as isize {
                let q = [start[0] + z, start[1] + y, start[2] + x];
                let inside = (0..3).all(|a| q[a] >= 0 && q[a] < shape[a] as isize);
                out.push(if inside {
                    data[(q[0] as usize * shape[1] + q[1] as usize) * shape[2] + q[2] as usize]
                } else {
                    0.0
                });
            }
        }
    }
    out
}

/// Every patch of a few batches against the raw volumes: with dilation, the mask (binarised) and
/// the class map equal the whole volume dilated then cropped; the regression map never changes.
fn check_patches(dilate_label: bool) {
    let mut rng = StdRng::seed_from_u64(dilate_label as u64);
    // Both volumes are within 5 voxels of a border on every side of every 8^3 patch; v1 is
    // thinner than the patch along z, so its patches also hold padding.
    let shapes = [[10, 9, 12], [6, 12, 11]];
    let (volumes, raw): (Vec<_>, Vec<_>) =
        shapes.iter().enumerate().map(|(i, &s)| volume(&format!("v{i}"), s, &mut rng)).unzip();
    let cfg = Config::parse(YAML, &[]).unwrap().config.dataset_config;
    let mut loader =
        Loader::train(Arc::new(Dataset::from_volumes(volumes)), &cfg, &[0, 1], options(dilate_label))
            .unwrap();
    let patch = [8, 8, 8];
    let mut seen = [false; 2];
    let mut grew = false;
    for _ in 0..6 {
        let b = loader.next_batch().unwrap().unwrap();
        for (j, &(v, origin)) in b.origins.iter().enumerate() {
            seen[v] = true;
            let shape = shapes[v];
            // Origins clamp at 0; a volume thinner than the patch is centred in it (pad 2: start -1).
            let start = [0, 1, 2].map(|a| {
                if shape[a] < patch[a] { -(((patch[a] - shape[a]) / 2) as isize) } else { origin[a] as isize }
            });
            let n: usize = patch.iter().product();
            let [mask, classes, dist] = &raw[v];
            let mut mask: Vec<f32> = mask.iter().map(|&x| f32::from(x > 0.0)).collect();
            let mut classes = classes.clone();
            if dilate_label {
                dilate_labels(&mut mask, shape, 1);
                dilate_labels(&mut classes, shape, 1);
            }
            for (t, want) in [mask, classes, dist.clone()].iter().enumerate() {
                let got = &b.targets[t].scales[0].data()[j * n..][..n];
                let want = crop(want, shape, start, patch);
                assert_eq!(got, want.as_slice(), "volume {v} at {start:?}, target {}", b.targets[t].name);
            }
            let undilated: Vec<f32> =
                crop(&raw[v][0], shape, start, patch).iter().map(|&x| f32::from(x > 0.0)).collect();
            let got = &b.targets[0].scales[0].data()[j * n..][..n];
            grew |= got != undilated.as_slice();
        }
    }
    assert_eq!(seen, [true, true], "both volumes sampled");
    assert_eq!(grew, dilate_label, "the mask changes iff dilate_label");
}

#[test]
fn loader_patches_equal_the_dilated_volume_cropped() {
    check_patches(true);
}

#[test]
fn off_by_default_leaves_labels_unchanged() {
    let yaml = format!("{YAML}tr_setup: {{seed: 1}}\n");
    let off = Config::parse(&yaml, &[]).unwrap().config;
    assert!(!LoaderOptions::from_config(&off, Vec::new(), true).dilate_label);
    let on = Config::parse(&yaml, &["tr_setup.dilate_label=true".to_string()]).unwrap().config;
    assert!(LoaderOptions::from_config(&on, Vec::new(), true).dilate_label);
    check_patches(false);
}
