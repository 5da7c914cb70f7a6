//! Patch search against a brute-force search, its cache's invalidation, nnU-Net's random
//! positions, the train/validation split and the normalisation schemes against hand-computed
//! values.

mod common;

use common::scratch_dir;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::config::Normalization;
use unet3d::data::finite::NanPolicy;
use unet3d::data::normalize::{CtChannel, CtStats, MeanStd, Normalizer, VolumeStats, normalize};
use unet3d::data::sampling::{
    ForegroundLocations, PatchPosition, PatchSearch, find_patches, random_start, split_patches, split_volumes,
};
use unet3d::data::zarr::{ArraySpec, ChunkCache, ZarrArray, ZarrWriter};
use unet3d::data::{DType, InMemoryArray, VolumeArray};

/// A label volume of `shape` with a few random solid boxes of label 1 (and some of label 2).
fn boxes(shape: [usize; 3], n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0.0; shape.iter().product()];
    for b in 0..n {
        let lo: [usize; 3] = std::array::from_fn(|a| rng.random_range(0..shape[a]));
        let hi: [usize; 3] =
            std::array::from_fn(|a| (lo[a] + rng.random_range(1..=shape[a] / 2 + 1)).min(shape[a]));
        for z in lo[0]..hi[0] {
            for y in lo[1]..hi[1] {
                for x in lo[2]..hi[2] {
                    v[(z * shape[1] + y) * shape[2] + x] = if b % 3 == 2 { 2.0 } else { 1.0 };
                }
            }
        }
    }
    v
}

/// The seed's search written out literally on the whole array: global bbox, Python ranges, then
/// each candidate's own bbox and count.
fn brute_force(v: &[f32], shape: [usize; 3], p: [usize; 3], ratio: f64, bbox_pct: f64) -> Vec<[usize; 3]> {
    let at = |z: usize, y: usize, x: usize| v[(z * shape[1] + y) * shape[2] + x];
    let (mut lo, mut hi) = ([usize::MAX; 3], [0; 3]);
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                if at(z, y, x) > 0.0 {
                    for (a, c) in [z, y, x].into_iter().enumerate() {
                        lo[a] = lo[a].min(c);
                        hi[a] = hi[a].max(c);
                    }
                }
            }
        }
    }
    let range = |a: usize| -> Vec<usize> {
        let end = hi[a] as i64 - p[a] as i64 + 2;
        let mut out = Vec::new();
        let mut s = lo[a] as i64;
        while s < end {
            out.push(s as usize);
            s += (p[a] / 2).max(1) as i64;
        }
        out
    };
    let mut valid = Vec::new();
    for &z in &range(0) {
        for &y in &range(1) {
            for &x in &range(2) {
                let (mut l, mut h, mut n) = ([usize::MAX; 3], [0; 3], 0usize);
                for dz in 0..p[0] {
                    for dy in 0..p[1] {
                        for dx in 0..p[2] {
                            if at(z + dz, y + dy, x + dx) > 0.0 {
                                n += 1;
                                for (a, c) in [dz, dy, dx].into_iter().enumerate() {
                                    l[a] = l[a].min(c);
                                    h[a] = h[a].max(c);
                                }
                            }
                        }
                    }
                }
                let vol = (p[0] * p[1] * p[2]) as f64;
                let bb = if n == 0 {
                    0.0
                } else {
                    ((h[0] - l[0] + 1) * (h[1] - l[1] + 1) * (h[2] - l[2] + 1)) as f64
                };
                if n > 0 && bb >= bbox_pct * vol && n as f64 / vol >= ratio {
                    valid.push([z, y, x]);
                }
            }
        }
    }
    valid
}

#[test]
fn patch_search_equals_brute_force() {
    let cases = [
        ([20, 24, 18], [8, 8, 8], 0.1, 0.5, 6),
        ([20, 24, 18], [8, 8, 8], 0.0, 0.0, 2),
        ([16, 9, 31], [4, 6, 5], 0.3, 0.9, 10),
        ([12, 12, 12], [1, 3, 2], 0.5, 0.2, 4),
        ([140, 6, 7], [6, 3, 4], 0.05, 0.3, 12), // more than one scan tile along z
    ];
    let mut total = 0;
    for (i, (shape, patch, ratio, bbox, n)) in cases.into_iter().enumerate() {
        let v = boxes(shape, n, i as u64);
        let a = InMemoryArray::new(format!("case{i}"), shape, 1, DType::U8, v.clone()).unwrap();
        let got = find_patches(&a, patch, ratio, bbox).unwrap();
        let want = brute_force(&v, shape, patch, ratio, bbox);
        assert_eq!(got, want, "case {i}: shape {shape:?} patch {patch:?} thresholds {ratio} {bbox}");
        total += want.len();
    }
    assert!(total > 20, "the cases should accept some patches ({total})");
}

#[test]
fn an_empty_label_volume_is_an_error_naming_it() {
    let a = InMemoryArray::new("vol3/sheet", [8, 8, 8], 1, DType::U8, vec![0.0; 512]).unwrap();
    let e = format!("{:#}", find_patches(&a, [4, 4, 4], 0.1, 0.5).unwrap_err());
    assert!(e.contains("vol3/sheet") && e.contains("no labelled voxel"), "{e}");
    // Labelled, but no patch dense enough: the search says which volume and thresholds.
    let mut v = vec![0.0; 512];
    v[0] = 1.0;
    let a = InMemoryArray::new("vol4/sheet", [8, 8, 8], 1, DType::U8, v).unwrap();
    let search = PatchSearch {
        labels: vec![&a],
        paths: None,
        patch_size: [4, 4, 4],
        min_labeled_ratio: 0.5,
        min_bbox_percent: 0.5,
        cache_folder: None,
    };
    let e = format!("{:#}", search.run().unwrap_err());
    assert!(e.contains("vol4/sheet") && e.contains("min_labeled_ratio"), "{e}");
}

fn write_label(path: &Path, shape: [usize; 3], data: &[f32]) {
    let spec =
        ArraySpec { shape, channels: 1, chunks: [8, 8, 8], dtype: DType::U8, attributes: Default::default() };
    let w = ZarrWriter::create(path, &spec, true).unwrap();
    w.write_region([0, 0, 0], shape, data).unwrap();
}

/// Replaces the cached patch list (keeping its key), so a later run shows whether it used it.
fn tamper(cache: &Path) {
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(cache).unwrap()).unwrap();
    j["patches"] = serde_json::json!([{"volume": 0, "start": [99, 99, 99]}]);
    std::fs::write(cache, serde_json::to_vec(&j).unwrap()).unwrap();
}

#[test]
fn the_cache_is_used_only_while_its_key_matches() {
    let dir = scratch_dir("cache");
    let shape = [16, 16, 16];
    let path = dir.join("vol0.zarr/sheet");
    let data = boxes(shape, 5, 42);
    write_label(&path, shape, &data);
    let cache = ChunkCache::new(1 << 24);
    let tampered = vec![PatchPosition { volume: 0, start: [99, 99, 99] }];
    let run = |patch: [usize; 3], ratio: f64| -> (Vec<PatchPosition>, PathBuf) {
        let a = ZarrArray::open(&path, 1, &cache).unwrap();
        let search = PatchSearch {
            labels: vec![&a as &dyn VolumeArray],
            paths: Some(vec![path.clone()]),
            patch_size: patch,
            min_labeled_ratio: ratio,
            min_bbox_percent: 0.3,
            cache_folder: Some(dir.join("patch_cache")),
        };
        (search.run().unwrap(), search.cache_path().unwrap())
    };
    let (first, file) = run([8, 8, 8], 0.1);
    let want: Vec<PatchPosition> = brute_force(&data, shape, [8, 8, 8], 0.1, 0.3)
        .into_iter()
        .map(|start| PatchPosition { volume: 0, start })
        .collect();
    assert_eq!(first, want);
    assert!(file.is_file(), "the search writes its cache");

    // Same key: the (tampered) cache is what comes back.
    tamper(&file);
    assert_eq!(run([8, 8, 8], 0.1).0, tampered);

    // Another threshold: recomputed and rewritten.
    assert_ne!(run([8, 8, 8], 0.2).0, tampered);
    tamper(&file);
    assert_eq!(run([8, 8, 8], 0.2).0, tampered);

    // Another patch size: never the other size's list.
    assert_ne!(run([4, 4, 4], 0.2).0, tampered);

    // A chunk file touched (same bytes, new modification time): recomputed.
    tamper(&file);
    let mut chunks = Vec::new();
    collect_files(&path, &mut chunks);
    let chunk = chunks.iter().find(|p| !p.ends_with("zarr.json") && !p.ends_with(".zarray")).unwrap();
    let f = std::fs::File::options().write(true).open(chunk).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000)).unwrap();
    drop(f);
    let want = |d: &[f32]| -> Vec<PatchPosition> {
        brute_force(d, shape, [8, 8, 8], 0.2, 0.3)
            .into_iter()
            .map(|start| PatchPosition { volume: 0, start })
            .collect()
    };
    assert_eq!(run([8, 8, 8], 0.2).0, want(&data));

    // The array rewritten with other labels: recomputed from the new data.
    tamper(&file);
    let data2 = boxes(shape, 7, 7);
    write_label(&path, shape, &data2);
    assert_ne!(want(&data2), want(&data), "the rewrite changes the answer");
    assert_eq!(run([8, 8, 8], 0.2).0, want(&data2));
    let _ = std::fs::remove_dir_all(&dir);
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { collect_files(&p, out) } else { out.push(p) }
    }
}

#[test]
fn forced_foreground_boxes_are_centred_on_foreground() {
    let shape = [30, 20, 25];
    let mut v = vec![0.0; shape.iter().product()];
    let fg = [(3, 4, 5), (27, 15, 20), (10, 10, 10)];
    for &(z, y, x) in &fg {
        v[(z * shape[1] + y) * shape[2] + x] = 1.0;
    }
    let a = InMemoryArray::new("a", shape, 1, DType::U8, v).unwrap();
    let locations = ForegroundLocations::compute(&a).unwrap();
    assert_eq!(locations.classes.len(), 1);
    assert_eq!(locations.classes[0].1.len(), 3, "all three voxels kept (fewer than 10000)");
    let mut rng = StdRng::seed_from_u64(0);
    let (source, patch) = ([12, 12, 12], [8, 8, 8]);
    for _ in 0..50 {
        let v = locations.sample(&mut rng).unwrap();
        assert!(fg.contains(&(v[0], v[1], v[2])));
        let s = random_start(shape, source, patch, Some(v), &mut rng);
        // The final patch (centre crop at 6 - 4 = 2) contains the voxel.
        for a in 0..3 {
            let p0 = s[a] + 2;
            assert!(p0 <= v[a] as isize && (v[a] as isize) < p0 + 8, "axis {a}: start {s:?} voxel {v:?}");
        }
        // Uniform boxes keep the final patch's reach outside the volume within nnU-Net's bounds.
        let u = random_start(shape, source, patch, None, &mut rng);
        for a in 0..3 {
            assert!(u[a] >= -2 && u[a] + 12 <= shape[a] as isize + 2, "axis {a}: {u:?}");
        }
    }
}

#[test]
fn split_is_reproducible_and_disjoint() {
    let (t, v) = split_volumes(10, 0.8, 7);
    assert_eq!((t.len(), v.len()), (8, 2));
    assert_eq!(split_volumes(10, 0.8, 7), (t.clone(), v.clone()));
    let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    assert!((0..5).any(|s| split_volumes(10, 0.8, s) != (t.clone(), v.clone())), "the seed matters");
    assert_eq!(split_volumes(1, 0.8, 7), (vec![0], vec![0]), "one volume: both sides, patches split");
    assert_eq!(split_volumes(2, 0.95, 1).0.len(), 1);

    let patches: Vec<PatchPosition> =
        (0..20).map(|i| PatchPosition { volume: 0, start: [i, 0, 0] }).collect();
    let (pt, pv) = split_patches(&patches, 0.75, 3);
    assert_eq!((pt.len(), pv.len()), (15, 5));
    assert_eq!(split_patches(&patches, 0.75, 3), (pt.clone(), pv.clone()));
    assert!(pt.iter().all(|p| !pv.contains(p)));
}

#[test]
fn scale_to_unit_and_none_by_hand() {
    let mut v = vec![0.0, 255.0, 51.0, 7.0];
    normalize(&mut v, 2, &[Normalization::ScaleToUnit, Normalization::None], DType::U8, None, None).unwrap();
    assert_eq!(v, vec![0.0, 255.0, 0.2, 7.0]);
    let mut v = vec![65535.0, 0.5];
    normalize(&mut v, 1, &[Normalization::ScaleToUnit], DType::U16, None, None).unwrap();
    assert_eq!(v, vec![1.0, 0.5 / 65535.0]);
    let mut v = vec![0.25];
    normalize(&mut v, 1, &[Normalization::ScaleToUnit], DType::F32, None, None).unwrap();
    assert_eq!(v, vec![0.25]);
}

#[test]
fn zscore_uses_the_whole_volume() {
    // 130 slices: two scan tiles along z, merged.
    let shape = [130, 3, 2];
    let n: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(5);
    let data: Vec<f32> =
        (0..n * 2).map(|i| if i % 2 == 0 { rng.random_range(1000.0..1010.0) } else { i as f32 }).collect();
    let a = InMemoryArray::new("img", shape, 2, DType::F32, data.clone()).unwrap();
    let stats = VolumeStats::compute(&a, NanPolicy::Error).unwrap();
    for c in 0..2 {
        let x: Vec<f64> = data.iter().skip(c).step_by(2).map(|&v| v as f64).collect();
        let mean = x.iter().sum::<f64>() / n as f64;
        let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((stats.channels[c].mean - mean).abs() < 1e-9 * mean.abs().max(1.0), "channel {c}");
        assert!((stats.channels[c].std - std).abs() < 1e-9 * std, "channel {c}");
    }
    // A patch is normalised with the volume's numbers, not its own.
    let mut patch = a.read([5, 0, 0], [1, 1, 1]).unwrap();
    let want: Vec<f32> =
        (0..2).map(|c| ((patch[c] as f64 - stats.channels[c].mean) / stats.channels[c].std) as f32).collect();
    let norm = Normalizer::for_volume(&a, &[Normalization::ZScore; 2], None, NanPolicy::Error).unwrap();
    norm.apply(&mut patch).unwrap();
    assert_eq!(patch, want);
    // A constant image divides by nnU-Net's 1e-8, not by 0.
    let flat = VolumeStats { channels: vec![MeanStd { mean: 3.0, std: 0.0 }] };
    let mut v = vec![3.0, 3.0];
    normalize(&mut v, 1, &[Normalization::ZScore], DType::F32, Some(&flat), None).unwrap();
    assert_eq!(v, vec![0.0, 0.0]);
    let e =
        format!("{:#}", normalize(&mut v, 1, &[Normalization::ZScore], DType::F32, None, None).unwrap_err());
    assert!(e.contains("zscore"), "{e}");
}

#[test]
fn ct_clips_to_foreground_percentiles_then_zscores() {
    let ct = CtStats { channels: vec![CtChannel { mean: 50.0, std: 10.0, lower: 0.0, upper: 100.0 }] };
    let mut v = vec![-500.0, 60.0, 3000.0];
    normalize(&mut v, 1, &[Normalization::Ct], DType::I16, None, Some(&ct)).unwrap();
    assert_eq!(v, vec![-5.0, 1.0, 5.0]);

    // Statistics: foreground intensities 0..=99 (uniform), background -1000 (excluded).
    let shape = [20, 10, 10];
    let n: usize = shape.iter().product();
    let label: Vec<f32> = (0..n).map(|i| f32::from(i % 2 == 0)).collect();
    let image: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { ((i / 2) % 100) as f32 } else { -1000.0 }).collect();
    let l = InMemoryArray::new("lab", shape, 1, DType::U8, label).unwrap();
    let img = InMemoryArray::new("img", shape, 1, DType::I16, image).unwrap();
    let s = CtStats::compute(&[(&img as &dyn VolumeArray, &l as &dyn VolumeArray)]).unwrap();
    let c = s.channels[0];
    // Exact values over the foreground: mean 49.5, std sqrt((100^2 - 1) / 12) = 28.866, p0.5 = 0.495,
    // p99.5 = 98.505; the sample of 10^6 draws lands close.
    assert!((c.mean - 49.5).abs() < 0.2, "{c:?}");
    assert!((c.std - 28.866).abs() < 0.2, "{c:?}");
    assert!(c.lower >= 0.0 && c.lower <= 1.0 && c.upper >= 98.0 && c.upper <= 99.0, "{c:?}");
    // Reproducible (seeded as nnU-Net's fingerprint).
    assert_eq!(CtStats::compute(&[(&img as &dyn VolumeArray, &l as &dyn VolumeArray)]).unwrap(), s);
}
