//! The `unet3d` command line.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    unet3d::cli::Cli::parse().run()
}
