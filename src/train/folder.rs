//! A checkpoint folder that several runs of one model share without losing each other's work.
//!
//! A run holds `<model>.lock` for its lifetime: an OS file lock, so the lock of a process that
//! died (killed, out of memory, node lost) is free again and is taken over with a word, while a
//! live run refuses a second one. The file says who holds it (pid, host, start).
//!
//! Files are named after their run. A model's first run writes the seed's names,
//! `<model>_<epoch>.safetensors`, `<model>_best` and `<model>_final`; a run that would write over
//! another's files (a resume from an older checkpoint while later ones exist) takes the next run
//! number and writes `<model>.run<k>_...` beside them, with its own logs and GIFs. Model names are
//! plain (no `.`), so no model's files parse as another's. Pruning removes only the run's own
//! epoch checkpoints, never the checkpoint it resumed from.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::checkpoint;

/// What a checkpoint file of a run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The training state after an epoch, counted from 1.
    Epoch(usize),
    Best,
    /// The final weights.
    Final,
}

/// A checkpoint's identity inside a model's folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CheckpointName {
    /// 1 for the seed's names, 2 and up for the runs that had to write beside an earlier one.
    pub run: u32,
    pub kind: Kind,
}

/// `model` for a model's first run, `model.run<k>` after: the stem of the run's files and the name
/// of its log folder.
pub fn run_name(model: &str, run: u32) -> String {
    if run == 1 { model.to_string() } else { format!("{model}.run{run}") }
}

fn digits(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

impl CheckpointName {
    pub fn file_name(&self, model: &str) -> String {
        let stem = run_name(model, self.run);
        match self.kind {
            Kind::Epoch(e) => format!("{stem}_{e}.safetensors"),
            Kind::Best => format!("{stem}_best.safetensors"),
            Kind::Final => format!("{stem}_final.safetensors"),
        }
    }

    /// The name `file_name` would have written for `model`, if it is one.
    pub fn parse(model: &str, file_name: &str) -> Option<CheckpointName> {
        let rest = file_name.strip_prefix(model)?.strip_suffix(".safetensors")?;
        let (run, rest) = match rest.strip_prefix(".run") {
            Some(r) => {
                let (k, rest) = r.split_once('_')?;
                (digits(k)?.parse().ok().filter(|&k| k >= 2)?, rest)
            }
            None => (1, rest.strip_prefix('_')?),
        };
        let kind = match rest {
            "best" => Kind::Best,
            "final" => Kind::Final,
            e => Kind::Epoch(digits(e)?.parse().ok()?),
        };
        Some(CheckpointName { run, kind })
    }
}

/// Every checkpoint of `model` in `dir`, ordered by run and then epoch, best, final. Temporary
/// files of interrupted writes (hidden `.<name>.tmp<pid>`) are not checkpoints.
pub fn listing(dir: &Path, model: &str) -> Result<Vec<(CheckpointName, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("listing checkpoints in {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing checkpoints in {}", dir.display()))?;
        if let Some(name) = CheckpointName::parse(model, &entry.file_name().to_string_lossy()) {
            found.push((name, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The epoch checkpoints of one run of `model`, oldest first.
pub fn epoch_checkpoints(dir: &Path, model: &str, run: u32) -> Result<Vec<(usize, PathBuf)>> {
    Ok(listing(dir, model)?
        .into_iter()
        .filter_map(|(n, p)| match n.kind {
            Kind::Epoch(e) if n.run == run => Some((e, p)),
            _ => None,
        })
        .collect())
}

/// Who holds a lock, written into the lock file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    /// Seconds since the Unix epoch.
    started: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".to_string())
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = now().saturating_sub(self.started);
        write!(f, "pid {} on {}, started {} min {} s ago", self.pid, self.host, ago / 60, ago % 60)
    }
}

/// `<dir>/<model>.lock`, locked for as long as this value lives.
struct FolderLock {
    file: File,
}

impl FolderLock {
    /// Takes the lock, or says who holds it. Also returns the holder a dead run left behind.
    fn take(dir: &Path, model: &str) -> Result<(FolderLock, Option<Holder>)> {
        let path = dir.join(format!("{model}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        let mut previous = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                file.read_to_string(&mut previous).ok();
                let who = serde_json::from_str::<Holder>(&previous)
                    .map_or_else(|_| "another process".to_string(), |h| h.to_string());
                bail!(
                    "{}: model '{model}' is being trained by {who}; two runs of one model in one \
                     tr_setup.ckpt_out_base would prune and log over each other. Wait for it, stop it, \
                     or pick another tr_setup.model_name or ckpt_out_base",
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.read_to_string(&mut previous).with_context(|| format!("reading {}", path.display()))?;
        let stale = serde_json::from_str::<Holder>(&previous).ok();
        let me = Holder { pid: std::process::id(), host: host_name(), started: now() };
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(serde_json::to_string(&me)?.as_bytes()))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok((FolderLock { file }, stale))
    }
}

impl Drop for FolderLock {
    /// Empties the file (a released lock, not a dead holder's) and lets the lock go. The file
    /// stays: removing it would let a run that opened it a moment earlier lock a file no one
    /// else sees.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// How a run starts in its folder.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// A fresh run: refused when the model already has checkpoints here.
    Fresh,
    /// A fresh run that first removes every checkpoint of the model here (`--overwrite`).
    Replace,
    /// A run that continues `source`, a checkpoint after epoch `epochs_done`.
    Resume { source: PathBuf, epochs_done: usize },
}

/// One run's hold on its checkpoint folder: the lock, the run number its files are named by,
/// and which checkpoints pruning may remove.
pub struct RunFolder {
    dir: PathBuf,
    model: String,
    run: u32,
    /// Never pruned.
    source: Option<PathBuf>,
    _lock: FolderLock,
}

impl RunFolder {
    /// Creates `dir`, takes the model's lock, removes temporary files that interrupted writes of
    /// this model left (no one else writes them while the lock is held) and picks the run number.
    pub fn open(dir: &Path, model: &str, start: &Start) -> Result<RunFolder> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("tr_setup.ckpt_out_base {}: cannot create it", dir.display()))?;
        let (lock, stale) = FolderLock::take(dir, model)?;
        if let Some(h) = stale {
            eprintln!(
                "warning: taking over the lock of model '{model}' in {} from {h}, which is no longer \
                 running",
                dir.display()
            );
        }
        remove_temporaries(dir, model)?;
        let existing = listing(dir, model)?;
        let run = match start {
            Start::Fresh => {
                let newest = existing
                    .iter()
                    .filter(|(n, _)| matches!(n.kind, Kind::Epoch(_)))
                    .max_by_key(|(n, _)| (n.kind, n.run))
                    .or(existing.first());
                if let Some((_, p)) = newest {
                    bail!(
                        "{} holds checkpoints of an earlier run of model '{model}' (e.g. {}); resume it \
                         with --set tr_setup.checkpoint_path={}, pick another tr_setup.model_name or \
                         ckpt_out_base, or replace them with --overwrite",
                        dir.display(),
                        p.display(),
                        p.display()
                    );
                }
                1
            }
            Start::Replace => {
                for (_, p) in &existing {
                    std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
                }
                1
            }
            Start::Resume { source, epochs_done } => {
                let own = same_file(source.parent(), dir)
                    .then(|| {
                        source.file_name().and_then(|n| CheckpointName::parse(model, &n.to_string_lossy()))
                    })
                    .flatten();
                // Continuing a run of this folder keeps its number while nothing of it lies
                // ahead of the resume point; a checkpoint from elsewhere starts a number that has
                // no files yet.
                let candidate = own.map_or(1, |n| n.run);
                let taken = existing.iter().any(|(n, _)| {
                    n.run == candidate
                        && match (own, n.kind) {
                            (None, _) => true,
                            (Some(_), Kind::Epoch(e)) => e > *epochs_done,
                            (Some(_), Kind::Final) => true,
                            (Some(_), Kind::Best) => false,
                        }
                });
                if taken {
                    let next = existing.iter().map(|(n, _)| n.run).max().unwrap_or(1) + 1;
                    println!(
                        "{} holds checkpoints of model '{model}' beyond epoch {epochs_done}; this run \
                         writes beside them as {}",
                        dir.display(),
                        run_name(model, next)
                    );
                    next
                } else {
                    candidate
                }
            }
        };
        let source = match start {
            Start::Resume { source, .. } => Some(source.clone()),
            _ => None,
        };
        Ok(RunFolder { dir: dir.to_path_buf(), model: model.to_string(), run, source, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn run(&self) -> u32 {
        self.run
    }

    /// The stem of this run's files and its log folder's name.
    pub fn name(&self) -> String {
        run_name(&self.model, self.run)
    }

    pub fn path(&self, kind: Kind) -> PathBuf {
        self.dir.join(CheckpointName { run: self.run, kind }.file_name(&self.model))
    }

    /// Removes all but the newest `keep` epoch checkpoints of this run and rewrites all but the
    /// newest `resumable` of those as weights only; never touches the one it resumed from.
    pub fn prune(&self, keep: usize, resumable: usize) -> Result<()> {
        let mine = epoch_checkpoints(&self.dir, &self.model, self.run)?;
        let not_source = |p: &Path| !self.source.as_deref().is_some_and(|s| same_file(Some(s), p));
        let (old, kept) = mine.split_at(mine.len().saturating_sub(keep));
        for (_, p) in old.iter().filter(|(_, p)| not_source(p)) {
            std::fs::remove_file(p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
        }
        for (_, p) in kept[..kept.len().saturating_sub(resumable)].iter().filter(|(_, p)| not_source(p)) {
            checkpoint::strip_to_weights(p)?;
        }
        Ok(())
    }
}

/// Whether two paths name the same existing file or folder (None names the current folder).
fn same_file(a: Option<&Path>, b: &Path) -> bool {
    let a = a.filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Removes `.<checkpoint name>.tmp<pid>` files of `model` in `dir`.
fn remove_temporaries(dir: &Path, model: &str) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let temporary = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tmp"))
            .filter(|(_, pid)| digits(pid).is_some())
            .is_some_and(|(n, _)| CheckpointName::parse(model, n).is_some());
        if temporary {
            let p = entry.path();
            std::fs::remove_file(&p)
                .with_context(|| format!("removing {}, left by an interrupted write", p.display()))?;
            println!("removed {}, left by an interrupted write", p.display());
        }
    }
    Ok(())
}
