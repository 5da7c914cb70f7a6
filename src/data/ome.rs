//! OME-Zarr 0.5 image metadata (NGFF `multiscales`), so viewers (napari, neuroglancer, Fiji's
//! MoBIE) open an output in its physical geometry.
//!
//! OME-Zarr orders axes time, channel, then space; unet3d's arrays keep channels last, so only
//! single-channel arrays (label maps, scalar regression targets) are described as images. Label
//! maps of an OME-Zarr input are label images (`labels` group, `image-label` metadata) that name
//! the input image as their source.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use serde_json::{Value, json};

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
    Scale { scale: [f64; 3] },
    Translation { translation: [f64; 3] },
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

/// Where a volume sits in space, as far as its file records it, (D, H, W) = (z, y, x) in mm: the
/// voxel size and the position of the first voxel's centre.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Geometry {
    pub spacing: Option<[f64; 3]>,
    pub origin: Option<[f64; 3]>,
}

impl Geometry {
    /// The geometry a NIfTI-style affine (rows world x, y, z; columns D, H, W, 1) describes as
    /// OME-Zarr can: D, H and W along world z, y and x with positive voxel sizes. Any other
    /// orientation (a rotation, a flipped axis) keeps only the voxel sizes, as OME-Zarr 0.5's scale
    /// and translation cannot express it.
    pub fn from_affine(a: &[[f64; 4]; 4], spacing: [f64; 3]) -> Geometry {
        // (world row, voxel column) of each of D, H, W.
        let diagonal = [(2, 0), (1, 1), (0, 2)];
        let aligned = (0..3)
            .all(|r| (0..3).all(|c| if diagonal.contains(&(r, c)) { a[r][c] > 0.0 } else { a[r][c] == 0.0 }));
        let origin = aligned.then(|| [a[2][3], a[1][3], a[0][3]]);
        Geometry { spacing: Some(spacing), origin }
    }

    /// The geometry of a level of this volume whose voxels span `factor` of its own and whose
    /// first voxel centre sits `offset` of its voxels from its first one's.
    pub fn level(&self, factor: [usize; 3], offset: [f64; 3]) -> Geometry {
        let mm = self.spacing.unwrap_or([1.0; 3]);
        Geometry {
            spacing: self.spacing.map(|s| std::array::from_fn(|a| s[a] * factor[a] as f64)),
            origin: self.origin.map(|o| std::array::from_fn(|a| o[a] + mm[a] * offset[a])),
        }
    }
}

/// One resolution level of an image: its array (a path relative to the group that declares the
/// image) and where its voxels sit, in units of the full-resolution voxel.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub path: String,
    /// How many full-resolution voxels one voxel spans per axis (1 at full resolution).
    pub factor: [usize; 3],
    /// Where a voxel's centre is, in full-resolution voxels from the first one's: 0 when a level
    /// samples its first voxel, (factor - 1) / 2 when it averages its box.
    pub offset: [f64; 3],
}

/// A 3D image with its levels, finest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub name: String,
    pub levels: Vec<Level>,
}

impl Image {
    fn multiscale(&self, geometry: &Geometry) -> Multiscale {
        let unit = geometry.spacing.map(|_| "millimeter");
        let mm = geometry.spacing.unwrap_or([1.0; 3]);
        let datasets = self
            .levels
            .iter()
            .map(|l| {
                let mut transforms =
                    vec![Transform::Scale { scale: std::array::from_fn(|a| mm[a] * l.factor[a] as f64) }];
                if geometry.origin.is_some() || l.offset != [0.0; 3] {
                    let origin = geometry.origin.unwrap_or([0.0; 3]);
                    transforms.push(Transform::Translation {
                        translation: std::array::from_fn(|a| origin[a] + mm[a] * l.offset[a]),
                    });
                }
                Dataset { path: l.path.clone(), transforms }
            })
            .collect();
        Multiscale {
            name: self.name.clone(),
            axes: ["z", "y", "x"].iter().map(|&name| Axis { name, kind: "space", unit }).collect(),
            datasets,
        }
    }
}

/// The `attributes` of a group declaring `images` (arrays of the group): one `multiscales` entry
/// each, axes z, y, x scaled by the geometry's spacing in millimetres (unitless, full-resolution
/// scale 1 when the input recorded none) and translated to its origin where it records one.
pub fn multiscales(images: &[Image], geometry: &Geometry) -> Value {
    let images: Vec<Multiscale> = images.iter().map(|i| i.multiscale(geometry)).collect();
    json!({"ome": {"version": VERSION, "multiscales": images}})
}

/// The `attributes` of an image's `labels` group, which lists its label images by name.
pub fn labels(names: &[&str]) -> Value {
    json!({"ome": {"version": VERSION, "labels": names}})
}

/// The `attributes` of a label image: its multiscales and `image-label` metadata, with the path of
/// the image it labels relative to this group (the spec's default, `../../`, is an image holding
/// the `labels` group; a prediction's labels live beside the image instead).
pub fn label_image(image: &Image, geometry: &Geometry, source: Option<&str>) -> Value {
    let mut label = json!({});
    if let Some(s) = source {
        label["source"] = json!({"image": s});
    }
    json!({"ome": {"version": VERSION, "multiscales": [image.multiscale(geometry)], "image-label": label}})
}

/// The full-resolution array of an OME-Zarr image (its first `multiscales` dataset), if `dir` is
/// one.
pub fn full_resolution(dir: &Path) -> Result<Option<PathBuf>> {
    let Some(first) = multiscales_of(dir).into_iter().next() else { return Ok(None) };
    let level = first["datasets"][0]["path"]
        .as_str()
        .with_context(|| format!("{}: OME-Zarr multiscales without a first dataset path", dir.display()))?;
    ensure!(
        Path::new(level).components().all(|c| matches!(c, Component::Normal(_))) && !level.starts_with('.'),
        "{}: multiscales dataset path '{level}' is not an array inside the image",
        dir.display()
    );
    Ok(Some(dir.join(level)))
}

/// The OME-Zarr image group whose multiscales list the array at `array`, if one does.
pub fn image_of(array: &Path) -> Option<PathBuf> {
    let (group, name) = (array.parent()?, array.file_name()?.to_str()?);
    let listed = multiscales_of(group)
        .iter()
        .any(|m| m["datasets"].as_array().into_iter().flatten().any(|d| d["path"] == name));
    listed.then(|| group.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_scale_by_their_factor_and_shift_by_their_offset() {
        let image = Image {
            name: "seg".into(),
            levels: vec![
                Level { path: "seg".into(), factor: [1; 3], offset: [0.0; 3] },
                Level { path: "seg.1".into(), factor: [1, 2, 2], offset: [0.0, 0.5, 0.5] },
            ],
        };
        let mm = Geometry { spacing: Some([3.0, 0.5, 0.5]), origin: None };
        let m = multiscales(std::slice::from_ref(&image), &mm);
        let d = &m["ome"]["multiscales"][0]["datasets"];
        assert_eq!(d[0]["coordinateTransformations"], json!([{"type": "scale", "scale": [3.0, 0.5, 0.5]}]));
        assert_eq!(
            d[1]["coordinateTransformations"],
            json!([{"type": "scale", "scale": [3.0, 1.0, 1.0]}, {"type": "translation", "translation": [0.0, 0.25, 0.25]}])
        );
        assert_eq!(
            m["ome"]["multiscales"][0]["axes"][0],
            json!({"name": "z", "type": "space", "unit": "millimeter"})
        );
        // With an origin every level is translated to it (plus its half-voxel shift).
        let placed = Geometry { origin: Some([10.0, -4.0, 2.0]), ..mm };
        let m = multiscales(std::slice::from_ref(&image), &placed);
        let d = &m["ome"]["multiscales"][0]["datasets"];
        assert_eq!(
            d[0]["coordinateTransformations"][1],
            json!({"type": "translation", "translation": [10.0, -4.0, 2.0]})
        );
        assert_eq!(
            d[1]["coordinateTransformations"][1],
            json!({"type": "translation", "translation": [10.0, -3.75, 2.25]})
        );
        let l = label_image(&image, &Geometry::default(), Some("../../../in.ome.zarr"));
        assert_eq!(l["ome"]["image-label"], json!({"source": {"image": "../../../in.ome.zarr"}}));
        assert_eq!(l["ome"]["multiscales"][0]["axes"][2], json!({"name": "x", "type": "space"}));
        assert_eq!(labels(&["seg"]), json!({"ome": {"version": "0.5", "labels": ["seg"]}}));
    }

    #[test]
    fn an_axis_aligned_affine_gives_the_origin_and_any_other_only_the_spacing() {
        // hippocampus_001: D, H, W along world z, y, x, first voxel at (1, 1, 1) mm.
        let a = [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 2.0], [0.5, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]];
        assert_eq!(Geometry::from_affine(&a, [0.5, 1.0, 1.0]).origin, Some([3.0, 2.0, 1.0]));
        let mut flipped = a;
        flipped[0][2] = -1.0;
        let g = Geometry::from_affine(&flipped, [0.5, 1.0, 1.0]);
        assert_eq!((g.spacing, g.origin), (Some([0.5, 1.0, 1.0]), None));
        // A level of twice the voxel size averaging its boxes starts half a voxel in.
        let g = Geometry::from_affine(&a, [0.5, 1.0, 1.0]).level([1, 2, 2], [0.0, 0.5, 0.5]);
        assert_eq!((g.spacing, g.origin), (Some([0.5, 2.0, 2.0]), Some([3.0, 2.5, 1.5])));
        let mut rotated = a;
        rotated[0][1] = 0.1;
        assert_eq!(Geometry::from_affine(&rotated, [0.5, 1.0, 1.0]).origin, None);
    }
}
