//! Gaussian blending of the windows over one box of the output, and what turns blended logits into
//! written values.
//!
//! Logits are blended and the activation applied afterwards, as nnU-Net does (reference-spec 4.6:
//! it averages logits and applies softmax at export). The seed blended activated outputs
//! (reference-spec 1.10); blending logits keeps a window's confident logit from being capped
//! before it is weighed against its neighbours', and makes activation "none" give the model's raw
//! logits.

use anyhow::{Context, Result, ensure};
use rayon::prelude::*;

use super::gaussian::importance_map;
use super::predictor::TilePredictor;
use super::tiles::{Tile, TileGrid, overlap_box};
use crate::config::{Activation, OutputType};
use crate::data::VolumeArray;
use crate::data::normalize::Normalizer;
use crate::device::cpu::activation::{sigmoid_forward, softmax_forward};
use crate::tensor::Tensor;

/// A written target.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutputTarget {
    pub name: String,
    pub channels: usize,
    #[serde(serialize_with = "activation_name")]
    pub activation: Activation,
    /// A unit vector per voxel (the seed's normals): re-normalised after blending, and mapped from
    /// [-1, 1] when scaled to integers.
    pub vectors: bool,
    #[serde(serialize_with = "output_type_name")]
    pub output_type: OutputType,
}

fn activation_name<S: serde::Serializer>(a: &Activation, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match a {
        Activation::None => "none",
        Activation::Sigmoid => "sigmoid",
        Activation::Softmax => "softmax",
    })
}

fn output_type_name<S: serde::Serializer>(t: &OutputType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match t {
        OutputType::Uint8 => "uint8",
        OutputType::Uint16 => "uint16",
        OutputType::Float32 => "float32",
    })
}

/// The sliding window over one input volume.
pub struct SlidingWindow<'a> {
    pub grid: TileGrid,
    gaussian: Vec<f32>,
    input: &'a dyn VolumeArray,
    normalizer: &'a Normalizer,
    predictor: &'a dyn TilePredictor,
    /// Output channels per predicted target, in the predictor's order.
    channels: Vec<usize>,
    overlap: f64,
    batch_size: usize,
}

impl<'a> SlidingWindow<'a> {
    pub fn new(
        input: &'a dyn VolumeArray,
        normalizer: &'a Normalizer,
        predictor: &'a dyn TilePredictor,
        channels: Vec<usize>,
        patch: [usize; 3],
        overlap: f64,
        batch_size: usize,
    ) -> Result<SlidingWindow<'a>> {
        ensure!(batch_size >= 1, "batch size must be at least 1");
        ensure!(
            input.channels() == predictor.in_channels(),
            "{}: {} channels, the model takes {}",
            input.name(),
            input.channels(),
            predictor.in_channels()
        );
        let grid = TileGrid::new(input.shape(), patch, overlap)
            .with_context(|| format!("tiling {} with patch {patch:?}", input.name()))?;
        Ok(SlidingWindow {
            grid,
            gaussian: importance_map(patch),
            input,
            normalizer,
            predictor,
            channels,
            overlap,
            batch_size,
        })
    }

    pub fn overlap(&self) -> f64 {
        self.overlap
    }

    /// A window's normalised input, zero where it leaves the volume (nnU-Net pads the normalised
    /// image with 0).
    fn read_tile(&self, tile: &Tile) -> Result<Vec<f32>> {
        let patch = self.grid.patch;
        let c = self.input.channels();
        let (at, within, size) =
            overlap_box(tile.start, patch, [0; 3], self.grid.shape).expect("every window meets the volume");
        let mut values = self.input.read(at, size)?;
        ensure!(
            !values.iter().any(|v| v.is_nan()),
            "{}: NaN in the region at {at:?} of size {size:?}; the model cannot predict from it",
            self.input.name()
        );
        self.normalizer.apply(&mut values)?;
        if size == patch {
            return Ok(values);
        }
        let mut out = vec![0.0; patch.iter().product::<usize>() * c];
        let row = size[2] * c;
        for z in 0..size[0] {
            for y in 0..size[1] {
                let to = (((within[0] + z) * patch[1] + within[1] + y) * patch[2] + within[2]) * c;
                let from = (z * size[1] + y) * row;
                out[to..to + row].copy_from_slice(&values[from..from + row]);
            }
        }
        Ok(out)
    }

    fn predict_batch(&self, tiles: &[Tile]) -> Result<Vec<Tensor>> {
        let inputs: Vec<Vec<f32>> = tiles.par_iter().map(|t| self.read_tile(t)).collect::<Result<_>>()?;
        let [d, h, w] = self.grid.patch;
        let batch = Tensor::from_vec(vec![tiles.len(), d, h, w, self.input.channels()], inputs.concat())?;
        let out = self.predictor.predict(&batch)?;
        ensure!(
            out.len() == self.channels.len(),
            "the model gave {} outputs, not {}",
            out.len(),
            self.channels.len()
        );
        for (o, &c) in out.iter().zip(&self.channels) {
            o.expect_shape("model output", &[tiles.len(), d, h, w, c])?;
        }
        Ok(out)
    }

    /// How many windows [`blend`](Self::blend) predicts for the box.
    pub fn tiles_for(&self, lo: [usize; 3], size: [usize; 3]) -> usize {
        self.grid.touching(lo, add(lo, size)).len()
    }

    /// The Gaussian-weighted mean of the logits of every window that meets the box at `lo` of
    /// `size`, per target (D, H, W, C_t). Each voxel sums its windows in global order, so the
    /// result does not depend on the box. `on_batch` hears how many windows each batch held.
    pub fn blend(
        &self,
        lo: [usize; 3],
        size: [usize; 3],
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let hi = add(lo, size);
        let voxels: usize = size.iter().product();
        let mut sums: Vec<Vec<f32>> = self.channels.iter().map(|&c| vec![0.0; voxels * c]).collect();
        let mut weights = vec![0.0f32; voxels];
        let patch = self.grid.patch;
        let tile_voxels: usize = patch.iter().product();
        for tiles in self.grid.touching(lo, hi).chunks(self.batch_size) {
            let outputs = self.predict_batch(tiles)?;
            for (b, tile) in tiles.iter().enumerate() {
                let Some(part) = overlap_box(tile.start, patch, lo, hi) else { continue };
                let place = Placement { lo, size, patch, part };
                place.add(&mut weights, 1, &|i, _| self.gaussian[i]);
                for (sum, (out, &c)) in sums.iter_mut().zip(outputs.iter().zip(&self.channels)) {
                    let logits = &out.data()[b * tile_voxels * c..(b + 1) * tile_voxels * c];
                    place.add(sum, c, &|i, k| self.gaussian[i] * logits[i * c + k]);
                }
            }
            on_batch(tiles.len());
        }
        for (sum, &c) in sums.iter_mut().zip(&self.channels) {
            sum.par_chunks_mut(c).zip(&weights).for_each(|(v, &w)| v.iter_mut().for_each(|x| *x /= w));
        }
        Ok(sums)
    }
}

fn add(a: [usize; 3], b: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|i| a[i] + b[i])
}

/// Where one window's part lands in a box buffer.
struct Placement {
    lo: [usize; 3],
    size: [usize; 3],
    patch: [usize; 3],
    /// `overlap_box` of the window and the box.
    part: ([usize; 3], [usize; 3], [usize; 3]),
}

impl Placement {
    /// `buf[voxel * c + k] += value(window voxel, k)` over the part, one z-plane per task.
    fn add(&self, buf: &mut [f32], c: usize, value: &(dyn Fn(usize, usize) -> f32 + Sync)) {
        let (at, within, n) = self.part;
        let (lo, size, patch) = (self.lo, self.size, self.patch);
        let plane = size[1] * size[2] * c;
        let z0 = at[0] - lo[0];
        buf[z0 * plane..(z0 + n[0]) * plane].par_chunks_mut(plane).enumerate().for_each(|(z, plane)| {
            for y in 0..n[1] {
                let row = ((at[1] - lo[1] + y) * size[2] + at[2] - lo[2]) * c;
                let src = ((within[0] + z) * patch[1] + within[1] + y) * patch[2] + within[2];
                for x in 0..n[2] {
                    for k in 0..c {
                        plane[row + x * c + k] += value(src + x, k);
                    }
                }
            }
        });
    }
}

/// Blended logits (D, H, W, C) of `target` to the values its array stores: activation, unit
/// length for vectors (as the seed: v / (|v| + 1e-8)), then the integer range of the output type
/// (the writer rounds and clamps).
pub fn finish(target: &OutputTarget, logits: Vec<f32>) -> Vec<f32> {
    let c = target.channels;
    let mut v = match target.activation {
        Activation::None => logits,
        Activation::Sigmoid => {
            let mut y = vec![0.0; logits.len()];
            sigmoid_forward(&mut y, &logits);
            y
        }
        Activation::Softmax => {
            let mut y = vec![0.0; logits.len()];
            softmax_forward(&mut y, &logits, c);
            y
        }
    };
    if target.vectors {
        v.par_chunks_mut(c).for_each(|u| {
            let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt() + 1e-8;
            u.iter_mut().for_each(|x| *x /= norm);
        });
    }
    let scale = match target.output_type {
        OutputType::Float32 => return v,
        OutputType::Uint8 => 255.0,
        OutputType::Uint16 => 65535.0,
    };
    if target.vectors {
        v.par_iter_mut().for_each(|x| *x = (*x + 1.0) / 2.0 * scale);
    } else {
        v.par_iter_mut().for_each(|x| *x *= scale);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(
        activation: Activation,
        vectors: bool,
        output_type: OutputType,
        channels: usize,
    ) -> OutputTarget {
        OutputTarget { name: "t".into(), channels, activation, vectors, output_type }
    }

    #[test]
    fn finish_activates_normalises_and_scales() {
        let t = target(Activation::Sigmoid, false, OutputType::Uint8, 1);
        assert_eq!(finish(&t, vec![0.0, 100.0]), vec![127.5, 255.0]);
        let t = target(Activation::None, true, OutputType::Uint16, 3);
        let v = finish(&t, vec![3.0, 0.0, -4.0]);
        let want = [(0.6 + 1.0) / 2.0 * 65535.0, 65535.0 / 2.0, (1.0 - 0.8) / 2.0 * 65535.0];
        v.iter().zip(want).for_each(|(a, b)| assert!((a - b).abs() < 0.05, "{a} vs {b}"));
        let t = target(Activation::Softmax, false, OutputType::Float32, 2);
        let v = finish(&t, vec![1.0, 1.0, 0.0, 2.0f32.ln()]);
        assert_eq!(v[0], 0.5);
        assert!((v[3] - 2.0 / 3.0).abs() < 1e-6);
    }
}
