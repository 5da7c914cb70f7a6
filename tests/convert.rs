//! `unet3d convert` on two hippocampus cases (tests/fixtures/hippocampus: 001 has a uint8 image
//! and label, 003 a float32 image and a float32 label holding 0/1/2): the Zarr voxels equal the
//! NIfTI voxels decoded here independently of the crate's reader.

mod common;

use common::scratch_dir;
use std::io::Read;
use std::path::{Path, PathBuf};

use unet3d::config::Config;
use unet3d::data::convert::{ConvertOptions, convert_dataset, convert_pair};
use unet3d::data::dataset::Dataset;
use unet3d::data::zarr::{ChunkCache, ZarrArray};
use unet3d::data::{DType, VolumeArray};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hippocampus")
}

/// A little-endian NIfTI-1 .nii.gz decoded by hand: (nx, ny, nz), pixdim[1..4], and the voxels
/// in file order (index i + nx * (j + ny * k)).
struct Raw {
    dims: [usize; 3],
    pixdim: [f64; 3],
    values: Vec<f64>,
}

fn raw(path: &Path) -> Raw {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut bytes).unwrap();
    let i16_at = |o: usize| i16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    assert_eq!(i32::from_le_bytes(bytes[0..4].try_into().unwrap()), 348, "little-endian NIfTI-1");
    assert_eq!(i16_at(40), 3, "3D");
    let dims = [i16_at(42) as usize, i16_at(44) as usize, i16_at(46) as usize];
    let offset = f32_at(108) as usize;
    assert_eq!((f32_at(112), f32_at(116)), (1.0, 0.0), "no intensity scaling in the fixtures");
    let n = dims.iter().product::<usize>();
    let values = match i16_at(70) {
        2 => bytes[offset..offset + n].iter().map(|&b| b as f64).collect(),
        16 => (0..n).map(|v| f32_at(offset + 4 * v) as f64).collect(),
        t => panic!("datatype {t} not in the fixtures"),
    };
    Raw { dims, pixdim: [f32_at(80) as f64, f32_at(84) as f64, f32_at(88) as f64], values }
}

/// The array equals the NIfTI voxel for voxel, with (D, H, W) = (k, j, i), and keeps the spacing.
fn assert_same(array: &ZarrArray, nifti: &Path) {
    let r = raw(nifti);
    let [nx, ny, nz] = r.dims;
    assert_eq!(array.shape(), [nz, ny, nx], "{}", nifti.display());
    let got = array.read([0; 3], [nz, ny, nx]).unwrap();
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let want = r.values[i + nx * (j + ny * k)];
                assert_eq!(
                    got[(k * ny + j) * nx + i] as f64,
                    want,
                    "{} voxel i={i} j={j} k={k}",
                    nifti.display()
                );
            }
        }
    }
    let spacing = &array.attributes()["spacing"];
    assert_eq!(spacing, &serde_json::json!([r.pixdim[2], r.pixdim[1], r.pixdim[0]]), "{}", nifti.display());
    let source = array.attributes()["source"].to_string();
    assert!(source.contains(&*nifti.file_name().unwrap().to_string_lossy()), "{source}");
}

fn open(path: &Path) -> ZarrArray {
    ZarrArray::open(path, 1, &ChunkCache::new(1 << 24)).unwrap()
}

#[test]
fn one_case_keeps_voxels_dtype_and_spacing() {
    let dir = scratch_dir("pair");
    let image = fixtures().join("imagesTr/hippocampus_001.nii.gz");
    let label = fixtures().join("labelsTr/hippocampus_001.nii.gz");
    let out = dir.join("case.zarr");
    let opts = ConvertOptions { chunks: [16; 3], overwrite: false };
    convert_pair(std::slice::from_ref(&image), Some(&label), &out, &opts).unwrap();
    let input = open(&out.join("input"));
    assert_eq!((input.dtype(), input.chunk_shape()), (DType::U8, [16; 3]));
    assert_same(&input, &image);
    let l = open(&out.join("label"));
    assert_eq!(l.dtype(), DType::U8);
    assert_same(&l, &label);

    // An existing case is refused, and kept, unless told to overwrite.
    let err = format!("{:#}", convert_pair(std::slice::from_ref(&image), None, &out, &opts).unwrap_err());
    assert!(err.contains("case.zarr") && err.contains("already exists"), "{err}");
    assert!(out.join("label").exists());
    let over = ConvertOptions { overwrite: true, ..opts.clone() };
    convert_pair(std::slice::from_ref(&image), None, &out, &over).unwrap();
    assert!(out.join("input").exists() && !out.join("label").exists());
    // --overwrite never removes a folder convert did not write.
    let mine = dir.join("mine.zarr");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), b"keep").unwrap();
    let err = format!("{:#}", convert_pair(std::slice::from_ref(&image), None, &mine, &over).unwrap_err());
    assert!(err.contains("mine.zarr") && err.contains("refusing to remove"), "{err}");
    assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"keep");

    // A label that is not a class index map: the float image of case 003.
    let float_image = fixtures().join("imagesTr/hippocampus_003.nii.gz");
    let bad = dir.join("bad.zarr");
    let err = format!(
        "{:#}",
        convert_pair(std::slice::from_ref(&float_image), Some(&float_image), &bad, &opts).unwrap_err()
    );
    assert!(err.contains("hippocampus_003.nii.gz") && err.contains("not a class index"), "{err}");
    assert!(!bad.exists(), "nothing written for a failed case");
}

#[test]
fn whole_folder_with_mixed_dtypes_and_a_pasteable_config() {
    let dir = scratch_dir("folder");
    let out = dir.join("zarr");
    let cases = convert_dataset(&fixtures(), &out, &ConvertOptions::default()).unwrap();
    let names = ["hippocampus_001", "hippocampus_003", "hippocampus_004"];
    assert_eq!(cases, names.map(|n| out.join(format!("{n}.zarr"))));
    for (case, name) in cases.iter().zip(names) {
        // 001's image is uint8 and 003's float32: one dtype for the dataset, float32.
        let input = open(&case.join("input"));
        assert_eq!(input.dtype(), DType::F32);
        assert_same(&input, &fixtures().join(format!("imagesTr/{name}.nii.gz")));
        // 003's label is stored as float32 in the NIfTI; every label becomes uint8.
        let label = open(&case.join("label"));
        assert_eq!(label.dtype(), DType::U8);
        assert_same(&label, &fixtures().join(format!("labelsTr/{name}.nii.gz")));
        assert_eq!(label.attributes()["labels"], serde_json::json!(["background", "Anterior", "Posterior"]));
    }
    // volumes.yaml is a dataset_config that parses and opens.
    let yaml = std::fs::read_to_string(out.join("volumes.yaml")).unwrap();
    let parsed = Config::parse(&yaml, &[]).unwrap();
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    let ds = parsed.config.dataset_config;
    assert_eq!((ds.in_channels, ds.targets.len(), ds.targets[0].name.as_str()), (1, 1, "label"));
    assert_eq!((ds.targets[0].channels, ds.targets[0].loss_fn.as_str()), (3, "DiceCELoss"));
    let opened = Dataset::open(&ds, ChunkCache::new(1 << 24)).unwrap();
    assert_eq!(opened.volumes.len(), 3);
    assert_eq!(opened.volumes[1].name, "hippocampus_003.zarr");

    // A second run refuses before writing anything; --overwrite replaces.
    let err = format!("{:#}", convert_dataset(&fixtures(), &out, &ConvertOptions::default()).unwrap_err());
    assert!(err.contains("hippocampus_001.zarr") && err.contains("refusing to overwrite"), "{err}");
    let over = ConvertOptions { overwrite: true, ..Default::default() };
    assert_eq!(convert_dataset(&fixtures(), &out, &over).unwrap().len(), 3);
}

#[test]
fn cli_converts_a_folder() {
    let dir = scratch_dir("cli");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_unet3d"))
        .args(["convert", "--dataset"])
        .arg(fixtures())
        .arg("--out")
        .arg(dir.join("out"))
        .args(["--chunk", "32"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let input = open(&dir.join("out/hippocampus_001.zarr/input"));
    assert_eq!(input.chunk_shape(), [32, 32, 32]);
    assert!(dir.join("out/volumes.yaml").is_file());
}

#[test]
fn nnunet_v2_folder_with_one_file_per_channel() {
    let dir = scratch_dir("v2");
    let src = dir.join("Dataset001_Test");
    std::fs::create_dir_all(src.join("imagesTr")).unwrap();
    std::fs::create_dir_all(src.join("labelsTr")).unwrap();
    // Two channels of the same shape: case 001's image and (as an image) its label.
    let image = fixtures().join("imagesTr/hippocampus_001.nii.gz");
    let label = fixtures().join("labelsTr/hippocampus_001.nii.gz");
    std::fs::copy(&image, src.join("imagesTr/case_0000.nii.gz")).unwrap();
    std::fs::copy(&label, src.join("imagesTr/case_0001.nii.gz")).unwrap();
    std::fs::copy(&label, src.join("labelsTr/case.nii.gz")).unwrap();
    let json = serde_json::json!({
        "channel_names": {"0": "T1", "1": "CT"},
        "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": 1, "file_ending": ".nii.gz",
    });
    std::fs::write(src.join("dataset.json"), json.to_string()).unwrap();
    let out = dir.join("out");
    convert_dataset(&src, &out, &ConvertOptions::default()).unwrap();

    let input = ZarrArray::open(&out.join("case.zarr/input"), 2, &ChunkCache::new(1 << 24)).unwrap();
    assert_eq!(input.dtype(), DType::U8, "both channels are uint8");
    let [d, h, w] = input.shape();
    let got = input.read([0; 3], [d, h, w]).unwrap();
    for (c, file) in [&image, &label].iter().enumerate() {
        let r = raw(file);
        assert_eq!(r.dims, [w, h, d]);
        for v in 0..d * h * w {
            // With (D, H, W) = (k, j, i), the channel's voxels are in file order.
            assert_eq!(got[v * 2 + c] as f64, r.values[v], "channel {c} voxel {v}");
        }
    }
    let yaml = std::fs::read_to_string(out.join("volumes.yaml")).unwrap();
    let ds = Config::parse(&yaml, &[]).unwrap().config.dataset_config;
    assert_eq!((ds.in_channels, ds.targets[0].channels), (2, 3));
    use unet3d::config::Normalization;
    assert_eq!(ds.normalization, vec![Normalization::ZScore, Normalization::Ct]);
    Dataset::open(&ds, ChunkCache::new(1 << 24)).unwrap();
}

/// A float32 image with a NaN or an infinity is refused by file and voxel, and nothing is written.
#[test]
fn a_non_finite_voxel_is_refused_by_file_and_voxel() {
    let dir = scratch_dir("nan");
    let source = fixtures().join("imagesTr/hippocampus_003.nii.gz");
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&source).unwrap()).read_to_end(&mut bytes).unwrap();
    let r = raw(&source);
    let [nx, ny, _] = r.dims;
    let offset = f32::from_le_bytes(bytes[108..112].try_into().unwrap()) as usize;
    for (bad, name) in [(f32::NAN, "nan.nii"), (f32::NEG_INFINITY, "inf.nii")] {
        let mut b = bytes.clone();
        // voxel (i, j, k) = (3, 2, 1), which is (D, H, W) = (1, 2, 3)
        let v = 3 + nx * (2 + ny);
        b[offset + 4 * v..offset + 4 * v + 4].copy_from_slice(&bad.to_le_bytes());
        let image = dir.join(name);
        std::fs::write(&image, &b).unwrap();
        let out = dir.join(format!("{name}.zarr"));
        let opts = ConvertOptions { chunks: [16; 3], overwrite: false };
        let e = format!("{:#}", convert_pair(std::slice::from_ref(&image), None, &out, &opts).unwrap_err());
        assert!(e.contains(name) && e.contains("[1, 2, 3]") && e.contains(&format!("{bad}")), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn a_label_of_another_shape_is_refused_naming_it_and_nothing_is_written() {
    let dir = scratch_dir("shape");
    let image = fixtures().join("imagesTr/hippocampus_001.nii.gz");
    let label = fixtures().join("labelsTr/hippocampus_003.nii.gz");
    assert_ne!(raw(&image).dims, raw(&label).dims, "the fixture cases differ in shape");
    let out = dir.join("case.zarr");
    let opts = ConvertOptions { chunks: [16; 3], overwrite: false };
    let e =
        format!("{:#}", convert_pair(std::slice::from_ref(&image), Some(&label), &out, &opts).unwrap_err());
    assert!(e.contains("hippocampus_003.nii.gz") && e.contains("a label is one 3D map"), "{e}");
    assert!(!out.exists(), "nothing written");
    std::fs::remove_dir_all(dir).unwrap();
}
