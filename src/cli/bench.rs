//! `unet3d bench <kernel>`: kernel throughput tables.

use crate::bench::conv::{self, ConvBenchOptions};
use crate::device::kernels::bench::{self as kernel_bench, KernelBenchOptions};
use crate::device::launch::Gpu;
use crate::model::{ArchConfig, Target, network};
use clap::{Args, Subcommand};

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
    /// One training step (forward, deep-supervision Dice + CE, backward) on the CPU of the small
    /// residual U-Net of the model fixture (features 8..64, 4 stages, 2 input channels, 3 classes):
    /// median time and measured peak memory beside the planner's estimate.
    Step {
        /// Patch size (z, y, x); the strides need D divisible by 4 and H, W by 8.
        #[arg(long, num_args = 3, default_values_t = [8, 32, 32])]
        patch: Vec<usize>,
        #[arg(long, default_value_t = 2)]
        batch: usize,
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
            Kernel::Step { patch, batch, reps } => {
                let patch = [patch[0], patch[1], patch[2]];
                let arch = fixture_network(patch)?;
                let b = network::training_step_benchmark(&arch, batch, patch, reps, 0)?;
                println!(
                    "{} stages, {} parameters, batch {batch}, patch {patch:?}: median step {:.3} s, \
                     peak tensor memory {:.1} MiB (planner estimate without optimizer state {:.1} MiB)",
                    arch.n_stages(),
                    arch.param_count(),
                    b.median_secs,
                    b.peak_bytes as f64 / (1u64 << 20) as f64,
                    b.estimate.total() as f64 / (1u64 << 20) as f64,
                );
                Ok(())
            }
        }
    }
}

/// The network of tests/fixtures/model/resenc_unet_small (dynamic_network_architectures config).
fn fixture_network(patch: [usize; 3]) -> anyhow::Result<crate::model::Architecture> {
    use crate::model::{Axes, PerStage};
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
