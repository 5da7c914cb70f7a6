//! What predicts a batch of windows: the trained network, optionally with nnU-Net's mirroring
//! test-time augmentation, or (in tests) any fixed model.

use anyhow::{Context, Result, ensure};

use crate::arch::Architecture;
use crate::autograd::ParamStore;
use crate::config::Activation;
use crate::data::augment::spatial::flip_in_place;
use crate::device::Device;
use crate::device::kernels::blend as kernels;
use crate::model::Network;
use crate::tensor::Tensor;

/// A model over batches of windows: (N, D, H, W, C_in) in, one (N, D, H, W, C_t) tensor of
/// logits (before any activation: activations apply after blending) per written target out, on
/// the predictor's [`device`](Self::device) (where the blending then happens too).
pub trait TilePredictor: Sync {
    fn in_channels(&self) -> usize;
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>>;
    /// Where the logits come out.
    fn device(&self) -> Device {
        Device::Cpu
    }
}

/// The network's full-resolution heads of the targets it writes.
pub struct NetworkPredictor {
    network: Network,
    store: ParamStore,
    /// Indices into the architecture's targets, in output order.
    outputs: Vec<usize>,
}

impl NetworkPredictor {
    /// `outputs` names the written targets; each must be one of the network's.
    pub fn new(network: Network, store: ParamStore, outputs: &[String]) -> Result<NetworkPredictor> {
        let outputs = output_indices(network.architecture(), outputs)?;
        Ok(NetworkPredictor { network, store, outputs })
    }
}

/// The positions in `arch.targets` of the targets a run writes, in output order; a name that is
/// not a target of the network is an error listing the ones it has.
pub fn output_indices(arch: &Architecture, outputs: &[String]) -> Result<Vec<usize>> {
    let targets = &arch.targets;
    outputs
        .iter()
        .map(|name| {
            targets.iter().position(|t| &t.name == name).ok_or_else(|| {
                let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
                anyhow::anyhow!("output target '{name}' is not a target of the network ({names:?})")
            })
        })
        .collect()
}

impl TilePredictor for NetworkPredictor {
    fn in_channels(&self) -> usize {
        self.network.architecture().in_channels
    }

    /// One batched forward pass on the store's device (the batch uploaded when it is not there),
    /// the written logits left there. The CPU backend computes each sample of a batch exactly as
    /// it would alone, so blocks and shards, which batch different windows together, give the
    /// same bytes.
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
        let none = vec![Activation::None; self.network.architecture().targets.len()];
        let device = self.device();
        let x = batch.to_device(device).with_context(|| format!("uploading a batch to {device}"))?;
        let all = self.network.predict(&self.store, &x, &none)?;
        Ok(self.outputs.iter().map(|&t| all[t].clone()).collect())
    }

    fn device(&self) -> Device {
        self.store.device()
    }
}

/// nnU-Net's mirroring TTA: the mean of the logits of the batch and of its 7 flips (every
/// non-empty set of spatial axes, in `itertools.combinations` order), each flipped back.
pub struct Mirroring<P>(pub P);

/// The 7 non-empty sets of axes (z, y, x), singles first, as nnU-Net enumerates them.
const MIRROR_AXES: [[bool; 3]; 7] = [
    [true, false, false],
    [false, true, false],
    [false, false, true],
    [true, true, false],
    [true, false, true],
    [false, true, true],
    [true, true, true],
];

impl<P: TilePredictor> TilePredictor for Mirroring<P> {
    fn in_channels(&self) -> usize {
        self.0.in_channels()
    }

    /// On the inner predictor's device: the batch moves there once and is flipped there.
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
        let batch = batch.to_device(self.device())?;
        let mut sums = self.0.predict(&batch)?;
        for axes in MIRROR_AXES {
            let outputs = self.0.predict(&flip(&batch, axes)?)?;
            for (sum, out) in sums.iter_mut().zip(outputs) {
                sum.add_assign(&flip(&out, axes)?, "mirroring")?;
            }
        }
        // 1/8, a power of two: the same bits as dividing by the count.
        let scale = 1.0 / (MIRROR_AXES.len() + 1) as f32;
        for sum in &mut sums {
            sum.scale_in_place(scale, "mirroring")?;
        }
        Ok(sums)
    }

    fn device(&self) -> Device {
        self.0.device()
    }
}

/// A channels-last (N, D, H, W, C) tensor reversed along the chosen spatial axes, on its device.
pub fn flip(t: &Tensor, axes: [bool; 3]) -> Result<Tensor> {
    let [n, d, h, w, c] = t.shape().ndhwc()?;
    if t.device() != Device::Cpu {
        return Ok(Tensor::from_gpu(kernels::flip(t.gpu("flip")?, axes)?));
    }
    ensure!(t.numel() == n * d * h * w * c, "flip: tensor {} is not contiguous", t.shape());
    let mut data = t.data().to_vec();
    let sample = d * h * w * c;
    if sample > 0 {
        data.chunks_exact_mut(sample).for_each(|s| flip_in_place(s, [d, h, w], c, axes));
    }
    Tensor::from_vec(t.dims().to_vec(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_reverses_the_chosen_axes_and_is_an_involution() {
        let t = Tensor::from_vec(vec![1, 2, 1, 3, 2], (0..12).map(|v| v as f32).collect()).unwrap();
        let f = flip(&t, [false, false, true]).unwrap();
        assert_eq!(&f.data()[..6], &[4.0, 5.0, 2.0, 3.0, 0.0, 1.0]);
        let z = flip(&t, [true, false, false]).unwrap();
        assert_eq!(&z.data()[..6], &t.data()[6..]);
        for axes in MIRROR_AXES {
            assert_eq!(flip(&flip(&t, axes).unwrap(), axes).unwrap().data(), t.data());
        }
    }
}
