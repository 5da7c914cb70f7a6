//! `unet3d evaluate` against metrics computed independently by numpy and scipy
//! (scripts/make-eval-fixture.py): three NIfTI cases with anisotropic spacing, a label one case
//! misses, a label only a prediction has, and a regression pair.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture_path, scratch_dir};
use serde_json::Value;

fn evaluate(args: &[&str], pred: &Path, reference: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_unet3d"))
        .arg("evaluate")
        .arg("--pred")
        .arg(pred)
        .arg("--ref")
        .arg(reference)
        .arg("--output")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn close(what: &str, got: &Value, want: &Value) {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) => assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{what}: {g} vs {w}"),
        _ => assert_eq!(got, want, "{what}"),
    }
}

/// numpy's nanmean over the values that are numbers; null when none are.
fn nanmean<'a>(values: impl Iterator<Item = &'a Value>) -> Value {
    let v: Vec<f64> = values.filter_map(Value::as_f64).collect();
    if v.is_empty() { Value::Null } else { (v.iter().sum::<f64>() / v.len() as f64).into() }
}

#[test]
fn label_maps_match_scipy() {
    let dir = scratch_dir("evaluate-labels");
    let expected = read(&fixture_path("eval/expected.json"));
    let tolerance = expected["tolerance_mm"].as_f64().unwrap().to_string();
    let out = dir.join("summary.json");
    let run =
        evaluate(&["--tolerance", &tolerance], &fixture_path("eval/pred"), &fixture_path("eval/ref"), &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let summary = read(&out);
    // Labels found in either map, label 3 from case_c's prediction alone.
    assert_eq!(summary["labels"], serde_json::json!([1, 2, 3]));
    let cases = expected["cases"].as_object().unwrap();
    let per_case = summary["metric_per_case"].as_array().unwrap();
    assert_eq!(per_case.len(), 3);
    for (got, (name, want)) in per_case.iter().zip(cases) {
        assert_eq!(got["case"], name.as_str());
        assert!(got["reference_file"].as_str().unwrap().ends_with(&format!("ref/{name}.nii.gz")));
        for (label, metrics) in want.as_object().unwrap() {
            for (metric, value) in metrics.as_object().unwrap() {
                close(&format!("{name} label {label} {metric}"), &got["metrics"][label][metric], value);
            }
        }
    }
    for label in ["1", "2", "3"] {
        for metric in ["Dice", "HD95", "NSD", "TP", "volume_ref_mm3"] {
            let want = nanmean(cases.values().map(|c| &c[label][metric]));
            close(&format!("mean {label} {metric}"), &summary["mean"][label][metric], &want);
        }
    }
    let fg = nanmean(["1", "2", "3"].iter().map(|l| &summary["mean"][*l]["Dice"]));
    close("foreground_mean Dice", &summary["foreground_mean"]["Dice"], &fg);
    // The table names the cases and the mean.
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(table.contains("case_b") && table.contains("mean") && table.contains("Dice/1"), "{table}");

    // --labels restricts; the means follow.
    let run = evaluate(
        &["--labels", "2", "--tolerance", &tolerance],
        &fixture_path("eval/pred"),
        &fixture_path("eval/ref"),
        &out,
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let summary = read(&out);
    assert_eq!(summary["labels"], serde_json::json!([2]));
    close("fg = label 2", &summary["foreground_mean"]["Dice"], &summary["mean"]["2"]["Dice"]);
    assert!(summary["metric_per_case"][0]["metrics"].get("1").is_none());
}

#[test]
fn regression_matches_numpy() {
    let dir = scratch_dir("evaluate-regression");
    let expected = read(&fixture_path("eval/expected.json"));
    let out = dir.join("summary.json");
    let run = evaluate(
        &["--regression"],
        &fixture_path("eval/regression_pred.nii.gz"),
        &fixture_path("eval/regression_ref.nii.gz"),
        &out,
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let summary = read(&out);
    for m in ["MAE", "RMSE", "R2"] {
        // f32 inputs summed in f64 both sides.
        let (g, w) =
            (summary["mean"]["values"][m].as_f64().unwrap(), expected["regression"][m].as_f64().unwrap());
        assert!((g - w).abs() < 1e-6 * w.abs().max(1.0), "{m}: {g} vs {w}");
    }
}

#[test]
fn bad_inputs_are_named() {
    let dir = scratch_dir("evaluate-bad");
    let pred = dir.join("pred");
    std::fs::create_dir_all(&pred).unwrap();
    for case in ["case_a", "case_b"] {
        let file = format!("{case}.nii.gz");
        std::fs::copy(fixture_path("eval/pred").join(&file), pred.join(&file)).unwrap();
    }
    let refs = fixture_path("eval/ref");
    let out = dir.join("summary.json");
    let stderr = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    // A stray file in the folder.
    std::fs::write(pred.join("notes.txt"), "x").unwrap();
    let e = stderr(evaluate(&[], &pred, &refs, &out));
    assert!(e.contains("notes.txt") && e.contains("not a volume"), "{e}");
    std::fs::remove_file(pred.join("notes.txt")).unwrap();
    // A case without a reference.
    std::fs::copy(fixture_path("eval/regression_pred.nii.gz"), pred.join("case_z.nii.gz")).unwrap();
    let e = stderr(evaluate(&[], &pred, &refs, &out));
    assert!(e.contains("case 'case_z' has no reference"), "{e}");
    std::fs::remove_file(pred.join("case_z.nii.gz")).unwrap();
    // A probability map is not a label map; a shape that differs names both files.
    let e = stderr(evaluate(
        &[],
        &fixture_path("eval/regression_pred.nii.gz"),
        &refs.join("case_a.nii.gz"),
        &out,
    ));
    assert!(e.contains("regression_pred.nii.gz") && e.contains("not a label"), "{e}");
    // A folder against one volume.
    let e = stderr(evaluate(&[], &pred, &refs.join("case_a.nii.gz"), &out));
    assert!(e.contains("two folders or two volumes"), "{e}");
    assert!(!out.exists(), "no summary for a failed evaluation");
    // Missing predictions are scored without, and named.
    let run = evaluate(&[], &pred, &refs, &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(read(&out)["missing_predictions"], serde_json::json!(["case_c"]));
    assert!(String::from_utf8_lossy(&run.stderr).contains("case_c"));
}
