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

/// Reads every tensor of a safetensors file as float32 (integer labels are converted exactly).
pub fn load(path: &Path) -> anyhow::Result<TensorFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let data = to_f32(name, &view).with_context(|| format!("in {}", path.display()))?;
        tensors.insert(name.to_string(), Tensor::from_vec(view.shape().to_vec(), data)?);
    }
    Ok(TensorFile { tensors, metadata })
}

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
    let data = safetensors::serialize(views, metadata)?;
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
}
