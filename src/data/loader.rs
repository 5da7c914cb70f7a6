//! The threaded loader: worker threads build whole batches (read, normalise, augment, batch,
//! deep-supervision targets) ahead of the training step into bounded queues.
//!
//! Batch `k` is a pure function of (seed, k): it draws from its own RNG seeded from both, so the
//! stream is identical with 0, 1 or 8 workers and a run resumed at batch `k` continues exactly.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::array::{DType, VolumeArray};
use super::augment::Augmenter;
use super::batch::{Batch, Patch, PatchTarget, TargetBatch, TargetKind};
use super::dataset::Dataset;
use super::dilate::{RADIUS, dilate_labels};
use super::finite::{self, NanPolicy, voxel_of};
use super::normalize::{CtStats, Normalizer};
use super::sampling::{ForegroundLocations, PatchPosition, PatchSearch, random_start, split_patches};
use crate::config::{Augmentation, Config, DatasetConfig, Normalization, Sampling, TargetConfig};
use crate::loss::{LabelResample, Loss, deep_supervision_labels};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub patch_size: [usize; 3],
    pub batch_size: usize,
    /// Threads building batches; 0 builds them in the calling thread on demand.
    pub workers: usize,
    /// Ready batches held ahead of the consumer (over all workers).
    pub prefetch: usize,
    /// None = validation (no augmentation).
    pub augmentation: Option<Augmentation>,
    /// The architecture's per-stage strides when it has deep supervision; empty (or a single
    /// stage) = full resolution only.
    pub deep_supervision_strides: Vec<[usize; 3]>,
    pub seed: u64,
    /// With a single volume the patch list itself is split (the seed's behaviour): the training
    /// and validation loaders must be given the same `tr_val_split` and `split_seed`.
    pub tr_val_split: f64,
    pub split_seed: u64,
    /// Index of the first training batch served: a run resumed at global step s passes s and
    /// continues with exactly the batches it would have seen. Validation always starts its list.
    pub first_batch: u64,
    /// tr_setup.dilate_label: label targets (masks and class maps) are grown by a radius-5 ball
    /// before augmentation ([`super::dilate`]). The seed dilated the patch alone and binarized
    /// every non-normals target; here the labels up to 5 voxels outside the patch count (the same
    /// as dilating the whole volume), class maps keep their classes (grey dilation: the highest
    /// class within the ball wins; a 0/1 map is dilated exactly as the seed did), and regression
    /// and vector targets are left alone (binarizing a distance map would destroy it).
    pub dilate_label: bool,
}

impl LoaderOptions {
    /// The options `config` asks for: tr_config's patch, batch and workers, its augmentation when
    /// `training` (and enabled), tr_setup's seed, split and
    /// dilate_label; two batches per worker prefetched.
    pub fn from_config(config: &Config, deep_supervision_strides: Vec<[usize; 3]>, training: bool) -> Self {
        let tr = &config.tr_config;
        let augmentation = (training && tr.augmentation.enabled).then(|| tr.augmentation.clone());
        LoaderOptions {
            patch_size: tr.patch_size,
            batch_size: tr.batch_size,
            workers: tr.num_dataloader_workers,
            prefetch: 2 * tr.num_dataloader_workers.max(1),
            augmentation,
            deep_supervision_strides,
            seed: config.tr_setup.seed,
            tr_val_split: config.tr_setup.tr_val_split,
            split_seed: config.tr_setup.seed,
            first_batch: 0,
            dilate_label: config.tr_setup.dilate_label,
        }
    }
}

/// Under `nan_policy: skip_patch`, the draws a sample gets before its volume is declared mostly
/// non-finite.
const MAX_REDRAWS: u64 = 64;

/// One patch to read: its volume and the start of its source box (may reach outside the volume).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    volume: usize,
    start: [isize; 3],
}

/// Where batches come from.
enum Plan {
    /// The seed's patch list; training walks a fresh seeded permutation of it every pass, like the
    /// seed's shuffled sampler.
    Patches(Vec<PatchPosition>),
    /// nnU-Net's random positions in `volumes`, the last `oversample` of each batch on foreground.
    Random { volumes: Vec<usize>, foreground: BTreeMap<usize, ForegroundLocations>, oversample: f64 },
    /// Validation: a fixed list of batches.
    Fixed(Vec<Vec<Sample>>),
}

/// How each target's stored values become training targets.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TargetValues {
    /// Class indices in 0..n (Dice + CE, CE with n output channels): as stored.
    Classes(usize),
    /// Binary masks (BCE family): > 0 is 1, so 0/1 and 0/255 masks both work (the seed divided by
    /// 255, which turns a 0/1 mask into 0/0.004).
    Mask,
    /// The seed's dtype scaling to [0, 1]: uint8 / 255, uint16 / 65535, others as stored.
    Scaled(f32),
    /// The seed's normals: uint16 x / 32767.5 - 1 (uint8 x / 127.5 - 1) to [-1, 1]; floats as stored.
    Vectors(Option<f32>),
}

impl TargetValues {
    fn of(target: &TargetConfig, dtype: DType) -> TargetValues {
        match TargetKind::of(target) {
            TargetKind::Labels => match target.loss {
                Loss::DiceCe(_) | Loss::CrossEntropy(_) => TargetValues::Classes(target.channels),
                _ => TargetValues::Mask,
            },
            TargetKind::Values => TargetValues::Scaled(dtype.unit_scale()),
            TargetKind::Vectors => TargetValues::Vectors(match dtype {
                DType::U8 | DType::U16 => Some(dtype.unit_scale() / 2.0),
                DType::I16 | DType::F32 | DType::F16 => None,
            }),
        }
    }

    /// Converts stored values in place, after checking that each is one this kind of target can
    /// hold: a class index, a mask value (0, 1 or the dtype's full scale), or a finite value.
    /// Returns the first offender (its index in `values`) and what was allowed.
    fn apply(self, values: &mut [f32], full_scale: f32) -> Result<(), (usize, String)> {
        let check = |ok: &dyn Fn(f32) -> bool, allowed: String| match values.iter().position(|&x| !ok(x)) {
            Some(i) => Err((i, allowed)),
            None => Ok(()),
        };
        match self {
            TargetValues::Classes(n) => {
                check(&|x| x.fract() == 0.0 && x >= 0.0 && x < n as f32, format!("a class index in 0..{n}"))
            }
            TargetValues::Mask => {
                check(
                    &|x| x == 0.0 || x == 1.0 || x == full_scale,
                    format!("a mask value (0, 1 or {full_scale})"),
                )?;
                values.iter_mut().for_each(|x| *x = f32::from(*x > 0.0));
                Ok(())
            }
            TargetValues::Scaled(s) => {
                check(&|x: f32| x.is_finite(), "a finite value".into())?;
                values.iter_mut().for_each(|x| *x /= s);
                Ok(())
            }
            TargetValues::Vectors(half) => {
                check(&|x: f32| x.is_finite(), "a finite value".into())?;
                if let Some(half) = half {
                    values.iter_mut().for_each(|x| *x = *x / half - 1.0);
                }
                Ok(())
            }
        }
    }
}

/// Which patches batch k holds.
struct Sampler {
    plan: Plan,
    /// Volume shapes, for random positions.
    shapes: Vec<[usize; 3]>,
    patch: [usize; 3],
    source: [usize; 3],
    batch_size: usize,
    seed: u64,
}

/// Everything the workers share.
struct Source {
    dataset: Arc<Dataset>,
    sampler: Sampler,
    /// Per target: its kind; per volume and target: the value conversion (dtypes may differ
    /// between volumes).
    kinds: Vec<TargetKind>,
    values: Vec<Vec<TargetValues>>,
    normalizers: BTreeMap<usize, Normalizer>,
    nan: NanPolicy,
    /// Under `nan_policy: skip_patch`, the volumes that hold a non-finite value somewhere.
    non_finite: HashSet<usize>,
    augmenter: Option<Augmenter>,
    strides: Vec<[usize; 3]>,
    /// Per target: whether it is dilated.
    dilate: Vec<bool>,
}

/// splitmix64's finaliser: decorrelates nearby seeds and batch indices.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn batch_rng(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(mix(seed ^ mix(index)))
}

/// A worker's permutation of the patch list for the current pass (recomputed when a batch
/// starts a new pass).
type PassOrder = Option<(u64, Vec<u32>)>;

impl Sampler {
    /// Where a final patch at `start` puts its source box: the augmenter centre-crops at
    /// floor(S / 2) - floor(s / 2), so the box starts that much earlier.
    fn source_start(&self, start: [usize; 3]) -> [isize; 3] {
        [0, 1, 2].map(|a| start[a] as isize - (self.source[a] / 2 - self.patch[a] / 2) as isize)
    }

    /// Sample `j` of a batch drawn as nnU-Net does: a uniformly chosen volume, and the sample forced
    /// onto foreground iff j >= round(B (1 - oversample)) (Python rounds half to even).
    fn random_sample(
        &self,
        j: usize,
        volumes: &[usize],
        foreground: &BTreeMap<usize, ForegroundLocations>,
        oversample: f64,
        rng: &mut StdRng,
    ) -> Result<Sample> {
        let forced = j as f64 >= (self.batch_size as f64 * (1.0 - oversample)).round_ties_even();
        let volume = *volumes.choose(rng).context("no volume to sample from")?;
        let fg = if forced { foreground[&volume].sample(rng) } else { None };
        Ok(Sample { volume, start: random_start(self.shapes[volume], self.source, self.patch, fg, rng) })
    }

    fn samples(&self, index: u64, rng: &mut StdRng, order: &mut PassOrder) -> Result<Vec<Sample>> {
        match &self.plan {
            Plan::Fixed(batches) => Ok(batches[(index % batches.len() as u64) as usize].clone()),
            Plan::Random { volumes, foreground, oversample } => (0..self.batch_size)
                .map(|j| self.random_sample(j, volumes, foreground, *oversample, rng))
                .collect(),
            Plan::Patches(patches) => {
                let n = patches.len() as u64;
                (0..self.batch_size as u64)
                    .map(|j| {
                        let k = index * self.batch_size as u64 + j;
                        let pass = k / n;
                        if order.as_ref().is_none_or(|o| o.0 != pass) {
                            let mut perm: Vec<u32> = (0..n as u32).collect();
                            perm.shuffle(&mut batch_rng(self.seed ^ 0x9a55, pass));
                            *order = Some((pass, perm));
                        }
                        let p = patches[order.as_ref().map_or(0, |o| o.1[(k % n) as usize]) as usize];
                        Ok(Sample { volume: p.volume, start: self.source_start(p.start) })
                    })
                    .collect()
            }
        }
    }
}

impl Source {
    /// The source box of one sample: input normalised (then padded with 0), targets checked,
    /// converted and dilated if asked (then padded with 0). None when `nan_policy: skip_patch`
    /// skips it (it holds a non-finite value).
    fn read(&self, s: Sample) -> Result<Option<Patch>> {
        let v = &self.dataset.volumes[s.volume];
        let norm = &self.normalizers[&s.volume];
        let size = self.sampler.source;
        let watch = self.nan == NanPolicy::SkipPatch && self.non_finite.contains(&s.volume);
        let tainted = std::cell::Cell::new(false);
        let skip = |x: &[f32]| {
            let bad = watch && x.iter().any(|x| !x.is_finite());
            tainted.set(tainted.get() || bad);
            bad
        };
        let input = read_padded(v.input.as_ref(), s.start, size, 0, |x, _, _| {
            skip(x);
            norm.apply(x)
        })?;
        let targets = (v.targets.iter().zip(&self.kinds))
            .zip(self.values[s.volume].iter().zip(&self.dilate))
            .map(|((t, &kind), (&conv, &dilate))| {
                let c = t.channels();
                let margin = if dilate { RADIUS } else { 0 };
                let data = read_padded(t.as_ref(), s.start, size, margin, |x, lo, shape| {
                    if let NanPolicy::Replace(r) = self.nan {
                        x.iter_mut().filter(|x| !x.is_finite()).for_each(|x| *x = r);
                    }
                    if skip(x) {
                        return Ok(());
                    }
                    // The check comes before any conversion, so x[i] is the stored value.
                    if let Err((i, allowed)) = conv.apply(x, t.dtype().unit_scale()) {
                        let (voxel, channel) = voxel_of(i, lo, shape, c);
                        bail!(
                            "{}: value {} at voxel [z, y, x] = {voxel:?}, channel {channel} is not {allowed}",
                            t.name(),
                            x[i]
                        );
                    }
                    if dilate {
                        dilate_labels(x, shape, c);
                    }
                    Ok(())
                })?;
                Ok(PatchTarget { data, channels: c, kind })
            })
            .collect::<Result<_>>()?;
        let patch = Patch { size: self.sampler.source, input, in_channels: v.input.channels(), targets };
        Ok((!tainted.get()).then_some(patch))
    }

    /// Sample `j` of batch `index`, drawn again while `nan_policy: skip_patch` skips it (each
    /// redraw seeded by the batch, sample and attempt): another patch of the patch search's list,
    /// or a random position in the same volume.
    fn read_drawn(&self, mut s: Sample, index: u64, j: usize) -> Result<(Sample, Patch)> {
        let sm = &self.sampler;
        for attempt in 0..=MAX_REDRAWS {
            if let Some(p) = self.read(s)? {
                return Ok((s, p));
            }
            let mut rng = batch_rng(sm.seed ^ 0x5eed_5c1f, mix(index) ^ mix(((j as u64) << 16) | attempt));
            s = match &sm.plan {
                Plan::Patches(patches) => {
                    let p = patches[rng.random_range(0..patches.len())];
                    Sample { volume: p.volume, start: sm.source_start(p.start) }
                }
                Plan::Random { .. } | Plan::Fixed(_) => Sample {
                    volume: s.volume,
                    start: random_start(sm.shapes[s.volume], sm.source, sm.patch, None, &mut rng),
                },
            };
        }
        bail!(
            "{MAX_REDRAWS} patches in a row hold NaN or infinity (dataset_config.nan_policy: \
             skip_patch); mask the volume or use nan_policy: replace"
        )
    }

    fn batch(&self, index: u64, order: &mut PassOrder) -> Result<Batch> {
        let sm = &self.sampler;
        let mut rng = batch_rng(sm.seed, index);
        let samples = sm.samples(index, &mut rng, order)?;
        let mut patches = Vec::with_capacity(samples.len());
        let mut origins = Vec::with_capacity(samples.len());
        for (j, s) in samples.iter().enumerate() {
            let name = &self.dataset.volumes[s.volume].name;
            let (s, mut p) = self
                .read_drawn(*s, index, j)
                .with_context(|| format!("volume {name}: reading a patch at {:?}", s.start))?;
            if let Some(aug) = &self.augmenter {
                p = aug.apply(p, &mut rng).with_context(|| format!("volume {name}: augmenting a patch"))?;
            }
            let offset = sm.source_start([0; 3]);
            origins.push((s.volume, [0, 1, 2].map(|a| (s.start[a] - offset[a]).max(0) as usize)));
            patches.push(p);
        }
        assemble(&patches, sm.patch, &self.strides, origins)
    }
}

/// Whether a volume's float arrays hold a non-finite value, for `nan_policy` (integer arrays
/// cannot): an error naming the array and voxel under `error`, true under `skip_patch` (its patches
/// are then checked), and no pass under `replace`. A `zscore` input was already checked by its
/// statistics pass under `error`.
fn non_finite(vol: &super::dataset::Volume, nan: NanPolicy, input_checked: bool) -> Result<bool> {
    if let NanPolicy::Replace(_) = nan {
        return Ok(false);
    }
    let input = (!(input_checked && nan == NanPolicy::Error)).then_some(vol.input.as_ref());
    for array in input.into_iter().chain(vol.targets.iter().map(|t| t.as_ref())) {
        if let Some(bad) = finite::scan(array)? {
            if nan == NanPolicy::Error {
                return Err(bad.refuse(array.name()));
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads the `size` box at `start` of `array`, channels-last; the part inside the array, grown
/// by `margin` voxels on every side (clamped to the array), goes through `convert` (given that
/// box's first voxel and shape) before the part outside is filled with 0. The margin gives `convert` the
/// neighbourhood a patch-border voxel depends on, so a patch equals the whole converted volume
/// cropped. nnU-Net pads the same way: images with 0 after its (preprocessing-time)
/// normalisation, segmentations with -1, which its `RemoveLabelTansform(-1, 0)` turns into 0
/// after augmentation; padding labels with 0 directly differs only in that the padded area is not
/// a label of its own during the rotation's label interpolation.
fn read_padded(
    array: &dyn VolumeArray,
    start: [isize; 3],
    size: [usize; 3],
    margin: usize,
    convert: impl FnOnce(&mut [f32], [usize; 3], [usize; 3]) -> Result<()>,
) -> Result<Vec<f32>> {
    let shape = array.shape();
    let c = array.channels();
    let clamp = |a: usize, x: isize| x.clamp(0, shape[a] as isize) as usize;
    let m = margin as isize;
    let lo = [0, 1, 2].map(|a| clamp(a, start[a]));
    let hi = [0, 1, 2].map(|a| clamp(a, start[a] + size[a] as isize));
    let inner = [0, 1, 2].map(|a| hi[a] - lo[a]);
    let mut out = vec![0.0; size.iter().product::<usize>() * c];
    if inner.contains(&0) {
        return Ok(out);
    }
    let read_lo = [0, 1, 2].map(|a| clamp(a, start[a] - m));
    let read_size = [0, 1, 2].map(|a| clamp(a, start[a] + size[a] as isize + m) - read_lo[a]);
    let mut v = array.read(read_lo, read_size)?;
    convert(&mut v, read_lo, read_size)?;
    if margin == 0 && inner == size {
        return Ok(v);
    }
    // Rows of the part inside the array, from their place in the read box to theirs in the patch.
    let (from, to) =
        ([0, 1, 2].map(|a| lo[a] - read_lo[a]), [0, 1, 2].map(|a| (lo[a] as isize - start[a]) as usize));
    let row = inner[2] * c;
    for z in 0..inner[0] {
        for y in 0..inner[1] {
            let src = (((z + from[0]) * read_size[1] + y + from[1]) * read_size[2] + from[2]) * c;
            let dst = (((z + to[0]) * size[1] + y + to[1]) * size[2] + to[2]) * c;
            out[dst..dst + row].copy_from_slice(&v[src..src + row]);
        }
    }
    Ok(out)
}

/// The spatial size of each deep-supervision output, as `loss::deep_supervision_labels` makes
/// them: `round(size / prod(strides[..=i]))`, one per stage but the last.
fn deep_supervision_sizes(size: [usize; 3], strides: &[[usize; 3]]) -> Vec<[usize; 3]> {
    let mut cum = [1usize; 3];
    strides[..strides.len().saturating_sub(1)]
        .iter()
        .map(|s| {
            (0..3).for_each(|a| cum[a] *= s[a]);
            [0, 1, 2].map(|a| (size[a] as f64 / cum[a] as f64).round_ties_even() as usize)
        })
        .collect()
}

/// Area averaging (PyTorch `interpolate(mode='area')`, i.e. adaptive average pooling) of an
/// (N, D, H, W, C) tensor to spatial `size`: output voxel i averages source voxels
/// floor(i * in / out) .. ceil((i + 1) * in / out). Regression and vector targets are shrunk this way
/// for the deep-supervision outputs, where nearest sampling would alias. The box mean is the
/// product of per-axis means, so it runs as three 1-D passes.
pub fn area_downsample(t: &Tensor, size: [usize; 3]) -> Result<Tensor> {
    let d = t.dims();
    ensure!(d.len() == 5, "area downsampling needs an (N, D, H, W, C) tensor, got {}", t.shape());
    ensure!(
        size.iter().zip(&d[1..4]).all(|(&o, &i)| o > 0 && o <= i),
        "area downsampling of {} to {size:?}: sizes must be positive and not larger",
        t.shape()
    );
    let mut dims = [d[0], d[1], d[2], d[3], d[4]];
    if dims[1..4] == size {
        return Ok(t.clone());
    }
    let mut data = t.data().to_vec();
    for axis in 1..4 {
        if dims[axis] != size[axis - 1] {
            data = area_axis(&data, dims, axis, size[axis - 1]);
            dims[axis] = size[axis - 1];
        }
    }
    Tensor::from_vec(dims.to_vec(), data)
}

/// One 1-D pass of [`area_downsample`] along `axis` of a row-major buffer of `dims`.
fn area_axis(src: &[f32], dims: [usize; 5], axis: usize, out_len: usize) -> Vec<f32> {
    let len = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let outer: usize = dims[..axis].iter().product();
    let mut out = vec![0f32; outer * out_len * inner];
    let mut acc = vec![0f64; inner];
    for o in 0..outer {
        for i in 0..out_len {
            let (r0, r1) = (i * len / out_len, ((i + 1) * len).div_ceil(out_len));
            acc.iter_mut().for_each(|a| *a = 0.0);
            for r in r0..r1 {
                let row = &src[(o * len + r) * inner..][..inner];
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
            }
            let n = (r1 - r0) as f64;
            let dst = &mut out[(o * out_len + i) * inner..][..inner];
            dst.iter_mut().zip(&acc).for_each(|(d, a)| *d = (a / n) as f32);
        }
    }
    out
}

/// Stacks patches into a batch with every target at every deep-supervision scale.
fn assemble(
    patches: &[Patch],
    patch: [usize; 3],
    strides: &[[usize; 3]],
    origins: Vec<(usize, [usize; 3])>,
) -> Result<Batch> {
    let n = patches.len();
    let [d, h, w] = patch;
    let stack = |parts: Vec<&[f32]>, c: usize| -> Result<Tensor> {
        Tensor::from_vec([n, d, h, w, c], parts.concat())
    };
    ensure!(patches.iter().all(|p| p.size == patch), "augmented patches must have the patch size {patch:?}");
    let first = &patches[0];
    let input = stack(patches.iter().map(|p| p.input.as_slice()).collect(), first.in_channels)?;
    let targets = (0..first.targets.len())
        .map(|t| {
            let (c, kind) = (first.targets[t].channels, first.targets[t].kind);
            let full = stack(patches.iter().map(|p| p.targets[t].data.as_slice()).collect(), c)?;
            let scales = match kind {
                _ if strides.len() < 2 => vec![full],
                TargetKind::Labels => deep_supervision_labels(&full, strides, LabelResample::NearestExact)?,
                TargetKind::Values | TargetKind::Vectors => {
                    // Each scale from the previous one where the sizes divide exactly (the same
                    // means, a fraction of the work), else from full resolution.
                    let mut scales: Vec<Tensor> = Vec::new();
                    for size in deep_supervision_sizes(patch, strides) {
                        let from = scales
                            .last()
                            .filter(|p| (0..3).all(|a| p.dims()[a + 1].is_multiple_of(size[a])))
                            .unwrap_or(&full);
                        let next = area_downsample(from, size)?;
                        scales.push(next);
                    }
                    scales
                }
            };
            Ok(TargetBatch { name: String::new(), scales })
        })
        .collect::<Result<_>>()?;
    Ok(Batch { input, targets, origins })
}

/// Worker threads filling bounded queues of ready batches.
///
/// Worker `w` of `W` builds batches w, w + W, ... into its own queue of `ceil(prefetch / W)`, and
/// the consumer takes batch k from queue k mod W: the order is the batch order whatever the thread
/// timing, and no worker can run ahead of a slow one by more than its queue (one shared queue
/// would need an unbounded reorder buffer for that).
pub struct Loader {
    source: Arc<Source>,
    queues: Vec<Receiver<Result<Batch>>>,
    workers: Vec<JoinHandle<()>>,
    /// The inline (0 workers) pass order.
    order: PassOrder,
    /// The first batch index; batch k comes from queue (k - first) mod W.
    first: u64,
    next: u64,
    /// Validation: batches per pass, and those served in this pass.
    pass: Option<(u64, u64)>,
    names: Vec<String>,
    ct: Option<CtStats>,
}

impl Loader {
    /// Endless stream of augmented batches from `volumes` (indices into dataset.volumes),
    /// sampled per dataset_config.sampling.
    pub fn train(
        dataset: Arc<Dataset>,
        config: &DatasetConfig,
        volumes: &[usize],
        opts: LoaderOptions,
    ) -> Result<Loader> {
        Loader::build(dataset, config, volumes, opts, None)
    }

    /// The same fixed, seeded list of un-augmented patches every epoch (`max_batches` batches);
    /// next_batch gives None after each pass. With random sampling the list is drawn once with
    /// the training sampler (foreground oversampling included).
    pub fn validation(
        dataset: Arc<Dataset>,
        config: &DatasetConfig,
        volumes: &[usize],
        mut opts: LoaderOptions,
        max_batches: usize,
    ) -> Result<Loader> {
        opts.augmentation = None;
        Loader::build(dataset, config, volumes, opts, Some(max_batches))
    }

    /// The dataset's CT statistics when a channel is normalised with `ct` (store them with the
    /// model: inference needs the same numbers).
    pub fn ct_stats(&self) -> Option<&CtStats> {
        self.ct.as_ref()
    }

    fn build(
        dataset: Arc<Dataset>,
        config: &DatasetConfig,
        volumes: &[usize],
        opts: LoaderOptions,
        validation: Option<usize>,
    ) -> Result<Loader> {
        ensure!(opts.batch_size > 0, "loader: batch size must be positive");
        ensure!(
            opts.patch_size.iter().all(|&p| p > 0),
            "loader: patch size {:?} must be positive",
            opts.patch_size
        );
        let n_volumes = dataset.volumes.len();
        if let Some(&v) = volumes.iter().find(|&&v| v >= n_volumes) {
            bail!("loader: volume index {v} but the dataset has {n_volumes} volumes");
        }
        ensure!(!volumes.is_empty() || validation.is_some(), "loader: no training volume");
        let augmenter = opts.augmentation.as_ref().map(|a| Augmenter::new(a, opts.patch_size));
        let source = augmenter.as_ref().map_or(opts.patch_size, |a| a.source_size());
        let ct = if config.normalization.contains(&Normalization::Ct) {
            // nnU-Net's fingerprint covers every training case, so validation uses the same numbers.
            let pairs: Vec<(&dyn VolumeArray, &dyn VolumeArray)> =
                dataset.volumes.iter().map(|v| (v.input.as_ref(), v.targets[v.ref_label].as_ref())).collect();
            Some(CtStats::compute(&pairs)?)
        } else {
            None
        };
        let nan = config.nan_policy;
        let checked = volumes
            .par_iter()
            .map(|&v| {
                let vol = &dataset.volumes[v];
                let n = Normalizer::for_volume(vol.input.as_ref(), &config.normalization, ct.as_ref(), nan)
                    .with_context(|| format!("volume {}", vol.name))?;
                let found = non_finite(vol, nan, Normalizer::needs_volume_stats(&config.normalization))
                    .with_context(|| format!("volume {}", vol.name))?;
                Ok(((v, n), found.then_some(v)))
            })
            .collect::<Result<Vec<_>>>()?;
        let non_finite: HashSet<usize> = checked.iter().filter_map(|(_, f)| *f).collect();
        let normalizers: BTreeMap<usize, Normalizer> = checked.into_iter().map(|(n, _)| n).collect();
        let values = dataset
            .volumes
            .iter()
            .map(|v| {
                config.targets.iter().zip(&v.targets).map(|(t, a)| TargetValues::of(t, a.dtype())).collect()
            })
            .collect();
        let mut sampler = Sampler {
            plan: plan(&dataset, config, volumes, &opts, validation.is_some())?,
            shapes: dataset.volumes.iter().map(|v| v.input.shape()).collect(),
            patch: opts.patch_size,
            source,
            batch_size: opts.batch_size,
            seed: opts.seed,
        };
        if let Some(max_batches) = validation {
            sampler.plan = Plan::Fixed(sampler.fixed_batches(max_batches)?);
        }
        let pass = match &sampler.plan {
            Plan::Fixed(b) => Some((b.len() as u64, 0)),
            _ => None,
        };
        let src = Arc::new(Source {
            dataset,
            sampler,
            kinds: config.targets.iter().map(TargetKind::of).collect(),
            values,
            normalizers,
            nan,
            non_finite,
            augmenter,
            strides: opts.deep_supervision_strides.clone(),
            dilate: config
                .targets
                .iter()
                .map(|t| opts.dilate_label && TargetKind::of(t) == TargetKind::Labels)
                .collect(),
        });
        let workers = if pass == Some((0, 0)) { 0 } else { opts.workers };
        let first = if pass.is_some() { 0 } else { opts.first_batch };
        let capacity = opts.prefetch.div_ceil(workers.max(1)).max(1);
        let (mut queues, mut handles) = (Vec::new(), Vec::new());
        for w in 0..workers {
            let (tx, rx) = sync_channel(capacity);
            let s = Arc::clone(&src);
            let spawned = std::thread::Builder::new()
                .name(format!("loader-{w}"))
                .spawn(move || work(&s, first + w as u64, workers as u64, tx))
                .context("starting a loader thread")?;
            queues.push(rx);
            handles.push(spawned);
        }
        Ok(Loader {
            source: src,
            queues,
            workers: handles,
            order: None,
            first,
            next: first,
            pass,
            names: config.targets.iter().map(|t| t.name.clone()).collect(),
            ct,
        })
    }

    /// The next batch; None only at the end of a validation pass (the next call starts the same
    /// list again). Errors from the workers arrive here, naming the volume.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if let Some((len, served)) = &mut self.pass {
            if *served == *len {
                *served = 0;
                return Ok(None);
            }
            *served += 1;
        }
        let k = self.next;
        self.next += 1;
        let mut batch = if self.queues.is_empty() {
            self.source.batch(k, &mut self.order)?
        } else {
            let w = ((k - self.first) % self.queues.len() as u64) as usize;
            self.queues[w]
                .recv()
                .map_err(|_| anyhow!("loader thread {w} stopped (after an error or a panic)"))??
        };
        for (t, name) in batch.targets.iter_mut().zip(&self.names) {
            t.name.clone_from(name);
        }
        Ok(Some(batch))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the queues makes every worker's next send fail, which ends it.
        self.queues.clear();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn work(source: &Source, first: u64, step: u64, tx: SyncSender<Result<Batch>>) {
    let mut order = None;
    let mut k = first;
    loop {
        let batch = source.batch(k, &mut order);
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
        k += step;
    }
}

/// The sampling plan of `volumes` per dataset_config.sampling.
fn plan(
    dataset: &Dataset,
    config: &DatasetConfig,
    volumes: &[usize],
    opts: &LoaderOptions,
    validation: bool,
) -> Result<Plan> {
    match config.sampling {
        Sampling::PatchSearch => {
            let patches = search(dataset, config, opts.patch_size)?;
            let patches = if dataset.volumes.len() == 1 && volumes == [0] {
                let (train, val) = split_patches(&patches, opts.tr_val_split, opts.split_seed);
                if validation { val } else { train }
            } else {
                patches.into_iter().filter(|p| volumes.contains(&p.volume)).collect()
            };
            ensure!(
                validation || !patches.is_empty(),
                "loader: no training patch (tr_val_split {} leaves every patch of the single volume to \
                 validation)",
                opts.tr_val_split
            );
            Ok(Plan::Patches(patches))
        }
        Sampling::Random { oversample_foreground } => {
            let foreground = volumes
                .par_iter()
                .map(|&v| {
                    let vol = &dataset.volumes[v];
                    let label = vol.targets[vol.ref_label].as_ref();
                    Ok((
                        v,
                        ForegroundLocations::compute(label)
                            .with_context(|| format!("volume {}", vol.name))?,
                    ))
                })
                .collect::<Result<BTreeMap<_, _>>>()?;
            Ok(Plan::Random { volumes: volumes.to_vec(), foreground, oversample: oversample_foreground })
        }
    }
}

/// The patch search over every volume of the dataset (so training and validation share one
/// cache), cached when the volumes are on disk and use_cache is set.
fn search(dataset: &Dataset, config: &DatasetConfig, patch: [usize; 3]) -> Result<Vec<PatchPosition>> {
    let labels: Vec<&dyn VolumeArray> =
        dataset.volumes.iter().map(|v| v.targets[v.ref_label].as_ref()).collect();
    let paths = (config.volume_paths.len() == dataset.volumes.len())
        .then(|| {
            config
                .volume_paths
                .iter()
                .map(|v| {
                    let path = &v.targets.iter().find(|(name, _)| *name == v.ref_label)?.1;
                    let path = std::path::PathBuf::from(path);
                    path.is_dir().then_some(path)
                })
                .collect::<Option<Vec<_>>>()
        })
        .flatten();
    PatchSearch {
        labels,
        paths,
        patch_size: patch,
        min_labeled_ratio: config.min_labeled_ratio,
        min_bbox_percent: config.min_bbox_percent,
        cache_folder: config.use_cache.then(|| config.cache_folder.clone()),
    }
    .run()
}

impl Sampler {
    /// Validation's fixed list: patch plans take a seeded shuffle of their patches, random plans
    /// draw `max_batches` batches once.
    fn fixed_batches(&self, max_batches: usize) -> Result<Vec<Vec<Sample>>> {
        match &self.plan {
            Plan::Patches(patches) => {
                let mut patches = patches.clone();
                patches.shuffle(&mut batch_rng(self.seed, u64::MAX));
                patches.truncate(max_batches * self.batch_size);
                Ok(patches
                    .chunks(self.batch_size)
                    .map(|c| {
                        c.iter()
                            .map(|p| Sample { volume: p.volume, start: self.source_start(p.start) })
                            .collect()
                    })
                    .collect())
            }
            Plan::Random { volumes, .. } if volumes.is_empty() => Ok(Vec::new()),
            Plan::Random { .. } => (0..max_batches as u64)
                .map(|k| self.samples(k, &mut batch_rng(self.seed, k), &mut None))
                .collect(),
            Plan::Fixed(f) => Ok(f.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_downsample_averages_blocks() {
        // (1, 2, 2, 4, 1) -> (1, 1, 1, 2, 1): each output averages a 2x2x2 block.
        let t = Tensor::from_vec([1, 2, 2, 4, 1], (0..16).map(|v| v as f32).collect()).unwrap();
        let a = area_downsample(&t, [1, 1, 2]).unwrap();
        let want0 = [0., 1., 4., 5., 8., 9., 12., 13.].iter().sum::<f32>() / 8.0;
        assert_eq!(a.data(), &[want0, want0 + 2.0]);
        // Uneven: 3 -> 2 along x averages [0, 2) and [1, 3).
        let t = Tensor::from_vec([1, 1, 1, 3, 2], vec![0., 10., 1., 11., 2., 12.]).unwrap();
        let a = area_downsample(&t, [1, 1, 2]).unwrap();
        assert_eq!(a.data(), &[0.5, 10.5, 1.5, 11.5]);
    }

    #[test]
    fn read_padded_fills_outside_with_zero_after_converting() {
        use crate::data::InMemoryArray;
        let a = InMemoryArray::new("a", [1, 2, 2], 1, DType::F32, vec![1., 2., 3., 4.]).unwrap();
        let v = read_padded(&a, [0, -1, 1], [1, 3, 2], 0, |x, _, _| {
            x.iter_mut().for_each(|v| *v *= 10.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(v, vec![0., 0., 20., 0., 40., 0.]);
        assert_eq!(read_padded(&a, [5, 0, 0], [1, 1, 1], 0, |_, _, _| Ok(())).unwrap(), vec![0.0]);
    }
}
