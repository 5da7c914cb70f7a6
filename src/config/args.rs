//! The command-line flags every config-driven subcommand shares.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::Config;

#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// The YAML config (tasks/reference.yaml documents every key).
    #[arg(long)]
    pub config: PathBuf,
    /// Override one key, e.g. --set tr_config.batch_size=4 --set tr_config.patch_size=[64,64,64];
    /// the value is YAML. Repeatable; applied in order.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The config, with its warnings printed to stderr.
    pub fn load(&self) -> Result<Config> {
        let parsed = Config::load(&self.config, &self.set)?;
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
        Ok(parsed.config)
    }
}
