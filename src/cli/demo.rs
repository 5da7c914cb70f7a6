//! `unet3d demo`: the first command to run. Writes the synthetic example data, trains
//! tasks/demo.yaml on it, predicts the held-out volume and prints what the model reached.

use std::path::Path;

use anyhow::{Context, Result};
use clap::{Args, Parser};

use crate::config::Config;
use crate::data::VolumeArray;
use crate::data::example::{ExampleOptions, write_example_data};
use crate::data::zarr::{ChunkCache, ZarrArray};
use crate::infer::run::Layout;
use crate::tensor::Tensor;
use crate::train::metrics::{Decision, DiceCounts};
use crate::train::trainer::ConfigSource;

/// The demo's config; its paths are relative to the working directory (./demo).
const DEMO_YAML: &str = include_str!("../../tasks/demo.yaml");
const DATA_DIR: &str = "demo/data";

/// Train a small multi-task model on synthetic data on the CPU (a few minutes), predict a held-out
/// volume and print the metrics reached. Everything goes under ./demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Replace an earlier demo's checkpoints and predictions.
    #[arg(long)]
    overwrite: bool,
    /// Override a key of tasks/demo.yaml, e.g. --set tr_config.max_epoch=2. Repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

impl DemoArgs {
    pub fn run(self) -> Result<()> {
        let opts = ExampleOptions::default();
        let data = Path::new(DATA_DIR);
        if (0..opts.volumes).all(|k| data.join(format!("volume{k}.zarr")).exists()) {
            println!("example data: {DATA_DIR} (already there)");
        } else {
            write_example_data(data, &ExampleOptions { overwrite: self.overwrite, ..opts })
                .with_context(|| format!("writing the example data to {DATA_DIR}"))?;
            println!("example data: wrote {} volumes of {}^3 to {DATA_DIR}", opts.volumes, opts.size);
        }
        let parsed = Config::parse(DEMO_YAML, &self.set).context("tasks/demo.yaml")?;
        for w in &parsed.warnings {
            eprintln!("warning: {w}");
        }
        let config = parsed.config;
        let source = ConfigSource { yaml: DEMO_YAML.to_string(), sets: self.set.clone(), dir: None };
        let summary = super::train::train(config.clone(), source, self.overwrite)?;
        let final_model =
            summary.final_model.clone().context("the demo's training stopped before max_epoch")?;

        let ic = &config.inference_config;
        let input =
            ic.input_path.clone().context("tasks/demo.yaml: inference_config.input_path is not set")?;
        // The model carries its config (paths relative to the working folder, as here).
        let mut argv: Vec<String> =
            ["unet3d", "infer", "--input", &input, "--checkpoint"].iter().map(|s| s.to_string()).collect();
        argv.push(final_model.to_string_lossy().into_owned());
        argv.extend(self.set.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
        if self.overwrite {
            argv.push("--overwrite".to_string());
        }
        println!("predicting the held-out volume {input}");
        super::Cli::try_parse_from(&argv)?.run().context("the demo's inference")?;

        println!("\ndemo results, validation patches of the last epoch:");
        println!("{}", super::train::describe_last_validation(&summary, &config.dataset_config.targets));
        let sheet = Layout::new(&ic.output_path).array("sheet");
        let truth = Path::new(&input).with_file_name("sheet");
        let dice = held_out_dice(&sheet, &truth)?;
        println!("held-out volume {input}: sheet Dice {dice:.3} (prediction {})", sheet.display());
        Ok(())
    }
}

/// Dice of the predicted sheet (a 0/1 label map, or a probability with --save-probabilities:
/// either is positive after subtracting 0.5 exactly where it is foreground) against the label.
fn held_out_dice(prediction: &Path, truth: &Path) -> Result<f64> {
    let cache = ChunkCache::new(256 << 20);
    let read = |p: &Path| -> Result<Tensor> {
        let a = ZarrArray::open(p, 1, &cache)?;
        let s = a.shape();
        Tensor::from_vec([1, s[0], s[1], s[2], 1], a.read([0; 3], s)?)
    };
    let (p, t) = (read(prediction)?, read(truth)?);
    let shifted = Tensor::from_vec(p.dims().to_vec(), p.data().iter().map(|v| v - 0.5).collect())?;
    let mut counts = DiceCounts::default();
    counts.add(Decision::Threshold, &shifted, &t)?;
    Ok(counts.dice()[0])
}
