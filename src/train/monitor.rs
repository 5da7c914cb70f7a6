//! What a long run shows beside its epoch lines: the host's memory, and a progress line every few
//! steps where no progress bar is drawn (batch jobs, whose logs are files).

use std::time::Duration;

/// The process's resident memory now and at its peak, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    pub rss: u64,
    pub peak: u64,
}

impl HostMemory {
    /// From the kernel's account of this process (`VmRSS`, `VmHWM` in /proc/self/status); None
    /// where there is none (not Linux).
    pub fn now() -> Option<HostMemory> {
        parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
    }
}

fn parse_status(status: &str) -> Option<HostMemory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(name))?;
        let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024)
    };
    Some(HostMemory { rss: field("VmRSS:")?, peak: field("VmHWM:")? })
}

/// One step of an epoch, as a progress line shows it.
pub struct StepProgress<'a> {
    pub epoch: usize,
    pub max_epoch: usize,
    /// Counted from 1.
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub mean_loss: f64,
    pub lr: f64,
    pub patches_per_s: f64,
    pub elapsed: Duration,
    pub host: Option<HostMemory>,
    /// The device's pool peak this epoch, in bytes, on a kernel device.
    pub device_peak: Option<u64>,
    pub targets: &'a [(String, f64)],
}

const GIB: f64 = (1u64 << 30) as f64;

impl std::fmt::Display for StepProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let left = self.elapsed.as_secs_f64() / self.step as f64 * (self.steps - self.step) as f64;
        write!(
            f,
            "epoch {}/{} step {}/{}: loss {:.4} ({:.4} mean",
            self.epoch + 1,
            self.max_epoch,
            self.step,
            self.steps,
            self.loss,
            self.mean_loss
        )?;
        for (name, l) in self.targets {
            write!(f, ", {name} {l:.4}")?;
        }
        write!(
            f,
            "), lr {:.2e}, {:.1} patches/s, epoch ETA {}",
            self.lr,
            self.patches_per_s,
            humantime::format_duration(Duration::from_secs(left.round() as u64))
        )?;
        if let Some(m) = self.host {
            write!(f, ", host {:.2} GiB (peak {:.2})", m.rss as f64 / GIB, m.peak as f64 / GIB)?;
        }
        if let Some(p) = self.device_peak {
            write!(f, ", device peak {:.2} GiB", p as f64 / GIB)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status = "Name:\tunet3d\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t3\n";
        assert_eq!(parse_status(status), Some(HostMemory { rss: 100 << 20, peak: 200 << 20 }));
        assert_eq!(parse_status("Name:\tx\n"), None);
        let m = HostMemory::now().expect("Linux has /proc/self/status");
        assert!(m.rss > 0 && m.peak >= m.rss, "{m:?}");
    }

    #[test]
    fn a_progress_line_says_where_the_epoch_is_and_when_it_ends() {
        let targets = [("seg".to_string(), 0.5)];
        let p = StepProgress {
            epoch: 2,
            max_epoch: 10,
            step: 25,
            steps: 100,
            loss: 0.51234,
            mean_loss: 0.6,
            lr: 0.01,
            patches_per_s: 3.3,
            elapsed: Duration::from_secs(50),
            host: Some(HostMemory { rss: 1 << 30, peak: 3 << 29 }),
            device_peak: None,
            targets: &targets,
        };
        assert_eq!(
            p.to_string(),
            "epoch 3/10 step 25/100: loss 0.5123 (0.6000 mean, seg 0.5000), lr 1.00e-2, 3.3 patches/s, \
             epoch ETA 2m 30s, host 1.00 GiB (peak 1.50)"
        );
    }
}
