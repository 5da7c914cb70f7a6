//! The user's path end to end: convert three hippocampus cases, train a tiny model for a few
//! steps, predict the NIfTI folder into NIfTI label maps in the inputs' geometry, and score them
//! with `unet3d evaluate`, whose Dice this test recomputes from the files itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixture_path, scratch_dir};
use unet3d::data::nifti;

fn unet3d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unet3d")).args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CASES: [&str; 3] = ["hippocampus_001", "hippocampus_003", "hippocampus_004"];

#[test]
fn convert_train_predict_a_nifti_folder_and_evaluate() {
    let dir = scratch_dir("predict-evaluate");
    let data = fixture_path("hippocampus");
    let zarr = dir.join("zarr");
    ok(unet3d(&["convert", "--dataset", s(&data), "--out", s(&zarr)]));
    let dataset = std::fs::read_to_string(zarr.join("volumes.yaml")).unwrap();
    let ckpt = dir.join("ckpt");
    let yaml = format!(
        "tr_setup: {{model_name: hippo, ckpt_out_base: {ckpt:?}, tensorboard_log_dir: {tb:?}, device: cpu, \
         seed: 3, tr_val_split: 0.34}}\n\
         tr_config: {{patch_size: [16, 16, 16], batch_size: 2, max_epoch: 1, max_steps_per_epoch: 3, \
         max_val_steps_per_epoch: 1, num_dataloader_workers: 1, initial_lr: 0.01, whole_volume_every: 1, \
         best_by: whole_volume_dice}}\n\
         model_config: {{base_features: 4, max_features: 16}}\n{dataset}",
        tb = dir.join("tb"),
    );
    let config = dir.join("hippo.yaml");
    std::fs::write(&config, yaml).unwrap();
    let log = ok(unet3d(&["train", "--config", s(&config)]));
    // Its output is no terminal (a batch job's log): progress lines say where the epoch is.
    assert!(
        log.lines().any(|l| l.starts_with("epoch 1/1 step 3/3: loss ") && l.contains("patches/s")),
        "{log}"
    );
    // Metrics name the dataset's classes (convert wrote its labels as class_names).
    assert!(dataset.contains(r#"class_names: ["background", "Anterior", "Posterior"]"#), "{dataset}");
    assert!(log.contains("Dice Anterior ") && log.contains(", Posterior "), "{log}");
    let jsonl = std::fs::read_to_string(dir.join("tb/hippo/metrics.jsonl")).unwrap();
    assert!(jsonl.contains("\"val/label/dice/Anterior\""), "{jsonl}");
    // The epoch's whole-volume validation (whole_volume_every: 1) picks the best checkpoint and
    // is logged, as the final one is; its model file is gone.
    let epoch1: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("validation/epoch_0001/summary_label.json")).unwrap(),
    )
    .unwrap();
    let whole: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["scalars"]["whole/mean_dice"].is_number())
        .collect();
    assert_eq!(whole.len(), 2, "epoch 1 and the final validation: {jsonl}");
    let anterior = &epoch1["mean"]["1"]["Dice"];
    assert_eq!(&whole[0]["scalars"]["whole/label/dice/Anterior"], anterior);
    assert!(log.contains("best checkpoint (mean whole-volume Dice"), "{log}");
    let meta = unet3d::tensor::io::metadata(&ckpt.join("hippo_best.safetensors")).unwrap();
    let best: unet3d::train::checkpoint::TrainingState =
        serde_json::from_str(&meta["unet3d.training_state"]).unwrap();
    let mean = (anterior.as_f64().unwrap() + epoch1["mean"]["2"]["Dice"].as_f64().unwrap()) / 2.0;
    assert_eq!((best.best_epoch, best.best_whole_volume_dice), (Some(1), Some(mean)));
    assert!(
        !std::fs::read_dir(&ckpt).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("whole_volume"))
    );
    let model = ckpt.join("hippo_final.safetensors");
    assert!(model.is_file(), "the final model");
    // The final whole-volume validation of the one validation case, in evaluate's format.
    let val: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("validation/summary_label.json")).unwrap())
            .unwrap();
    assert_eq!(val["labels"], serde_json::json!([1, 2]));
    let case = val["metric_per_case"][0]["case"].as_str().unwrap().to_string();
    assert!(CASES.contains(&case.as_str()), "{case}");
    assert!(ckpt.join(format!("validation/{case}.zarr/label")).is_dir());

    // The model alone (no --config) predicts the image folder into label/<case>.nii.gz.
    let pred = dir.join("pred");
    let images = data.join("imagesTr");
    let predict = ["infer", "--checkpoint", s(&model), "--input", s(&images), "--output", s(&pred)];
    let stdout = ok(unet3d(&predict));
    assert!(stdout.contains("3 cases"), "{stdout}");
    for case in CASES {
        let image = nifti::read_header(&images.join(format!("{case}.nii.gz"))).unwrap();
        let label = nifti::read(&pred.join(format!("label/{case}.nii.gz"))).unwrap();
        let h = &label.header;
        assert_eq!((h.shape, h.channels, h.affine, h.spacing), (image.shape, 1, image.affine, image.spacing));
        assert_eq!(h.dtype, nifti::NiftiType::U8);
        assert!(label.data.iter().all(|&v| v == 0.0 || v == 1.0 || v == 2.0), "{case}: labels 0..2");
        assert!(pred.join(format!(".progress/{case}.done")).is_file());
    }
    assert!(!pred.join(".work/hippocampus_001.zarr").exists(), "working stores are removed");
    // A rerun skips the finished cases and changes nothing.
    let before = common::files_under(&pred);
    let stdout = ok(unet3d(&predict));
    assert!(stdout.contains("0 cases predicted, 3 already finished"), "{stdout}");
    assert_eq!(common::files_under(&pred), before);

    // evaluate's Dice against one computed here from the two files.
    let summary = dir.join("summary.json");
    let refs = data.join("labelsTr");
    ok(unet3d(&[
        "evaluate",
        "--pred",
        s(&pred.join("label")),
        "--ref",
        s(&refs),
        "--labels",
        "1,2",
        "--output",
        s(&summary),
    ]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    for (k, case) in CASES.iter().enumerate() {
        let p = nifti::read(&pred.join(format!("label/{case}.nii.gz"))).unwrap().data;
        let r = nifti::read(&refs.join(format!("{case}.nii.gz"))).unwrap().data;
        for label in [1.0f32, 2.0] {
            let tp = p.iter().zip(&r).filter(|(a, b)| **a == label && **b == label).count() as f64;
            let np = p.iter().filter(|&&a| a == label).count() as f64;
            let nr = r.iter().filter(|&&b| b == label).count() as f64;
            let dice = 2.0 * tp / (np + nr);
            let got = &summary["metric_per_case"][k]["metrics"][(label as u32).to_string()];
            assert_eq!(got["TP"].as_f64(), Some(tp), "{case} {label}");
            assert!((got["Dice"].as_f64().unwrap() - dice).abs() < 1e-12, "{case} {label}: {got} vs {dice}");
        }
    }

    // A converted Zarr case predicts into <case>.zarr/label, an OME-Zarr 0.5 image in the
    // input's spacing, which evaluate scores against the NIfTI reference alike.
    let zpred = dir.join("pred-zarr");
    // The folder convert wrote (with its volumes.yaml) predicts whole, case by case.
    ok(unet3d(&["infer", "--checkpoint", s(&model), "--input", s(&zarr), "--output", s(&zpred)]));
    assert!(CASES.iter().all(|c| zpred.join(format!("{c}.zarr/label/zarr.json")).is_file()));
    let store = zpred.join("hippocampus_001.zarr");
    let group: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("zarr.json")).unwrap()).unwrap();
    let header = nifti::read_header(&images.join("hippocampus_001.nii.gz")).unwrap();
    let spacing = header.spacing;
    // The image's first voxel in world space (its affine maps D, H, W to z, y, x).
    let origin = [header.affine[2][3], header.affine[1][3], header.affine[0][3]];
    check_ome_image(&group, &store, "label", spacing, &[1.0], origin);
    let out = dir.join("zarr-summary.json");
    ok(unet3d(&[
        "evaluate",
        "--pred",
        s(&store),
        "--pred-array",
        "label",
        "--ref",
        s(&refs.join("hippocampus_001.nii.gz")),
        "--labels",
        "1,2",
        "--output",
        s(&out),
    ]));
    let z: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for label in ["1", "2"] {
        let (a, b) = (&z["mean"][label]["Dice"], &summary["metric_per_case"][0]["metrics"][label]["Dice"]);
        // The same model on the same voxels (stored as float32 by convert, uint8 in the NIfTI).
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 0.01, "label {label}: {a} vs {b}");
    }

    // An OME-Zarr image in: the label map comes out as its label image (`labels/label`, with a
    // level at half resolution from the same pass) naming the input as its source.
    let image = dir.join("hippocampus_001.ome.zarr");
    copy_dir(&zarr.join("hippocampus_001.zarr/input"), &image.join("0"));
    let axes: Vec<_> = ["z", "y", "x"]
        .map(|a| serde_json::json!({"name": a, "type": "space", "unit": "millimeter"}))
        .to_vec();
    let ome = serde_json::json!({"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5",
        "multiscales": [{"name": "image", "axes": axes, "datasets": [{"path": "0",
            "coordinateTransformations": [{"type": "scale", "scale": spacing},
                {"type": "translation", "translation": origin}]}]}]}}});
    std::fs::write(image.join("zarr.json"), ome.to_string()).unwrap();
    let opred = dir.join("pred-ome");
    let args = ["infer", "--checkpoint", s(&model), "--input", s(&image), "--output", s(&opred)];
    ok(unet3d(&[&args[..], &["--pyramid-levels", "1"]].concat()));
    let store = opred.join("predictions.zarr");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("zarr.json")).unwrap()).unwrap()
    };
    let labels = read(&store.join("labels"));
    assert_eq!(labels["attributes"]["ome"], serde_json::json!({"version": "0.5", "labels": ["label"]}));
    let label = store.join("labels/label");
    let group = read(&label);
    check_ome_image(&group, &label, "label", spacing, &[1.0, 2.0], origin);
    let source = group["attributes"]["ome"]["image-label"]["source"]["image"].as_str().unwrap();
    assert_eq!(label.join(source).canonicalize().unwrap(), image.canonicalize().unwrap(), "{source}");
    // Level 1 takes every second voxel of the label map.
    let full = unet3d::data::volume::read(&label.join("0"), None).unwrap();
    let half = unet3d::data::volume::read(&label.join("1"), None).unwrap();
    assert_eq!(half.shape, full.shape.map(|n| n.div_ceil(2)));
    let [_, h, w] = full.shape;
    for (i, v) in half.data.iter().enumerate() {
        let (z, y, x) =
            (i / (half.shape[1] * half.shape[2]), i / half.shape[2] % half.shape[1], i % half.shape[2]);
        assert_eq!(*v, full.data[((2 * z) * h + 2 * y) * w + 2 * x], "level 1 at {z},{y},{x}");
    }
    // evaluate opens the label image by its path in the store: the same voxels as the Zarr case's.
    let out = dir.join("ome-summary.json");
    let refs_001 = refs.join("hippocampus_001.nii.gz");
    ok(unet3d(&[
        "evaluate",
        "--pred",
        s(&store),
        "--pred-array",
        "labels/label",
        "--ref",
        s(&refs_001),
        "--labels",
        "1,2",
        "--output",
        s(&out),
    ]));
    let o: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(o["mean"], z["mean"]);
    // Levels that do not divide the window's chunks are refused before anything is written.
    let e = unet3d(&[&args[..], &["--pyramid-levels", "5", "--overwrite"]].concat());
    let e = String::from_utf8_lossy(&e.stderr);
    assert!(e.contains("pyramid_levels") && e.contains("ask for 4 levels"), "{e}");
    assert_eq!(read(&label)["attributes"], group["attributes"], "the refused run changed nothing");
    // Probabilities are no label image: --overwrite replaces the label image and its group.
    ok(unet3d(&[&args[..], &["--save-probabilities", "--overwrite"]].concat()));
    assert!(!store.join("labels").exists(), "the earlier run's label image is removed");
    let probabilities = read(&store.join("label"));
    assert_eq!(probabilities["shape"], serde_json::json!([35, 51, 35, 3]));
    // Not an OME image (channels last), but its geometry is recorded all the same.
    let a = &probabilities["attributes"];
    assert_eq!((&a["spacing"], &a["origin"]), (&serde_json::json!(spacing), &serde_json::json!(origin)));

    // nnU-Net's fingerprint of the three cases and the plan from it: the foreground mean equals
    // one computed here from the NIfTI files (image voxels where the label is non-zero).
    let out = ok(unet3d(&["plan", "--config", s(&config), "--from-data"]));
    assert!(
        out.contains("fingerprint of 3 training volumes") && out.contains("plan (nnU-Net ResEnc rules"),
        "{out}"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("plan.json")).unwrap()).unwrap();
    let (mut sum, mut n) = (0.0f64, 0usize);
    for case in CASES {
        let image = nifti::read(&images.join(format!("{case}.nii.gz"))).unwrap();
        let label = nifti::read(&refs.join(format!("{case}.nii.gz"))).unwrap().data;
        for (x, l) in image.data.iter().zip(&label) {
            if *l > 0.0 {
                sum += f64::from(*x);
                n += 1;
            }
        }
        let fp = plan["fingerprint"]["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["volume"] == format!("{case}.zarr"));
        let fp = fp.unwrap_or_else(|| panic!("{case} in {plan}"));
        assert_eq!(fp["shape"], serde_json::json!(image.header.shape), "{case}");
        assert_eq!(fp["spacing"], serde_json::json!(image.header.spacing), "{case}");
    }
    let mean = plan["fingerprint"]["foreground_intensities"][0]["mean"].as_f64().unwrap();
    assert!((mean - sum / n as f64).abs() < 1e-9 * mean.abs(), "{mean} vs {}", sum / n as f64);
    let patch: Vec<usize> = serde_json::from_value(plan["plan"]["patch_size"].clone()).unwrap();
    assert!(patch.iter().all(|p| p % 8 == 0), "three poolings per axis at hippocampus sizes: {patch:?}");
    // `auto` sizes: train plans them and records the plan as --sets in its models.
    let auto = [
        "--set",
        "tr_config.patch_size=auto",
        "--set",
        "tr_config.batch_size=auto",
        "--set",
        "tr_setup.model_name=auto",
        "--set",
        "tr_config.final_validation=false",
        "--set",
        "tr_config.whole_volume_every=0",
        "--set",
        "tr_config.best_by=ema_pseudo_dice",
        "--set",
        "tr_config.max_steps_per_epoch=1",
    ];
    let log = ok(unet3d(&[&["train", "--config", s(&config)][..], &auto].concat()));
    let [p0, p1, p2] = [patch[0], patch[1], patch[2]];
    let want = format!("tr_config.patch_size=[{p0},{p1},{p2}]");
    assert!(log.contains(&format!("auto sizes planned from the data: --set {want}")), "{log}");
    let meta = unet3d::tensor::io::metadata(&ckpt.join("auto_final.safetensors")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&meta["unet3d.model"]).unwrap();
    let sets: Vec<String> = serde_json::from_value(record["config_sets"].clone()).unwrap();
    let batch = plan["plan"]["batch_size"].as_u64().unwrap();
    assert!(sets.contains(&want) && sets.contains(&format!("tr_config.batch_size={batch}")), "{sets:?}");

    // The output folder refuses files it did not write; a folder with a stray file names it.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(foreign.join("label")).unwrap();
    std::fs::write(foreign.join("label/hippocampus_001.nii.gz"), b"mine").unwrap();
    let out = unet3d(&["infer", "--checkpoint", s(&model), "--input", s(&images), "--output", s(&foreign)]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("refusing to overwrite"), "{e}");
    assert_eq!(std::fs::read(foreign.join("label/hippocampus_001.nii.gz")).unwrap(), b"mine");
    let stray: PathBuf = dir.join("stray");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::copy(images.join("hippocampus_001.nii.gz"), stray.join("hippocampus_001.nii.gz")).unwrap();
    std::fs::write(stray.join("notes.txt"), b"x").unwrap();
    let out =
        unet3d(&["infer", "--checkpoint", s(&model), "--input", s(&stray), "--output", s(&dir.join("o"))]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("notes.txt") && e.contains("not a volume"), "{e}");
}

/// The fields OME-Zarr 0.5 requires of an image group (ome.version, multiscales with axes and
/// datasets, one scale transformation per dataset of the axes' length, space axes with a unit
/// from the spec's list), and that each dataset is a 3D array of the group, its scale the spacing
/// times its level's factor and its translation the image's origin.
fn check_ome_image(
    group: &serde_json::Value,
    store: &Path,
    image: &str,
    spacing: [f64; 3],
    factors: &[f64],
    origin: [f64; 3],
) {
    assert_eq!((&group["zarr_format"], &group["node_type"]), (&3.into(), &"group".into()), "{group}");
    let ome = &group["attributes"]["ome"];
    assert_eq!(ome["version"], "0.5");
    let m = ome["multiscales"].as_array().unwrap().iter().find(|m| m["name"] == image).expect("the image");
    let axes = m["axes"].as_array().unwrap();
    assert_eq!(axes.iter().map(|a| a["name"].as_str().unwrap()).collect::<Vec<_>>(), ["z", "y", "x"]);
    for a in axes {
        assert_eq!((&a["type"], &a["unit"]), (&"space".into(), &"millimeter".into()), "{a}");
    }
    let datasets = m["datasets"].as_array().unwrap();
    assert_eq!(datasets.len(), factors.len());
    for (d, f) in datasets.iter().zip(factors) {
        let t = d["coordinateTransformations"].as_array().unwrap();
        assert_eq!(t[0]["type"], "scale", "the first transformation is a scale");
        let scale: Vec<f64> = serde_json::from_value(t[0]["scale"].clone()).unwrap();
        assert_eq!(scale, spacing.map(|s| s * f).to_vec());
        // A label map's levels sample each box's first voxel: all start at the origin.
        assert_eq!(t[1], serde_json::json!({"type": "translation", "translation": origin}));
        let array: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(store.join(d["path"].as_str().unwrap()).join("zarr.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (&array["node_type"], array["shape"].as_array().unwrap().len()),
            (&"array".into(), axes.len())
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() { copy_dir(&p, &dest) } else { std::fs::copy(&p, &dest).map(drop).unwrap() }
    }
}
