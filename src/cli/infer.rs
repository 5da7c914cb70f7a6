//! `unet3d infer`: predict every output target of a volume with a trained network, into
//! `<output_path>/predictions.zarr`, optionally as one of several HPC jobs (`--shard i/n`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGTERM, SIGUSR1};

use super::{EXIT_RERUN, ThreadArgs, Unfinished};
use crate::config::{Config, Normalization};
use crate::data::normalize::{Normalizer, VolumeStats};
use crate::data::ome::{self, Geometry};
use crate::data::volume;
use crate::data::zarr::{ChunkCache, ZarrArray};
use crate::data::{TargetKind, VolumeArray};
use crate::device::Device;
use crate::infer::cases::{self, CaseOutput, Inputs};
use crate::infer::{
    Job, Layout, Mirroring, NetworkPredictor, OutputTarget, RunOptions, Shard, ShardSpec, SlidingWindow,
    Stop, TilePredictor, run,
};
use crate::model::{Network, init};
use crate::train::checkpoint::ModelFile;

/// Predict a volume with the sliding window and write one Zarr array per output target.
///
/// Every inference_config key can be set with --set inference_config.<key>=<value>; the flags
/// below are shorthands for the common ones and win over --set.
#[derive(Args, Debug)]
pub struct InferArgs {
    /// The YAML config; without it, the config the --checkpoint model was trained with (every
    /// model unet3d writes carries it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key, e.g. --set inference_config.overlap=0.5; the value is YAML. Repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Boxed: the flags make the largest subcommand.
    #[command(flatten)]
    keys: Box<KeyFlags>,
    #[command(flatten)]
    job: JobFlags,
}

/// Shorthands for inference_config keys.
#[derive(Args, Debug)]
struct KeyFlags {
    /// inference_config.checkpoint_path: the weights (a training checkpoint or a weights file).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// inference_config.input_path: a Zarr array (data/vol.zarr/input), an OME-Zarr image, a NIfTI
    /// file, a folder of NIfTI files and Zarr stores, or a .txt list of them.
    #[arg(long)]
    input: Option<String>,
    /// inference_config.output_path: predictions.zarr and .progress/ go here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// inference_config.patch_size (z, y, x).
    #[arg(long, num_args = 3, value_names = ["Z", "Y", "X"])]
    patch_size: Option<Vec<usize>>,
    /// inference_config.batch_size: windows per forward pass.
    #[arg(long)]
    batch_size: Option<usize>,
    /// inference_config.overlap: the fraction of a window its neighbours share.
    #[arg(long)]
    overlap: Option<f64>,
    /// inference_config.output_targets: comma-separated names, or "all".
    #[arg(long, value_delimiter = ',')]
    output_targets: Option<Vec<String>>,
    /// inference_config.output_type: uint8, uint16, float32 or float16 (values and probabilities).
    #[arg(long)]
    output_type: Option<String>,
    /// inference_config.mirroring (default true): average each window's predictions over the flips
    /// of the axes the training mirrored (tr_config.augmentation.mirror_axes; 8x the work for all
    /// three).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    mirroring: Option<bool>,
    /// inference_config.save_probabilities: write label targets' probabilities (their activated
    /// values) instead of label maps.
    #[arg(long)]
    save_probabilities: bool,
    /// inference_config.pyramid_levels: write this many lower-resolution levels beside each Zarr
    /// output (OME-Zarr multiscales), for viewers.
    #[arg(long, value_name = "N")]
    pyramid_levels: Option<usize>,
    /// The same as --mirroring false: one prediction per window.
    #[arg(long, conflicts_with = "mirroring")]
    no_mirroring: bool,
    /// inference_config.targets.<target>.activation, e.g. --activation sheet=sigmoid. Repeatable.
    #[arg(long, value_name = "TARGET=ACTIVATION")]
    activation: Vec<String>,
}

/// How this job runs (nothing here changes the output).
#[derive(Args, Debug)]
struct JobFlags {
    /// Predict with a fresh network initialised from this seed instead of a checkpoint: times a
    /// plan on this machine before any training (the predictions mean nothing).
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// This job's share of the output blocks: job i of n counted from 0 (0/4 .. 3/4), or auto:
    /// the task of a SLURM job array (SLURM_ARRAY_TASK_ID minus _MIN, of SLURM_ARRAY_TASK_COUNT).
    #[arg(long, default_value = "0/1")]
    shard: ShardSpec,
    /// Replace an existing output instead of refusing (or resuming) it; single jobs only.
    #[arg(long)]
    overwrite: bool,
    /// cpu, cuda:N, or sim (the CUDA kernels on the CPU: slow, for checking). Default: tr_setup.device.
    #[arg(long)]
    device: Option<Device>,
    /// Stop after this many blocks; a rerun continues (exit status 75).
    #[arg(long)]
    max_blocks: Option<usize>,
    /// Stop before a block that would end later than this after the start, e.g. 3h50m under a
    /// 4 h limit; a rerun continues (exit status 75). SIGTERM and SIGUSR1 also stop the job after
    /// its current block.
    #[arg(long, value_parser = humantime::parse_duration)]
    stop_after: Option<std::time::Duration>,
    #[command(flatten)]
    threads: ThreadArgs,
    /// The array inside each Zarr store of a folder or list input.
    #[arg(long, default_value = "input")]
    input_array: String,
    /// Memory for the blending buffers in MB; sets the block size when the output is created.
    #[arg(long, default_value_t = 1024)]
    block_mb: usize,
    /// Memory for decoded input chunks in MB.
    #[arg(long, default_value_t = 512)]
    cache_mb: usize,
}

/// A YAML string for a `--set` value (JSON strings are YAML).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

impl KeyFlags {
    /// The flags as `--set` overrides, after the user's own.
    fn sets(&self, user: &[String]) -> Result<Vec<String>> {
        let mut sets = user.to_vec();
        let mut set = |key: &str, value: String| sets.push(format!("inference_config.{key}={value}"));
        if let Some(p) = &self.checkpoint {
            set("checkpoint_path", yaml_str(&p.to_string_lossy()));
        }
        if let Some(p) = &self.input {
            set("input_path", yaml_str(p));
        }
        if let Some(p) = &self.output {
            set("output_path", yaml_str(&p.to_string_lossy()));
        }
        if let Some(p) = &self.patch_size {
            set("patch_size", format!("{p:?}"));
        }
        if let Some(b) = self.batch_size {
            set("batch_size", b.to_string());
        }
        if let Some(o) = self.overlap {
            set("overlap", o.to_string());
        }
        if let Some(t) = &self.output_targets {
            let names: Vec<String> = t.iter().map(|n| yaml_str(n)).collect();
            set("output_targets", format!("[{}]", names.join(", ")));
        }
        if let Some(t) = &self.output_type {
            set("output_type", yaml_str(t));
        }
        if self.save_probabilities {
            set("save_probabilities", "true".to_string());
        }
        if let Some(n) = self.pyramid_levels {
            set("pyramid_levels", n.to_string());
        }
        if let Some(m) = self.mirroring.or(self.no_mirroring.then_some(false)) {
            set("mirroring", m.to_string());
        }
        for a in &self.activation {
            let Some((target, activation)) = a.split_once('=') else {
                bail!("--activation '{a}': expected TARGET=ACTIVATION, e.g. sheet=sigmoid");
            };
            set(&format!("targets.{target}.activation"), yaml_str(activation));
        }
        Ok(sets)
    }
}

impl InferArgs {
    pub fn run(self) -> Result<()> {
        let start = std::time::Instant::now();
        let sets = self.keys.sets(&self.set)?;
        let flags = self.job;
        flags.threads.apply()?;
        let shard = flags.shard.resolve(&|k| std::env::var(k).ok())?;
        // The scheduler's warning before a time limit or preemption: finish the block, then stop.
        let interrupt = Arc::new(AtomicBool::new(false));
        for signal in [SIGTERM, SIGUSR1] {
            signal_hook::flag::register(signal, Arc::clone(&interrupt))
                .with_context(|| format!("installing the handler of signal {signal}"))?;
        }
        if let (Some(_), Some(p)) = (flags.random_weights, &self.keys.checkpoint) {
            bail!("--random-weights with --checkpoint {}: choose one", p.display());
        }
        // Read once: the config it carries (without --config), its weights and CT statistics.
        let mut model_file = self.keys.checkpoint.as_deref().map(ModelFile::open).transpose()?;
        let (parsed, trained) = match (&self.config, &model_file) {
            (Some(path), _) => (Config::load(path, &sets)?, None),
            (None, Some(file)) => {
                let model = file.path();
                let Some(record) = file.record()? else {
                    bail!(
                        "{}: carries no training config (written by an older unet3d, or elsewhere); pass \
                         --config with the YAML it was trained with",
                        model.display()
                    );
                };
                let all: Vec<String> = record.config_sets.iter().chain(&sets).cloned().collect();
                let parsed = Config::parse_in(&record.config_yaml, &all, record.config_dir.as_deref())
                    .with_context(|| format!("{}: the training config it carries", model.display()))?;
                (parsed, Some(record.architecture))
            }
            (None, None) => bail!("give --checkpoint MODEL (its training config comes with it) or --config"),
        };
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
        let config = parsed.config;
        // An `auto` patch is planned when training; a model records the planned one.
        ensure!(
            !config.tr_config.planned.patch,
            "tr_config.patch_size is auto, which only unet3d train plans: predict with the model's own \
             config (leave out --config) or give the planned patch (--set tr_config.patch_size=[z,y,x])"
        );
        let device = flags.device.unwrap_or(config.tr_setup.device);
        let ic = &config.inference_config;
        let Some(input_path) = &ic.input_path else {
            bail!("inference_config.input_path is not set (or pass --input)");
        };
        let inputs = cases::resolve(Path::new(input_path), &flags.input_array)
            .with_context(|| format!("inference_config.input_path {input_path}"))?;

        let arch = config.architecture()?;
        if let Some(trained) = trained
            && trained != arch
        {
            let diff =
                crate::config::differences(&serde_json::to_value(&trained)?, &serde_json::to_value(&arch)?);
            bail!(
                "the config now builds another network than the model was trained as (a --set override, \
                 or another unet3d's planner); trained vs now:\n  {}",
                diff.join("\n  ")
            );
        }
        if let (Some(seed), Some(p)) = (flags.random_weights, &ic.checkpoint_path) {
            eprintln!(
                "warning: --random-weights {seed}: the config's inference_config.checkpoint_path {} is \
                 not used",
                p.display()
            );
        }
        // `ct` channels normalise with the training set's statistics, which the model carries.
        let (mut store, weights, ct) = match (flags.random_weights, &ic.checkpoint_path) {
            (Some(seed), _) => (init::initialize(&arch, seed)?, Weights::RandomWeights { seed }, None),
            (None, Some(path)) => {
                let file = match model_file.take() {
                    Some(f) if f.path() == path => f,
                    _ => ModelFile::open(path)?,
                };
                let (crc32c, ct) = (file.crc32c(), file.ct_stats()?);
                (file.weights(&arch)?, Weights::Checkpoint { path: path.clone(), crc32c }, ct)
            }
            (None, None) => bail!("inference_config.checkpoint_path is not set (or pass --checkpoint)"),
        };
        let dc = &config.dataset_config;
        let targets: Vec<OutputTarget> = ic
            .output_targets
            .iter()
            .map(|name| {
                let t = dc.target(name).expect("the config reader checks output_targets");
                OutputTarget {
                    name: name.clone(),
                    channels: t.channels,
                    activation: ic.activation(name).unwrap_or(t.activation),
                    vectors: TargetKind::of(t) == TargetKind::Vectors,
                    output_type: ic.output_type_for(t),
                    range: ic.value_range(t),
                    labels: ic.label_rule(t),
                }
            })
            .collect();
        let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
        store.to_device(device).with_context(|| format!("device {device}"))?;
        // nnU-Net mirrors over the axes the training mirrored: only those are learned invariances.
        let aug = &config.tr_config.augmentation;
        let mirror_axes = if ic.mirroring && aug.enabled { aug.mirror_axes.clone() } else { Vec::new() };
        let network = NetworkPredictor::new(Network::new(&arch, &store)?, store, &names)?;
        let predictor = with_mirroring(network, &mirror_axes, &targets)?;
        let cache = ChunkCache::new(flags.cache_mb << 20);
        let job = CaseJob {
            config: &config,
            predictor: predictor.as_ref(),
            targets: &targets,
            ct: ct.as_ref(),
            weights,
            mirror_axes,
            device,
        };
        let mut opts = RunOptions {
            layout: Layout::new(&ic.output_path),
            shard,
            overwrite: flags.overwrite,
            max_blocks: flags.max_blocks,
            deadline: flags.stop_after.map(|d| start + d),
            interrupt: Some(interrupt),
            block_bytes: flags.block_mb << 20,
            show_progress: true,
        };
        let began = std::time::Instant::now();
        let cases = match inputs {
            Inputs::Volume(path) => {
                let input = ZarrArray::open(&path, dc.in_channels, &cache)
                    .with_context(|| format!("inference_config.input_path {input_path}"))?;
                let input = if dc.allow_missing_chunks { input } else { input.refusing_missing_chunks() };
                let described = Described {
                    geometry: volume::recorded_geometry(&path, &input)?,
                    image: ome::image_of(&path),
                    pyramid_levels: ic.pyramid_levels,
                };
                let summary = job.predict(&input, &path.display().to_string(), described, &opts)?;
                report(&summary, shard, began);
                println!("output: {}", opts.layout.store.display());
                return match summary.stopped {
                    Some(why) => {
                        Err(stopped(shard, summary.blocks.len() - summary.skipped - summary.computed, why))
                    }
                    None => Ok(()),
                };
            }
            Inputs::Cases(cases) => cases,
        };
        // Sharded jobs split the cases; each case is one job's whole.
        let mine = shard.blocks(cases.len());
        println!("{} cases, {} for shard {shard}", cases.len(), mine.len());
        opts.shard = Shard::WHOLE;
        let (mut done, mut skipped) = (0, 0);
        for (n, case) in cases[mine.clone()].iter().enumerate() {
            let out = CaseOutput::new(&ic.output_path, case, &targets);
            if out.finished() && !flags.overwrite {
                skipped += 1;
                continue;
            }
            out.prepare(flags.overwrite)?;
            let opened = cases::open(case, dc.in_channels, dc.allow_missing_chunks, &cache)?;
            println!("case {}/{} {}", n + 1, mine.len(), case.name);
            opts.layout = out.layout.clone();
            let input = opened.array.as_ref();
            // A NIfTI case's working store becomes one file: no levels.
            let pyramid_levels = if opened.header.is_some() { 0 } else { ic.pyramid_levels };
            let described =
                Described { geometry: opened.geometry, image: opened.image.clone(), pyramid_levels };
            let summary = job.predict(input, input.name(), described, &opts)?;
            if let Some(m) = &mut opts.max_blocks {
                *m -= summary.computed;
            }
            if let Some(why) = summary.stopped {
                let left = mine.len() - n;
                return Err(Unfinished(format!(
                    "unet3d infer shard {shard}: stopped in case {} with {left} cases left ({why}); run \
                     the same command again to continue (exit status {EXIT_RERUN})",
                    case.name
                ))
                .into());
            }
            out.complete(&targets, opened.header.as_ref())?;
            done += 1;
        }
        println!(
            "unet3d infer shard {shard}: {done} cases predicted, {skipped} already finished, in {:.1}s; \
             output: {}",
            began.elapsed().as_secs_f64(),
            ic.output_path.display()
        );
        Ok(())
    }
}

/// How one volume's outputs are described: its geometry, the OME-Zarr image it belongs to, and
/// the levels written.
struct Described {
    geometry: Geometry,
    image: Option<PathBuf>,
    pyramid_levels: usize,
}

/// What every volume of one `infer` command shares.
struct CaseJob<'a> {
    config: &'a Config,
    predictor: &'a dyn TilePredictor,
    targets: &'a [OutputTarget],
    ct: Option<&'a crate::data::normalize::CtStats>,
    weights: Weights,
    mirror_axes: Vec<usize>,
    device: Device,
}

impl CaseJob<'_> {
    /// Predicts one volume into `opts.layout` (resuming what an earlier run left there).
    fn predict(
        &self,
        input: &dyn VolumeArray,
        input_name: &str,
        described: Described,
        opts: &RunOptions,
    ) -> Result<run::Summary> {
        let dc = &self.config.dataset_config;
        let ic = &self.config.inference_config;
        let schemes = &dc.normalization;
        let stats = if Normalizer::needs_volume_stats(schemes) {
            // Every job needs the whole volume's statistics: reuse the first job's rather than
            // read the volume again.
            let recorded = if opts.overwrite { None } else { run::recorded_provenance(&opts.layout)? };
            let recorded =
                recorded.map(serde_json::from_value::<Provenance>).transpose().with_context(|| {
                    format!("{}: unreadable provenance", opts.layout.progress.join("run.json").display())
                })?;
            match recorded.filter(|p| p.input == input_name).and_then(|p| p.volume_stats) {
                Some(stats) => Some(stats),
                None => Some(
                    VolumeStats::compute(input, dc.nan_policy)
                        .with_context(|| format!("statistics of {input_name}"))?,
                ),
            }
        } else {
            None
        };
        let normalizer = Normalizer::new(schemes, input.dtype(), stats.as_ref(), self.ct)
            .with_context(|| format!("normalising {input_name}"))?
            .with_nan_policy(dc.nan_policy);
        let window = SlidingWindow::new(
            input,
            &normalizer,
            self.predictor,
            self.targets.iter().map(|t| t.channels).collect(),
            ic.patch_size,
            ic.overlap,
            ic.batch_size,
        )?;
        let provenance = serde_json::to_value(Provenance {
            input: input_name.to_string(),
            weights: self.weights.clone(),
            normalization: schemes.clone(),
            volume_stats: stats,
            mirroring_axes: self.mirror_axes.clone(),
            device: self.device.to_string(),
        })?;
        let Described { geometry, image, pyramid_levels } = described;
        let job = Job { window, targets: self.targets.to_vec(), provenance, geometry, pyramid_levels, image };
        run::run(&job, opts)
    }
}

fn report(summary: &run::Summary, shard: Shard, began: std::time::Instant) {
    let secs = began.elapsed().as_secs_f64();
    println!(
        "unet3d infer shard {shard}: blocks {:?}: {} computed, {} already finished; {} windows in \
         {secs:.1}s ({:.2} windows/s){}",
        summary.blocks,
        summary.computed,
        summary.skipped,
        summary.tiles,
        summary.tiles as f64 / secs.max(1e-9),
        if summary.done { "; this shard is complete" } else { "" }
    );
}

fn stopped(shard: Shard, left: usize, why: Stop) -> anyhow::Error {
    Unfinished(format!(
        "unet3d infer shard {shard}: stopped with {left} blocks left ({why}); run the same command \
         again to continue (exit status {EXIT_RERUN})"
    ))
    .into()
}

/// What decides an inference job's bytes besides the window and targets, recorded in run.json:
/// a later job refuses to write into a store whose record differs, and reuses its statistics.
#[derive(Debug, Serialize, Deserialize)]
struct Provenance {
    input: String,
    weights: Weights,
    normalization: Vec<Normalization>,
    /// The whole input's statistics, for `zscore`.
    volume_stats: Option<VolumeStats>,
    mirroring_axes: Vec<usize>,
    /// Devices sum in different orders: the jobs of one output share one, so it is byte-consistent.
    device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Weights {
    Checkpoint { path: PathBuf, crc32c: u32 },
    RandomWeights { seed: u64 },
}

/// The predictor, wrapped in nnU-Net's mirroring over the training's mirror axes unless
/// `inference_config.mirroring` is off (or the training mirrored nothing).
fn with_mirroring<P: TilePredictor + 'static>(
    p: P,
    axes: &[usize],
    targets: &[OutputTarget],
) -> Result<Box<dyn TilePredictor>> {
    if axes.is_empty() {
        return Ok(Box::new(p));
    }
    let m = Mirroring::new(p, axes, targets.iter().map(|t| t.vectors).collect())?;
    println!("mirroring over axes {axes:?} (z = 0, y = 1, x = 2): {} predictions per window", m.passes());
    Ok(Box::new(m))
}
