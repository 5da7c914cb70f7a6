//! The `unet3d` command line: one subcommand per job.

pub mod bench;
pub mod convert;
pub mod demo;
pub mod example_data;
pub mod infer;
pub mod plan;
pub mod train;

use clap::{Parser, Subcommand};

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
    /// Predict a volume with a trained network into Zarr (sliding window; --shard i/n for HPC jobs).
    Infer(infer::InferArgs),
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
            Command::ExampleData(args) => args.run(),
            Command::Train(args) => args.run(),
            Command::Demo(args) => args.run(),
        }
    }
}
