//! The one interface every stored volume is read through, so sampling, loading and inference work
//! the same on Zarr stores, converted NIfTI and in-memory test volumes.

use anyhow::{Result, ensure};

/// The element type an array is stored in; normalisation (`scale_to_unit`) depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    U8,
    U16,
    I16,
    F32,
    F16,
}

impl DType {
    /// The largest stored value, by which `scale_to_unit` divides (1 for floats, as the seed).
    pub fn unit_scale(self) -> f32 {
        match self {
            DType::U8 => 255.0,
            DType::U16 => 65535.0,
            DType::I16 | DType::F32 | DType::F16 => 1.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::I16 => "int16",
            DType::F32 => "float32",
            DType::F16 => "float16",
        }
    }
}

/// A 3D array with an optional channel axis, read by region.
pub trait VolumeArray: Send + Sync {
    /// What errors call the array: its path (and array name inside a store).
    fn name(&self) -> &str;
    /// Spatial shape (D, H, W).
    fn shape(&self) -> [usize; 3];
    /// 1 for arrays without a channel axis.
    fn channels(&self) -> usize;
    fn dtype(&self) -> DType;
    /// The stored values (not normalised) of the box at `start` of `size`, channels-last
    /// (D, H, W, C) in row-major order. A box outside the array is an error naming the array.
    fn read(&self, start: [usize; 3], size: [usize; 3]) -> Result<Vec<f32>>;
}

/// Checks that the box lies inside an array of `shape`; the error names `name`.
pub fn check_box(name: &str, shape: [usize; 3], start: [usize; 3], size: [usize; 3]) -> Result<()> {
    for a in 0..3 {
        ensure!(
            start[a] + size[a] <= shape[a],
            "{name}: region start {start:?} size {size:?} leaves the array of shape {shape:?} on axis {a}"
        );
    }
    Ok(())
}

/// A volume held in memory: synthetic data, tests, and small converted cases.
#[derive(Debug, Clone)]
pub struct InMemoryArray {
    name: String,
    shape: [usize; 3],
    channels: usize,
    dtype: DType,
    /// (D, H, W, C) row-major.
    data: Vec<f32>,
}

impl InMemoryArray {
    pub fn new(
        name: impl Into<String>,
        shape: [usize; 3],
        channels: usize,
        dtype: DType,
        data: Vec<f32>,
    ) -> Result<Self> {
        let name = name.into();
        let n = shape.iter().product::<usize>() * channels;
        ensure!(data.len() == n, "{name}: {} values for shape {shape:?} x {channels} channels", data.len());
        Ok(InMemoryArray { name, shape, channels, dtype, data })
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

impl VolumeArray for InMemoryArray {
    fn name(&self) -> &str {
        &self.name
    }

    fn shape(&self) -> [usize; 3] {
        self.shape
    }

    fn channels(&self) -> usize {
        self.channels
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn read(&self, start: [usize; 3], size: [usize; 3]) -> Result<Vec<f32>> {
        check_box(&self.name, self.shape, start, size)?;
        let [_, h, w] = self.shape;
        let c = self.channels;
        let row = size[2] * c;
        let mut out = Vec::with_capacity(size.iter().product::<usize>() * c);
        for z in start[0]..start[0] + size[0] {
            for y in start[1]..start[1] + size[1] {
                let at = ((z * h + y) * w + start[2]) * c;
                out.extend_from_slice(&self.data[at..at + row]);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_box_channels_last() {
        let data: Vec<f32> = (0..2 * 3 * 4 * 2).map(|v| v as f32).collect();
        let a = InMemoryArray::new("a", [2, 3, 4], 2, DType::F32, data).unwrap();
        let r = a.read([1, 1, 2], [1, 2, 2]).unwrap();
        // voxel (1,1,2) is index ((1*3+1)*4+2)=18, times 2 channels = 36
        assert_eq!(r, vec![36.0, 37.0, 38.0, 39.0, 44.0, 45.0, 46.0, 47.0]);
        let err = a.read([1, 2, 0], [1, 2, 1]).unwrap_err().to_string();
        assert!(err.contains("a:") && err.contains("axis 1"), "{err}");
    }
}
