//! Zarr volumes: hand-written v2 arrays read back voxel for voxel, v3 round trips through the
//! writer, channel axes, the chunk cache's decode counts, and the dataset's bad-input errors.

mod common;

use common::scratch_dir;
use std::path::Path;

use unet3d::config::Config;
use unet3d::data::dataset::Dataset;
use unet3d::data::zarr::{ArraySpec, ChunkCache, ZarrArray, ZarrWriter};
use unet3d::data::{DType, VolumeArray};

/// Writes a Zarr v2 array by hand: `.zarray` with no compressor and one raw file per chunk, in C
/// order, every chunk full size (edge chunks padded with 0 bytes), as zarr-python writes them.
fn write_v2(dir: &Path, shape: &[usize], chunks: &[usize], dtype: &str, value: impl Fn(&[usize]) -> Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let meta = serde_json::json!({
        "zarr_format": 2, "shape": shape, "chunks": chunks, "dtype": dtype, "compressor": null,
        "fill_value": 0, "order": "C", "filters": null,
    });
    std::fs::write(dir.join(".zarray"), meta.to_string()).unwrap();
    let elem = value(&vec![0; shape.len()]).len();
    let grid: Vec<usize> = shape.iter().zip(chunks).map(|(s, c)| s.div_ceil(*c)).collect();
    for chunk in product(&grid) {
        let mut bytes = Vec::new();
        for local in product(chunks) {
            let at: Vec<usize> = (0..shape.len()).map(|k| chunk[k] * chunks[k] + local[k]).collect();
            if at.iter().zip(shape).all(|(a, s)| a < s) {
                bytes.extend(value(&at));
            } else {
                bytes.extend(vec![0; elem]);
            }
        }
        let key: Vec<String> = chunk.iter().map(|i| i.to_string()).collect();
        std::fs::write(dir.join(key.join(".")), bytes).unwrap();
    }
}

/// Every index in a box of `shape`, last axis fastest.
fn product(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    for &n in shape {
        all = all
            .into_iter()
            .flat_map(|p: Vec<usize>| (0..n).map(move |i| [p.clone(), vec![i]].concat()))
            .collect();
    }
    all
}

/// The box of (D, H, W, C) channels-last values given by `f(z, y, x, c)`.
fn expected(
    start: [usize; 3],
    size: [usize; 3],
    c: usize,
    f: impl Fn(usize, usize, usize, usize) -> f32,
) -> Vec<f32> {
    let mut out = Vec::new();
    for z in start[0]..start[0] + size[0] {
        for y in start[1]..start[1] + size[1] {
            for x in start[2]..start[2] + size[2] {
                for ch in 0..c {
                    out.push(f(z, y, x, ch));
                }
            }
        }
    }
    out
}

fn cache() -> ChunkCache {
    ChunkCache::new(64 << 20)
}

#[test]
fn hand_written_v2_reads_voxel_for_voxel_with_partial_edge_chunks() {
    let dir = scratch_dir("v2");
    let path = dir.join("vol.zarr/input");
    let v = |z: usize, y: usize, x: usize| (z * 100 + y * 10 + x) as u16;
    write_v2(&path, &[5, 6, 7], &[2, 4, 4], "<u2", |i| v(i[0], i[1], i[2]).to_le_bytes().to_vec());
    let a = ZarrArray::open(&path, 1, &cache()).unwrap();
    assert_eq!((a.shape(), a.channels(), a.dtype()), ([5, 6, 7], 1, DType::U16));
    assert_eq!(a.chunk_shape(), [2, 4, 4]);
    // Whole array, and a box reaching into the last (partial) chunk on every axis.
    let all = a.read([0, 0, 0], [5, 6, 7]).unwrap();
    assert_eq!(all, expected([0, 0, 0], [5, 6, 7], 1, |z, y, x, _| v(z, y, x) as f32));
    let part = a.read([3, 2, 1], [2, 4, 6]).unwrap();
    assert_eq!(part, expected([3, 2, 1], [2, 4, 6], 1, |z, y, x, _| v(z, y, x) as f32));
    let err = format!("{:#}", a.read([3, 0, 0], [3, 1, 1]).unwrap_err());
    assert!(err.contains("vol.zarr/input") && err.contains("axis 0"), "{err}");
}

#[test]
fn v3_round_trip_for_every_dtype_with_round_and_clamp() {
    let dir = scratch_dir("v3");
    // (dtype, values written, values read back)
    let cases: [(DType, [f32; 4], [f32; 4]); 5] = [
        (DType::U8, [3.6, -5.0, 300.0, 254.4], [4.0, 0.0, 255.0, 254.0]),
        (DType::U16, [1.5, -1.0, 70000.0, 65534.6], [2.0, 0.0, 65535.0, 65535.0]),
        (DType::I16, [-2.5, -40000.0, 40000.0, 7.49], [-3.0, -32768.0, 32767.0, 7.0]),
        (DType::F32, [0.25, -1e30, 3.5e7, -0.125], [0.25, -1e30, 3.5e7, -0.125]),
        // numpy's float16: 0.1 -> 0.0999755859375, beyond 65504 -> inf, 1 + 2^-10 exact.
        (
            DType::F16,
            [0.1, -70000.0, 1.000_976_6, 65504.0],
            [0.099_975_586, f32::NEG_INFINITY, 1.000_976_6, 65504.0],
        ),
    ];
    for (dtype, written, read) in cases {
        for channels in [1, 2] {
            let path = dir.join(format!("{}-{channels}.zarr/input", dtype.name()));
            let mut attributes = serde_json::Map::new();
            attributes.insert("spacing".into(), serde_json::json!([1.0, 2.0, 3.0]));
            let spec = ArraySpec { shape: [5, 6, 7], channels, chunks: [2, 3, 4], dtype, attributes };
            let w = ZarrWriter::create(&path, &spec, false).unwrap();
            // Voxel value i cycles through `written`; a second, offset write replaces a box.
            let n = 5 * 6 * 7 * channels;
            let data: Vec<f32> = (0..n).map(|i| written[i % 4]).collect();
            w.write_region([0, 0, 0], [5, 6, 7], &data).unwrap();
            let patch: Vec<f32> = (0..2 * 3 * 3 * channels).map(|i| written[(i + 1) % 4]).collect();
            w.write_region([3, 1, 4], [2, 3, 3], &patch).unwrap();

            let a = ZarrArray::open(&path, channels, &cache()).unwrap();
            assert_eq!((a.shape(), a.channels(), a.dtype()), ([5, 6, 7], channels, dtype));
            assert_eq!(a.attributes()["spacing"], serde_json::json!([1.0, 2.0, 3.0]));
            let got = a.read([0, 0, 0], [5, 6, 7]).unwrap();
            let want = expected([0, 0, 0], [5, 6, 7], channels, |z, y, x, c| {
                let inside = (3..5).contains(&z) && (1..4).contains(&y) && (4..7).contains(&x);
                if inside {
                    let i = (((z - 3) * 3 + (y - 1)) * 3 + (x - 4)) * channels + c;
                    read[(i + 1) % 4]
                } else {
                    read[((((z * 6) + y) * 7 + x) * channels + c) % 4]
                }
            });
            assert_eq!(got, want, "{} with {channels} channels", dtype.name());
            let reopened = ZarrWriter::open(&path).unwrap();
            assert_eq!(reopened.spec(), &spec, "{}", dtype.name());
        }
    }
}

#[test]
fn channel_axis_first_or_last_and_last_wins_a_tie() {
    let dir = scratch_dir("channels");
    let f = |z: usize, y: usize, x: usize, c: usize| (c * 1000 + z * 100 + y * 10 + x) as f32;
    // Channel-first (C, D, H, W), big-endian int16, chunked along the channels too.
    let first = dir.join("first");
    write_v2(&first, &[3, 4, 5, 6], &[2, 3, 2, 4], ">i2", |i| {
        (f(i[1], i[2], i[3], i[0]) as i16).to_be_bytes().to_vec()
    });
    let a = ZarrArray::open(&first, 3, &cache()).unwrap();
    assert_eq!((a.shape(), a.channels(), a.dtype()), ([4, 5, 6], 3, DType::I16));
    assert_eq!(a.chunk_shape(), [3, 2, 4]);
    assert_eq!(a.read([1, 1, 1], [3, 4, 5]).unwrap(), expected([1, 1, 1], [3, 4, 5], 3, f));

    // Channel-last (D, H, W, C) float32; also shape (3, 4, 5, 3): both ends have 3, last wins.
    for (name, shape) in [("last", [4, 5, 6, 3]), ("tie", [3, 4, 5, 3])] {
        let path = dir.join(name);
        write_v2(&path, &shape, &[3, 3, 4, 3], "<f4", |i| f(i[0], i[1], i[2], i[3]).to_le_bytes().to_vec());
        let a = ZarrArray::open(&path, 3, &cache()).unwrap();
        assert_eq!((a.shape(), a.channels()), ([shape[0], shape[1], shape[2]], 3), "{name}");
        let size = [shape[0] - 1, shape[1] - 2, shape[2] - 1];
        assert_eq!(a.read([1, 2, 1], size).unwrap(), expected([1, 2, 1], size, 3, f), "{name}");
    }
    // A 4D array whose ends both differ from the expected count.
    let err = format!("{:#}", ZarrArray::open(&first, 2, &cache()).err().unwrap());
    assert!(err.contains("first") && err.contains("[3, 4, 5, 6]") && err.contains("channel"), "{err}");
}

#[test]
fn cache_decodes_each_chunk_once_and_a_bounded_cache_evicts() {
    let dir = scratch_dir("cache");
    let path = dir.join("a");
    // 8^3 float32 in 4^3 chunks: 8 chunks of 256 bytes.
    write_v2(&path, &[8, 8, 8], &[4, 4, 4], "<f4", |i| {
        ((i[0] * 64 + i[1] * 8 + i[2]) as f32).to_le_bytes().to_vec()
    });
    let big = cache();
    let a = ZarrArray::open(&path, 1, &big).unwrap();
    a.read([0, 0, 0], [4, 4, 8]).unwrap(); // chunks (0,0,0), (0,0,1)
    let s = big.stats();
    assert_eq!((s.hits, s.misses, s.bytes), (0, 2, 512));
    a.read([2, 0, 0], [4, 4, 8]).unwrap(); // the same two and (1,0,0), (1,0,1)
    let s = big.stats();
    assert_eq!((s.hits, s.misses, s.bytes), (2, 4, 1024));
    // A second array on the same cache: its chunks are its own.
    let b = ZarrArray::open(&path, 1, &big).unwrap();
    assert_eq!(b.read([0, 0, 0], [1, 1, 1]).unwrap(), vec![0.0]);
    assert_eq!(big.stats().misses, 5);

    // Room for two chunks: reading four evicts the oldest two, which decode again.
    let small = ChunkCache::new(512);
    let a = ZarrArray::open(&path, 1, &small).unwrap();
    let box4 = a.read([0, 0, 0], [8, 4, 4]).unwrap(); // chunks (0,0,0), (1,0,0)
    a.read([0, 0, 4], [8, 4, 4]).unwrap(); // (0,0,1), (1,0,1) evict the first two
    assert_eq!(small.stats().misses, 4);
    assert!(small.stats().bytes <= 512);
    assert_eq!(a.read([0, 0, 0], [8, 4, 4]).unwrap(), box4);
    let s = small.stats();
    assert_eq!((s.hits, s.misses, s.bytes), (0, 6, 512));
    // One chunk at a time (a read decodes its chunks in parallel, so their order is not fixed):
    // a cached chunk is a hit and becomes the most recently used, so the next miss evicts the
    // other one.
    a.read([4, 0, 0], [1, 1, 1]).unwrap(); // (1,0,0), cached
    assert_eq!(small.stats().hits, 1);
    a.read([4, 0, 4], [1, 1, 1]).unwrap(); // (1,0,1) was evicted: a miss that evicts (0,0,0)
    assert_eq!((small.stats().hits, small.stats().misses), (1, 7));
    a.read([4, 0, 0], [1, 1, 1]).unwrap();
    assert_eq!(small.stats().hits, 2, "(1,0,0) was used last and stayed");
    a.read([0, 0, 0], [1, 1, 1]).unwrap();
    assert_eq!((small.stats().hits, small.stats().misses), (2, 8), "(0,0,0) was the one evicted");
}

#[test]
fn writer_refuses_an_existing_array_unless_told_to_overwrite() {
    let dir = scratch_dir("overwrite");
    let path = dir.join("case.zarr/label");
    let spec = ArraySpec {
        shape: [2, 2, 2],
        channels: 1,
        chunks: [2, 2, 2],
        dtype: DType::U8,
        attributes: Default::default(),
    };
    ZarrWriter::create(&path, &spec, false).unwrap().write_region([0; 3], [2; 3], &[1.0; 8]).unwrap();
    assert!(dir.join("case.zarr/zarr.json").is_file(), "the .zarr directory is a group");
    let err = format!("{:#}", ZarrArray::open(&dir.join("case.zarr"), 1, &cache()).err().unwrap());
    assert!(err.contains("case.zarr: a Zarr group, not an array"), "{err}");
    let err = format!("{:#}", ZarrWriter::create(&path, &spec, false).err().unwrap());
    assert!(err.contains("case.zarr/label") && err.contains("already exists"), "{err}");
    assert_eq!(ZarrArray::open(&path, 1, &cache()).unwrap().read([0; 3], [2; 3]).unwrap(), vec![1.0; 8]);
    ZarrWriter::create(&path, &spec, true).unwrap();
    assert_eq!(ZarrArray::open(&path, 1, &cache()).unwrap().read([0; 3], [2; 3]).unwrap(), vec![0.0; 8]);
}

/// A config with targets `sheet` (1 channel) and `normals` (3), one volume per (input, sheet,
/// normals) path triple.
fn config(dir: &Path, in_channels: usize, volumes: &[[&str; 3]]) -> unet3d::config::DatasetConfig {
    let mut yaml = format!(
        "dataset_config:\n  in_channels: {in_channels}\n  targets:\n    sheet: {{channels: 1}}\n    \
         normals: {{channels: 3, loss_fn: MaskedCosineLoss}}\n  volume_paths:\n"
    );
    for [i, s, n] in volumes {
        let p = |x: &str| dir.join(x).display().to_string();
        yaml +=
            &format!("    - {{input: {}, sheet: {}, normals: {}, ref_label: normals}}\n", p(i), p(s), p(n));
    }
    Config::parse(&yaml, &[]).unwrap().config.dataset_config
}

fn write(path: &Path, shape: [usize; 3], channels: usize, dtype: DType) {
    let spec = ArraySpec { shape, channels, chunks: [4, 4, 4], dtype, attributes: Default::default() };
    let w = ZarrWriter::create(path, &spec, false).unwrap();
    w.write_region([0; 3], shape, &vec![1.0; shape.iter().product::<usize>() * channels]).unwrap();
}

#[test]
fn dataset_opens_checked_volumes_and_names_what_is_wrong() {
    let dir = scratch_dir("dataset");
    write(&dir.join("v0.zarr/input"), [6, 5, 4], 1, DType::U8);
    write(&dir.join("v0.zarr/sheet"), [6, 5, 4], 1, DType::U8);
    write(&dir.join("v0.zarr/normals"), [6, 5, 4], 3, DType::F32);
    write(&dir.join("v1.zarr/input"), [6, 5, 4], 2, DType::U16);
    write(&dir.join("v1.zarr/sheet"), [6, 5, 3], 1, DType::U8);
    write(&dir.join("v1.zarr/normals"), [6, 5, 4], 2, DType::F32);
    write_v2(&dir.join("f64"), &[6, 5, 4], &[6, 5, 4], "<f8", |_| 1f64.to_le_bytes().to_vec());

    let good = ["v0.zarr/input", "v0.zarr/sheet", "v0.zarr/normals"];
    let ds = Dataset::open(&config(&dir, 1, &[good, good]), cache()).unwrap();
    assert_eq!(ds.volumes.len(), 2);
    let v = &ds.volumes[1];
    assert_eq!((v.name.as_str(), v.ref_label, v.targets.len()), ("v0.zarr", 1, 2));
    assert_eq!((v.input.dtype(), v.targets[1].channels(), v.targets[1].shape()), (DType::U8, 3, [6, 5, 4]));

    let open_err = |in_channels: usize, bad: [&str; 3]| {
        // Volume 0 is valid either way; volume 1 is the bad one.
        let first = if in_channels == 2 { ["v1.zarr/input", good[1], good[2]] } else { good };
        let cfg = config(&dir, in_channels, &[first, bad]);
        format!("{:#}", Dataset::open(&cfg, cache()).err().expect("an error"))
    };
    let check = |err: &str, key: &str, path: &str, what: &str| {
        let key = format!("dataset_config.volume_paths[1].{key}");
        assert!(
            err.contains("volume 1") && err.contains(&key) && err.contains(path) && err.contains(what),
            "{err}"
        );
    };
    // A missing array.
    let err = open_err(1, ["v0.zarr/input", "v0.zarr/nothing", "v0.zarr/normals"]);
    check(&err, "sheet", "v0.zarr/nothing", "no Zarr array");
    // A target whose shape differs from the input's.
    let err = open_err(1, ["v0.zarr/input", "v1.zarr/sheet", "v0.zarr/normals"]);
    check(&err, "sheet", "v1.zarr/sheet", "[6, 5, 3] differs from the input's [6, 5, 4]");
    // An unsupported dtype.
    let err = open_err(1, ["f64", "v0.zarr/sheet", "v0.zarr/normals"]);
    check(&err, "input", "f64", "float64");
    assert!(err.contains("is not supported (uint8, uint16, int16, float32 or float16)"), "{err}");
    // Channel counts: a 3D input where 2 channels are expected, normals with 2 channels not 3.
    let err = open_err(2, ["v0.zarr/input", "v0.zarr/sheet", "v0.zarr/normals"]);
    check(&err, "input", "v0.zarr/input", "but 2 are expected");
    let err = open_err(1, ["v0.zarr/input", "v0.zarr/sheet", "v1.zarr/normals"]);
    check(&err, "normals", "v1.zarr/normals", "no channel axis of length 3");
    // A 2-channel input opens when in_channels says 2.
    let cfg = config(&dir, 2, &[["v1.zarr/input", "v0.zarr/sheet", "v0.zarr/normals"]]);
    assert_eq!(Dataset::open(&cfg, cache()).unwrap().volumes[0].input.channels(), 2);
    // A Dice + CE target over 3 classes is stored as one class-index map.
    let p = |x: &str| dir.join(x).display().to_string();
    let yaml = format!(
        "dataset_config:\n  targets:\n    seg: {{channels: 3, loss_fn: DiceCELoss}}\n  volume_paths:\n    \
         - {{input: {}, seg: {}, ref_label: seg}}\n",
        p("v0.zarr/input"),
        p("v0.zarr/sheet")
    );
    let cfg = Config::parse(&yaml, &[]).unwrap().config.dataset_config;
    assert_eq!(Dataset::open(&cfg, cache()).unwrap().volumes[0].targets[0].channels(), 1);
}

#[test]
fn example_data_is_the_demo_layout_consistent_and_deterministic() {
    use unet3d::data::example::{DISTANCE_CLIP, ExampleOptions, synth_volume, write_example_data};
    let dir = scratch_dir("example");
    let opts = ExampleOptions { volumes: 2, size: 24, seed: 7, overwrite: false };
    let written = write_example_data(&dir, &opts).unwrap();
    assert_eq!(written, vec![dir.join("volume0.zarr"), dir.join("volume1.zarr")]);
    let arrays = [
        ("input", 1, DType::U8),
        ("sheet", 1, DType::U8),
        ("distance", 1, DType::F32),
        ("normals", 3, DType::F32),
    ];
    let mut volumes = Vec::new();
    for v in &written {
        let read: Vec<Vec<f32>> = arrays
            .iter()
            .map(|&(name, channels, dtype)| {
                let a = ZarrArray::open(&v.join(name), channels, &cache()).unwrap();
                assert_eq!((a.shape(), a.dtype()), ([24; 3], dtype), "{name}");
                a.read([0; 3], [24; 3]).unwrap()
            })
            .collect();
        let [input, sheet, distance, normals] = <[Vec<f32>; 4]>::try_from(read).unwrap();
        let on = sheet.iter().filter(|&&s| s == 1.0).count();
        assert!(on > 24 * 24 && on < 24 * 24 * 12, "{on} sheet voxels: a few sheets, not empty, not full");
        for i in 0..24 * 24 * 24 {
            assert!(sheet[i] == 0.0 || sheet[i] == 1.0);
            assert_eq!(sheet[i] == 1.0, distance[i] < 1.0, "voxel {i}: the sheet is where distance < 1");
            assert!((0.0..=DISTANCE_CLIP).contains(&distance[i]));
            let n = &normals[3 * i..3 * i + 3];
            let len = n.iter().map(|c| c * c).sum::<f32>().sqrt();
            if distance[i] < DISTANCE_CLIP {
                assert!((len - 1.0).abs() < 1e-5, "voxel {i}: normal {n:?} is not unit");
            } else {
                assert_eq!(len, 0.0, "voxel {i}: no normal beyond the clip");
            }
        }
        // The rendering is brighter on the sheets than off them.
        let mean = |on: bool| {
            let v: Vec<f32> =
                (0..input.len()).filter(|&i| (sheet[i] == 1.0) == on).map(|i| input[i]).collect();
            v.iter().sum::<f32>() / v.len() as f32
        };
        assert!(mean(true) > mean(false) + 50.0, "{} vs {}", mean(true), mean(false));
        volumes.push(input);
    }
    assert_ne!(volumes[0], volumes[1], "volumes differ");
    // The same seed gives the same data; another seed other data.
    assert_eq!(synth_volume(16, 3), synth_volume(16, 3));
    assert_ne!(synth_volume(16, 3).distance, synth_volume(16, 4).distance);
    // tasks/demo.yaml opens the data where it expects it.
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tasks/demo.yaml")).unwrap();
    let demo = demo.replace("./demo/data", &dir.display().to_string());
    let ds = Config::parse(&demo, &[]).unwrap().config.dataset_config;
    let opened = Dataset::open(&ds, cache()).unwrap();
    assert_eq!(opened.volumes.len(), 2);
    assert_eq!(opened.volumes[0].targets.iter().map(|t| t.channels()).collect::<Vec<_>>(), vec![1, 1, 3]);
    // Writing again is refused unless told to overwrite.
    let err = format!("{:#}", write_example_data(&dir, &opts).unwrap_err());
    assert!(err.contains("volume0.zarr/input") && err.contains("already exists"), "{err}");
    write_example_data(&dir, &ExampleOptions { overwrite: true, ..opts }).unwrap();
}

/// Sizes in the metadata are checked before they allocate: a chunk larger than memory and a
/// shape beyond counting are errors naming the array, never an abort.
#[test]
fn metadata_sizes_that_cannot_be_allocated_are_errors() {
    let dir = scratch_dir("huge-meta");
    let meta = |shape: serde_json::Value, chunk: serde_json::Value| {
        serde_json::json!({
            "zarr_format": 3, "node_type": "array", "shape": shape, "data_type": "uint8",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0, "codecs": [{"name": "bytes"}],
        })
    };
    for (name, m, want) in [
        (
            "chunk",
            meta(serde_json::json!([100000, 100000, 100000]), serde_json::json!([100000, 100000, 100000])),
            "chunk_shape",
        ),
        (
            "shape",
            meta(serde_json::json!([u64::MAX, u64::MAX, 2]), serde_json::json!([8, 8, 8])),
            "more voxels",
        ),
    ] {
        let a = dir.join(name);
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("zarr.json"), m.to_string()).unwrap();
        let e = format!("{:#}", ZarrArray::open(&a, 1, &cache()).err().expect("refused"));
        assert!(e.contains(&a.display().to_string()) && e.contains(want), "{name}: {e}");
    }
}

/// Every chunk unet3d writes is stored (all-zero ones too), so a chunk missing from an input is
/// an incomplete copy: an error naming it, unless allow_missing_chunks; targets may be sparse.
#[test]
fn a_missing_input_chunk_is_an_error_unless_allowed() {
    let dir = scratch_dir("missing-chunk");
    let spec = ArraySpec {
        shape: [8, 4, 4],
        channels: 1,
        chunks: [4, 4, 4],
        dtype: DType::U8,
        attributes: Default::default(),
    };
    for name in ["v.zarr/input", "v.zarr/sheet"] {
        // All zeros: zarrs would skip every chunk by default.
        ZarrWriter::create(&dir.join(name), &spec, false)
            .unwrap()
            .write_region([0; 3], [8, 4, 4], &[0.0; 128])
            .unwrap();
        assert!(dir.join(name).join("c/1/0/0").is_file(), "{name}: the all-zero chunk is stored");
    }
    write(&dir.join("v.zarr/normals"), [8, 4, 4], 3, DType::F32);
    for name in ["v.zarr/input", "v.zarr/sheet"] {
        std::fs::remove_file(dir.join(name).join("c/1/0/0")).unwrap();
    }
    let volumes = [["v.zarr/input", "v.zarr/sheet", "v.zarr/normals"]];
    let ds = Dataset::open(&config(&dir, 1, &volumes), cache()).unwrap();
    let v = &ds.volumes[0];
    let e = format!("{:#}", v.input.read([0; 3], [8, 4, 4]).unwrap_err());
    assert!(
        e.contains("v.zarr/input")
            && e.contains("chunk [1, 0, 0] is missing")
            && e.contains("allow_missing_chunks"),
        "{e}"
    );
    assert_eq!(
        v.targets[0].read([0; 3], [8, 4, 4]).unwrap(),
        vec![0.0; 128],
        "a sparse target reads as fill"
    );
    let mut allowed = config(&dir, 1, &volumes);
    allowed.allow_missing_chunks = true;
    let ds = Dataset::open(&allowed, cache()).unwrap();
    assert_eq!(ds.volumes[0].input.read([0; 3], [8, 4, 4]).unwrap(), vec![0.0; 128]);
}
