//! nnU-Net's dataset fingerprint (`DatasetFingerprintExtractor`; docs/planning.md) of the
//! training volumes: each case's spacing, shape and shape after cropping to its non-zero region,
//! and the foreground intensities of each input channel, which the planner and CT normalisation
//! read.

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::dataset::Dataset;
use super::volume;
use super::zarr::{ChunkCache, ZarrArray};
use crate::config::DatasetConfig;
use crate::device::cpu::reduce::percentile;

/// nnU-Net pools at most this many foreground intensities over the dataset (10e7), the same
/// share from each case.
const FOREGROUND_SAMPLES: usize = 100_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseFingerprint {
    pub volume: String,
    /// (D, H, W) in mm; None where the volume records none (then 1 mm is assumed).
    pub spacing: Option<[f64; 3]>,
    pub shape: [usize; 3],
    /// The bounding box of the voxels where any input channel is non-zero.
    pub cropped_shape: [usize; 3],
}

/// One input channel's foreground (label > 0) intensities, as nnU-Net summarises them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntensityStats {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub percentile_00_5: f64,
    pub percentile_99_5: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub cases: Vec<CaseFingerprint>,
    /// Per input channel; None for a channel without foreground voxels.
    pub foreground_intensities: Vec<Option<IntensityStats>>,
}

impl Fingerprint {
    /// Reads every training volume whole (input and its `ref_label` target), in parallel.
    pub fn of(config: &DatasetConfig) -> Result<Fingerprint> {
        let cache = ChunkCache::new(256 << 20);
        let dataset = Dataset::open(config, cache.clone())?;
        let share = FOREGROUND_SAMPLES / dataset.volumes.len().max(1);
        let channels = config.in_channels;
        let per_case: Vec<(CaseFingerprint, Vec<Vec<f32>>)> = dataset
            .volumes
            .par_iter()
            .zip(&config.volume_paths)
            .map(|(v, paths)| -> Result<_> {
                let shape = v.input.shape();
                let input = v.input.read([0; 3], shape)?;
                let label = &v.targets[v.ref_label];
                let labels = label.read([0; 3], shape)?;
                let lc = label.channels();
                let array = ZarrArray::open(Path::new(&paths.input), channels, &cache)?;
                let spacing = volume::recorded_geometry(Path::new(&paths.input), &array)?.spacing;
                let mut lo = shape;
                let mut hi = [0usize; 3];
                let mut foreground: Vec<Vec<f32>> = vec![Vec::new(); channels];
                for (i, x) in input.chunks_exact(channels).enumerate() {
                    let at = [i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]];
                    if x.iter().any(|&v| v != 0.0) {
                        for a in 0..3 {
                            lo[a] = lo[a].min(at[a]);
                            hi[a] = hi[a].max(at[a] + 1);
                        }
                    }
                    if labels[i * lc..(i + 1) * lc].iter().any(|&l| l > 0.0) {
                        foreground.iter_mut().zip(x).for_each(|(f, &v)| f.push(v));
                    }
                }
                let cropped_shape = if hi == [0; 3] { shape } else { std::array::from_fn(|a| hi[a] - lo[a]) };
                // An evenly strided share of the case's foreground, where it has more.
                for f in &mut foreground {
                    if f.len() > share {
                        let step = f.len().div_ceil(share);
                        *f = f.iter().step_by(step).copied().collect();
                    }
                }
                Ok((CaseFingerprint { volume: v.name.clone(), spacing, shape, cropped_shape }, foreground))
            })
            .collect::<Result<_>>()
            .context("fingerprinting dataset_config.volume_paths")?;
        let foreground_intensities = (0..channels)
            .map(|c| {
                let pooled: Vec<f64> =
                    per_case.iter().flat_map(|(_, f)| f[c].iter().map(|&v| f64::from(v))).collect();
                stats(&pooled)
            })
            .collect();
        Ok(Fingerprint { cases: per_case.into_iter().map(|(c, _)| c).collect(), foreground_intensities })
    }

    /// The cases' spacings (1 mm where unrecorded) and cropped shapes, for the planner.
    pub fn spacings_and_shapes(&self) -> (Vec<[f64; 3]>, Vec<[usize; 3]>) {
        self.cases.iter().map(|c| (c.spacing.unwrap_or([1.0; 3]), c.cropped_shape)).unzip()
    }
}

fn stats(v: &[f64]) -> Option<IntensityStats> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let mut sorted = v.to_vec();
    Some(IntensityStats {
        mean,
        median: percentile(&mut sorted, 50.0),
        std,
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        percentile_00_5: percentile(&mut sorted, 0.5),
        percentile_99_5: percentile(&mut sorted, 99.5),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_numpys() {
        let s = stats(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        // np.mean, np.std (population), np.percentile(linear) of [1, 2, 3, 4].
        assert_eq!((s.mean, s.median, s.min, s.max), (2.5, 2.5, 1.0, 4.0));
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-15);
        assert!((s.percentile_00_5 - 1.015).abs() < 1e-12 && (s.percentile_99_5 - 3.985).abs() < 1e-12);
        assert_eq!(stats(&[]), None);
    }
}
