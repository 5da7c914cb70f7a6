//! Streaming inference into Zarr: sharded jobs and a killed-and-rerun job give the bytes of one
//! unsharded run, a finished or foreign output is never overwritten without --overwrite, and the
//! `unet3d infer` command runs end to end from a config, a weights file and a Zarr input.

mod common;

use common::{files_under, scratch_dir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use unet3d::cli::Cli;
use unet3d::config::{Activation, Config, Normalization, OutputType};
use unet3d::data::finite::NanPolicy;
use unet3d::data::normalize::Normalizer;
use unet3d::data::zarr::{ArraySpec, ChunkCache, ZarrArray, ZarrWriter};
use unet3d::data::{DType, InMemoryArray, VolumeArray};
use unet3d::infer::{Job, Layout, NetworkPredictor, OutputTarget, RunOptions, SlidingWindow, Summary, run};
use unet3d::model::{Network, init, weights};

const YAML: &str = "tr_setup: {autoconfigure: false}\n\
    tr_config: {patch_size: [8, 8, 8], batch_size: 2}\n\
    model_config: {features_per_stage: [4, 8], strides: [1, 2], kernel_sizes: [3, 3], \
    n_blocks_per_stage: [1, 1], deep_supervision: false}\n\
    dataset_config:\n  in_channels: 1\n  normalization: zscore\n  targets:\n    \
    sheet: {channels: 1, activation: sigmoid}\n    normals: {channels: 3, loss_fn: MaskedCosineLoss}\n\
    inference_config: {patch_size: [8, 8, 8], batch_size: 3, overlap: 0.5, mirroring: false}\n";

const SHAPE: [usize; 3] = [13, 17, 20];

fn volume() -> InMemoryArray {
    let n = SHAPE.iter().product::<usize>();
    let data = (0..n).map(|i| (i * 53 % 251) as f32).collect();
    InMemoryArray::new("vol", SHAPE, 1, DType::U8, data).unwrap()
}

/// Everything that decides the output of the tests' runs.
struct Model {
    network: Network,
    store: unet3d::ParamStore,
}

fn model() -> Model {
    let config = Config::parse(YAML, &[]).unwrap().config;
    let arch = config.architecture().unwrap();
    let store = init::initialize(&arch, 3).unwrap();
    Model { network: Network::new(&arch, &store).unwrap(), store }
}

fn targets() -> Vec<OutputTarget> {
    vec![
        OutputTarget {
            name: "sheet".into(),
            channels: 1,
            activation: Activation::Sigmoid,
            vectors: false,
            output_type: OutputType::Uint8,
            range: None,
            labels: None,
        },
        OutputTarget {
            name: "normals".into(),
            channels: 3,
            activation: Activation::None,
            vectors: true,
            output_type: OutputType::Uint16,
            range: None,
            labels: None,
        },
    ]
}

fn options(dir: &Path, shard: &str) -> RunOptions {
    RunOptions {
        layout: Layout::new(dir),
        shard: shard.parse().unwrap(),
        overwrite: false,
        max_blocks: None,
        deadline: None,
        interrupt: None,
        // one 8^3 chunk per block: 2 x 3 x 3 = 18 blocks
        block_bytes: 8 * 8 * 8 * 4 * 5,
        show_progress: false,
    }
}

/// Runs the tests' job with `overlap` (part of what is recorded) into `opts.output_path`.
fn infer(m: &Model, overlap: f64, opts: &RunOptions) -> anyhow::Result<Summary> {
    infer_targets(m, overlap, opts, targets(), 0)
}

/// The job writing only `targets`, with `pyramid_levels` below full resolution.
fn infer_targets(
    m: &Model,
    overlap: f64,
    opts: &RunOptions,
    targets: Vec<OutputTarget>,
    pyramid_levels: usize,
) -> anyhow::Result<Summary> {
    let v = volume();
    let norm = Normalizer::for_volume(&v, &[Normalization::ZScore], None, NanPolicy::Error).unwrap();
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let predictor = NetworkPredictor::new(m.network.clone(), m.store.clone(), &names).unwrap();
    let channels = targets.iter().map(|t| t.channels).collect();
    let window = SlidingWindow::new(&v, &norm, &predictor, channels, [8, 8, 8], overlap, 3).unwrap();
    let provenance = serde_json::json!({"model": "tiny, seed 3", "normalization": format!("{norm:?}")});
    run(&Job { window, targets, provenance, geometry: Default::default(), pyramid_levels, image: None }, opts)
}

/// Every file of the store (arrays and their chunks) by relative path.
fn store_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(&dir.join("predictions.zarr"))
}

#[test]
fn shards_and_a_killed_rerun_give_the_bytes_of_one_run() {
    let m = model();
    let whole = scratch_dir("whole");
    let s = infer(&m, 0.5, &options(&whole, "0/1")).unwrap();
    assert_eq!((s.blocks.clone(), s.computed, s.skipped, s.done), (0..18, 18, 0, true));
    let reference = store_files(&whole);
    // 2 targets x 18 chunks, their zarr.json and the group's
    assert_eq!(reference.len(), 2 * 18 + 3, "{:?}", reference.keys().collect::<Vec<_>>());

    // Values are plausible: sigmoid in (0, 255), normals of unit length.
    let cache = ChunkCache::new(1 << 20);
    let sheet = ZarrArray::open(&whole.join("predictions.zarr/sheet"), 1, &cache).unwrap();
    assert_eq!(sheet.dtype(), DType::U8);
    let normals = ZarrArray::open(&whole.join("predictions.zarr/normals"), 3, &cache).unwrap();
    let n = normals.read([0; 3], SHAPE).unwrap();
    for u in n.chunks(3) {
        let len: f32 = u.iter().map(|x| (x / 65535.0 * 2.0 - 1.0).powi(2)).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-3, "normal {u:?} has length {len}");
    }

    let sharded = scratch_dir("sharded");
    let mut covered = Vec::new();
    for shard in ["1/3", "0/3", "2/3"] {
        let s = infer(&m, 0.5, &options(&sharded, shard)).unwrap();
        assert_eq!((s.computed, s.skipped), (6, 0), "shard {shard}");
        covered.extend(s.blocks);
    }
    covered.sort();
    assert_eq!(covered, (0..18).collect::<Vec<_>>());
    assert!(store_files(&sharded) == reference, "sharded output differs from the unsharded one");

    let killed = scratch_dir("killed");
    let first = infer(&m, 0.5, &RunOptions { max_blocks: Some(5), ..options(&killed, "0/1") }).unwrap();
    assert_eq!((first.computed, first.done), (5, false));
    let rest = infer(&m, 0.5, &options(&killed, "0/1")).unwrap();
    assert_eq!((rest.computed, rest.skipped, rest.done), (13, 5, true));
    assert!(store_files(&killed) == reference, "killed and rerun output differs from one run");

    // A rerun of a finished output computes nothing and changes nothing.
    let again = infer(&m, 0.5, &options(&whole, "0/1")).unwrap();
    assert_eq!((again.computed, again.skipped), (0, 18));
    assert!(store_files(&whole) == reference);
    for d in [whole, sharded, killed] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Levels below full resolution come from the streaming pass: shards that never see each other's
/// blocks write the bytes of one run, a label map's level takes every f-th voxel, a value's level
/// the mean of its box, and the group describes the label map's levels as one OME-Zarr image.
#[test]
fn pyramid_levels_from_shards_reduce_the_full_resolution() {
    let m = model();
    let mut ts = targets();
    ts[0].labels = Some(unet3d::config::LabelRule::Threshold);
    let whole = scratch_dir("pyramid-whole");
    infer_targets(&m, 0.5, &options(&whole, "0/1"), ts.clone(), 2).unwrap();
    let reference = store_files(&whole);
    let sharded = scratch_dir("pyramid-sharded");
    for shard in ["2/3", "0/3", "1/3"] {
        infer_targets(&m, 0.5, &options(&sharded, shard), ts.clone(), 2).unwrap();
    }
    assert!(store_files(&sharded) == reference, "sharded levels differ from one run's");

    let cache = ChunkCache::new(1 << 22);
    let store = whole.join("predictions.zarr");
    let open = |name: &str, c| ZarrArray::open(&store.join(name), c, &cache).unwrap();
    let sheet = open("sheet", 1).read([0; 3], SHAPE).unwrap();
    let normals = open("normals", 3).read([0; 3], SHAPE).unwrap();
    let at = |z: usize, y: usize, x: usize| (z * SHAPE[1] + y) * SHAPE[2] + x;
    for (k, f) in [(1, 2), (2, 4)] {
        let shape = SHAPE.map(|n| n.div_ceil(f));
        let level = open(&format!("sheet.{k}"), 1);
        assert_eq!((level.shape(), level.dtype()), (shape, DType::U8), "level {k}");
        let got = level.read([0; 3], shape).unwrap();
        let normals_k = open(&format!("normals.{k}"), 3).read([0; 3], shape).unwrap();
        for z in 0..shape[0] {
            for y in 0..shape[1] {
                for x in 0..shape[2] {
                    let i = (z * shape[1] + y) * shape[2] + x;
                    assert_eq!(got[i], sheet[at(z * f, y * f, x * f)], "sheet level {k} at {z},{y},{x}");
                    // The mean of the box clipped to the volume, of the stored (rounded) values:
                    // the level rounds the mean of unrounded ones, so they differ by under 1.
                    let mut sum = [0.0f64; 3];
                    let mut n = 0.0;
                    for zz in z * f..((z + 1) * f).min(SHAPE[0]) {
                        for yy in y * f..((y + 1) * f).min(SHAPE[1]) {
                            for xx in x * f..((x + 1) * f).min(SHAPE[2]) {
                                (0..3).for_each(|c| sum[c] += f64::from(normals[at(zz, yy, xx) * 3 + c]));
                                n += 1.0;
                            }
                        }
                    }
                    for c in 0..3 {
                        let d = (f64::from(normals_k[i * 3 + c]) - sum[c] / n).abs();
                        assert!(d <= 1.0, "normals level {k} at {z},{y},{x},{c}: off by {d}");
                    }
                }
            }
        }
    }
    let group: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("zarr.json")).unwrap()).unwrap();
    let images = group["attributes"]["ome"]["multiscales"].as_array().unwrap();
    assert_eq!(images.len(), 1, "only the single-channel target is an image: {images:?}");
    let datasets = &images[0]["datasets"];
    for (k, (path, scale)) in [("sheet", 1.0), ("sheet.1", 2.0), ("sheet.2", 4.0)].iter().enumerate() {
        // A label map's level samples the box's first voxel: a scale and no translation.
        assert_eq!(
            datasets[k],
            serde_json::json!({"path": path, "coordinateTransformations": [{"type": "scale", "scale": [scale, scale, scale]}]})
        );
    }
    for d in [whole, sharded] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// The chunk files of block 17, the corner block ([1, 2, 2] of the 2 x 3 x 3 chunk grid): its
/// chunks are clipped by the volume's edge, so writing them reads what is there first.
fn corner_chunks(dir: &Path) -> [PathBuf; 2] {
    let store = dir.join("predictions.zarr");
    [store.join("sheet/c/1/2/2"), store.join("normals/c/1/2/2/0")]
}

#[test]
fn interrupted_chunk_writes_are_recovered_by_the_rerun_byte_for_byte() {
    let m = model();
    let whole = scratch_dir("chunks-whole");
    infer(&m, 0.5, &options(&whole, "0/1")).unwrap();
    let reference = store_files(&whole);
    let killed = || {
        let dir = scratch_dir("chunks-killed");
        let _ = std::fs::remove_dir_all(&dir);
        let first = infer(&m, 0.5, &RunOptions { max_blocks: Some(5), ..options(&dir, "0/1") }).unwrap();
        assert!(!first.done);
        dir
    };

    // Killed inside a chunk write: a truncated chunk under its name (as zarrs' own store leaves
    // it) and a half-written temporary file beside it.
    let dir = killed();
    for (chunk, whole_chunk) in corner_chunks(&dir).iter().zip(corner_chunks(&whole)) {
        let bytes = std::fs::read(whole_chunk).unwrap();
        std::fs::create_dir_all(chunk.parent().unwrap()).unwrap();
        std::fs::write(chunk, &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(
            chunk.with_file_name(format!(".{}.partial", chunk.file_name().unwrap().to_string_lossy())),
            b"x",
        )
        .unwrap();
    }
    let rest = infer(&m, 0.5, &options(&dir, "0/1")).unwrap();
    assert!(rest.done);
    assert!(store_files(&dir) == reference, "the rerun after a torn chunk differs from one run");

    // A write that fails (its temporary name is taken by a folder): the job fails naming the
    // array, leaves no chunk under the name, and the rerun completes.
    let dir = killed();
    let [sheet, _] = corner_chunks(&dir);
    let blocker = sheet.with_file_name(".2.partial");
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let e = format!("{:#}", infer(&m, 0.5, &options(&dir, "0/1")).unwrap_err());
    assert!(e.contains("predictions.zarr/sheet"), "{e}");
    assert!(!sheet.exists(), "a failed write leaves no chunk");
    std::fs::remove_dir_all(&blocker).unwrap();
    infer(&m, 0.5, &options(&dir, "0/1")).unwrap();
    assert!(store_files(&dir) == reference, "the rerun after a failed write differs from one run");

    // Killed after claiming run.json, before (or while) creating the arrays.
    let dir = scratch_dir("chunks-claimed");
    infer(&m, 0.5, &RunOptions { max_blocks: Some(0), ..options(&dir, "0/1") }).unwrap();
    std::fs::remove_dir_all(dir.join("predictions.zarr/normals")).unwrap();
    std::fs::remove_file(dir.join("predictions.zarr/sheet/zarr.json")).unwrap();
    let start = std::time::Instant::now();
    let s = infer(&m, 0.5, &options(&dir, "0/2")).unwrap();
    assert!(start.elapsed().as_secs() < 20, "a later job continues at once, it does not wait");
    assert_eq!(s.computed, 9);
    infer(&m, 0.5, &options(&dir, "1/2")).unwrap();
    assert!(store_files(&dir) == reference, "the run after a killed creation differs from one run");
    for d in [whole, dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// A time limit or a signal stops a job between blocks, saying why; the rerun finishes the same
/// bytes.
#[test]
fn a_deadline_or_a_signal_stops_between_blocks_and_the_rerun_finishes() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use unet3d::infer::Stop;
    let m = model();
    let whole = scratch_dir("stop-whole");
    infer(&m, 0.5, &options(&whole, "0/1")).unwrap();
    let reference = store_files(&whole);
    let dir = scratch_dir("stop");
    // A deadline already past: no block starts.
    let past = RunOptions { deadline: Some(std::time::Instant::now()), ..options(&dir, "0/1") };
    let s = infer(&m, 0.5, &past).unwrap();
    assert_eq!((s.computed, s.done, s.stopped), (0, false, Some(Stop::TimeLimit)));
    let far = RunOptions {
        deadline: Some(std::time::Instant::now() + std::time::Duration::from_secs(3600)),
        ..options(&dir, "0/1")
    };
    let s = infer(&m, 0.5, &RunOptions { max_blocks: Some(3), ..far }).unwrap();
    assert_eq!((s.computed, s.stopped), (3, Some(Stop::MaxBlocks)));
    // A signal that came before the job: nothing new is computed.
    let interrupt = Some(Arc::new(AtomicBool::new(true)));
    let s = infer(&m, 0.5, &RunOptions { interrupt, ..options(&dir, "0/1") }).unwrap();
    assert_eq!((s.computed, s.skipped, s.stopped), (0, 3, Some(Stop::Signal)));
    let s = infer(&m, 0.5, &options(&dir, "0/1")).unwrap();
    assert_eq!((s.computed, s.done, s.stopped), (15, true, None));
    assert!(store_files(&dir) == reference);
    for d in [whole, dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn overwrite_removes_what_the_earlier_run_wrote_and_nothing_else() {
    let m = model();
    let dir = scratch_dir("overwrite");
    infer(&m, 0.5, &options(&dir, "0/1")).unwrap();
    let canary = dir.join("predictions.zarr/notes.txt");
    std::fs::write(&canary, b"mine").unwrap();
    let sheet_only = vec![targets().remove(0)];
    infer_targets(&m, 0.5, &RunOptions { overwrite: true, ..options(&dir, "0/1") }, sheet_only.clone(), 0)
        .unwrap();
    assert!(!dir.join("predictions.zarr/normals").exists(), "the target the new run does not write is gone");
    assert_eq!(std::fs::read(&canary).unwrap(), b"mine");
    // A folder by a target's name that is not a Zarr array is never removed.
    std::fs::remove_dir_all(dir.join("predictions.zarr/sheet")).unwrap();
    std::fs::create_dir_all(dir.join("predictions.zarr/sheet")).unwrap();
    std::fs::write(dir.join("predictions.zarr/sheet/data.txt"), b"keep").unwrap();
    let e = format!(
        "{:#}",
        infer_targets(&m, 0.5, &RunOptions { overwrite: true, ..options(&dir, "0/1") }, sheet_only, 0)
            .unwrap_err()
    );
    assert!(e.contains("predictions.zarr/sheet") && e.contains("not a Zarr array"), "{e}");
    assert_eq!(std::fs::read(dir.join("predictions.zarr/sheet/data.txt")).unwrap(), b"keep");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn finished_and_foreign_outputs_are_not_overwritten_without_overwrite() {
    let m = model();
    let dir = scratch_dir("refuse");
    infer(&m, 0.5, &options(&dir, "0/1")).unwrap();
    let before = store_files(&dir);
    let err = format!("{:#}", infer(&m, 0.25, &options(&dir, "0/1")).unwrap_err());
    assert!(err.contains("other settings") && err.contains("--overwrite"), "{err}");
    assert!(err.contains("overlap: 0.5 vs 0.25"), "{err}");
    assert!(store_files(&dir) == before, "a refused run changed the output");
    let err = format!(
        "{:#}",
        infer(&m, 0.25, &RunOptions { overwrite: true, ..options(&dir, "0/2") }).unwrap_err()
    );
    assert!(err.contains("--overwrite with --shard 0/2"), "{err}");
    let s = infer(&m, 0.25, &RunOptions { overwrite: true, ..options(&dir, "0/1") }).unwrap();
    assert_eq!((s.computed, s.skipped), (s.blocks.len(), 0));
    assert!(store_files(&dir) != before);

    // An array that unet3d infer did not write is refused by name.
    let foreign = scratch_dir("foreign");
    let spec = ArraySpec {
        shape: SHAPE,
        channels: 1,
        chunks: [8; 3],
        dtype: DType::U8,
        attributes: Default::default(),
    };
    ZarrWriter::create(&foreign.join("predictions.zarr/sheet"), &spec, false).unwrap();
    let err = format!("{:#}", infer(&m, 0.5, &options(&foreign, "0/1")).unwrap_err());
    assert!(err.contains("predictions.zarr/sheet") && err.contains("not written by unet3d infer"), "{err}");
    for d in [dir, foreign] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn infer_command_runs_from_a_config() {
    let dir = scratch_dir("cli");
    let config = Config::parse(YAML, &[]).unwrap().config;
    let arch = config.architecture().unwrap();
    let store = init::initialize(&arch, 5).unwrap();
    let ckpt = dir.join("w.safetensors");
    weights::save(&ckpt, &arch, &store).unwrap();
    let v = volume();
    let spec = ArraySpec {
        shape: SHAPE,
        channels: 1,
        chunks: [5, 6, 7],
        dtype: DType::U8,
        attributes: Default::default(),
    };
    let input = dir.join("vol.zarr/input");
    ZarrWriter::create(&input, &spec, false).unwrap().write_region([0; 3], SHAPE, v.data()).unwrap();
    let yaml = dir.join("c.yaml");
    std::fs::write(&yaml, YAML).unwrap();
    let out = dir.join("out");
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = ["unet3d", "infer", "--config"].map(String::from).to_vec();
        a.push(yaml.display().to_string());
        a.extend([
            "--checkpoint".into(),
            ckpt.display().to_string(),
            "--input".into(),
            input.display().to_string(),
        ]);
        a.extend(["--output".into(), out.display().to_string(), "--output-targets".into(), "sheet".into()]);
        a.extend(
            ["--output-type", "float32", "--activation", "sheet=none", "--save-probabilities"]
                .map(String::from),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // One chunk per block; the first job stops after one block, the rerun reuses its statistics.
    // An early stop is not a failure but not done either: the Unfinished error `main` exits 75 for.
    let e = Cli::try_parse_from(args(&["--max-blocks", "1", "--block-mb", "0"])).unwrap().run().unwrap_err();
    let stopped = e.downcast_ref::<unet3d::cli::Unfinished>().expect("an early stop");
    assert!(stopped.0.contains("17 blocks left") && stopped.0.contains("--max-blocks"), "{stopped}");
    let done = |n| (0..18).filter(|b| out.join(format!(".progress/block-{b}.done")).exists()).count() == n;
    assert!(done(1));
    Cli::try_parse_from(args(&["--block-mb", "0"])).unwrap().run().unwrap();
    assert!(done(18));
    assert!(!out.join("predictions.zarr/normals").exists());
    // The run record names the schemes as the config spells them and the weights by checksum.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(".progress/run.json")).unwrap()).unwrap();
    let p = &record["settings"]["provenance"];
    assert_eq!(p["normalization"], serde_json::json!(["zscore"]));
    assert!(p["weights"]["checkpoint"]["crc32c"].is_u64() && p["volume_stats"]["channels"].is_array(), "{p}");
    let e =
        format!("{:#}", Cli::try_parse_from(args(&["--random-weights", "3"])).unwrap().run().unwrap_err());
    assert!(e.contains("--random-weights with --checkpoint"), "{e}");
    let cache = ChunkCache::new(1 << 20);
    let got = ZarrArray::open(&out.join("predictions.zarr/sheet"), 1, &cache).unwrap();
    assert_eq!((got.shape(), got.dtype()), (SHAPE, DType::F32));
    // Raw logits (activation none): the same as the library run with the same weights.
    let logits = got.read([0; 3], SHAPE).unwrap();
    assert!(logits.iter().any(|&x| x < 0.0) && logits.iter().all(|x| x.is_finite()));
    let m = Model { network: Network::new(&arch, &store).unwrap(), store };
    let lib = dir.join("lib");
    let norm = Normalizer::for_volume(&v, &[Normalization::ZScore], None, NanPolicy::Error).unwrap();
    let predictor =
        NetworkPredictor::new(m.network.clone(), m.store.clone(), &["sheet".to_string()]).unwrap();
    let window = SlidingWindow::new(&v, &norm, &predictor, vec![1], [8, 8, 8], 0.5, 3).unwrap();
    let mut t = targets().remove(0);
    (t.activation, t.output_type) = (Activation::None, OutputType::Float32);
    run(
        &Job {
            window,
            targets: vec![t],
            provenance: serde_json::json!({}),
            geometry: Default::default(),
            pyramid_levels: 0,
            image: None,
        },
        &options(&lib, "0/1"),
    )
    .unwrap();
    let want =
        ZarrArray::open(&lib.join("predictions.zarr/sheet"), 1, &cache).unwrap().read([0; 3], SHAPE).unwrap();
    assert_eq!(logits, want);

    // The same job with the network on the GPU kernels (the sim device): the same logits to float
    // tolerance (the kernels sum in another order than the CPU backend).
    let sim_out = dir.join("out-sim");
    let mut a = args(&["--device", "sim"]);
    let at = a.iter().position(|x| x == "--output").unwrap();
    a[at + 1] = sim_out.display().to_string();
    Cli::try_parse_from(a).unwrap().run().unwrap();
    let on_sim = ZarrArray::open(&sim_out.join("predictions.zarr/sheet"), 1, &cache).unwrap();
    let on_sim = on_sim.read([0; 3], SHAPE).unwrap();
    let record = std::fs::read_to_string(sim_out.join(".progress/run.json")).unwrap();
    assert!(record.contains(r#""device":"sim""#) || record.contains(r#""device": "sim""#), "{record}");
    let err = common::rel_err(&on_sim, &logits);
    assert!(err < 1e-5, "sim vs cpu logits: relative error {err:.2e}");

    // Without --save-probabilities the BCE target is a uint8 label map: 1 exactly where the logit
    // is positive, whatever the activation and output type say.
    let label_out = dir.join("out-labels");
    let mut a = args(&[]);
    a.retain(|x| x != "--save-probabilities");
    let at = a.iter().position(|x| x == "--output").unwrap();
    a[at + 1] = label_out.display().to_string();
    Cli::try_parse_from(a).unwrap().run().unwrap();
    let labels = ZarrArray::open(&label_out.join("predictions.zarr/sheet"), 1, &cache).unwrap();
    assert_eq!(labels.dtype(), DType::U8);
    let labels = labels.read([0; 3], SHAPE).unwrap();
    let want: Vec<f32> = logits.iter().map(|&x| f32::from(x > 0.0)).collect();
    assert_eq!(labels, want);
    assert!(labels.contains(&0.0) && labels.contains(&1.0), "both classes occur");

    // float16: the logits rounded to half precision.
    let half_out = dir.join("out-half");
    let mut a = args(&[]);
    let at = a.iter().position(|x| x == "--output-type").unwrap();
    a[at + 1] = "float16".into();
    let at = a.iter().position(|x| x == "--output").unwrap();
    a[at + 1] = half_out.display().to_string();
    Cli::try_parse_from(a).unwrap().run().unwrap();
    let halves = ZarrArray::open(&half_out.join("predictions.zarr/sheet"), 1, &cache).unwrap();
    assert_eq!(halves.dtype(), DType::F16);
    let want: Vec<f32> = logits.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    assert_eq!(halves.read([0; 3], SHAPE).unwrap(), want);

    // A wrong flag names itself.
    let err =
        format!("{:#}", Cli::try_parse_from(args(&["--activation", "sheet"])).unwrap().run().unwrap_err());
    assert!(err.contains("--activation 'sheet'"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_network_that_predicts_nan_is_an_error_and_writes_nothing_of_the_block() {
    let mut m = model();
    let id = m.store.ids().next().unwrap();
    let mut v = m.store.value(id).data().to_vec();
    v.iter_mut().for_each(|x| *x = f32::NAN);
    let dims = m.store.value(id).dims().to_vec();
    m.store.set_value(id, unet3d::tensor::Tensor::from_vec(dims, v).unwrap()).unwrap();
    let dir = scratch_dir("nan-model");
    let e = format!("{:#}", infer(&m, 0.5, &options(&dir, "0/1")).unwrap_err());
    assert!(e.contains("target 'sheet'") && e.contains("NaN") && e.contains("voxel"), "{e}");
    assert!(!dir.join("predictions.zarr/sheet/c").exists(), "no chunk was written");
    assert!(!dir.join(".progress/block-0.done").exists());
}
