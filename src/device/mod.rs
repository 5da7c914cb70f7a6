//! Compute backends. Every tensor carries the device it lives on.

pub mod cpu;
pub mod cuda;
pub mod kernels;
pub mod launch;
pub mod op;
pub mod shape;
pub mod sim;

use std::fmt;
use std::str::FromStr;

/// Where a tensor's storage lives and where ops on it run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The multi-threaded Rust backend: the embedded default and the reference for every kernel.
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
    /// The CUDA kernels run on the CPU by the fiber harness: slow, for checking the GPU path on
    /// machines without one.
    Sim,
}

impl Device {
    /// The kernel device behind a GPU device (one per process, shared by all its tensors); None
    /// for the CPU backend.
    pub fn gpu(self) -> anyhow::Result<Option<launch::Gpu>> {
        launch::Gpu::of(self)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Sim => write!(f, "sim"),
        }
    }
}

impl FromStr for Device {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "sim" => Ok(Device::Sim),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => anyhow::bail!("unknown device '{s}': expected 'cpu', 'cuda', 'cuda:N' or 'sim'"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        assert_eq!("sim".parse::<Device>().unwrap(), Device::Sim);
        assert_eq!(Device::Sim.to_string(), "sim");
        let err = "gpu0".parse::<Device>().unwrap_err().to_string();
        assert!(err.contains("gpu0"), "{err}");
        assert!("cuda:x".parse::<Device>().is_err());
    }
}
