//! scripts/slurm/infer-array.sbatch run outside SLURM with stand-ins for `unet3d` and `scontrol`:
//! it passes the array's settings on, requeues a task that exits 75 ("rerun to continue"), and
//! passes any other status through.

mod common;

use common::scratch_dir;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn stand_in(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs the script with a stand-in `unet3d` that exits `status`; returns the script's status,
/// the stand-in's arguments and what `scontrol` was asked.
fn run(dir: &Path, status: i32) -> (Option<i32>, String, String) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    stand_in(&bin, "unet3d", &format!("echo \"$@\" > {}/unet3d.args\nexit {status}", dir.display()));
    stand_in(&bin, "scontrol", &format!("echo \"$@\" > {}/scontrol.args", dir.display()));
    for f in ["unet3d.args", "scontrol.args"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/infer-array.sbatch");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg(&script)
        .env("PATH", path)
        .envs([
            ("CONFIG", "c.yaml"),
            ("CHECKPOINT", "m.safetensors"),
            ("INPUT", "v.zarr/0"),
            ("OUTPUT", "pred"),
            ("SLURM_ARRAY_JOB_ID", "123"),
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_CPUS_PER_TASK", "16"),
        ])
        .output()
        .unwrap();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default().trim().to_string();
    (out.status.code(), read("unet3d.args"), read("scontrol.args"))
}

#[test]
fn the_array_script_requeues_a_task_that_stopped_early() {
    let dir = scratch_dir("slurm-script");
    let (status, args, requeue) = run(&dir, 75);
    assert_eq!(status, Some(0));
    assert_eq!(
        args,
        "infer --config c.yaml --checkpoint m.safetensors --input v.zarr/0 --output pred --shard auto \
         --device cuda:0 --threads 16 --stop-after 3h50m"
    );
    assert_eq!(requeue, "requeue 123_4");
    let (status, _, requeue) = run(&dir, 0);
    assert_eq!((status, requeue.as_str()), (Some(0), ""), "a finished task is not requeued");
    let (status, _, requeue) = run(&dir, 1);
    assert_eq!((status, requeue.as_str()), (Some(1), ""), "a failure is passed through");
}
