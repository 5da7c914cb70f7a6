//! The metrics of one case: per label of a label map, or of a regression target's values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::surface;

/// A metric, named in summary.json as nnU-Net's `evaluate_folder` names it where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Metric {
    Dice,
    IoU,
    TP,
    FP,
    FN,
    TN,
    #[serde(rename = "n_pred")]
    NPred,
    #[serde(rename = "n_ref")]
    NRef,
    /// Foreground volume in mm^3.
    #[serde(rename = "volume_pred_mm3")]
    VolumePred,
    #[serde(rename = "volume_ref_mm3")]
    VolumeRef,
    /// 95th-percentile Hausdorff distance in mm.
    #[serde(rename = "HD95")]
    Hd95,
    /// Normalised surface Dice at the tolerance.
    #[serde(rename = "NSD")]
    Nsd,
    #[serde(rename = "MAE")]
    Mae,
    #[serde(rename = "RMSE")]
    Rmse,
    R2,
}

/// Metric values; None where a metric is undefined for the case (Dice of two empty masks, HD95
/// with an empty mask, R^2 of a constant reference): written as null and left out of means.
pub type Scores = BTreeMap<Metric, Option<f64>>;

/// The overlap and surface metrics of `label` in two label maps of `shape`.
pub fn label_scores(
    pred: &[u32],
    reference: &[u32],
    shape: [usize; 3],
    spacing: [f64; 3],
    label: u32,
    tolerance_mm: f64,
) -> Scores {
    let p: Vec<bool> = pred.iter().map(|&v| v == label).collect();
    let r: Vec<bool> = reference.iter().map(|&v| v == label).collect();
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for (&a, &b) in p.iter().zip(&r) {
        match (a, b) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    let tn = p.len() as u64 - tp - fp - fn_;
    let (tp, fp, fn_, tn) = (tp as f64, fp as f64, fn_ as f64, tn as f64);
    let ratio = |num: f64, den: f64| (den > 0.0).then(|| num / den);
    let voxel_mm3: f64 = spacing.iter().product();
    let s = surface::scores(&p, &r, shape, spacing, tolerance_mm);
    BTreeMap::from([
        (Metric::Dice, ratio(2.0 * tp, 2.0 * tp + fp + fn_)),
        (Metric::IoU, ratio(tp, tp + fp + fn_)),
        (Metric::TP, Some(tp)),
        (Metric::FP, Some(fp)),
        (Metric::FN, Some(fn_)),
        (Metric::TN, Some(tn)),
        (Metric::NPred, Some(tp + fp)),
        (Metric::NRef, Some(tp + fn_)),
        (Metric::VolumePred, Some((tp + fp) * voxel_mm3)),
        (Metric::VolumeRef, Some((tp + fn_) * voxel_mm3)),
        (Metric::Hd95, s.hd95),
        (Metric::Nsd, s.nsd),
    ])
}

/// Mean absolute error, root mean square error and the coefficient of determination
/// 1 - SS_res / SS_tot over every value (all voxels and channels), in f64.
pub fn regression_scores(pred: &[f32], reference: &[f32]) -> Scores {
    let n = reference.len() as f64;
    let mean = reference.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut abs, mut sq, mut tot) = (0.0, 0.0, 0.0);
    for (&p, &r) in pred.iter().zip(reference) {
        let e = p as f64 - r as f64;
        abs += e.abs();
        sq += e * e;
        tot += (r as f64 - mean).powi(2);
    }
    BTreeMap::from([
        (Metric::Mae, Some(abs / n)),
        (Metric::Rmse, Some((sq / n).sqrt())),
        (Metric::R2, (tot > 0.0).then(|| 1.0 - sq / tot)),
    ])
}

/// The mean of each metric over the scores that define it (numpy's nanmean); None where none do.
pub fn mean<'a>(all: impl IntoIterator<Item = &'a Scores>) -> Scores {
    let mut sums: BTreeMap<Metric, (f64, usize)> = BTreeMap::new();
    for scores in all {
        for (&m, v) in scores {
            let slot = sums.entry(m).or_insert((0.0, 0));
            if let Some(v) = v {
                *slot = (slot.0 + v, slot.1 + 1);
            }
        }
    }
    sums.into_iter().map(|(m, (s, n))| (m, (n > 0).then(|| s / n as f64))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two 4x4x4 cubes overlapping in 2x4x4 voxels of a 2 mm x 1 mm x 1 mm grid.
    #[test]
    fn overlap_of_shifted_cubes() {
        let shape = [8, 4, 4];
        let cube = |z0: usize| -> Vec<u32> {
            (0..128).map(|i| u32::from(i / 16 >= z0 && i / 16 < z0 + 4) * 3).collect()
        };
        let s = label_scores(&cube(1), &cube(3), shape, [2.0, 1.0, 1.0], 3, 2.0);
        let get = |m| s[&m].unwrap();
        assert_eq!(
            (get(Metric::TP), get(Metric::FP), get(Metric::FN), get(Metric::TN)),
            (32.0, 32.0, 32.0, 32.0)
        );
        assert_eq!(get(Metric::Dice), 0.5);
        assert_eq!(get(Metric::IoU), 1.0 / 3.0);
        assert_eq!(get(Metric::VolumeRef), 64.0 * 2.0);
        // A label absent from both: Dice undefined (nnU-Net's NaN), counts zero.
        let s = label_scores(&cube(1), &cube(3), shape, [1.0; 3], 1, 1.0);
        assert_eq!((s[&Metric::Dice], s[&Metric::TP]), (None, Some(0.0)));
    }

    #[test]
    fn regression_and_means() {
        let s = regression_scores(&[1.0, 2.0, 5.0], &[1.0, 3.0, 2.0]);
        assert_eq!(s[&Metric::Mae], Some(4.0 / 3.0));
        assert_eq!(s[&Metric::Rmse], Some((10.0f64 / 3.0).sqrt()));
        // mean 2, SS_tot = 1 + 1 + 0 = 2, SS_res = 0 + 1 + 9 = 10.
        assert_eq!(s[&Metric::R2], Some(1.0 - 10.0 / 2.0));
        assert_eq!(regression_scores(&[1.0, 1.0], &[2.0, 2.0])[&Metric::R2], None);
        let a = BTreeMap::from([(Metric::Dice, Some(0.5)), (Metric::Hd95, None)]);
        let b = BTreeMap::from([(Metric::Dice, None), (Metric::Hd95, None)]);
        let c = BTreeMap::from([(Metric::Dice, Some(1.0)), (Metric::Hd95, Some(3.0))]);
        let m = mean([&a, &b, &c]);
        assert_eq!((m[&Metric::Dice], m[&Metric::Hd95]), (Some(0.75), Some(3.0)));
        assert_eq!(mean([&a, &b])[&Metric::Hd95], None);
    }
}
