//! `unet3d plan`: the network a config builds, its size, and whether training it fits
//! `tr_setup.vram_max`, before any data is read (as nnU-Net's planner tells a user).

use anyhow::Result;
use clap::Args;

use crate::config::ConfigArgs;
use crate::train::plan::PlanReport;

/// Print the planned architecture, parameter count and training memory; fail if the batch does
/// not fit vram_max.
#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

impl PlanArgs {
    pub fn run(self) -> Result<()> {
        let report = PlanReport::new(&self.config.load()?)?;
        print!("{report}");
        report.check()
    }
}
