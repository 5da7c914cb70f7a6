//! Intensity normalisation per input channel, the same in training and inference (the seed
//! z-scored only at inference). Statistics are computed once, separately from applying them, so
//! that a patch or an inference tile is normalised with the statistics of its whole image.

use anyhow::{Result, bail, ensure};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::array::{DType, VolumeArray};
use super::finite::{NanPolicy, NonFinite};
use super::sampling::{ForegroundIndex, tiles};
use crate::config::Normalization;

/// nnU-Net's lower bound on the standard deviation it divides by.
const MIN_STD: f64 = 1e-8;

/// Tile size of the statistics passes.
const TILE: [usize; 3] = [128, 128, 128];

/// Foreground voxels drawn for the CT statistics over the whole dataset. nnU-Net draws 10^8 (with
/// replacement, `10e7 // num_cases` per case); 10^6 keeps the sample (and the positions picked
/// for it) at tens of MB, and its percentiles' sampling error (~0.01 percentile points) is far
/// below a CT intensity step.
const CT_SAMPLES: u64 = 1_000_000;

/// Mean and population standard deviation (numpy's `std`, as nnU-Net uses).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
}

/// Per-channel statistics of one whole image, for `zscore`. nnU-Net z-scores each image with its
/// own mean and std, so every patch of a volume must use the same (whole-volume) numbers; a
/// per-patch z-score (what the seed's inference did) would give each tile a different mapping
/// and erase the contrast between a dark patch and a bright one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStats {
    pub channels: Vec<MeanStd>,
}

/// Running (count, mean, sum of squared deviations), merged with Chan's formula so the pass can
/// be split over tiles without the cancellation of a plain sum of squares.
#[derive(Clone, Copy, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn merge(self, o: Moments) -> Moments {
        if o.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return o;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        Moments { n, mean: self.mean + d * o.n / n, m2: self.m2 + o.m2 + d * d * self.n * o.n / n }
    }

    fn of(values: impl Iterator<Item = f64>) -> Moments {
        let mut m = Moments::default();
        for x in values {
            m.n += 1.0;
            let d = x - m.mean;
            m.mean += d / m.n;
            m.m2 += d * (x - m.mean);
        }
        m
    }

    fn mean_std(self) -> MeanStd {
        MeanStd { mean: self.mean, std: if self.n > 0.0 { (self.m2 / self.n).sqrt() } else { 0.0 } }
    }
}

impl VolumeStats {
    /// One parallel pass over the whole array, tile by tile. A non-finite value is refused with
    /// its voxel, counted as the replacement, or left out, as `nan` says.
    pub fn compute(array: &dyn VolumeArray, nan: NanPolicy) -> Result<VolumeStats> {
        let c = array.channels();
        let per_tile = tiles(array.shape(), TILE)
            .par_iter()
            .map(|&(start, size)| {
                let v = array.read(start, size)?;
                if nan == NanPolicy::Error
                    && let Some(bad) = NonFinite::first_in(&v, start, size, c)
                {
                    return Err(bad.refuse(array.name()));
                }
                let value = |x: f32| match nan {
                    NanPolicy::Replace(r) if !x.is_finite() => Some(r as f64),
                    _ => x.is_finite().then_some(x as f64),
                };
                Ok((0..c)
                    .map(|ch| Moments::of(v.iter().skip(ch).step_by(c).filter_map(|&x| value(x))))
                    .collect())
            })
            .collect::<Result<Vec<Vec<Moments>>>>()?;
        let channels = (0..c)
            .map(|ch| per_tile.iter().fold(Moments::default(), |acc, t| acc.merge(t[ch])).mean_std())
            .collect();
        Ok(VolumeStats { channels })
    }
}

/// nnU-Net's CT statistics of one channel over the dataset's foreground.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CtChannel {
    pub mean: f64,
    pub std: f64,
    /// 0.5th and 99.5th percentiles (numpy's linear interpolation).
    pub lower: f64,
    pub upper: f64,
}

/// Dataset-wide foreground statistics for `ct` channels; one entry per input channel. Training
/// computes them once; inference needs the same numbers, so they serialise (store them with the
/// checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CtStats {
    pub channels: Vec<CtChannel>,
}

impl CtStats {
    /// From `(input, ref_label)` pairs: foreground voxels (label > 0) drawn uniformly with
    /// replacement, `CT_SAMPLES / volumes` per volume (seed 1234 per volume, as nnU-Net's
    /// fingerprint), and their intensities pooled per channel.
    pub fn compute(volumes: &[(&dyn VolumeArray, &dyn VolumeArray)]) -> Result<CtStats> {
        ensure!(!volumes.is_empty(), "CT normalisation: no training volume to compute statistics on");
        let c = volumes[0].0.channels();
        let per_volume = CT_SAMPLES / volumes.len() as u64;
        let mut pooled: Vec<Vec<f32>> = vec![Vec::new(); c];
        for &(input, label) in volumes {
            ensure!(
                input.shape() == label.shape(),
                "CT normalisation: {} has shape {:?} but its label {} has {:?}",
                input.name(),
                input.shape(),
                label.name(),
                label.shape()
            );
            let index = ForegroundIndex::scan(label)?;
            let n: u64 = index.classes().values().sum();
            if n == 0 {
                continue;
            }
            let mut rng = StdRng::seed_from_u64(1234);
            let mut ranks: Vec<u64> =
                (0..per_volume).map(|_| rand::Rng::random_range(&mut rng, 0..n)).collect();
            ranks.sort_unstable();
            let picked = index.pick(label, None, &ranks)?;
            let values = picked
                .par_iter()
                .map(|((start, size), voxels)| {
                    let v = input.read(*start, *size)?;
                    let at = |p: &[usize; 3]| {
                        (((p[0] - start[0]) * size[1] + p[1] - start[1]) * size[2] + p[2] - start[2]) * c
                    };
                    Ok(voxels.iter().flat_map(|p| v[at(p)..at(p) + c].to_vec()).collect::<Vec<f32>>())
                })
                .collect::<Result<Vec<_>>>()?;
            for v in values {
                for (i, x) in v.into_iter().enumerate() {
                    pooled[i % c].push(x);
                }
            }
        }
        if pooled[0].is_empty() {
            let names: Vec<&str> = volumes.iter().map(|v| v.1.name()).collect();
            bail!("CT normalisation: no foreground voxel (label > 0) in any of {}", names.join(", "));
        }
        let channels = pooled
            .into_iter()
            .map(|mut v| {
                v.sort_unstable_by(f32::total_cmp);
                let MeanStd { mean, std } = Moments::of(v.iter().map(|&x| x as f64)).mean_std();
                CtChannel { mean, std, lower: percentile(&v, 0.5), upper: percentile(&v, 99.5) }
            })
            .collect();
        Ok(CtStats { channels })
    }
}

/// numpy's default (linear) percentile of sorted values.
fn percentile(sorted: &[f32], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let f = rank - lo as f64;
    sorted[lo] as f64 * (1.0 - f) + sorted[hi] as f64 * f
}

/// x -> (clamp(x, lo, hi) - shift) * scale: every scheme is one of these per channel.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Affine {
    lo: f32,
    hi: f32,
    shift: f64,
    scale: f64,
}

/// The normalisation of one volume's input channels, built once per volume and applied to any of
/// its patches or tiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalizer {
    channels: Vec<Affine>,
    /// What a non-finite stored value is read as (`nan_policy: replace`).
    replace_non_finite: Option<f32>,
}

impl Normalizer {
    /// `volume` is needed by `zscore` channels, `ct` by `ct` channels; errors say which is missing.
    pub fn new(
        schemes: &[Normalization],
        dtype: DType,
        volume: Option<&VolumeStats>,
        ct: Option<&CtStats>,
    ) -> Result<Normalizer> {
        let channel = |i: usize, s: &Normalization| -> Result<Affine> {
            let all = Affine { lo: f32::NEG_INFINITY, hi: f32::INFINITY, shift: 0.0, scale: 1.0 };
            let stats =
                |n: usize, what: &str| format!("normalisation of input channel {i}: {what} has {n} channels");
            Ok(match s {
                Normalization::None => all,
                Normalization::ScaleToUnit => Affine { scale: 1.0 / dtype.unit_scale() as f64, ..all },
                Normalization::ZScore => {
                    let Some(v) = volume else {
                        bail!("normalisation of input channel {i}: zscore needs the volume's statistics")
                    };
                    let m = v
                        .channels
                        .get(i)
                        .ok_or_else(|| anyhow::anyhow!(stats(v.channels.len(), "the volume")))?;
                    Affine { shift: m.mean, scale: 1.0 / m.std.max(MIN_STD), ..all }
                }
                Normalization::Ct => {
                    let Some(ct) = ct else {
                        bail!("normalisation of input channel {i}: ct needs the dataset's CT statistics")
                    };
                    let m = ct
                        .channels
                        .get(i)
                        .ok_or_else(|| anyhow::anyhow!(stats(ct.channels.len(), "the CT statistics")))?;
                    Affine {
                        lo: m.lower as f32,
                        hi: m.upper as f32,
                        shift: m.mean,
                        scale: 1.0 / m.std.max(MIN_STD),
                    }
                }
            })
        };
        let channels = schemes.iter().enumerate().map(|(i, s)| channel(i, s)).collect::<Result<_>>()?;
        Ok(Normalizer { channels, replace_non_finite: None })
    }

    /// Reads non-finite stored values as `nan_policy` says before normalising them.
    pub fn with_nan_policy(self, nan: NanPolicy) -> Normalizer {
        let replace_non_finite = match nan {
            NanPolicy::Replace(v) => Some(v),
            NanPolicy::Error | NanPolicy::SkipPatch => None,
        };
        Normalizer { replace_non_finite, ..self }
    }

    /// Whether any channel needs [`VolumeStats`] (a pass over the whole volume).
    pub fn needs_volume_stats(schemes: &[Normalization]) -> bool {
        schemes.contains(&Normalization::ZScore)
    }

    /// The normaliser of `input`, computing its statistics when a scheme needs them.
    pub fn for_volume(
        input: &dyn VolumeArray,
        schemes: &[Normalization],
        ct: Option<&CtStats>,
        nan: NanPolicy,
    ) -> Result<Normalizer> {
        ensure!(
            schemes.len() == input.channels(),
            "{}: {} channels but {} normalisation schemes",
            input.name(),
            input.channels(),
            schemes.len()
        );
        let stats =
            if Self::needs_volume_stats(schemes) { Some(VolumeStats::compute(input, nan)?) } else { None };
        Ok(Normalizer::new(schemes, input.dtype(), stats.as_ref(), ct)?.with_nan_policy(nan))
    }

    /// Normalises channels-last values in place.
    pub fn apply(&self, values: &mut [f32]) -> Result<()> {
        let c = self.channels.len();
        ensure!(
            c > 0 && values.len().is_multiple_of(c),
            "normalisation: {} values are not a whole number of {c}-channel voxels",
            values.len()
        );
        if let Some(r) = self.replace_non_finite {
            values.iter_mut().filter(|x| !x.is_finite()).for_each(|x| *x = r);
        }
        let map = |x: &mut f32, a: &Affine| *x = ((x.clamp(a.lo, a.hi) as f64 - a.shift) * a.scale) as f32;
        if let [a] = self.channels.as_slice() {
            // The common single-channel case as one contiguous (vectorisable) loop.
            values.iter_mut().for_each(|x| map(x, a));
        } else {
            for voxel in values.chunks_exact_mut(c) {
                voxel.iter_mut().zip(&self.channels).for_each(|(x, a)| map(x, a));
            }
        }
        Ok(())
    }
}

/// Normalisation, the same in training and inference: channels-last values of one image in place,
/// with the image's statistics (`zscore`) and the dataset's (`ct`) where the schemes need them.
pub fn normalize(
    values: &mut [f32],
    channels: usize,
    schemes: &[Normalization],
    dtype: DType,
    volume: Option<&VolumeStats>,
    ct: Option<&CtStats>,
) -> Result<()> {
    ensure!(schemes.len() == channels, "normalisation: {channels} channels but {} schemes", schemes.len());
    Normalizer::new(schemes, dtype, volume, ct)?.apply(values)
}
