//! Killed with SIGKILL at several points and restarted, the real binary loses nothing: a training
//! resumed from its newest checkpoint ends with the weights of an uninterrupted run, and an
//! inference job rerun after a kill, or after the SIGTERM a scheduler sends, leaves a store
//! byte-identical to one uninterrupted job.

mod common;

use common::{files_under, scratch_dir};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unet3d::config::Config;
use unet3d::data::DType;
use unet3d::data::zarr::{ArraySpec, ZarrWriter};
use unet3d::model::{init, weights};
use unet3d::tensor::io;
use unet3d::train::folder::{self, CheckpointName, Kind};

const EXE: &str = env!("CARGO_BIN_EXE_unet3d");
const EPOCHS: usize = 4;

fn write_array(path: &Path, shape: [usize; 3], dtype: DType, value: impl Fn(usize) -> f32) {
    let spec = ArraySpec { shape, channels: 1, chunks: [8; 3], dtype, attributes: Default::default() };
    let data: Vec<f32> = (0..shape.iter().product()).map(value).collect();
    ZarrWriter::create(path, &spec, false).unwrap().write_region([0; 3], shape, &data).unwrap();
}

/// A 24^3 volume under `dir`: an input ramp with a bright slab, and the slab as a 2-class label.
fn volume(dir: &Path) {
    let slab = |i: usize| (8..14).contains(&(i / (24 * 24)));
    write_array(&dir.join("vol.zarr/input"), [24; 3], DType::U8, |i| {
        (i % 97) as f32 + 100.0 * f32::from(slab(i))
    });
    write_array(&dir.join("vol.zarr/label"), [24; 3], DType::U8, |i| f32::from(slab(i)));
}

/// The tiny training (and inference) config over `dir`'s volume, writing under `dir/out`.
fn yaml(dir: &Path, out: &str) -> String {
    let p = |n: &str| dir.join(n).display().to_string();
    let (input, label) = (p("vol.zarr/input"), p("vol.zarr/label"));
    format!(
        "tr_setup: {{model_name: m, seed: 4, vram_max: 2GB, ckpt_out_base: {out}/ck, tensorboard_log_dir: {out}/tb}}\n\
         tr_config: {{patch_size: [16, 16, 16], batch_size: 2, max_epoch: {EPOCHS}, max_steps_per_epoch: 3, \
         max_val_steps_per_epoch: 1, num_dataloader_workers: 1, gradient_accumulation: 2}}\n\
         model_config: {{base_features: 4, max_features: 8, n_blocks_per_stage: [1, 1, 1]}}\n\
         dataset_config:\n  sampling: random\n  use_cache: false\n  normalization: zscore\n  targets:\n    \
         seg: {{channels: 2, loss_fn: DC_and_CE_loss}}\n  volume_paths:\n    \
         - {{input: {input}, seg: {label}, ref_label: seg}}\n",
        out = dir.join(out).display()
    )
}

fn train(config: &Path, sets: &[String]) -> Child {
    let mut c = Command::new(EXE);
    c.args(["train", "--config"]).arg(config);
    for s in sets {
        c.args(["--set", s]);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Waits (up to a minute) until `ready` holds, then kills `child` with SIGKILL.
fn kill_when(mut child: Child, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() && child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "the kill point never came");
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    child.wait().unwrap();
}

fn final_weights(ck: &Path) -> BTreeMap<String, Vec<f32>> {
    let path = ck.join(CheckpointName { run: 1, kind: Kind::Final }.file_name("m"));
    io::load(&path).unwrap().tensors.into_iter().map(|(n, t)| (n, t.data().to_vec())).collect()
}

#[test]
fn training_killed_at_any_point_resumes_to_the_uninterrupted_weights() {
    let dir = scratch_dir("kill-train");
    volume(&dir);
    let config = dir.join("c.yaml");
    std::fs::write(&config, yaml(&dir, "straight")).unwrap();
    finish(train(&config, &[]));
    let want = final_weights(&dir.join("straight/ck"));

    let epoch_file =
        |ck: &Path, e: usize| ck.join(CheckpointName { run: 1, kind: Kind::Epoch(e) }.file_name("m"));
    // Kill points: as soon as the process runs (no checkpoint yet), right after epoch 1's
    // checkpoint appears, and 30 ms after epoch 2's (inside epoch 3 or 4, whichever is running).
    type Ready = Box<dyn Fn(&Path) -> bool>;
    let points: Vec<(&str, Ready)> = vec![
        ("at-start", Box::new(|_| true)),
        ("after-epoch-1", Box::new(move |ck| epoch_file(ck, 1).exists())),
        (
            "30ms-after-epoch-2",
            Box::new(move |ck| {
                let f = epoch_file(ck, 2);
                f.exists()
                    && f.metadata().unwrap().modified().unwrap().elapsed().unwrap()
                        > Duration::from_millis(30)
            }),
        ),
    ];
    for (name, ready) in points {
        let out = dir.join(name);
        std::fs::write(&config, yaml(&dir, name)).unwrap();
        let ck = out.join("ck");
        kill_when(train(&config, &[]), || ready(&ck));
        let fin = ck.join(CheckpointName { run: 1, kind: Kind::Final }.file_name("m"));
        assert!(!fin.exists(), "{name}: the kill came after the run had finished");
        // Restart from the newest checkpoint, or afresh when none was written.
        let newest = folder::epoch_checkpoints(&ck, "m", 1).unwrap().pop();
        eprintln!("{name}: resuming from {:?}", newest.as_ref().map(|(e, _)| e));
        let sets: Vec<String> =
            newest.iter().map(|(_, p)| format!("tr_setup.checkpoint_path={}", p.display())).collect();
        finish(train(&config, &sets));
        let got = final_weights(&ck);
        assert_eq!(got.len(), want.len());
        for (n, w) in &want {
            let diff = w.iter().zip(&got[n]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 1e-6, "{name}: {n} differs by {diff} from the uninterrupted run");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_inference_job_killed_at_any_point_reruns_to_the_same_bytes() {
    let dir = scratch_dir("kill-infer");
    volume(&dir);
    let config = dir.join("c.yaml");
    let text = yaml(&dir, "unused");
    std::fs::write(&config, &text).unwrap();
    let arch = Config::parse(&text, &[]).unwrap().config.architecture().unwrap();
    let ckpt = dir.join("w.safetensors");
    weights::save(&ckpt, &arch, &init::initialize(&arch, 9).unwrap()).unwrap();
    let infer = |out: &Path, shard: &str| {
        let mut c = Command::new(EXE);
        c.args(["infer", "--config"]).arg(&config).arg("--checkpoint").arg(&ckpt);
        c.arg("--input").arg(dir.join("vol.zarr/input")).arg("--output").arg(out);
        // One 16^3 chunk per block: 8 blocks.
        c.args(["--block-mb", "0", "--shard", shard, "--output-type", "float32"]);
        c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let whole = dir.join("whole");
    finish(infer(&whole, "0/1"));
    let want = files_under(&whole.join("predictions.zarr"));
    assert!(want.len() > 8, "{} files", want.len());
    let markers = |out: &Path| {
        std::fs::read_dir(out.join(".progress"))
            .map(|d| {
                d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".done")).count()
            })
            .unwrap_or(0)
    };
    for (name, after) in [("at-start", 0), ("after-1-block", 1), ("after-3-blocks", 3)] {
        let out = dir.join(name);
        kill_when(infer(&out, "0/2"), || markers(&out) >= after);
        assert!(markers(&out) < 4, "{name}: the kill came after the job had finished");
        // The killed shard's rerun, the other shard, and the killed shard once more (a no-op).
        finish(infer(&out, "1/2"));
        finish(infer(&out, "0/2"));
        finish(infer(&out, "0/2"));
        assert!(
            files_under(&out.join("predictions.zarr")) == want,
            "{name}: the store differs from one uninterrupted job"
        );
    }
    // The scheduler's SIGTERM: the block in flight is finished, the job exits 75 ("rerun to
    // continue"), and the rerun completes the same bytes.
    let out = dir.join("sigterm");
    let child = infer(&out, "0/1");
    let pid = child.id().to_string();
    let start = Instant::now();
    while markers(&out) < 1 {
        assert!(start.elapsed() < Duration::from_secs(60), "no block finished");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("a termination signal") && stderr.contains("run the same command again"),
        "{stderr}"
    );
    let done = markers(&out);
    assert!((1..8).contains(&done), "{done} blocks finished before the stop");
    finish(infer(&out, "0/1"));
    assert!(files_under(&out.join("predictions.zarr")) == want, "the store after SIGTERM differs");
    std::fs::remove_dir_all(&dir).unwrap();
}
