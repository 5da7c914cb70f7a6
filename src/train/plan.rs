//! The plan of a training run before any data is read: the network a config builds, its size,
//! and whether training it fits `tr_setup.vram_max` (what `unet3d plan` prints and `unet3d train`
//! checks first, as nnU-Net's planner tells a user).

use std::fmt;

use anyhow::{Result, bail};

use crate::arch::{Architecture, Block, MemoryEstimate, Nonlin, SePool};
use crate::config::{Config, OptimizerConfig};

/// What `unet3d plan` prints, and the verdict on the configured batch.
#[derive(Debug, Clone)]
pub struct PlanReport {
    pub model_name: String,
    pub autoconfigure: bool,
    pub spacing: [f64; 3],
    pub architecture: Architecture,
    /// (z, y, x).
    pub patch: [usize; 3],
    pub optimizer: &'static str,
    /// The float32 training memory at the configured batch size.
    pub memory: MemoryEstimate,
    /// `tr_setup.vram_max`, in bytes.
    pub vram_max: u64,
    /// The training memory of batch 1, in bytes.
    pub batch_one_bytes: u64,
    /// The largest batch whose training memory fits vram_max; 0 when not even one sample does.
    pub max_batch_size: usize,
}

impl PlanReport {
    pub fn new(config: &Config) -> Result<Self> {
        let architecture = config.architecture()?;
        let tr = &config.tr_config;
        let (patch, moments) = (tr.patch_size, tr.optimizer.moments());
        let memory = architecture.training_memory(patch, tr.batch_size, moments)?;
        let vram_max = config.tr_setup.vram_max;
        let one = architecture.training_memory(patch, 1, moments)?;
        let max_batch_size =
            if one.total() > vram_max { 0 } else { architecture.max_batch_size(patch, vram_max, moments)? };
        let optimizer = match tr.optimizer {
            OptimizerConfig::Adam(h) => h.kind(),
            OptimizerConfig::Sgd(_) => "SGD",
        };
        Ok(PlanReport {
            model_name: config.tr_setup.model_name.clone(),
            autoconfigure: config.model_config.autoconfigure,
            spacing: config.model_config.spacing,
            architecture,
            patch,
            optimizer,
            memory,
            vram_max,
            batch_one_bytes: one.total(),
            max_batch_size,
        })
    }

    pub fn fits(&self) -> bool {
        self.memory.batch_size <= self.max_batch_size
    }

    /// Errors, saying what to change, unless the configured batch fits vram_max.
    pub fn check(&self) -> Result<()> {
        if self.fits() {
            return Ok(());
        }
        let batch = self.memory.batch_size;
        let need = gb_up(self.memory.total());
        let shrink = "shrink tr_config.patch_size or the network (model_config.max_features, \
                      features_per_stage, n_blocks_per_stage)";
        if self.max_batch_size == 0 {
            let one = gb_up(self.batch_one_bytes);
            bail!(
                "tr_config.batch_size {batch} does not fit tr_setup.vram_max {}: not even batch 1 fits \
                 (it needs {one}GB); {shrink}, or raise tr_setup.vram_max to at least {one}GB",
                gb(self.vram_max),
            );
        }
        bail!(
            "tr_config.batch_size {batch} does not fit tr_setup.vram_max {}: it needs {need}GB. Lower it to \
             {max} (--set tr_config.batch_size={max}, the largest that fits), {shrink}, or raise \
             tr_setup.vram_max to at least {need}GB (--set tr_setup.vram_max={need}GB)",
            gb(self.vram_max),
            max = self.max_batch_size,
        )
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB ({:.2} GiB)", bytes as f64 / 1e9, bytes as f64 / (1u64 << 30) as f64)
}

/// Decimal GB rounded up to 0.1, so that the suggested vram_max does fit.
fn gb_up(bytes: u64) -> String {
    format!("{:.1}", (bytes as f64 / 1e8).ceil() / 10.0)
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn dims(v: [usize; 3]) -> String {
    format!("{}x{}x{}", v[0], v[1], v[2])
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.architecture;
        let targets: Vec<String> =
            a.targets.iter().map(|t| format!("{} ({} ch)", t.name, t.channels)).collect();
        writeln!(f, "unet3d plan: {}", self.model_name)?;
        writeln!(
            f,
            "  input {} ch, patch (z, y, x) {}, batch {}; targets: {}",
            a.in_channels,
            dims(self.patch),
            self.memory.batch_size,
            targets.join(", ")
        )?;
        let topology = if self.autoconfigure {
            format!("autoconfigured (nnU-Net topology rules, spacing {:?})", self.spacing)
        } else {
            "from model_config".to_string()
        };
        let block = match a.block {
            Block::BasicBlockD => "BasicBlockD",
            Block::BottleneckD { .. } => "BottleneckD",
        };
        let nonlin = match a.nonlin {
            Nonlin::LeakyRelu { negative_slope } => format!("LeakyReLU {negative_slope}"),
            Nonlin::Relu => "ReLU".to_string(),
        };
        let se = match a.squeeze_excitation {
            None => "off",
            Some(SePool::Dhw) => "on (pool dhw)",
            Some(SePool::Dh) => "on (pool dh)",
        };
        writeln!(f, "  topology {topology}; {} stages", a.n_stages())?;
        writeln!(
            f,
            "  encoder: {block}, conv bias {}, InstanceNorm affine {} eps {}, {nonlin}, squeeze-excitation {se}",
            a.conv_bias, a.norm.affine, a.norm.eps
        )?;
        writeln!(
            f,
            "  {:>5}  {:>16}  {:>8}  {:>6}  {:>7}  {:>7}",
            "stage", "resolution", "channels", "blocks", "kernel", "stride"
        )?;
        let mut res = self.patch;
        for s in 0..a.n_stages() {
            res = std::array::from_fn(|d| res[d] / a.strides[s][d]);
            writeln!(
                f,
                "  {s:>5}  {:>16}  {:>8}  {:>6}  {:>7}  {:>7}",
                dims(res),
                a.features_per_stage[s],
                a.n_blocks_per_stage[s],
                dims(a.kernel_sizes[s]),
                dims(a.strides[s])
            )?;
        }
        writeln!(
            f,
            "  decoder per target: convs per stage {:?} (deepest first), deep supervision {}",
            a.n_conv_per_stage_decoder,
            if a.deep_supervision { "on" } else { "off" }
        )?;
        writeln!(f, "  parameters: {}", thousands(a.param_count()))?;
        writeln!(f, "  training memory ({}): {}", self.optimizer, self.memory)?;
        let verdict = if self.fits() { "fits" } else { "does NOT fit" };
        writeln!(
            f,
            "  vram_max {}: batch {} {verdict}; the largest batch that fits is {}",
            gb(self.vram_max),
            self.memory.batch_size,
            self.max_batch_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(102_350_575), "102,350,575");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(gb_up(22_000_000_001), "22.1");
        assert_eq!(gb_up(22_000_000_000), "22.0");
    }
}
