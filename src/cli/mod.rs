//! The `unet3d` command line: one subcommand per job.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod evaluate;
pub mod example_data;
pub mod infer;
pub mod plan;
pub mod train;

use clap::{Args, Parser, Subcommand};

/// The exit status of a job that stopped early on purpose (`--max-blocks`, `--stop-after`, a
/// scheduler's SIGTERM or SIGUSR1) and continues where it stopped when run again: sysexits'
/// EX_TEMPFAIL, which a batch script tests to requeue itself.
pub const EXIT_RERUN: u8 = 75;

/// What a job that stopped before its end returns; `main` prints it and exits with
/// [`EXIT_RERUN`] instead of failing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unfinished(pub String);

/// `--threads`, for the commands that compute.
#[derive(Args, Debug, Clone, Copy)]
pub struct ThreadArgs {
    /// CPU threads for compute and data loading (default: every core; an HPC job should give
    /// its allocation, e.g. --threads $SLURM_CPUS_PER_TASK).
    #[arg(long)]
    threads: Option<usize>,
}

impl ThreadArgs {
    /// Sizes the process-wide thread pool; call before any parallel work.
    pub fn apply(self) -> anyhow::Result<()> {
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads 0: give at least 1");
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .map_err(|e| anyhow::anyhow!("--threads {n}: {e}"))?;
        }
        Ok(())
    }
}

/// Dynamic 3D residual U-Nets for multi-task segmentation and regression.
#[derive(Parser, Debug)]
#[command(name = "unet3d", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure kernel throughput (conv3d, ...) on this machine.
    Bench(bench::BenchArgs),
    /// Print the network a config builds, its size and training memory; fail if it does not fit.
    Plan(plan::PlanArgs),
    /// Predict a volume with a trained network into Zarr (sliding window; --shard i/n or auto for
    /// HPC jobs).
    Infer(infer::InferArgs),
    /// Score predicted label maps or regression values against references (Dice, HD95, surface
    /// Dice, ...; MAE, RMSE, R^2) into summary.json.
    Evaluate(evaluate::EvaluateArgs),
    /// Convert NIfTI images and labels (one case or an MSD / nnU-Net folder) to Zarr volumes.
    Convert(convert::ConvertArgs),
    /// Write a small synthetic multi-task dataset (sheets, distance, normals) to try everything on.
    ExampleData(example_data::ExampleDataArgs),
    /// Train the network a config describes: checkpoints, validation metrics, GIFs, TensorBoard logs.
    Train(train::TrainArgs),
    /// The first command to run: train a small multi-task model on synthetic data on the CPU.
    Demo(demo::DemoArgs),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Bench(args) => args.run(),
            Command::Plan(args) => args.run(),
            Command::Infer(args) => args.run(),
            Command::Convert(args) => args.run(),
            Command::Evaluate(args) => args.run(),
            Command::ExampleData(args) => args.run(),
            Command::Train(args) => args.run(),
            Command::Demo(args) => args.run(),
        }
    }
}
