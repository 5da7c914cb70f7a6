//! `tr_setup` and `tr_config`: the run, the optimizer and its schedule, and augmentation.

use std::path::PathBuf;

use anyhow::Result;

use super::reader::{
    Section, boolean, choice, count_from, integer_from, list_of, non_negative, number, number_in, plain_name,
    positive, probability, range_in, size3, string,
};
use super::tree::Node;
use crate::device::Device;
use crate::optim::{AdamHyper, LrSchedule, SgdHyper};

/// `tr_setup`: names, paths and the run's resources.
#[derive(Debug, Clone, PartialEq)]
pub struct TrSetup {
    pub model_name: String,
    /// The memory budget a training run must fit, in bytes.
    pub vram_max: u64,
    /// Fraction of the valid patches used for training; the rest validate.
    pub tr_val_split: f64,
    pub dilate_label: bool,
    pub ckpt_out_base: PathBuf,
    /// A checkpoint to resume (or fine-tune, with `load_weights_only`) from.
    pub checkpoint_path: Option<PathBuf>,
    pub load_weights_only: bool,
    pub tensorboard_log_dir: PathBuf,
    pub device: Device,
    /// Seeds every random choice of the run, so the same seed gives the same run on the CPU.
    pub seed: u64,
    /// How many of the newest epoch checkpoints are kept.
    pub checkpoints_kept: usize,
    /// How many of the newest epoch checkpoints keep the optimizer state and training state
    /// (what an exact resume needs); older ones are rewritten as weights only, a third or less
    /// of their size.
    pub resumable_checkpoints: usize,
    /// Steps between per-step TensorBoard scalars and, where no progress bar is drawn (stderr
    /// not a terminal, as in a batch job's log), progress lines.
    pub log_every_steps: usize,
    /// Which volumes train and which validate.
    pub fold: Fold,
}

/// The folds of nnU-Net's cross-validation.
pub const FOLDS: usize = 5;

/// Which volumes a run trains and validates on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// A seeded `tr_val_split` of the volumes (the seed's behaviour).
    Split,
    /// Fold k (0-based) of the seeded 5-fold split by case, kept in `splits.json`.
    Index(usize),
    /// Every volume trains and validates (nnU-Net's fold "all").
    All,
}

impl TrSetup {
    /// `ckpt_out_base`, or its `fold_<k>` / `fold_all` folder: every output names its fold.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.fold_folder(&self.ckpt_out_base)
    }

    /// `tensorboard_log_dir`, or its fold folder.
    pub fn log_dir(&self) -> PathBuf {
        self.fold_folder(&self.tensorboard_log_dir)
    }

    /// The 5-fold split by case, written once beside the folds' folders and reused by each.
    pub fn splits_file(&self) -> PathBuf {
        self.ckpt_out_base.join("splits.json")
    }

    fn fold_folder(&self, base: &std::path::Path) -> PathBuf {
        match self.fold {
            Fold::Split => base.to_path_buf(),
            Fold::Index(k) => base.join(format!("fold_{k}")),
            Fold::All => base.join("fold_all"),
        }
    }
}

/// The optimizer with its hyperparameters; `lr` is `tr_config.initial_lr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerConfig {
    Adam(AdamHyper),
    Sgd(SgdHyper),
}

impl OptimizerConfig {
    pub fn initial_lr(&self) -> f64 {
        match self {
            OptimizerConfig::Adam(h) => h.lr,
            OptimizerConfig::Sgd(h) => h.lr,
        }
    }

    /// Per-parameter state tensors, for the memory estimate.
    pub fn moments(&self) -> usize {
        match self {
            OptimizerConfig::Adam(_) => 2,
            OptimizerConfig::Sgd(h) => usize::from(h.momentum > 0.0),
        }
    }
}

/// nnU-Net's training-time augmentation (reference-spec 4.5): each transform runs on a sample
/// with its probability `p_*`; the ranges are the distributions its parameters are drawn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Augmentation {
    pub enabled: bool,
    pub p_rotation: f64,
    /// Angles about each axis are uniform in +-this many degrees.
    pub rotation_max_degrees: f64,
    pub p_scaling: f64,
    /// One zoom factor for all axes (> 1 zooms out).
    pub scaling_range: (f64, f64),
    pub p_noise: f64,
    /// The noise standard deviation is uniform in [0, this].
    pub noise_max_std: f64,
    pub p_blur: f64,
    /// Gaussian blur sigma per axis, in voxels.
    pub blur_sigma_range: (f64, f64),
    pub p_brightness: f64,
    pub brightness_range: (f64, f64),
    pub p_contrast: f64,
    pub contrast_range: (f64, f64),
    pub p_low_resolution: f64,
    /// Downsampling factor before upsampling back.
    pub low_resolution_range: (f64, f64),
    pub p_gamma: f64,
    /// Gamma on the inverted image (x -> -x), applied before the plain gamma.
    pub p_gamma_inverted: f64,
    pub gamma_range: (f64, f64),
    /// Axes (0 = z, 1 = y, 2 = x) each flipped with probability 0.5.
    pub mirror_axes: Vec<usize>,
}

impl Default for Augmentation {
    fn default() -> Self {
        Augmentation {
            enabled: true,
            p_rotation: 0.2,
            rotation_max_degrees: 30.0,
            p_scaling: 0.2,
            scaling_range: (0.7, 1.4),
            p_noise: 0.1,
            noise_max_std: 0.1,
            p_blur: 0.2,
            blur_sigma_range: (0.5, 1.0),
            p_brightness: 0.15,
            brightness_range: (0.75, 1.25),
            p_contrast: 0.15,
            contrast_range: (0.75, 1.25),
            p_low_resolution: 0.25,
            low_resolution_range: (0.5, 1.0),
            p_gamma: 0.3,
            p_gamma_inverted: 0.1,
            gamma_range: (0.7, 1.5),
            mirror_axes: vec![0, 1, 2],
        }
    }
}

/// `tr_config`: optimisation and the epoch loop.
#[derive(Debug, Clone, PartialEq)]
pub struct TrConfig {
    pub optimizer: OptimizerConfig,
    pub scheduler: LrSchedule,
    /// clip_grad_norm_ max norm on the unscaled gradients; None disables clipping.
    pub grad_clip_max_norm: Option<f64>,
    /// The share of an epoch's optimizer steps that a non-finite loss or gradient norm may skip
    /// before the run stops, naming the batches.
    pub max_skipped_fraction: f64,
    /// (z, y, x).
    pub patch_size: [usize; 3],
    pub batch_size: usize,
    /// What `auto` asks to plan from the data (`unet3d plan --from-data`, docs/planning.md):
    /// `unet3d train` plans them and reads the config again with the plan as `--set`s, which its
    /// checkpoints record. Until then `patch_size` and `batch_size` hold their defaults.
    pub planned: Planned,
    pub gradient_accumulation: usize,
    pub max_steps_per_epoch: usize,
    pub max_val_steps_per_epoch: usize,
    /// After the last epoch, predict the validation volumes whole with the final model (the
    /// `unet3d infer` path) and score them as `unet3d evaluate` does.
    pub final_validation: bool,
    /// Also predict and score the validation volumes whole every this many epochs (0: never),
    /// from that epoch's checkpoint, into `validation/epoch_NNNN/`, logged as `whole/*` scalars.
    pub whole_volume_every: usize,
    /// What picks the `_best` checkpoint.
    pub best_by: BestBy,
    pub num_dataloader_workers: usize,
    pub max_epoch: usize,
    pub augmentation: Augmentation,
}

/// The `tr_config` sizes given as `auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Planned {
    /// `patch_size: auto`: the patch and `model_config.spacing` from the plan.
    pub patch: bool,
    /// `batch_size: auto`: the batch from the plan.
    pub batch: bool,
}

impl Planned {
    pub fn any(&self) -> bool {
        self.patch || self.batch
    }
}

/// `value`, or None for the string `auto`.
fn or_auto<T>(check: impl Fn(&Node) -> Result<T, String>) -> impl Fn(&Node) -> Result<Option<T>, String> {
    move |n| match n {
        Node::Str(a) if a == "auto" => Ok(None),
        n => check(n).map(Some).map_err(|e| format!("{e}, or \"auto\" (planned from the data)")),
    }
}

/// What picks the `_best` checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BestBy {
    /// nnU-Net's EMA of the per-epoch mean pseudo-Dice on validation patches.
    EmaPseudoDice,
    /// The mean whole-volume Dice of the `whole_volume_every` validations.
    WholeVolumeDice,
}

const BEST_BY: &[(&str, BestBy)] =
    &[("ema_pseudo_dice", BestBy::EmaPseudoDice), ("whole_volume_dice", BestBy::WholeVolumeDice)];

/// tr_config keys of seed YAMLs that nothing reads.
const TR_CONFIG_IGNORED: &[(&str, &str)] = &[
    ("ignore_label", "the seed ignores it too: not implemented there"),
    ("loss_only_on_label", "the seed ignores it too: not implemented there"),
];

/// Reads `tr_setup`; also returns `autoconfigure`, which belongs to the model.
pub(crate) fn read_tr_setup(mut s: Section<'_>) -> Result<(TrSetup, bool)> {
    let path = |n: &Node| string(n).map(PathBuf::from).map_err(|_| "a path (string)".to_string());
    let device = |n: &Node| {
        let allowed = || "\"cpu\", \"cuda\", \"cuda:N\" or \"sim\"".to_string();
        string(n).map_err(|_| allowed())?.parse::<Device>().map_err(|_| allowed())
    };
    let vram_max = s.get("vram_max", 16_000_000_000, &vram_bytes)?;
    if let Some(n @ (Node::Int(_) | Node::Float(_))) = s.node("vram_max")
        && number(n).is_ok_and(|mb| mb < 1000.0)
    {
        s.ctx().warn(format!(
            "{} = {n} is read as MB (the seed's examples write MB, e.g. 22000); write \"{n}GB\" for gigabytes",
            s.key_path("vram_max")
        ));
    }
    let setup = TrSetup {
        model_name: s.get("model_name", "Model".to_string(), &plain_name)?,
        vram_max,
        tr_val_split: s.get("tr_val_split", 0.95, &|n| match number(n) {
            Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
            _ => Err("a fraction in (0, 1]".into()),
        })?,
        dilate_label: s.get("dilate_label", false, &boolean)?,
        ckpt_out_base: s.get("ckpt_out_base", PathBuf::from("./checkpoints/"), &path)?,
        checkpoint_path: s.optional("checkpoint_path", &path)?,
        load_weights_only: s.get("load_weights_only", false, &boolean)?,
        tensorboard_log_dir: s.get("tensorboard_log_dir", PathBuf::from("./tensorboard_logs/"), &path)?,
        device: s.get("device", Device::Cpu, &device)?,
        seed: s.get("seed", 0, &integer_from(0))?,
        checkpoints_kept: s.get("checkpoints_kept", 10, &count_from(1))?,
        resumable_checkpoints: s.get("resumable_checkpoints", 1, &count_from(1))?,
        log_every_steps: s.get("log_every_steps", 10, &count_from(1))?,
        fold: s.get("fold", Fold::Split, &|n| match n {
            Node::Str(a) if a == "all" => Ok(Fold::All),
            Node::Int(k) if (0..FOLDS as i128).contains(k) => Ok(Fold::Index(*k as usize)),
            _ => Err(format!("a fold 0..{} or \"all\" (null: tr_val_split)", FOLDS - 1)),
        })?,
    };
    let autoconfigure = s.get("autoconfigure", true, &boolean)?;
    s.finish(&[]);
    Ok((setup, autoconfigure))
}

/// Memory: a bare number is megabytes (10^6 bytes), as the seed's examples write it (22000); a
/// string carries its unit: B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2).
pub(crate) fn vram_bytes(n: &Node) -> Result<u64, String> {
    let allowed = || {
        "a memory size > 0: a number of MB (e.g. 22000) or a string with a unit \
         (e.g. \"24GB\", \"24GiB\", \"22000MB\"; units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            .to_string()
    };
    let (value, unit) = match n {
        Node::Int(_) | Node::Float(_) => (number(n).map_err(|_| allowed())?, String::new()),
        Node::Str(s) => {
            let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
            let value = s[..split].trim().parse::<f64>().map_err(|_| allowed())?;
            (value, s[split..].trim().to_ascii_lowercase())
        }
        _ => return Err(allowed()),
    };
    let scale: f64 = match unit.as_str() {
        "b" => 1.0,
        "kb" => 1e3,
        "" | "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => return Err(allowed()),
    };
    let bytes = value * scale;
    if value.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64 {
        Ok(bytes as u64)
    } else {
        Err(allowed())
    }
}

/// The defaults of `tr_config.recipe`: the seed's (AdamW 1e-3, cosine) or nnU-Net's (SGD 1e-2
/// Nesterov 0.99, weight decay 3e-5, poly 0.9, 1000 epochs of 250 steps, 50 validation steps).
struct Recipe {
    optimizer: OptimizerKind,
    initial_lr: f64,
    weight_decay: f64,
    momentum: f64,
    scheduler: SchedulerKind,
    max_epoch: usize,
    max_steps_per_epoch: usize,
    max_val_steps_per_epoch: usize,
}

const RECIPES: &[(&str, &Recipe)] = &[("seed", &SEED_RECIPE), ("nnunet", &NNUNET_RECIPE)];

/// `optimizer`'s spellings; the other keys complete its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
enum OptimizerKind {
    AdamW,
    Adam,
    Sgd,
}

const OPTIMIZERS: &[(&str, OptimizerKind)] =
    &[("AdamW", OptimizerKind::AdamW), ("Adam", OptimizerKind::Adam), ("SGD", OptimizerKind::Sgd)];

/// `scheduler`'s spellings; `max_epoch` and `poly_exponent` complete them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SchedulerKind {
    Cosine,
    Poly,
    Constant,
}

const SCHEDULERS: &[(&str, SchedulerKind)] = &[
    ("cosine", SchedulerKind::Cosine),
    ("poly", SchedulerKind::Poly),
    ("constant", SchedulerKind::Constant),
];

const SEED_RECIPE: Recipe = Recipe {
    optimizer: OptimizerKind::AdamW,
    initial_lr: 1e-3,
    weight_decay: 0.0,
    momentum: 0.9,
    scheduler: SchedulerKind::Cosine,
    max_epoch: 500,
    max_steps_per_epoch: 500,
    max_val_steps_per_epoch: 25,
};

const NNUNET_RECIPE: Recipe = Recipe {
    optimizer: OptimizerKind::Sgd,
    initial_lr: 1e-2,
    weight_decay: 3e-5,
    momentum: 0.99,
    scheduler: SchedulerKind::Poly,
    max_epoch: 1000,
    max_steps_per_epoch: 250,
    max_val_steps_per_epoch: 50,
};

/// Reads `tr_config`.
pub(crate) fn read_tr_config(mut s: Section<'_>) -> Result<TrConfig> {
    let patch = s.get("patch_size", Some([192; 3]), &or_auto(size3))?;
    let batch = s.get("batch_size", Some(2), &or_auto(count_from(1)))?;
    let recipe = s.get("recipe", &SEED_RECIPE, &choice(RECIPES))?;
    let optimizer = s.get("optimizer", recipe.optimizer, &choice(OPTIMIZERS))?;
    let lr = s.get("initial_lr", recipe.initial_lr, &positive)?;
    let weight_decay = s.get("weight_decay", recipe.weight_decay, &non_negative)?;
    let momentum_key = s.optional("momentum", &number_in(0.0, 1.0))?;
    let nesterov_key = s.optional("nesterov", &boolean)?;
    let betas_key = s.optional("betas", &|n| {
        let v = list_of(2, false, number_in(0.0, 0.999_999_999))(n)
            .map_err(|_| "[beta1, beta2], each in [0, 1)")?;
        Ok((v[0], v[1]))
    })?;
    let eps_key = s.optional("eps", &non_negative)?;
    let momentum = momentum_key.unwrap_or(recipe.momentum);
    let nesterov = nesterov_key.unwrap_or(true);
    let optimizer = match optimizer {
        OptimizerKind::Sgd => {
            if nesterov && momentum == 0.0 {
                s.invalid::<()>(
                    "momentum",
                    &Node::Float(momentum),
                    "a momentum > 0 while tr_config.nesterov is true",
                )?;
            }
            for (key, given) in [("betas", betas_key.is_some()), ("eps", eps_key.is_some())] {
                if given {
                    s.ctx().warn(format!("{}: ignored (only Adam and AdamW use it)", s.key_path(key)));
                }
            }
            OptimizerConfig::Sgd(SgdHyper { lr, momentum, nesterov, weight_decay })
        }
        kind @ (OptimizerKind::Adam | OptimizerKind::AdamW) => {
            for (key, given) in [("momentum", momentum_key.is_some()), ("nesterov", nesterov_key.is_some())] {
                if given {
                    s.ctx().warn(format!("{}: ignored (only SGD uses it)", s.key_path(key)));
                }
            }
            let d = AdamHyper::default();
            OptimizerConfig::Adam(AdamHyper {
                lr,
                betas: betas_key.unwrap_or(d.betas),
                eps: eps_key.unwrap_or(d.eps),
                weight_decay,
                decoupled: kind == OptimizerKind::AdamW,
            })
        }
    };

    let max_epoch = s.get("max_epoch", recipe.max_epoch, &count_from(1))?;
    let scheduler = s.get("scheduler", recipe.scheduler, &choice(SCHEDULERS))?;
    let exponent = s.optional("poly_exponent", &positive)?;
    if exponent.is_some() && scheduler != SchedulerKind::Poly {
        s.ctx().warn(format!("{}: ignored (only the poly scheduler uses it)", s.key_path("poly_exponent")));
    }
    let scheduler = match scheduler {
        SchedulerKind::Cosine => LrSchedule::Cosine { max_epochs: max_epoch },
        SchedulerKind::Poly => LrSchedule::Poly { max_epochs: max_epoch, exponent: exponent.unwrap_or(0.9) },
        SchedulerKind::Constant => LrSchedule::Constant,
    };
    let grad_clip_max_norm = s.get("grad_clip_max_norm", Some(12.0), &|n| match n {
        Node::Bool(false) => Ok(None),
        _ => match non_negative(n) {
            Ok(x) => Ok((x > 0.0).then_some(x)),
            Err(_) => Err("a max norm > 0, or 0 / false to disable clipping".into()),
        },
    })?;

    let config = TrConfig {
        optimizer,
        scheduler,
        grad_clip_max_norm,
        max_skipped_fraction: s.get("max_skipped_fraction", 0.1, &probability)?,
        patch_size: patch.unwrap_or([192; 3]),
        batch_size: batch.unwrap_or(2),
        planned: Planned { patch: patch.is_none(), batch: batch.is_none() },
        gradient_accumulation: s.get("gradient_accumulation", 1, &count_from(1))?,
        max_steps_per_epoch: s.get("max_steps_per_epoch", recipe.max_steps_per_epoch, &count_from(1))?,
        max_val_steps_per_epoch: s.get(
            "max_val_steps_per_epoch",
            recipe.max_val_steps_per_epoch,
            &count_from(0),
        )?,
        final_validation: s.get("final_validation", true, &boolean)?,
        whole_volume_every: s.get("whole_volume_every", 0, &count_from(0))?,
        best_by: s.get("best_by", BestBy::EmaPseudoDice, &choice(BEST_BY))?,
        num_dataloader_workers: s.get("num_dataloader_workers", 4, &count_from(0))?,
        max_epoch,
        augmentation: read_augmentation(s.section("augmentation")?)?,
    };
    s.finish(TR_CONFIG_IGNORED);
    anyhow::ensure!(
        config.best_by != BestBy::WholeVolumeDice || config.whole_volume_every > 0,
        "tr_config.best_by = whole_volume_dice: set tr_config.whole_volume_every to the epochs between \
         whole-volume validations (it is 0, so there are none to choose by)"
    );
    Ok(config)
}

fn read_augmentation(mut s: Section<'_>) -> Result<Augmentation> {
    let d = Augmentation::default();
    let non_negative_range = range_in(0.0, false, f64::INFINITY);
    let positive_range = range_in(0.0, true, f64::INFINITY);
    let mirror_axes = |n: &Node| {
        let allowed = || "a list of distinct axes from 0 (z), 1 (y), 2 (x); [] for no mirroring".to_string();
        let Node::Seq(items) = n else { return Err(allowed()) };
        let mut axes = Vec::new();
        for item in items {
            match count_from(0)(item) {
                Ok(a) if a < 3 && !axes.contains(&a) => axes.push(a),
                _ => return Err(allowed()),
            }
        }
        Ok(axes)
    };
    let aug = Augmentation {
        enabled: s.get("enabled", d.enabled, &boolean)?,
        p_rotation: s.get("p_rotation", d.p_rotation, &probability)?,
        rotation_max_degrees: s.get(
            "rotation_max_degrees",
            d.rotation_max_degrees,
            &number_in(0.0, 180.0),
        )?,
        p_scaling: s.get("p_scaling", d.p_scaling, &probability)?,
        scaling_range: s.get("scaling_range", d.scaling_range, &positive_range)?,
        p_noise: s.get("p_noise", d.p_noise, &probability)?,
        noise_max_std: s.get("noise_max_std", d.noise_max_std, &non_negative)?,
        p_blur: s.get("p_blur", d.p_blur, &probability)?,
        blur_sigma_range: s.get("blur_sigma_range", d.blur_sigma_range, &non_negative_range)?,
        p_brightness: s.get("p_brightness", d.p_brightness, &probability)?,
        brightness_range: s.get("brightness_range", d.brightness_range, &non_negative_range)?,
        p_contrast: s.get("p_contrast", d.p_contrast, &probability)?,
        contrast_range: s.get("contrast_range", d.contrast_range, &non_negative_range)?,
        p_low_resolution: s.get("p_low_resolution", d.p_low_resolution, &probability)?,
        low_resolution_range: s.get(
            "low_resolution_range",
            d.low_resolution_range,
            &range_in(0.0, true, 1.0),
        )?,
        p_gamma: s.get("p_gamma", d.p_gamma, &probability)?,
        p_gamma_inverted: s.get("p_gamma_inverted", d.p_gamma_inverted, &probability)?,
        gamma_range: s.get("gamma_range", d.gamma_range, &positive_range)?,
        mirror_axes: s.get("mirror_axes", d.mirror_axes, &mirror_axes)?,
    };
    s.finish(&[]);
    Ok(aug)
}
