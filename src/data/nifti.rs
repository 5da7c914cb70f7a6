//! NIfTI-1 images (.nii, .nii.gz), the format medical data arrives in, read into unet3d's axis
//! order: the file's voxel axes (i fastest, then j, k) become (D, H, W) = (k, j, i), as nnU-Net's
//! SimpleITK reading gives (z, y, x), so a model trained on converted data sees what nnU-Net sees.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

use crate::tensor::memory::check_allocation;

/// The on-disk element type of a NIfTI image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NiftiType {
    U8,
    I8,
    I16,
    U16,
    I32,
    F32,
    F64,
}

impl NiftiType {
    fn from_code(code: i16) -> Option<NiftiType> {
        Some(match code {
            2 => NiftiType::U8,
            4 => NiftiType::I16,
            8 => NiftiType::I32,
            16 => NiftiType::F32,
            64 => NiftiType::F64,
            256 => NiftiType::I8,
            512 => NiftiType::U16,
            _ => return None,
        })
    }

    fn bytes(self) -> usize {
        match self {
            NiftiType::U8 | NiftiType::I8 => 1,
            NiftiType::I16 | NiftiType::U16 => 2,
            NiftiType::I32 | NiftiType::F32 => 4,
            NiftiType::F64 => 8,
        }
    }

    pub fn is_integer(self) -> bool {
        !matches!(self, NiftiType::F32 | NiftiType::F64)
    }

    /// The smallest and largest value the type holds.
    pub fn range(self) -> (f64, f64) {
        match self {
            NiftiType::U8 => (0.0, 255.0),
            NiftiType::I8 => (-128.0, 127.0),
            NiftiType::I16 => (-32768.0, 32767.0),
            NiftiType::U16 => (0.0, 65535.0),
            NiftiType::I32 => (i32::MIN as f64, i32::MAX as f64),
            NiftiType::F32 => (f32::MIN as f64, f32::MAX as f64),
            NiftiType::F64 => (f64::MIN, f64::MAX),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NiftiType::U8 => "uint8",
            NiftiType::I8 => "int8",
            NiftiType::I16 => "int16",
            NiftiType::U16 => "uint16",
            NiftiType::I32 => "int32",
            NiftiType::F32 => "float32",
            NiftiType::F64 => "float64",
        }
    }
}

/// What the header says, in unet3d's (D, H, W) axis order where it has an order.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiHeader {
    /// (D, H, W) = (nz, ny, nx).
    pub shape: [usize; 3],
    /// The 4th NIfTI axis (MSD stores several modalities there); 1 for 3D images.
    pub channels: usize,
    pub dtype: NiftiType,
    /// Voxel size (D, H, W) = (pixdim[3], pixdim[2], pixdim[1]).
    pub spacing: [f64; 3],
    /// Maps a voxel index (d, h, w, 1) to world coordinates (mm): the NIfTI sform if its code is
    /// set, else the qform, else the spacing alone, with its columns reordered to (D, H, W).
    pub affine: [[f64; 4]; 4],
    /// `scl_slope` and `scl_inter` when they change the stored values.
    pub scaling: Option<(f32, f32)>,
    vox_offset: usize,
    big_endian: bool,
    /// The header as stored: a volume written in this image's geometry starts from it, so every
    /// field a viewer reads (qform, sform, units, description) is the input's own.
    raw: Vec<u8>,
}

/// A NIfTI image: its header and voxels.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiImage {
    pub header: NiftiHeader,
    /// (D, H, W, C) channels-last, with the header's scaling applied.
    pub data: Vec<f32>,
}

const HEADER_BYTES: usize = 348;

/// Reads the file's first `limit` bytes (fewer if it is shorter), decompressing it when it is gzip
/// (by its magic bytes, not its name): a gzip stream is read no further than the header says the
/// image needs, whatever it would expand to.
fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut magic = [0u8; 2];
    let n = reader.read(&mut magic).with_context(|| format!("{}: cannot read", path.display()))?;
    let head = std::io::Cursor::new(magic[..n].to_vec()).chain(reader);
    let source: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(head))
    } else {
        Box::new(head)
    };
    let mut bytes = Vec::new();
    source
        .take(limit)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: cannot read (a truncated or corrupt file?)", path.display()))?;
    Ok(bytes)
}

/// Reads the header only (a few hundred bytes even of a large .nii.gz).
pub fn read_header(path: &Path) -> Result<NiftiHeader> {
    parse_header(&read_bytes(path, HEADER_BYTES as u64)?)
        .with_context(|| format!("{}: not a readable NIfTI-1 image", path.display()))
}

/// Reads the header, checks that the voxels it promises fit in memory (and, uncompressed, in the
/// file), then reads exactly those bytes.
pub fn read(path: &Path) -> Result<NiftiImage> {
    let name = path.display();
    let header = read_header(path)?;
    let [d, h, w] = header.shape;
    let c = header.channels;
    let n = d * h * w * c;
    let size = header.dtype.bytes();
    let start = header.vox_offset;
    let needed = (n as u64).checked_mul(size as u64).and_then(|b| b.checked_add(start as u64));
    // The bytes read and the f32 voxels decoded from them.
    let memory = needed.and_then(|b| b.checked_add(4 * n as u64));
    check_allocation(
        memory,
        format_args!("{name}: dim {d}x{h}x{w}x{c} of {} after vox_offset {start}", header.dtype.name()),
    )?;
    let needed = needed.expect("checked above");
    let bytes = read_bytes(path, needed)?;
    ensure!(
        bytes.len() >= start + n * size,
        "{name}: {} bytes of voxel data after vox_offset {start}, but {d}x{h}x{w}x{c} {} voxels need {}",
        bytes.len().saturating_sub(start),
        header.dtype.name(),
        n * size
    );
    let raw = &bytes[start..start + n * size];
    let mut data = vec![0f32; n];
    let (slope, inter) = header.scaling.unwrap_or((1.0, 0.0));
    let be = header.big_endian;
    // File order is i fastest, then j, k and the channel; the output interleaves the channels.
    let voxels = d * h * w;
    for (f, chunk) in raw.chunks_exact(size).enumerate() {
        let v = decode(header.dtype, chunk, be);
        let (ch, at) = (f / voxels, f % voxels);
        data[at * c + ch] =
            if header.scaling.is_some() { (v * slope as f64 + inter as f64) as f32 } else { v as f32 };
    }
    Ok(NiftiImage { header, data })
}

fn decode(t: NiftiType, b: &[u8], be: bool) -> f64 {
    macro_rules! num {
        ($ty:ty) => {{
            let a = b.try_into().expect("chunk of the element size");
            (if be { <$ty>::from_be_bytes(a) } else { <$ty>::from_le_bytes(a) }) as f64
        }};
    }
    match t {
        NiftiType::U8 => b[0] as f64,
        NiftiType::I8 => b[0] as i8 as f64,
        NiftiType::I16 => num!(i16),
        NiftiType::U16 => num!(u16),
        NiftiType::I32 => num!(i32),
        NiftiType::F32 => num!(f32),
        NiftiType::F64 => num!(f64),
    }
}

fn parse_header(b: &[u8]) -> Result<NiftiHeader> {
    ensure!(b.len() >= HEADER_BYTES, "{} bytes, shorter than the 348-byte header", b.len());
    let size_le = i32::from_le_bytes(b[0..4].try_into()?);
    let big_endian = match (size_le, i32::from_be_bytes(b[0..4].try_into()?)) {
        (348, _) => false,
        (_, 348) => true,
        (540, _) | (_, 540) => bail!("a NIfTI-2 file; only NIfTI-1 is supported"),
        (s, _) => bail!("sizeof_hdr is {s}, not 348"),
    };
    let i16_at = |o: usize| {
        let a = [b[o], b[o + 1]];
        if big_endian { i16::from_be_bytes(a) } else { i16::from_le_bytes(a) }
    };
    let f32_at = |o: usize| {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if big_endian { f32::from_be_bytes(a) } else { f32::from_le_bytes(a) }
    };
    match &b[344..348] {
        b"n+1\0" => {}
        b"ni1\0" => bail!("a two-file (.hdr + .img) NIfTI; convert it to a single .nii first"),
        m => bail!("magic {m:?} is not NIfTI-1's \"n+1\""),
    }
    let dim: Vec<i16> = (0..8).map(|k| i16_at(40 + 2 * k)).collect();
    let ndim = dim[0];
    ensure!((1..=7).contains(&ndim), "dim[0] = {ndim}, not 1..7");
    let extent = |k: usize| if k as i16 <= ndim { dim[k].max(1) as usize } else { 1 };
    ensure!(dim[1..=ndim as usize].iter().all(|&n| n >= 1), "dim {dim:?} has a non-positive extent");
    ensure!(
        (5..=7).all(|k| extent(k) == 1),
        "dim {dim:?}: more than 4 axes; only 3D images and 4D with channels (modalities) are supported"
    );
    let code = i16_at(70);
    let Some(dtype) = NiftiType::from_code(code) else {
        bail!(
            "datatype {code} is not supported (uint8, int8, int16, uint16, int32, float32 or float64; \
             complex and RGB are not)"
        );
    };
    let pixdim: Vec<f64> = (0..8).map(|k| f32_at(76 + 4 * k) as f64).collect();
    let vox_offset = f32_at(108);
    // Beyond 2^40 bytes no image file is; a float beyond that would also lose whole bytes.
    ensure!(
        vox_offset.is_finite() && vox_offset.fract() == 0.0 && vox_offset < (1u64 << 40) as f32,
        "vox_offset {vox_offset} is not a byte offset into a file"
    );
    ensure!(vox_offset >= HEADER_BYTES as f32, "vox_offset {vox_offset} lies inside the header");
    let (slope, inter) = (f32_at(112), f32_at(116));
    let scaling = (slope != 0.0 && (slope, inter) != (1.0, 0.0)).then_some((slope, inter));
    let (qform, sform) = (i16_at(252), i16_at(254));
    let ijk = if sform > 0 {
        let row =
            |o: usize| [f32_at(o) as f64, f32_at(o + 4) as f64, f32_at(o + 8) as f64, f32_at(o + 12) as f64];
        [row(280), row(296), row(312), [0.0, 0.0, 0.0, 1.0]]
    } else if qform > 0 {
        let q = |o: usize| f32_at(o) as f64;
        quaternion_affine([q(256), q(260), q(264)], [q(268), q(272), q(276)], &pixdim)
    } else {
        [
            [pixdim[1], 0.0, 0.0, 0.0],
            [0.0, pixdim[2], 0.0, 0.0],
            [0.0, 0.0, pixdim[3], 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    };
    // Columns (i, j, k, 1) -> (d, h, w, 1) = (k, j, i, 1).
    let affine = ijk.map(|r| [r[2], r[1], r[0], r[3]]);
    Ok(NiftiHeader {
        shape: [extent(3), extent(2), extent(1)],
        channels: extent(4),
        dtype,
        spacing: [pixdim[3], pixdim[2], pixdim[1]],
        affine,
        scaling,
        vox_offset: vox_offset as usize,
        big_endian,
        raw: b[..HEADER_BYTES].to_vec(),
    })
}

impl NiftiType {
    fn code(self) -> i16 {
        match self {
            NiftiType::U8 => 2,
            NiftiType::I16 => 4,
            NiftiType::I32 => 8,
            NiftiType::F32 => 16,
            NiftiType::F64 => 64,
            NiftiType::I8 => 256,
            NiftiType::U16 => 512,
        }
    }

    /// `v` in this type's bytes: integers rounded and clamped to the type's range.
    fn encode(self, v: f32, be: bool, out: &mut Vec<u8>) {
        macro_rules! put {
            ($x:expr) => {{
                let x = $x;
                out.extend_from_slice(&if be { x.to_be_bytes() } else { x.to_le_bytes() });
            }};
        }
        let (lo, hi) = self.range();
        let int = (v as f64).round().clamp(lo, hi);
        match self {
            NiftiType::U8 => out.push(int as u8),
            NiftiType::I8 => out.push(int as i8 as u8),
            NiftiType::I16 => put!(int as i16),
            NiftiType::U16 => put!(int as u16),
            NiftiType::I32 => put!(int as i32),
            NiftiType::F32 => put!(v),
            NiftiType::F64 => put!(v as f64),
        }
    }
}

/// Writes `data` ((D, H, W, C) channels-last, the shape of `like`) as a single-file NIfTI-1
/// (gzip-compressed when the name ends in .gz) with `like`'s header, hence its affine, spacing
/// and byte order, changed only where the voxels differ: dimensions, type, no intensity scaling,
/// the voxels right after the header. Atomic: the file appears whole or not at all.
pub fn write_like(
    path: &Path,
    like: &NiftiHeader,
    data: &[f32],
    channels: usize,
    dtype: NiftiType,
) -> Result<()> {
    let voxels: usize = like.shape.iter().product();
    ensure!(
        data.len() == voxels * channels,
        "{}: {} values for {:?} x {channels} channels",
        path.display(),
        data.len(),
        like.shape
    );
    let be = like.big_endian;
    let mut h = like.raw.clone();
    let put = |h: &mut Vec<u8>, at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    let i16b = |v: i16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
    let f32b = |v: f32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
    let [d, hh, w] = like.shape;
    let ndim = if channels > 1 { 4 } else { 3 };
    for (k, v) in [ndim, w as i16, hh as i16, d as i16, channels as i16, 1, 1, 1].into_iter().enumerate() {
        put(&mut h, 40 + 2 * k, &i16b(v));
    }
    put(&mut h, 70, &i16b(dtype.code()));
    put(&mut h, 72, &i16b(8 * dtype.bytes() as i16));
    put(&mut h, 108, &f32b(352.0));
    for at in [112, 116, 124, 128] {
        // scl_slope, scl_inter, cal_max, cal_min: the values are stored as they are.
        put(&mut h, at, &f32b(0.0));
    }
    // The 4-byte extension flag (none), then the voxels: i fastest, then j, k and the channel.
    h.extend_from_slice(&[0; 4]);
    h.reserve(data.len() * dtype.bytes());
    for ch in 0..channels {
        for v in 0..voxels {
            dtype.encode(data[v * channels + ch], be, &mut h);
        }
    }
    let gz = path.extension().is_some_and(|e| e == "gz");
    let bytes = if gz {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        std::io::Write::write_all(&mut e, &h).with_context(|| format!("{}: compressing", path.display()))?;
        e.finish().with_context(|| format!("{}: compressing", path.display()))?
    } else {
        h
    };
    crate::tensor::io::write_atomic(path, &bytes)
}

/// NIfTI method 2: rotation from the quaternion (b, c, d), scaled by pixdim with the qfac sign on k.
fn quaternion_affine(bcd: [f64; 3], offset: [f64; 3], pixdim: &[f64]) -> [[f64; 4]; 4] {
    let [b, c, d] = bcd;
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let r = [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - b * b - c * c],
    ];
    let qfac = if pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let scale = [pixdim[1], pixdim[2], pixdim[3] * qfac];
    let mut m = [[0.0; 4]; 4];
    for row in 0..3 {
        for col in 0..3 {
            m[row][col] = r[row][col] * scale[col];
        }
        m[row][3] = offset[row];
    }
    m[3][3] = 1.0;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal single-file NIfTI-1 of int16 voxels, little or big endian.
    fn nii(dim: [i16; 4], values: &[i16], be: bool, slope: f32, inter: f32) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        let put = |h: &mut Vec<u8>, o: usize, b: &[u8]| h[o..o + b.len()].copy_from_slice(b);
        let i32b = |v: i32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let i16b = |v: i16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let f32b = |v: f32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        put(&mut h, 0, &i32b(348));
        let ndim = if dim[3] > 1 { 4 } else { 3 };
        for (k, v) in [ndim, dim[0], dim[1], dim[2], dim[3], 1, 1, 1].iter().enumerate() {
            put(&mut h, 40 + 2 * k, &i16b(*v));
        }
        put(&mut h, 70, &i16b(4));
        put(&mut h, 72, &i16b(16));
        for (k, v) in [1.0f32, 0.5, 2.0, 3.0].iter().enumerate() {
            put(&mut h, 76 + 4 * k, &f32b(*v));
        }
        put(&mut h, 108, &f32b(352.0));
        put(&mut h, 112, &f32b(slope));
        put(&mut h, 116, &f32b(inter));
        put(&mut h, 344, b"n+1\0");
        for v in values {
            h.extend(i16b(*v));
        }
        h
    }

    #[test]
    fn axes_endianness_scaling_and_channels() {
        let dir = std::env::temp_dir().join(format!("unet3d-nifti-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // nx=4, ny=3, nz=2, 2 channels; file value = i + 4*(j + 3*(k + 2*c)).
        let values: Vec<i16> = (0..48).collect();
        for be in [false, true] {
            let p = dir.join(format!("be{be}.nii"));
            std::fs::write(&p, nii([4, 3, 2, 2], &values, be, 2.0, -1.0)).unwrap();
            let img = read(&p).unwrap();
            assert_eq!((img.header.shape, img.header.channels), ([2, 3, 4], 2));
            assert_eq!(img.header.spacing, [3.0, 2.0, 0.5]);
            // (d, h, w, c) = (k, j, i, c).
            let at = |k: usize, j: usize, i: usize, c: usize| img.data[((k * 3 + j) * 4 + i) * 2 + c];
            assert_eq!(at(1, 2, 3, 1), 2.0 * (3 + 4 * (2 + 3 * (1 + 2))) as f32 - 1.0);
            assert_eq!(at(0, 1, 2, 0), 2.0 * 6.0 - 1.0);
            // No qform/sform: the spacing alone, columns in (d, h, w) order.
            assert_eq!(img.header.affine[0], [0.0, 0.0, 0.5, 0.0]);
            assert_eq!(img.header.affine[2], [3.0, 0.0, 0.0, 0.0]);
        }
        // (1, 0) scaling is no scaling.
        let p = dir.join("plain.nii");
        std::fs::write(&p, nii([4, 3, 2, 1], &values[..24], false, 1.0, 0.0)).unwrap();
        let img = read(&p).unwrap();
        assert_eq!(img.header.scaling, None);
        assert_eq!(img.data, (0..24).map(|v| v as f32).collect::<Vec<_>>());
        // A truncated file names itself and the sizes.
        let bytes = nii([4, 3, 2, 1], &values[..20], false, 1.0, 0.0);
        std::fs::write(&p, bytes).unwrap();
        let err = format!("{:#}", read(&p).unwrap_err());
        assert!(err.contains("plain.nii") && err.contains("need 48"), "{err}");
    }

    /// A written volume reads back with the input's geometry and header, in both byte orders.
    #[test]
    fn written_like_an_input_keeps_its_geometry() {
        let dir = std::env::temp_dir().join(format!("unet3d-nifti-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<i16> = (0..24).collect();
        for be in [false, true] {
            let src = dir.join(format!("in{be}.nii"));
            let mut bytes = nii([4, 3, 2, 1], &values, be, 2.0, 1.0);
            // An sform (code 2) with a rotation and an offset the output must keep.
            bytes[254..256].copy_from_slice(&if be { 2i16.to_be_bytes() } else { 2i16.to_le_bytes() });
            for (k, v) in
                [0.0f32, -0.5, 0.0, 10.0, 2.0, 0.0, 0.0, -3.0, 0.0, 0.0, 3.0, 7.0].iter().enumerate()
            {
                let b = if be { v.to_be_bytes() } else { v.to_le_bytes() };
                bytes[280 + 4 * k..284 + 4 * k].copy_from_slice(&b);
            }
            std::fs::write(&src, &bytes).unwrap();
            let input = read_header(&src).unwrap();
            let labels: Vec<f32> = (0..24).map(|v| (v % 3) as f32).collect();
            for (name, dtype) in [("l.nii.gz", NiftiType::U8), ("f.nii", NiftiType::F32)] {
                let out = dir.join(format!("{be}{name}"));
                write_like(&out, &input, &labels, 1, dtype).unwrap();
                let back = read(&out).unwrap();
                assert_eq!(back.data, labels);
                let h = back.header;
                assert_eq!((h.shape, h.channels, h.dtype, h.scaling), (input.shape, 1, dtype, None));
                assert_eq!((h.affine, h.spacing, h.big_endian), (input.affine, input.spacing, be));
            }
            // Two channels go to the 4th axis; integers round and clamp.
            let two: Vec<f32> = (0..48).map(|v| v as f32 * 7.6 - 20.0).collect();
            let out = dir.join(format!("{be}two.nii"));
            write_like(&out, &input, &two, 2, NiftiType::U8).unwrap();
            let back = read(&out).unwrap();
            assert_eq!(back.header.channels, 2);
            let want: Vec<f32> = two.iter().map(|v| v.round().clamp(0.0, 255.0)).collect();
            assert_eq!(back.data, want);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Header values that would crash or exhaust memory are errors naming the file and field.
    #[test]
    fn hostile_headers_are_errors_not_crashes() {
        let dir = std::env::temp_dir().join(format!("unet3d-nifti-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<i16> = (0..24).collect();
        let with = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = nii([4, 3, 2, 1], &values, false, 1.0, 0.0);
            edit(&mut b);
            let p = dir.join(name);
            std::fs::write(&p, &b).unwrap();
            format!("{:#}", read(&p).unwrap_err())
        };
        for v in [f32::INFINITY, f32::NAN, 1e20, -5.0, 352.5] {
            let e = with("offset.nii", &|b| b[108..112].copy_from_slice(&v.to_le_bytes()));
            assert!(e.contains("offset.nii") && e.contains("vox_offset"), "{v}: {e}");
        }
        // 32767^3 float64 voxels: refused before anything is allocated.
        let e = with("huge.nii", &|b| {
            for k in 1..=3 {
                b[40 + 2 * k..42 + 2 * k].copy_from_slice(&32767i16.to_le_bytes());
            }
            b[70..72].copy_from_slice(&64i16.to_le_bytes());
        });
        assert!(e.contains("huge.nii") && e.contains("GiB") && e.contains("float64"), "{e}");
        // A gzip stream is read no further than the header's size, however long it is.
        let mut long = nii([4, 3, 2, 1], &values, false, 1.0, 0.0);
        long.extend(std::iter::repeat_n(7u8, 1 << 20));
        let p = dir.join("long.nii.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &long).unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        assert_eq!(read_bytes(&p, 352 + 48).unwrap().len(), 400);
        assert_eq!(read(&p).unwrap().data, values.iter().map(|&v| v as f32).collect::<Vec<_>>());
    }
}
