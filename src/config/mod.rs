//! The YAML configuration: the seed's five sections (reference-spec 1.4-1.6) with every key and
//! default, so a seed YAML runs unchanged, plus unet3d's own keys. tasks/reference.yaml
//! documents every key.
//!
//! Reading goes YAML -> untyped tree -> `--set section.key=value` overrides -> typed sections.
//! Missing sections and keys (and keys set to null) take their defaults; each key nobody reads
//! (the seed's ignored keys, typos) is one warning; a wrong value is an error naming
//! `section.key`, the value, and what is allowed.

mod args;
mod dataset;
mod inference;
mod model;
mod reader;
mod train;
mod tree;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub use args::ConfigArgs;
pub use dataset::{
    Activation, DatasetConfig, LabelRule, NanPolicy, Normalization, Sampling, TargetConfig, TargetKind,
    VolumePaths,
};
pub use inference::{InferenceConfig, OutputType};
pub use train::{Augmentation, BestBy, FOLDS, Fold, OptimizerConfig, Planned, TrConfig, TrSetup};

use crate::arch::{ArchConfig, Architecture, Target};
use reader::{Ctx, Section};

/// The five sections, in the seed's order.
pub const SECTIONS: [&str; 5] =
    ["tr_setup", "tr_config", "model_config", "dataset_config", "inference_config"];

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub tr_setup: TrSetup,
    pub tr_config: TrConfig,
    /// `model_config`, with `tr_setup.autoconfigure` as its `autoconfigure`.
    pub model_config: ArchConfig,
    pub dataset_config: DatasetConfig,
    pub inference_config: InferenceConfig,
}

/// A configuration and what reading it found.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub config: Config,
    /// One per key that nothing reads, naming it and why.
    pub warnings: Vec<String>,
    /// Every key the reader asks for, whether present or not, as `section.key` paths with `*`
    /// for a target name or list index and `<target>` for a target's path in a volume entry
    /// (e.g. `dataset_config.targets.*.channels`, `dataset_config.volume_paths.*.<target>`).
    pub keys_read: BTreeSet<String>,
}

/// Older section names of seed configs.
const TOP_IGNORED: &[(&str, &str)] = &[
    ("tr_params", "the seed's older schema; its keys now belong in tr_setup and tr_config"),
    ("inference_params", "the seed's older schema; its keys now belong in inference_config"),
];

impl Config {
    /// Parses YAML text and applies `sets` (each `section.key=value`, in order).
    pub fn parse(yaml: &str, sets: &[String]) -> Result<Parsed> {
        Config::parse_in(yaml, sets, None)
    }

    /// As [`Config::parse`] for the YAML of a file in folder `dir`: its relative paths resolve
    /// against `dir` (the `--set` values against the working folder).
    pub fn parse_in(yaml: &str, sets: &[String], dir: Option<&Path>) -> Result<Parsed> {
        let mut root = tree::parse_yaml(yaml)?;
        if let Some(dir) = dir {
            tree::rebase_paths(&mut root, dir);
        }
        for set in sets {
            tree::apply_set(&mut root, set)?;
        }
        let ctx = Ctx::default();
        let config = read(&ctx, &root)?;
        let (warnings, keys_read, unknown) = ctx.into_parts();
        // A YAML file may carry keys unet3d ignores (seed configs do); a --set is typed for this
        // run, so one that nothing reads is a typo that must not train on the defaults.
        for set in sets {
            let key = set.split_once('=').map_or(set.as_str(), |(k, _)| k).trim();
            let under = |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|r| r.starts_with('.'));
            if let Some((_, msg)) = unknown.iter().find(|(path, _)| under(path, key) || under(key, path)) {
                bail!("--set {set}: {msg}; nothing reads it");
            }
        }
        Ok(Parsed { config, warnings, keys_read })
    }

    /// The YAML with the `--set` overrides applied, as JSON: the settings a run was written
    /// with (defaults left out), for comparing two runs.
    pub fn settings(yaml: &str, sets: &[String]) -> Result<serde_json::Value> {
        let mut root = tree::parse_yaml(yaml)?;
        for set in sets {
            tree::apply_set(&mut root, set)?;
        }
        Ok(root.to_json())
    }

    /// Reads and parses the file at `path`; errors name it.
    pub fn load(path: &Path, sets: &[String]) -> Result<Parsed> {
        let (text, dir) = Config::read_file(path)?;
        Config::parse_in(&text, sets, Some(&dir)).with_context(|| format!("config {}", path.display()))
    }

    /// A config file's text and its folder as an absolute path, where its relative paths resolve.
    pub fn read_file(path: &Path) -> Result<(String, PathBuf)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("config {}: cannot read", path.display()))?;
        let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => std::path::absolute(p),
            None => std::env::current_dir(),
        }
        .with_context(|| format!("config {}: cannot resolve its folder", path.display()))?;
        Ok((text, dir))
    }

    /// The network for the training patch.
    pub fn architecture(&self) -> Result<Architecture> {
        let d = &self.dataset_config;
        let targets = d.targets.iter().map(|t| Target::new(&t.name, t.channels)).collect();
        self.model_config.build(d.in_channels, targets, self.tr_config.patch_size).with_context(|| {
            format!("model_config for tr_config.patch_size {:?} (z, y, x)", self.tr_config.patch_size)
        })
    }
}

fn read(ctx: &Ctx, root: &tree::Node) -> Result<Config> {
    let mut top = Section::new(ctx, String::new(), String::new(), root)?;
    let (tr_setup, autoconfigure) = train::read_tr_setup(top.section(SECTIONS[0])?)?;
    let tr_config = train::read_tr_config(top.section(SECTIONS[1])?)?;
    let model_config = model::read_model_config(top.section(SECTIONS[2])?, autoconfigure)?;
    let dataset_config = dataset::read_dataset_config(top.section(SECTIONS[3])?)?;
    let inference_config = inference::read_inference_config(
        top.section(SECTIONS[4])?,
        &dataset_config.targets,
        tr_config.patch_size,
        tr_config.batch_size,
    )?;
    top.finish(TOP_IGNORED);
    let config = Config { tr_setup, tr_config, model_config, dataset_config, inference_config };
    let arch = config.architecture()?;
    let patch = config.inference_config.patch_size;
    arch.check_patch(patch).with_context(|| format!("inference_config.patch_size = {patch:?}"))?;
    Ok(config)
}

/// `key: a vs b` for every leaf where two records (settings, run records) differ, in key order.
pub fn differences(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let (va, vb) = (x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null));
                    walk(va, vb, &if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, out);
                }
            }
            _ if a != b => out.push(format!("{path}: {a} vs {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(a, b, "", &mut out);
    out
}
