//! The `unet3d` command line: one subcommand per job.

use clap::{Parser, Subcommand};

/// Dynamic 3D residual U-Nets for multi-task segmentation and regression.
#[derive(Parser, Debug)]
#[command(name = "unet3d", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {}
    }
}
