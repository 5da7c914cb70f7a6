//! `unet3d convert`: NIfTI cases (one at a time, or an MSD / nnU-Net folder with dataset.json) into
//! the seed's Zarr layout, `<case>.zarr/{input,label}`, which the dataset reads by region.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::{Value, json};

use super::DType;
use super::finite::NonFinite;
use super::nifti::{self, NiftiHeader, NiftiImage};
use super::zarr::{ArraySpec, ZarrWriter, has_array_metadata};

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Spatial chunk shape (clipped to the volume).
    pub chunks: [usize; 3],
    /// Replace cases (and volumes.yaml) that exist.
    pub overwrite: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions { chunks: [64; 3], overwrite: false }
    }
}

/// One case's files: one image per channel (or one 4D image holding them all) and its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub name: String,
    pub images: Vec<PathBuf>,
    pub label: Option<PathBuf>,
}

/// What an MSD or nnU-Net v2 dataset.json describes.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetInfo {
    pub cases: Vec<Case>,
    /// One per input channel (`channel_names`, or MSD's `modality`).
    pub channel_names: Vec<String>,
    /// Class names by label value 0, 1, ...
    pub labels: Vec<String>,
}

/// The input dtype for images with these headers, the same for every case so normalisation by
/// dtype treats all alike: the smallest integer type holding every stored type's range, or
/// float32 when any image is float, scaled, or int32.
pub fn input_dtype(headers: &[&NiftiHeader]) -> DType {
    if headers.iter().any(|h| h.scaling.is_some() || !h.dtype.is_integer() || h.dtype.range().1 > 65535.0) {
        return DType::F32;
    }
    let lo = headers.iter().map(|h| h.dtype.range().0).fold(0.0, f64::min);
    let hi = headers.iter().map(|h| h.dtype.range().1).fold(0.0, f64::max);
    if lo >= 0.0 && hi <= 255.0 {
        DType::U8
    } else if lo >= 0.0 {
        DType::U16
    } else if lo >= -32768.0 && hi <= 32767.0 {
        DType::I16
    } else {
        DType::F32
    }
}

/// Reads an MSD (`training` list, `modality`, `{"0": "background"}` labels) or nnU-Net v2
/// (`channel_names`, `{"background": 0}` labels, `<case>_0000<file_ending>` files) dataset.json.
pub fn read_dataset(dir: &Path) -> Result<DatasetInfo> {
    let path = dir.join("dataset.json");
    let name = path.display();
    let text = std::fs::read_to_string(&path).with_context(|| format!("{name}: cannot read"))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("{name}: not valid JSON"))?;
    let channels = match json.get("channel_names").or_else(|| json.get("modality")) {
        Some(Value::Object(m)) => numbered(m).with_context(|| format!("{name}: channel_names / modality"))?,
        _ => bail!("{name}: neither `channel_names` (nnU-Net v2) nor `modality` (MSD) is an object"),
    };
    let labels = match json.get("labels") {
        Some(Value::Object(m)) => labels(m).with_context(|| format!("{name}: labels"))?,
        _ => bail!("{name}: `labels` is missing or not an object"),
    };
    let ending = json.get("file_ending").and_then(Value::as_str).unwrap_or(".nii.gz");
    let cases = match json.get("training") {
        Some(Value::Array(entries)) => entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                msd_case(dir, e, channels.len(), ending).with_context(|| format!("{name}: training[{i}]"))
            })
            .collect::<Result<Vec<_>>>()?,
        _ => nnunet_cases(dir, channels.len(), ending)?,
    };
    ensure!(!cases.is_empty(), "{name}: no training cases");
    Ok(DatasetInfo { cases, channel_names: channels, labels })
}

/// `{"0": "T2", "1": "ADC"}` as a list, checking the keys are 0, 1, ...
fn numbered(m: &serde_json::Map<String, Value>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..m.len() {
        match m.get(&i.to_string()) {
            Some(Value::String(s)) => out.push(s.clone()),
            _ => bail!("keys must be \"0\", \"1\", ... with string values; {:?} has no string at {i:?}", m),
        }
    }
    ensure!(!out.is_empty(), "empty");
    Ok(out)
}

/// MSD's `{"0": "background", ...}` or nnU-Net v2's `{"background": 0, ...}`, as names by value.
fn labels(m: &serde_json::Map<String, Value>) -> Result<Vec<String>> {
    if m.values().all(Value::is_string) {
        return numbered(m);
    }
    let mut by_value = Vec::new();
    for (k, v) in m {
        match v.as_u64() {
            Some(v) => by_value.push((v, k.clone())),
            None => bail!("{k:?}: {v} is not a label value (region-based label lists are not supported)"),
        }
    }
    by_value.sort();
    for (i, (v, k)) in by_value.iter().enumerate() {
        ensure!(*v == i as u64, "label values must be 0, 1, ... without gaps; {k:?} is {v}");
    }
    Ok(by_value.into_iter().map(|(_, k)| k).collect())
}

fn strip_ending<'a>(file: &'a str, ending: &str) -> &'a str {
    file.strip_suffix(ending).unwrap_or(file)
}

/// An MSD training entry: its image is one (possibly 4D) file, or, as nnU-Net's conversion
/// leaves them, one `<case>_000K` file per channel.
fn msd_case(dir: &Path, entry: &Value, channels: usize, ending: &str) -> Result<Case> {
    let file = |key: &str| -> Result<PathBuf> {
        let rel = entry.get(key).and_then(Value::as_str).with_context(|| format!("no `{key}` path"))?;
        Ok(dir.join(rel.strip_prefix("./").unwrap_or(rel)))
    };
    let image = file("image")?;
    let label = file("label")?;
    let stem = strip_ending(&image.file_name().unwrap_or_default().to_string_lossy(), ending).to_string();
    let images = if image.is_file() {
        vec![image]
    } else {
        let split: Vec<PathBuf> =
            (0..channels).map(|c| image.with_file_name(format!("{stem}_{c:04}{ending}"))).collect();
        ensure!(
            split.iter().all(|p| p.is_file()),
            "{}: missing (nor are there per-channel files like {})",
            image.display(),
            split[0].display()
        );
        split
    };
    ensure!(label.is_file(), "{}: missing label", label.display());
    Ok(Case { name: stem, images, label: Some(label) })
}

/// nnU-Net v2: imagesTr/<case>_0000<ending> ... and labelsTr/<case><ending>.
fn nnunet_cases(dir: &Path, channels: usize, ending: &str) -> Result<Vec<Case>> {
    let images = dir.join("imagesTr");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&images).with_context(|| format!("{}: cannot list", images.display()))? {
        let file = e?.file_name().to_string_lossy().into_owned();
        if let Some(case) = file.strip_suffix(&format!("_0000{ending}")) {
            names.push(case.to_string());
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let images: Vec<PathBuf> =
                (0..channels).map(|c| images.join(format!("{name}_{c:04}{ending}"))).collect();
            if let Some(missing) = images.iter().find(|p| !p.is_file()) {
                bail!("case {name}: {} is missing ({channels} channels in dataset.json)", missing.display());
            }
            let label = dir.join("labelsTr").join(format!("{name}{ending}"));
            ensure!(label.is_file(), "case {name}: label {} is missing", label.display());
            Ok(Case { name, images, label: Some(label) })
        })
        .collect()
}

fn path_list(paths: &[PathBuf]) -> Value {
    paths.iter().map(|p| Value::String(p.display().to_string())).collect()
}

fn geometry(h: &NiftiHeader, sources: &[PathBuf]) -> serde_json::Map<String, Value> {
    let mut a = serde_json::Map::new();
    a.insert("source".into(), path_list(sources));
    a.insert("spacing".into(), json!(h.spacing));
    a.insert("affine".into(), json!(h.affine));
    a.insert("nifti_dtype".into(), json!(h.dtype.name()));
    a
}

/// The case's images as one (D, H, W, C) volume; every file must have the same shape.
fn read_images(case: &Case) -> Result<(NiftiImage, usize)> {
    let mut images = case.images.iter().map(|p| nifti::read(p)).collect::<Result<Vec<_>>>()?;
    for (img, p) in images.iter().zip(&case.images) {
        if let Some(bad) = NonFinite::first_in(&img.data, [0; 3], img.header.shape, img.header.channels) {
            bail!(
                "{}: holds {bad} (after the header's scaling); a converted volume must be finite: fix \
                 the image, or mask it before converting",
                p.display()
            );
        }
    }
    let first = images[0].header.clone();
    for (img, p) in images.iter().zip(&case.images) {
        ensure!(
            img.header.shape == first.shape,
            "case {}: {} has shape {:?} (D, H, W) but {} has {:?}",
            case.name,
            p.display(),
            img.header.shape,
            case.images[0].display(),
            first.shape
        );
    }
    let channels: usize = images.iter().map(|i| i.header.channels).sum();
    if images.len() == 1 {
        return Ok((images.remove(0), channels));
    }
    let voxels: usize = first.shape.iter().product();
    let mut data = Vec::with_capacity(voxels * channels);
    for v in 0..voxels {
        for img in &images {
            let c = img.header.channels;
            data.extend_from_slice(&img.data[v * c..(v + 1) * c]);
        }
    }
    Ok((NiftiImage { header: first, data }, channels))
}

/// Writes `out` (a `<case>.zarr` directory) next to it under a temporary name and renames it into
/// place, so an interrupted conversion never leaves a half-written case behind.
pub fn convert_case(
    case: &Case,
    dtype: DType,
    out: &Path,
    opts: &ConvertOptions,
    labels: Option<&[String]>,
) -> Result<()> {
    ensure!(
        opts.overwrite || !out.exists(),
        "{}: already exists; refusing to overwrite it (pass --overwrite to replace it)",
        out.display()
    );
    let (image, channels) = read_images(case)?;
    let h = &image.header;
    let label = match &case.label {
        Some(p) => Some((p, checked_label(case, p, h, labels)?)),
        None => None,
    };
    let file = out.file_name().with_context(|| format!("{}: no directory name", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.partial.zarr", file.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    let chunks = opts.chunks;
    let spec = ArraySpec { shape: h.shape, channels, chunks, dtype, attributes: geometry(h, &case.images) };
    ZarrWriter::create(&tmp.join("input"), &spec, false)?.write_region([0; 3], h.shape, &image.data)?;
    if let Some((path, values)) = label {
        let mut attributes = geometry(h, std::slice::from_ref(path));
        if let Some(names) = labels {
            attributes.insert("labels".into(), json!(names));
        }
        let spec = ArraySpec { shape: h.shape, channels: 1, chunks, dtype: DType::U8, attributes };
        ZarrWriter::create(&tmp.join("label"), &spec, false)?.write_region([0; 3], h.shape, &values)?;
    }
    if out.exists() {
        // Only what convert wrote: a case folder holding an input array.
        ensure!(
            has_array_metadata(&out.join("input")),
            "{}: not a case unet3d convert wrote (no input array); refusing to remove it",
            out.display()
        );
        std::fs::remove_dir_all(out)
            .with_context(|| format!("{}: cannot remove to replace it", out.display()))?;
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))
}

/// The label's voxels, checked to be class indices of the image's geometry.
fn checked_label(
    case: &Case,
    path: &Path,
    image: &NiftiHeader,
    labels: Option<&[String]>,
) -> Result<Vec<f32>> {
    let name = path.display();
    let label = nifti::read(path)?;
    let l = &label.header;
    ensure!(
        l.shape == image.shape && l.channels == 1,
        "{name}: shape {:?} x {} channels, but case {}'s image is {:?} (D, H, W); a label is one 3D map \
         covering the image",
        l.shape,
        l.channels,
        case.name,
        image.shape
    );
    for a in 0..3 {
        ensure!(
            (l.spacing[a] - image.spacing[a]).abs() <= 1e-4 * image.spacing[a].abs().max(1.0),
            "{name}: spacing {:?} differs from the image's {:?}",
            l.spacing,
            image.spacing
        );
    }
    let max = labels.map_or(255, |l| l.len() - 1);
    if let Some((i, v)) =
        label.data.iter().enumerate().find(|&(_, &v)| v.fract() != 0.0 || v < 0.0 || v > max as f32)
    {
        let [_, hh, w] = l.shape;
        bail!(
            "{name}: value {v} at voxel (d, h, w) = ({}, {}, {}) is not a class index 0..={max}{}",
            i / (hh * w),
            i / w % hh,
            i % w,
            labels.map_or(String::new(), |l| format!(" (dataset.json lists {})", l.join(", ")))
        );
    }
    Ok(label.data)
}

/// A bar over `len` items named `unit`, with throughput and ETA.
pub(crate) fn progress(len: usize, what: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64).with_prefix(what.to_string());
    let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{per_sec}}, ETA {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("a valid template"));
    bar
}

/// Converts one case (`unet3d convert --image ... [--label ...] --out case.zarr`).
pub fn convert_pair(
    images: &[PathBuf],
    label: Option<&Path>,
    out: &Path,
    opts: &ConvertOptions,
) -> Result<()> {
    ensure!(!images.is_empty(), "no image given");
    let headers = images.iter().map(|p| nifti::read_header(p)).collect::<Result<Vec<_>>>()?;
    let name = out.file_stem().map_or("case".into(), |s| s.to_string_lossy().into_owned());
    let case = Case { name, images: images.to_vec(), label: label.map(Path::to_path_buf) };
    convert_case(&case, input_dtype(&headers.iter().collect::<Vec<_>>()), out, opts, None)
}

/// Converts every case of an MSD / nnU-Net folder to `out_dir/<case>.zarr` and writes
/// `out_dir/volumes.yaml`; returns the case directories. Refuses before writing anything when a
/// case or volumes.yaml exists, unless overwriting.
pub fn convert_dataset(dir: &Path, out_dir: &Path, opts: &ConvertOptions) -> Result<Vec<PathBuf>> {
    let info = read_dataset(dir)?;
    let outs: Vec<PathBuf> = info.cases.iter().map(|c| out_dir.join(format!("{}.zarr", c.name))).collect();
    let yaml = out_dir.join("volumes.yaml");
    if !opts.overwrite {
        let existing: Vec<&PathBuf> = outs.iter().chain([&yaml]).filter(|p| p.exists()).collect();
        if let Some(first) = existing.first() {
            bail!(
                "{} and {} more already exist in {}; refusing to overwrite them (pass --overwrite to \
                 replace them)",
                first.display(),
                existing.len() - 1,
                out_dir.display()
            );
        }
    }
    // One dtype for all cases, from the headers (the hippocampus set mixes uint8 and float32).
    let headers = info
        .cases
        .par_iter()
        .map(|c| c.images.iter().map(|p| nifti::read_header(p)).collect::<Result<Vec<_>>>())
        .collect::<Result<Vec<_>>>()?;
    for (case, h) in info.cases.iter().zip(&headers) {
        let got: usize = h.iter().map(|h| h.channels).sum();
        ensure!(
            got == info.channel_names.len(),
            "case {}: {got} channels in {}, but dataset.json names {} ({})",
            case.name,
            case.images[0].display(),
            info.channel_names.len(),
            info.channel_names.join(", ")
        );
    }
    let dtype = input_dtype(&headers.iter().flatten().collect::<Vec<_>>());
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let bar = progress(info.cases.len(), "convert", "cases");
    info.cases.par_iter().zip(&outs).try_for_each(|(case, out)| {
        convert_case(case, dtype, out, opts, Some(&info.labels))
            .with_context(|| format!("case {}", case.name))?;
        bar.inc(1);
        Ok::<_, anyhow::Error>(())
    })?;
    bar.finish();
    let abs =
        std::fs::canonicalize(out_dir).with_context(|| format!("{}: cannot resolve", out_dir.display()))?;
    let text = volumes_yaml(&info, dir, &abs);
    crate::tensor::io::write_atomic(&yaml, text.as_bytes())?;
    Ok(outs)
}

/// A `dataset_config` for the converted cases: one softmax Dice + CE target over all classes.
fn volumes_yaml(info: &DatasetInfo, source: &Path, abs_out: &Path) -> String {
    let quote = |p: &Path| Value::String(p.display().to_string()).to_string();
    let norm: Vec<&str> = info
        .channel_names
        .iter()
        .map(|c| if c.eq_ignore_ascii_case("ct") { "ct" } else { "zscore" })
        .collect();
    let mut y = format!(
        "# Written by `unet3d convert` from {}: {} cases. Paste into your config's dataset_config\n\
         # (tasks/reference.yaml documents every key).\n\
         dataset_config:\n  in_channels: {}  # {}\n  normalization: [{}]\n  sampling: random\n  \
         targets:\n    label:\n      channels: {}\n      class_names: [{}]\n      activation: softmax\n      \
         loss_fn: DiceCELoss\n  volume_paths:\n",
        source.display(),
        info.cases.len(),
        info.channel_names.len(),
        info.channel_names.join(", "),
        norm.join(", "),
        info.labels.len(),
        info.labels.iter().map(|l| Value::String(l.clone()).to_string()).collect::<Vec<_>>().join(", "),
    );
    for c in &info.cases {
        let case = abs_out.join(format!("{}.zarr", c.name));
        y += &format!(
            "    - {{input: {}, label: {}, ref_label: label}}\n",
            quote(&case.join("input")),
            quote(&case.join("label"))
        );
    }
    y
}
