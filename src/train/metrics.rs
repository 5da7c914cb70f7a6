//! Validation metrics: Dice per class for segmentation targets from true/false positive and false
//! negative counts summed over the whole validation pass (nnU-Net's pseudo-Dice), MSE and MAE for
//! regression targets, and the EMA of the mean Dice that picks the best checkpoint.

use anyhow::{Result, ensure};

use crate::config::{Activation, TargetConfig};
use crate::data::TargetKind;
use crate::loss::{Loss, Pointwise};
use crate::tensor::Tensor;

/// How a segmentation target's logits become a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// DiceCE / CE: argmax over the channels against a class-index map; classes 1.. are scored
    /// (0 is background, as nnU-Net).
    Argmax,
    /// The BCE family: sigmoid > 0.5 (logit > 0) per channel against a 0/1 map per channel.
    Threshold,
}

/// What a target is scored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Segmentation(Decision),
    Regression,
}

impl Scoring {
    pub fn of(target: &TargetConfig) -> Scoring {
        match (TargetKind::of(target), target.loss) {
            (TargetKind::Labels, Loss::DiceCe(_) | Loss::CrossEntropy(_)) => {
                Scoring::Segmentation(Decision::Argmax)
            }
            (TargetKind::Labels, _) => Scoring::Segmentation(Decision::Threshold),
            _ => Scoring::Regression,
        }
    }
}

/// The loss input a target's logits are turned into: BCELoss takes probabilities, so its logits
/// go through a sigmoid whatever `activation` says (the others take logits).
pub fn needs_probabilities(target: &TargetConfig) -> bool {
    matches!(target.loss, Loss::Pointwise(Pointwise::Bce, _))
}

/// Per-class counts, classes in channel order (Argmax: classes 1..C).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiceCounts {
    pub tp: Vec<u64>,
    pub fp: Vec<u64>,
    pub fn_: Vec<u64>,
}

impl DiceCounts {
    /// Adds one batch: `logits` (N, D, H, W, C), `target` (N, D, H, W, 1) class indices (Argmax) or
    /// (N, D, H, W, C) 0/1 values (Threshold).
    pub fn add(&mut self, decision: Decision, logits: &Tensor, target: &Tensor) -> Result<()> {
        let c = *logits.dims().last().unwrap_or(&0);
        let voxels = logits.numel() / c.max(1);
        let (classes, tc) = match decision {
            Decision::Argmax => (c.saturating_sub(1), 1),
            Decision::Threshold => (c, c),
        };
        ensure!(
            c > 0 && target.numel() == voxels * tc,
            "Dice: prediction of shape {} and target of shape {} do not match",
            logits.shape(),
            target.shape()
        );
        if self.tp.is_empty() {
            *self = DiceCounts { tp: vec![0; classes], fp: vec![0; classes], fn_: vec![0; classes] };
        }
        ensure!(self.tp.len() == classes, "Dice: {classes} classes after {}", self.tp.len());
        let (x, t) = (logits.data(), target.data());
        for v in 0..voxels {
            let row = &x[v * c..(v + 1) * c];
            match decision {
                Decision::Argmax => {
                    let pred = argmax(row);
                    let truth = t[v].round() as usize;
                    for k in 1..c {
                        match (pred == k, truth == k) {
                            (true, true) => self.tp[k - 1] += 1,
                            (true, false) => self.fp[k - 1] += 1,
                            (false, true) => self.fn_[k - 1] += 1,
                            _ => {}
                        }
                    }
                }
                Decision::Threshold => {
                    for k in 0..c {
                        match (row[k] > 0.0, t[v * c + k] > 0.5) {
                            (true, true) => self.tp[k] += 1,
                            (true, false) => self.fp[k] += 1,
                            (false, true) => self.fn_[k] += 1,
                            _ => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// 2TP / (2TP + FP + FN) per class; NaN for a class absent from both prediction and target
    /// (nnU-Net logs NaN there too and leaves it out of the mean).
    pub fn dice(&self) -> Vec<f64> {
        (0..self.tp.len())
            .map(|k| {
                let (tp, den) = (2 * self.tp[k], 2 * self.tp[k] + self.fp[k] + self.fn_[k]);
                if den == 0 { f64::NAN } else { tp as f64 / den as f64 }
            })
            .collect()
    }
}

/// The first index of the largest value (PyTorch's argmax picks the first of ties too).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (k, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = k;
        }
    }
    best
}

/// Sums of squared and absolute errors.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ErrorSums {
    pub squared: f64,
    pub absolute: f64,
    pub count: u64,
}

impl ErrorSums {
    /// Adds a prediction (after the target's activation) and its target, of one shape.
    pub fn add(&mut self, prediction: &Tensor, target: &Tensor) -> Result<()> {
        ensure!(
            prediction.dims() == target.dims(),
            "MSE/MAE: prediction of shape {} and target of shape {} differ",
            prediction.shape(),
            target.shape()
        );
        for (p, t) in prediction.data().iter().zip(target.data()) {
            let e = f64::from(p - t);
            self.squared += e * e;
            self.absolute += e.abs();
        }
        self.count += prediction.numel() as u64;
        Ok(())
    }

    pub fn mse(&self) -> f64 {
        self.squared / self.count as f64
    }

    pub fn mae(&self) -> f64 {
        self.absolute / self.count as f64
    }
}

/// The mean of the non-NaN values; NaN when there are none.
pub fn nan_mean(values: &[f64]) -> f64 {
    let kept: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if kept.is_empty() { f64::NAN } else { kept.iter().sum::<f64>() / kept.len() as f64 }
}

/// nnU-Net's moving average of the pseudo-Dice: the first value as it is, then 0.9 old + 0.1 new.
/// A NaN value leaves the average unchanged.
pub fn ema(previous: Option<f64>, value: f64) -> Option<f64> {
    match previous {
        _ if value.is_nan() => previous,
        None => Some(value),
        Some(old) => Some(0.9 * old + 0.1 * value),
    }
}

/// One validated target's results.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetMetrics {
    pub name: String,
    /// The names of the classes a Dice score lists, in its order.
    pub classes: Vec<String>,
    /// Mean over validation batches of the unweighted loss.
    pub loss: f64,
    pub score: Score,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Score {
    /// Dice per scored class (Argmax: classes 1..C; Threshold: every channel).
    Dice(Vec<f64>),
    Errors {
        mse: f64,
        mae: f64,
    },
}

impl TargetMetrics {
    /// For logs: "Dice 0.912" for one class, "Dice Anterior 0.861, Posterior 0.845" for several,
    /// "MSE 0.0123, MAE 0.0456" for a regression target.
    pub fn score_text(&self) -> String {
        match &self.score {
            Score::Dice(d) if d.len() == 1 => format!("Dice {:.3}", d[0]),
            Score::Dice(d) => {
                let d: Vec<String> = self.classes.iter().zip(d).map(|(c, x)| format!("{c} {x:.3}")).collect();
                format!("Dice {}", d.join(", "))
            }
            Score::Errors { mse, mae } => format!("MSE {mse:.4}, MAE {mae:.4}"),
        }
    }
}

/// What one validation pass measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    pub batches: usize,
    pub targets: Vec<TargetMetrics>,
}

impl Validation {
    /// The mean Dice over every class of every segmentation target; NaN without any.
    pub fn mean_dice(&self) -> f64 {
        let all: Vec<f64> = self
            .targets
            .iter()
            .filter_map(|t| match &t.score {
                Score::Dice(d) => Some(d.clone()),
                Score::Errors { .. } => None,
            })
            .flatten()
            .collect();
        nan_mean(&all)
    }

    /// The scalars to log, tagged `val/<target>/<metric>`.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for t in &self.targets {
            out.push((format!("val/{}/loss", t.name), t.loss));
            match &t.score {
                Score::Dice(d) => {
                    for (class, v) in t.classes.iter().zip(d) {
                        out.push((format!("val/{}/dice/{class}", t.name), *v));
                    }
                }
                Score::Errors { mse, mae } => {
                    out.push((format!("val/{}/mse", t.name), *mse));
                    out.push((format!("val/{}/mae", t.name), *mae));
                }
            }
        }
        out.push(("val/mean_dice".to_string(), self.mean_dice()));
        out
    }
}

struct TargetAcc {
    name: String,
    classes: Vec<String>,
    scoring: Scoring,
    activation: Activation,
    loss_sum: f64,
    counts: DiceCounts,
    errors: ErrorSums,
}

/// Accumulates a validation pass target by target.
pub(crate) struct Accumulator {
    targets: Vec<TargetAcc>,
    batches: usize,
}

impl Accumulator {
    pub(crate) fn new(targets: &[TargetConfig]) -> Self {
        let targets = targets
            .iter()
            .map(|t| TargetAcc {
                name: t.name.clone(),
                classes: t.scored_classes(),
                scoring: Scoring::of(t),
                activation: t.activation,
                loss_sum: 0.0,
                counts: DiceCounts::default(),
                errors: ErrorSums::default(),
            })
            .collect();
        Accumulator { targets, batches: 0 }
    }

    pub(crate) fn scoring(&self, t: usize) -> (Scoring, Activation) {
        (self.targets[t].scoring, self.targets[t].activation)
    }

    /// Adds one target of one batch: its unweighted loss, its full-resolution logits (for
    /// segmentation) or prediction after its activation (for regression), and its
    /// full-resolution target.
    pub(crate) fn add(&mut self, t: usize, loss: f64, output: &Tensor, target: &Tensor) -> Result<()> {
        let acc = &mut self.targets[t];
        acc.loss_sum += loss;
        match acc.scoring {
            Scoring::Segmentation(d) => acc.counts.add(d, output, target),
            Scoring::Regression => acc.errors.add(output, target),
        }
        .map_err(|e| e.context(format!("validation metrics of target '{}'", acc.name)))
    }

    pub(crate) fn end_batch(&mut self) {
        self.batches += 1;
    }

    pub(crate) fn finish(self) -> Validation {
        let n = self.batches.max(1) as f64;
        let targets = self
            .targets
            .into_iter()
            .map(|t| TargetMetrics {
                loss: t.loss_sum / n,
                score: match t.scoring {
                    Scoring::Segmentation(_) => Score::Dice(t.counts.dice()),
                    Scoring::Regression => Score::Errors { mse: t.errors.mse(), mae: t.errors.mae() },
                },
                name: t.name,
                classes: t.classes,
            })
            .collect();
        Validation { batches: self.batches, targets }
    }
}
