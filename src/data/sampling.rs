//! Where training patches come from: the seed's patch search over the `ref_label` arrays (with a
//! cache that is only used when everything it was computed from is unchanged), nnU-Net's random
//! positions with foreground oversampling, and the train/validation split.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::array::VolumeArray;

/// A box: start and size (D, H, W).
pub type Region = ([usize; 3], [usize; 3]);

/// Streaming passes read volumes in tiles of this size (8 Mi voxels), so a scroll-sized label
/// array never has to fit in memory.
const TILE: [usize; 3] = [128, 128, 128];

/// Boxes of at most `tile` voxels covering `shape`, z-major.
pub(crate) fn tiles(shape: [usize; 3], tile: [usize; 3]) -> Vec<Region> {
    let starts = |a: usize| (0..shape[a]).step_by(tile[a].max(1)).collect::<Vec<_>>();
    let (zs, ys, xs) = (starts(0), starts(1), starts(2));
    let mut out = Vec::with_capacity(zs.len() * ys.len() * xs.len());
    for &z in &zs {
        for &y in &ys {
            for &x in &xs {
                let start = [z, y, x];
                out.push((start, [0, 1, 2].map(|a| tile[a].min(shape[a] - start[a]))));
            }
        }
    }
    out
}

/// The foreground class of one voxel's channels: the label value of a single-channel array
/// (class indices or a binary mask), 1 + the first positive channel of a multi-channel one.
fn class_of(v: &[f32]) -> Option<u32> {
    match v {
        [x] if *x > 0.0 => Some(x.round().max(1.0) as u32),
        [_] => None,
        _ => v.iter().position(|&x| x > 0.0).map(|c| c as u32 + 1),
    }
}

/// Foreground voxels of a label array counted per tile and class in one parallel pass, so that a
/// sample of them can be picked by rank in a second pass without ever holding every position.
pub(crate) struct ForegroundIndex {
    tiles: Vec<Region>,
    /// Per tile: (class, count), sorted by class.
    counts: Vec<Vec<(u32, u64)>>,
    /// Inclusive bounding box (min, max) of all foreground voxels; None without any.
    pub bbox: Option<([usize; 3], [usize; 3])>,
}

impl ForegroundIndex {
    pub fn scan(label: &dyn VolumeArray) -> Result<ForegroundIndex> {
        let tiles = tiles(label.shape(), TILE);
        let c = label.channels();
        let per_tile = tiles
            .par_iter()
            .map(|&(start, size)| {
                let v = label.read(start, size)?;
                let mut counts = BTreeMap::<u32, u64>::new();
                let mut bbox: Option<([usize; 3], [usize; 3])> = None;
                for (i, voxel) in v.chunks_exact(c).enumerate() {
                    let Some(class) = class_of(voxel) else { continue };
                    *counts.entry(class).or_default() += 1;
                    let p = add(unravel(i, size), start);
                    bbox = Some(match bbox {
                        None => (p, p),
                        Some((lo, hi)) => (min3(lo, p), max3(hi, p)),
                    });
                }
                Ok((counts.into_iter().collect::<Vec<_>>(), bbox))
            })
            .collect::<Result<Vec<_>>>()?;
        let bbox = per_tile.iter().filter_map(|t| t.1).reduce(|a, b| (min3(a.0, b.0), max3(a.1, b.1)));
        Ok(ForegroundIndex { tiles, counts: per_tile.into_iter().map(|t| t.0).collect(), bbox })
    }

    /// Total voxels per class over the whole array.
    pub fn classes(&self) -> BTreeMap<u32, u64> {
        let mut total = BTreeMap::new();
        for (class, n) in self.counts.iter().flatten() {
            *total.entry(*class).or_default() += n;
        }
        total
    }

    /// The voxels of `class` (None: any foreground class) whose z-major rank among those voxels
    /// is in `ranks` (sorted, repeats allowed), grouped per tile: (tile, positions).
    pub fn pick(
        &self,
        label: &dyn VolumeArray,
        class: Option<u32>,
        ranks: &[u64],
    ) -> Result<Vec<(Region, Vec<[usize; 3]>)>> {
        let counted = |t: usize| -> u64 {
            self.counts[t].iter().filter(|(k, _)| class.is_none_or(|c| c == *k)).map(|(_, n)| n).sum()
        };
        // Each tile's share of `ranks`, with the tile's first rank.
        let mut jobs = Vec::new();
        let (mut first, mut r) = (0u64, 0usize);
        for t in 0..self.tiles.len() {
            let n = counted(t);
            let begin = r;
            while r < ranks.len() && ranks[r] < first + n {
                r += 1;
            }
            if r > begin {
                jobs.push((t, first, &ranks[begin..r]));
            }
            first += n;
        }
        ensure!(r == ranks.len(), "{}: rank {} beyond the {first} foreground voxels", label.name(), ranks[r]);
        let c = label.channels();
        jobs.into_par_iter()
            .map(|(t, first, ranks)| {
                let (start, size) = self.tiles[t];
                let v = label.read(start, size)?;
                let mut out = Vec::with_capacity(ranks.len());
                let (mut seen, mut r) = (first, 0);
                for (i, voxel) in v.chunks_exact(c).enumerate() {
                    if class_of(voxel).is_some_and(|k| class.is_none_or(|c| c == k)) {
                        while r < ranks.len() && ranks[r] == seen {
                            out.push(add(unravel(i, size), start));
                            r += 1;
                        }
                        seen += 1;
                        if r == ranks.len() {
                            break;
                        }
                    }
                }
                Ok(((start, size), out))
            })
            .collect()
    }
}

/// The (z, y, x) of flat index `i` in a box of `size`.
fn unravel(i: usize, size: [usize; 3]) -> [usize; 3] {
    [i / (size[1] * size[2]), (i / size[2]) % size[1], i % size[2]]
}

fn add(a: [usize; 3], b: [usize; 3]) -> [usize; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn min3(a: [usize; 3], b: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|i| a[i].min(b[i]))
}

fn max3(a: [usize; 3], b: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|i| a[i].max(b[i]))
}

/// Whether the patch at `start` passes the seed's two tests: the bounding box of its labelled
/// voxels covers at least `min_bbox_percent` of the patch, and labelled voxels make up at least
/// `min_labeled_ratio` of the whole patch (not of the bounding box, whatever the seed's README says).
fn patch_is_valid(
    label: &dyn VolumeArray,
    start: [usize; 3],
    patch: [usize; 3],
    min_labeled_ratio: f64,
    min_bbox_percent: f64,
) -> Result<bool> {
    let v = label.read(start, patch)?;
    let c = label.channels();
    let (mut lo, mut hi, mut count) = ([usize::MAX; 3], [0usize; 3], 0usize);
    for (i, voxel) in v.chunks_exact(c).enumerate() {
        if voxel.iter().any(|&x| x > 0.0) {
            let p = unravel(i, patch);
            (lo, hi, count) = (min3(lo, p), max3(hi, p), count + 1);
        }
    }
    if count == 0 {
        return Ok(false);
    }
    let volume = patch.iter().product::<usize>() as f64;
    let bbox = (0..3).map(|a| hi[a] - lo[a] + 1).product::<usize>() as f64;
    Ok(bbox >= min_bbox_percent * volume && count as f64 / volume >= min_labeled_ratio)
}

/// The seed's patch search on one label array (reference-spec 1.8): candidate starts on a grid
/// of half the patch size from the foreground bounding box's corner, every candidate patch lying
/// inside that box, checked in parallel. Errors name the array when it has no labelled voxel.
pub fn find_patches(
    label: &dyn VolumeArray,
    patch: [usize; 3],
    min_labeled_ratio: f64,
    min_bbox_percent: f64,
) -> Result<Vec<[usize; 3]>> {
    search_volume(label, patch, min_labeled_ratio, min_bbox_percent, &ProgressBar::hidden())
}

/// [`find_patches`], counting the candidates checked on `progress`.
fn search_volume(
    label: &dyn VolumeArray,
    patch: [usize; 3],
    min_labeled_ratio: f64,
    min_bbox_percent: f64,
    progress: &ProgressBar,
) -> Result<Vec<[usize; 3]>> {
    ensure!(patch.iter().all(|&p| p > 0), "patch size {patch:?} must be positive");
    let index = ForegroundIndex::scan(label)?;
    let Some((lo, hi)) = index.bbox else {
        bail!("{}: no labelled voxel (every value is 0), so no patch can be sampled from it", label.name());
    };
    // Python's range(lo, hi - p + 2, p // 2); a 1-voxel patch axis steps by 1 instead of failing.
    let axis = |a: usize| -> Vec<usize> {
        (lo[a]..(hi[a] + 2).saturating_sub(patch[a])).step_by((patch[a] / 2).max(1)).collect()
    };
    let (zs, ys, xs) = (axis(0), axis(1), axis(2));
    let mut candidates = Vec::with_capacity(zs.len() * ys.len() * xs.len());
    for &z in &zs {
        for &y in &ys {
            candidates.extend(xs.iter().map(|&x| [z, y, x]));
        }
    }
    progress.inc_length(candidates.len() as u64);
    let valid = candidates
        .par_iter()
        .map(|&s| {
            let ok = patch_is_valid(label, s, patch, min_labeled_ratio, min_bbox_percent);
            progress.inc(1);
            ok
        })
        .collect::<Result<Vec<bool>>>()?;
    Ok(candidates.into_iter().zip(valid).filter_map(|(s, ok)| ok.then_some(s)).collect())
}

/// One patch of the search: its volume (index into the dataset) and start voxel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchPosition {
    pub volume: usize,
    pub start: [usize; 3],
}

/// Bump when the search or the key changes meaning, so old caches are recomputed.
const CACHE_FORMAT: u32 = 1;

/// Everything a patch search result depends on. A cache is used only when its stored key equals
/// the key of the current arrays exactly; anything else (another threshold, patch size, array,
/// a rewritten chunk) recomputes and rewrites it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchKey {
    pub format: u32,
    pub patch_size: [usize; 3],
    pub min_labeled_ratio: f64,
    pub min_bbox_percent: f64,
    pub arrays: Vec<ArrayFingerprint>,
}

/// What identifies the contents of one array directory on disk without reading its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayFingerprint {
    pub path: PathBuf,
    pub shape: [usize; 3],
    pub channels: usize,
    /// The metadata documents (.zarray, .zattrs, zarr.json) verbatim: shape, chunking, dtype
    /// and codecs.
    pub metadata: BTreeMap<String, String>,
    /// Every file and directory below the array: count, total bytes, and an FNV-1a hash of
    /// (relative path, size, modification time in ns) in sorted order. A chunk rewritten in
    /// place changes its modification time; an added or removed one changes the listing.
    pub files: u64,
    pub bytes: u64,
    pub listing_hash: u64,
}

impl ArrayFingerprint {
    pub fn of(path: &Path, array: &dyn VolumeArray) -> Result<ArrayFingerprint> {
        let meta = std::fs::metadata(path).with_context(|| format!("patch cache key: {}", path.display()))?;
        ensure!(meta.is_dir(), "patch cache key: {} is not an array directory", path.display());
        let mut entries = Vec::new();
        list_files(path, path, &mut entries)?;
        entries.sort();
        let mut metadata = BTreeMap::new();
        for name in [".zarray", ".zattrs", "zarr.json"] {
            let p = path.join(name);
            if p.is_file() {
                let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
                metadata.insert(name.to_string(), text);
            }
        }
        let mut hash = Fnv::default();
        for (rel, len, mtime) in &entries {
            hash.write(rel.as_bytes());
            hash.write(&len.to_le_bytes());
            hash.write(&mtime.to_le_bytes());
        }
        Ok(ArrayFingerprint {
            path: path.to_path_buf(),
            shape: array.shape(),
            channels: array.channels(),
            metadata,
            files: entries.len() as u64,
            bytes: entries.iter().map(|e| e.1).sum(),
            listing_hash: hash.0,
        })
    }
}

/// (path relative to `root`, size, modification time in ns) of every entry below `dir`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<(String, u64, u128)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let meta = entry.metadata().with_context(|| format!("reading {}", entry.path().display()))?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
        let rel = entry.path().strip_prefix(root).unwrap_or(&entry.path()).to_string_lossy().into_owned();
        out.push((rel, if meta.is_file() { meta.len() } else { 0 }, mtime.as_nanos()));
        if meta.is_dir() {
            list_files(root, &entry.path(), out)?;
        }
    }
    Ok(())
}

/// 64-bit FNV-1a: stable across runs and Rust releases, unlike std's `DefaultHasher`.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    key: SearchKey,
    patches: Vec<PatchPosition>,
}

/// A patch search over several volumes: `labels[v]` is volume v's ref_label array and
/// `paths[v]` its directory on disk when the result may be cached there.
pub struct PatchSearch<'a> {
    pub labels: Vec<&'a dyn VolumeArray>,
    /// Array directories, one per label; None (in-memory volumes, URLs) disables the cache.
    pub paths: Option<Vec<PathBuf>>,
    pub patch_size: [usize; 3],
    pub min_labeled_ratio: f64,
    pub min_bbox_percent: f64,
    /// Folder for the JSON cache; None disables it.
    pub cache_folder: Option<PathBuf>,
}

impl PatchSearch<'_> {
    fn key(&self, paths: &[PathBuf]) -> Result<SearchKey> {
        let arrays = paths
            .iter()
            .zip(&self.labels)
            .map(|(p, l)| ArrayFingerprint::of(p, *l))
            .collect::<Result<Vec<_>>>()?;
        Ok(SearchKey {
            format: CACHE_FORMAT,
            patch_size: self.patch_size,
            min_labeled_ratio: self.min_labeled_ratio,
            min_bbox_percent: self.min_bbox_percent,
            arrays,
        })
    }

    /// The cache file for these arrays and patch size (one per dataset, so datasets sharing a
    /// cache folder do not overwrite each other's).
    pub fn cache_path(&self) -> Option<PathBuf> {
        let (folder, paths) = (self.cache_folder.as_ref()?, self.paths.as_ref()?);
        let mut h = Fnv::default();
        for p in paths {
            h.write(p.to_string_lossy().as_bytes());
            h.write(&[0]);
        }
        let [z, y, x] = self.patch_size;
        Some(folder.join(format!("patches_{z}_{y}_{x}_{:016x}.json", h.0)))
    }

    /// Every valid patch of every volume, volume by volume, from the cache when its key matches.
    /// A volume without a labelled voxel or without any valid patch is an error naming it.
    pub fn run(&self) -> Result<Vec<PatchPosition>> {
        let cached = match (self.cache_path(), &self.paths) {
            (Some(file), Some(paths)) => Some((file, self.key(paths)?)),
            _ => None,
        };
        if let Some((file, key)) = &cached
            && let Ok(text) = std::fs::read_to_string(file)
            && let Ok(stored) = serde_json::from_str::<CacheFile>(&text)
            && stored.key == *key
        {
            return Ok(stored.patches);
        }
        let progress = ProgressBar::new(0).with_prefix("patch search");
        progress.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} candidates, {per_sec}, ETA {eta}")
                .expect("a valid template"),
        );
        let per_volume = self
            .labels
            .par_iter()
            .map(|l| {
                let found = search_volume(
                    *l,
                    self.patch_size,
                    self.min_labeled_ratio,
                    self.min_bbox_percent,
                    &progress,
                )?;
                ensure!(
                    !found.is_empty(),
                    "{}: no patch of size {:?} has a labelled fraction >= {} (min_labeled_ratio) and a \
                     label bounding box >= {} of the patch (min_bbox_percent); lower them or the patch size",
                    l.name(),
                    self.patch_size,
                    self.min_labeled_ratio,
                    self.min_bbox_percent
                );
                Ok(found)
            })
            .collect::<Result<Vec<_>>>()?;
        progress.finish_and_clear();
        let patches: Vec<PatchPosition> = per_volume
            .into_iter()
            .enumerate()
            .flat_map(|(volume, starts)| starts.into_iter().map(move |start| PatchPosition { volume, start }))
            .collect();
        if let Some((file, key)) = cached {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let json = serde_json::to_vec(&CacheFile { key, patches: patches.clone() })?;
            crate::tensor::io::write_atomic(&file, &json).context("writing the patch cache")?;
        }
        Ok(patches)
    }
}

/// nnU-Net's per-class foreground sample of a label array (its `class_locations`): for each
/// class, `max(min(10000, n), ceil(n / 100))` of its n voxels drawn without replacement (seed
/// 1234), so that forced-foreground patches see every class and small structures.
#[derive(Debug, Clone, Default)]
pub struct ForegroundLocations {
    pub classes: Vec<(u32, Vec<[usize; 3]>)>,
}

impl ForegroundLocations {
    pub fn compute(label: &dyn VolumeArray) -> Result<ForegroundLocations> {
        let index = ForegroundIndex::scan(label)?;
        let mut rng = StdRng::seed_from_u64(1234);
        let mut classes = Vec::new();
        for (class, n) in index.classes() {
            let k = n.min(10_000).max(n.div_ceil(100));
            let mut ranks: Vec<u64> = if k == n {
                (0..n).collect()
            } else {
                rand::seq::index::sample(&mut rng, n as usize, k as usize)
                    .into_iter()
                    .map(|i| i as u64)
                    .collect()
            };
            ranks.sort_unstable();
            let picked = index.pick(label, Some(class), &ranks)?;
            classes.push((class, picked.into_iter().flat_map(|t| t.1).collect()));
        }
        Ok(ForegroundLocations { classes })
    }

    /// A voxel of a random class, then a random voxel of it, as nnU-Net's forced-foreground
    /// samples; None without foreground.
    pub fn sample(&self, rng: &mut impl Rng) -> Option<[usize; 3]> {
        let (_, voxels) = self.classes.choose(rng)?;
        voxels.choose(rng).copied()
    }
}

/// nnU-Net's crop start (data_loader_3d.py) of a `source`-sized box in a volume of `shape`, for a
/// final patch of `patch`: uniformly random such that the final patch may reach out of the volume
/// by at most half the padding nnU-Net allows, or with the `foreground` voxel at the box centre
/// (lower bound clamped). Starts may be negative or run past the end: the area outside is padded.
pub fn random_start(
    shape: [usize; 3],
    source: [usize; 3],
    patch: [usize; 3],
    foreground: Option<[usize; 3]>,
    rng: &mut impl Rng,
) -> [isize; 3] {
    [0, 1, 2].map(|a| {
        let (shape, source) = (shape[a] as isize, source[a] as isize);
        let mut pad = source - patch[a] as isize;
        if shape + pad < source {
            pad = source - shape;
        }
        let lb = -(pad / 2);
        let ub = shape + pad / 2 + pad % 2 - source;
        match foreground {
            Some(v) => (v[a] as isize - source / 2).max(lb),
            None => rng.random_range(lb as i64..=ub as i64) as isize,
        }
    })
}

/// The train/validation split by volume, reproducible from `seed`: the first
/// `floor(tr_val_split * n)` (at least 1) of a seeded shuffle train, the rest validate. One volume
/// is returned on both sides: with the patch search the loaders then split its patch list instead
/// ([`split_patches`]), which is what the seed does with its single scroll volume; with random
/// sampling both sample the whole volume, so validation then overlaps training.
pub fn split_volumes(n_volumes: usize, tr_val_split: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    if n_volumes == 1 {
        return (vec![0], vec![0]);
    }
    let mut order: Vec<usize> = (0..n_volumes).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_train = ((tr_val_split * n_volumes as f64).floor() as usize).clamp(n_volumes.min(1), n_volumes);
    let val = order.split_off(n_train);
    (order, val)
}

/// The seed's split of one volume's patches: a seeded shuffle, the first `floor(tr_val_split * n)`
/// train, the rest validate.
pub fn split_patches(
    patches: &[PatchPosition],
    tr_val_split: f64,
    seed: u64,
) -> (Vec<PatchPosition>, Vec<PatchPosition>) {
    let mut order = patches.to_vec();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_train = (tr_val_split * order.len() as f64).floor() as usize;
    let val = order.split_off(n_train.min(order.len()));
    (order, val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DType, InMemoryArray};

    #[test]
    fn tiles_cover_the_shape_once() {
        let t = tiles([5, 3, 7], [2, 3, 4]);
        assert_eq!(t.len(), 3 * 2);
        let covered: usize = t.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(covered, 5 * 3 * 7);
        assert_eq!(t.last().unwrap(), &([4, 0, 4], [1, 3, 3]));
    }

    #[test]
    fn pick_returns_voxels_by_rank() {
        // Foreground at flat indices 3, 10, 11, 20 of a 3x3x3 volume.
        let mut data = vec![0.0; 27];
        for i in [3, 10, 11, 20] {
            data[i] = 1.0;
        }
        let a = InMemoryArray::new("a", [3, 3, 3], 1, DType::U8, data).unwrap();
        let index = ForegroundIndex::scan(&a).unwrap();
        assert_eq!(index.bbox, Some(([0, 0, 0], [2, 1, 2])));
        let got: Vec<_> = index.pick(&a, None, &[1, 1, 3]).unwrap().into_iter().flat_map(|t| t.1).collect();
        assert_eq!(got, vec![[1, 0, 1], [1, 0, 1], [2, 0, 2]]);
        assert!(index.pick(&a, None, &[4]).is_err());
    }
}
