//! One inference job: the sliding window streamed into a Zarr store block by block, resumable and
//! shardable.
//!
//! Layout under `output_path`: `predictions.zarr/<target>` (one array per written target, chunked
//! like the window), and `.progress/` with `run.json` (what decides the output bytes, and the block
//! layout) and one marker per finished block, written after that block's chunks. The first job to
//! claim `run.json` decides the settings; every other job checks that it would write the same
//! thing. Every job then creates the arrays it does not find, which is atomic and idempotent, so a
//! job killed at any point leaves a state the next one continues from. Chunks are written whole
//! or not at all (`data::store`), and a block is erased before it is written again, so whatever an
//! interrupted block left is replaced. A rerun skips finished blocks; a run with other settings is
//! refused instead of mixing two predictions in one store.

use std::collections::HashSet;
use std::fmt;
use std::io::ErrorKind;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::blend::{OutputTarget, SlidingWindow, finish};
use super::pyramid::{Pyramid, Reduction, reduce};
use super::shard::{Blocks, Shard};
use crate::config::{self, OutputType};
use crate::data::DType;
use crate::data::finite::NonFinite;
use crate::data::ome::{self, Geometry};
use crate::data::zarr::{self, ArraySpec, ZarrWriter};
use crate::device::launch::{DeviceCounters, Gpu};
use crate::tensor::io::write_atomic;

/// From this many blocks on, a job says that it reads the block markers before it starts (one
/// listing of a folder that large takes seconds on a parallel filesystem).
const LISTING_NOTE_BLOCKS: usize = 100_000;

/// What is predicted and written.
pub struct Job<'a> {
    pub window: SlidingWindow<'a>,
    /// In the predictor's output order.
    pub targets: Vec<OutputTarget>,
    /// Whatever else decides the output bytes (input, checkpoint, normalisation, mirroring),
    /// recorded in `run.json`: a job whose provenance differs refuses to write into the store.
    pub provenance: Value,
    /// The input's voxel size and origin as far as it records them: the store's OME-Zarr scale
    /// and translation.
    pub geometry: Geometry,
    /// Lower-resolution levels written beside each target (`infer::pyramid`).
    pub pyramid_levels: usize,
    /// The OME-Zarr image the input is a level of, if it is: single-channel label maps are then
    /// written as its label images (`labels/<target>`, naming it as their source).
    pub image: Option<PathBuf>,
}

impl Job<'_> {
    /// Whether `target` is written as a label image of the input's OME-Zarr image.
    fn label_image(&self, target: &OutputTarget) -> bool {
        self.image.is_some() && target.labels.is_some() && target.stored().0 == 1
    }
}

/// How a job runs; none of this changes the output bytes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where the arrays and the progress records go.
    pub layout: Layout,
    pub shard: Shard,
    /// Replace an existing output (only for a single job: sharded jobs would wipe each other's).
    pub overwrite: bool,
    /// Stop after this many blocks (a job that must end before its allocation does); a rerun
    /// continues.
    pub max_blocks: Option<usize>,
    /// Stop before a block that would likely not finish by then (its estimate: the mean time of
    /// this job's blocks so far).
    pub deadline: Option<Instant>,
    /// Set by a signal handler: finish the current block, then stop.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Budget for the block buffers in bytes, which sets the block size when the output is created.
    pub block_bytes: usize,
    pub show_progress: bool,
}

/// What a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// This job's blocks.
    pub blocks: Range<usize>,
    pub computed: usize,
    /// Finished by an earlier run.
    pub skipped: usize,
    pub tiles: usize,
    /// Every block of this job is finished.
    pub done: bool,
    /// Why the job stopped before its last block, if it did.
    pub stopped: Option<Stop>,
    /// On a kernel device, what each computed block moved and launched (in `computed` order).
    pub device: Vec<DeviceCounters>,
}

/// Why a job stopped early; a rerun continues where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `--max-blocks`.
    MaxBlocks,
    /// `--stop-after`: the next block would end past the deadline.
    TimeLimit,
    /// SIGTERM or SIGUSR1 (the scheduler's warning before a time limit or preemption).
    Signal,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stop::MaxBlocks => "--max-blocks reached",
            Stop::TimeLimit => "the next block would end after --stop-after",
            Stop::Signal => "a termination signal",
        })
    }
}

/// The store's paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub store: PathBuf,
    pub progress: PathBuf,
}

impl Layout {
    /// One volume's output: `<output_path>/predictions.zarr` and `<output_path>/.progress`.
    pub fn new(output_path: &Path) -> Layout {
        Layout { store: output_path.join("predictions.zarr"), progress: output_path.join(".progress") }
    }

    /// A target's full-resolution array (not a label image).
    pub fn array(&self, target: &str) -> PathBuf {
        self.level(target, 0, false)
    }

    /// Level `k` of a target: `<target>` and `<target>.<k>` in the store (target names hold no
    /// dot), or `labels/<target>/<k>` for a label image.
    pub fn level(&self, target: &str, k: usize, label_image: bool) -> PathBuf {
        match (label_image, k) {
            (true, _) => self.label_image(target).join(k.to_string()),
            (false, 0) => self.store.join(target),
            (false, _) => self.store.join(format!("{target}.{k}")),
        }
    }

    fn labels(&self) -> PathBuf {
        self.store.join("labels")
    }

    fn label_image(&self, target: &str) -> PathBuf {
        self.labels().join(target)
    }

    fn record(&self) -> PathBuf {
        self.progress.join("run.json")
    }

    fn finished(&self, block: usize) -> PathBuf {
        self.progress.join(format!("block-{block}.done"))
    }

    /// The finished blocks, from one listing of `.progress` (a job over a large volume has
    /// millions of blocks; a stat per block would take minutes before any work).
    fn finished_blocks(&self) -> Result<HashSet<usize>> {
        let ctx = || format!("listing {}", self.progress.display());
        let mut done = HashSet::new();
        for entry in std::fs::read_dir(&self.progress).with_context(ctx)? {
            let name = entry.with_context(ctx)?.file_name();
            let block: Option<usize> =
                name.to_str().and_then(|n| n.strip_prefix("block-")?.strip_suffix(".done")?.parse().ok());
            done.extend(block);
        }
        Ok(done)
    }
}

fn dtype(t: OutputType) -> DType {
    match t {
        OutputType::Uint8 => DType::U8,
        OutputType::Uint16 => DType::U16,
        OutputType::Float32 => DType::F32,
        OutputType::Float16 => DType::F16,
    }
}

/// Runs `job` into `opts.layout`.
pub fn run(job: &Job<'_>, opts: &RunOptions) -> Result<Summary> {
    let layout = &opts.layout;
    let grid = &job.window.grid;
    let chunk: [usize; 3] = std::array::from_fn(|a| grid.patch[a].min(grid.shape[a]));
    let settings = json!({
        "shape": grid.shape,
        "chunks": chunk,
        "patch_size": grid.patch,
        "overlap": job.window.overlap(),
        "targets": job.targets,
        "provenance": job.provenance,
    });
    let pyramid = Pyramid::new(job.pyramid_levels, grid.shape, job.geometry.spacing, chunk)?;
    // Only where they apply, so an output begun before they existed still resumes.
    let mut settings = settings;
    if !pyramid.is_empty() {
        settings["pyramid_levels"] = json!(pyramid.len());
    }
    if job.targets.iter().any(|t| job.label_image(t)) {
        settings["label_images"] = json!(true);
    }
    let bytes_per_voxel = 4 * (1 + job.targets.iter().map(|t| t.channels).sum::<usize>());
    let blocks = Blocks::fitting(grid.shape, chunk, bytes_per_voxel, opts.block_bytes)?;
    let writers = open_store(layout, job, opts, &settings, blocks, chunk, &pyramid)?;
    let blocks = read_record(layout)?.1;

    let mine = opts.shard.blocks(blocks.len());
    if opts.show_progress && blocks.len() >= LISTING_NOTE_BLOCKS {
        eprintln!(
            "infer: {} blocks in all, {} for shard {}; reading the finished-block markers",
            blocks.len(),
            mine.len(),
            opts.shard
        );
    }
    let finished = layout.finished_blocks()?;
    let pending: Vec<usize> = mine.clone().filter(|b| !finished.contains(b)).collect();
    let skipped = mine.len() - pending.len();
    let todo = &pending[..opts.max_blocks.map_or(pending.len(), |m| m.min(pending.len()))];
    let tiles: Vec<usize> = todo
        .iter()
        .map(|&b| {
            let (lo, size) = blocks.block(b);
            job.window.tiles_for(lo, size)
        })
        .collect();
    let bar = progress_bar(opts, tiles.iter().sum(), todo.len());
    let gpu = Gpu::of(job.window.device())?;
    let mut device = Vec::new();
    let (started, mut computed, mut tiles_done) = (Instant::now(), 0, 0);
    let mut stopped = (todo.len() < pending.len()).then_some(Stop::MaxBlocks);
    for (n, &b) in todo.iter().enumerate() {
        if opts.interrupt.as_ref().is_some_and(|i| i.load(Ordering::Relaxed)) {
            stopped = Some(Stop::Signal);
            break;
        }
        if let Some(deadline) = opts.deadline
            && Instant::now() + started.elapsed().checked_div(n as u32).unwrap_or_default() > deadline
        {
            stopped = Some(Stop::TimeLimit);
            break;
        }
        bar.set_message(format!("block {}/{}", n + 1, todo.len()));
        let (lo, size) = blocks.block(b);
        let before = gpu.as_ref().map(Gpu::counters);
        let blended = job.window.blend(lo, size, &mut |k| bar.inc(k as u64))?;
        let moved = gpu.as_ref().zip(before).map(|(g, c)| g.counters().since(&c));
        device.extend(moved);
        for ((target, writer), logits) in job.targets.iter().zip(&writers).zip(blended) {
            // Written as integers a NaN would become 0 unnoticed: a model that predicts NaN is an
            // error, and the block stays unfinished.
            if let Some(bad) = NonFinite::first_in(&logits, lo, size, target.channels) {
                bail!(
                    "target '{}': the network's output is {bad}; its weights or this input hold \
                     non-finite values (nothing of this block was written)",
                    target.name
                );
            }
            let values = finish(target, logits);
            let channels = target.stored().0;
            let (full, levels) = writer.split_first().expect("every target has its full resolution");
            full.erase_region(lo, size)?;
            for (start, n) in blocks.chunks_in(lo, size) {
                let data = sub_box(&values, size, channels, sub(start, lo), n);
                full.write_region(start, n, &data)?;
            }
            for (k, level) in (1..).zip(levels) {
                let (at, n) = pyramid.region(k, lo, size);
                let (data, reduced) = reduce(&values, size, channels, pyramid.factor(k), reduction(target));
                debug_assert_eq!(reduced, n);
                level.erase_region(at, n)?;
                level.write_region(at, n, &data)?;
            }
        }
        write_atomic(&layout.finished(b), b"")?;
        (computed, tiles_done) = (computed + 1, tiles_done + tiles[n]);
        if opts.show_progress && bar.is_hidden() {
            log_block(&bar, n + 1, todo.len(), b, moved);
        }
    }
    bar.finish_and_clear();
    Ok(Summary {
        blocks: mine,
        computed,
        skipped,
        tiles: tiles_done,
        done: computed == pending.len(),
        stopped,
        device,
    })
}

fn progress_bar(opts: &RunOptions, tiles: usize, blocks: usize) -> ProgressBar {
    if !opts.show_progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(tiles as u64);
    let style = ProgressStyle::with_template(
        "infer {prefix} {msg} [{bar:30}] {pos}/{len} windows, {per_sec}, ETA {eta} ({elapsed})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("shard {}", opts.shard));
    bar.set_message(format!("{blocks} blocks"));
    bar
}

/// Where no terminal shows the bar (a batch job's log), one line per finished block.
/// With the block's device counters on a kernel device.
fn log_block(bar: &ProgressBar, n: usize, of: usize, block: usize, device: Option<DeviceCounters>) {
    let (done, total) = (bar.position(), bar.length().unwrap_or(0));
    let rate = done as f64 / bar.elapsed().as_secs_f64().max(1e-9);
    let eta = (total - done) as f64 / rate.max(1e-9);
    let device = device.map(|c| format!("; device: {c}")).unwrap_or_default();
    eprintln!(
        "infer: block {block} done ({n}/{of}): {done}/{total} windows, {rate:.2} windows/s, ETA {eta:.0}s{device}"
    );
}

/// Label maps keep classes; values average.
fn reduction(target: &OutputTarget) -> Reduction {
    if target.labels.is_some() { Reduction::First } else { Reduction::Mean }
}

fn sub(a: [usize; 3], b: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|i| a[i] - b[i])
}

/// The (D, H, W, C) box at `at` of `n` out of a (D, H, W, C) buffer of `size`.
fn sub_box(values: &[f32], size: [usize; 3], c: usize, at: [usize; 3], n: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(n.iter().product::<usize>() * c);
    let row = n[2] * c;
    for z in at[0]..at[0] + n[0] {
        for y in at[1]..at[1] + n[1] {
            let from = ((z * size[1] + y) * size[2] + at[2]) * c;
            out.extend_from_slice(&values[from..from + row]);
        }
    }
    out
}

/// The provenance recorded in an existing output, if any: what a later job can reuse (the input's
/// statistics) instead of recomputing it.
pub fn recorded_provenance(layout: &Layout) -> Result<Option<Value>> {
    if !layout.record().exists() {
        return Ok(None);
    }
    Ok(Some(read_record(layout)?.0["provenance"].clone()))
}

fn read_record(layout: &Layout) -> Result<(Value, Blocks)> {
    let path = layout.record();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let record: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let blocks = serde_json::from_value(record["blocks"].clone())
        .with_context(|| format!("{}: no valid \"blocks\"", path.display()))?;
    Ok((record["settings"].clone(), blocks))
}

/// Writes `record` to `path` unless it exists, atomically: a complete file appears under the
/// name or nothing does, and of racing jobs exactly one wins.
fn claim(path: &Path, record: &Value) -> Result<bool> {
    let tmp = path.with_extension(format!("claim{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, path);
    std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Claims the output or checks this job against its claim, then creates the arrays no job has
/// created yet and opens the rest: per target, its full resolution and then its pyramid levels.
/// With `overwrite` (one job only) it first removes the earlier run's progress and every array of
/// the store that unet3d infer wrote, including targets this run does not write.
fn open_store(
    layout: &Layout,
    job: &Job<'_>,
    opts: &RunOptions,
    settings: &Value,
    blocks: Blocks,
    chunk: [usize; 3],
    pyramid: &Pyramid,
) -> Result<Vec<Vec<ZarrWriter>>> {
    let levels = |t: &OutputTarget| -> Vec<PathBuf> {
        (0..=pyramid.len()).map(|k| layout.level(&t.name, k, job.label_image(t))).collect()
    };
    if opts.overwrite {
        ensure!(
            opts.shard.count == 1,
            "--overwrite with --shard {}: each job would wipe the others' chunks; remove {} once instead",
            opts.shard,
            layout.store.display()
        );
        remove_earlier(layout, job.targets.iter().flat_map(levels))?;
    } else if !layout.record().exists() {
        for path in job.targets.iter().flat_map(levels) {
            ensure!(
                !path.exists(),
                "{}: already exists and was not written by unet3d infer (no {}); refusing to \
                 overwrite it (pass --overwrite to replace it)",
                path.display(),
                layout.record().display()
            );
        }
    }
    std::fs::create_dir_all(&layout.progress)
        .with_context(|| format!("creating {}", layout.progress.display()))?;
    let record = json!({"settings": settings, "blocks": blocks});
    if !claim(&layout.record(), &record)? {
        let (existing, _) = read_record(layout)?;
        if &existing != settings {
            let diffs = config::differences(&existing, settings);
            bail!(
                "{}: holds a prediction made with other settings; refusing to mix them (pass \
                 --overwrite to replace it, or choose another output_path). Differences (existing vs \
                 this run):\n  {}",
                layout.store.display(),
                diffs.join("\n  ")
            );
        }
    }
    describe(layout, job, pyramid)?;
    let grid = &job.window.grid;
    job.targets
        .iter()
        .map(|t| {
            let (channels, stored) = t.stored();
            levels(t)
                .into_iter()
                .enumerate()
                .map(|(k, path)| {
                    let mut unet3d = json!({"target": t, "settings": settings});
                    if k > 0 {
                        unet3d["level"] = json!(k);
                    }
                    let (shape, chunks) =
                        if k == 0 { (grid.shape, chunk) } else { (pyramid.shape(k), pyramid.chunk(k)) };
                    // Every array records its geometry, which OME-Zarr describes only for
                    // single-channel ones.
                    let mut attributes = json!({"unet3d": unet3d});
                    let g = job.geometry.level(pyramid.factor(k), pyramid.offset(k, reduction(t)));
                    if let Some(spacing) = g.spacing {
                        attributes["spacing"] = json!(spacing);
                    }
                    if let Some(origin) = g.origin {
                        attributes["origin"] = json!(origin);
                    }
                    let spec = ArraySpec {
                        shape,
                        channels,
                        chunks,
                        dtype: dtype(stored),
                        attributes: attributes.as_object().cloned().unwrap_or_default(),
                    };
                    ZarrWriter::create_or_open(&path, &spec)
                })
                .collect()
        })
        .collect()
}

/// Writes the store's OME-Zarr metadata (the same bytes from every job): the single-channel
/// targets as images of the store's group, and label images under `labels/`, whose source is the
/// input's image.
fn describe(layout: &Layout, job: &Job<'_>, pyramid: &Pyramid) -> Result<()> {
    let image = |t: &OutputTarget, path: String, level: &dyn Fn(usize) -> String| ome::Image {
        name: t.name.clone(),
        levels: pyramid.ome_levels(path, level, reduction(t)),
    };
    let images: Vec<ome::Image> = job
        .targets
        .iter()
        .filter(|t| t.stored().0 == 1 && !job.label_image(t))
        .map(|t| image(t, t.name.clone(), &|k| format!("{}.{k}", t.name)))
        .collect();
    let attributes = if images.is_empty() { json!({}) } else { ome::multiscales(&images, &job.geometry) };
    zarr::write_group_attributes(&layout.store, attributes)?;
    let labels: Vec<&OutputTarget> = job.targets.iter().filter(|t| job.label_image(t)).collect();
    if labels.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = labels.iter().map(|t| t.name.as_str()).collect();
    zarr::write_group_attributes(&layout.labels(), ome::labels(&names))?;
    for t in labels {
        let group = layout.label_image(&t.name);
        std::fs::create_dir_all(&group).with_context(|| format!("creating {}", group.display()))?;
        let source = job.image.as_deref().and_then(|i| relative(i, &group));
        let mut attributes =
            ome::label_image(&image(t, "0".into(), &|k| k.to_string()), &job.geometry, source.as_deref());
        attributes["unet3d"] = json!({"label_image": t.name});
        zarr::write_group_attributes(&group, attributes)?;
    }
    Ok(())
}

/// `to` relative to the folder `from` (both existing), with `/` between names; None where no
/// relative path leads there.
fn relative(to: &Path, from: &Path) -> Option<String> {
    let path = pathdiff::diff_paths(to.canonicalize().ok()?, from.canonicalize().ok()?)?;
    let names: Option<Vec<&str>> = path.components().map(|c| c.as_os_str().to_str()).collect();
    Some(names?.join("/"))
}

/// What `--overwrite` replaces: `.progress`, this run's arrays (`paths`: any Zarr array there),
/// and every other array of the store and its label images that unet3d infer wrote (its `unet3d`
/// attribute says so), then the label images and `labels` group left empty. Anything else there
/// stays.
fn remove_earlier(layout: &Layout, paths: impl Iterator<Item = PathBuf>) -> Result<()> {
    if layout.progress.exists() {
        std::fs::remove_dir_all(&layout.progress)
            .with_context(|| format!("removing {}", layout.progress.display()))?;
    }
    for path in paths {
        if path.exists() {
            zarr::remove_array(&path)?;
        }
    }
    remove_ours(&layout.store)?;
    let Ok(labels) = std::fs::read_dir(layout.labels()) else { return Ok(()) };
    for entry in labels {
        let group = entry.with_context(|| format!("listing {}", layout.labels().display()))?.path();
        if node_attributes(&group).is_some_and(|a| a["unet3d"]["label_image"].is_string()) {
            remove_ours(&group)?;
            // Its metadata, then the folder if nothing else is in it.
            std::fs::remove_file(group.join("zarr.json"))
                .with_context(|| format!("removing {}", group.join("zarr.json").display()))?;
            let _ = std::fs::remove_dir(&group);
        }
    }
    // The `labels` group itself once no label image is left in it (describe rewrites it).
    let left = std::fs::read_dir(layout.labels()).map(|d| d.filter_map(|e| e.ok()).count());
    if left.is_ok_and(|n| n == 1) && layout.labels().join("zarr.json").is_file() {
        std::fs::remove_file(layout.labels().join("zarr.json"))
            .with_context(|| format!("removing {}", layout.labels().join("zarr.json").display()))?;
        let _ = std::fs::remove_dir(layout.labels());
    }
    Ok(())
}

/// Removes the arrays directly in `dir` that unet3d infer wrote.
fn remove_ours(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if node_attributes(&path).is_some_and(|a| a["unet3d"]["target"].is_object()) {
            println!("removing {}, an array of an earlier run", path.display());
            zarr::remove_array(&path)?;
        }
    }
    Ok(())
}

/// The attributes in a v3 node's `zarr.json`.
fn node_attributes(dir: &Path) -> Option<Value> {
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("zarr.json")).ok()?).ok()?;
    Some(meta["attributes"].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_box_cuts_a_channels_last_box() {
        let v: Vec<f32> = (0..2 * 3 * 4 * 2).map(|x| x as f32).collect();
        let b = sub_box(&v, [2, 3, 4], 2, [1, 1, 2], [1, 2, 2]);
        assert_eq!(b, vec![36.0, 37.0, 38.0, 39.0, 44.0, 45.0, 46.0, 47.0]);
    }

    #[test]
    fn finished_blocks_are_read_from_their_markers_alone() {
        let dir = std::env::temp_dir().join(format!("unet3d-markers-{}", std::process::id()));
        let layout = Layout::new(&dir);
        std::fs::create_dir_all(&layout.progress).unwrap();
        for name in [
            "block-0.done",
            "block-17.done",
            ".block-3.done.tmp42",
            "block-x.done",
            "block-5.doneX",
            "run.json",
        ] {
            std::fs::write(layout.progress.join(name), b"").unwrap();
        }
        let mut done: Vec<usize> = layout.finished_blocks().unwrap().into_iter().collect();
        done.sort();
        assert_eq!(done, [0, 17]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_one_claim_wins() {
        let dir = std::env::temp_dir().join(format!("unet3d-claim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.json");
        let _ = std::fs::remove_file(&path);
        assert!(claim(&path, &json!({"a": 1})).unwrap());
        assert!(!claim(&path, &json!({"a": 2})).unwrap());
        let kept: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(kept, json!({"a": 1}));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
