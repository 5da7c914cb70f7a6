//! Training checkpoints: one safetensors file holding the weights (dynamic_network_architectures
//! names in PyTorch's layouts, as `model::weights` writes them), the optimizer's state tensors
//! under `optimizer.<slot>.<parameter>`, and the rest of the training state as JSON in the
//! metadata. It is written to a temporary file and renamed, so a killed run leaves either the
//! previous file or the new one, never a mix; a truncated or foreign file fails to load with an
//! error instead of loading wrongly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::arch::Architecture;
use crate::autograd::ParamStore;
use crate::data::normalize::CtStats;
use crate::model::weights;
use crate::optim::{LrSchedule, OptimizerMeta, OptimizerState};
use crate::tensor::{Tensor, io};

/// The metadata key of the training state.
const STATE_KEY: &str = "unet3d.training_state";
/// The metadata key of the dataset's CT normalisation statistics, in checkpoints and the final
/// model alike: inference must normalise with the training set's numbers.
const CT_STATS_KEY: &str = "unet3d.ct_stats";
const OPTIMIZER_PREFIX: &str = "optimizer.";
/// The metadata key of the [`ModelRecord`], in every checkpoint and final model.
const MODEL_KEY: &str = "unet3d.model";
/// Bumped when [`ModelRecord`] changes.
pub const MODEL_FORMAT_VERSION: u32 = 1;

/// What inference needs besides the weights, so a model file predicts without its training
/// YAML: the config it was trained with (targets, activations, normalisation, patch, spacing and
/// the rest, as written) and the network that config built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub format_version: u32,
    /// The training YAML and its `--set` overrides, in order.
    pub config_yaml: String,
    pub config_sets: Vec<String>,
    /// Where the config's relative paths resolve (its file's folder); None: the working folder
    /// (a config given as text, or a file written before this was recorded).
    #[serde(default)]
    pub config_dir: Option<PathBuf>,
    /// The trained network, checked against the one the config builds when the file is used.
    pub architecture: Architecture,
}

impl ModelRecord {
    pub fn new(arch: &Architecture, state: &TrainingState) -> ModelRecord {
        ModelRecord {
            format_version: MODEL_FORMAT_VERSION,
            config_yaml: state.config_yaml.clone(),
            config_sets: state.config_sets.clone(),
            config_dir: state.config_dir.clone(),
            architecture: arch.clone(),
        }
    }
}
/// Bumped when the layout changes, so an old file is refused with a reason.
pub const FORMAT_VERSION: u32 = 1;

/// Everything besides weights and optimizer tensors that resuming needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub format_version: u32,
    pub model_name: String,
    /// Epochs finished; a resumed run starts at this epoch (counted from 0).
    pub epochs_done: usize,
    /// Training batches consumed so far: the index of the next batch. The loader draws batch `i`
    /// from (seed, i), so this is the whole of its position.
    pub global_step: u64,
    pub optimizer_steps: u64,
    pub seed: u64,
    /// nnU-Net's EMA of the validation mean Dice, and the best value it reached (with its epoch).
    pub ema_dice: Option<f64>,
    pub best_ema_dice: Option<f64>,
    pub best_epoch: Option<usize>,
    /// The best mean whole-volume Dice of the periodic whole-volume validations (what picks the
    /// best checkpoint under `tr_config.best_by: whole_volume_dice`).
    #[serde(default)]
    pub best_whole_volume_dice: Option<f64>,
    /// The optimizer's kind, hyperparameters and step counts ([`OptimizerState::meta`]); None
    /// before the first checkpoint.
    pub optimizer: Option<OptimizerMeta>,
    /// The schedule and the initial rate it scales, for the record (the config decides them);
    /// None in files written before it was typed (they recorded a sentence, which is dropped).
    #[serde(deserialize_with = "schedule_or_legacy")]
    pub schedule: Option<ScheduleRecord>,
    /// The YAML the run was started with and its `--set` overrides, in order.
    pub config_yaml: String,
    pub config_sets: Vec<String>,
    /// The config file's folder, where its relative paths resolve (None: the working folder).
    #[serde(default)]
    pub config_dir: Option<PathBuf>,
    /// The dataset's CT normalisation statistics, when a channel uses `ct`.
    pub ct_stats: Option<CtStats>,
}

/// The learning-rate schedule a run trained with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    pub schedule: LrSchedule,
    pub initial_lr: f64,
}

/// A typed schedule, or None for the free-text one of older files.
fn schedule_or_legacy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ScheduleRecord>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Recorded {
        Typed(ScheduleRecord),
        Legacy(serde::de::IgnoredAny),
    }
    Ok(match Option::<Recorded>::deserialize(d)? {
        Some(Recorded::Typed(s)) => Some(s),
        Some(Recorded::Legacy(_)) | None => None,
    })
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub store: ParamStore,
    pub optimizer: OptimizerState,
    pub state: TrainingState,
}

/// Writes a checkpoint to `path` atomically.
pub fn save(
    path: &Path,
    arch: &Architecture,
    store: &ParamStore,
    optimizer: &OptimizerState,
    state: &TrainingState,
) -> Result<()> {
    let mut tensors = weights::to_state_dict(arch, store)?;
    tensors.extend(optimizer.tensors.iter().map(|(n, t)| (format!("{OPTIMIZER_PREFIX}{n}"), t.clone())));
    let state = TrainingState { optimizer: Some(optimizer.meta.clone()), ..state.clone() };
    let record = ModelRecord::new(arch, &state);
    let mut meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(&state)?)]);
    write(path, &tensors, &mut meta, &record, state.ct_stats.as_ref())
}

/// The final model: weights only, as `model::weights::save` writes them (PyTorch loads them), plus
/// its [`ModelRecord`] and the CT statistics when the training used them.
pub fn save_weights(
    path: &Path,
    store: &ParamStore,
    record: &ModelRecord,
    ct: Option<&CtStats>,
) -> Result<()> {
    let tensors = weights::to_state_dict(&record.architecture, store)?;
    write(path, &tensors, &mut HashMap::new(), record, ct)
}

fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &mut HashMap<String, String>,
    record: &ModelRecord,
    ct: Option<&CtStats>,
) -> Result<()> {
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(MODEL_KEY.to_string(), serde_json::to_string(record)?);
    if let Some(ct) = ct {
        meta.insert(CT_STATS_KEY.to_string(), serde_json::to_string(ct)?);
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    io::save(path, &refs, Some(meta.clone()))
        .with_context(|| format!("writing checkpoint {}", path.display()))
}

/// Rewrites the training checkpoint at `path` as weights only (atomically), keeping its model
/// record and CT statistics, so it still predicts and fine-tunes but no longer resumes; false
/// when it already holds no training state.
pub fn strip_to_weights(path: &Path) -> Result<bool> {
    // The header says whether there is anything to do; the tensors are read only if there is.
    if !io::metadata(path)?.contains_key(STATE_KEY) {
        return Ok(false);
    }
    let file = io::load(path).with_context(|| format!("checkpoint {}", path.display()))?;
    let mut meta = file.metadata;
    meta.remove(STATE_KEY);
    let (weights, _) = split(file.tensors);
    let refs: Vec<(&str, &Tensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    io::save(path, &refs, Some(meta)).with_context(|| format!("rewriting checkpoint {}", path.display()))?;
    Ok(true)
}

/// A checkpoint or final model read once, for everything inference takes from it.
pub struct ModelFile {
    path: PathBuf,
    file: io::TensorFile,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<ModelFile> {
        let file = io::load(path).with_context(|| format!("checkpoint {}", path.display()))?;
        Ok(ModelFile { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// CRC-32C of the whole file.
    pub fn crc32c(&self) -> u32 {
        self.file.crc32c
    }

    /// The metadata JSON under `key`, if present.
    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.file
            .metadata
            .get(key)
            .map(|j| serde_json::from_str(j))
            .transpose()
            .with_context(|| format!("checkpoint {}: unreadable {key}", self.path.display()))
    }

    /// The CT normalisation statistics the model was trained with; None when the training
    /// normalised no channel with `ct` (or the file comes from elsewhere).
    pub fn ct_stats(&self) -> Result<Option<CtStats>> {
        self.meta(CT_STATS_KEY)
    }

    /// The model record; None for files written before unet3d stored one, or from elsewhere (a
    /// PyTorch export).
    pub fn record(&self) -> Result<Option<ModelRecord>> {
        let Some(record) = self.meta::<ModelRecord>(MODEL_KEY)? else { return Ok(None) };
        if record.format_version != MODEL_FORMAT_VERSION {
            bail!(
                "checkpoint {}: model record version {}, this unet3d reads version {MODEL_FORMAT_VERSION}",
                self.path.display(),
                record.format_version
            );
        }
        Ok(Some(record))
    }

    /// The weights (of a training checkpoint or a weights-only file) for `arch`.
    pub fn weights(self, arch: &Architecture) -> Result<ParamStore> {
        let (w, _) = split(self.file.tensors);
        weights::from_state_dict(arch, &w).with_context(|| format!("checkpoint {}", self.path.display()))
    }
}

/// The CT normalisation statistics a checkpoint or final model was trained with.
pub fn ct_stats(path: &Path) -> Result<Option<CtStats>> {
    ModelFile::open(path)?.ct_stats()
}

/// The model record of a checkpoint or final model.
pub fn model_record(path: &Path) -> Result<Option<ModelRecord>> {
    ModelFile::open(path)?.record()
}

/// Splits a file's tensors into weights and optimizer state.
fn split(tensors: BTreeMap<String, Tensor>) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let (mut weights, mut optimizer) = (BTreeMap::new(), BTreeMap::new());
    for (name, t) in tensors {
        match name.strip_prefix(OPTIMIZER_PREFIX) {
            Some(rest) => optimizer.insert(rest.to_string(), t),
            None => weights.insert(name, t),
        };
    }
    (weights, optimizer)
}

/// Reads a training checkpoint for `arch`. A file that does not fit `arch` (missing, unexpected
/// or misshapen tensors), a weights-only file and a truncated file are errors naming `path`.
pub fn load(path: &Path, arch: &Architecture) -> Result<Checkpoint> {
    let ctx = || format!("checkpoint {}", path.display());
    let file = io::load(path).with_context(ctx)?;
    let Some(json) = file.metadata.get(STATE_KEY) else {
        bail!(
            "checkpoint {}: holds weights only (no training state to resume); set \
             tr_setup.load_weights_only: true to fine-tune from it",
            path.display()
        );
    };
    let state: TrainingState = serde_json::from_str(json)
        .with_context(|| format!("checkpoint {}: unreadable training state", path.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "checkpoint {}: format version {}, this unet3d reads version {FORMAT_VERSION}",
            path.display(),
            state.format_version
        );
    }
    let (w, o) = split(file.tensors);
    let store = weights::from_state_dict(arch, &w).with_context(ctx)?;
    let meta = state
        .optimizer
        .clone()
        .with_context(|| format!("checkpoint {}: its training state records no optimizer", path.display()))?;
    let optimizer = OptimizerState { tensors: o, meta };
    Ok(Checkpoint { store, optimizer, state })
}

/// The weights of a training checkpoint or of a weights-only file (the final model, a PyTorch
/// export), for fine-tuning and inference.
pub fn load_weights(path: &Path, arch: &Architecture) -> Result<ParamStore> {
    ModelFile::open(path)?.weights(arch)
}
