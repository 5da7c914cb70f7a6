//! `unet3d convert`: NIfTI images and labels into the Zarr layout training reads.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::data::convert::{ConvertOptions, convert_dataset, convert_pair};

/// Convert NIfTI (.nii, .nii.gz) to Zarr: one case (--image, --label) or a whole MSD / nnU-Net
/// folder with dataset.json (--dataset), which also gets a volumes.yaml to paste into a config.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A case's image; repeat it for one file per channel, in channel order.
    #[arg(long, required_unless_present = "dataset", conflicts_with = "dataset")]
    image: Vec<PathBuf>,
    /// The case's label map (class indices).
    #[arg(long, requires = "image")]
    label: Option<PathBuf>,
    /// A folder with dataset.json, imagesTr/ and labelsTr/.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// The case's <name>.zarr (with --image), or the folder for every case's <name>.zarr.
    #[arg(long)]
    out: PathBuf,
    /// Chunk edge length in voxels (clipped to the volume).
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Replace converted cases that already exist.
    #[arg(long)]
    overwrite: bool,
}

impl ConvertArgs {
    pub fn run(self) -> Result<()> {
        anyhow::ensure!(self.chunk > 0, "--chunk must be positive");
        let opts = ConvertOptions { chunks: [self.chunk; 3], overwrite: self.overwrite };
        match &self.dataset {
            Some(dir) => {
                let cases = convert_dataset(dir, &self.out, &opts)?;
                println!(
                    "{} cases written to {}; paste {} into your config",
                    cases.len(),
                    self.out.display(),
                    self.out.join("volumes.yaml").display()
                );
            }
            None => {
                convert_pair(&self.image, self.label.as_deref(), &self.out, &opts)?;
                println!("written {}", self.out.display());
            }
        }
        Ok(())
    }
}
