//! Where a run's scalars go: TensorBoard event files for people and `metrics.jsonl` (one JSON
//! object per line: wall_time, step, epoch, scalars by tag) for scripts, the same values in both.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::tensorboard::{EventWriter, wall_time};

pub struct Logger {
    events: EventWriter,
    jsonl_path: PathBuf,
    jsonl: File,
}

impl Logger {
    /// A new event file and `metrics.jsonl` (appended to, so a resumed run continues it) in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let events = EventWriter::create(dir)?;
        let jsonl_path = dir.join("metrics.jsonl");
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl_path)
            .with_context(|| format!("opening {}", jsonl_path.display()))?;
        Ok(Logger { events, jsonl_path, jsonl })
    }

    pub fn event_file(&self) -> &Path {
        self.events.path()
    }

    /// Text for TensorBoard only (the config a run resolved to); scripts read it from the
    /// checkpoint.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.events.text(step, tag, text)
    }

    pub fn scalars(&mut self, step: u64, epoch: usize, scalars: &[(String, f64)]) -> Result<()> {
        self.events.scalars(step, scalars)?;
        // JSON has no NaN or infinity; those become null.
        let map: serde_json::Map<String, serde_json::Value> =
            scalars.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
        let line =
            serde_json::json!({"wall_time": wall_time(), "step": step, "epoch": epoch, "scalars": map});
        writeln!(self.jsonl, "{line}").with_context(|| format!("writing {}", self.jsonl_path.display()))
    }
}
