//! `unet3d plan`: the network a config builds, its size, and whether training it fits
//! `tr_setup.vram_max`, before any data is read (as nnU-Net's planner tells a user); with
//! `--from-data`, nnU-Net's fingerprint of the training volumes and the patch and batch its ResEnc
//! planner chooses from it.

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::arch::Target;
use crate::arch::autoplan::{self, Plan};
use crate::config::{Config, ConfigArgs};
use crate::data::fingerprint::Fingerprint;
use crate::tensor::io::write_atomic;
use crate::train::plan::PlanReport;

/// Print the planned architecture, parameter count and training memory; fail if the batch does
/// not fit vram_max.
#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Also read every training volume for nnU-Net's dataset fingerprint and plan the patch,
    /// batch and spacing from it as nnU-Net's ResEnc planner does (for tr_setup.vram_max), written
    /// to <checkpoint folder>/plan.json; implied by tr_config.patch_size or batch_size `auto`,
    /// whose planned values the report then shows.
    #[arg(long)]
    from_data: bool,
    #[command(flatten)]
    threads: super::ThreadArgs,
}

/// What `--from-data` writes.
#[derive(Serialize)]
struct DataPlan<'a> {
    fingerprint: &'a Fingerprint,
    plan: &'a Plan,
}

impl PlanArgs {
    pub fn run(self) -> Result<()> {
        self.threads.apply()?;
        let mut config = self.config.load()?;
        let planned = if self.from_data || config.tr_config.planned.any() {
            let sets = planned_sets(&config)?;
            if !sets.is_empty() {
                let all = [self.config.set.clone(), sets].concat();
                config = Config::load(&self.config.config, &all)?.config;
            }
            true
        } else {
            false
        };
        let report = PlanReport::new(&config)?;
        if planned {
            println!();
        }
        print!("{report}");
        report.check()
    }
}

/// Plans from the data and returns the `--set`s that put the plan in place of the config's
/// `auto` sizes (none when it has none): the patch with the spacing it was planned for, and the
/// batch.
pub(crate) fn planned_sets(config: &Config) -> Result<Vec<String>> {
    let plan = plan_from_data(config)?;
    let planned = config.tr_config.planned;
    let [patch, spacing, batch] = plan_sets(&plan);
    let mut sets = Vec::new();
    if planned.patch {
        sets.extend([patch, spacing]);
    }
    if planned.batch {
        sets.push(batch);
    }
    if !sets.is_empty() {
        println!("auto sizes planned from the data: --set {}", sets.join(" --set "));
    }
    Ok(sets)
}

/// The config overrides that train with `plan`: its patch, the spacing it was planned at, and its
/// batch.
fn plan_sets(plan: &Plan) -> [String; 3] {
    let ([p0, p1, p2], [s0, s1, s2]) = (plan.patch_size, plan.spacing);
    [
        format!("tr_config.patch_size=[{p0},{p1},{p2}]"),
        format!("model_config.spacing=[{s0},{s1},{s2}]"),
        format!("tr_config.batch_size={}", plan.batch_size),
    ]
}

fn plan_from_data(config: &Config) -> Result<Plan> {
    let dc = &config.dataset_config;
    let fingerprint = Fingerprint::of(dc)?;
    let (spacings, shapes) = fingerprint.spacings_and_shapes();
    let spacing = autoplan::target_spacing(&spacings, &shapes)?;
    let median = autoplan::median_shape(&spacings, &shapes, spacing);
    let targets: Vec<Target> = dc.targets.iter().map(|t| Target::new(&t.name, t.channels)).collect();
    let vram_gb = config.tr_setup.vram_max as f64 / 1e9;
    let plan = autoplan::plan(
        &config.model_config,
        dc.in_channels,
        &targets,
        spacing,
        median,
        shapes.len(),
        vram_gb,
    )?;
    let unknown = fingerprint.cases.iter().filter(|c| c.spacing.is_none()).count();
    println!("\nfingerprint of {} training volumes (nnU-Net's):", fingerprint.cases.len());
    if unknown > 0 {
        println!("  {unknown} volumes record no spacing: 1 mm assumed for them");
    }
    for (c, s) in fingerprint.foreground_intensities.iter().enumerate() {
        match s {
            Some(s) => println!(
                "  channel {c} foreground: mean {:.4}, std {:.4}, median {:.4}, [p0.5, p99.5] [{:.4}, {:.4}], \
                 [min, max] [{:.4}, {:.4}]",
                s.mean, s.std, s.median, s.percentile_00_5, s.percentile_99_5, s.min, s.max
            ),
            None => println!("  channel {c}: no foreground voxels"),
        }
    }
    let strides: Vec<String> = plan.topology.strides.iter().map(|s| format!("{s:?}")).collect();
    println!(
        "plan (nnU-Net ResEnc rules, {vram_gb:.1} GB): spacing {:?} mm, median shape {:?} there; patch {:?}, \
         batch {}, {} stages, strides {}; feature-map size {} of the reference {:.0}",
        plan.spacing,
        plan.median_shape,
        plan.patch_size,
        plan.batch_size,
        plan.topology.n_stages(),
        strides.join(" "),
        plan.feature_map_size,
        plan.reference
    );
    println!("to train with it: --set {}", plan_sets(&plan).join(" --set "));
    let dir = config.tr_setup.checkpoint_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("plan.json");
    write_atomic(&path, &serde_json::to_vec_pretty(&DataPlan { fingerprint: &fingerprint, plan: &plan })?)?;
    println!("written to {}", path.display());
    Ok(plan)
}
