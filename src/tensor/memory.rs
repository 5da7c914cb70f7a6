//! Live and peak bytes held by tensor storage, counted at allocation and drop.
//!
//! The counters are process-wide so that a training step's peak memory is measured, not estimated:
//! reset the peak before the step and read it afterwards.

use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn track_alloc(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

pub(crate) fn track_free(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

/// Bytes of tensor storage alive now.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Largest value [`live_bytes`] reached since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from the memory alive now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Host memory a single allocation may take: the kernel's estimate of what can be allocated
/// without swapping (`MemAvailable`), or no bound where it cannot be read.
pub fn available_host_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(u64::MAX)
}

/// Refuses an allocation of `bytes` (None: too large to count) that the host cannot hold, before
/// it is made: a size read from a file header must fail with a message, not abort the process.
/// `what` names the file and the field the size comes from.
pub fn check_allocation(bytes: Option<u64>, what: impl std::fmt::Display) -> anyhow::Result<()> {
    let available = available_host_bytes();
    match bytes {
        Some(b) if b <= available => Ok(()),
        Some(b) => anyhow::bail!(
            "{what}: needs {:.1} GiB of memory, more than the {:.1} GiB available",
            b as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        ),
        None => anyhow::bail!("{what}: a size beyond any memory"),
    }
}
