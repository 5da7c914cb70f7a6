//! Helpers shared by the integration tests: fixture loading, error measures, scratch folders.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use unet3d::arch::{Architecture, Block, Nonlin, Norm, SePool, Target};
use unet3d::tensor::{Tensor, io, layout};

/// A fresh, empty folder under the system temp dir for this test process and `name`.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unet3d-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every file below `root` with its bytes, by path relative to `root`: a folder's whole state,
/// to compare two runs' outputs byte for byte.
pub fn files_under(root: &std::path::Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Path of a file under tests/fixtures.
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// A fixture file (safetensors) under tests/fixtures.
pub fn fixture(rel: &str) -> io::TensorFile {
    io::load(&fixture_path(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e:#}"))
}

/// The fixture's `__metadata__["meta"]` JSON object.
pub fn fixture_meta(f: &io::TensorFile) -> serde_json::Value {
    serde_json::from_str(f.metadata.get("meta").expect("fixture has meta")).expect("meta is JSON")
}

/// Norm of the difference over norm of the reference (0 when both are zero).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let diff: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

/// Asserts shape equality and relative error at most `tol`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let e = rel_err(got.data(), want.data());
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// A PyTorch (N, C, D, H, W) tensor in unet3d's (N, D, H, W, C) layout.
pub fn to_cl(t: &Tensor) -> Tensor {
    layout::ncdhw_to_ndhwc(t).unwrap()
}

/// Relative error for float64 slices (gradient checks).
pub fn rel_err64(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let diff: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = want.iter().map(|b| b.powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

/// Central finite-difference gradient of a scalar function of `x` (float64), step `h`.
pub fn numeric_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// A JSON list of [z, y, x] triples.
pub fn axes(v: &serde_json::Value) -> Vec<[usize; 3]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a: Vec<usize> = a.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            [a[0], a[1], a[2]]
        })
        .collect()
}

/// A JSON list of whole numbers.
pub fn counts(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// The model fixture's network (tests/fixtures/model), from its meta config.
pub fn fixture_arch(meta: &serde_json::Value) -> Architecture {
    let c = &meta["config"];
    let input = counts(&meta["input_shape"]);
    Architecture {
        in_channels: input[1],
        features_per_stage: counts(&c["features_per_stage"]),
        strides: axes(&c["strides"]),
        kernel_sizes: axes(&c["kernel_sizes"]),
        n_blocks_per_stage: counts(&c["n_blocks_per_stage"]),
        n_conv_per_stage_decoder: counts(&c["n_conv_per_stage_decoder"]),
        block: Block::BasicBlockD,
        squeeze_excitation: None,
        conv_bias: c["conv_bias"].as_bool().unwrap(),
        norm: Norm::default(),
        nonlin: Nonlin::default(),
        deep_supervision: meta["deep_supervision"].as_bool().unwrap(),
        targets: vec![Target::new("seg", meta["num_classes"].as_u64().unwrap() as usize)],
    }
}

/// The model fixture's `param.*` tensors as a PyTorch state dict (aliases included).
pub fn fixture_state_dict(f: &io::TensorFile) -> BTreeMap<String, Tensor> {
    f.tensors.iter().filter_map(|(k, t)| Some((k.strip_prefix("param.")?.to_string(), t.clone()))).collect()
}

/// A small three-stage architecture (a 1x3x3 first stage, two blocks in the middle one, deep
/// supervision) of widths `features`, for the tests that build their own networks.
pub fn small_arch(
    features: [usize; 3],
    block: Block,
    se: Option<SePool>,
    targets: Vec<Target>,
) -> Architecture {
    Architecture {
        in_channels: 2,
        features_per_stage: features.to_vec(),
        strides: vec![[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        kernel_sizes: vec![[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        n_blocks_per_stage: vec![1, 2, 1],
        n_conv_per_stage_decoder: vec![1, 2],
        block,
        squeeze_excitation: se,
        conv_bias: true,
        norm: Norm::default(),
        nonlin: Nonlin::default(),
        deep_supervision: true,
        targets,
    }
}
