//! safetensors load and save. Files keep PyTorch's row-major little-endian layout; writes are atomic.

use super::Tensor;
use anyhow::Context;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Tensors of a safetensors file by name, with its `__metadata__` map.
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
    /// CRC-32C of the whole file: its identity in records of what was run with it.
    pub crc32c: u32,
}

impl TensorFile {
    /// The tensor called `name`, or an error that names the file and the tensor.
    pub fn get(&self, name: &str) -> anyhow::Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
            anyhow::anyhow!("tensor '{name}' not found; the file has {names:?}")
        })
    }
}

fn to_f32(name: &str, view: &TensorView<'_>) -> anyhow::Result<Vec<f32>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Dtype::U8 => b.iter().map(|&v| f32::from(v)).collect(),
        Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        other => anyhow::bail!("tensor '{name}' has dtype {other:?}; supported: F32, F64, U8, I32, I64"),
    })
}

/// A safetensors file's bytes, read only after its size and header length are checked: a path
/// that is not a regular file (a link to /dev/zero), a header length beyond the file and a file
/// larger than memory are errors before anything is allocated.
fn read_checked(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let name = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("reading {name}"))?;
    anyhow::ensure!(meta.is_file(), "{name}: not a regular file");
    let len = meta.len();
    // The file's bytes, and the f32 tensors made from them (at most four times their size, from
    // uint8).
    super::memory::check_allocation(len.checked_mul(5), format_args!("{name}: a {len}-byte file"))?;
    let mut file = std::fs::File::open(path).with_context(|| format!("reading {name}"))?;
    let mut head = [0u8; 8];
    file.read_exact(&mut head).with_context(|| format!("{name}: shorter than a safetensors header"))?;
    let header = u64::from_le_bytes(head);
    anyhow::ensure!(
        header.checked_add(8).is_some_and(|h| h <= len),
        "{name}: not a safetensors file (its header claims {header} bytes of a {len}-byte file)"
    );
    let mut bytes = Vec::with_capacity(len as usize);
    bytes.extend_from_slice(&head);
    file.take(len - 8).read_to_end(&mut bytes).with_context(|| format!("reading {name}"))?;
    anyhow::ensure!(bytes.len() as u64 == len, "{name}: changed while being read");
    Ok(bytes)
}

/// Reads every tensor of a safetensors file as float32 (integer labels are converted exactly).
pub fn load(path: &Path) -> anyhow::Result<TensorFile> {
    let bytes = read_checked(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let checksums: Option<BTreeMap<String, u32>> = metadata
        .get(CHECKSUM_KEY)
        .map(|j| serde_json::from_str(j))
        .transpose()
        .with_context(|| format!("{}: unreadable {CHECKSUM_KEY}", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        if let Some(sums) = &checksums {
            let (want, got) = (sums.get(name), crc32c::crc32c(view.data()));
            anyhow::ensure!(
                want == Some(&got),
                "{}: tensor '{name}' {}; the file is corrupt (copy it again or use another checkpoint)",
                path.display(),
                if want.is_some() { "does not match its checksum" } else { "has no checksum" }
            );
        }
        let data = to_f32(name, &view).with_context(|| format!("in {}", path.display()))?;
        tensors.insert(name.to_string(), Tensor::from_vec(view.shape().to_vec(), data)?);
    }
    if let Some(sums) = &checksums
        && let Some(missing) = sums.keys().find(|n| !tensors.contains_key(*n))
    {
        anyhow::bail!(
            "{}: tensor '{missing}' has a checksum but is missing; the file is corrupt",
            path.display()
        );
    }
    Ok(TensorFile { tensors, metadata, crc32c: crc32c::crc32c(&bytes) })
}

/// A safetensors file's `__metadata__`, read from its header alone (the tensors stay on disk).
pub fn metadata(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let name = path.display();
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(|| format!("{name} is not a safetensors file"))?;
    let len = u64::from_le_bytes(len);
    anyhow::ensure!(len <= MAX_HEADER_BYTES, "{name}: a header of {len} bytes; not a safetensors file");
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).with_context(|| format!("{name}: truncated header"))?;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header =
        serde_json::from_slice(&header).with_context(|| format!("{name}: unreadable safetensors header"))?;
    Ok(header.metadata)
}

/// safetensors' own limit on the header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The metadata key of the CRC-32C of each tensor's bytes, written by [`save`] and checked by
/// [`load`] (files from elsewhere have none and load unchecked).
pub const CHECKSUM_KEY: &str = "unet3d.crc32c";

/// Writes `tensors` as float32 to `path` through a temporary file and a rename, so an interrupted
/// write never leaves a truncated file under the final name.
pub fn save(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> anyhow::Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| bytemuck::cast_slice(t.data()).to_vec()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| Ok((name.to_string(), TensorView::new(Dtype::F32, t.dims().to_vec(), b)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sums: BTreeMap<&str, u32> =
        tensors.iter().zip(&bytes).map(|((name, _), b)| (*name, crc32c::crc32c(b))).collect();
    let mut metadata = metadata.unwrap_or_default();
    metadata.insert(CHECKSUM_KEY.to_string(), serde_json::to_string(&sums)?);
    let data = safetensors::serialize(views, Some(metadata))?;
    crate::tensor::io::write_atomic(path, &data)
}

/// Writes bytes to `path` by writing a sibling temporary file, syncing it and renaming it over.
pub fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        // A full disk must not also keep the partial copy.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_names_and_metadata() {
        let dir = std::env::temp_dir().join(format!("unet3d-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let a = Tensor::from_vec([2, 3], vec![1.0, -2.5, 3.0, 4.0, 5.0, 6.5]).unwrap();
        let b = Tensor::scalar(7.0);
        let meta = HashMap::from([("epoch".to_string(), "3".to_string())]);
        save(&path, &[("a", &a), ("b.c", &b)], Some(meta)).unwrap();
        let f = load(&path).unwrap();
        assert_eq!(f.get("a").unwrap().data(), a.data());
        assert_eq!(f.get("a").unwrap().dims(), &[2, 3]);
        assert_eq!(f.get("b.c").unwrap().item().unwrap(), 7.0);
        assert_eq!(f.metadata["epoch"], "3");
        let e = f.get("missing").unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_and_non_files_are_refused_before_they_load() {
        let dir = std::env::temp_dir().join(format!("unet3d-io-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let a = Tensor::from_vec([4], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        save(&path, &[("weight", &a)], None).unwrap();
        let good = std::fs::read(&path).unwrap();
        let err = |bytes: &[u8]| {
            let p = dir.join("bad.safetensors");
            std::fs::write(&p, bytes).unwrap();
            format!("{:#}", load(&p).err().expect("refused"))
        };
        // Every single bit flip in the tensor data is caught by the checksum.
        for i in good.len() - 16..good.len() {
            for bit in [0, 3, 7] {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                let e = err(&b);
                assert!(
                    e.contains("bad.safetensors") && e.contains("'weight'") && e.contains("checksum"),
                    "{e}"
                );
            }
        }
        // A header length beyond the file, and a file shorter than the length field.
        let mut b = good.clone();
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("header claims"), "{}", err(&b));
        assert!(err(&good[..5]).contains("shorter than a safetensors header"));
        // Not a regular file: never read whole.
        #[cfg(unix)]
        {
            let link = dir.join("zero.safetensors");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            let e = format!("{:#}", load(&link).err().unwrap());
            assert!(e.contains("zero.safetensors") && e.contains("not a regular file"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
