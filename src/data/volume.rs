//! Whole volumes with their geometry, read from a NIfTI file or a Zarr array, and folders of
//! them as cases: what `unet3d evaluate` compares and what folder-wide jobs enumerate.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use super::array::VolumeArray;
use super::nifti;
use super::ome::Geometry;
use super::zarr::{ChunkCache, ZarrArray, has_array_metadata};
use crate::tensor::memory::check_allocation;

/// A volume in memory: (D, H, W, C) channels-last values and the geometry its file records.
#[derive(Debug, Clone)]
pub struct Volume {
    /// The file (and array) it was read from, for messages.
    pub name: String,
    pub shape: [usize; 3],
    pub channels: usize,
    /// Voxel size in mm (D, H, W), when the file records it.
    pub spacing: Option<[f64; 3]>,
    pub data: Vec<f32>,
}

/// The file endings a case can have, longest first.
const ENDINGS: &[&str] = &[".nii.gz", ".nii", ".zarr"];

/// The case name of a volume path: its file name without a volume ending; None for other files.
pub fn case_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    ENDINGS.iter().find_map(|e| file.strip_suffix(e)).filter(|n| !n.is_empty()).map(str::to_string)
}

/// Files unet3d writes beside cases: `evaluate`'s summary and `convert`'s dataset_config snippet.
const COMPANIONS: &[&str] = &["summary.json", "volumes.yaml"];

/// The cases of `folder`, sorted by name: every `.nii`, `.nii.gz` and `.zarr` entry. Hidden
/// entries (`.progress`, editors' files) and unet3d's own companion files are skipped; any other
/// entry is an error naming it, as is a name two entries share (`a.nii` beside `a.nii.gz`).
pub fn cases(folder: &Path) -> Result<Vec<(String, PathBuf)>> {
    let ctx = || format!("listing {}", folder.display());
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(folder).with_context(ctx)? {
        let path = entry.with_context(ctx)?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
        if hidden || path.file_name().and_then(|n| n.to_str()).is_some_and(|n| COMPANIONS.contains(&n)) {
            continue;
        }
        let Some(name) = case_name(&path) else {
            bail!(
                "{}: not a volume (a case is a .nii, .nii.gz or .zarr); move it out of {}",
                path.display(),
                folder.display()
            );
        };
        out.push((name, path));
    }
    out.sort();
    for pair in out.windows(2) {
        ensure!(
            pair[0].0 != pair[1].0,
            "{} and {}: two volumes of case '{}'; keep one",
            pair[0].1.display(),
            pair[1].1.display(),
            pair[0].0
        );
    }
    ensure!(!out.is_empty(), "{}: holds no volume (.nii, .nii.gz or .zarr)", folder.display());
    Ok(out)
}

/// Reads a whole volume: a NIfTI file, a Zarr array, the array `array` inside a Zarr group, or
/// an OME-Zarr image's full resolution.
/// A 4D Zarr array has its channels last (unet3d's layout).
pub fn read(path: &Path, array: Option<&str>) -> Result<Volume> {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if file.ends_with(".nii") || file.ends_with(".nii.gz") {
        let img = nifti::read(path)?;
        let h = img.header;
        return Ok(Volume {
            name: path.display().to_string(),
            shape: h.shape,
            channels: h.channels,
            spacing: Some(h.spacing),
            data: img.data,
        });
    }
    let path: PathBuf = match array {
        Some(a) if !has_array_metadata(path) => {
            ensure!(
                Path::new(a).components().all(|c| matches!(c, Component::Normal(_))) && !a.starts_with('.'),
                "--array {a}: not the path of an array inside a store"
            );
            path.join(a)
        }
        _ => path.to_path_buf(),
    };
    // An OME-Zarr image (a prediction's label image, say) is read at full resolution.
    let path =
        if has_array_metadata(&path) { path } else { super::ome::full_resolution(&path)?.unwrap_or(path) };
    let cache = ChunkCache::new(64 << 20);
    let z = ZarrArray::open_channels_last(&path, &cache)?;
    let (shape, channels) = (z.shape(), z.channels());
    let n = shape.iter().product::<usize>() * channels;
    check_allocation((n as u64).checked_mul(4), format_args!("{}: {shape:?} x {channels}", z.name()))?;
    let data = z.read([0; 3], shape)?;
    Ok(Volume {
        spacing: recorded_geometry(&path, &z)?.spacing,
        name: z.name().to_string(),
        shape,
        channels,
        data,
    })
}

/// The geometry a Zarr array records: its own `spacing` and `affine` (`unet3d convert`) or
/// `origin` (`unet3d infer`) attributes, else the scale and translation of its level in the
/// parent group's OME-Zarr `multiscales` (0.4 or 0.5).
pub fn recorded_geometry(path: &Path, z: &ZarrArray) -> Result<Geometry> {
    let name = z.name();
    let attributes = z.attributes();
    if let Some(s) = attributes.get("spacing") {
        let spacing: [f64; 3] = serde_json::from_value(s.clone())
            .with_context(|| format!("{name}: attribute \"spacing\" is not three numbers"))?;
        if let Some(a) = attributes.get("affine") {
            let a: [[f64; 4]; 4] = serde_json::from_value(a.clone())
                .with_context(|| format!("{name}: attribute \"affine\" is not a 4 x 4 matrix"))?;
            return Ok(Geometry::from_affine(&a, spacing));
        }
        let origin = match attributes.get("origin") {
            Some(o) => Some(
                serde_json::from_value(o.clone())
                    .with_context(|| format!("{name}: attribute \"origin\" is not three numbers"))?,
            ),
            None => None,
        };
        return Ok(Geometry { spacing: Some(spacing), origin });
    }
    Ok(Geometry { spacing: level_transform(path, "scale")?, origin: level_transform(path, "translation")? })
}

/// The spatial part (the last three entries) of the `kind` transformation ("scale" or
/// "translation") of the level at `path` in its parent group's OME-Zarr `multiscales`.
fn level_transform(path: &Path, kind: &str) -> Result<Option<[f64; 3]>> {
    let (Some(parent), Some(level)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(None);
    };
    for m in super::ome::multiscales_of(parent) {
        for d in m["datasets"].as_array().into_iter().flatten() {
            if d["path"] != level {
                continue;
            }
            for t in d["coordinateTransformations"].as_array().into_iter().flatten() {
                if t["type"] == kind {
                    let v: Vec<f64> = serde_json::from_value(t[kind].clone()).with_context(|| {
                        format!("{}: multiscales {kind} of '{level}' is not numbers", parent.display())
                    })?;
                    ensure!(
                        v.len() >= 3,
                        "{}: multiscales {kind} of '{level}' has {} axes",
                        parent.display(),
                        v.len()
                    );
                    let s = &v[v.len() - 3..];
                    return Ok(Some([s[0], s[1], s[2]]));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_and_folders() {
        assert_eq!(case_name(Path::new("a/hippo_001.nii.gz")).as_deref(), Some("hippo_001"));
        assert_eq!(case_name(Path::new("b.zarr")).as_deref(), Some("b"));
        assert_eq!(case_name(Path::new("notes.txt")), None);
        assert_eq!(case_name(Path::new(".nii")), None);
        let dir = std::env::temp_dir().join(format!("unet3d-volume-cases-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".progress")).unwrap();
        for f in ["b.nii.gz", "a.nii", "summary.json", "volumes.yaml"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let names: Vec<String> = cases(&dir).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
        std::fs::write(dir.join("README.md"), b"").unwrap();
        let e = format!("{:#}", cases(&dir).unwrap_err());
        assert!(e.contains("README.md") && e.contains("not a volume"), "{e}");
        std::fs::remove_file(dir.join("README.md")).unwrap();
        std::fs::write(dir.join("a.nii.gz"), b"").unwrap();
        let e = format!("{:#}", cases(&dir).unwrap_err());
        assert!(e.contains("two volumes of case 'a'"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Zarr volumes: the array inside a store, its spacing from its own attribute or from the
    /// parent image's OME-Zarr multiscales scale.
    #[test]
    fn zarr_volumes_with_their_spacing() {
        use crate::data::DType;
        use crate::data::zarr::{ArraySpec, ZarrWriter};
        let dir = std::env::temp_dir().join(format!("unet3d-volume-zarr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let values: Vec<f32> = (0..24).map(|v| (v % 3) as f32).collect();
        let write = |path: &Path, attributes: serde_json::Value| {
            let spec = ArraySpec {
                shape: [2, 3, 4],
                channels: 1,
                chunks: [2, 3, 4],
                dtype: DType::U8,
                attributes: attributes.as_object().cloned().unwrap_or_default(),
            };
            ZarrWriter::create(path, &spec, false).unwrap().write_region([0; 3], [2, 3, 4], &values).unwrap();
        };
        let store = dir.join("case.zarr");
        write(&store.join("label"), serde_json::json!({"spacing": [3.0, 1.0, 0.5]}));
        std::fs::write(store.join("zarr.json"), r#"{"zarr_format":3,"node_type":"group","attributes":{}}"#)
            .unwrap();
        let v = read(&store, Some("label")).unwrap();
        assert_eq!((v.shape, v.channels, v.spacing), ([2, 3, 4], 1, Some([3.0, 1.0, 0.5])));
        assert_eq!(v.data, values);
        let image = dir.join("img.zarr");
        write(&image.join("0"), serde_json::json!({}));
        let ome = serde_json::json!({"zarr_format": 3, "node_type": "group", "attributes": {"ome": {
            "version": "0.5",
            "multiscales": [{"datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [2.0, 0.7, 0.7]},
                {"type": "translation", "translation": [1.0, 5.0, -3.0, 4.0]}]}]}]}}});
        std::fs::write(image.join("zarr.json"), ome.to_string()).unwrap();
        assert_eq!(read(&image.join("0"), None).unwrap().spacing, Some([2.0, 0.7, 0.7]));
        let cache = ChunkCache::new(1 << 20);
        let level = image.join("0");
        let g = recorded_geometry(&level, &ZarrArray::open(&level, 1, &cache).unwrap()).unwrap();
        assert_eq!(g, Geometry { spacing: Some([2.0, 0.7, 0.7]), origin: Some([5.0, -3.0, 4.0]) });
        let e = format!("{:#}", read(&store, None).unwrap_err());
        assert!(e.contains("a Zarr group"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
