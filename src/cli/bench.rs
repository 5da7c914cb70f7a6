//! `unet3d bench <kernel>`: kernel throughput tables.

use crate::arch::{ArchConfig, Target};
use crate::bench::conv::{self, ConvBenchOptions};
use crate::bench::step::training_step_benchmark;
use crate::config::ConfigArgs;
use crate::device::Device;
use crate::device::kernels::bench::{self as kernel_bench, KernelBenchOptions};
use crate::device::launch::Gpu;
use crate::train::plan::PlanReport;
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Measure kernel throughput on this machine.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    kernel: Kernel,
}

#[derive(Subcommand, Debug)]
enum Kernel {
    /// conv3d forward, backward-data and backward-weight on ResEncM shapes, against the naive
    /// loop and the gemm crate.
    Conv {
        /// Smaller volumes and fewer repetitions.
        #[arg(long)]
        quick: bool,
        /// Threads to use (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The CUDA kernels (elementwise, reductions, softmax, pooling, optimizer steps): time per
    /// launch and effective GB/s.
    Kernels {
        /// "sim" (the .cu sources on the CPU) or "cuda:N".
        #[arg(long, default_value = "sim")]
        device: String,
        /// Small sizes (the default on sim, where full sizes take minutes).
        #[arg(long)]
        quick: bool,
    },
    /// One training step (batch upload, forward, deep-supervision Dice + CE, backward) of the model
    /// fixture's small residual U-Net (features 8..64, 4 stages, 2 input channels, 3 classes) or of
    /// a config's planned network: median time and measured peak memory beside the planner's
    /// estimate, and on a kernel device the step's launches and host<->device bytes.
    Step {
        /// cpu, sim (the CUDA kernels on the CPU: slow) or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// A training config: its planned network, patch and batch size (--patch and --batch
        /// override them).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key (as `unet3d train --set`); needs --config.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "config")]
        set: Vec<String>,
        /// Patch size (z, y, x); the fixture's strides need D divisible by 4 and H, W by 8.
        /// Default: the config's, or 8 32 32.
        #[arg(long, num_args = 3)]
        patch: Option<Vec<usize>>,
        /// Default: the config's, or 2.
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

impl BenchArgs {
    pub fn run(self) -> anyhow::Result<()> {
        match self.kernel {
            Kernel::Conv { quick, threads } => {
                print!("{}", conv::format_table(&conv::run(&ConvBenchOptions { quick, threads })?));
                Ok(())
            }
            Kernel::Kernels { device, quick } => {
                let gpu = Gpu::open(&device)?;
                let quick = quick || gpu.is_sim();
                print!("{}", kernel_bench::report(&gpu, &KernelBenchOptions { quick })?);
                Ok(())
            }
            Kernel::Step { device, config, set, patch, batch, reps } => {
                let patch = patch.map(|p| [p[0], p[1], p[2]]);
                let (arch, patch, batch) = match config {
                    Some(path) => {
                        let config = ConfigArgs { config: path.clone(), set }.load()?;
                        let plan = PlanReport::new(&config)
                            .with_context(|| format!("planning {}", path.display()))?;
                        let patch = patch.unwrap_or(plan.patch);
                        (plan.architecture, patch, batch.unwrap_or(config.tr_config.batch_size))
                    }
                    None => {
                        let patch = patch.unwrap_or([8, 32, 32]);
                        (fixture_network(patch)?, patch, batch.unwrap_or(2))
                    }
                };
                let b = training_step_benchmark(&arch, device, batch, patch, reps, 0)?;
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                println!(
                    "{} stages, {} parameters, batch {batch}, patch {patch:?} on {device}: median step {:.3} s, \
                     peak memory {:.1} MiB (planner estimate without optimizer state {:.1} MiB)",
                    arch.n_stages(),
                    arch.param_count(),
                    b.median_secs,
                    mib(b.peak_bytes),
                    mib(b.estimate.total()),
                );
                if let Some(c) = &b.counters {
                    println!("per step on {device}: {c}");
                }
                Ok(())
            }
        }
    }
}

/// The network of tests/fixtures/model/resenc_unet_small (dynamic_network_architectures config).
fn fixture_network(patch: [usize; 3]) -> anyhow::Result<crate::arch::Architecture> {
    use crate::arch::{Axes, PerStage};
    let cfg = ArchConfig {
        autoconfigure: false,
        features_per_stage: Some(PerStage::Each(vec![8, 16, 32, 64])),
        kernel_sizes: Some(PerStage::Each(vec![
            Axes::PerAxis([1, 3, 3]),
            Axes::Iso(3),
            Axes::Iso(3),
            Axes::Iso(3),
        ])),
        strides: Some(PerStage::Each(vec![
            Axes::Iso(1),
            Axes::PerAxis([1, 2, 2]),
            Axes::Iso(2),
            Axes::Iso(2),
        ])),
        n_blocks_per_stage: Some(PerStage::Each(vec![1, 2, 2, 2])),
        n_conv_per_stage_decoder: Some(PerStage::All(1)),
        ..ArchConfig::default()
    };
    cfg.build(2, vec![Target::new("seg", 3)], patch)
}
