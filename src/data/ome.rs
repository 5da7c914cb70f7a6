//! OME-Zarr 0.5 image metadata (NGFF `multiscales`), so viewers (napari, neuroglancer, Fiji's
//! MoBIE) open an output in its physical geometry.
//!
//! OME-Zarr orders axes time, channel, then space; unet3d's arrays keep channels last, so only
//! single-channel arrays (label maps, scalar regression targets) are described as images.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// The `multiscales` a group at `dir` declares (OME-Zarr 0.5 under `ome` in a v3 group's
/// `zarr.json`, 0.4 at the top of a v2 `.zattrs`); empty for anything else.
pub fn multiscales_of(dir: &Path) -> Vec<Value> {
    let read = |p: PathBuf| -> Option<Value> { serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok() };
    let attrs = match (read(dir.join("zarr.json")), read(dir.join(".zattrs"))) {
        (Some(v), _) if v["node_type"] == "group" => v["attributes"].clone(),
        (_, Some(v)) => v,
        _ => return Vec::new(),
    };
    let m = attrs.get("ome").unwrap_or(&attrs).get("multiscales");
    m.and_then(Value::as_array).cloned().unwrap_or_default()
}

/// The version written.
pub const VERSION: &str = "0.5";

#[derive(Debug, Clone, Serialize)]
struct Axis {
    name: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Transform {
    Scale { scale: Vec<f64> },
}

#[derive(Debug, Clone, Serialize)]
struct Dataset {
    path: String,
    #[serde(rename = "coordinateTransformations")]
    transforms: Vec<Transform>,
}

#[derive(Debug, Clone, Serialize)]
struct Multiscale {
    name: String,
    axes: Vec<Axis>,
    datasets: Vec<Dataset>,
}

/// The `attributes` of a group holding one single-level 3D image per entry of `arrays` (each an
/// array of the group, by name): one `multiscales` entry each, axes z, y, x, scaled by `spacing`
/// in millimetres (unitless scale 1 when the input recorded none).
pub fn multiscales(arrays: &[&str], spacing: Option<[f64; 3]>) -> Value {
    let unit = spacing.map(|_| "millimeter");
    let axes: Vec<Axis> = ["z", "y", "x"].iter().map(|&name| Axis { name, kind: "space", unit }).collect();
    let scale = spacing.unwrap_or([1.0; 3]).to_vec();
    let images: Vec<Multiscale> = arrays
        .iter()
        .map(|a| Multiscale {
            name: a.to_string(),
            axes: axes.clone(),
            datasets: vec![Dataset {
                path: a.to_string(),
                transforms: vec![Transform::Scale { scale: scale.clone() }],
            }],
        })
        .collect();
    serde_json::json!({"ome": {"version": VERSION, "multiscales": images}})
}
