//! The trainer's batches from the dataset of a config: its volumes split by volume into training
//! and validation, through the threaded loader.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};

use super::folds::fold_split;
use super::trainer::BatchSource;
use crate::arch::Architecture;
use crate::config::{Config, FOLDS, Fold};
use crate::data::Batch;
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderOptions};
use crate::data::normalize::CtStats;
use crate::data::sampling::split_volumes;
use crate::data::zarr::ChunkCache;

/// Decoded chunks kept in memory, shared by every volume.
const CHUNK_CACHE_BYTES: usize = 1 << 30;

pub struct LoaderSource {
    /// Started on the first batch asked for, so a resumed run's loader begins at its resume
    /// point instead of drawing the batches before it.
    train: Option<Loader>,
    start: Box<dyn Fn(u64) -> Result<Loader> + Send>,
    /// The index of the batch `train` yields next.
    next: u64,
    validation: Option<Loader>,
    ct_stats: Option<CtStats>,
    volume_names: Vec<String>,
    /// The validation volumes, as indices of `dataset_config.volume_paths`.
    validation_volumes: Vec<usize>,
}

impl LoaderSource {
    /// Opens and checks every volume of `dataset_config.volume_paths`, splits them with
    /// `tr_setup.tr_val_split` and `seed`, and starts the training and validation loaders
    /// (deep-supervision targets at `arch`'s scales).
    pub fn new(config: &Config, arch: &Architecture) -> Result<Self> {
        let dc = &config.dataset_config;
        let dataset = Arc::new(Dataset::open(dc, ChunkCache::new(CHUNK_CACHE_BYTES))?);
        let volume_names = dataset.volumes.iter().map(|v| v.name.clone()).collect();
        let setup = &config.tr_setup;
        let n = dataset.volumes.len();
        let (train, val) = match setup.fold {
            Fold::Split => split_volumes(n, setup.tr_val_split, setup.seed),
            Fold::Index(k) => {
                let names: Vec<String> = dataset.volumes.iter().map(|v| v.name.clone()).collect();
                let (train, val) = fold_split(&names, k, &setup.splits_file())?;
                println!("fold {k} of {FOLDS} ({})", setup.splits_file().display());
                (train, val)
            }
            Fold::All => ((0..n).collect(), (0..n).collect()),
        };
        let names = |v: &[usize]| {
            let mut n: Vec<&str> = v.iter().take(8).map(|&i| dataset.volumes[i].name.as_str()).collect();
            if v.len() > 8 {
                n.push("...");
            }
            n.join(", ")
        };
        println!(
            "volumes: {} train ({}), {} validate ({})",
            train.len(),
            names(&train),
            val.len(),
            names(&val)
        );
        let strides = if arch.deep_supervision { arch.strides.clone() } else { Vec::new() };
        let opts = |training| LoaderOptions::from_config(config, strides.clone(), training);
        let max_val = config.tr_config.max_val_steps_per_epoch;
        let validation = (max_val > 0 && !val.is_empty())
            .then(|| Loader::validation(Arc::clone(&dataset), dc, &val, opts(false), max_val))
            .transpose()
            .context("the validation loader")?;
        // The first loader is started here so that its volume checks and statistics (the CT
        // scheme's) come before training; a resumed run replaces it at its first batch.
        let first =
            Loader::train(Arc::clone(&dataset), dc, &train, opts(true)).context("the training loader")?;
        let ct_stats = first.ct_stats().cloned();
        let dc = dc.clone();
        let train_opts = opts(true);
        let start = move |first_batch: u64| {
            let opts = LoaderOptions { first_batch, ..train_opts.clone() };
            Loader::train(Arc::clone(&dataset), &dc, &train, opts).context("the training loader")
        };
        Ok(LoaderSource {
            train: Some(first),
            start: Box::new(start),
            next: 0,
            validation,
            ct_stats,
            volume_names,
            validation_volumes: val,
        })
    }

    /// The validation volumes, as indices of `dataset_config.volume_paths`.
    pub fn validation_volumes(&self) -> &[usize] {
        &self.validation_volumes
    }
}

impl BatchSource for LoaderSource {
    fn train_batch(&mut self, index: u64) -> Result<Batch> {
        ensure!(index >= self.next, "training batch {index} asked for after batch {}", self.next);
        if index > self.next || self.train.is_none() {
            // A resumed run: batch k depends on (seed, k) only, so a loader started at k
            // continues the stopped run's stream exactly.
            self.train = Some((self.start)(index)?);
            self.next = index;
        }
        let loader = self.train.as_mut().expect("started above");
        let batch = loader.next_batch()?.context("the training loader ended")?;
        self.next += 1;
        Ok(batch)
    }

    fn validation(&mut self) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        Ok(match &mut self.validation {
            None => Box::new(std::iter::empty()),
            Some(loader) => Box::new(std::iter::from_fn(move || loader.next_batch().transpose())),
        })
    }

    fn ct_stats(&self) -> Option<CtStats> {
        self.ct_stats.clone()
    }

    fn volume_name(&self, index: usize) -> String {
        self.volume_names.get(index).cloned().unwrap_or_else(|| format!("volume {index}"))
    }
}
