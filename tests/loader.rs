//! The threaded loader: the same batches whatever the number of workers, padding of small
//! volumes, foreground oversampling, deep-supervision targets, validation passes, and worker
//! errors that name the volume.

use std::sync::Arc;

use anyhow::{Result, bail};
use unet3d::config::{Augmentation, Config, DatasetConfig};
use unet3d::data::dataset::{Dataset, Volume};
use unet3d::data::loader::{Loader, LoaderOptions, area_downsample};
use unet3d::data::{Batch, DType, InMemoryArray, VolumeArray};
use unet3d::loss::{LabelResample, deep_supervision_labels};
use unet3d::tensor::Tensor;

/// sheet: a binary mask (BCE), distance: a regression target, normals: 3-channel vectors.
fn config(sampling: &str) -> DatasetConfig {
    let yaml = format!(
        "dataset_config:\n  sampling: {sampling}\n  normalization: zscore\n  use_cache: false\n  \
         min_labeled_ratio: 0.05\n  min_bbox_percent: 0.2\n  targets:\n    \
         sheet: {{channels: 1, loss_fn: BCEWithLogitsLoss}}\n    distance: {{channels: 1, loss_fn: MSELoss}}\n    \
         normals: {{channels: 3, loss_fn: MaskedCosineLoss}}\n"
    );
    Config::parse(&yaml, &[]).unwrap().config.dataset_config
}

/// A volume of `shape`: input = smooth ramp plus the sheet, a slab-shaped sheet, distance to it,
/// constant unit normals (1, 0, 0) uint16-encoded.
fn volume(name: &str, shape: [usize; 3], slab: std::ops::Range<usize>) -> Volume {
    let n: usize = shape.iter().product();
    let z_of = |i: usize| i / (shape[1] * shape[2]);
    let sheet: Vec<f32> = (0..n).map(|i| f32::from(slab.contains(&z_of(i)))).collect();
    let input: Vec<f32> = (0..n).map(|i| (i % 251) as f32 + 100.0 * sheet[i]).collect();
    let distance: Vec<f32> = (0..n).map(|i| (z_of(i) as f32 - slab.start as f32).abs().min(200.0)).collect();
    let normals: Vec<f32> = (0..n * 3).map(|i| [65535.0, 32767.5, 32767.5][i % 3]).collect();
    let arr = |what: &str, c: usize, dtype: DType, d: Vec<f32>| -> Arc<dyn VolumeArray> {
        Arc::new(InMemoryArray::new(format!("{name}/{what}"), shape, c, dtype, d).unwrap())
    };
    Volume {
        name: name.to_string(),
        input: arr("input", 1, DType::U8, input),
        targets: vec![
            arr("sheet", 1, DType::U8, sheet),
            arr("distance", 1, DType::F32, distance),
            arr("normals", 3, DType::U16, normals),
        ],
        ref_label: 0,
    }
}

/// Two volumes larger than the 8^3 patch; `small` adds a third smaller than it (random sampling
/// only: the patch search rightly finds no patch in it).
fn dataset(small: bool) -> Arc<Dataset> {
    let mut v = vec![volume("v0", [24, 20, 22], 5..14), volume("v1", [20, 26, 20], 8..16)];
    if small {
        v.push(volume("v2", [6, 5, 7], 2..4));
    }
    Arc::new(Dataset::from_volumes(v))
}

fn options(workers: usize, augmentation: Option<Augmentation>) -> LoaderOptions {
    LoaderOptions {
        patch_size: [8, 8, 8],
        batch_size: 3,
        workers,
        prefetch: 4,
        augmentation,
        deep_supervision_strides: vec![[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        seed: 11,
        tr_val_split: 0.8,
        split_seed: 5,
        first_batch: 0,
        dilate_label: false,
    }
}

fn batches(loader: &mut Loader, n: usize) -> Vec<Batch> {
    (0..n).map(|_| loader.next_batch().unwrap().expect("a training loader never ends")).collect()
}

fn same(a: &Batch, b: &Batch) -> bool {
    a.origins == b.origins
        && a.input.data() == b.input.data()
        && a.targets.iter().zip(&b.targets).all(|(x, y)| {
            x.name == y.name
                && x.scales.len() == y.scales.len()
                && x.scales.iter().zip(&y.scales).all(|(p, q)| p.data() == q.data())
        })
}

#[test]
fn batches_are_the_same_with_0_and_2_workers() {
    for sampling in ["random", "patch_search"] {
        let cfg = config(sampling);
        let dataset = || dataset(sampling == "random");
        let aug = Some(Augmentation { p_rotation: 0.5, p_scaling: 0.5, ..Augmentation::default() });
        let volumes = [0, 1];
        let mut inline = Loader::train(dataset(), &cfg, &volumes, options(0, aug.clone())).unwrap();
        let mut threaded = Loader::train(dataset(), &cfg, &volumes, options(2, aug)).unwrap();
        let (a, b) = (batches(&mut inline, 6), batches(&mut threaded, 6));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(same(x, y), "{sampling}: batch {i} differs between 0 and 2 workers");
        }
        assert!(!same(&a[0], &a[1]), "{sampling}: consecutive batches differ");
        let x = &a[0];
        assert_eq!(x.input.dims(), &[3, 8, 8, 8, 1]);
        assert_eq!(
            x.targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["sheet", "distance", "normals"]
        );
        // The mask stays binary after augmentation; uint16 normals decode to [-1, 1].
        assert!(x.targets[0].scales[0].data().iter().all(|&v| v == 0.0 || v == 1.0));
        let bad: Vec<f32> =
            x.targets[2].scales[0].data().iter().copied().filter(|v| v.abs() > 1.0 + 1e-5).collect();
        assert!(bad.is_empty(), "{sampling}: normals out of [-1, 1]: {:?}", &bad[..bad.len().min(10)]);
        // Another seed, another stream.
        let mut other =
            Loader::train(dataset(), &cfg, &volumes, LoaderOptions { seed: 12, ..options(0, None) }).unwrap();
        assert!(!same(&batches(&mut other, 1)[0], &a[0]));
    }
}

#[test]
fn deep_supervision_targets_have_every_scale() {
    let cfg = config("random");
    let strides = vec![[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]];
    let opts = LoaderOptions { deep_supervision_strides: strides.clone(), ..options(0, None) };
    let mut l = Loader::train(dataset(false), &cfg, &[0, 1], opts).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    for t in &b.targets {
        let dims: Vec<Vec<usize>> = t.scales.iter().map(|s| s.dims().to_vec()).collect();
        let c = t.scales[0].dims()[4];
        assert_eq!(dims, [vec![3, 8, 8, 8, c], vec![3, 4, 4, 4, c], vec![3, 2, 2, 2, c]], "{}", t.name);
    }
    // Labels: nnU-Net's nearest-exact downsampling; values and vectors: area means of the full map.
    let sheet = &b.targets[0].scales;
    let want = deep_supervision_labels(&sheet[0], &strides, LabelResample::NearestExact).unwrap();
    assert_eq!(sheet[1].data(), want[1].data());
    assert_eq!(sheet[2].data(), want[2].data());
    for t in [1, 2] {
        let d = &b.targets[t].scales;
        let c = d[0].dims()[4];
        let full = d[0].data();
        // Voxel (0, 0, 0) of scale s averages the first (8 / 2^s)^3 block of sample 0.
        for (s, k) in [(1, 2), (2, 4)] {
            for ch in 0..c {
                let mut sum = 0.0f64;
                for i in 0..k * k * k {
                    let (z, y, x) = (i / (k * k), (i / k) % k, i % k);
                    sum += full[((z * 8 + y) * 8 + x) * c + ch] as f64;
                }
                let mean = (sum / (k * k * k) as f64) as f32;
                assert!((d[s].data()[ch] - mean).abs() < 1e-5, "target {t} scale {s} channel {ch}");
            }
        }
    }
}

#[test]
fn deep_supervision_sizes_match_the_label_maps_for_odd_sizes() {
    // 10 -> 5 -> 2 (round half to even of 2.5): values follow the label maps' sizes.
    let strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]];
    let l = Tensor::zeros([1, 10, 6, 12, 1]);
    let maps = deep_supervision_labels(&l, &strides, LabelResample::NearestExact).unwrap();
    let sizes: Vec<[usize; 3]> = maps.iter().map(|m| [m.dims()[1], m.dims()[2], m.dims()[3]]).collect();
    assert_eq!(sizes, [[10, 6, 12], [5, 3, 6], [2, 2, 3]]);
    for s in sizes {
        assert_eq!(area_downsample(&l, s).unwrap().dims(), &[1, s[0], s[1], s[2], 1]);
    }
}

#[test]
fn a_volume_smaller_than_the_patch_is_padded_with_zeros() {
    let cfg = config("random");
    let ds = dataset(true);
    let mut l = Loader::train(Arc::clone(&ds), &cfg, &[2], options(0, None)).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    // Shape (6, 5, 7) in an 8^3 patch: nnU-Net's bounds leave one uniform start, offset (1, 1, 0)
    // ((8 - 6) / 2, (8 - 5) / 2, (8 - 7) / 2 rounded down). Sample 2 of 3 is centred on foreground
    // instead.
    let off = [1, 1, 0];
    let v = &ds.volumes[2];
    let raw = v.input.read([0, 0, 0], [6, 5, 7]).unwrap();
    let mean = raw.iter().map(|&x| x as f64).sum::<f64>() / raw.len() as f64;
    let std = (raw.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / raw.len() as f64).sqrt();
    let sheet = v.targets[0].read([0, 0, 0], [6, 5, 7]).unwrap();
    for s in 0..2 {
        assert_eq!(b.origins[s], (2, [0, 0, 0]));
        let input = &b.input.data()[s * 512..(s + 1) * 512];
        let label = &b.targets[0].scales[0].data()[s * 512..(s + 1) * 512];
        for z in 0..8 {
            for y in 0..8 {
                for x in 0..8 {
                    let i = (z * 8 + y) * 8 + x;
                    let inside =
                        [z, y, x].iter().zip(off).zip([6, 5, 7]).all(|((&p, o), n)| p >= o && p < o + n);
                    if inside {
                        let j = ((z - off[0]) * 5 + y - off[1]) * 7 + x - off[2];
                        let want = ((raw[j] as f64 - mean) / std) as f32;
                        assert!((input[i] - want).abs() < 1e-5, "({z},{y},{x})");
                        assert_eq!(label[i], sheet[j]);
                    } else {
                        assert_eq!((input[i], label[i]), (0.0, 0.0), "({z},{y},{x}) is padding");
                    }
                }
            }
        }
    }
}

#[test]
fn the_last_third_of_each_batch_is_on_foreground() {
    // A thin foreground slab (1 of 40 slices) that a uniform 8^3 patch usually misses.
    let ds = Arc::new(Dataset::from_volumes(vec![volume("thin", [40, 16, 16], 30..31)]));
    let cfg = config("random");
    let mut l = Loader::train(ds, &cfg, &[0], options(2, None)).unwrap();
    let (mut forced, mut total) = (0, 0);
    for b in batches(&mut l, 30) {
        let sheet = b.targets[0].scales[0].data();
        for s in 0..3 {
            let has_fg = sheet[s * 512..(s + 1) * 512].iter().any(|&v| v > 0.0);
            total += usize::from(has_fg);
            // B = 3: sample j is forced iff j >= round(3 * 0.67) = 2.
            if s == 2 {
                assert!(has_fg, "the forced sample holds foreground");
                forced += 1;
            }
        }
    }
    assert_eq!(forced, 30);
    assert!(total as f64 / 90.0 >= 1.0 / 3.0, "{total} of 90 patches on foreground");
}

#[test]
fn validation_repeats_a_fixed_list_and_ends_each_pass() {
    let cfg = config("patch_search");
    let ds = dataset(false);
    let mut l = Loader::validation(Arc::clone(&ds), &cfg, &[1], options(2, None), 2).unwrap();
    let pass = |l: &mut Loader| -> Vec<Batch> {
        let mut out = Vec::new();
        while let Some(b) = l.next_batch().unwrap() {
            out.push(b);
        }
        out
    };
    let (a, b) = (pass(&mut l), pass(&mut l));
    assert_eq!(a.len(), 2);
    assert!(a.iter().zip(&b).all(|(x, y)| same(x, y)), "every pass is the same list");
    assert!(a.iter().all(|x| x.origins.iter().all(|o| o.0 == 1)), "only the validation volume");
    // Un-augmented: the input is the volume's patch at the origin, z-scored.
    let (v, start) = a[0].origins[0];
    let raw = ds.volumes[v].input.read(start, [8, 8, 8]).unwrap();
    let all = ds.volumes[v].input.read([0, 0, 0], ds.volumes[v].input.shape()).unwrap();
    let mean = all.iter().map(|&x| x as f64).sum::<f64>() / all.len() as f64;
    let std = (all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
    for (got, x) in a[0].input.data()[..512].iter().zip(raw) {
        assert!((got - ((x as f64 - mean) / std) as f32).abs() < 1e-5);
    }
}

#[test]
fn one_volume_splits_its_patch_list() {
    let ds = Arc::new(Dataset::from_volumes(vec![volume("only", [40, 24, 24], 4..36)]));
    let cfg = config("patch_search");
    let mut train = Loader::train(Arc::clone(&ds), &cfg, &[0], options(0, None)).unwrap();
    let mut val = Loader::validation(ds, &cfg, &[0], options(0, None), 100).unwrap();
    let mut val_origins = Vec::new();
    while let Some(b) = val.next_batch().unwrap() {
        val_origins.extend(b.origins);
    }
    assert!(!val_origins.is_empty());
    let train_origins: Vec<_> = batches(&mut train, 20).into_iter().flat_map(|b| b.origins).collect();
    assert!(
        train_origins.iter().all(|o| !val_origins.contains(o)),
        "train and validation patches are disjoint"
    );
}

/// An array whose reads fail, as a corrupt chunk would.
struct Broken;

impl VolumeArray for Broken {
    fn name(&self) -> &str {
        "broken/input"
    }
    fn shape(&self) -> [usize; 3] {
        [16, 16, 16]
    }
    fn channels(&self) -> usize {
        1
    }
    fn dtype(&self) -> DType {
        DType::U8
    }
    fn read(&self, _: [usize; 3], _: [usize; 3]) -> Result<Vec<f32>> {
        bail!("broken/input: chunk 0.0.0 is corrupt")
    }
}

#[test]
fn a_worker_error_reaches_next_batch_naming_the_volume() {
    let mut v = volume("bad-volume", [16, 16, 16], 2..10);
    v.input = Arc::new(Broken);
    let mut cfg = config("random");
    cfg.normalization = vec![unet3d::config::Normalization::ScaleToUnit];
    let mut l =
        Loader::train(Arc::new(Dataset::from_volumes(vec![v])), &cfg, &[0], options(2, None)).unwrap();
    let e = format!("{:#}", l.next_batch().unwrap_err());
    assert!(e.contains("bad-volume") && e.contains("corrupt"), "{e}");
}

#[test]
fn zarr_volumes_load_and_cache_their_patch_search() {
    use unet3d::data::zarr::{ArraySpec, ChunkCache, ZarrWriter};
    let dir = std::env::temp_dir().join(format!("unet3d-loader-zarr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let shape = [16, 16, 16];
    let n: usize = shape.iter().product();
    let write = |name: &str, data: Vec<f32>| {
        let spec = ArraySpec {
            shape,
            channels: 1,
            chunks: [8, 8, 8],
            dtype: DType::U8,
            attributes: Default::default(),
        };
        ZarrWriter::create(&dir.join(name), &spec, false)
            .unwrap()
            .write_region([0; 3], shape, &data)
            .unwrap();
    };
    write("v.zarr/input", (0..n).map(|i| (i % 200) as f32).collect());
    write("v.zarr/sheet", (0..n).map(|i| f32::from(i / 256 >= 4 && i / 256 < 12)).collect());
    let p = |a: &str| dir.join("v.zarr").join(a).display().to_string();
    let yaml = format!(
        "dataset_config:\n  cache_folder: {}\n  min_bbox_percent: 0.5\n  targets:\n    \
         sheet: {{channels: 1, loss_fn: BCEWithLogitsLoss}}\n  volume_paths:\n    \
         - {{input: {}, sheet: {}, ref_label: sheet}}\n",
        dir.join("cache").display(),
        p("input"),
        p("sheet")
    );
    let cfg = Config::parse(&yaml, &[]).unwrap().config.dataset_config;
    let ds = Arc::new(Dataset::open(&cfg, ChunkCache::new(1 << 24)).unwrap());
    let opts =
        LoaderOptions { deep_supervision_strides: Vec::new(), ..options(2, Some(Augmentation::default())) };
    let mut l = Loader::train(ds, &cfg, &[0], opts).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    assert_eq!(b.input.dims(), &[3, 8, 8, 8, 1]);
    assert_eq!(b.targets[0].scales.len(), 1);
    let cached: Vec<_> = std::fs::read_dir(dir.join("cache")).unwrap().collect();
    assert_eq!(cached.len(), 1, "one cache file for the dataset");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_loader_started_at_batch_k_continues_the_stream() {
    for sampling in ["random", "patch_search"] {
        let cfg = config(sampling);
        let aug = Some(Augmentation::default());
        let mut whole = Loader::train(dataset(false), &cfg, &[0, 1], options(0, aug.clone())).unwrap();
        let all = batches(&mut whole, 7);
        for workers in [0, 2] {
            let opts = LoaderOptions { first_batch: 4, ..options(workers, aug.clone()) };
            let mut resumed = Loader::train(dataset(false), &cfg, &[0, 1], opts).unwrap();
            for (i, b) in batches(&mut resumed, 3).iter().enumerate() {
                assert!(same(b, &all[4 + i]), "{sampling}, {workers} workers: batch {} differs", 4 + i);
            }
        }
    }
}

/// `volume`'s arrays (sheet at z 2..18) with the input stored as float32 and NaN or infinity in
/// the slab `bad` (z slices) of the input.
fn with_non_finite(name: &str, shape: [usize; 3], bad: std::ops::Range<usize>) -> Volume {
    let mut v = volume(name, shape, 2..18);
    let mut input = v.input.read([0; 3], shape).unwrap();
    for (i, x) in input.iter_mut().enumerate() {
        if bad.contains(&(i / (shape[1] * shape[2]))) {
            *x = if i % 2 == 0 { f32::NAN } else { f32::INFINITY };
        }
    }
    v.input = Arc::new(InMemoryArray::new(format!("{name}/input"), shape, 1, DType::F32, input).unwrap());
    v
}

fn nan_config(policy: &str) -> DatasetConfig {
    let mut cfg = config("random");
    cfg.nan_policy = Config::parse(
        &format!(
            "dataset_config: {{nan_policy: {policy}, sampling: random, targets: {{a: {{channels: 1}}}}}}"
        ),
        &[],
    )
    .unwrap()
    .config
    .dataset_config
    .nan_policy;
    cfg
}

#[test]
fn non_finite_inputs_are_refused_by_name_replaced_or_skipped_as_the_policy_says() {
    let shape = [20, 12, 12];
    let ds = || Arc::new(Dataset::from_volumes(vec![with_non_finite("nan-vol", shape, 14..20)]));
    // error (the default), with the zscore statistics pass and without it.
    for norm in [unet3d::config::Normalization::ZScore, unet3d::config::Normalization::None] {
        let mut cfg = config("random");
        cfg.normalization = vec![norm];
        let e = format!("{:#}", Loader::train(ds(), &cfg, &[0], options(0, None)).err().expect("refused"));
        assert!(
            e.contains("nan-vol/input") && e.contains("[14, 0, 0]") && e.contains("nan_policy"),
            "{norm:?}: {e}"
        );
    }
    // replace: every patch is finite, and the replaced voxels read as the stated value.
    let mut cfg = nan_config("replace");
    cfg.nan_policy = unet3d::data::finite::NanPolicy::Replace(-7.0);
    cfg.normalization = vec![unet3d::config::Normalization::None];
    let mut l = Loader::train(ds(), &cfg, &[0], options(0, None)).unwrap();
    let mut replaced = 0;
    for b in batches(&mut l, 20) {
        assert!(b.input.data().iter().all(|x| x.is_finite()));
        replaced += b.input.data().iter().filter(|&&x| x == -7.0).count();
    }
    assert!(replaced > 0, "some patch reaches the replaced slab");
    // skip_patch: patches touching the slab are drawn again; the rest of the volume trains.
    let mut l = Loader::train(ds(), &nan_config("skip_patch"), &[0], options(0, None)).unwrap();
    for b in batches(&mut l, 20) {
        assert!(b.input.data().iter().all(|x| x.is_finite()));
        assert!(b.origins.iter().all(|(_, o)| o[0] + 8 <= 14), "{:?}", b.origins);
    }
    // A volume with no finite patch at all is an error, not a hang.
    let all_bad = Arc::new(Dataset::from_volumes(vec![with_non_finite("all-bad", shape, 0..20)]));
    let mut l = Loader::train(all_bad, &nan_config("skip_patch"), &[0], options(0, None)).unwrap();
    let e = format!("{:#}", l.next_batch().unwrap_err());
    assert!(e.contains("all-bad") && e.contains("skip_patch"), "{e}");
    // skip_patch with the patch search's list: a patch holding NaN is replaced by another of the
    // list (the NaN slab covers z 0..3, where some candidates start).
    let ds = Arc::new(Dataset::from_volumes(vec![with_non_finite("nan-list", shape, 0..3)]));
    let mut cfg = config("patch_search");
    cfg.nan_policy = unet3d::data::finite::NanPolicy::SkipPatch;
    let mut l = Loader::train(ds, &cfg, &[0], options(0, None)).unwrap();
    for b in batches(&mut l, 20) {
        assert!(b.input.data().iter().all(|x| x.is_finite()));
        assert!(b.origins.iter().all(|(_, o)| o[0] >= 3), "{:?}", b.origins);
    }
}

#[test]
fn label_values_outside_a_targets_range_are_errors_for_every_loss() {
    for (loss, channels, bad, allowed) in [
        ("BCEDiceLoss", 1, 2.0, "a mask value"),
        ("BCEWithLogitsLoss", 1, 7.0, "a mask value"),
        ("DC_and_CE_loss", 3, 3.0, "a class index in 0..3"),
        ("CrossEntropyLoss", 2, 0.5, "a class index in 0..2"),
    ] {
        let yaml = format!(
            "dataset_config: {{sampling: random, use_cache: false, targets: {{seg: {{channels: {channels}, loss_fn: {loss}}}}}}}"
        );
        let cfg = Config::parse(&yaml, &[]).unwrap().config.dataset_config;
        let shape = [10, 10, 10];
        let mut label = vec![0.0f32; 1000];
        label[(4 * 10 + 5) * 10 + 6] = 1.0;
        label[(7 * 10 + 2) * 10 + 3] = bad;
        let v = Volume {
            name: "labels".into(),
            input: Arc::new(
                InMemoryArray::new("labels/input", shape, 1, DType::U8, vec![1.0; 1000]).unwrap(),
            ),
            targets: vec![Arc::new(InMemoryArray::new("labels/seg", shape, 1, DType::U8, label).unwrap())],
            ref_label: 0,
        };
        let opts =
            LoaderOptions { patch_size: [10, 10, 10], deep_supervision_strides: vec![], ..options(0, None) };
        let mut l = Loader::train(Arc::new(Dataset::from_volumes(vec![v])), &cfg, &[0], opts).unwrap();
        let e = format!("{:#}", l.next_batch().unwrap_err());
        assert!(
            e.contains("labels/seg")
                && e.contains(&format!("value {bad}"))
                && e.contains("[7, 2, 3]")
                && e.contains(allowed),
            "{loss}: {e}"
        );
    }
}
