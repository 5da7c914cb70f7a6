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
use std::sync::OnceLock;

use super::gaussian::importance_map;
use super::predictor::TilePredictor;
use super::tiles::{Tile, TileGrid, overlap_box};
use crate::config::{Activation, LabelRule, OutputType};
use crate::data::VolumeArray;
use crate::data::normalize::Normalizer;
use crate::device::cpu::activation::{sigmoid_forward, softmax_forward, unit_rows};
use crate::device::kernels::GpuTensor;
use crate::device::kernels::blend::{self, WindowPart};
use crate::device::launch::Gpu;
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
    /// The values [lo, hi] an integer output's 0..max stands for (`inference_config.value_range`);
    /// vectors always span [-1, 1].
    pub range: Option<[f64; 2]>,
    /// Written as a label map by this rule instead of as values (`activation`, `output_type` and
    /// `range` then do not apply).
    pub labels: Option<LabelRule>,
}

impl OutputTarget {
    /// The channels and type of the written array: a class index per voxel for an argmax label
    /// map (uint8 up to 256 classes), a 0/1 mask per channel for a thresholded one.
    pub fn stored(&self) -> (usize, OutputType) {
        match self.labels {
            Some(LabelRule::Argmax) if self.channels > 256 => (1, OutputType::Uint16),
            Some(LabelRule::Argmax) => (1, OutputType::Uint8),
            Some(LabelRule::Threshold) => (self.channels, OutputType::Uint8),
            None => (self.channels, self.output_type),
        }
    }
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
        OutputType::Float16 => "float16",
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
    /// `gaussian` on the predictor's kernel device, once it is needed there.
    gaussian_device: OnceLock<GpuTensor>,
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
            gaussian_device: OnceLock::new(),
        })
    }

    pub fn overlap(&self) -> f64 {
        self.overlap
    }

    /// Where the predictor runs and the boxes are blended.
    pub fn device(&self) -> crate::device::Device {
        self.predictor.device()
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
    /// result does not depend on the box. On a kernel device the sums stay there and each
    /// finished box comes down once. `on_batch` hears how many windows each batch held.
    pub fn blend(
        &self,
        lo: [usize; 3],
        size: [usize; 3],
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let hi = add(lo, size);
        let patch = self.grid.patch;
        let mut sums = Sums::new(self, size)?;
        for tiles in self.grid.touching(lo, hi).chunks(self.batch_size) {
            let outputs = self.predict_batch(tiles)?;
            for (b, tile) in tiles.iter().enumerate() {
                let Some(part) = overlap_box(tile.start, patch, lo, hi) else { continue };
                sums.add(self, Placement { lo, size, patch, part }, &outputs, b)?;
            }
            on_batch(tiles.len());
        }
        sums.finish()
    }

    /// The importance map on `gpu`, uploaded once per run.
    fn gaussian_on(&self, gpu: &Gpu) -> Result<&GpuTensor> {
        if let Some(g) = self.gaussian_device.get() {
            return Ok(g);
        }
        let g = GpuTensor::from_host(gpu, self.grid.patch.to_vec(), &self.gaussian)?;
        Ok(self.gaussian_device.get_or_init(|| g))
    }
}

/// A box's weighted sums and weights, where the predictor's logits are.
enum Sums<'w> {
    Host { sums: Vec<Vec<f32>>, weights: Vec<f32>, channels: Vec<usize> },
    Device { sums: Vec<GpuTensor>, weights: GpuTensor, gaussian: &'w GpuTensor },
}

impl<'w> Sums<'w> {
    fn new(window: &'w SlidingWindow<'_>, size: [usize; 3]) -> Result<Self> {
        let voxels: usize = size.iter().product();
        let device = window.predictor.device();
        let Some(gpu) = Gpu::of(device)? else {
            let sums = window.channels.iter().map(|&c| vec![0.0; voxels * c]).collect();
            return Ok(Sums::Host { sums, weights: vec![0.0; voxels], channels: window.channels.clone() });
        };
        let box_of = |c: usize| GpuTensor::zeros(&gpu, vec![size[0], size[1], size[2], c]);
        Ok(Sums::Device {
            sums: window.channels.iter().map(|&c| box_of(c)).collect::<Result<_>>()?,
            weights: box_of(1)?,
            gaussian: window.gaussian_on(&gpu)?,
        })
    }

    /// Adds window `b` of the batch's `outputs` over its part of the box.
    fn add(
        &mut self,
        window: &SlidingWindow<'_>,
        place: Placement,
        outputs: &[Tensor],
        b: usize,
    ) -> Result<()> {
        match self {
            Sums::Host { sums, weights, .. } => {
                let tile_voxels: usize = place.patch.iter().product();
                let gaussian = &window.gaussian;
                place.add(weights, 1, &|i, _| gaussian[i]);
                for (sum, (out, &c)) in sums.iter_mut().zip(outputs.iter().zip(&window.channels)) {
                    let logits = &out.data()[b * tile_voxels * c..(b + 1) * tile_voxels * c];
                    place.add(sum, c, &|i, k| gaussian[i] * logits[i * c + k]);
                }
            }
            Sums::Device { sums, weights, gaussian } => {
                let (at, in_window, size) = place.part;
                let part = WindowPart { in_box: sub(at, place.lo), in_window, size };
                blend::add_weight(weights, gaussian, part)?;
                for (sum, out) in sums.iter_mut().zip(outputs) {
                    blend::add_window(sum, out.gpu("blending")?, b, gaussian, part)?;
                }
            }
        }
        Ok(())
    }

    /// The sums over the weights, on the host.
    fn finish(self) -> Result<Vec<Vec<f32>>> {
        match self {
            Sums::Host { mut sums, weights, channels } => {
                for (sum, c) in sums.iter_mut().zip(channels) {
                    sum.par_chunks_mut(c)
                        .zip(&weights)
                        .for_each(|(v, &w)| v.iter_mut().for_each(|x| *x /= w));
                }
                Ok(sums)
            }
            Sums::Device { sums, weights, .. } => sums
                .into_iter()
                .map(|mut sum| {
                    blend::divide(&mut sum, &weights)?;
                    sum.to_vec().context("downloading a blended box")
                })
                .collect(),
        }
    }
}

fn sub(a: [usize; 3], b: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|i| a[i] - b[i])
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
/// length for vectors (as the seed: v / (|v| + 1e-8)), then, for an integer output, its value
/// range mapped onto the type's 0..max (the writer rounds and clamps).
pub fn finish(target: &OutputTarget, logits: Vec<f32>) -> Vec<f32> {
    let c = target.channels;
    match target.labels {
        // The first of equal logits wins, as numpy's argmax.
        Some(LabelRule::Argmax) => {
            return logits
                .par_chunks(c)
                .map(|v| (0..c).fold(0, |best, k| if v[k] > v[best] { k } else { best }) as f32)
                .collect();
        }
        Some(LabelRule::Threshold) => return logits.par_iter().map(|&x| f32::from(x > 0.0)).collect(),
        None => {}
    }
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
        unit_rows(&mut v, c);
    }
    let scale = match target.output_type {
        OutputType::Float32 | OutputType::Float16 => return v,
        OutputType::Uint8 => 255.0,
        OutputType::Uint16 => 65535.0,
    };
    let [lo, hi] = match (target.vectors, target.range) {
        (true, _) => [-1.0, 1.0],
        (false, Some(r)) => r.map(|x| x as f32),
        (false, None) => [0.0, 1.0],
    };
    let factor = scale / (hi - lo);
    v.par_iter_mut().for_each(|x| *x = (*x - lo) * factor);
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
        OutputTarget {
            name: "t".into(),
            channels,
            activation,
            vectors,
            output_type,
            range: None,
            labels: None,
        }
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
        // A regression target's stated range maps onto the integers (the writer clamps beyond it).
        let t = OutputTarget {
            range: Some([-10.0, 30.0]),
            ..target(Activation::None, false, OutputType::Uint8, 1)
        };
        assert_eq!(finish(&t, vec![-10.0, 10.0, 30.0, 50.0]), vec![0.0, 127.5, 255.0, 382.5]);
    }

    #[test]
    fn label_maps_from_logits() {
        let argmax = OutputTarget {
            labels: Some(LabelRule::Argmax),
            ..target(Activation::Softmax, false, OutputType::Float32, 3)
        };
        assert_eq!(
            finish(&argmax, vec![0.1, 2.0, -1.0, 5.0, 5.0, 0.0, -3.0, -2.0, -1.0]),
            vec![1.0, 0.0, 2.0]
        );
        assert_eq!(argmax.stored(), (1, OutputType::Uint8));
        let many = OutputTarget { channels: 300, ..argmax };
        assert_eq!(many.stored(), (1, OutputType::Uint16));
        let threshold = OutputTarget {
            labels: Some(LabelRule::Threshold),
            ..target(Activation::Sigmoid, false, OutputType::Float32, 2)
        };
        assert_eq!(finish(&threshold, vec![0.5, -0.5, 0.0, 3.0]), vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(threshold.stored(), (2, OutputType::Uint8));
    }
}
