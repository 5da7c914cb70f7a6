//! The training loop end to end on a tiny network (16^3 patches, 4 to 16 features): learning on
//! a synthetic task, exact resume, weights-only fine-tuning, refusals, and a seed YAML.

mod common;

use common::{assert_close, files_under, scratch_dir};
use std::path::{Path, PathBuf};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use unet3d::arch::Architecture;
use unet3d::config::Config;
use unet3d::data::{Batch, TargetBatch};
use unet3d::loss::{LabelResample, deep_supervision_labels};
use unet3d::tensor::Tensor;
use unet3d::train::checkpoint;
use unet3d::train::data::LoaderSource;
use unet3d::train::folder::{self, CheckpointName, Kind};
use unet3d::train::metrics::{Score, Validation};
use unet3d::train::trainer::{BatchSource, ConfigSource, Trainer};

const PATCH: usize = 16;

/// Batches of bright balls in noise: `seg` (2 classes, DiceCE) is the ball, `dist` (MSE) its
/// distance from the ball's centre over the patch size. Batch `i` is a function of (seed, i), as
/// the real loader's.
struct Balls {
    seed: u64,
    strides: Vec<[usize; 3]>,
    batch_size: usize,
    val_batches: usize,
    /// The segmentation target's name (the distance target, if any, is `dist`).
    seg: &'static str,
    with_dist: bool,
}

impl Balls {
    fn new(arch: &Architecture, batch_size: usize, val_batches: usize) -> Self {
        let strides = if arch.deep_supervision { arch.strides.clone() } else { Vec::new() };
        Balls { seed: 7, strides, batch_size, val_batches, seg: "seg", with_dist: true }
    }

    fn batch(&self, key: u64) -> Result<Batch> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ key.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (n, p) = (self.batch_size, PATCH);
        let (mut input, mut seg, mut dist) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let c: [f32; 3] = std::array::from_fn(|_| rng.random_range(4.0..12.0));
            let r: f32 = rng.random_range(2.5..5.0);
            for z in 0..p {
                for y in 0..p {
                    for x in 0..p {
                        let d =
                            [z, y, x].iter().zip(&c).map(|(&i, &ci)| (i as f32 - ci).powi(2)).sum::<f32>();
                        let inside = d.sqrt() <= r;
                        let noise: f32 = rng.random_range(-1.5..1.5);
                        input.push(if inside { 0.6 } else { -0.6 } + noise);
                        seg.push(f32::from(u8::from(inside)));
                        dist.push(d.sqrt() / p as f32);
                    }
                }
            }
        }
        let shape = [n, p, p, p, 1];
        let scales = |t: Tensor| -> Result<Vec<Tensor>> {
            if self.strides.is_empty() {
                Ok(vec![t])
            } else {
                deep_supervision_labels(&t, &self.strides, LabelResample::NearestExact)
            }
        };
        Ok(Batch {
            input: Tensor::from_vec(shape, input)?,
            targets: [(self.seg, seg, true), ("dist", dist, self.with_dist)]
                .into_iter()
                .filter(|t| t.2)
                .map(|(name, data, _)| {
                    Ok(TargetBatch { name: name.into(), scales: scales(Tensor::from_vec(shape, data)?)? })
                })
                .collect::<Result<_>>()?,
            origins: vec![(0, [0; 3]); n],
        })
    }
}

impl BatchSource for Balls {
    fn train_batch(&mut self, index: u64) -> Result<Batch> {
        self.batch(index)
    }

    fn validation(&mut self) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        Ok(Box::new((0..self.val_batches as u64).map(|i| self.batch(u64::MAX - i))))
    }
}

/// A tiny two-target config writing under `dir`; `extra` lines go into tr_config.
fn yaml(dir: &Path, tr_config: &str) -> String {
    format!(
        "tr_setup: {{model_name: tiny, seed: 3, vram_max: 1GB, ckpt_out_base: {d}/ck, tensorboard_log_dir: {d}/tb}}
tr_config: {{patch_size: [{PATCH}, {PATCH}, {PATCH}], batch_size: 2, {tr_config}}}
model_config: {{base_features: 4, max_features: 16, n_blocks_per_stage: [1, 1, 1]}}
dataset_config:
  targets:
    seg: {{channels: 2, loss_fn: DC_and_CE_loss, activation: softmax}}
    dist: {{channels: 1, loss_fn: MSELoss, weight: 0.5}}
",
        d = dir.display()
    )
}

fn trainer(yaml: &str, sets: &[&str]) -> Result<Trainer> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let config = Config::parse(yaml, &sets)?.config;
    let mut t = Trainer::new(config, ConfigSource { yaml: yaml.to_string(), sets, dir: None })?;
    t.progress = false;
    Ok(t)
}

fn params(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let s = t.store().to_host().unwrap();
    s.ids().map(|id| (s.name(id).to_string(), s.value(id).to_vec())).collect()
}

#[test]
fn learns_the_synthetic_task() {
    let dir = scratch_dir("learn");
    let y = yaml(&dir, "max_epoch: 6, max_steps_per_epoch: 12, max_val_steps_per_epoch: 2, initial_lr: 0.01");
    let mut t = trainer(&y, &[]).unwrap();
    let mut data = Balls::new(t.architecture(), 2, 2);
    let dice = |v: &Validation| match &v.targets[0].score {
        Score::Dice(d) => d[0],
        Score::Errors { .. } => panic!("seg is scored with Dice"),
    };
    let untrained = dice(&t.validate(&mut data).unwrap().unwrap());
    assert!(untrained < 0.5, "an untrained network scores Dice {untrained}");
    let run = t.run(&mut data, None).unwrap();
    let (first, last) = (&run.epochs[0], run.epochs.last().unwrap());
    assert!(last.train_loss < first.train_loss - 0.3, "loss {} -> {}", first.train_loss, last.train_loss);
    let v = last.validation.as_ref().unwrap();
    assert!(dice(v) > 0.85, "validation Dice {} (untrained {untrained})", dice(v));
    let Score::Errors { mse, .. } = v.targets[1].score else { panic!("dist is scored with MSE") };
    assert!(mse.is_finite() && mse < 0.05, "validation MSE {mse}");
    // EMA as nnU-Net keeps it: the first value, then 0.9 old + 0.1 new.
    let dice: Vec<f64> = run.epochs.iter().map(|e| e.validation.as_ref().unwrap().mean_dice()).collect();
    let ema = dice[1..].iter().fold(dice[0], |e, d| 0.9 * e + 0.1 * d);
    assert!((last.ema_dice.unwrap() - ema).abs() < 1e-9);
    // Outputs: the newest checkpoints_kept (default 10) epochs, best, final, GIFs, logs.
    let ck = dir.join("ck");
    assert_eq!(folder::epoch_checkpoints(&ck, "tiny", 1).unwrap().len(), 6);
    assert!(run.final_model.as_ref().unwrap().exists() && run.best_checkpoint.is_some());
    // One frame per z slice; top row input, seg, dist; bottom row blank and the two predictions.
    let gif = std::fs::File::open(ck.join("tiny_gifs/epoch_0006.gif")).unwrap();
    let mut decoder = gif::DecodeOptions::new().read_info(gif).unwrap();
    assert_eq!((decoder.width(), decoder.height()), (3 * 16 + 2 * 2, 2 * 16 + 2));
    let mut frames = 0;
    while decoder.read_next_frame().unwrap().is_some() {
        frames += 1;
    }
    assert_eq!(frames, PATCH);
    // The TensorBoard file carries the config and the plan as text.
    let tb = std::fs::read_dir(dir.join("tb/tiny")).unwrap().map(|e| e.unwrap().path());
    let events: Vec<u8> = tb
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect();
    let has = |s: &str| events.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(
        has("config/settings")
            && has("config/plan")
            && has("\"max_steps_per_epoch\": 12")
            && has("parameters:")
    );
    let jsonl = std::fs::read_to_string(dir.join("tb/tiny/metrics.jsonl")).unwrap();
    // One line per epoch, and per-step scalars every log_every_steps (10) steps and at an
    // epoch's last: global steps 10, 12, 22, 24, ...
    let lines: Vec<serde_json::Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (epochs, steps): (Vec<_>, Vec<_>) =
        lines.iter().partition(|l| l["scalars"]["train/loss"].is_number());
    assert_eq!(epochs.len(), 6);
    let at: Vec<u64> = steps.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(at, (0..6).flat_map(|e| [12 * e + 10, 12 * e + 12]).collect::<Vec<_>>());
    for l in &steps {
        let s = &l["scalars"];
        assert!(s["train/step_loss"].is_number() && s["train/seg/step_loss"].is_number(), "{l}");
        assert_eq!(
            s["train/step_lr"],
            epochs[l["epoch"].as_u64().unwrap() as usize - 1]["scalars"]["train/lr"]
        );
    }
    let e = &epochs[0]["scalars"];
    assert!(
        e["train/epoch_s"].as_f64().unwrap() > 0.0 && e["host/peak_rss_mib"].as_f64().unwrap() > 1.0,
        "{e}"
    );
    // A softmax target's Dice per foreground class, by number without class_names.
    assert!(
        jsonl.contains("\"val/seg/dice/1\"")
            && !jsonl.contains("dice/0")
            && jsonl.contains("\"val/dist/mse\"")
    );
    // The final model is a plain weights file.
    unet3d::model::weights::load(run.final_model.as_ref().unwrap(), t.architecture()).unwrap();
    // A second fresh run refuses to overwrite the first one's checkpoints.
    let e = trainer(&y, &[]).unwrap().run(&mut data, None).unwrap_err().to_string();
    assert!(e.contains("earlier run") && e.contains("--overwrite"), "{e}");
    // With overwrite, the earlier run's files go before the new run writes its own.
    let mut again = trainer(&y, &["tr_config.max_epoch=1", "tr_config.max_val_steps_per_epoch=0"]).unwrap();
    again.overwrite = true;
    let run = again.run(&mut data, None).unwrap();
    assert_eq!(folder::epoch_checkpoints(&ck, "tiny", 1).unwrap().len(), 1);
    assert!(run.best_checkpoint.is_none() && run.final_model.unwrap().exists());
}

#[test]
fn resume_continues_exactly() {
    let dir = scratch_dir("resume");
    // Accumulation 2 over 3 steps also covers the short last group of each epoch.
    let y = yaml(
        &dir,
        "max_epoch: 4, max_steps_per_epoch: 3, max_val_steps_per_epoch: 1, gradient_accumulation: 2",
    );
    let mut straight = trainer(&y, &["tr_setup.model_name=straight"]).unwrap();
    let mut data = Balls::new(straight.architecture(), 2, 1);
    straight.run(&mut data, None).unwrap();

    let mut first = trainer(&y, &[]).unwrap();
    first.run(&mut data, Some(2)).unwrap();
    assert_eq!(first.state().epochs_done, 2);
    let ck = dir.join("ck").join(CheckpointName { run: 1, kind: Kind::Epoch(2) }.file_name("tiny"));
    let resume = format!("tr_setup.checkpoint_path={}", ck.display());
    let mut second = trainer(&y, &[&resume]).unwrap();
    assert_eq!((second.state().epochs_done, second.state().global_step), (2, 6));
    second.run(&mut data, None).unwrap();
    assert_eq!(second.state().optimizer_steps, straight.state().optimizer_steps);
    for ((name, a), (_, b)) in params(&straight).iter().zip(params(&second)) {
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6, "{name}: resumed run differs by {diff}");
    }
    assert_eq!(second.state().ema_dice, straight.state().ema_dice);
}

#[test]
fn a_resume_from_an_older_checkpoint_keeps_every_file_of_both_runs() {
    let dir = scratch_dir("resume-older");
    let y = yaml(&dir, "max_epoch: 4, max_steps_per_epoch: 2, max_val_steps_per_epoch: 1");
    let kept = "tr_setup.checkpoints_kept=2";
    // Both kept checkpoints resumable, so the older one can be resumed from.
    let mut first = trainer(&y, &[kept, "tr_setup.resumable_checkpoints=2"]).unwrap();
    let mut data = Balls::new(first.architecture(), 2, 1);
    let run1 = first.run(&mut data, None).unwrap();
    drop(first);
    let ck = dir.join("ck");
    let before = files_under(&ck);
    assert_eq!(folder::epoch_checkpoints(&ck, "tiny", 1).unwrap().len(), 2);

    let source = ck.join(CheckpointName { run: 1, kind: Kind::Epoch(3) }.file_name("tiny"));
    let resume = format!("tr_setup.checkpoint_path={}", source.display());
    let mut second = trainer(&y, &[kept, &resume, "tr_config.max_epoch=6"]).unwrap();
    let run2 = second.run(&mut data, None).unwrap();
    drop(second);
    let after = files_under(&ck);
    for (path, bytes) in &before {
        assert_eq!(after.get(path), Some(bytes), "{} of the first run changed or went", path.display());
    }
    let run2_epochs: Vec<usize> =
        folder::epoch_checkpoints(&ck, "tiny", 2).unwrap().into_iter().map(|(e, _)| e).collect();
    assert_eq!(run2_epochs, vec![5, 6], "the second run's newest two, under its own name");
    assert!(run2.final_model.unwrap().ends_with("tiny.run2_final.safetensors"));
    assert!(run1.final_model.unwrap().exists());
    assert!(ck.join("tiny.run2_gifs").is_dir() && dir.join("tb/tiny.run2/metrics.jsonl").exists());
    let epochs = |log: String| log.lines().filter(|l| l.contains("\"train/loss\"")).count();
    assert_eq!(epochs(std::fs::read_to_string(dir.join("tb/tiny/metrics.jsonl")).unwrap()), 4);
}

#[test]
fn only_the_newest_epoch_checkpoint_keeps_the_optimizer_state() {
    let dir = scratch_dir("resumable");
    let y = yaml(&dir, "max_epoch: 3, max_steps_per_epoch: 2, max_val_steps_per_epoch: 1");
    let mut t = trainer(&y, &[]).unwrap();
    let mut data = Balls::new(t.architecture(), 2, 1);
    t.run(&mut data, None).unwrap();
    // The same run with every checkpoint resumable, for the weights each epoch had.
    let mut all = trainer(&y, &["tr_setup.model_name=all", "tr_setup.resumable_checkpoints=3"]).unwrap();
    all.run(&mut data, None).unwrap();
    let ck = dir.join("ck");
    let (mine, full) = (
        folder::epoch_checkpoints(&ck, "tiny", 1).unwrap(),
        folder::epoch_checkpoints(&ck, "all", 1).unwrap(),
    );
    assert_eq!((mine.len(), full.len()), (3, 3));
    let arch = t.architecture();
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    for ((e, p), (_, f)) in mine[..2].iter().zip(&full) {
        let err = format!("{:#}", checkpoint::load(p, arch).err().expect("weights only"));
        assert!(err.contains("holds weights only"), "epoch {e}: {err}");
        // The epoch's weights and model record stay: it still predicts and fine-tunes.
        let (a, b) = (checkpoint::load_weights(p, arch).unwrap(), checkpoint::load(f, arch).unwrap().store);
        assert!(
            a.ids().all(|id| a.value(id).to_vec() == b.value(id).to_vec()),
            "epoch {e}: the weights changed"
        );
        assert!(checkpoint::model_record(p).unwrap().is_some());
        // AdamW keeps two moments per parameter: a weights-only file is about a third.
        assert!(3 * size(p) < size(f) + size(f) / 10, "epoch {e}: {} vs {} bytes", size(p), size(f));
    }
    assert!(checkpoint::load(&mine[2].1, arch).is_ok(), "the newest resumes");
}

#[test]
fn a_second_run_of_a_model_is_refused_while_the_first_holds_the_folder() {
    let dir = scratch_dir("concurrent");
    let y = yaml(&dir, "max_epoch: 1, max_steps_per_epoch: 1, max_val_steps_per_epoch: 0");
    let mut first = trainer(&y, &[]).unwrap();
    first.claim_outputs().unwrap();
    let mut second = trainer(&y, &[]).unwrap();
    second.overwrite = true;
    let e = format!("{:#}", second.claim_outputs().unwrap_err());
    assert!(e.contains("tiny.lock") && e.contains("being trained by pid"), "{e}");
    let mut data = Balls::new(first.architecture(), 2, 0);
    first.run(&mut data, None).unwrap();
    drop(first);
    second.run(&mut data, None).unwrap();
}

#[test]
fn weights_only_starts_at_epoch_zero_with_a_fresh_optimizer() {
    let dir = scratch_dir("weights-only");
    let y = yaml(&dir, "max_epoch: 2, max_steps_per_epoch: 2, max_val_steps_per_epoch: 1");
    let mut t = trainer(&y, &[]).unwrap();
    let mut data = Balls::new(t.architecture(), 2, 1);
    t.run(&mut data, Some(1)).unwrap();
    let ck = dir.join("ck").join(CheckpointName { run: 1, kind: Kind::Epoch(1) }.file_name("tiny"));
    let sets = [
        format!("tr_setup.checkpoint_path={}", ck.display()),
        "tr_setup.load_weights_only=true".to_string(),
        "tr_setup.model_name=finetune".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let tuned = trainer(&y, &sets).unwrap();
    assert_eq!(
        (tuned.state().epochs_done, tuned.state().global_step, tuned.state().optimizer_steps),
        (0, 0, 0)
    );
    assert!(
        tuned.optimizer().export_state().unwrap().tensors.is_empty(),
        "the optimizer starts without moments"
    );
    assert_eq!(params(&tuned), params(&t), "the weights are the checkpoint's");
    // Resuming the same file in full does restore the moments.
    let full = trainer(&y, &[sets[0]]).unwrap();
    assert!(!full.optimizer().export_state().unwrap().tensors.is_empty());
}

#[test]
fn a_mismatched_checkpoint_is_refused_before_training() {
    let dir = scratch_dir("mismatch");
    let y = yaml(&dir, "max_epoch: 1, max_steps_per_epoch: 1, max_val_steps_per_epoch: 0");
    let mut t = trainer(&y, &[]).unwrap();
    let mut data = Balls::new(t.architecture(), 2, 0);
    t.run(&mut data, None).unwrap();
    let ck = dir.join("ck").join(CheckpointName { run: 1, kind: Kind::Epoch(1) }.file_name("tiny"));
    let set = format!("tr_setup.checkpoint_path={}", ck.display());
    let e = format!("{:#}", trainer(&y, &[&set, "model_config.base_features=8"]).err().unwrap());
    assert!(e.contains("checkpoint_path") && e.contains(&ck.display().to_string()), "{e}");
    assert!(e.contains("do not fit") && e.contains("features_per_stage"), "{e}");
}

#[test]
fn auto_sizes_are_refused_until_planned() {
    let dir = scratch_dir("auto");
    let y = yaml(&dir, "max_epoch: 1");
    let e = format!("{:#}", trainer(&y, &["tr_config.patch_size=auto"]).err().expect("refused"));
    assert!(e.contains("auto") && e.contains("plan"), "{e}");
}

#[test]
fn refuses_what_it_cannot_run() {
    let dir = scratch_dir("refuse");
    let y = yaml(&dir, "max_epoch: 1");
    // No kernels, driver or device here: the device's own error, naming the key. (Nothing to check
    // where cuda:0 really is there.)
    if let Err(e) = trainer(&y, &["tr_setup.device=cuda:0"]) {
        let e = format!("{e:#}");
        let why = ["no CUDA kernels", "CUDA driver", "no such device"];
        assert!(e.contains("tr_setup.device cuda:0") && why.iter().any(|w| e.contains(w)), "{e}");
    }
    let e = format!("{:#}", trainer(&y, &["tr_setup.vram_max=1MB"]).err().unwrap());
    assert!(e.contains("refusing to train") && e.contains("vram_max"), "{e}");
}

/// Training on the sim device (forward, backward, accumulation, clipping and the optimizer in the
/// CUDA kernels) against the CPU: every parameter, every step's losses and the validation losses.
/// One step per epoch, so that each epoch's mean is one step's loss; SGD with weight decay, so
/// that a parameter the step gave a zero gradient instead of none would move; BCELoss on `dist`,
/// so the sigmoid before it runs on the device too.
#[test]
fn training_on_the_sim_matches_the_cpu() {
    let tr = "max_epoch: 3, max_steps_per_epoch: 1, max_val_steps_per_epoch: 1, initial_lr: 0.01, \
              optimizer: SGD, weight_decay: 0.1, grad_clip_max_norm: 1.0";
    let run = |device: &str| {
        let dir = scratch_dir(&format!("parity-{device}"));
        let y = yaml(&dir, tr).replace("MSELoss", "BCELoss");
        let mut t = trainer(&y, &[&format!("tr_setup.device={device}")]).unwrap();
        let mut data = Balls::new(t.architecture(), 2, 1);
        let start = std::time::Instant::now();
        let run = t.run(&mut data, None).unwrap();
        eprintln!("3 steps on {device}: {:.1} s", start.elapsed().as_secs_f64());
        (t, run)
    };
    let (cpu, cpu_run) = run("cpu");
    let (sim, sim_run) = run("sim");
    let close = |what: String, a: f64, b: f64| {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-6), "{what}: sim {a}, cpu {b}");
    };
    for (s, c) in sim_run.epochs.iter().zip(&cpu_run.epochs) {
        close(format!("step {} loss", c.epoch), s.train_loss, c.train_loss);
        for ((name, a), (_, b)) in s.train_target_losses.iter().zip(&c.train_target_losses) {
            close(format!("step {} loss of {name}", c.epoch), *a, *b);
        }
        let (sv, cv) = (s.validation.as_ref().unwrap().scalars(), c.validation.as_ref().unwrap().scalars());
        for ((name, a), (_, b)) in sv.iter().zip(&cv).filter(|(n, _)| n.0.ends_with("loss")) {
            close(format!("epoch {} {name}", c.epoch), *a, *b);
        }
    }
    assert_eq!(sim_run.epochs.len(), 3);
    let (a, b) = (&sim.store().to_host().unwrap(), cpu.store());
    assert_eq!(a.len(), b.len());
    let init = unet3d::model::init::initialize(cpu.architecture(), 3).unwrap();
    let mut moved = 0;
    for id in b.ids() {
        let name = b.name(id);
        let got = a.value(a.id(name).unwrap());
        let want = b.value(id);
        let norm = |t: &Tensor| t.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        if norm(want) < 1e-5 {
            // A conv bias under an instance norm: zero-initialised, its gradient analytically zero,
            // so both sides hold float32 noise.
            assert!(norm(got) < 1e-5, "parameter {name}: norm {:e}, the CPU's {:e}", norm(got), norm(want));
        } else {
            assert_close(&format!("parameter {name}"), got, want, 1e-4);
        }
        moved += usize::from(b.value(id).data() != init.value(init.id(name).unwrap()).data());
    }
    assert!(moved > b.len() / 2, "only {moved} of {} parameters changed in training", b.len());
    assert_eq!(sim.state().optimizer_steps, 3);
}

/// After the first step a training step on the sim moves the batch and its labels up and a few
/// scalars down (the loss of each target and the gradient norm): parameters, gradients and
/// optimizer state stay on the device. The counters come per epoch in the report.
#[test]
fn a_device_step_moves_only_the_batch_and_labels_up_and_scalars_down() {
    let dir = scratch_dir("counters");
    let tr = "max_epoch: 2, max_steps_per_epoch: 2, max_val_steps_per_epoch: 0, optimizer: AdamW, \
              grad_clip_max_norm: 1.0, gradient_accumulation: 1";
    let mut t = trainer(&yaml(&dir, tr), &["tr_setup.device=sim"]).unwrap();
    let mut data = Balls::new(t.architecture(), 2, 0);
    let heads = t.architecture().n_stages() - 1;
    let run = t.run(&mut data, None).unwrap();
    assert!(run.epochs.iter().all(|e| e.train_loss.is_finite()));
    let batch = data.train_batch(0).unwrap();
    let labels: usize =
        batch.targets.iter().map(|t| t.scales[..heads].iter().map(Tensor::numel).sum::<usize>()).sum();
    let per_step = 4 * (batch.input.numel() + labels) as u64;
    let second = run.epochs[1].device.expect("counters on a kernel device");
    eprintln!("epoch 2 (2 steps) on the sim: {second}; the batch and labels are {per_step} bytes");
    assert!(second.host_to_device_bytes <= 2 * per_step, "{second}: more than the batches went up");
    assert!(second.device_to_host_bytes <= 2 * 4096, "{second}: more than 4 KiB per step came down");
    assert!(second.launches > 0 && second.peak_bytes > 0, "{second}");
    assert!(t.store().device() == unet3d::device::Device::Sim, "the parameters stay on the device");
}

#[test]
fn a_seed_yaml_runs_with_its_ignored_keys() {
    let dir = scratch_dir("seed");
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tasks/seed-example.yaml")).unwrap();
    let sets: Vec<String> = [
        format!("tr_setup.ckpt_out_base={}/ck", dir.display()),
        format!("tr_setup.tensorboard_log_dir={}/tb", dir.display()),
        "tr_config.patch_size=[16, 16, 16]".to_string(),
        "tr_config.batch_size=2".to_string(),
        "tr_config.max_epoch=1".to_string(),
        "tr_config.max_steps_per_epoch=2".to_string(),
        "tr_config.max_val_steps_per_epoch=1".to_string(),
    ]
    .into();
    let parsed = Config::parse(&yaml, &sets).unwrap();
    for key in ["tr_config.ignore_label", "tr_config.loss_only_on_label", "dataset_config.cache_file"] {
        assert!(
            parsed.warnings.iter().any(|w| w.contains(key)),
            "no warning for {key}: {:?}",
            parsed.warnings
        );
    }
    let mut t = Trainer::new(parsed.config, ConfigSource { yaml, sets, dir: None }).unwrap();
    t.progress = false;
    let mut data = Balls { seg: "ink", with_dist: false, ..Balls::new(t.architecture(), 2, 1) };
    let run = t.run(&mut data, None).unwrap();
    assert_eq!(run.epochs.len(), 1);
    assert!(run.epochs[0].train_loss.is_finite());
    assert!(run.final_model.unwrap().ends_with("ink_final.safetensors"));
}

/// Two `size`^3 example volumes (seeded) written under a fresh `name` folder, and a config
/// training the demo's three targets on them through the real dataset and loader: (folder, data
/// folder, YAML).
fn example(name: &str, size: usize, seed: u64, tr_config: &str) -> (PathBuf, PathBuf, String) {
    let dir = scratch_dir(name);
    let data = dir.join("data");
    let opts = unet3d::data::example::ExampleOptions { volumes: 2, size, seed, overwrite: false };
    unet3d::data::example::write_example_data(&data, &opts).unwrap();
    let volume = |k: usize| {
        let v = data.join(format!("volume{k}.zarr"));
        format!(
            "    - {{input: {0}/input, sheet: {0}/sheet, distance: {0}/distance, normals: {0}/normals, ref_label: sheet}}\n",
            v.display()
        )
    };
    let yaml = format!(
        "tr_setup: {{model_name: ex, seed: 2, tr_val_split: 0.5, ckpt_out_base: {d}/ck, tensorboard_log_dir: {d}/tb}}
tr_config: {{patch_size: [{PATCH}, {PATCH}, {PATCH}], batch_size: 2, num_dataloader_workers: 1, initial_lr: 0.01, {tr_config}}}
model_config: {{base_features: 4, max_features: 16, n_blocks_per_stage: [1, 1, 1]}}
dataset_config:
  normalization: zscore
  sampling: random
  targets:
    sheet: {{channels: 1, activation: sigmoid, loss_fn: BCEDiceLoss}}
    distance: {{channels: 1, loss_fn: SmoothL1Loss, weight: 0.5}}
    normals: {{channels: 3, loss_fn: MaskedCosineLoss}}
  volume_paths:
{}{}",
        volume(0),
        volume(1),
        d = dir.display()
    );
    (dir, data, yaml)
}

#[test]
fn trains_on_the_example_data_through_the_loader() {
    let (_, _, y) =
        example("example", 32, 0, "max_epoch: 5, max_steps_per_epoch: 8, max_val_steps_per_epoch: 2");
    let config = Config::parse(&y, &[]).unwrap().config;
    let mut t = Trainer::new(config.clone(), ConfigSource::default()).unwrap();
    t.progress = false;
    let mut source = LoaderSource::new(&config, t.architecture()).unwrap();
    let untrained = t.validate(&mut source).unwrap().unwrap();
    let run = t.run(&mut source, None).unwrap();
    let (first, last) = (&run.epochs[0], run.epochs.last().unwrap());
    assert!(last.train_loss < first.train_loss, "loss {} -> {}", first.train_loss, last.train_loss);
    let v = last.validation.as_ref().unwrap();
    let Score::Dice(d) = &v.targets[0].score else { panic!("sheet is scored with Dice") };
    let Score::Dice(d0) = &untrained.targets[0].score else { unreachable!() };
    assert!(d[0] > 0.85 && d0[0] < 0.6, "validation sheet Dice {d0:?} untrained, {d:?} trained");
    // The validation pass is the same every epoch: validating again gives the same numbers.
    assert_eq!(t.validate(&mut source).unwrap().as_ref(), Some(v));
}

#[test]
fn resume_through_the_loader_continues_with_the_same_batches() {
    let (dir, _, y) =
        example("example-resume", 24, 1, "max_epoch: 2, max_steps_per_epoch: 3, max_val_steps_per_epoch: 1");
    let run = |sets: &[&str], stop: Option<usize>| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let config = Config::parse(&y, &sets).unwrap().config;
        let mut t = Trainer::new(config.clone(), ConfigSource::default()).unwrap();
        t.progress = false;
        // A fresh loader each time, as a restarted process has.
        let mut source = LoaderSource::new(&config, t.architecture()).unwrap();
        t.run(&mut source, stop).unwrap();
        t
    };
    let straight = run(&["tr_setup.model_name=straight"], None);
    run(&[], Some(1));
    let ck = dir.join("ck").join(CheckpointName { run: 1, kind: Kind::Epoch(1) }.file_name("ex"));
    let resumed = run(&[&format!("tr_setup.checkpoint_path={}", ck.display())], None);
    assert_eq!(resumed.state().global_step, 6);
    for ((name, a), (_, b)) in params(&straight).iter().zip(params(&resumed)) {
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6, "{name}: resumed run differs by {diff}");
    }
}

#[test]
fn dice_counts_match_a_hand_count() {
    use unet3d::train::metrics::{Decision, DiceCounts, ErrorSums, ema};
    // 4 voxels, 3 classes: predictions (argmax) 1, 2, 0, 1 against truth 1, 1, 0, 2.
    let logits =
        Tensor::from_vec([1, 1, 1, 4, 3], vec![0., 5., 1., 0., 1., 3., 9., 0., 0., 2., 7., 7.]).unwrap();
    let truth = Tensor::from_vec([1, 1, 1, 4, 1], vec![1., 1., 0., 2.]).unwrap();
    let mut c = DiceCounts::default();
    c.add(Decision::Argmax, &logits, &truth).unwrap();
    // Ties go to the first class (voxel 3: classes 1 and 2 tie at 7).
    assert_eq!((c.tp.clone(), c.fp.clone(), c.fn_.clone()), (vec![1, 0], vec![1, 1], vec![1, 1]));
    assert_eq!(c.dice(), vec![0.5, 0.0]);
    // Threshold: logit > 0 per channel against > 0.5.
    let logits = Tensor::from_vec([1, 1, 1, 2, 2], vec![1., -1., 2., 3.]).unwrap();
    let truth = Tensor::from_vec([1, 1, 1, 2, 2], vec![1., 0., 0., 1.]).unwrap();
    let mut c = DiceCounts::default();
    c.add(Decision::Threshold, &logits, &truth).unwrap();
    assert_eq!(c.dice(), vec![2.0 / 3.0, 1.0]);
    // A class absent from prediction and truth is NaN, not a perfect score.
    let mut c = DiceCounts::default();
    c.add(Decision::Threshold, &Tensor::full([1, 1, 1, 2, 1], -1.0), &Tensor::zeros([1, 1, 1, 2, 1]))
        .unwrap();
    assert!(c.dice()[0].is_nan());
    let mut e = ErrorSums::default();
    e.add(&Tensor::from_vec([2], vec![1.0, 4.0]).unwrap(), &Tensor::from_vec([2], vec![2.0, 2.0]).unwrap())
        .unwrap();
    assert_eq!((e.mse(), e.mae()), (2.5, 1.5));
    assert_eq!(ema(None, 0.5), Some(0.5));
    assert_eq!(ema(Some(0.5), 1.0), Some(0.55));
    assert_eq!(ema(Some(0.5), f64::NAN), Some(0.5));
}

#[test]
fn ct_statistics_travel_with_the_model() {
    use unet3d::data::VolumeArray;
    use unet3d::data::normalize::CtStats;
    use unet3d::data::zarr::{ChunkCache, ZarrArray};
    let (dir, data, y) =
        example("ct", 16, 3, "max_epoch: 1, max_steps_per_epoch: 1, max_val_steps_per_epoch: 1");
    let sets = vec!["dataset_config.normalization=ct".to_string()];
    let config = Config::parse(&y, &sets).unwrap().config;
    let mut t = Trainer::new(config.clone(), ConfigSource { yaml: y.clone(), sets, dir: None }).unwrap();
    t.progress = false;
    let mut source = LoaderSource::new(&config, t.architecture()).unwrap();
    let run = t.run(&mut source, None).unwrap();
    // nnU-Net's fingerprint: every volume's foreground (ref_label > 0), computed independently here.
    let cache = ChunkCache::new(1 << 20);
    let open =
        |k: usize, a: &str| ZarrArray::open(&data.join(format!("volume{k}.zarr/{a}")), 1, &cache).unwrap();
    let arrays: Vec<(ZarrArray, ZarrArray)> = (0..2).map(|k| (open(k, "input"), open(k, "sheet"))).collect();
    let pairs: Vec<(&dyn VolumeArray, &dyn VolumeArray)> =
        arrays.iter().map(|(i, l)| (i as &dyn VolumeArray, l as &dyn VolumeArray)).collect();
    let want = CtStats::compute(&pairs).unwrap();
    let final_model = run.final_model.unwrap();
    assert_eq!(checkpoint::ct_stats(&final_model).unwrap(), Some(want.clone()));
    assert_eq!(checkpoint::ct_stats(&run.epochs[0].checkpoint).unwrap(), Some(want));
    // The final model carries its training config and network: `infer` needs no YAML, and its `ct`
    // channel normalises with the carried statistics.
    let record = checkpoint::model_record(&final_model).unwrap().expect("a model record");
    assert_eq!((&record.architecture, record.config_yaml.as_str()), (t.architecture(), y.as_str()));
    let out = dir.join("predicted");
    let argv = [
        "unet3d",
        "infer",
        "--checkpoint",
        &final_model.display().to_string(),
        "--input",
        &data.join("volume0.zarr/input").display().to_string(),
        "--output",
        &out.display().to_string(),
        "--no-mirroring",
    ]
    .map(String::from);
    use clap::Parser;
    unet3d::cli::Cli::try_parse_from(argv.clone()).unwrap().run().unwrap();
    assert!(out.join("predictions.zarr/sheet/zarr.json").is_file());
    // Overrides may not turn the carried config into another network.
    let mut other: Vec<String> = argv.to_vec();
    other.extend(["--set".to_string(), "model_config.nonlin=ReLU".to_string()]);
    let e = format!("{:#}", unet3d::cli::Cli::try_parse_from(other).unwrap().run().unwrap_err());
    assert!(e.contains("another network") && e.contains("nonlin"), "{e}");
    // A file without a record (a plain weights export) needs --config.
    let plain_weights = dir.join("plain.safetensors");
    unet3d::model::weights::save(&plain_weights, t.architecture(), &t.store().to_host().unwrap()).unwrap();
    let mut argv = argv.clone();
    argv[3] = plain_weights.display().to_string();
    let e = format!("{:#}", unet3d::cli::Cli::try_parse_from(argv).unwrap().run().unwrap_err());
    assert!(e.contains("plain.safetensors") && e.contains("--config"), "{e}");
    // Without ct there is nothing to carry.
    let mut plain =
        trainer(&yaml(&dir, "max_epoch: 1, max_steps_per_epoch: 1, max_val_steps_per_epoch: 0"), &[])
            .unwrap();
    let mut balls = Balls::new(plain.architecture(), 2, 0);
    let run = plain.run(&mut balls, None).unwrap();
    assert_eq!(checkpoint::ct_stats(&run.final_model.unwrap()).unwrap(), None);
}

/// Balls whose training batches `bad` carry a NaN in the input, with origins naming them.
struct Poisoned {
    balls: Balls,
    bad: Vec<u64>,
}

impl BatchSource for Poisoned {
    fn train_batch(&mut self, index: u64) -> Result<Batch> {
        let mut b = self.balls.batch(index)?;
        if self.bad.contains(&index) {
            let mut x = b.input.data().to_vec();
            x[5] = f32::NAN;
            b.input = Tensor::from_vec(b.input.dims().to_vec(), x)?;
            b.origins = vec![(1, [3, 4, 5]), (0, [0, 0, 0])];
        }
        Ok(b)
    }

    fn validation(&mut self) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        self.balls.validation()
    }

    fn volume_name(&self, index: usize) -> String {
        ["case-a", "case-b"][index].to_string()
    }
}

#[test]
fn non_finite_steps_are_skipped_and_counted_and_too_many_stop_the_run_naming_the_batches() {
    let dir = scratch_dir("non-finite");
    let y = yaml(
        &dir,
        "max_epoch: 2, max_steps_per_epoch: 4, max_val_steps_per_epoch: 0, max_skipped_fraction: 0.25",
    );
    let mut t = trainer(&y, &[]).unwrap();
    let balls = Balls::new(t.architecture(), 2, 0);
    let run = t.run(&mut Poisoned { balls, bad: vec![2] }, None).unwrap();
    assert_eq!(run.epochs.iter().map(|e| e.skipped_steps).collect::<Vec<_>>(), vec![1, 0]);
    assert_eq!(t.state().optimizer_steps, 7, "the poisoned step alone was skipped");
    assert!(params(&t).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    let jsonl = std::fs::read_to_string(dir.join("tb/tiny/metrics.jsonl")).unwrap();
    let first_epoch = jsonl.lines().find(|l| l.contains("\"train/loss\"")).unwrap();
    assert!(first_epoch.contains("\"train/skipped_steps\":1.0"), "{jsonl}");

    let mut t = trainer(&y, &["tr_setup.model_name=many"]).unwrap();
    let balls = Balls::new(t.architecture(), 2, 0);
    let e = format!("{:#}", t.run(&mut Poisoned { balls, bad: vec![1, 3] }, None).unwrap_err());
    assert!(e.contains("2 of this epoch's 4 optimizer steps") && e.contains("max_skipped_fraction"), "{e}");
    assert!(e.contains("batch 1: case-b at [3, 4, 5], case-a at [0, 0, 0]") && e.contains("batch 3:"), "{e}");
}

#[test]
fn a_resume_reports_every_changed_setting_and_refuses_another_architecture() {
    let dir = scratch_dir("resume-changes");
    let y = yaml(&dir, "max_epoch: 2, max_steps_per_epoch: 1, max_val_steps_per_epoch: 0, initial_lr: 0.01");
    let mut t = trainer(&y, &[]).unwrap();
    let mut data = Balls::new(t.architecture(), 2, 0);
    t.run(&mut data, Some(1)).unwrap();
    drop(t);
    let ck = dir.join("ck").join(CheckpointName { run: 1, kind: Kind::Epoch(1) }.file_name("tiny"));
    let resume = format!("tr_setup.checkpoint_path={}", ck.display());
    let same = trainer(&y, &[&resume]).unwrap();
    assert!(same.resume_changes().is_empty(), "{:?}", same.resume_changes());
    let changed = trainer(
        &y,
        &[&resume, "tr_config.initial_lr=0.002", "tr_config.batch_size=3", "tr_config.max_epoch=5"],
    )
    .unwrap();
    assert_eq!(
        changed.resume_changes(),
        [
            "tr_config.batch_size: 2 vs 3",
            "tr_config.initial_lr: 0.01 vs 0.002",
            "tr_config.max_epoch: 2 vs 5"
        ]
    );
    // The same parameter shapes, another network: refused, with what differs.
    let e = format!("{:#}", trainer(&y, &[&resume, "model_config.nonlin=ReLU"]).err().unwrap());
    assert!(
        e.contains("another architecture") && e.contains("nonlin") && e.contains("load_weights_only"),
        "{e}"
    );
}

#[test]
fn folds_split_the_cases_once_and_each_writes_to_its_own_folder() {
    let dir = scratch_dir("folds");
    let data = dir.join("data");
    let opts = unet3d::data::example::ExampleOptions { volumes: 5, size: 16, seed: 4, overwrite: false };
    unet3d::data::example::write_example_data(&data, &opts).unwrap();
    let volumes: String = (0..5)
        .map(|k| {
            let v = data.join(format!("volume{k}.zarr"));
            format!("    - {{input: {0}/input, sheet: {0}/sheet, ref_label: sheet}}\n", v.display())
        })
        .collect();
    let yaml = format!(
        "tr_setup: {{model_name: f, ckpt_out_base: {d}/ck, tensorboard_log_dir: {d}/tb}}
tr_config: {{patch_size: [{PATCH}, {PATCH}, {PATCH}], batch_size: 2, num_dataloader_workers: 0, max_epoch: 1, \
max_steps_per_epoch: 1, max_val_steps_per_epoch: 1}}
model_config: {{base_features: 4, max_features: 8, n_blocks_per_stage: [1, 1, 1]}}
dataset_config:
  sampling: random
  targets:
    sheet: {{channels: 1, activation: sigmoid, loss_fn: BCEDiceLoss}}
  volume_paths:
{volumes}",
        d = dir.display()
    );
    let train_fold = |fold: &str| {
        let sets = vec![format!("tr_setup.fold={fold}")];
        let config = Config::parse(&yaml, &sets).unwrap().config;
        let mut t =
            Trainer::new(config.clone(), ConfigSource { yaml: yaml.clone(), sets, dir: None }).unwrap();
        t.progress = false;
        let mut source = LoaderSource::new(&config, t.architecture()).unwrap();
        t.run(&mut source, None).unwrap()
    };
    let run = train_fold("3");
    assert!(run.final_model.unwrap().starts_with(dir.join("ck/fold_3")));
    assert!(dir.join("tb/fold_3/f/metrics.jsonl").is_file());
    let splits = std::fs::read(dir.join("ck/splits.json")).unwrap();
    let folds: Vec<unet3d::train::folds::FoldCases> = serde_json::from_slice(&splits).unwrap();
    assert!(folds.iter().all(|f| f.val.len() == 1 && f.train.len() == 4));
    // The next fold reuses the split; "all" trains on everything, in its own folder.
    train_fold("0");
    assert_eq!(std::fs::read(dir.join("ck/splits.json")).unwrap(), splits);
    assert!(train_fold("all").final_model.unwrap().starts_with(dir.join("ck/fold_all")));
    let e = format!("{:#}", Config::parse(&yaml, &["tr_setup.fold=5".to_string()]).err().unwrap());
    assert!(e.contains("tr_setup.fold") && e.contains("0..4"), "{e}");
}
