//! Evaluation of a set of cases into summary.json: nnU-Net's `evaluate_folder` layout
//! (`metric_per_case` with `prediction_file`, `reference_file` and `metrics` per label; `mean` per
//! label; `foreground_mean`) with unet3d's own settings beside it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::metrics::{self, Metric, Scores};
use crate::data::volume::{self, Volume};

/// What is compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Label maps: overlap and surface metrics per label. `labels` empty: every non-zero label
    /// that occurs in a reference or a prediction.
    Labels { labels: Vec<u32>, tolerance_mm: f64 },
    /// A regression target's values (any number of channels).
    Regression,
}

/// One prediction and its reference; `array` names the array inside a Zarr store.
#[derive(Debug, Clone)]
pub struct CasePair {
    pub name: String,
    pub prediction: PathBuf,
    pub reference: PathBuf,
    pub prediction_array: Option<String>,
    pub reference_array: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub case: String,
    pub prediction_file: String,
    pub reference_file: String,
    /// Voxel size (D, H, W) in mm the surface metrics and volumes used.
    pub spacing: [f64; 3],
    /// Per label ("1", "2", ...), or "values" for a regression target.
    pub metrics: BTreeMap<String, Scores>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub metric_per_case: Vec<CaseResult>,
    /// Per label, the mean over the cases that define each metric.
    pub mean: BTreeMap<String, Scores>,
    /// The mean over the non-zero labels of their means (labels only; empty for regression).
    pub foreground_mean: Scores,
    pub task: Task,
    /// The labels scored, in order (labels only).
    pub labels: Vec<u32>,
    /// Reference cases that have no prediction (not in the means).
    pub missing_predictions: Vec<String>,
}

/// The key of a regression target's scores in `metrics` and `mean`.
pub const VALUES: &str = "values";

/// Where the voxel size comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spacing {
    /// What the files record: the reference's, else the prediction's (when both record one they
    /// must agree); an error when neither does.
    Recorded,
    /// As `Recorded`, with 1 mm where neither records one (synthetic data).
    RecordedOrUnit,
    /// This, whatever the files say.
    Given([f64; 3]),
}

/// Scores every pair (one case in memory at a time).
pub fn evaluate(
    pairs: &[CasePair],
    task: &Task,
    spacing: Spacing,
    missing_predictions: Vec<String>,
    progress: &mut dyn FnMut(usize, &CaseResult),
) -> Result<Summary> {
    let mut results = Vec::with_capacity(pairs.len());
    let mut found: BTreeSet<u32> = BTreeSet::new();
    let mut voxels = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.iter().enumerate() {
        let pred = volume::read(&pair.prediction, pair.prediction_array.as_deref())?;
        let reference = volume::read(&pair.reference, pair.reference_array.as_deref())?;
        let spacing = case_spacing(&pred, &reference, spacing)?;
        ensure!(
            pred.shape == reference.shape && pred.channels == reference.channels,
            "case '{}': prediction {} is {:?} x {} channels but reference {} is {:?} x {}",
            pair.name,
            pred.name,
            pred.shape,
            pred.channels,
            reference.name,
            reference.shape,
            reference.channels
        );
        let metrics = match task {
            Task::Regression => BTreeMap::from([(
                VALUES.to_string(),
                metrics::regression_scores(&pred.data, &reference.data),
            )]),
            Task::Labels { labels, tolerance_mm } => {
                let (p, r) = (label_map(&pred)?, label_map(&reference)?);
                let present: BTreeSet<u32> = p.iter().chain(&r).copied().filter(|&l| l != 0).collect();
                let scored: Vec<u32> =
                    if labels.is_empty() { present.iter().copied().collect() } else { labels.clone() };
                found.extend(present);
                scored
                    .iter()
                    .map(|&l| {
                        (l.to_string(), metrics::label_scores(&p, &r, pred.shape, spacing, l, *tolerance_mm))
                    })
                    .collect()
            }
        };
        voxels.push(pred.shape.iter().product::<usize>());
        let result = CaseResult {
            case: pair.name.clone(),
            prediction_file: pred.name,
            reference_file: reference.name,
            spacing,
            metrics,
        };
        progress(i, &result);
        results.push(result);
    }
    let labels: Vec<u32> = match task {
        Task::Labels { labels, .. } if labels.is_empty() => found.into_iter().collect(),
        Task::Labels { labels, .. } => labels.clone(),
        Task::Regression => Vec::new(),
    };
    // A label a case lacks in both maps: nothing predicted, nothing missed.
    for (result, &n) in results.iter_mut().zip(&voxels) {
        for l in &labels {
            result.metrics.entry(l.to_string()).or_insert_with(|| absent(n));
        }
    }
    let keys: Vec<String> = if labels.is_empty() {
        vec![VALUES.to_string()]
    } else {
        labels.iter().map(u32::to_string).collect()
    };
    let mean: BTreeMap<String, Scores> = keys
        .iter()
        .filter(|k| results.iter().any(|r| r.metrics.contains_key(*k)))
        .map(|k| (k.clone(), metrics::mean(results.iter().filter_map(|r| r.metrics.get(k)))))
        .collect();
    let foreground_mean =
        metrics::mean(labels.iter().filter(|&&l| l != 0).filter_map(|l| mean.get(&l.to_string())));
    Ok(Summary {
        metric_per_case: results,
        mean,
        foreground_mean,
        task: task.clone(),
        labels,
        missing_predictions,
    })
}

/// The scores of a label absent from both maps of a case of `voxels` voxels.
fn absent(voxels: usize) -> Scores {
    use Metric::*;
    let zero = [TP, FP, FN, NPred, NRef, VolumePred, VolumeRef].map(|m| (m, Some(0.0)));
    let undefined = [Dice, IoU, Hd95, Nsd].map(|m| (m, None));
    zero.into_iter().chain(undefined).chain([(TN, Some(voxels as f64))]).collect()
}

fn case_spacing(pred: &Volume, reference: &Volume, rule: Spacing) -> Result<[f64; 3]> {
    if let Spacing::Given(s) = rule {
        return Ok(s);
    }
    match (pred.spacing, reference.spacing) {
        (Some(p), Some(r)) => {
            let close = (0..3).all(|a| (p[a] - r[a]).abs() <= 1e-4 * r[a].abs().max(1.0));
            ensure!(
                close,
                "{} has spacing {p:?} but its reference {} has {r:?} (D, H, W, mm): not the same geometry \
                 (pass --spacing to score them anyway)",
                pred.name,
                reference.name
            );
            Ok(r)
        }
        (_, Some(s)) | (Some(s), None) => Ok(s),
        (None, None) if rule == Spacing::RecordedOrUnit => Ok([1.0; 3]),
        (None, None) => bail!(
            "neither {} nor {} records a voxel spacing (surface distances and volumes need one); pass \
             --spacing Z Y X in mm",
            pred.name,
            reference.name
        ),
    }
}

/// The voxels of a one-channel label map as labels; a fractional or negative value is an error
/// naming the file and the voxel.
fn label_map(v: &Volume) -> Result<Vec<u32>> {
    ensure!(v.channels == 1, "{}: {} channels; a label map has one", v.name, v.channels);
    let [_, h, w] = v.shape;
    v.data
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f32 {
                Ok(x as u32)
            } else {
                bail!(
                    "{}: value {x} at voxel (z, y, x) = ({}, {}, {}) is not a label (a non-negative \
                     integer); is it a probability map? (evaluate it with --regression, or predict \
                     label maps)",
                    v.name,
                    i / (h * w),
                    (i / w) % h,
                    i % w
                )
            }
        })
        .collect()
}

/// The console table: one row per case, then the mean.
pub fn table(summary: &Summary) -> String {
    let (keys, metrics): (Vec<String>, &[Metric]) = match summary.task {
        Task::Labels { .. } => {
            (summary.labels.iter().map(u32::to_string).collect(), &[Metric::Dice, Metric::Hd95, Metric::Nsd])
        }
        Task::Regression => (vec![VALUES.to_string()], &[Metric::Mae, Metric::Rmse, Metric::R2]),
    };
    let name = |m: &Metric| serde_json::to_value(m).ok().and_then(|v| v.as_str().map(str::to_string));
    let width = summary.metric_per_case.iter().map(|r| r.case.len()).max().unwrap_or(4).max(4);
    let mut head = format!("{:width$}", "case");
    for k in &keys {
        for m in metrics {
            head += &format!(" {:>10}", format!("{}/{k}", name(m).unwrap_or_default()));
        }
    }
    let cell = |s: Option<&Scores>, m: &Metric| match s.and_then(|s| s.get(m).copied().flatten()) {
        Some(v) => format!(" {v:>10.4}"),
        None => format!(" {:>10}", "-"),
    };
    let mut lines = vec![head];
    for r in &summary.metric_per_case {
        let mut line = format!("{:width$}", r.case);
        for k in &keys {
            metrics.iter().for_each(|m| line += &cell(r.metrics.get(k), m));
        }
        lines.push(line);
    }
    let mut line = format!("{:width$}", "mean");
    for k in &keys {
        metrics.iter().for_each(|m| line += &cell(summary.mean.get(k), m));
    }
    lines.push(line);
    lines.join("\n")
}
