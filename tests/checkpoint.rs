//! Checkpoint files: a round trip keeps every value, an interrupted write never leaves a file that
//! loads wrongly, and files that do not fit are clear errors.

mod common;

use common::scratch_dir;
use std::path::{Path, PathBuf};

use unet3d::arch::Architecture;
use unet3d::autograd::ParamStore;
use unet3d::config::Config;
use unet3d::model::{init, weights};
use unet3d::optim::{Adam, AdamHyper, Optimizer};
use unet3d::tensor::Tensor;
use unet3d::train::checkpoint::{self, FORMAT_VERSION, TrainingState};

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
        optimizer: serde_json::Value::Null,
        schedule: "Cosine".into(),
        config_yaml: "tr_setup: {}".into(),
        config_sets: vec!["tr_config.batch_size=2".into()],
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
    assert_eq!(ck.state, TrainingState { optimizer: adam.export_state().unwrap().meta, ..state(1) });
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
    let path = checkpoint::epoch_path(&dir, "m", 1);
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
        let listed = checkpoint::epoch_checkpoints(&dir, "m").unwrap();
        assert_eq!(listed, vec![(1, path.clone())]);
    }
    // A later save over the leftover temporary file completes normally.
    checkpoint::save(&path, &arch, &new, &new_adam.export_state().unwrap(), &state(2)).unwrap();
    assert_same_store(&new, &checkpoint::load(&path, &arch).unwrap().store);
    assert!(!temp_of(&path).exists());

    // A truncated file under a checkpoint's name (a copy cut short) is an error, never values.
    let cut_path = checkpoint::epoch_path(&dir, "m", 3);
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
    let blocked = checkpoint::epoch_path(&dir, "m", 4);
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
fn prune_keeps_the_newest() {
    let (dir, arch) = (scratch_dir("prune"), arch(4));
    let (store, adam) = trained(&arch, 0);
    for e in [1, 2, 3, 10, 11] {
        checkpoint::save(
            &checkpoint::epoch_path(&dir, "m", e),
            &arch,
            &store,
            &adam.export_state().unwrap(),
            &state(e),
        )
        .unwrap();
    }
    weights::save(&checkpoint::best_path(&dir, "m"), &arch, &store).unwrap();
    checkpoint::save(
        &checkpoint::epoch_path(&dir, "other", 1),
        &arch,
        &store,
        &adam.export_state().unwrap(),
        &state(1),
    )
    .unwrap();
    checkpoint::prune(&dir, "m", 2).unwrap();
    let left: Vec<usize> =
        checkpoint::epoch_checkpoints(&dir, "m").unwrap().into_iter().map(|(e, _)| e).collect();
    assert_eq!(left, vec![10, 11], "by epoch number, not name order");
    assert!(checkpoint::best_path(&dir, "m").exists() && checkpoint::epoch_path(&dir, "other", 1).exists());
}
