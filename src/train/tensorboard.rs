//! TensorBoard event files without TensorFlow: TFRecord framing around hand-encoded `Event`
//! protobufs (tensorflow/core/util/event.proto): scalars, and text for the run's config.
//! TensorBoard reads a run directory's
//! `events.out.tfevents.*` files in name order, so every run appends a new file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The CRC32C TFRecord stores, rotated and offset so that CRCs of data holding CRCs stay useful.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length, masked CRC of the length bytes, payload, masked CRC of the payload
/// (all little-endian).
pub fn record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64) }` followed by `rest`.
fn event(wall_time: f64, step: i64, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![1 << 3 | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3);
    varint(&mut out, step as u64);
    out.extend_from_slice(rest);
    out
}

/// The event every file starts with: `file_version = 3` "brain.Event:2".
pub fn file_version_event(wall_time: f64) -> Vec<u8> {
    let mut rest = Vec::new();
    bytes_field(&mut rest, 3, b"brain.Event:2");
    event(wall_time, 0, &rest)
}

/// `Event { summary = 5: Summary { value = 1: [Value { tag = 1, simple_value = 2 (float) }] } }`.
pub fn scalars_event(wall_time: f64, step: i64, scalars: &[(String, f64)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, v) in scalars {
        let mut value = Vec::new();
        bytes_field(&mut value, 1, tag.as_bytes());
        value.push(2 << 3 | 5);
        value.extend_from_slice(&(*v as f32).to_le_bytes());
        bytes_field(&mut summary, 1, &value);
    }
    let mut rest = Vec::new();
    bytes_field(&mut rest, 5, &summary);
    event(wall_time, step, &rest)
}

/// A text summary as TensorBoard's text plugin reads it: `Value { tag = 1, metadata = 9:
/// SummaryMetadata { plugin_data = 1: PluginData { plugin_name = 1: "text" } }, tensor = 8:
/// TensorProto { dtype = 1: DT_STRING (7), tensor_shape = 2: scalar, string_val = 8 } }`. The
/// plugin renders the string as Markdown.
pub fn text_event(wall_time: f64, step: i64, tag: &str, text: &str) -> Vec<u8> {
    let mut plugin = Vec::new();
    bytes_field(&mut plugin, 1, b"text");
    let mut metadata = Vec::new();
    bytes_field(&mut metadata, 1, &plugin);
    let mut tensor = vec![1 << 3, 7];
    bytes_field(&mut tensor, 2, &[]);
    bytes_field(&mut tensor, 8, text.as_bytes());
    let mut value = Vec::new();
    bytes_field(&mut value, 1, tag.as_bytes());
    bytes_field(&mut value, 9, &metadata);
    bytes_field(&mut value, 8, &tensor);
    let mut summary = Vec::new();
    bytes_field(&mut summary, 1, &value);
    let mut rest = Vec::new();
    bytes_field(&mut rest, 5, &summary);
    event(wall_time, step, &rest)
}

pub fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Appends scalar events to a new event file of a run directory, flushed after every write so a
/// killed run keeps what it logged.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` and a new `events.out.tfevents.<seconds>.<host>.<pid>` file in it.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the TensorBoard log directory {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".to_string());
        let now = wall_time();
        let base = format!("events.out.tfevents.{}.{host}.{}", now as u64, std::process::id());
        // Runs started within one second by one process get a suffix rather than share a file.
        let mut n = 0;
        let (path, file) = loop {
            let path = dir.join(if n == 0 { base.clone() } else { format!("{base}.{n}") });
            match File::create_new(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let mut writer = EventWriter { path, out: BufWriter::new(file) };
        writer.write(&file_version_event(now))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalars(&mut self, step: u64, scalars: &[(String, f64)]) -> Result<()> {
        self.write(&scalars_event(wall_time(), step as i64, scalars))
    }

    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.write(&text_event(wall_time(), step as i64, tag, text))
    }

    fn write(&mut self, payload: &[u8]) -> Result<()> {
        self.out
            .write_all(&record(payload))
            .and_then(|_| self.out.flush())
            .with_context(|| format!("writing TensorBoard events to {}", self.path.display()))
    }
}
