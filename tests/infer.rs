//! Sliding-window inference: nnU-Net's tile positions and Gaussian map against its own outputs,
//! blending with fixed models against whole-volume references, mirroring TTA, and the raw logits
//! of a one-window volume against the network's forward.

mod common;

use anyhow::Result;
use common::{fixture, fixture_path, rel_err};
use unet3d::config::{Activation, Config, Normalization, OutputType};
use unet3d::data::normalize::Normalizer;
use unet3d::data::zarr::{ChunkCache, ZarrArray};
use unet3d::data::{DType, InMemoryArray, VolumeArray};
use unet3d::device::Device;
use unet3d::infer::tiles::{overlap_box, steps};
use unet3d::infer::{
    Job, Layout, Mirroring, NetworkPredictor, OutputTarget, RunOptions, Shard, SlidingWindow, TileGrid,
    TilePredictor, gaussian, run,
};
use unet3d::model::{Network, init};
use unet3d::tensor::Tensor;

#[test]
fn tile_positions_match_nnunet() {
    let text = std::fs::read_to_string(fixture_path("sliding_window/steps.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let us = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
    };
    for case in cases {
        let (image, tile) = (us(&case["image_size"]), us(&case["tile_size"]));
        let step = case["tile_step_size"].as_f64().unwrap();
        let want: Vec<Vec<usize>> = case["steps"].as_array().unwrap().iter().map(us).collect();
        let got: Vec<Vec<usize>> = (0..3).map(|a| steps(image[a], tile[a], step)).collect();
        assert_eq!(got, want, "image {image:?} tile {tile:?} step {step}");
        // The grid takes the seed's overlap = 1 - step.
        let grid =
            TileGrid::new([image[0], image[1], image[2]], [tile[0], tile[1], tile[2]], 1.0 - step).unwrap();
        assert_eq!(grid.steps.to_vec(), want);
    }
}

#[test]
fn gaussian_map_matches_nnunet() {
    let f = fixture("sliding_window/gaussian_16x20x24.safetensors");
    let want = f.get("gaussian").unwrap();
    assert_eq!(want.dims(), &[16, 20, 24]);
    let got = gaussian::importance_map([16, 20, 24]);
    let e = rel_err(&got, want.data());
    assert!(e < 1e-6, "relative error {e:.2e}");
    let worst = got.iter().zip(want.data()).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-5, "worst voxel relative error {worst:.2e}");
}

/// Returns its input, once per target channel count (the input must have one channel).
struct Identity;

impl TilePredictor for Identity {
    fn in_channels(&self) -> usize {
        1
    }
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![batch.clone()])
    }
}

/// A 3x3x3 convolution with zero padding and a fixed asymmetric kernel, two output channels (the
/// convolution, and 2 x input + 1); its receptive field reaches one voxel.
struct FixedConv;

fn kernel(dz: usize, dy: usize, dx: usize) -> f32 {
    (dz * 9 + dy * 3 + dx) as f32 * 0.1 - 1.0
}

/// The convolution of a (D, H, W) volume, zero outside.
fn conv(v: &[f32], [d, h, w]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                let mut s = 0.0;
                for dz in 0..3 {
                    for dy in 0..3 {
                        for dx in 0..3 {
                            let (zz, yy, xx) = (z + dz, y + dy, x + dx);
                            if (1..=d).contains(&zz) && (1..=h).contains(&yy) && (1..=w).contains(&xx) {
                                s += kernel(dz, dy, dx) * v[((zz - 1) * h + yy - 1) * w + xx - 1];
                            }
                        }
                    }
                }
                out[(z * h + y) * w + x] = s;
            }
        }
    }
    out
}

impl TilePredictor for FixedConv {
    fn in_channels(&self) -> usize {
        1
    }
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
        let [n, d, h, w, _] = batch.shape().ndhwc()?;
        let per = d * h * w;
        let mut out = Vec::with_capacity(n * per * 2);
        for b in 0..n {
            let x = &batch.data()[b * per..(b + 1) * per];
            let y = conv(x, [d, h, w]);
            for (c, v) in y.iter().zip(x) {
                out.extend([*c, 2.0 * v + 1.0]);
            }
        }
        Ok(vec![Tensor::from_vec(vec![n, d, h, w, 2], out)?])
    }
}

/// Outputs each voxel's x position inside its window, whatever the input.
struct WindowX;

impl TilePredictor for WindowX {
    fn in_channels(&self) -> usize {
        1
    }
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
        let [n, d, h, w, _] = batch.shape().ndhwc()?;
        let out = (0..n * d * h * w).map(|i| (i % w) as f32).collect();
        Ok(vec![Tensor::from_vec(vec![n, d, h, w, 1], out)?])
    }
}

fn volume(shape: [usize; 3]) -> InMemoryArray {
    let n = shape.iter().product::<usize>();
    let data = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    InMemoryArray::new("vol", shape, 1, DType::F32, data).unwrap()
}

fn no_norm() -> Normalizer {
    Normalizer::new(&[Normalization::None], DType::F32, None, None).unwrap()
}

#[test]
fn identity_blends_back_to_the_volume_whatever_the_box() {
    // z shorter than the patch (padded), y and x tiled with overlap
    let shape = [5, 23, 30];
    let v = volume(shape);
    let norm = no_norm();
    let w = SlidingWindow::new(&v, &norm, &Identity, vec![1], [8, 8, 12], 0.5, 3).unwrap();
    assert!(w.grid.len() > 10);
    let mut batches = Vec::new();
    let whole = w.blend([0; 3], shape, &mut |n| batches.push(n)).unwrap().remove(0);
    assert_eq!(batches.iter().sum::<usize>(), w.grid.len());
    assert!(batches.iter().all(|&n| n <= 3));
    let e = rel_err(&whole, v.data());
    assert!(e < 1e-6, "identity: relative error {e:.2e}");
    // A box inside gives the same values, to the bit: each voxel sums the same windows in order.
    let (lo, size) = ([1, 7, 9], [3, 9, 14]);
    let part = w.blend(lo, size, &mut |_| {}).unwrap().remove(0);
    let reference = v.read(lo, size).unwrap();
    let whole_box = InMemoryArray::new("w", shape, 1, DType::F32, whole).unwrap().read(lo, size).unwrap();
    assert_eq!(part, whole_box);
    assert!(rel_err(&part, &reference) < 1e-6);
}

#[test]
fn fixed_conv_blends_to_its_whole_volume_output_inside_every_window() {
    let shape = [12, 14, 20];
    let patch = [8, 8, 8];
    let v = volume(shape);
    let norm = no_norm();
    let w = SlidingWindow::new(&v, &norm, &FixedConv, vec![2], patch, 0.5, 4).unwrap();
    let got = w.blend([0; 3], shape, &mut |_| {}).unwrap().remove(0);
    let want_conv = conv(v.data(), shape);
    // A voxel is exact when no window holding it has it on a border the volume does not share.
    let tiles = w.grid.all();
    let (mut checked, mut worst) = (0, 0.0f32);
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let p = [z, y, x];
                let interior = tiles.iter().all(|t| {
                    overlap_box(t.start, patch, p, [z + 1, y + 1, x + 1]).is_none()
                        || (0..3).all(|a| {
                            let local = p[a] as isize - t.start[a];
                            (local > 0 || p[a] == 0)
                                && (local < patch[a] as isize - 1 || p[a] == shape[a] - 1)
                        })
                });
                let i = (z * shape[1] + y) * shape[2] + x;
                // the pointwise channel is exact everywhere
                worst = worst.max((got[2 * i + 1] - (2.0 * v.data()[i] + 1.0)).abs());
                if interior {
                    checked += 1;
                    worst = worst.max((got[2 * i] - want_conv[i]).abs());
                }
            }
        }
    }
    assert!(checked > 300, "only {checked} voxels checked");
    assert!(worst < 1e-4, "worst difference {worst}");
}

#[test]
fn mirroring_averages_the_flipped_back_predictions() {
    let shape = [8, 8, 10];
    let v = volume(shape);
    let norm = no_norm();
    // An identity model is flip-equivariant: mirroring changes nothing.
    let mirrored = Mirroring::new(Identity, &[0, 1, 2], vec![false]).unwrap();
    let w = SlidingWindow::new(&v, &norm, &mirrored, vec![1], [8, 8, 10], 0.5, 2).unwrap();
    let e = rel_err(&w.blend([0; 3], shape, &mut |_| {}).unwrap()[0], v.data());
    assert!(e < 1e-6, "mirrored identity: relative error {e:.2e}");
    // A model that outputs its window x position is not: half the passes flip x back, so the mean
    // is the window centre (w - 1) / 2 everywhere.
    let mirrored = Mirroring::new(WindowX, &[0, 1, 2], vec![false]).unwrap();
    let batch = Tensor::zeros(vec![2, 8, 8, 10, 1]);
    let out = mirrored.predict(&batch).unwrap().remove(0);
    assert!(out.data().iter().all(|&x| x == 4.5), "{:?}", &out.data()[..10]);
    // Mirrored over z and y only, x is never flipped: the x position passes through.
    let out = Mirroring::new(WindowX, &[0, 1], vec![false]).unwrap().predict(&batch).unwrap().remove(0);
    assert_eq!(&out.data()[..10], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
}

/// Vectors (x, y, z) of the input's gradient: flip-equivariant once the components along the
/// flipped axes are negated, so mirroring a vector output must give it back.
struct Gradient;

impl TilePredictor for Gradient {
    fn in_channels(&self) -> usize {
        1
    }

    fn predict(&self, batch: &Tensor) -> anyhow::Result<Vec<Tensor>> {
        let [n, d, h, w, _] = batch.shape().ndhwc()?;
        let x = batch.data();
        let at = |s: usize, p: [usize; 3]| x[((s * d + p[0]) * h + p[1]) * w + p[2]];
        let mut out = Vec::with_capacity(batch.numel() * 3);
        for s in 0..n {
            for z in 0..d {
                for y in 0..h {
                    for xx in 0..w {
                        let p = [z, y, xx];
                        // channel c: the central difference along axis 2 - c, clamped at borders
                        for axis in [2, 1, 0] {
                            let size = [d, h, w][axis];
                            let (mut lo, mut hi) = (p, p);
                            lo[axis] = p[axis].saturating_sub(1);
                            hi[axis] = (p[axis] + 1).min(size - 1);
                            out.push(at(s, hi) - at(s, lo));
                        }
                    }
                }
            }
        }
        Ok(vec![Tensor::from_vec(vec![n, d, h, w, 3], out)?])
    }

    fn device(&self) -> Device {
        Device::Cpu
    }
}

#[test]
fn mirroring_negates_the_flipped_components_of_vector_outputs() {
    let v = volume([6, 7, 8]);
    let batch = Tensor::from_vec(vec![1, 6, 7, 8, 1], v.data().to_vec()).unwrap();
    let plain = Gradient.predict(&batch).unwrap().remove(0);
    let mirrored =
        Mirroring::new(Gradient, &[0, 1, 2], vec![true]).unwrap().predict(&batch).unwrap().remove(0);
    let e = rel_err(mirrored.data(), plain.data());
    assert!(e < 1e-6, "a vector output mirrored back: relative error {e:.2e}");
    // Without the negation the components would average towards zero.
    let scalar =
        Mirroring::new(Gradient, &[0, 1, 2], vec![false]).unwrap().predict(&batch).unwrap().remove(0);
    assert!(rel_err(scalar.data(), plain.data()) > 0.5);
}

fn tiny_config(patch: usize) -> Config {
    let yaml = format!(
        "tr_setup: {{autoconfigure: false}}\n\
         tr_config: {{patch_size: [{patch}, {patch}, {patch}], batch_size: 2}}\n\
         model_config: {{features_per_stage: [4, 8], strides: [1, 2], kernel_sizes: [3, 3], \
         n_blocks_per_stage: [1, 1], deep_supervision: false}}\n\
         dataset_config:\n  in_channels: 1\n  normalization: none\n  targets:\n    \
         sheet: {{channels: 2, activation: softmax}}\n    normals: {{channels: 3, loss_fn: MaskedCosineLoss}}\n"
    );
    Config::parse(&yaml, &[]).unwrap().config
}

#[test]
fn raw_logits_of_a_one_window_volume_equal_the_network_forward() {
    let config = tiny_config(8);
    let arch = config.architecture().unwrap();
    let store = init::initialize(&arch, 7).unwrap();
    let network = Network::new(&arch, &store).unwrap();
    let shape = [8, 8, 8];
    let v = volume(shape);
    let x = Tensor::from_vec(vec![1, 8, 8, 8, 1], v.data().to_vec()).unwrap();
    let want = network.predict(&store, &x, &[Activation::None, Activation::None]).unwrap();

    let names = ["sheet".to_string(), "normals".to_string()];
    let predictor = NetworkPredictor::new(network, store, &names).unwrap();
    let norm = no_norm();
    let window = SlidingWindow::new(&v, &norm, &predictor, vec![2, 3], [8, 8, 8], 0.25, 1).unwrap();
    let target = |name: &str, channels| OutputTarget {
        name: name.into(),
        channels,
        activation: Activation::None,
        vectors: false,
        output_type: OutputType::Float32,
        range: None,
        labels: None,
    };
    let job = Job {
        window,
        targets: vec![target("sheet", 2), target("normals", 3)],
        provenance: serde_json::json!({"model": "tiny, seed 7"}),
        geometry: Default::default(),
        pyramid_levels: 0,
        image: None,
    };
    let dir = std::env::temp_dir().join(format!("unet3d-infer-logits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = whole_job(&dir, 1 << 20);
    let summary = run(&job, &opts).unwrap();
    assert_eq!((summary.computed, summary.tiles, summary.done), (1, 1, true));
    let cache = ChunkCache::new(1 << 20);
    for (name, want) in names.iter().zip(&want) {
        let c = want.dims()[4];
        let arr = ZarrArray::open(&dir.join("predictions.zarr").join(name), c, &cache).unwrap();
        assert_eq!((arr.dtype(), arr.channels()), (DType::F32, c));
        let got = arr.read([0; 3], shape).unwrap();
        let e = rel_err(&got, want.data());
        assert!(e < 1e-6, "{name}: relative error {e:.2e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_in_the_input_is_an_error_naming_the_array() {
    let mut data = volume([6, 6, 6]).data().to_vec();
    data[100] = f32::NAN;
    let v = InMemoryArray::new("scan.zarr/input", [6, 6, 6], 1, DType::F32, data).unwrap();
    let norm = no_norm();
    let w = SlidingWindow::new(&v, &norm, &Identity, vec![1], [4, 4, 4], 0.5, 2).unwrap();
    let err = format!("{:#}", w.blend([0; 3], [6, 6, 6], &mut |_| {}).unwrap_err());
    assert!(err.contains("scan.zarr/input") && err.contains("NaN"), "{err}");
}

#[test]
fn demo_sized_network_blends_the_same_bytes_whatever_the_box() {
    // tasks/demo.yaml's network (features 8..64, 4 stages) on 32^3 windows: large enough for the
    // CPU convolutions to tile their rows by the batch, so batched windows would differ in the
    // last bits from the same windows batched otherwise.
    let yaml = "tr_config: {patch_size: [32, 32, 32]}\n\
        model_config: {base_features: 8, max_features: 64, n_blocks_per_stage: [1, 2, 2, 2]}\n\
        dataset_config: {in_channels: 1, targets: {sheet: {channels: 1}}}\n";
    let config = Config::parse(yaml, &[]).unwrap().config;
    let arch = config.architecture().unwrap();
    let store = init::initialize(&arch, 11).unwrap();
    let network = Network::new(&arch, &store).unwrap();
    let predictor = NetworkPredictor::new(network, store, &["sheet".to_string()]).unwrap();
    let shape = [32, 48, 48];
    let v = volume(shape);
    let norm = no_norm();
    let w = SlidingWindow::new(&v, &norm, &predictor, vec![1], [32, 32, 32], 0.5, 3).unwrap();
    assert_eq!(w.grid.len(), 4);
    let whole = w.blend([0; 3], shape, &mut |_| {}).unwrap().remove(0);
    // windows 1 and 3 only, batched together instead of with 0 and 2
    let (lo, size) = ([0, 0, 40], [32, 48, 8]);
    assert_eq!(w.tiles_for(lo, size), 2);
    let part = w.blend(lo, size, &mut |_| {}).unwrap().remove(0);
    let whole_box = InMemoryArray::new("w", shape, 1, DType::F32, whole).unwrap().read(lo, size).unwrap();
    assert!(part == whole_box, "a box's blend differs from the whole volume's");
}

/// One unsharded job into `dir`, blocks of at most `block_bytes`.
fn whole_job(dir: &std::path::Path, block_bytes: usize) -> RunOptions {
    RunOptions {
        layout: Layout::new(dir),
        shard: Shard::WHOLE,
        overwrite: false,
        max_blocks: None,
        deadline: None,
        interrupt: None,
        block_bytes,
        show_progress: false,
    }
}

/// Runs the tiny two-target network over `v` with mirroring on `device` into a fresh folder;
/// returns each target's written volume and the run's summary.
fn run_on(device: Device, v: &InMemoryArray, shape: [usize; 3]) -> (Vec<Vec<f32>>, unet3d::infer::Summary) {
    let config = tiny_config(8);
    let arch = config.architecture().unwrap();
    let mut store = init::initialize(&arch, 5).unwrap();
    store.to_device(device).unwrap();
    let network = Network::new(&arch, &store).unwrap();
    let names = ["sheet".to_string(), "normals".to_string()];
    let vectors = names.iter().map(|n| n == "normals").collect();
    let predictor =
        Mirroring::new(NetworkPredictor::new(network, store, &names).unwrap(), &[0, 1, 2], vectors).unwrap();
    assert_eq!(predictor.device(), device);
    let norm = no_norm();
    let window = SlidingWindow::new(v, &norm, &predictor, vec![2, 3], [8, 8, 8], 0.5, 3).unwrap();
    let target = |name: &str, channels, activation| OutputTarget {
        name: name.into(),
        channels,
        activation,
        vectors: false,
        output_type: OutputType::Float32,
        range: None,
        labels: None,
    };
    let targets = vec![target("sheet", 2, Activation::Softmax), target("normals", 3, Activation::None)];
    let job = Job {
        window,
        targets,
        provenance: serde_json::json!({"model": "tiny, seed 5"}),
        geometry: Default::default(),
        pyramid_levels: 0,
        image: None,
    };
    let dir = std::env::temp_dir().join(format!("unet3d-infer-{device}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = whole_job(&dir, 1 << 14);
    let summary = run(&job, &opts).unwrap();
    let cache = ChunkCache::new(1 << 20);
    let got = names
        .iter()
        .zip([2, 3])
        .map(|(name, c)| {
            let arr = ZarrArray::open(&dir.join("predictions.zarr").join(name), c, &cache).unwrap();
            arr.read([0; 3], shape).unwrap()
        })
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    (got, summary)
}

/// Inference of a volume on the sim: the network, mirroring and the Gaussian blending all on the
/// device, the CPU's output within 1e-5, and each finished block downloaded once (its blended
/// logits, nothing else).
#[test]
fn inference_on_the_sim_matches_the_cpu_and_downloads_each_block_once() {
    let shape = [10, 12, 14];
    let v = volume(shape);
    let (want, cpu) = run_on(Device::Cpu, &v, shape);
    assert!(cpu.device.is_empty(), "no device counters on the CPU");
    let (got, sim) = run_on(Device::Sim, &v, shape);
    assert_eq!((sim.computed, sim.tiles), (cpu.computed, cpu.tiles));
    assert!(sim.computed >= 4, "{} blocks", sim.computed);
    for (name, (g, w)) in ["sheet", "normals"].iter().zip(got.iter().zip(&want)) {
        let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max);
        assert!(worst <= 1e-5, "{name}: the sim is {worst:e} from the CPU");
    }
    assert_eq!(sim.device.len(), sim.computed);
    let blocks = unet3d::infer::Blocks::fitting(shape, [8, 8, 8], 4 * (1 + 5), 1 << 14).unwrap();
    for (b, c) in sim.device.iter().enumerate() {
        let (_, size) = blocks.block(b);
        let voxels: usize = size.iter().product();
        assert_eq!(c.device_to_host_bytes, (4 * voxels * 5) as u64, "block {b}: {c}");
        assert!(c.launches > 0, "block {b}: {c}");
    }
}
