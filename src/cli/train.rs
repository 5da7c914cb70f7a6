//! `unet3d train`: trains the network a config describes on its volumes.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser};

use crate::config::{BestBy, Config, ConfigArgs, FOLDS, Fold, LabelRule, TargetConfig, TargetKind};
use crate::data::volume::case_name;
use crate::device::Device;
use crate::eval::metrics::Metric;
use crate::eval::summary::{self, CasePair, Spacing, Summary, Task};
use crate::tensor::io::write_atomic;
use crate::train::data::LoaderSource;
use crate::train::log::Logger;
use crate::train::trainer::{ConfigSource, RunSummary, Trainer, WholeVolumeScores};

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
    /// tr_setup.fold: train fold K (0-4) of the seeded 5-fold split by case, or `all` (every volume
    /// trains and validates); outputs go to fold_K/ or fold_all/.
    #[arg(long, value_name = "K|all", value_parser = parse_fold)]
    fold: Option<String>,
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
        if let Some(f) = &self.fold {
            sets.push(format!("tr_setup.fold={f}"));
        }
        let mut parsed = Config::parse_in(&yaml, &sets, Some(&dir))
            .with_context(|| format!("config {}", path.display()))?;
        // `auto` sizes: planned from the data, then in the config as --sets, which the
        // checkpoints record (so a resume and `infer` see the planned values).
        if parsed.config.tr_config.planned.any() {
            sets.extend(super::plan::planned_sets(&parsed.config)?);
            parsed = Config::parse_in(&yaml, &sets, Some(&dir))
                .with_context(|| format!("config {} with the planned sizes", path.display()))?;
        }
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
        train(parsed.config, ConfigSource { yaml, sets, dir: Some(dir) }, self.overwrite)?;
        Ok(())
    }
}

/// `--fold`: a fold index below FOLDS or `all`, as tr_setup.fold takes it.
fn parse_fold(s: &str) -> Result<String, String> {
    match s.parse::<usize>() {
        Ok(k) if k < FOLDS => Ok(k.to_string()),
        _ if s == "all" => Ok(s.to_string()),
        _ => Err(format!("a fold 0..{} or \"all\"", FOLDS - 1)),
    }
}

/// Trains `config` on its dataset and says where the results are.
pub(crate) fn train(config: Config, source: ConfigSource, overwrite: bool) -> Result<RunSummary> {
    let mut trainer = Trainer::new(config.clone(), source)?;
    trainer.overwrite = overwrite;
    trainer.claim_outputs()?;
    let mut data = LoaderSource::new(&config, trainer.architecture())?;
    let val = data.validation_volumes().to_vec();
    let tr = &config.tr_config;
    if tr.best_by == BestBy::WholeVolumeDice && val.is_empty() {
        bail!("tr_config.best_by = whole_volume_dice, but this fold has no validation volumes to score");
    }
    if tr.whole_volume_every > 0 && !val.is_empty() {
        let (config, val) = (config.clone(), val.clone());
        let dir = config.tr_setup.checkpoint_dir().join("validation");
        trainer.whole_volume = Some(Box::new(move |epoch, model| {
            let scored =
                whole_volume_validation(&config, model, &val, &dir.join(format!("epoch_{epoch:04}")))?;
            Ok(scores(&config.dataset_config.targets, &scored))
        }));
    }
    let summary = trainer.run(&mut data, None)?;
    if let Some(p) = &summary.final_model {
        println!("final model: {}", p.display());
        if tr.final_validation && config.tr_setup.fold != Fold::All && !val.is_empty() {
            // The model is written: a validation that fails says so without failing the run.
            let dir = config.tr_setup.checkpoint_dir().join("validation");
            let logged = whole_volume_validation(&config, p, &val, &dir).and_then(|scored| {
                let s = trainer.state();
                let scalars = scores(&config.dataset_config.targets, &scored).scalars;
                Logger::create(&summary.log_dir)?.scalars(s.global_step, s.epochs_done, &scalars)
            });
            if let Err(e) = logged {
                eprintln!("warning: the final whole-volume validation failed: {e:#}");
            }
        }
    }
    if let Some(p) = &summary.best_checkpoint {
        let s = trainer.state();
        let (by, value) = match tr.best_by {
            BestBy::EmaPseudoDice => ("EMA of the mean pseudo-Dice", s.best_ema_dice),
            BestBy::WholeVolumeDice => ("mean whole-volume Dice", s.best_whole_volume_dice),
        };
        println!(
            "best checkpoint ({by} {:.4}, epoch {}): {}",
            value.unwrap_or(f64::NAN),
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
        out.push(format!("  {} ({}): loss {:.4}, {}", m.name, t.loss_fn, m.loss, m.score_text()));
    }
    out.join("\n")
}

/// Predicts the validation volumes whole with `model`, through `unet3d infer` (the path a user
/// runs, mirroring included), into `dir/<case>.zarr`, and scores each label and regression target
/// as `unet3d evaluate` does into `dir/summary_<target>.json`; returns the summaries by target
/// index. Vector targets are not scored.
fn whole_volume_validation(
    config: &Config,
    model: &Path,
    volumes: &[usize],
    dir: &Path,
) -> Result<Vec<(usize, Summary)>> {
    let dc = &config.dataset_config;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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
        &path(dir),
        "--overwrite",
        "--set",
        "inference_config.save_probabilities=false",
        "--set",
        "inference_config.output_type=float32",
        "--set",
        "inference_config.output_targets=all",
    ];
    super::Cli::try_parse_from(argv)?.run()?;
    let mut summaries = Vec::new();
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
        summaries.push((k, scored));
    }
    Ok(summaries)
}

/// A whole-volume validation's TensorBoard scalars: per label target and class, Dice, HD95 and
/// surface Dice (`whole/<target>/dice/<class>`); per regression target MAE and RMSE; and the
/// mean Dice over every label target's classes (`whole/mean_dice`), which can pick the best
/// checkpoint.
fn scores(targets: &[TargetConfig], scored: &[(usize, Summary)]) -> WholeVolumeScores {
    let mut scalars = Vec::new();
    let mut dice = Vec::new();
    for (k, s) in scored {
        let t = &targets[*k];
        match s.task {
            Task::Labels { .. } => {
                // Label k scores the k-th scored class: softmax class k, or sigmoid channel k - 1.
                let classes = t.scored_classes();
                for label in &s.labels {
                    let class =
                        classes.get(*label as usize - 1).cloned().unwrap_or_else(|| label.to_string());
                    let mean = s.mean.get(&label.to_string());
                    for (metric, tag) in
                        [(Metric::Dice, "dice"), (Metric::Hd95, "hd95"), (Metric::Nsd, "nsd")]
                    {
                        if let Some(v) = mean.and_then(|m| m.get(&metric).copied().flatten()) {
                            scalars.push((format!("whole/{}/{tag}/{class}", t.name), v));
                            if metric == Metric::Dice {
                                dice.push(v);
                            }
                        }
                    }
                }
            }
            Task::Regression => {
                for (metric, tag) in [(Metric::Mae, "mae"), (Metric::Rmse, "rmse")] {
                    let v = s.mean.get(summary::VALUES).and_then(|m| m.get(&metric).copied().flatten());
                    if let Some(v) = v {
                        scalars.push((format!("whole/{}/{tag}", t.name), v));
                    }
                }
            }
        }
    }
    let mean_dice = (!dice.is_empty()).then(|| dice.iter().sum::<f64>() / dice.len() as f64);
    if let Some(d) = mean_dice {
        scalars.push(("whole/mean_dice".to_string(), d));
    }
    WholeVolumeScores { scalars, mean_dice }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_flag_takes_an_index_below_five_or_all() {
        assert_eq!(parse_fold("4").as_deref(), Ok("4"));
        assert_eq!(parse_fold("all").as_deref(), Ok("all"));
        for bad in ["5", "-1", "ALL", "fold_1"] {
            assert_eq!(parse_fold(bad), Err("a fold 0..4 or \"all\"".to_string()), "{bad}");
        }
        let e = super::super::Cli::try_parse_from(["unet3d", "train", "--config", "c.yaml", "--fold", "7"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--fold") && e.contains("0..4"), "{e}");
    }
}
