//! `unet3d train`: trains the network a config describes on its volumes.

use anyhow::{Context, Result};
use clap::Args;

use crate::config::{Config, ConfigArgs, TargetConfig};
use crate::device::Device;
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
