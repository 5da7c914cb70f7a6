//! `unet3d example-data`: a synthetic dataset to try everything on.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::data::example::{ExampleOptions, write_example_data};

/// Write a small synthetic multi-task dataset (sheets, distance, normals) in the layout
/// tasks/demo.yaml reads: OUT/volumeK.zarr/{input,sheet,distance,normals}.
#[derive(Args, Debug)]
pub struct ExampleDataArgs {
    /// The folder for the volumes (tasks/demo.yaml reads ./demo/data).
    #[arg(long)]
    out: PathBuf,
    /// Number of volumes.
    #[arg(long, default_value_t = 4)]
    volumes: usize,
    /// Edge length of each cubic volume in voxels.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// The same seed writes the same data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace volumes that already exist.
    #[arg(long)]
    overwrite: bool,
}

impl ExampleDataArgs {
    pub fn run(self) -> Result<()> {
        let opts = ExampleOptions {
            volumes: self.volumes,
            size: self.size,
            seed: self.seed,
            overwrite: self.overwrite,
        };
        let written = write_example_data(&self.out, &opts)?;
        println!("{} volumes of {}^3 written to {}", written.len(), self.size, self.out.display());
        Ok(())
    }
}
