//! A hostile user's inputs, each run through the real binary: malformed configs (`plan`), volumes
//! (`train`), NIfTI files (`convert`) and checkpoints (`infer`, `train`). Every case must exit
//! with status 1 (2 for a usage error; never a panic, an abort or a backtrace), print a message that names the file or key
//! at fault, and leave the canary files beside its inputs and its outputs unchanged.

mod common;

use common::{fixture_path, scratch_dir};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use unet3d::config::Config;
use unet3d::data::DType;
use unet3d::data::zarr::{ArraySpec, ZarrWriter};
use unet3d::model::{init, weights};

const CANARY: &[u8] = b"canary: must survive every case\n";

/// What a case's message must name.
type Names = &'static [&'static str];

/// A file's bytes made from a valid one's (None: no file at all).
type Corrupt<'a> = &'a dyn Fn(&[u8]) -> Option<Vec<u8>>;

/// One malformed input: the command to run in its folder and what its message must contain.
struct Case {
    name: String,
    args: Vec<String>,
    expect: Vec<String>,
}

/// A case's folder: inputs beside `canary.txt`, outputs under `out/` beside another canary.
struct CaseDir {
    dir: PathBuf,
}

impl CaseDir {
    fn new(root: &Path, name: &str) -> CaseDir {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("out")).unwrap();
        std::fs::write(dir.join("canary.txt"), CANARY).unwrap();
        std::fs::write(dir.join("out/canary.txt"), CANARY).unwrap();
        CaseDir { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> String {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    }
}

fn case(name: &str, args: Vec<String>, expect: &[&str]) -> Case {
    Case { name: name.to_string(), args, expect: expect.iter().map(|s| s.to_string()).collect() }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A training config over one volume of `dir` (input and a 2-class label), outputs under out/.
fn train_yaml(d: &CaseDir, input: &str, label: &str, dataset_extra: &str) -> String {
    format!(
        "tr_setup: {{model_name: m, vram_max: 2GB, ckpt_out_base: {out}/ck, tensorboard_log_dir: {out}/tb, \
         tr_val_split: 1.0}}\n\
         tr_config: {{patch_size: [16, 16, 16], batch_size: 1, max_epoch: 1, max_steps_per_epoch: 1, \
         max_val_steps_per_epoch: 0, num_dataloader_workers: 0}}\n\
         model_config: {{base_features: 4, max_features: 8, n_blocks_per_stage: [1, 1, 1]}}\n\
         dataset_config:\n  sampling: random\n  use_cache: false\n  normalization: zscore\n{dataset_extra}  \
         targets:\n    seg: {{channels: 2, loss_fn: DC_and_CE_loss}}\n  \
         volume_paths:\n    - {{input: {input}, seg: {label}, ref_label: seg}}\n",
        out = d.s("out"),
    )
}

fn write_array(path: &Path, shape: [usize; 3], channels: usize, dtype: DType, value: impl Fn(usize) -> f32) {
    let spec = ArraySpec { shape, channels, chunks: [8; 3], dtype, attributes: Default::default() };
    let n = shape.iter().product::<usize>() * channels;
    let data: Vec<f32> = (0..n).map(value).collect();
    ZarrWriter::create(path, &spec, false).unwrap().write_region([0; 3], shape, &data).unwrap();
}

const SHAPE: [usize; 3] = [16, 16, 16];

/// A valid volume under `d`: `vol.zarr/input` (uint8) and `vol.zarr/label` (classes 0 and 1).
fn good_volume(d: &CaseDir) -> (String, String) {
    write_array(&d.path("vol.zarr/input"), SHAPE, 1, DType::U8, |i| (i % 200) as f32);
    write_array(&d.path("vol.zarr/label"), SHAPE, 1, DType::U8, |i| f32::from(i % 16 > 7));
    (d.s("vol.zarr/input"), d.s("vol.zarr/label"))
}

fn train_case(d: &CaseDir, name: &str, yaml: String, sets: &[&str], expect: &[&str]) -> Case {
    let config = d.write("c.yaml", yaml.as_bytes());
    let mut args = strings(&["train", "--config", &config]);
    for s in sets {
        args.extend(strings(&["--set", s]));
    }
    case(name, args, expect)
}

/// `unet3d plan` cases: config values and files that must be refused by key or path.
fn config_cases(root: &Path) -> Vec<Case> {
    let good = "tr_setup: {vram_max: 2GB}\ntr_config: {patch_size: [16, 16, 16], batch_size: 1}\n\
                model_config: {base_features: 4, max_features: 8}\n\
                dataset_config:\n  targets:\n    seg: {channels: 2, loss_fn: DC_and_CE_loss}\n";
    let sets: &[(&str, &str, &str)] = &[
        ("section-not-a-map", "tr_setup=3", "tr_setup"),
        ("batch-zero", "tr_config.batch_size=0", "tr_config.batch_size"),
        ("optimizer", "tr_config.optimizer=Adagrad", "tr_config.optimizer"),
        ("patch-zero", "tr_config.patch_size=[0, 16, 16]", "tr_config.patch_size"),
        ("model-name-dotdot", "tr_setup.model_name=../../x", "tr_setup.model_name"),
        ("model-name-absolute", "tr_setup.model_name=/tmp/x", "tr_setup.model_name"),
        ("model-name-hidden", "tr_setup.model_name=.m", "tr_setup.model_name"),
        ("unknown-set-key", "tr_config.batch_sise=2", "tr_config.batch_sise"),
        ("unknown-set-section", "tr_confg.batch_size=2", "tr_confg"),
        ("vram-negative", "tr_setup.vram_max=-1", "tr_setup.vram_max"),
        ("vram-too-small", "tr_setup.vram_max=1MB", "tr_setup.vram_max"),
        ("split", "tr_setup.tr_val_split=2", "tr_setup.tr_val_split"),
        ("lr-negative", "tr_config.initial_lr=-1", "tr_config.initial_lr"),
        ("nan-policy", "dataset_config.nan_policy=sometimes", "dataset_config.nan_policy"),
        ("nan-value", "dataset_config.nan_value=abc", "dataset_config.nan_value"),
        ("overlap", "inference_config.overlap=1.5", "inference_config.overlap"),
        ("output-type", "inference_config.output_type=uint9", "inference_config.output_type"),
        ("channels-zero", "dataset_config.targets.seg.channels=0", "dataset_config.targets.seg.channels"),
        ("loss-fn", "dataset_config.targets.seg.loss_fn=DiceLoss", "dataset_config.targets.seg.loss_fn"),
        ("best-by", "tr_config.best_by=loss", "tr_config.best_by"),
        ("best-by-without-every", "tr_config.best_by=whole_volume_dice", "tr_config.whole_volume_every"),
        (
            "class-names-count",
            "dataset_config.targets.seg.class_names=[background]",
            "dataset_config.targets.seg.class_names",
        ),
        (
            "class-names-twice",
            "dataset_config.targets.seg.class_names=[bg, bg]",
            "dataset_config.targets.seg.class_names",
        ),
        (
            "normalization-length",
            "dataset_config.normalization=[zscore, zscore]",
            "dataset_config.normalization",
        ),
        ("sampling", "dataset_config.sampling=foo", "dataset_config.sampling"),
        ("p-rotation", "tr_config.augmentation.p_rotation=2", "tr_config.augmentation.p_rotation"),
        ("mirror-axes", "tr_config.augmentation.mirror_axes=[3]", "tr_config.augmentation.mirror_axes"),
        ("skipped-fraction", "tr_config.max_skipped_fraction=1.5", "tr_config.max_skipped_fraction"),
        ("device", "tr_setup.device=tpu", "tr_setup.device"),
        ("grad-clip", "tr_config.grad_clip_max_norm=abc", "tr_config.grad_clip_max_norm"),
        ("set-without-value", "tr_config.batch_size", "tr_config.batch_size"),
        (
            "missing-chunks-flag",
            "dataset_config.allow_missing_chunks=maybe",
            "dataset_config.allow_missing_chunks",
        ),
    ];
    let mut cases = Vec::new();
    for (name, set, expect) in sets {
        let d = CaseDir::new(root, name);
        let config = d.write("c.yaml", good.as_bytes());
        cases.push(case(name, strings(&["plan", "--config", &config, "--set", set]), &[expect]));
    }
    let files: &[(&str, &[u8], &str)] = &[
        ("yaml-syntax", b"tr_setup: [\n", "c.yaml"),
        ("no-targets", b"tr_setup: {}\n", "dataset_config.targets"),
        ("target-slash", b"dataset_config: {targets: {\"a/b\": {channels: 1}}}\n", "a/b"),
        ("target-dotdot", b"dataset_config: {targets: {\"..\": {channels: 1}}}\n", "target name"),
        ("not-utf8", b"tr_setup: {model_name: \xff\xfe}\n", "c.yaml"),
    ];
    for (name, text, expect) in files {
        let d = CaseDir::new(root, name);
        let config = d.write("c.yaml", text);
        cases.push(case(name, strings(&["plan", "--config", &config]), &[expect]));
    }
    let d = CaseDir::new(root, "config-missing");
    cases.push(case("config-missing", strings(&["plan", "--config", &d.s("none.yaml")]), &["none.yaml"]));
    let d = CaseDir::new(root, "config-is-a-folder");
    std::fs::create_dir_all(d.path("c.yaml")).unwrap();
    cases.push(case("config-is-a-folder", strings(&["plan", "--config", &d.s("c.yaml")]), &["c.yaml"]));
    cases
}

/// `unet3d train` cases: volumes that must be refused by array, voxel or chunk.
fn volume_cases(root: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    let simple = |name: &str, make: &dyn Fn(&CaseDir) -> (String, String), extra: &str, expect: &[&str]| {
        let d = CaseDir::new(root, name);
        let (input, label) = make(&d);
        train_case(&d, name, train_yaml(&d, &input, &label, extra), &[], expect)
    };
    cases.push(simple(
        "input-missing",
        &|d| (d.s("nothing.zarr/input"), good_volume(d).1),
        "",
        &["volume_paths[0].input", "nothing.zarr"],
    ));
    cases.push(simple(
        "input-not-an-array",
        &|d| {
            std::fs::create_dir_all(d.path("empty")).unwrap();
            (d.s("empty"), good_volume(d).1)
        },
        "",
        &["empty", "no Zarr array"],
    ));
    cases.push(simple(
        "input-is-a-group",
        &|d| {
            let (input, label) = good_volume(d);
            (input.strip_suffix("/input").unwrap().to_string(), label)
        },
        "",
        &["a Zarr group"],
    ));
    cases.push(simple(
        "zarr-json-garbage",
        &|d| {
            let (_, label) = good_volume(d);
            d.write("bad/zarr.json", b"{ not json");
            (d.s("bad"), label)
        },
        "",
        &["bad"],
    ));
    cases.push(simple(
        "chunk-shape-huge",
        &|d| {
            let (_, label) = good_volume(d);
            let meta = serde_json::json!({
                "zarr_format": 3, "node_type": "array", "shape": [16, 16, 16], "data_type": "uint8",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [100000, 100000, 100000]}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0, "codecs": [{"name": "bytes"}],
            });
            d.write("huge/zarr.json", meta.to_string().as_bytes());
            (d.s("huge"), label)
        },
        "",
        &["huge", "chunk_shape"],
    ));
    cases.push(simple(
        "shape-mismatch",
        &|d| {
            let (input, _) = good_volume(d);
            write_array(&d.path("small"), [16, 16, 8], 1, DType::U8, |_| 0.0);
            (input, d.s("small"))
        },
        "",
        &["volume_paths[0].seg", "differs from the input"],
    ));
    cases.push(simple(
        "dtype-float64",
        &|d| {
            let (_, label) = good_volume(d);
            let meta = serde_json::json!({
                "zarr_format": 2, "shape": [16, 16, 16], "chunks": [16, 16, 16], "dtype": "<f8",
                "compressor": null, "fill_value": 0, "order": "C", "filters": null,
            });
            d.write("f64/.zarray", meta.to_string().as_bytes());
            (d.s("f64"), label)
        },
        "",
        &["f64", "float64"],
    ));
    cases.push(simple(
        "nan-in-input",
        &|d| {
            let (_, label) = good_volume(d);
            write_array(&d.path("nan"), SHAPE, 1, DType::F32, |i| if i == 3000 { f32::NAN } else { 1.0 });
            (d.s("nan"), label)
        },
        "",
        &["nan", "[z, y, x] = [11, 11, 8]", "nan_policy"],
    ));
    let d = CaseDir::new(root, "inf-in-input-without-zscore");
    let label = good_volume(&d).1;
    write_array(&d.path("inf"), SHAPE, 1, DType::F32, |i| if i == 5 { f32::INFINITY } else { 1.0 });
    let yaml =
        train_yaml(&d, &d.s("inf"), &label, "").replace("normalization: zscore", "normalization: none");
    cases.push(train_case(&d, "inf-in-input-without-zscore", yaml, &[], &["inf", "[z, y, x] = [0, 0, 5]"]));
    cases.push(simple(
        "label-out-of-range",
        &|d| {
            let (input, _) = good_volume(d);
            write_array(&d.path("label5"), SHAPE, 1, DType::U8, |i| if i == 100 { 5.0 } else { 0.0 });
            (input, d.s("label5"))
        },
        "",
        &["label5", "value 5", "class index in 0..2"],
    ));
    cases.push(simple(
        "input-chunk-missing",
        &|d| {
            let (input, label) = good_volume(d);
            std::fs::remove_file(Path::new(&input).join("c/1/1/1")).unwrap();
            (input, label)
        },
        "",
        &["vol.zarr/input", "chunk [1, 1, 1] is missing", "allow_missing_chunks"],
    ));
    cases.push(simple(
        "input-over-http",
        &|d| ("http://example.org/v.zarr/input".into(), good_volume(d).1),
        "",
        &["http://example.org/v.zarr/input", "HTTP"],
    ));
    cases.push(simple(
        "label-with-channels",
        &|d| {
            let (input, _) = good_volume(d);
            write_array(&d.path("label3"), SHAPE, 3, DType::U8, |_| 0.0);
            (input, d.s("label3"))
        },
        "",
        &["label3", "channel"],
    ));
    cases
}

/// The uncompressed bytes of a fixture NIfTI (001: uint8, 003: float32).
fn nifti_bytes(rel: &str) -> Vec<u8> {
    let mut b = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixture_path(rel)).unwrap())
        .read_to_end(&mut b)
        .unwrap();
    b
}

/// `unet3d convert` cases: NIfTI headers and voxels that must be refused by file and field.
fn nifti_cases(root: &Path) -> Vec<Case> {
    let image = nifti_bytes("hippocampus/imagesTr/hippocampus_001.nii.gz");
    let float = nifti_bytes("hippocampus/imagesTr/hippocampus_003.nii.gz");
    let label = nifti_bytes("hippocampus/labelsTr/hippocampus_001.nii.gz");
    let with = |base: &[u8], edits: &[(usize, Vec<u8>)]| {
        let mut b = base.to_vec();
        for (at, bytes) in edits {
            b[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        b
    };
    let f32b = |v: f32| v.to_le_bytes().to_vec();
    let i16b = |v: i16| v.to_le_bytes().to_vec();
    let offset = f32::from_le_bytes(float[108..112].try_into().unwrap()) as usize;
    let images: Vec<(&str, Vec<u8>, Names)> = vec![
        ("nifti-text", b"this is not an image".to_vec(), &["shorter than the 348-byte header"]),
        ("nifti-short-header", image[..200].to_vec(), &["348-byte header"]),
        ("nifti-sizeof-hdr", with(&image, &[(0, 123i32.to_le_bytes().to_vec())]), &["sizeof_hdr"]),
        ("nifti-2", with(&image, &[(0, 540i32.to_le_bytes().to_vec())]), &["NIfTI-2"]),
        ("nifti-vox-offset-inf", with(&image, &[(108, f32b(f32::INFINITY))]), &["vox_offset"]),
        ("nifti-vox-offset-1e20", with(&image, &[(108, f32b(1e20))]), &["vox_offset"]),
        ("nifti-vox-offset-nan", with(&image, &[(108, f32b(f32::NAN))]), &["vox_offset"]),
        ("nifti-vox-offset-inside", with(&image, &[(108, f32b(100.0))]), &["vox_offset"]),
        (
            "nifti-huge-dims",
            with(&image, &[(42, i16b(32767)), (44, i16b(32767)), (46, i16b(32767)), (70, i16b(64))]),
            &["GiB", "float64"],
        ),
        ("nifti-negative-dim", with(&image, &[(44, i16b(-4))]), &["non-positive extent"]),
        ("nifti-dim0", with(&image, &[(40, i16b(9))]), &["dim[0] = 9"]),
        ("nifti-5d", with(&image, &[(40, i16b(5)), (48, i16b(1)), (50, i16b(2))]), &["more than 4 axes"]),
        ("nifti-complex", with(&image, &[(70, i16b(32))]), &["datatype 32"]),
        ("nifti-two-file", with(&image, &[(344, b"ni1\0".to_vec())]), &["two-file"]),
        ("nifti-magic", with(&image, &[(344, b"abc\0".to_vec())]), &["magic"]),
        ("nifti-truncated", image[..image.len() - 100].to_vec(), &["bytes of voxel data"]),
        ("nifti-nan-voxel", with(&float, &[(offset + 40, f32b(f32::NAN))]), &["NaN", "finite"]),
        ("nifti-inf-voxel", with(&float, &[(offset + 4, f32b(f32::NEG_INFINITY))]), &["-inf", "finite"]),
    ];
    let mut cases = Vec::new();
    for (name, bytes, expect) in images {
        let d = CaseDir::new(root, name);
        let img = d.write("image.nii", &bytes);
        let mut expect = expect.to_vec();
        expect.push("image.nii");
        cases.push(case(
            name,
            strings(&["convert", "--image", &img, "--out", &d.s("out/case.zarr")]),
            &expect,
        ));
    }
    let d = CaseDir::new(root, "nifti-gzip-truncated");
    let gz = std::fs::read(fixture_path("hippocampus/imagesTr/hippocampus_001.nii.gz")).unwrap();
    let img = d.write("image.nii.gz", &gz[..gz.len() / 2]);
    cases.push(case(
        "nifti-gzip-truncated",
        strings(&["convert", "--image", &img, "--out", &d.s("out/case.zarr")]),
        &["image.nii.gz"],
    ));
    // (image, label): a float label holds values that are no class index.
    let labels: Vec<(&str, &[u8], Vec<u8>, Names)> = vec![
        ("label-not-classes", &float, float.clone(), &["label.nii", "not a class index"]),
        ("label-shape", &image, with(&label, &[(42, i16b(3))]), &["label.nii", "shape"]),
        ("label-spacing", &image, with(&label, &[(80, f32b(7.0))]), &["label.nii", "spacing"]),
    ];
    for (name, image, bytes, expect) in labels {
        let d = CaseDir::new(root, name);
        let img = d.write("image.nii", image);
        let lab = d.write("label.nii", &bytes);
        let args = strings(&["convert", "--image", &img, "--label", &lab, "--out", &d.s("out/case.zarr")]);
        cases.push(case(name, args, expect));
    }
    cases
}

/// `unet3d infer` and resume cases: checkpoint files that must be refused by path and tensor.
fn checkpoint_cases(root: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    let prepare = |name: &str| {
        let d = CaseDir::new(root, name);
        let (input, label) = good_volume(&d);
        let yaml = train_yaml(&d, &input, &label, "");
        let config = d.write("c.yaml", yaml.as_bytes());
        let arch = Config::parse(&yaml, &[]).unwrap().config.architecture().unwrap();
        let good = d.path("good.safetensors");
        weights::save(&good, &arch, &init::initialize(&arch, 1).unwrap()).unwrap();
        (d, config, input, std::fs::read(&good).unwrap())
    };
    let infer = |d: &CaseDir, config: &str, input: &str, ckpt: &str, extra: &[&str]| {
        let mut a = strings(&["infer", "--config", config, "--checkpoint", ckpt, "--input", input]);
        a.extend(strings(&["--output", &d.s("out/pred")]));
        a.extend(strings(extra));
        a
    };
    let files: Vec<(&str, Corrupt, Names)> = vec![
        ("ckpt-empty", &|_| Some(Vec::new()), &["shorter than a safetensors header"]),
        ("ckpt-text", &|_| Some(b"not a checkpoint at all, just text".to_vec()), &["safetensors"]),
        ("ckpt-truncated", &|g| Some(g[..g.len() / 2].to_vec()), &["ckpt.safetensors"]),
        (
            "ckpt-bit-flip",
            &|g| {
                let mut b = g.to_vec();
                let n = b.len();
                b[n - 10] ^= 0x10;
                Some(b)
            },
            &["checksum"],
        ),
        (
            "ckpt-header-length",
            &|g| {
                let mut b = g.to_vec();
                b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
                Some(b)
            },
            &["header claims"],
        ),
        ("ckpt-missing", &|_| None, &["ckpt.safetensors"]),
    ];
    for (name, make, expect) in files {
        let (d, config, input, good) = prepare(name);
        if let Some(bytes) = make(&good) {
            d.write("ckpt.safetensors", &bytes);
        }
        let mut expect = expect.to_vec();
        expect.push("ckpt.safetensors");
        cases.push(case(name, infer(&d, &config, &input, &d.s("ckpt.safetensors"), &[]), &expect));
    }
    let (d, config, input, _) = prepare("ckpt-is-a-folder");
    std::fs::create_dir_all(d.path("ckpt.safetensors")).unwrap();
    cases.push(case(
        "ckpt-is-a-folder",
        infer(&d, &config, &input, &d.s("ckpt.safetensors"), &[]),
        &["ckpt.safetensors", "not a regular file"],
    ));
    let (d, config, input, _) = prepare("ckpt-dev-zero");
    std::os::unix::fs::symlink("/dev/zero", d.path("ckpt.safetensors")).unwrap();
    cases.push(case(
        "ckpt-dev-zero",
        infer(&d, &config, &input, &d.s("ckpt.safetensors"), &[]),
        &["ckpt.safetensors", "not a regular file"],
    ));
    let (d, config, input, _) = prepare("ckpt-other-network");
    let yaml = std::fs::read_to_string(&config).unwrap().replace("base_features: 4", "base_features: 8");
    let arch = Config::parse(&yaml, &[]).unwrap().config.architecture().unwrap();
    weights::save(&d.path("ckpt.safetensors"), &arch, &init::initialize(&arch, 1).unwrap()).unwrap();
    cases.push(case(
        "ckpt-other-network",
        infer(&d, &config, &input, &d.s("ckpt.safetensors"), &[]),
        &["ckpt.safetensors", "do not fit"],
    ));
    let (d, config, input, _) = prepare("ckpt-nan-weights");
    let yaml = std::fs::read_to_string(&config).unwrap();
    let arch = Config::parse(&yaml, &[]).unwrap().config.architecture().unwrap();
    let mut store = init::initialize(&arch, 1).unwrap();
    let id = store.ids().next().unwrap();
    let dims = store.value(id).dims().to_vec();
    let n = store.value(id).numel();
    store.set_value(id, unet3d::tensor::Tensor::from_vec(dims, vec![f32::NAN; n]).unwrap()).unwrap();
    weights::save(&d.path("ckpt.safetensors"), &arch, &store).unwrap();
    cases.push(case(
        "ckpt-nan-weights",
        infer(&d, &config, &input, &d.s("ckpt.safetensors"), &[]),
        &["ckpt.safetensors", "NaN"],
    ));
    let (d, config, input, _) = prepare("infer-shard-out-of-range");
    cases.push(case(
        "infer-shard-out-of-range",
        infer(&d, &config, &input, &d.s("good.safetensors"), &["--shard", "3/3"]),
        &["--shard", "0 <= i < n"],
    ));
    let (d, config, input, _) = prepare("infer-shard-auto-outside-slurm");
    cases.push(case(
        "infer-shard-auto-outside-slurm",
        infer(&d, &config, &input, &d.s("good.safetensors"), &["--shard", "auto"]),
        &["--shard auto", "SLURM_ARRAY_TASK_ID"],
    ));
    let (d, config, input, _) = prepare("infer-stop-after-unit");
    cases.push(case(
        "infer-stop-after-unit",
        infer(&d, &config, &input, &d.s("good.safetensors"), &["--stop-after", "3h50"]),
        &["--stop-after"],
    ));
    let (d, config, input, _) = prepare("infer-threads-zero");
    cases.push(case(
        "infer-threads-zero",
        infer(&d, &config, &input, &d.s("good.safetensors"), &["--threads", "0"]),
        &["--threads"],
    ));
    let (d, config, input, _) = prepare("infer-random-and-checkpoint");
    cases.push(case(
        "infer-random-and-checkpoint",
        infer(&d, &config, &input, &d.s("good.safetensors"), &["--random-weights", "1"]),
        &["--random-weights"],
    ));
    let (d, config, input, _) = prepare("infer-foreign-output");
    write_array(&d.path("out/pred/predictions.zarr/seg"), SHAPE, 2, DType::F32, |_| 1.0);
    cases.push(case(
        "infer-foreign-output",
        infer(&d, &config, &input, &d.s("good.safetensors"), &[]),
        &["predictions.zarr/seg", "not written by unet3d infer"],
    ));
    let (d, config, _, _) = prepare("infer-input-missing");
    cases.push(case(
        "infer-input-missing",
        infer(&d, &config, &d.s("none.zarr"), &d.s("good.safetensors"), &[]),
        &["none.zarr"],
    ));
    let (d, config, _, good) = prepare("resume-bit-flip");
    let mut b = good.clone();
    let n = b.len();
    b[n - 3] ^= 1;
    let ckpt = d.write("ckpt.safetensors", &b);
    cases.push(train_case(
        &d,
        "resume-bit-flip",
        std::fs::read_to_string(&config).unwrap(),
        &[&format!("tr_setup.checkpoint_path={ckpt}"), "tr_setup.load_weights_only=true"],
        &["ckpt.safetensors", "checksum"],
    ));
    cases
}

/// Runs `c` and returns what is wrong with how it failed, if anything.
fn check(exe: &str, root: &Path, c: &Case) -> Option<String> {
    let mut cmd = Command::new(exe);
    cmd.args(&c.args).env("RUST_BACKTRACE", "1");
    // Run inside a SLURM array or not, `--shard auto` must see no array.
    for v in ["ID", "COUNT", "MIN", "MAX", "STEP"] {
        cmd.env_remove(format!("SLURM_ARRAY_TASK_{v}"));
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut wrong = Vec::new();
    // 1: the command's error; 2: a usage error from the argument parser.
    if !matches!(out.status.code(), Some(1 | 2)) {
        wrong.push(format!("exit status {:?}, expected 1 (or 2 for usage)", out.status));
    }
    for bad in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        if stderr.contains(bad) {
            wrong.push(format!("stderr holds {bad:?}"));
        }
    }
    for want in &c.expect {
        if !stderr.contains(want.as_str()) {
            wrong.push(format!("the message does not name {want:?}"));
        }
    }
    for canary in ["canary.txt", "out/canary.txt"] {
        if std::fs::read(root.join(&c.name).join(canary)).ok().as_deref() != Some(CANARY) {
            wrong.push(format!("{canary} changed"));
        }
    }
    (!wrong.is_empty()).then(|| format!("{}: {}\n    stderr: {}", c.name, wrong.join("; "), stderr.trim()))
}

#[test]
fn every_malformed_input_is_a_named_error_that_changes_nothing() {
    let root = scratch_dir("hostile");
    let mut cases = config_cases(&root);
    cases.extend(volume_cases(&root));
    cases.extend(nifti_cases(&root));
    cases.extend(checkpoint_cases(&root));
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let exe = env!("CARGO_BIN_EXE_unet3d");
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .chunks(cases.len().div_ceil(4))
            .map(|part| s.spawn(|| part.iter().filter_map(|c| check(exe, &root, c)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
    std::fs::remove_dir_all(&root).unwrap();
}
