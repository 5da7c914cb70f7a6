//! `unet3d evaluate`: score predictions against references and write summary.json.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::data::volume::{self, case_name};
use crate::data::zarr::has_array_metadata;
use crate::eval::summary::{self, CasePair, Spacing, Task};
use crate::tensor::io::write_atomic;

/// Score label maps (Dice, IoU, TP/FP/FN, volumes, HD95, surface Dice) or regression values (MAE,
/// RMSE, R^2) against references; one case or two folders of cases paired by name.
#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The predictions: a NIfTI file, a Zarr array or store, or a folder of them.
    #[arg(long)]
    pred: PathBuf,
    /// The references, as --pred (a folder for a folder).
    #[arg(long = "ref")]
    reference: PathBuf,
    /// The labels to score, e.g. 1,2 (default: every non-zero label found).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<u32>,
    /// The surface Dice tolerance in mm.
    #[arg(long, default_value_t = 1.0)]
    tolerance: f64,
    /// Score values (MAE, RMSE, R^2) instead of labels.
    #[arg(long, conflicts_with = "labels")]
    regression: bool,
    /// The array inside each prediction Zarr store (e.g. the target's name).
    #[arg(long)]
    pred_array: Option<String>,
    /// The array inside each reference Zarr store (e.g. label, as `unet3d convert` writes).
    #[arg(long)]
    ref_array: Option<String>,
    /// Voxel size (z, y, x) in mm, instead of what the files record.
    #[arg(long, num_args = 3, value_names = ["Z", "Y", "X"])]
    spacing: Option<Vec<f64>>,
    /// Where summary.json goes (default: inside the --pred folder; ./summary.json for one case).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// A folder of cases, not a volume: a directory that is neither a Zarr array nor named `*.zarr`.
fn is_folder(path: &Path) -> bool {
    path.is_dir() && !has_array_metadata(path) && case_name(path).is_none()
}

impl EvaluateArgs {
    pub fn run(self) -> Result<()> {
        ensure!(
            self.tolerance.is_finite() && self.tolerance >= 0.0,
            "--tolerance {}: a distance in mm, 0 or more",
            self.tolerance
        );
        let spacing = match self.spacing.as_deref() {
            Some(&[z, y, x]) if [z, y, x].iter().all(|s| s.is_finite() && *s > 0.0) => {
                Spacing::Given([z, y, x])
            }
            Some(s) => bail!("--spacing {s:?}: three positive sizes in mm"),
            None => Spacing::Recorded,
        };
        for p in [&self.pred, &self.reference] {
            ensure!(p.exists(), "{}: does not exist", p.display());
        }
        let pair = |name: String, prediction: PathBuf, reference: PathBuf| CasePair {
            name,
            prediction,
            reference,
            prediction_array: self.pred_array.clone(),
            reference_array: self.ref_array.clone(),
        };
        let (pairs, missing, default_output) = match (is_folder(&self.pred), is_folder(&self.reference)) {
            (true, true) => {
                let refs = volume::cases(&self.reference)?;
                let mut pairs = Vec::new();
                for (name, path) in volume::cases(&self.pred)? {
                    let Some((_, r)) = refs.iter().find(|(n, _)| *n == name) else {
                        bail!(
                            "{}: case '{name}' has no reference in {}",
                            path.display(),
                            self.reference.display()
                        );
                    };
                    pairs.push(pair(name, path, r.clone()));
                }
                let missing: Vec<String> = refs
                    .into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| !pairs.iter().any(|p| p.name == *n))
                    .collect();
                (pairs, missing, self.pred.join("summary.json"))
            }
            (false, false) => {
                let name = case_name(&self.pred).unwrap_or_else(|| self.pred.display().to_string());
                (
                    vec![pair(name, self.pred.clone(), self.reference.clone())],
                    Vec::new(),
                    "summary.json".into(),
                )
            }
            (p, _) => bail!(
                "--pred {} is {} but --ref {} is {}: give two folders or two volumes",
                self.pred.display(),
                if p { "a folder" } else { "a volume" },
                self.reference.display(),
                if p { "a volume" } else { "a folder" }
            ),
        };
        if !missing.is_empty() {
            let shown = missing.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
            let more = if missing.len() > 8 { ", ..." } else { "" };
            eprintln!(
                "warning: {} reference cases have no prediction and are not scored ({shown}{more}; \
                 summary.json lists them under missing_predictions)",
                missing.len()
            );
        }
        let task = if self.regression {
            Task::Regression
        } else {
            Task::Labels { labels: self.labels.clone(), tolerance_mm: self.tolerance }
        };
        let started = std::time::Instant::now();
        let total = pairs.len();
        let summary = summary::evaluate(&pairs, &task, spacing, missing, &mut |i, r| {
            let rate = (i + 1) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "evaluate: {}/{total} {} ({rate:.2} cases/s, ETA {:.0}s)",
                i + 1,
                r.case,
                (total - i - 1) as f64 / rate
            );
        })?;
        println!("{}", summary::table(&summary));
        let output = self.output.unwrap_or(default_output);
        let existed = output.exists();
        write_atomic(&output, &serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", output.display()))?;
        println!("summary: {}{}", output.display(), if existed { " (replaced the earlier one)" } else { "" });
        Ok(())
    }
}
