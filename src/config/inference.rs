//! `inference_config`: sliding-window prediction over a volume and what is written.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::dataset::{Activation, LabelRule, TargetConfig, TargetKind, activation};
use super::reader::{Section, boolean, choice, count_from, list_of, number, number_in, size3, string};
use super::tree::Node;

/// How a target's output array stores values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    /// [0, 1] scaled to 0..255 (normals: [-1, 1] to 0..255).
    Uint8,
    /// As uint8, to 0..65535.
    Uint16,
    Float32,
    /// IEEE half precision (11 significant bits): half the disk of float32 for regression maps.
    Float16,
}

impl OutputType {
    /// Whether values are stored as integers (scaled from a value range) rather than as floats.
    pub fn is_integer(self) -> bool {
        matches!(self, OutputType::Uint8 | OutputType::Uint16)
    }
}

/// The names, and the seed's numpy spellings.
const OUTPUT_TYPES: &[(&str, OutputType)] = &[
    ("uint8", OutputType::Uint8),
    ("uint16", OutputType::Uint16),
    ("float32", OutputType::Float32),
    ("float16", OutputType::Float16),
    ("np.uint8", OutputType::Uint8),
    ("np.uint16", OutputType::Uint16),
    ("np.float32", OutputType::Float32),
    ("np.float16", OutputType::Float16),
];

#[derive(Debug, Clone, PartialEq)]
pub struct InferenceConfig {
    pub checkpoint_path: Option<PathBuf>,
    /// The input volume (a Zarr path or URL); `unet3d infer` requires it.
    pub input_path: Option<String>,
    pub output_path: PathBuf,
    /// (z, y, x); defaults to the training patch.
    pub patch_size: [usize; 3],
    /// Defaults to the training batch size.
    pub batch_size: usize,
    /// Fraction of a patch that neighbouring windows share: step = patch * (1 - overlap).
    pub overlap: f64,
    /// Targets written, in the order of `dataset_config.targets`.
    pub output_targets: Vec<String>,
    /// None: uint16 for vectors (the seed's normals), float32 for regression targets (an integer
    /// would clip them), uint8 for the rest.
    pub output_type: Option<OutputType>,
    /// Applied to each target's output before writing: (target, activation), one per target in
    /// the order of `dataset_config.targets`.
    pub activations: Vec<(String, Activation)>,
    /// Test-time augmentation (default on): average over the flips of the training's mirror axes.
    pub mirroring: bool,
    /// Write label targets' activated values (probabilities) instead of their label maps.
    pub save_probabilities: bool,
    /// Lower-resolution levels written beside each Zarr output (`infer::pyramid`), for viewers.
    pub pyramid_levels: usize,
    /// (target, [lo, hi]): the values an integer output's 0..max stands for, per regression target.
    pub ranges: Vec<(String, [f64; 2])>,
    pub num_dataloader_workers: usize,
}

impl InferenceConfig {
    pub fn output_type_for(&self, target: &TargetConfig) -> OutputType {
        match (self.output_type, TargetKind::of(target)) {
            (Some(t), _) => t,
            (None, TargetKind::Vectors) => OutputType::Uint16,
            (None, TargetKind::Values) => OutputType::Float32,
            (None, TargetKind::Labels) => OutputType::Uint8,
        }
    }

    /// The values an integer output of `target` spans: the `range` given for it, else [0, 1] after
    /// a sigmoid or softmax; None where nothing bounds them (a regression target's raw values).
    /// Vectors are unit length and always span [-1, 1].
    pub fn value_range(&self, target: &TargetConfig) -> Option<[f64; 2]> {
        if let Some((_, r)) = self.ranges.iter().find(|(t, _)| *t == target.name) {
            return Some(*r);
        }
        match self.activation(&target.name).unwrap_or(target.activation) {
            Activation::Sigmoid | Activation::Softmax => Some([0.0, 1.0]),
            Activation::None => None,
        }
    }

    /// How `target` is written as labels: its rule unless probabilities are asked for.
    pub fn label_rule(&self, target: &TargetConfig) -> Option<LabelRule> {
        target.label_rule().filter(|_| !self.save_probabilities)
    }

    pub fn activation(&self, target: &str) -> Option<Activation> {
        self.activations.iter().find(|(t, _)| t == target).map(|(_, a)| *a)
    }
}

const INFERENCE_IGNORED: &[(&str, &str)] = &[
    ("type", "the seed ignores it too; output_type sets the output dtype"),
    ("output_dir", "the seed ignores it too; output_path sets the output directory"),
    ("load_all", "unet3d streams the input chunk by chunk, so memory stays bounded"),
    ("load_strict", "unet3d always loads checkpoints strictly: names and shapes must match"),
];

/// Reads `inference_config`, whose patch and batch default to training's.
pub(crate) fn read_inference_config(
    mut s: Section<'_>,
    targets: &[TargetConfig],
    train_patch: [usize; 3],
    train_batch: usize,
) -> Result<InferenceConfig> {
    let path = |n: &Node| string(n).map(PathBuf::from).map_err(|_| "a path (string)".to_string());
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    // The seed's format keys: unet3d recognises each input by its path and writes the output in
    // the input's kind (NIfTI for NIfTI, Zarr for Zarr).
    let format = |n: &Node| match n {
        Node::Str(f) if ["zarr", "nifti"].iter().any(|k| f.eq_ignore_ascii_case(k)) => Ok(()),
        _ => Err("\"zarr\" or \"nifti\" (either way the input's path decides, and outputs follow the input)"
            .to_string()),
    };
    s.get("input_format", (), &format)?;
    s.get("output_format", (), &format)?;
    let output_targets = s.get("output_targets", names.iter().map(|t| t.to_string()).collect(), &|n| {
        let allowed = || format!("\"all\" or a list of target names ({})", names.join(", "));
        let listed: Vec<String> = match n {
            Node::Str(a) if a == "all" => return Ok(names.iter().map(|t| t.to_string()).collect()),
            Node::Seq(items) => items.iter().map(string).collect::<Result<_, _>>().map_err(|_| allowed())?,
            _ => return Err(allowed()),
        };
        if listed == ["all"] {
            return Ok(names.iter().map(|t| t.to_string()).collect());
        }
        if listed.is_empty() || listed.iter().any(|t| !names.contains(&t.as_str())) {
            return Err(allowed());
        }
        Ok(names.iter().filter(|t| listed.iter().any(|l| l == *t)).map(|t| t.to_string()).collect())
    })?;
    let output_type = s.optional("output_type", &choice(OUTPUT_TYPES))?;

    let mut activations: Vec<(String, Activation)> =
        targets.iter().map(|t| (t.name.clone(), t.activation)).collect();
    let mut ranges = Vec::new();
    for (name, mut t) in s.named_sections("targets")? {
        let Some(target) = targets.iter().find(|t| t.name == name) else {
            bail!("{}: not a target of dataset_config.targets ({})", t.path(), names.join(", "));
        };
        t.get("channels", target.channels, &|n| match count_from(1)(n) {
            Ok(c) if c == target.channels => Ok(c),
            _ => Err(format!("{} (dataset_config.targets.{name}.channels)", target.channels)),
        })?;
        let a = t.get("activation", target.activation, &activation)?;
        activations.iter_mut().filter(|(n, _)| *n == name).for_each(|(_, slot)| *slot = a);
        let range = t.optional("range", &|n| {
            let r =
                list_of(2, false, number)(n).map_err(|_| "[lo, hi], two numbers with lo < hi".to_string())?;
            if r[0] < r[1] { Ok([r[0], r[1]]) } else { Err("[lo, hi], two numbers with lo < hi".to_string()) }
        })?;
        ranges.extend(range.map(|r| (name.clone(), r)));
        t.finish(&[("weight", "the seed ignores it too: weights scale training losses only")]);
    }

    let config = InferenceConfig {
        checkpoint_path: s.optional("checkpoint_path", &path)?,
        input_path: s.optional("input_path", &|n| string(n).map_err(|_| "a path or URL (string)".into()))?,
        output_path: s.get("output_path", PathBuf::from("./outputs"), &path)?,
        patch_size: s.get("patch_size", train_patch, &size3)?,
        batch_size: s.get("batch_size", train_batch, &count_from(1))?,
        overlap: s.get("overlap", 0.25, &|n| match number_in(0.0, 1.0)(n) {
            Ok(x) if x < 1.0 => Ok(x),
            _ => Err("a fraction in [0, 1)".into()),
        })?,
        output_targets,
        output_type,
        activations,
        mirroring: s.get("mirroring", true, &boolean)?,
        save_probabilities: s.get("save_probabilities", false, &boolean)?,
        pyramid_levels: s.get("pyramid_levels", 0, &count_from(0))?,
        num_dataloader_workers: s.get("num_dataloader_workers", 4, &count_from(0))?,
        ranges,
    };
    // An integer output of unbounded values would clip them without a word (a distance map in
    // uint8 came out 87% at 255).
    for name in &config.output_targets {
        let t = targets.iter().find(|t| t.name == *name).expect("output targets are targets");
        let ty = config.output_type_for(t);
        if ty.is_integer() && TargetKind::of(t) == TargetKind::Values && config.value_range(t).is_none() {
            bail!(
                "{}: {ty:?} output of regression target '{name}', whose values nothing bounds; give \
                 {}.targets.{name}.range: [lo, hi] (the values 0..max stands for), an activation, or \
                 output_type: float32",
                s.key_path("output_type"),
                s.path()
            );
        }
    }
    s.finish(INFERENCE_IGNORED);
    Ok(config)
}
