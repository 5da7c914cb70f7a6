//! What `unet3d infer --input` names, as volumes to predict: one Zarr array (written to
//! `predictions.zarr`, the layout sharded jobs split by block), or cases (a NIfTI file, a folder
//! of NIfTI files and Zarr stores, or a list file of them), each predicted on its own, skipped
//! when a marker says it is finished, and split between sharded jobs by case.
//!
//! Output layout for cases under `output_path`: a Zarr case `<case>.zarr` gets
//! `<case>.zarr/<target>`; a NIfTI case gets `<target>/<case>.nii.gz`, written from a working
//! store under `.work/` in the input's header and geometry once every block is done. Progress
//! lives in `.progress/<case>/` (the block markers and run record of `infer::run`), and
//! `.progress/<case>.done` marks a case whose outputs are complete.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use super::blend::OutputTarget;
use super::run::Layout;
use crate::config::OutputType;
use crate::data::nifti::{self, NiftiHeader, NiftiType};
use crate::data::ome::{self, Geometry};
use crate::data::volume::{self, case_name};
use crate::data::zarr::{ChunkCache, ZarrArray, has_array_metadata};
use crate::data::{VolumeArray, array::InMemoryArray, convert};

/// Where a case's input is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Nifti(PathBuf),
    /// The Zarr array to read (inside the case's store).
    Zarr(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    pub source: Source,
}

/// What `--input` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inputs {
    /// One Zarr array: `<output_path>/predictions.zarr`, shardable by block.
    Volume(PathBuf),
    Cases(Vec<Case>),
}

/// Resolves `input`: a `.nii`/`.nii.gz` file, a Zarr array, an OME-Zarr image (its level 0), a
/// folder of cases, or a list file (`.txt`: one path per line, relative to the list's folder;
/// blank lines and `#` comments skipped). `array` names the array inside a case's Zarr store.
pub fn resolve(input: &Path, array: &str) -> Result<Inputs> {
    if is_nifti(input) {
        ensure!(input.is_file(), "{}: no such NIfTI file", input.display());
        return Ok(Inputs::Cases(vec![case(input, array)?]));
    }
    if input.is_file() {
        ensure!(
            input.extension().is_some_and(|e| e == "txt"),
            "{}: not a volume (.nii, .nii.gz, a Zarr array or store), a folder of them, or a .txt \
             list of them",
            input.display()
        );
        return list_file(input, array).map(Inputs::Cases);
    }
    if let Some(level) = ome::full_resolution(input)? {
        return Ok(Inputs::Volume(level));
    }
    if has_array_metadata(input) {
        return Ok(Inputs::Volume(input.to_path_buf()));
    }
    ensure!(input.is_dir(), "{}: does not exist", input.display());
    if case_name(input).is_some() {
        // A `<case>.zarr` store given alone.
        return Ok(Inputs::Cases(vec![case(input, array)?]));
    }
    let cases =
        volume::cases(input)?.into_iter().map(|(_, p)| case(&p, array)).collect::<Result<Vec<_>>>()?;
    Ok(Inputs::Cases(cases))
}

fn is_nifti(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.ends_with(".nii") || p.ends_with(".nii.gz"))
}

fn case(path: &Path, array: &str) -> Result<Case> {
    // An array inside a `<case>.zarr` store (`unet3d convert`'s `<case>.zarr/input`).
    if has_array_metadata(path)
        && let Some(name) = path.parent().and_then(case_name)
    {
        return Ok(Case { name, source: Source::Zarr(path.to_path_buf()) });
    }
    let name = case_name(path)
        .with_context(|| format!("{}: not a case (a .nii, .nii.gz or .zarr)", path.display()))?;
    let source = if is_nifti(path) {
        Source::Nifti(path.to_path_buf())
    } else if let Some(level) = ome::full_resolution(path)? {
        Source::Zarr(level)
    } else {
        ensure!(
            Path::new(array).components().count() == 1,
            "--input-array {array}: the name of an array inside each store"
        );
        let a = path.join(array);
        ensure!(
            has_array_metadata(&a),
            "{}: case '{name}' has no array '{array}' (pass --input-array NAME)",
            path.display()
        );
        Source::Zarr(a)
    };
    Ok(Case { name, source })
}

fn list_file(list: &Path, array: &str) -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    let base = list.parent().unwrap_or(Path::new("."));
    let mut cases: Vec<Case> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let path = base.join(line);
        ensure!(path.exists(), "{}:{}: {} does not exist", list.display(), n + 1, path.display());
        let c = case(&path, array).with_context(|| format!("{}:{}", list.display(), n + 1))?;
        if let Some(other) = cases.iter().find(|o| o.name == c.name) {
            bail!(
                "{}:{}: a second case named '{}' (first: {:?})",
                list.display(),
                n + 1,
                c.name,
                other.source
            );
        }
        cases.push(c);
    }
    ensure!(!cases.is_empty(), "{}: lists no volume", list.display());
    Ok(cases)
}

/// A case's input, opened.
pub struct Opened {
    pub array: Box<dyn VolumeArray>,
    /// A NIfTI input's header: its output's header.
    pub header: Option<NiftiHeader>,
    /// Voxel size and origin, as far as the input records them.
    pub geometry: Geometry,
    /// The OME-Zarr image a Zarr input is a level of, if it is one.
    pub image: Option<PathBuf>,
}

/// Opens a case's input for reading. A Zarr chunk missing from the store is an error unless
/// `allow_missing_chunks`.
pub fn open(case: &Case, channels: usize, allow_missing_chunks: bool, cache: &ChunkCache) -> Result<Opened> {
    match &case.source {
        Source::Zarr(p) => {
            let array = ZarrArray::open(p, channels, cache)?;
            let geometry = volume::recorded_geometry(p, &array)?;
            let array = if allow_missing_chunks { array } else { array.refusing_missing_chunks() };
            Ok(Opened { array: Box::new(array), header: None, geometry, image: ome::image_of(p) })
        }
        Source::Nifti(p) => {
            let img = nifti::read(p)?;
            let h = img.header;
            ensure!(
                h.channels == channels,
                "{}: {} channels (the 4th NIfTI axis), but the model takes {channels}",
                p.display(),
                h.channels
            );
            // The dtype `unet3d convert --image` would give this file, so the model sees what it
            // would see after a conversion.
            let dtype = convert::input_dtype(&[&h]);
            let array = InMemoryArray::new(p.display().to_string(), h.shape, channels, dtype, img.data)?;
            let geometry = Geometry::from_affine(&h.affine, h.spacing);
            Ok(Opened { array: Box::new(array), geometry, header: Some(h), image: None })
        }
    }
}

/// The paths of one case's outputs.
pub struct CaseOutput {
    pub layout: Layout,
    /// Marks the case finished, written after its outputs.
    pub marker: PathBuf,
    /// Where a NIfTI case's targets go, by target (empty for Zarr cases).
    pub files: Vec<PathBuf>,
}

impl CaseOutput {
    pub fn new(output_path: &Path, case: &Case, targets: &[OutputTarget]) -> CaseOutput {
        let progress = output_path.join(".progress");
        let (store, files) = match case.source {
            Source::Zarr(_) => (output_path.join(format!("{}.zarr", case.name)), Vec::new()),
            Source::Nifti(_) => (
                output_path.join(".work").join(format!("{}.zarr", case.name)),
                targets
                    .iter()
                    .map(|t| output_path.join(&t.name).join(format!("{}.nii.gz", case.name)))
                    .collect(),
            ),
        };
        CaseOutput {
            layout: Layout { store, progress: progress.join(&case.name) },
            marker: progress.join(format!("{}.done", case.name)),
            files,
        }
    }

    pub fn finished(&self) -> bool {
        self.marker.is_file()
    }

    /// Refuses to write over result files no run of this output started (without `overwrite`),
    /// and with it removes this case's earlier marker and files.
    pub fn prepare(&self, overwrite: bool) -> Result<()> {
        if overwrite {
            for f in self.files.iter().chain([&self.marker]) {
                match std::fs::remove_file(f) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", f.display()));
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        if !self.layout.progress.exists()
            && let Some(f) = self.files.iter().find(|f| f.exists())
        {
            bail!(
                "{}: already exists and was not written by this output's unet3d infer (no {}); refusing \
                 to overwrite it (pass --overwrite to replace it)",
                f.display(),
                self.layout.progress.display()
            );
        }
        Ok(())
    }

    /// Once every block is done: a NIfTI case's targets into their files in the input's header
    /// (then its working store is removed), and the marker.
    pub fn complete(&self, targets: &[OutputTarget], header: Option<&NiftiHeader>) -> Result<()> {
        if let Some(header) = header {
            let cache = ChunkCache::new(64 << 20);
            for (t, file) in targets.iter().zip(&self.files) {
                let (channels, stored) = t.stored();
                let array = ZarrArray::open(&self.layout.array(&t.name), channels, &cache)?;
                let data = array.read([0; 3], array.shape())?;
                let dtype = match stored {
                    OutputType::Uint8 => NiftiType::U8,
                    OutputType::Uint16 => NiftiType::U16,
                    // NIfTI-1 has no half precision.
                    OutputType::Float32 | OutputType::Float16 => NiftiType::F32,
                };
                let dir = file.parent().expect("a file under the output folder");
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                nifti::write_like(file, header, &data, channels, dtype)?;
            }
            std::fs::remove_dir_all(&self.layout.store)
                .with_context(|| format!("removing the working store {}", self.layout.store.display()))?;
        }
        crate::tensor::io::write_atomic(&self.marker, b"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_resolve_by_kind() {
        let dir = std::env::temp_dir().join(format!("unet3d-cases-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let folder = dir.join("in");
        std::fs::create_dir_all(folder.join("b.zarr/input")).unwrap();
        std::fs::write(folder.join("b.zarr/input/zarr.json"), r#"{"node_type":"array"}"#).unwrap();
        std::fs::write(folder.join("a.nii.gz"), b"").unwrap();
        let Inputs::Cases(cases) = resolve(&folder, "input").unwrap() else { panic!("cases") };
        assert_eq!(cases[0], Case { name: "a".into(), source: Source::Nifti(folder.join("a.nii.gz")) });
        assert_eq!(cases[1], Case { name: "b".into(), source: Source::Zarr(folder.join("b.zarr/input")) });
        let e = format!("{:#}", resolve(&folder, "image").unwrap_err());
        assert!(e.contains("b.zarr") && e.contains("no array 'image'"), "{e}");
        assert_eq!(
            resolve(&folder.join("b.zarr/input"), "x").unwrap(),
            Inputs::Volume(folder.join("b.zarr/input"))
        );
        // A list file, relative to its folder, with comments.
        std::fs::write(dir.join("list.txt"), "# cases\nin/b.zarr\n\nin/a.nii.gz\n").unwrap();
        let Inputs::Cases(listed) = resolve(&dir.join("list.txt"), "input").unwrap() else { panic!("cases") };
        assert_eq!(listed.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        // An array of a case store names its case.
        std::fs::write(dir.join("list.txt"), "in/b.zarr/input\n").unwrap();
        let Inputs::Cases(listed) = resolve(&dir.join("list.txt"), "x").unwrap() else { panic!("cases") };
        assert_eq!(listed, [Case { name: "b".into(), source: Source::Zarr(folder.join("b.zarr/input")) }]);
        std::fs::write(dir.join("list.txt"), "in/a.nii.gz\nin/missing.nii\n").unwrap();
        let e = format!("{:#}", resolve(&dir.join("list.txt"), "input").unwrap_err());
        assert!(e.contains("list.txt:2") && e.contains("missing.nii"), "{e}");
        // An OME-Zarr image reads its first level.
        let ome = dir.join("img.ome.zarr");
        std::fs::create_dir_all(&ome).unwrap();
        std::fs::write(
            ome.join("zarr.json"),
            r#"{"node_type":"group","attributes":{"ome":{"version":"0.5","multiscales":[{"datasets":[{"path":"s0"}]}]}}}"#,
        )
        .unwrap();
        assert_eq!(resolve(&ome, "input").unwrap(), Inputs::Volume(ome.join("s0")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
