//! NaN and infinity in stored volumes. Integer arrays cannot hold them; a float array is checked
//! by the pass that reads it whole anyway (the statistics pass), or by a pass of its own when
//! training reads it, and a value found is refused with the array and the voxel, or handled as
//! `dataset_config.nan_policy` says.

use anyhow::Result;
use rayon::prelude::*;

use super::array::{DType, VolumeArray};
use super::sampling::tiles;
pub use crate::config::NanPolicy;

/// A non-finite value and where it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    pub voxel: [usize; 3],
    pub channel: usize,
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [z, y, x] = self.voxel;
        write!(f, "{} at voxel [z, y, x] = [{z}, {y}, {x}], channel {}", self.value, self.channel)
    }
}

impl NonFinite {
    /// The error that refuses `array` under [`NanPolicy::Error`].
    pub fn refuse(&self, array: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{array}: holds {self}; fix the volume, or set dataset_config.nan_policy to replace \
             (with dataset_config.nan_value) or skip_patch"
        )
    }

    /// The first non-finite value of channels-last `values`, the box of `size` at `start`.
    pub fn first_in(
        values: &[f32],
        start: [usize; 3],
        size: [usize; 3],
        channels: usize,
    ) -> Option<NonFinite> {
        let i = values.iter().position(|v| !v.is_finite())?;
        let (voxel, channel) = voxel_of(i, start, size, channels);
        Some(NonFinite { voxel, channel, value: values[i] })
    }
}

/// The voxel and channel of index `i` of channels-last values, the box of `size` at `start`.
pub fn voxel_of(i: usize, start: [usize; 3], size: [usize; 3], channels: usize) -> ([usize; 3], usize) {
    let v = i / channels;
    let at = [v / (size[1] * size[2]), v / size[2] % size[1], v % size[2]];
    (std::array::from_fn(|a| start[a] + at[a]), i % channels)
}

/// The first non-finite value of `array` in the order of its 128^3 tiles, from one parallel pass;
/// integer arrays are not read.
pub fn scan(array: &dyn VolumeArray) -> Result<Option<NonFinite>> {
    if array.dtype() != DType::F32 {
        return Ok(None);
    }
    let c = array.channels();
    let found = tiles(array.shape(), [128; 3])
        .par_iter()
        .map(|&(start, size)| Ok(NonFinite::first_in(&array.read(start, size)?, start, size, c)))
        .collect::<Result<Vec<_>>>()?;
    Ok(found.into_iter().flatten().next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemoryArray;

    #[test]
    fn the_first_non_finite_value_is_found_with_its_voxel_and_channel() {
        let shape = [3, 200, 5];
        let mut data = vec![1.0f32; 3 * 200 * 5 * 2];
        let at = |z: usize, y: usize, x: usize, c: usize| ((z * 200 + y) * 5 + x) * 2 + c;
        data[at(2, 150, 4, 1)] = f32::NEG_INFINITY;
        data[at(1, 3, 2, 0)] = f32::NAN;
        let a = InMemoryArray::new("vol", shape, 2, DType::F32, data).unwrap();
        let found = scan(&a).unwrap().unwrap();
        assert_eq!((found.voxel, found.channel), ([1, 3, 2], 0));
        assert!(found.value.is_nan());
        let e = found.refuse("vol/input").to_string();
        assert!(e.contains("vol/input") && e.contains("[1, 3, 2]") && e.contains("nan_policy"), "{e}");
        let clean = InMemoryArray::new("ok", [2, 2, 2], 1, DType::U8, vec![255.0; 8]).unwrap();
        assert_eq!(scan(&clean).unwrap(), None);
    }
}
