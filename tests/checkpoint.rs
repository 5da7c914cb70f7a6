//! Checkpoint files: a round trip keeps every value, an interrupted write never leaves a file that
//! loads wrongly, and files that do not fit are clear errors. Checkpoint folders: one run at a
//! time, and pruning removes only the run's own files.

mod common;

use common::scratch_dir;
use std::path::{Path, PathBuf};

use unet3d::arch::Architecture;
use unet3d::autograd::ParamStore;
use unet3d::config::Config;
use unet3d::model::{init, weights};
use unet3d::optim::{Adam, AdamHyper, AdamMeta, LrSchedule, Optimizer, OptimizerMeta};
use unet3d::tensor::Tensor;
use unet3d::train::checkpoint::{self, FORMAT_VERSION, ScheduleRecord, TrainingState};
use unet3d::train::folder::{self, CheckpointName, Kind, RunFolder, Start};

/// The name `folder` gives a checkpoint of `model`'s run `run`.
fn named(dir: &Path, model: &str, run: u32, kind: Kind) -> PathBuf {
    dir.join(CheckpointName { run, kind }.file_name(model))
}

fn epoch_path(dir: &Path, model: &str, epoch: usize) -> PathBuf {
    named(dir, model, 1, Kind::Epoch(epoch))
}

fn arch(base_features: usize) -> Architecture {
    let yaml = format!(
        "tr_config: {{patch_size: [16, 16, 16]}}
model_config: {{base_features: {base_features}, max_features: 16, n_blocks_per_stage: [1, 1, 1]}}
dataset_config: {{targets: {{seg: {{channels: 2, loss_fn: DC_and_CE_loss}}}}}}
"
    );
    Config::parse(&yaml, &[]).unwrap().config.architecture().unwrap()
}

fn state(epochs_done: usize) -> TrainingState {
    TrainingState {
        format_version: FORMAT_VERSION,
        model_name: "m".into(),
        epochs_done,
        global_step: 10 * epochs_done as u64,
        optimizer_steps: 5 * epochs_done as u64,
        seed: 1,
        ema_dice: Some(0.5),
        best_ema_dice: Some(0.5),
        best_epoch: Some(epochs_done),
        best_whole_volume_dice: None,
        optimizer: None,
        schedule: Some(ScheduleRecord { schedule: LrSchedule::Cosine { max_epochs: 3 }, initial_lr: 1e-3 }),
        config_yaml: "tr_setup: {}".into(),
        config_sets: vec!["tr_config.batch_size=2".into()],
        config_dir: None,
        ct_stats: None,
    }
}

/// A store and an AdamW state after `steps` steps on a fixed gradient.
fn trained(arch: &Architecture, steps: usize) -> (ParamStore, Adam) {
    let mut store = init::initialize(arch, 5).unwrap();
    let mut adam = Adam::new(AdamHyper::default()).unwrap();
    for _ in 0..steps {
        for id in store.ids().collect::<Vec<_>>() {
            let g: Vec<f32> = (0..store.value(id).numel()).map(|i| (i % 7) as f32 - 3.0).collect();
            store.accumulate_grad(id, Tensor::from_vec(store.value(id).dims().to_vec(), g).unwrap()).unwrap();
        }
        adam.step(&mut store).unwrap();
        store.zero_grad();
    }
    (store, adam)
}

fn assert_same_store(a: &ParamStore, b: &ParamStore) {
    assert_eq!(a.len(), b.len());
    for id in a.ids() {
        let other = b.id(a.name(id)).unwrap();
        assert_eq!(a.value(id).data(), b.value(other).data(), "{}", a.name(id));
    }
}

#[test]
fn round_trip_keeps_weights_moments_and_state() {
    let (dir, arch) = (scratch_dir("round-trip"), arch(4));
    let (store, adam) = trained(&arch, 3);
    let path = dir.join("m_1.safetensors");
    checkpoint::save(&path, &arch, &store, &adam.export_state().unwrap(), &state(1)).unwrap();
    let ck = checkpoint::load(&path, &arch).unwrap();
    assert_same_store(&store, &ck.store);
    assert_eq!(ck.optimizer.tensors.len(), 2 * store.len());
    for (name, t) in &adam.export_state().unwrap().tensors {
        assert_eq!(ck.optimizer.tensors[name].data(), t.data(), "{name}");
    }
    assert_eq!(ck.optimizer.meta, adam.export_state().unwrap().meta);
    assert_eq!(ck.state, TrainingState { optimizer: Some(adam.export_state().unwrap().meta), ..state(1) });
    // The imported optimizer continues as the original does.
    let mut resumed = Adam::new(AdamHyper::default()).unwrap();
    resumed.import_state(&ck.store, &ck.optimizer).unwrap();
    let (mut s1, mut s2) = (store.clone(), ck.store);
    let (mut a1, mut a2) = (adam, resumed);
    for (s, a) in [(&mut s1, &mut a1), (&mut s2, &mut a2)] {
        for id in s.ids().collect::<Vec<_>>() {
            let dims = s.value(id).dims().to_vec();
            s.accumulate_grad(id, Tensor::full(dims, 0.5)).unwrap();
        }
        a.step(s).unwrap();
    }
    assert_same_store(&s1, &s2);
    // The weights part is what model::weights reads.
    assert_same_store(&store, &checkpoint::load_weights(&path, &arch).unwrap());
}

/// The temporary file `tensor::io::write_atomic` writes before its rename.
fn temp_of(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

#[test]
fn an_interrupted_write_never_loads_wrongly() {
    let (dir, arch) = (scratch_dir("interrupted"), arch(4));
    let (old, old_adam) = trained(&arch, 1);
    let path = epoch_path(&dir, "m", 1);
    checkpoint::save(&path, &arch, &old, &old_adam.export_state().unwrap(), &state(1)).unwrap();

    // The bytes of the next checkpoint, as a complete write would leave them.
    let (new, new_adam) = trained(&arch, 2);
    let scratch = dir.join("scratch.safetensors");
    checkpoint::save(&scratch, &arch, &new, &new_adam.export_state().unwrap(), &state(2)).unwrap();
    let bytes = std::fs::read(&scratch).unwrap();
    std::fs::remove_file(&scratch).unwrap();

    // Killed after writing (part of) the temporary file, before the rename: the previous
    // checkpoint still loads, unchanged, and the temporary file is not listed as a checkpoint.
    for cut in [0, 7, bytes.len() / 2, bytes.len()] {
        std::fs::write(temp_of(&path), &bytes[..cut]).unwrap();
        let ck = checkpoint::load(&path, &arch).unwrap();
        assert_same_store(&old, &ck.store);
        assert_eq!(ck.state.epochs_done, 1);
        let listed = folder::epoch_checkpoints(&dir, "m", 1).unwrap();
        assert_eq!(listed, vec![(1, path.clone())]);
    }
    // A later save over the leftover temporary file completes normally.
    checkpoint::save(&path, &arch, &new, &new_adam.export_state().unwrap(), &state(2)).unwrap();
    assert_same_store(&new, &checkpoint::load(&path, &arch).unwrap().store);
    assert!(!temp_of(&path).exists());

    // A truncated file under a checkpoint's name (a copy cut short) is an error, never values.
    let cut_path = epoch_path(&dir, "m", 3);
    for cut in [0, 8, 100, bytes.len() / 3, bytes.len() - 1] {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let e = format!(
            "{:#}",
            checkpoint::load(&cut_path, &arch).err().expect("a truncated file must not load")
        );
        assert!(e.contains(&cut_path.display().to_string()), "{e}");
    }

    // When the rename itself fails (the name is taken by a directory), save reports it and the
    // directory is left alone.
    let blocked = epoch_path(&dir, "m", 4);
    std::fs::create_dir_all(blocked.join("x")).unwrap();
    let e = format!(
        "{:#}",
        checkpoint::save(&blocked, &arch, &new, &new_adam.export_state().unwrap(), &state(4)).unwrap_err()
    );
    assert!(e.contains(&blocked.display().to_string()), "{e}");
    assert!(blocked.join("x").is_dir());
}

#[test]
fn checkpoints_that_do_not_fit_are_clear_errors() {
    let (dir, small, wide) = (scratch_dir("mismatch"), arch(4), arch(8));
    let (store, adam) = trained(&small, 1);
    let path = dir.join("m_1.safetensors");
    checkpoint::save(&path, &small, &store, &adam.export_state().unwrap(), &state(1)).unwrap();
    let e = format!("{:#}", checkpoint::load(&path, &wide).err().unwrap());
    assert!(e.contains(&path.display().to_string()) && e.contains("do not fit"), "{e}");
    assert!(e.contains("encoder.stem.convs.0.conv.weight") || e.contains("features_per_stage"), "{e}");
    // A weights-only file has nothing to resume from.
    let w = dir.join("w.safetensors");
    weights::save(&w, &small, &store).unwrap();
    let e = format!("{:#}", checkpoint::load(&w, &small).err().unwrap());
    assert!(e.contains("weights only") && e.contains("load_weights_only"), "{e}");
    assert_same_store(&store, &checkpoint::load_weights(&w, &small).unwrap());
    // Not a safetensors file at all.
    std::fs::write(&w, b"not a checkpoint").unwrap();
    let e = format!("{:#}", checkpoint::load(&w, &small).err().unwrap());
    assert!(e.contains(&w.display().to_string()), "{e}");
}

#[test]
fn names_round_trip_and_no_model_reads_anothers() {
    for run in [1, 2, 17] {
        for kind in [Kind::Epoch(1), Kind::Epoch(120), Kind::Best, Kind::Final] {
            let n = CheckpointName { run, kind };
            assert_eq!(CheckpointName::parse("m-1", &n.file_name("m-1")), Some(n));
        }
    }
    assert_eq!(CheckpointName { run: 1, kind: Kind::Epoch(3) }.file_name("m"), "m_3.safetensors");
    assert_eq!(CheckpointName { run: 2, kind: Kind::Best }.file_name("m"), "m.run2_best.safetensors");
    // Another model's files, temporary files and look-alikes are not this model's.
    for other in [
        "m_x_3.safetensors",
        "m_best_3.safetensors",
        "m_3.safetensors.bak",
        ".m_3.safetensors.tmp12",
        "m.run1_3.safetensors",
        "m.run_3.safetensors",
        "m.run+2_3.safetensors",
        "m_+3.safetensors",
        "mm_3.safetensors",
        "m.lock",
    ] {
        assert_eq!(CheckpointName::parse("m", other), None, "{other}");
    }
}

fn save_epoch(path: &Path, arch: &Architecture, store: &ParamStore, adam: &Adam, e: usize) {
    checkpoint::save(path, arch, store, &adam.export_state().unwrap(), &state(e)).unwrap();
}

#[test]
fn pruning_removes_only_the_runs_own_older_checkpoints() {
    let (dir, arch) = (scratch_dir("prune"), arch(4));
    let (store, adam) = trained(&arch, 0);
    for e in [1, 2, 3, 10, 11] {
        save_epoch(&epoch_path(&dir, "m", e), &arch, &store, &adam, e);
    }
    weights::save(&named(&dir, "m", 1, Kind::Best), &arch, &store).unwrap();
    save_epoch(&epoch_path(&dir, "other", 1), &arch, &store, &adam, 1);
    save_epoch(&named(&dir, "m", 2, Kind::Epoch(1)), &arch, &store, &adam, 1);
    {
        let source = epoch_path(&dir, "m", 2);
        let f = RunFolder::open(&dir, "m", &Start::Resume { source, epochs_done: 11 }).unwrap();
        assert_eq!(f.run(), 1, "nothing of run 1 lies beyond epoch 11: the run continues");
        f.prune(2, 1).unwrap();
    }
    let left: Vec<usize> =
        folder::epoch_checkpoints(&dir, "m", 1).unwrap().into_iter().map(|(e, _)| e).collect();
    assert_eq!(left, vec![2, 10, 11], "the newest by epoch number, and the resume source");
    // Of the kept ones only the newest resumes; the resume source is left as it was.
    let resumes = |e| checkpoint::load(&epoch_path(&dir, "m", e), &arch).is_ok();
    assert_eq!((resumes(2), resumes(10), resumes(11)), (true, false, true));
    assert!(checkpoint::load_weights(&epoch_path(&dir, "m", 10), &arch).is_ok());
    assert!(named(&dir, "m", 1, Kind::Best).exists(), "best is not an epoch checkpoint");
    assert!(epoch_path(&dir, "other", 1).exists(), "another model's");
    assert!(named(&dir, "m", 2, Kind::Epoch(1)).exists(), "another run's");
}

#[test]
fn a_resume_behind_later_checkpoints_writes_beside_them() {
    let (dir, arch) = (scratch_dir("beside"), arch(4));
    let (store, adam) = trained(&arch, 0);
    for e in [1, 2, 3] {
        save_epoch(&epoch_path(&dir, "m", e), &arch, &store, &adam, e);
    }
    let resume = |source: PathBuf, epochs_done| {
        RunFolder::open(&dir, "m", &Start::Resume { source, epochs_done }).unwrap().run()
    };
    assert_eq!(resume(epoch_path(&dir, "m", 2), 2), 2, "epoch 3 of run 1 lies ahead");
    assert_eq!(resume(epoch_path(&dir, "m", 3), 3), 1, "the newest continues its run");
    save_epoch(&named(&dir, "m", 2, Kind::Epoch(3)), &arch, &store, &adam, 3);
    assert_eq!(resume(epoch_path(&dir, "m", 2), 2), 3, "the next free number");
    assert_eq!(resume(named(&dir, "m", 2, Kind::Epoch(3)), 3), 2);
    weights::save(&named(&dir, "m", 1, Kind::Final), &arch, &store).unwrap();
    assert_eq!(resume(epoch_path(&dir, "m", 3), 3), 3, "run 1 is finished");
    // A checkpoint from elsewhere starts a run with no files yet.
    let elsewhere = scratch_dir("beside-elsewhere").join("x_7.safetensors");
    save_epoch(&elsewhere, &arch, &store, &adam, 7);
    assert_eq!(resume(elsewhere.clone(), 7), 3);
    assert_eq!(
        RunFolder::open(
            &scratch_dir("beside-empty"),
            "m",
            &Start::Resume { source: elsewhere, epochs_done: 7 }
        )
        .unwrap()
        .run(),
        1
    );
    // A fresh run is refused and names the newest checkpoint (highest epoch, then run) to resume.
    let e = format!("{:#}", RunFolder::open(&dir, "m", &Start::Fresh).err().unwrap());
    assert!(
        e.contains("earlier run") && e.contains("m.run2_3.safetensors") && e.contains("--overwrite"),
        "{e}"
    );
    // Replacing removes every run's checkpoints of the model and nothing else.
    save_epoch(&epoch_path(&dir, "other", 1), &arch, &store, &adam, 1);
    assert_eq!(RunFolder::open(&dir, "m", &Start::Replace).unwrap().run(), 1);
    assert!(folder::listing(&dir, "m").unwrap().is_empty());
    assert!(epoch_path(&dir, "other", 1).exists());
}

#[test]
fn one_run_holds_a_folder_and_a_dead_runs_lock_is_taken_over() {
    let dir = scratch_dir("lock");
    let first = RunFolder::open(&dir, "m", &Start::Fresh).unwrap();
    let e = format!("{:#}", RunFolder::open(&dir, "m", &Start::Fresh).err().unwrap());
    let me = format!("pid {}", std::process::id());
    assert!(e.contains("m.lock") && e.contains("being trained by") && e.contains(&me), "{e}");
    // Other models in the folder are not held.
    RunFolder::open(&dir, "n", &Start::Fresh).unwrap();
    drop(first);
    assert_eq!(std::fs::read_to_string(dir.join("m.lock")).unwrap(), "", "a released lock is empty");
    drop(RunFolder::open(&dir, "m", &Start::Fresh).unwrap());
    // A holder that died leaves its record but no OS lock: the next run takes over.
    std::fs::write(dir.join("m.lock"), r#"{"pid": 4000000, "host": "gone", "started": 0}"#).unwrap();
    let f = RunFolder::open(&dir, "m", &Start::Fresh).unwrap();
    let holder: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("m.lock")).unwrap()).unwrap();
    assert_eq!(holder["pid"], std::process::id());
    drop(f);
}

#[test]
fn temporary_files_of_interrupted_writes_go_when_a_run_starts() {
    let dir = scratch_dir("temporaries");
    let mine = [".m_3.safetensors.tmp77", ".m.run2_best.safetensors.tmp8", ".m_final.safetensors.tmp1"];
    let others =
        [".n_3.safetensors.tmp77", ".m_x_3.safetensors.tmp77", ".m_3.safetensors.tmpx", "m_notes.txt"];
    for n in mine.iter().chain(&others) {
        std::fs::write(dir.join(n), b"partial").unwrap();
    }
    drop(RunFolder::open(&dir, "m", &Start::Fresh).unwrap());
    for n in mine {
        assert!(!dir.join(n).exists(), "{n}");
    }
    for n in others {
        assert!(dir.join(n).exists(), "{n}");
    }
}

#[test]
fn weights_with_nan_are_refused_naming_the_tensor() {
    let (dir, arch) = (scratch_dir("nan-weights"), arch(4));
    let (mut store, _) = trained(&arch, 0);
    let id = store.ids().nth(3).unwrap();
    let name = store.name(id).to_string();
    let mut v = store.value(id).data().to_vec();
    v[0] = f32::NAN;
    store.set_value(id, Tensor::from_vec(store.value(id).dims().to_vec(), v).unwrap()).unwrap();
    let path = dir.join("w.safetensors");
    weights::save(&path, &arch, &store).unwrap();
    let e = format!("{:#}", checkpoint::load_weights(&path, &arch).err().unwrap());
    assert!(e.contains("w.safetensors") && e.contains(&name) && e.contains("NaN"), "{e}");
}

/// A training state written before the schedule and optimizer were typed reads back: the
/// optimizer's JSON had the same layout, the schedule sentence is dropped.
#[test]
fn training_state_of_an_older_unet3d_reads_back() {
    let mut json = serde_json::to_value(state(2)).unwrap();
    json["schedule"] = "Cosine { max_epochs: 3 } from lr 0.001".into();
    json["optimizer"] = serde_json::json!({
        "optimizer": "AdamW", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
        "step": {"enc.conv.weight": 4}
    });
    json.as_object_mut().unwrap().remove("config_dir");
    let old: TrainingState = serde_json::from_value(json).unwrap();
    assert_eq!(old.schedule, None);
    assert_eq!(old.config_dir, None);
    let Some(OptimizerMeta::AdamW(AdamMeta { lr, step, .. })) = old.optimizer else {
        panic!("{:?}", old.optimizer)
    };
    assert_eq!((lr, step["enc.conv.weight"]), (0.001, 4));
}
