//! `dataset_config`: targets (one decoder each), the volumes, patch search, normalisation and
//! sampling.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::reader::{
    Section, boolean, choice, count_from, is_plain_name, list_of, non_negative, probability, string,
};
use super::tree::Node;
use crate::device::op::Pointwise;
use crate::loss::{LOSS_NAMES, Loss};

/// Applied to a target's output at inference (and in the seed's eval-mode forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Sigmoid,
    /// Softmax over the channels.
    Softmax,
}

const ACTIVATIONS: &[(&str, Activation)] =
    &[("none", Activation::None), ("sigmoid", Activation::Sigmoid), ("softmax", Activation::Softmax)];

pub(crate) fn activation(n: &Node) -> Result<Activation, String> {
    choice(ACTIVATIONS)(n)
}

/// One task: a decoder with `channels` outputs and its loss.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    pub name: String,
    pub channels: usize,
    pub activation: Activation,
    /// Multiplies this task's loss in training (not in validation, as the seed).
    pub weight: f64,
    pub loss_fn: String,
    pub loss: Loss,
    /// A name per channel (`unet3d convert` writes the dataset's labels, background first), which
    /// metrics and logs use instead of class numbers.
    pub class_names: Option<Vec<String>>,
}

impl TargetConfig {
    /// The names of the classes a label target is scored on: 1..C for a softmax target (class 0
    /// is background), every channel for a sigmoid one; `class_names` where given, else numbers.
    pub fn scored_classes(&self) -> Vec<String> {
        let first = usize::from(self.label_rule() == Some(LabelRule::Argmax));
        (first..self.channels)
            .map(|k| self.class_names.as_ref().map_or_else(|| k.to_string(), |n| n[k].clone()))
            .collect()
    }

    /// The seed's special task name (any case): unit vectors, rotated and flipped as vectors and
    /// re-normalised at inference.
    pub fn is_normals(&self) -> bool {
        self.name.eq_ignore_ascii_case("normals")
    }

    /// How this target's logits become a label map, by its loss: one class per voxel for the
    /// softmax losses, one mask per channel for the sigmoid ones; None for values and vectors.
    pub fn label_rule(&self) -> Option<LabelRule> {
        if TargetKind::of(self) != TargetKind::Labels {
            return None;
        }
        Some(match &self.loss {
            Loss::DiceCe(_) | Loss::CrossEntropy(_) => LabelRule::Argmax,
            _ => LabelRule::Threshold,
        })
    }
}

/// How blended logits become labels (nnU-Net's export): the logits decide, before any activation,
/// so a label map is the same whatever `activation` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelRule {
    /// The index of the largest channel (softmax targets): one channel of class indices.
    Argmax,
    /// 1 where a channel's logit is positive (its sigmoid above 0.5), per channel.
    Threshold,
}

/// How a target's values move under augmentation and resampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Integer-valued maps (class indices, binary masks): resampled by the label rule, never
    /// blended into non-integer values.
    Labels,
    /// Continuous values (distance maps, ...): resampled trilinearly.
    Values,
    /// A vector per voxel along the channels (the seed's normals): resampled trilinearly, and
    /// rotated and flipped as vectors with the volume.
    Vectors,
}

impl TargetKind {
    /// What `target`'s loss and name make of it.
    pub fn of(target: &TargetConfig) -> TargetKind {
        match &target.loss {
            _ if target.is_normals() => TargetKind::Vectors,
            Loss::DiceCe(_) | Loss::CrossEntropy(_) | Loss::BceDice { .. } => TargetKind::Labels,
            Loss::Pointwise(Pointwise::BceWithLogits(_) | Pointwise::Bce, _) => TargetKind::Labels,
            Loss::MaskedCosine => TargetKind::Vectors,
            Loss::Pointwise(..) => TargetKind::Values,
        }
    }
}

/// One training volume: an input array and one array per target, as paths or URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePaths {
    pub input: String,
    /// (target name, path), in the order of `targets`.
    pub targets: Vec<(String, String)>,
    /// The target whose labels the patch search scans.
    pub ref_label: String,
}

/// Intensity normalisation of one input channel, the same in training and inference. Recorded
/// by the names the config spells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// The seed's dtype scaling: uint8 / 255, uint16 / 65535, floats unchanged.
    ScaleToUnit,
    /// Per-image (x - mean) / max(std, 1e-8).
    #[serde(rename = "zscore")]
    ZScore,
    /// nnU-Net's CT scheme: clip to the foreground's [0.5, 99.5] percentiles, then z-score with
    /// the foreground's mean and std, over the training set.
    Ct,
    None,
}

const NORMALIZATIONS: &[(&str, Normalization)] = &[
    ("scale_to_unit", Normalization::ScaleToUnit),
    ("zscore", Normalization::ZScore),
    ("ct", Normalization::Ct),
    ("none", Normalization::None),
];

/// How training patches are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The seed's: a grid of candidates on the ref_label arrays, kept if dense enough
    /// (min_labeled_ratio, min_bbox_percent).
    PatchSearch,
    /// nnU-Net's: uniformly random patches, the last `oversample_foreground` of each batch
    /// centred on a random foreground voxel.
    Random { oversample_foreground: f64 },
}

/// `sampling`'s spellings; `oversample_foreground` completes `random`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SamplingKind {
    PatchSearch,
    Random,
}

const SAMPLINGS: &[(&str, SamplingKind)] =
    &[("patch_search", SamplingKind::PatchSearch), ("random", SamplingKind::Random)];

/// `nan_policy`'s spellings; `nan_value` completes `replace`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NanPolicyKind {
    Error,
    Replace,
    SkipPatch,
}

const NAN_POLICIES: &[(&str, NanPolicyKind)] = &[
    ("error", NanPolicyKind::Error),
    ("replace", NanPolicyKind::Replace),
    ("skip_patch", NanPolicyKind::SkipPatch),
];

/// What training and statistics do with a non-finite stored value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NanPolicy {
    /// Refuse the volume, naming the array and the voxel.
    Error,
    /// Read it as this value (before normalisation), in statistics and patches alike.
    Replace(f32),
    /// Leave it out of the statistics and draw another patch wherever a patch holds one.
    SkipPatch,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatasetConfig {
    pub min_labeled_ratio: f64,
    pub min_bbox_percent: f64,
    pub use_cache: bool,
    pub cache_folder: PathBuf,
    pub in_channels: usize,
    /// In YAML order, which is the order of the decoders.
    pub targets: Vec<TargetConfig>,
    pub volume_paths: Vec<VolumePaths>,
    /// One per input channel.
    pub normalization: Vec<Normalization>,
    pub sampling: Sampling,
    /// What a NaN or infinity in a volume does: refuse it (the default), read it as a value, or
    /// skip the patches that hold one.
    pub nan_policy: NanPolicy,
    /// Whether a chunk missing from an input array reads as the fill value; otherwise it is an
    /// error naming the chunk. Target arrays may always be sparse.
    pub allow_missing_chunks: bool,
}

impl DatasetConfig {
    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}

const DATASET_IGNORED: &[(&str, &str)] =
    &[("cache_file", "the seed ignores it too: the patch cache is written to cache_folder")];

pub(crate) fn read_dataset_config(mut s: Section<'_>) -> Result<DatasetConfig> {
    let in_channels = s.get("in_channels", 1, &count_from(1))?;
    let mut targets = Vec::new();
    for (name, t) in s.named_sections("targets")? {
        targets.push(read_target(name, t)?);
    }
    if targets.is_empty() {
        bail!(
            "{}: no targets; give at least one, e.g. `targets: {{ink: {{channels: 1}}}}`",
            s.key_path("targets")
        );
    }
    let mut volume_paths = Vec::new();
    for v in s.list_sections("volume_paths")? {
        volume_paths.push(read_volume(v, &targets)?);
    }
    let normalization = s.get("normalization", vec![Normalization::ScaleToUnit; in_channels], &|n| {
        let scheme = choice(NORMALIZATIONS);
        super::reader::list_of(in_channels, true, scheme)(n).map_err(|e| {
            format!("one scheme for all {in_channels} input channels or a list of one per channel ({e})")
        })
    })?;
    let sampling = s.get("sampling", SamplingKind::PatchSearch, &choice(SAMPLINGS))?;
    let oversample = s.optional("oversample_foreground", &probability)?;
    let sampling = match sampling {
        SamplingKind::PatchSearch => {
            if oversample.is_some() {
                let key = s.key_path("oversample_foreground");
                s.ctx().warn(format!("{key}: ignored (only sampling: random uses it)"));
            }
            Sampling::PatchSearch
        }
        SamplingKind::Random => Sampling::Random { oversample_foreground: oversample.unwrap_or(0.33) },
    };
    let nan_value = s.optional("nan_value", &super::reader::number)?;
    let nan_policy = match s.get("nan_policy", NanPolicyKind::Error, &choice(NAN_POLICIES))? {
        NanPolicyKind::Error => NanPolicy::Error,
        NanPolicyKind::Replace => NanPolicy::Replace(nan_value.unwrap_or(0.0) as f32),
        NanPolicyKind::SkipPatch => NanPolicy::SkipPatch,
    };
    if nan_value.is_some() && !matches!(nan_policy, NanPolicy::Replace(_)) {
        let key = s.key_path("nan_value");
        s.ctx().warn(format!("{key}: ignored (only nan_policy: replace uses it)"));
    }
    let config = DatasetConfig {
        min_labeled_ratio: s.get("min_labeled_ratio", 0.1, &probability)?,
        min_bbox_percent: s.get("min_bbox_percent", 0.95, &probability)?,
        use_cache: s.get("use_cache", true, &boolean)?,
        cache_folder: s
            .get("cache_folder", PathBuf::from("patch_cache"), &|n| string(n).map(PathBuf::from))?,
        in_channels,
        targets,
        volume_paths,
        normalization,
        sampling,
        nan_policy,
        allow_missing_chunks: s.get("allow_missing_chunks", false, &boolean)?,
    };
    s.finish(DATASET_IGNORED);
    Ok(config)
}

fn read_target(name: String, mut s: Section<'_>) -> Result<TargetConfig> {
    if !is_plain_name(&name) || name == "input" || name == "ref_label" {
        bail!(
            "{}: target name {name:?} must be a plain name (ASCII letters, digits, '-' and '_': it names \
             parameters, output arrays and folders) and neither \"input\" nor \"ref_label\" (keys of \
             volume_paths entries)",
            s.path()
        );
    }
    let channels = match s.optional("channels", &count_from(1))? {
        Some(c) => c,
        None => {
            bail!("{}: missing; every target needs its number of output channels", s.key_path("channels"))
        }
    };
    let activation = s.get("activation", Activation::None, &activation)?;
    let weight = s.get("weight", 1.0, &non_negative)?;
    let loss_fn = s.get("loss_fn", "BCEDiceLoss".to_string(), &|n| match n {
        Node::Str(l) if LOSS_NAMES.contains(&l.as_str()) => Ok(l.clone()),
        _ => Err(format!("one of {}", LOSS_NAMES.join(", "))),
    })?;
    let kwargs = match s.node("loss_kwargs") {
        None => &Node::Null,
        Some(n @ Node::Map(_)) => n,
        Some(n) => {
            return s.invalid("loss_kwargs", n, &format!("a mapping of keyword arguments for {loss_fn}"));
        }
    };
    let loss = match Loss::from_config(&loss_fn, &kwargs.to_json()) {
        Ok(l) => l,
        Err(e) => bail!("{} = {kwargs}: {e}", s.key_path("loss_kwargs")),
    };
    let class_names = s.optional("class_names", &|n: &Node| {
        let names = list_of(channels, false, string)(n)
            .map_err(|e| format!("{e} (one name per channel, background first for a softmax target)"))?;
        match names.iter().enumerate().find(|(i, a)| names[..*i].contains(a)) {
            Some((_, twice)) => Err(format!("names that differ ({twice:?} is there twice)")),
            None => Ok(names),
        }
    })?;
    s.finish(&[]);
    Ok(TargetConfig { name, channels, activation, weight, loss_fn, loss, class_names })
}

fn read_volume(mut s: Section<'_>, targets: &[TargetConfig]) -> Result<VolumePaths> {
    let path = |s: &mut Section<'_>, key: &str, schema: &str| -> Result<String> {
        match s.node_as(key, schema) {
            Some(n) => match string(n) {
                Ok(p) => Ok(p),
                Err(allowed) => s.invalid(key, n, &format!("{allowed} (a path or URL)")),
            },
            None => bail!("{}: missing; every volume needs a path for it", s.key_path(key)),
        }
    };
    let input = path(&mut s, "input", "input")?;
    let mut paths = Vec::new();
    for t in targets {
        paths.push((t.name.clone(), path(&mut s, &t.name, "<target>")?));
    }
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let ref_label = s.get("ref_label", "sheet".to_string(), &|n| match n {
        Node::Str(r) if names.contains(&r.as_str()) => Ok(r.clone()),
        _ => Err(format!("the name of a target ({})", names.join(", "))),
    })?;
    if !names.contains(&ref_label.as_str()) {
        bail!(
            "{}: missing, and the seed's default \"sheet\" is not a target; name one of {}",
            s.key_path("ref_label"),
            names.join(", ")
        );
    }
    s.finish(&[]);
    Ok(VolumePaths { input, targets: paths, ref_label })
}
