//! `unet3d train`: trains the network a config describes on its volumes.

use std::path::Path;

use anyhow::{Context, Result};
use clap::{Args, Parser};

use crate::config::{Config, ConfigArgs, Fold, LabelRule, TargetConfig, TargetKind};
use crate::data::volume::case_name;
use crate::device::Device;
use crate::eval::summary::{self, CasePair, Spacing, Task};
use crate::tensor::io::write_atomic;
use crate::train::data::LoaderSource;
use crate::train::metrics::Score;
use crate::train::trainer::{ConfigSource, RunSummary, Trainer};

/// Train on the config's volumes: checkpoints, GIFs and the final model go to
/// tr_setup.ckpt_out_base, TensorBoard events and metrics.jsonl to tr_setup.tensorboard_log_dir.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The device to train on instead of tr_setup.device: cpu, cuda:N, or sim (the CUDA kernels on
    /// the CPU, slow, for checks). On a GPU device the whole step runs there: forward, backward,
    /// accumulation, clipping and the optimizer.
    #[arg(long)]
    device: Option<Device>,
    /// Replace the checkpoints of an earlier run of the same tr_setup.model_name instead of
    /// refusing to start.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    threads: super::ThreadArgs,
}

impl TrainArgs {
    pub fn run(self) -> Result<()> {
        self.threads.apply()?;
        let path = &self.config.config;
        let (yaml, dir) = Config::read_file(path)?;
        let mut sets = self.config.set.clone();
        if let Some(d) = self.device {
            sets.push(format!("tr_setup.device={d}"));
        }
        let parsed = Config::parse_in(&yaml, &sets, Some(&dir))
            .with_context(|| format!("config {}", path.display()))?;
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
        train(parsed.config, ConfigSource { yaml, sets, dir: Some(dir) }, self.overwrite)?;
        Ok(())
    }
}

/// Trains `config` on its dataset and says where the results are.
pub(crate) fn train(config: Config, source: ConfigSource, overwrite: bool) -> Result<RunSummary> {
    let mut trainer = Trainer::new(config.clone(), source)?;
    trainer.overwrite = overwrite;
    trainer.claim_outputs()?;
    let mut data = LoaderSource::new(&config, trainer.architecture())?;
    let summary = trainer.run(&mut data, None)?;
    if let Some(p) = &summary.final_model {
        println!("final model: {}", p.display());
        let val = data.validation_volumes();
        if config.tr_config.final_validation && config.tr_setup.fold != Fold::All && !val.is_empty() {
            // The model is written: a validation that fails says so without failing the run.
            if let Err(e) = final_validation(&config, p, val) {
                eprintln!("warning: the final whole-volume validation failed: {e:#}");
            }
        }
    }
    if let Some(p) = &summary.best_checkpoint {
        let s = trainer.state();
        println!(
            "best checkpoint (EMA mean Dice {:.4}, epoch {}): {}",
            s.best_ema_dice.unwrap_or(f64::NAN),
            s.best_epoch.unwrap_or(0),
            p.display()
        );
    }
    println!(
        "logs: {} (tensorboard --logdir {})",
        config.tr_setup.log_dir().join(&config.tr_setup.model_name).display(),
        config.tr_setup.log_dir().display()
    );
    Ok(summary)
}

/// The last validation's metrics, one line per target.
pub(crate) fn describe_last_validation(summary: &RunSummary, targets: &[TargetConfig]) -> String {
    let Some(v) = summary.epochs.iter().rev().find_map(|e| e.validation.as_ref()) else {
        return "no validation ran".to_string();
    };
    let mut out = Vec::new();
    for (m, t) in v.targets.iter().zip(targets) {
        let score = match &m.score {
            Score::Dice(d) => {
                let d: Vec<String> = d.iter().map(|x| format!("{x:.3}")).collect();
                format!("Dice per class [{}]", d.join(", "))
            }
            Score::Errors { mse, mae } => format!("MSE {mse:.4}, MAE {mae:.4}"),
        };
        out.push(format!("  {} ({}): loss {:.4}, {score}", m.name, t.loss_fn, m.loss));
    }
    out.join("\n")
}

/// Predicts the validation volumes whole with the final model, through `unet3d infer` (the path a
/// user runs, mirroring included), into `<checkpoint folder>/validation/<case>.zarr`, and scores
/// each label and regression target as `unet3d evaluate` does into
/// `validation/summary_<target>.json`. Vector targets are not scored.
fn final_validation(config: &Config, model: &Path, volumes: &[usize]) -> Result<()> {
    let dc = &config.dataset_config;
    let dir = config.tr_setup.checkpoint_dir().join("validation");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let inputs: Vec<std::path::PathBuf> = volumes
        .iter()
        .map(|&i| std::path::absolute(&dc.volume_paths[i].input))
        .collect::<std::io::Result<_>>()
        .context("resolving the validation inputs")?;
    let list = dir.join("cases.txt");
    let text: String = inputs.iter().map(|p| format!("{}\n", p.display())).collect();
    write_atomic(&list, text.as_bytes())?;
    println!("\nwhole-volume validation of {} volumes into {}", volumes.len(), dir.display());
    // Label maps and float values, whatever the inference keys say, so every target can be scored;
    // the predictions are the final model's, replaced if an earlier run left some.
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let argv = [
        "unet3d",
        "infer",
        "--checkpoint",
        &path(model),
        "--input",
        &path(&list),
        "--output",
        &path(&dir),
        "--overwrite",
        "--set",
        "inference_config.save_probabilities=false",
        "--set",
        "inference_config.output_type=float32",
        "--set",
        "inference_config.output_targets=all",
    ];
    super::Cli::try_parse_from(argv)?.run()?;
    for (k, target) in dc.targets.iter().enumerate() {
        let task = match (TargetKind::of(target), target.label_rule()) {
            (TargetKind::Labels, Some(LabelRule::Argmax)) => {
                Task::Labels { labels: (1..target.channels as u32).collect(), tolerance_mm: 1.0 }
            }
            (TargetKind::Labels, Some(LabelRule::Threshold)) if target.channels == 1 => {
                Task::Labels { labels: vec![1], tolerance_mm: 1.0 }
            }
            (TargetKind::Values, _) => Task::Regression,
            _ => continue,
        };
        let pairs: Vec<CasePair> = volumes
            .iter()
            .zip(&inputs)
            .map(|(&i, input)| {
                let name = input.parent().and_then(case_name).unwrap_or_else(|| format!("volume{i}"));
                CasePair {
                    prediction: dir.join(format!("{name}.zarr")).join(&target.name),
                    reference: dc.volume_paths[i].targets[k].1.clone().into(),
                    name,
                    prediction_array: None,
                    reference_array: None,
                }
            })
            .collect();
        let scored = summary::evaluate(&pairs, &task, Spacing::RecordedOrUnit, Vec::new(), &mut |_, _| {})?;
        let out = dir.join(format!("summary_{}.json", target.name));
        write_atomic(&out, &serde_json::to_vec_pretty(&scored)?)?;
        println!("{}: {}\n{}", target.name, out.display(), summary::table(&scored));
    }
    Ok(())
}
