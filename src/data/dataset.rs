//! The training volumes of `dataset_config.volume_paths`, opened and checked up front so a bad
//! path, shape or dtype fails before training starts, not hours into it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail, ensure};

use super::array::VolumeArray;
use super::zarr::{ChunkCache, ZarrArray};
use crate::config::{DatasetConfig, TargetConfig, VolumePaths};
use crate::loss::Loss;

/// One training volume: the input and each target (in `dataset_config.targets` order).
pub struct Volume {
    pub name: String,
    pub input: Arc<dyn VolumeArray>,
    pub targets: Vec<Arc<dyn VolumeArray>>,
    /// Index into `targets` of the array the patch search scans.
    pub ref_label: usize,
}

pub struct Dataset {
    pub volumes: Vec<Volume>,
    pub cache: ChunkCache,
}

impl Dataset {
    /// Opens and checks every volume of `volume_paths` (shapes agree, dtypes supported, channel
    /// counts = in_channels / [`stored_channels`], every target present); errors name volume + array.
    pub fn open(config: &DatasetConfig, cache: ChunkCache) -> Result<Dataset> {
        ensure!(
            !config.volume_paths.is_empty(),
            "dataset_config.volume_paths: empty; list at least one volume (input and one path per target)"
        );
        let volumes = config
            .volume_paths
            .iter()
            .enumerate()
            .map(|(i, v)| open_volume(i, v, config, &cache))
            .collect::<Result<_>>()?;
        Ok(Dataset { volumes, cache })
    }

    /// For tests and example data: volumes already in memory.
    pub fn from_volumes(volumes: Vec<Volume>) -> Dataset {
        Dataset { volumes, cache: ChunkCache::new(0) }
    }
}

fn open_volume(i: usize, v: &VolumePaths, config: &DatasetConfig, cache: &ChunkCache) -> Result<Volume> {
    let key = |k: &str| format!("volume {i}: dataset_config.volume_paths[{i}].{k}");
    // Inputs are whole unless the config says they may not be; label arrays are often sparse.
    let open = |k: &str, path: &str, channels: usize| -> Result<Arc<dyn VolumeArray>> {
        let whole = k == "input" && !config.allow_missing_chunks;
        match ZarrArray::open(Path::new(path), channels, cache) {
            Ok(a) if whole => Ok(Arc::new(a.refusing_missing_chunks())),
            Ok(a) => Ok(Arc::new(a)),
            Err(e) => Err(anyhow!("{} = {path:?}: {e:#}", key(k))),
        }
    };
    let input = open("input", &v.input, config.in_channels)?;
    let mut targets = Vec::with_capacity(config.targets.len());
    for t in &config.targets {
        let Some((_, path)) = v.targets.iter().find(|(name, _)| *name == t.name) else {
            bail!("{}: missing; every target needs an array in every volume", key(&t.name));
        };
        let array = open(&t.name, path, stored_channels(t))?;
        if array.shape() != input.shape() {
            bail!(
                "{} = {path:?}: shape {:?} differs from the input's {:?} ({} = {:?}); a target must cover \
                 the input voxel for voxel",
                key(&t.name),
                array.shape(),
                input.shape(),
                key("input"),
                v.input
            );
        }
        targets.push(array);
    }
    let Some(ref_label) = config.targets.iter().position(|t| t.name == v.ref_label) else {
        bail!("{} = {:?}: not a target", key("ref_label"), v.ref_label);
    };
    Ok(Volume { name: volume_name(&v.input), input, targets, ref_label })
}

/// The channel count a target's array holds: one class-index map for the losses that take one
/// (Dice + CE, CE), whatever the number of classes; otherwise one channel per output.
pub fn stored_channels(target: &TargetConfig) -> usize {
    match target.loss {
        Loss::DiceCe(_) | Loss::CrossEntropy(_) => 1,
        _ => target.channels,
    }
}

/// The store a volume's input lives in (`vol0.zarr` for `data/vol0.zarr/input`), for logs.
fn volume_name(input: &str) -> String {
    let p = Path::new(input);
    p.parent()
        .and_then(|d| d.file_name())
        .filter(|_| p.file_name().is_some_and(|f| f == "input"))
        .or_else(|| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.to_string())
}
