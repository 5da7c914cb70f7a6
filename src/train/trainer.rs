//! The training loop: per-target losses with deep supervision, gradient accumulation and clipping,
//! the optimizer and its per-epoch schedule, validation, checkpoints, GIFs and logs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

use super::checkpoint::{self, ModelRecord, ScheduleRecord, TrainingState};
use super::folder::{Kind, RunFolder, Start};
use super::gif::{self, Panel};
use super::log::Logger;
use super::metrics::{self, Accumulator, Decision, Scoring, Validation};
use super::monitor::{HostMemory, StepProgress};
use super::plan::PlanReport;
use crate::arch::Architecture;
use crate::autograd::{Graph, ParamStore, Var};
use crate::config::{BestBy, Config, OptimizerConfig, TargetConfig};
use crate::data::Batch;
use crate::data::normalize::CtStats;
use crate::device::Device;
use crate::device::cpu::activation::unit_rows;
use crate::device::launch::{DeviceCounters, Gpu};
use crate::loss;
use crate::model::{Network, apply_activation, init};
use crate::ops::activation as act;
use crate::optim::{Adam, GradNorm, Optimizer, Sgd};
use crate::tensor::Tensor;

/// Where batches come from. The real loader draws training batch `i` from (seed, i), so a resumed
/// run that asks for batch `global_step` continues exactly where the stopped one was.
pub trait BatchSource {
    /// Training batch number `index` of the whole run (from 0); a run asks for consecutive
    /// indices starting where it (re)starts.
    fn train_batch(&mut self, index: u64) -> Result<Batch>;
    /// One validation pass: the same un-augmented batches every epoch.
    fn validation(&mut self) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>>;
    /// The CT statistics the batches were normalised with, if any; they go into every checkpoint.
    fn ct_stats(&self) -> Option<CtStats> {
        None
    }
    /// The name of volume `index` of a batch's origins, for messages.
    fn volume_name(&self, index: usize) -> String {
        format!("volume {index}")
    }
}

/// The YAML a run was started from, kept in its checkpoints.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub yaml: String,
    pub sets: Vec<String>,
    /// The folder of the config file, where its relative paths resolve (None: the working
    /// folder, for a config given as text).
    pub dir: Option<PathBuf>,
}

/// What one epoch did.
#[derive(Debug, Clone)]
pub struct EpochReport {
    /// Counted from 0.
    pub epoch: usize,
    pub lr: f64,
    /// Mean weighted total training loss, and per target the mean deep-supervised loss.
    pub train_loss: f64,
    pub train_target_losses: Vec<(String, f64)>,
    pub patches_per_s: f64,
    /// Optimizer steps skipped for a non-finite loss or gradient norm.
    pub skipped_steps: usize,
    pub validation: Option<Validation>,
    pub ema_dice: Option<f64>,
    /// The `_best` checkpoint's epoch (from 1), by `tr_config.best_by`.
    pub best_epoch: Option<usize>,
    pub checkpoint: PathBuf,
    /// What the epoch's training and validation moved and launched on a kernel device.
    pub device: Option<DeviceCounters>,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub epochs: Vec<EpochReport>,
    /// Written once `max_epoch` is reached.
    pub final_model: Option<PathBuf>,
    pub best_checkpoint: Option<PathBuf>,
    /// The run's TensorBoard and metrics.jsonl folder.
    pub log_dir: PathBuf,
}

pub struct Trainer {
    config: Config,
    arch: Architecture,
    net: Network,
    /// `tr_setup.device`, where the parameters, gradients and optimizer state live.
    device: Device,
    /// The kernel device behind `device` (None on the CPU), for its counters.
    gpu: Option<Gpu>,
    store: ParamStore,
    optimizer: Box<dyn Optimizer>,
    clip: GradNorm,
    state: TrainingState,
    /// Whether the run continues a checkpoint's training state.
    resumed: bool,
    /// The settings a resume changed, as `key: then vs now`.
    resume_changes: Vec<String>,
    /// Lets a fresh run replace the checkpoints of an earlier run of the same model name.
    pub overwrite: bool,
    /// The checkpoint folder, held from [`Trainer::claim_outputs`] to the end of [`Trainer::run`].
    folder: Option<RunFolder>,
    /// Draws progress bars (on a terminal).
    pub progress: bool,
    /// Scores an epoch's model on whole volumes every `tr_config.whole_volume_every` epochs; the
    /// command line sets it (prediction and evaluation live above the training layer).
    pub whole_volume: Option<WholeVolumeCheck>,
}

/// What a whole-volume validation of one epoch found.
pub struct WholeVolumeScores {
    /// TensorBoard tags (`whole/...`) and values.
    pub scalars: Vec<(String, f64)>,
    /// The mean Dice over the label targets' classes; None without label targets.
    pub mean_dice: Option<f64>,
}

/// Scores the model file of epoch `e` (from 1) at the path on whole validation volumes.
pub type WholeVolumeCheck = Box<dyn FnMut(usize, &std::path::Path) -> Result<WholeVolumeScores>>;

/// What a resume changes against the run that wrote checkpoint `path`: every setting written
/// differently in the YAML and `--set`s (the checkpoint path itself aside), and an error when the
/// architecture differs, since continuing one network's optimizer state in another is not a
/// resume (the weights may still fit: a nonlinearity, deep supervision).
fn changed_settings(
    path: &std::path::Path,
    state: &TrainingState,
    now: &ConfigSource,
    arch: &Architecture,
) -> Result<Vec<String>> {
    let then = match Config::settings(&state.config_yaml, &state.config_sets) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "warning: checkpoint {}: its config cannot be read ({e:#}); changed settings are not \
                 reported",
                path.display()
            );
            return Ok(Vec::new());
        }
    };
    let mut changes = crate::config::differences(&then, &Config::settings(&now.yaml, &now.sets)?);
    changes.retain(|c| !c.starts_with("tr_setup.checkpoint_path:"));
    let old_arch = Config::parse_in(&state.config_yaml, &state.config_sets, state.config_dir.as_deref())
        .and_then(|p| p.config.architecture());
    if let Ok(old) = old_arch
        && old != *arch
    {
        let diff = crate::config::differences(&serde_json::to_value(&old)?, &serde_json::to_value(arch)?);
        bail!(
            "checkpoint {}: trained with another architecture, which a resume cannot change (fine-tune \
             with tr_setup.load_weights_only: true instead); then vs now:\n  {}",
            path.display(),
            diff.join("\n  ")
        );
    }
    Ok(changes)
}

fn make_optimizer(config: &OptimizerConfig) -> Result<Box<dyn Optimizer>> {
    Ok(match *config {
        OptimizerConfig::Adam(h) => Box::new(Adam::new(h)?),
        OptimizerConfig::Sgd(h) => Box::new(Sgd::new(h)?),
    })
}

impl Trainer {
    /// Checks the device and the memory budget, builds the network, and initialises it or loads
    /// `tr_setup.checkpoint_path` (all of it, or its weights with `load_weights_only`); a
    /// checkpoint that does not fit the network is an error here, before any training.
    pub fn new(config: Config, source: ConfigSource) -> Result<Trainer> {
        let setup = &config.tr_setup;
        let gpu = setup.device.gpu().with_context(|| format!("tr_setup.device {}", setup.device))?;
        ensure!(
            !config.tr_config.planned.any(),
            "tr_config.patch_size or batch_size is auto: plan them from the data first (unet3d train does, \
             and unet3d plan --from-data shows the plan)"
        );
        let plan = PlanReport::new(&config)?;
        println!("training memory ({}): {}", plan.optimizer, plan.memory);
        plan.check().context("refusing to train")?;
        let arch = plan.architecture;
        let mut optimizer = make_optimizer(&config.tr_config.optimizer)?;
        let fresh = TrainingState {
            format_version: checkpoint::FORMAT_VERSION,
            model_name: setup.model_name.clone(),
            epochs_done: 0,
            global_step: 0,
            optimizer_steps: 0,
            seed: setup.seed,
            ema_dice: None,
            best_ema_dice: None,
            best_epoch: None,
            best_whole_volume_dice: None,
            optimizer: None,
            schedule: Some(ScheduleRecord {
                schedule: config.tr_config.scheduler,
                initial_lr: config.tr_config.optimizer.initial_lr(),
            }),
            config_yaml: source.yaml.clone(),
            config_sets: source.sets.clone(),
            config_dir: source.dir.clone(),
            ct_stats: None,
        };
        let mut resume_changes = Vec::new();
        let (mut store, state, resumed, moments) = match &setup.checkpoint_path {
            None => (init::initialize(&arch, setup.seed)?, fresh, false, None),
            Some(p) if setup.load_weights_only => {
                let store = checkpoint::load_weights(p, &arch).context("tr_setup.checkpoint_path")?;
                println!("fine-tuning from the weights of {} (epoch 0, fresh optimizer)", p.display());
                (store, fresh, false, None)
            }
            Some(p) => {
                let ck = checkpoint::load(p, &arch).context("tr_setup.checkpoint_path")?;
                if ck.state.seed != setup.seed {
                    eprintln!(
                        "warning: checkpoint {} was trained with tr_setup.seed {}, this run has {}: \
                         the batches after the resume differ from the original run's",
                        p.display(),
                        ck.state.seed,
                        setup.seed
                    );
                }
                println!(
                    "resuming {} after epoch {} (batch {})",
                    p.display(),
                    ck.state.epochs_done,
                    ck.state.global_step
                );
                resume_changes = changed_settings(p, &ck.state, &source, &arch)?;
                if !resume_changes.is_empty() {
                    println!(
                        "settings changed since the checkpoint (then vs now):\n  {}",
                        resume_changes.join("\n  ")
                    );
                }
                // The files this run writes record its own config, which the next resume compares with.
                let state = TrainingState {
                    seed: setup.seed,
                    model_name: setup.model_name.clone(),
                    config_yaml: source.yaml.clone(),
                    config_sets: source.sets.clone(),
                    config_dir: source.dir.clone(),
                    ..ck.state
                };
                (ck.store, state, true, Some((p.clone(), ck.optimizer)))
            }
        };
        let device = setup.device;
        store.to_device(device).with_context(|| format!("tr_setup.device {device}"))?;
        if let Some((p, moments)) = moments {
            optimizer
                .import_state(&store, &moments)
                .with_context(|| format!("checkpoint {}: optimizer state", p.display()))?;
        }
        let net = Network::new(&arch, &store)?;
        Ok(Trainer {
            config,
            arch,
            net,
            device,
            gpu,
            store,
            optimizer,
            clip: GradNorm::default(),
            state,
            resumed,
            resume_changes,
            overwrite: false,
            folder: None,
            progress: true,
            whole_volume: None,
        })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The parameters, on the training device.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    pub fn state(&self) -> &TrainingState {
        &self.state
    }

    /// The settings this resumed run changed against the run that wrote its checkpoint.
    pub fn resume_changes(&self) -> &[String] {
        &self.resume_changes
    }

    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// Takes the model's checkpoint folder: its lock, and the run number this run's files are
    /// named by. Fails when another run holds it, or when a fresh run would replace the
    /// checkpoints of an earlier run (unless `overwrite`); cheap, so callers claim before opening
    /// the dataset.
    pub fn claim_outputs(&mut self) -> Result<()> {
        if self.folder.is_none() {
            let setup = &self.config.tr_setup;
            let start = match &setup.checkpoint_path {
                Some(source) if self.resumed => {
                    Start::Resume { source: source.clone(), epochs_done: self.state.epochs_done }
                }
                _ if self.overwrite => Start::Replace,
                _ => Start::Fresh,
            };
            self.folder = Some(RunFolder::open(&setup.checkpoint_dir(), &setup.model_name, &start)?);
        }
        Ok(())
    }

    /// Trains to `tr_config.max_epoch`, or stops after epoch `stop_after` (counted from 1) with
    /// its checkpoint written, as a killed run would.
    pub fn run(&mut self, data: &mut dyn BatchSource, stop_after: Option<usize>) -> Result<RunSummary> {
        self.claim_outputs()?;
        // The folder is let go when the run ends, however it ends.
        let folder = self.folder.take().expect("claimed above");
        self.run_in(&folder, data, stop_after)
    }

    fn run_in(
        &mut self,
        folder: &RunFolder,
        data: &mut dyn BatchSource,
        stop_after: Option<usize>,
    ) -> Result<RunSummary> {
        let name = folder.name();
        let log_dir = self.config.tr_setup.log_dir().join(&name);
        let mut logger = Logger::create(&log_dir)?;
        // What this run trains, for the TensorBoard text tab: the config with its --set
        // overrides, and the network and memory plan it resolves to.
        let settings = Config::settings(&self.state.config_yaml, &self.state.config_sets)?;
        let block = |text: String| format!("```\n{text}\n```");
        let step = self.state.global_step;
        logger.text(step, "config/settings", &block(serde_json::to_string_pretty(&settings)?))?;
        logger.text(step, "config/plan", &block(PlanReport::new(&self.config)?.to_string()))?;
        self.state.ct_stats = data.ct_stats();
        let tr = self.config.tr_config.clone();
        let end = stop_after.map_or(tr.max_epoch, |s| s.min(tr.max_epoch));
        let mut epochs = Vec::new();
        for epoch in self.state.epochs_done..end {
            let lr = tr.scheduler.lr(tr.optimizer.initial_lr(), epoch)?;
            self.optimizer.set_lr(lr);
            let before = self.gpu.as_ref().map(|g| {
                g.reset_peak();
                g.counters()
            });
            let began = Instant::now();
            let train = self
                .train_epoch(data, epoch, lr, &mut logger)
                .with_context(|| format!("training epoch {}", epoch + 1))?;
            let (validation, panels) =
                self.validate_with_panels(data).with_context(|| format!("validating epoch {}", epoch + 1))?;
            let mut improved = false;
            if let Some(v) = &validation {
                self.state.ema_dice = metrics::ema(self.state.ema_dice, v.mean_dice());
                if let Some(e) = self.state.ema_dice
                    && tr.best_by == BestBy::EmaPseudoDice
                    && self.state.best_ema_dice.is_none_or(|b| e > b)
                {
                    (self.state.best_ema_dice, self.state.best_epoch, improved) =
                        (Some(e), Some(epoch + 1), true);
                }
            }
            let device = self.gpu.as_ref().zip(before).map(|(g, b)| g.counters().since(&b));
            self.state.epochs_done = epoch + 1;
            let path = folder.path(Kind::Epoch(epoch + 1));
            // One download per save: the parameters and the optimizer state.
            let host = self.store.to_host().context("copying the parameters for the checkpoint")?;
            let opt =
                self.optimizer.export_state().context("copying the optimizer state for the checkpoint")?;
            let every = tr.whole_volume_every;
            let whole = if every > 0 && (epoch + 1) % every == 0 {
                self.whole_volume_validation(folder, epoch + 1, &host)?
            } else {
                None
            };
            if let Some(d) = whole.as_ref().and_then(|w| w.mean_dice)
                && tr.best_by == BestBy::WholeVolumeDice
                && self.state.best_whole_volume_dice.is_none_or(|b| d > b)
            {
                (self.state.best_whole_volume_dice, self.state.best_epoch, improved) =
                    (Some(d), Some(epoch + 1), true);
            }
            checkpoint::save(&path, &self.arch, &host, &opt, &self.state)?;
            let setup = &self.config.tr_setup;
            folder.prune(setup.checkpoints_kept, setup.resumable_checkpoints)?;
            if improved {
                checkpoint::save(&folder.path(Kind::Best), &self.arch, &host, &opt, &self.state)?;
            }
            if let Some((top, bottom)) = panels {
                let gif_path =
                    folder.dir().join(format!("{name}_gifs")).join(format!("epoch_{:04}.gif", epoch + 1));
                std::fs::create_dir_all(gif_path.parent().expect("has a parent"))?;
                gif::write(&gif_path, &top, &bottom)?;
            }
            let mut scalars = vec![
                ("train/loss".to_string(), train.loss),
                ("train/lr".to_string(), lr),
                ("train/patches_per_s".to_string(), train.patches_per_s),
                ("train/grad_norm".to_string(), train.grad_norm),
                ("train/skipped_steps".to_string(), train.skipped_steps as f64),
            ];
            scalars.extend(train.target_losses.iter().map(|(n, l)| (format!("train/{n}/loss"), *l)));
            scalars.push(("train/epoch_s".to_string(), began.elapsed().as_secs_f64()));
            if let Some(m) = HostMemory::now() {
                scalars.push(("host/rss_mib".to_string(), m.rss as f64 / MIB));
                scalars.push(("host/peak_rss_mib".to_string(), m.peak as f64 / MIB));
            }
            if let Some(v) = &validation {
                scalars.extend(v.scalars());
            }
            if let Some(e) = self.state.ema_dice {
                scalars.push(("val/ema_dice".to_string(), e));
            }
            scalars.extend(whole.into_iter().flat_map(|w| w.scalars));
            if let Some(c) = &device {
                scalars.extend([
                    ("device/host_to_device_mib".to_string(), c.host_to_device_bytes as f64 / MIB),
                    ("device/device_to_host_mib".to_string(), c.device_to_host_bytes as f64 / MIB),
                    ("device/launches".to_string(), c.launches as f64),
                    ("device/peak_mib".to_string(), c.peak_bytes as f64 / MIB),
                ]);
            }
            logger.scalars(self.state.global_step, epoch + 1, &scalars)?;
            let report = EpochReport {
                epoch,
                lr,
                train_loss: train.loss,
                train_target_losses: train.target_losses,
                patches_per_s: train.patches_per_s,
                skipped_steps: train.skipped_steps,
                validation,
                ema_dice: self.state.ema_dice,
                best_epoch: self.state.best_epoch,
                checkpoint: path,
                device,
            };
            println!("{}", describe_epoch(&report, tr.max_epoch, tr.best_by));
            epochs.push(report);
        }
        let final_model = (self.state.epochs_done >= tr.max_epoch)
            .then(|| -> Result<PathBuf> {
                let p = folder.path(Kind::Final);
                let host = self.store.to_host().context("copying the parameters for the final model")?;
                let record = ModelRecord::new(&self.arch, &self.state);
                checkpoint::save_weights(&p, &host, &record, self.state.ct_stats.as_ref())?;
                Ok(p)
            })
            .transpose()?;
        let best = folder.path(Kind::Best);
        Ok(RunSummary { epochs, final_model, best_checkpoint: best.exists().then_some(best), log_dir })
    }

    /// Scores epoch `epoch`'s weights (`host`) on whole validation volumes through
    /// [`Trainer::whole_volume`], from a model file written for it beside the checkpoints and
    /// removed after; None (with a warning) when there is no check or it fails, which leaves the
    /// run going.
    fn whole_volume_validation(
        &mut self,
        folder: &RunFolder,
        epoch: usize,
        host: &ParamStore,
    ) -> Result<Option<WholeVolumeScores>> {
        let Some(check) = self.whole_volume.as_mut() else { return Ok(None) };
        let model = folder.dir().join(format!(".{}_whole_volume_{epoch:04}.safetensors", folder.name()));
        let record = ModelRecord::new(&self.arch, &self.state);
        checkpoint::save_weights(&model, host, &record, self.state.ct_stats.as_ref())?;
        let scores = check(epoch, &model);
        std::fs::remove_file(&model).with_context(|| format!("removing {}", model.display()))?;
        match scores {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                eprintln!("warning: the whole-volume validation of epoch {epoch} failed: {e:#}");
                Ok(None)
            }
        }
    }

    /// Per target, its deep-supervised loss (nnU-Net's weights over the heads) on `g`.
    fn target_losses(&self, g: &mut Graph, batch: &Staged, outputs: &[Vec<Var>]) -> Result<Vec<Var>> {
        let targets = &self.config.dataset_config.targets;
        targets
            .iter()
            .zip(&batch.labels)
            .zip(outputs)
            .map(|((t, labels), heads)| {
                let inputs = if metrics::needs_probabilities(t) {
                    heads.iter().map(|&h| act::sigmoid(g, h)).collect::<Result<Vec<_>>>()?
                } else {
                    heads.clone()
                };
                let w = loss::deep_supervision_weights(heads.len());
                loss::deep_supervision(g, &t.loss, &inputs, labels, &w)
                    .with_context(|| format!("loss of target '{}' ({})", t.name, t.loss_fn))
            })
            .collect()
    }

    /// The batch's input and, per target (config order), its label maps for the network's heads,
    /// uploaded to the training device, after checking that the batch has the config's targets at
    /// enough scales. From page-locked memory on cuda: the copies queue behind the kernels already
    /// running, so staging the next batch overlaps the current step's compute.
    fn stage(&self, batch: Batch) -> Result<Staged> {
        let heads = if self.arch.deep_supervision { self.arch.n_stages() - 1 } else { 1 };
        let input = batch.input.to_device(self.device).context("uploading the batch")?;
        let labels = self.batch_labels(&batch, heads)?;
        Ok(Staged { batch, input, labels })
    }

    fn batch_labels(&self, batch: &Batch, heads: usize) -> Result<Vec<Vec<Tensor>>> {
        let targets = &self.config.dataset_config.targets;
        ensure!(
            batch.targets.len() == targets.len(),
            "the batch has {} targets, the config {}",
            batch.targets.len(),
            targets.len()
        );
        targets
            .iter()
            .zip(&batch.targets)
            .map(|(t, tb)| {
                ensure!(tb.name == t.name, "batch target '{}' where the config has '{}'", tb.name, t.name);
                ensure!(
                    tb.scales.len() >= heads,
                    "target '{}': the batch has {} scales for {} network outputs",
                    t.name,
                    tb.scales.len(),
                    heads
                );
                tb.scales[..heads]
                    .iter()
                    .map(|l| {
                        l.to_device(self.device)
                            .with_context(|| format!("uploading the labels of '{}'", t.name))
                    })
                    .collect()
            })
            .collect()
    }

    fn train_epoch(
        &mut self,
        data: &mut dyn BatchSource,
        epoch: usize,
        lr: f64,
        logger: &mut Logger,
    ) -> Result<TrainEpoch> {
        let tr = &self.config.tr_config;
        let every = self.config.tr_setup.log_every_steps;
        // A batch job's log gets a line where a terminal gets the bar.
        let lines = self.progress && !std::io::stderr().is_terminal();
        let (steps, accum, max_epoch) = (tr.max_steps_per_epoch, tr.gradient_accumulation, tr.max_epoch);
        let targets = self.config.dataset_config.targets.clone();
        let targets = &targets;
        let bar = self.bar(steps as u64, format!("epoch {}/{} lr {lr:.2e}", epoch + 1, tr.max_epoch));
        let (mut loss_sum, mut target_sums) = (0.0, vec![0.0; targets.len()]);
        let (mut norm_sum, mut norms) = (0.0, 0usize);
        // The current accumulation group's batches, and those of the groups a non-finite loss or
        // gradient norm skipped.
        let (mut group, mut skipped) = (Vec::new(), Vec::new());
        let groups = steps.div_ceil(accum);
        let max_skipped = tr.max_skipped_fraction;
        let allowed = (max_skipped * groups as f64).floor() as usize;
        let (start, mut patches, mut in_group) = (Instant::now(), 0usize, 0usize);
        self.store.zero_grad();
        let mut fetch =
            |index: u64| data.train_batch(index).with_context(|| format!("training batch {index}"));
        let mut next = if steps > 0 { Some(self.stage(fetch(self.state.global_step)?)?) } else { None };
        for i in 0..steps {
            let index = self.state.global_step;
            let batch = next.take().expect("staged before the step");
            if index == 0 {
                bar.suspend(|| println!("{}", describe_batch(&batch.batch)));
            }
            let losses = self.train_step(&batch, accum)?;
            group.push((index, batch.batch.origins.clone()));
            // The next batch goes up while this step's kernels run; the loss values and the
            // gradient norm below are the step's only waits for the device.
            if i + 1 < steps {
                next = Some(self.stage(fetch(index + 1)?)?);
            }
            self.state.global_step += 1;
            in_group += 1;
            if in_group == accum || i + 1 == steps {
                if in_group < accum {
                    // A short last group: its gradient is the mean of fewer batches.
                    self.store.scale_grads(accum as f32 / in_group as f32)?;
                }
                match self.optimizer_step()? {
                    Some(n) => {
                        norm_sum += n;
                        norms += 1;
                    }
                    None => skipped.push(std::mem::take(&mut group)),
                }
                group.clear();
                in_group = 0;
                if skipped.len() > allowed {
                    break;
                }
            }
            let values: Vec<f64> = losses.iter().map(|l| l.item().map(f64::from)).collect::<Result<_>>()?;
            let weighted: f64 = values.iter().zip(targets).map(|(v, t)| v * t.weight).sum();
            loss_sum += weighted;
            target_sums.iter_mut().zip(&values).for_each(|(s, v)| *s += v);
            patches += batch.batch.input.dims()[0];
            let rate = patches as f64 / start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4} ({:.4} mean) {rate:.1} patches/s",
                weighted,
                loss_sum / (i + 1) as f64
            ));
            bar.inc(1);
            if (i + 1) % every == 0 || i + 1 == steps {
                let mut scalars =
                    vec![("train/step_loss".to_string(), weighted), ("train/step_lr".to_string(), lr)];
                let per_target: Vec<(String, f64)> =
                    targets.iter().zip(&values).map(|(t, v)| (t.name.clone(), *v)).collect();
                scalars.extend(per_target.iter().map(|(n, v)| (format!("train/{n}/step_loss"), *v)));
                logger.scalars(self.state.global_step, epoch + 1, &scalars)?;
                if lines {
                    let line = StepProgress {
                        epoch,
                        max_epoch,
                        step: i + 1,
                        steps,
                        loss: weighted,
                        mean_loss: loss_sum / (i + 1) as f64,
                        lr,
                        patches_per_s: rate,
                        elapsed: start.elapsed(),
                        host: HostMemory::now(),
                        device_peak: self.gpu.as_ref().map(|g| g.counters().peak_bytes),
                        targets: &per_target,
                    };
                    println!("{line}");
                }
            }
        }
        bar.finish_and_clear();
        if skipped.len() > allowed {
            let batches: Vec<String> = skipped
                .iter()
                .flatten()
                .take(8)
                .map(|(b, origins)| {
                    let at: Vec<String> =
                        origins.iter().map(|(v, p)| format!("{} at {p:?}", data.volume_name(*v))).collect();
                    format!("batch {b}: {}", at.join(", "))
                })
                .collect();
            bail!(
                "{} of this epoch's {groups} optimizer steps were skipped for a non-finite loss or \
                 gradient norm, more than tr_config.max_skipped_fraction = {} allows; the batches \
                 (patch starts [z, y, x]):\n  {}",
                skipped.len(),
                max_skipped,
                batches.join("\n  ")
            );
        }
        let n = steps as f64;
        Ok(TrainEpoch {
            loss: loss_sum / n,
            target_losses: targets.iter().zip(target_sums).map(|(t, s)| (t.name.clone(), s / n)).collect(),
            patches_per_s: patches as f64 / start.elapsed().as_secs_f64().max(1e-9),
            grad_norm: if norms > 0 { norm_sum / norms as f64 } else { f64::NAN },
            skipped_steps: skipped.len(),
        })
    }

    /// One step's forward and backward of a staged batch on the training device, the gradients
    /// added to the store's; the per-target losses stay on the device (one float each to read).
    fn train_step(&mut self, batch: &Staged, accum: usize) -> Result<Vec<Tensor>> {
        let mut g = Graph::new();
        let x = g.constant(batch.input.clone());
        let outputs = self.net.forward(&mut g, &self.store, x)?;
        let losses = self.target_losses(&mut g, batch, &outputs)?;
        let values: Vec<Tensor> = losses.iter().map(|&l| g.value(l).clone()).collect();
        let targets = &self.config.dataset_config.targets;
        let terms: Vec<(Var, f64)> =
            losses.iter().zip(targets).map(|(&l, t)| (l, t.weight / accum as f64)).collect();
        let total = loss::weighted_sum(&mut g, &terms)?;
        g.backward(total, &mut self.store)?;
        Ok(values)
    }

    /// Clips the accumulated (mean) gradient, steps, and forgets the gradient. A non-finite
    /// gradient norm skips the step (returns None) rather than poisoning the weights.
    fn optimizer_step(&mut self) -> Result<Option<f64>> {
        let norm = match self.config.tr_config.grad_clip_max_norm {
            Some(max) => self.clip.clip(&mut self.store, max)?,
            None => self.clip.measure(&self.store)?,
        };
        let stepped = if norm.is_finite() {
            self.optimizer.step(&mut self.store)?;
            self.state.optimizer_steps += 1;
            Some(norm)
        } else {
            eprintln!("warning: gradient norm {norm} at batch {}: step skipped", self.state.global_step);
            None
        };
        self.store.zero_grad();
        Ok(stepped)
    }

    /// One validation pass of at most `max_val_steps_per_epoch` batches: the losses with the
    /// training's deep supervision (unweighted by the targets' weights) and the metrics on the
    /// full-resolution heads; None when there is no validation batch.
    pub fn validate(&self, data: &mut dyn BatchSource) -> Result<Option<Validation>> {
        Ok(self.validate_with_panels(data)?.0)
    }

    /// [`validate`](Self::validate), and GIF panels of the first sample.
    #[allow(clippy::type_complexity)]
    fn validate_with_panels(
        &self,
        data: &mut dyn BatchSource,
    ) -> Result<(Option<Validation>, Option<(Vec<Panel>, Vec<Panel>)>)> {
        let max = self.config.tr_config.max_val_steps_per_epoch;
        if max == 0 {
            return Ok((None, None));
        }
        let targets = &self.config.dataset_config.targets;
        let mut acc = Accumulator::new(targets);
        let mut panels = None;
        let bar = self.bar(max as u64, "validation".to_string());
        for (b, batch) in data.validation()?.enumerate() {
            // Polling once more lets a loader that ends its pass itself see the end.
            if b == max {
                break;
            }
            let batch = self.stage(batch.with_context(|| format!("validation batch {b}"))?)?;
            let mut g = Graph::no_grad();
            let x = g.constant(batch.input.clone());
            let outputs = self.net.forward(&mut g, &self.store, x)?;
            let losses = self.target_losses(&mut g, &batch, &outputs)?;
            let mut shown = Vec::new();
            for (t, (heads, &l)) in outputs.iter().zip(&losses).enumerate() {
                let (scoring, activation) = acc.scoring(t);
                let output = match scoring {
                    Scoring::Segmentation(_) => heads[0],
                    Scoring::Regression => apply_activation(&mut g, heads[0], activation)?,
                };
                // The metrics read the full-resolution output on the host: one download per head.
                let output = g.value(output).to_device(Device::Cpu).context("downloading an output")?;
                let loss = f64::from(g.value(l).item()?);
                acc.add(t, loss, &output, &batch.batch.targets[t].scales[0])?;
                shown.push((scoring, output));
            }
            acc.end_batch();
            if b == 0 {
                panels = Some(gif_panels(&batch.batch, targets, &shown)?);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let v = acc.finish();
        Ok(((v.batches > 0).then_some(v), panels))
    }

    fn bar(&self, len: u64, prefix: String) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len).with_prefix(prefix);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    }
}

/// A batch with its input and labels on the training device.
struct Staged {
    batch: Batch,
    input: Tensor,
    /// Per target, one label map per network head.
    labels: Vec<Vec<Tensor>>,
}

struct TrainEpoch {
    loss: f64,
    target_losses: Vec<(String, f64)>,
    patches_per_s: f64,
    grad_norm: f64,
    /// Optimizer steps skipped for a non-finite loss or gradient norm.
    skipped_steps: usize,
}

/// Sample 0 of (N, D, H, W, C): every channel when C = 3 (shown in colour), else channel 0.
fn sample_panel(t: &Tensor) -> Result<Panel> {
    let d = t.dims();
    ensure!(d.len() == 5, "GIF: expected an (N, D, H, W, C) tensor, got shape {}", t.shape());
    let (size, c) = ([d[1], d[2], d[3]], d[4]);
    let voxels: usize = size.iter().product();
    let data = &t.data()[..voxels * c];
    if c == 3 {
        Panel::new(size, 3, data.to_vec())
    } else {
        Panel::new(size, 1, data.iter().step_by(c).copied().collect())
    }
}

/// Top row: the input and each target; bottom row: a blank tile and each prediction (the class
/// map of argmax targets, the probability of thresholded ones, the activated regression output).
fn gif_panels(
    batch: &Batch,
    targets: &[TargetConfig],
    outputs: &[(Scoring, Tensor)],
) -> Result<(Vec<Panel>, Vec<Panel>)> {
    let input = sample_panel(&batch.input)?;
    let mut top = vec![input.clone()];
    let mut bottom = vec![Panel::new(input.size, 1, vec![0.0; input.data.len()])?];
    for ((t, tb), (scoring, out)) in targets.iter().zip(&batch.targets).zip(outputs) {
        top.push(sample_panel(&tb.scales[0]).with_context(|| format!("target '{}'", t.name))?);
        let pred = match scoring {
            Scoring::Segmentation(Decision::Argmax) => {
                let c = *out.dims().last().expect("5-D");
                let classes: Vec<f32> =
                    out.data().chunks_exact(c).map(|r| metrics::argmax(r) as f32).collect();
                sample_panel(&Tensor::from_vec([out.dims()[..4].to_vec(), vec![1]].concat(), classes)?)?
            }
            Scoring::Segmentation(Decision::Threshold) => {
                let p: Vec<f32> = out.data().iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
                sample_panel(&Tensor::from_vec(out.dims().to_vec(), p)?)?
            }
            // Vectors as inference writes them (unit length), on the unit range; values on their
            // target's range, so a good prediction looks like its target.
            Scoring::Regression if t.is_normals() => {
                let c = *out.dims().last().expect("5-D");
                let mut unit = out.data().to_vec();
                unit_rows(&mut unit, c);
                sample_panel(&Tensor::from_vec(out.dims().to_vec(), unit)?)?.on([0.0, 1.0])
            }
            Scoring::Regression => {
                let range = top.last().expect("the target's panel").own_range();
                sample_panel(out)?.on(range)
            }
        };
        if t.is_normals() {
            let target = top.pop().expect("the target's panel");
            top.push(target.on([0.0, 1.0]));
        }
        bottom.push(pred);
    }
    Ok((top, bottom))
}

/// The first batch's shape, dtype and range per key, as the seed prints it.
pub fn describe_batch(batch: &Batch) -> String {
    let range = |t: &Tensor| {
        let (lo, hi) =
            t.data().iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        format!("shape {} float32 min {lo:.4} max {hi:.4}", t.shape())
    };
    let mut s = format!("first batch:\n  input: {}", range(&batch.input));
    for t in &batch.targets {
        for (i, scale) in t.scales.iter().enumerate() {
            s += &format!("\n  {}[scale {i}]: {}", t.name, range(scale));
        }
    }
    s
}

const MIB: f64 = 1024.0 * 1024.0;

fn describe_epoch(r: &EpochReport, max_epoch: usize, best_by: BestBy) -> String {
    let mut s = format!(
        "epoch {}/{max_epoch}: lr {:.2e}, train loss {:.4} ({}), {:.1} patches/s",
        r.epoch + 1,
        r.lr,
        r.train_loss,
        r.train_target_losses.iter().map(|(n, l)| format!("{n} {l:.4}")).collect::<Vec<_>>().join(", "),
        r.patches_per_s
    );
    if r.skipped_steps > 0 {
        s += &format!(", {} steps skipped (non-finite loss or gradient)", r.skipped_steps);
    }
    if let Some(c) = &r.device {
        s += &format!("\n  device: {c}");
    }
    if let Some(v) = &r.validation {
        for t in &v.targets {
            s += &format!("\n  val {}: loss {:.4}, {}", t.name, t.loss, t.score_text());
        }
        if let Some(e) = r.ema_dice {
            // The EMA lags: after a few epochs it is mostly the first ones' Dice.
            s += &format!(
                "\n  mean pseudo-Dice {:.3} (validation patches); its EMA {e:.3} (0.9 old + 0.1 new from epoch 1, \
                 as nnU-Net, so it trails the current value in short runs)",
                v.mean_dice()
            );
            s += match best_by {
                BestBy::EmaPseudoDice => " picks the best checkpoint",
                BestBy::WholeVolumeDice => "; the whole-volume Dice picks the best checkpoint",
            };
            if let Some(b) = r.best_epoch {
                s += &format!(": epoch {b}");
            }
        }
    }
    s
}
