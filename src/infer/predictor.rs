//! What predicts a batch of windows: the trained network, optionally with nnU-Net's mirroring
//! test-time augmentation, or (in tests) any fixed model.

use anyhow::{Context, Result, ensure};

use crate::arch::Architecture;
use crate::autograd::ParamStore;
use crate::config::Activation;
use crate::data::augment::spatial::{flip_in_place, vector_channel};
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

/// nnU-Net's mirroring TTA: the mean of the logits of the batch and of its flips over every
/// non-empty subset of the allowed axes (`itertools.combinations` order, as nnU-Net enumerates
/// them), each flipped back; a vector output also has its components along the flipped axes
/// negated back.
pub struct Mirroring<P> {
    inner: P,
    flips: Vec<[bool; 3]>,
    /// Per output: whether it is a vector field (channel c = the component along axis 2 - c).
    vectors: Vec<bool>,
}

impl<P: TilePredictor> Mirroring<P> {
    /// Mirroring over `axes` (0 = z, 1 = y, 2 = x): the training's mirror axes, since only what
    /// the network learned to be invariant to may be averaged over. `vectors` has one entry per
    /// output of `inner`.
    pub fn new(inner: P, axes: &[usize], vectors: Vec<bool>) -> Result<Mirroring<P>> {
        ensure!(axes.iter().all(|&a| a < 3), "mirroring axes {axes:?}: each must be 0 (z), 1 (y) or 2 (x)");
        let mut axes = axes.to_vec();
        axes.sort_unstable();
        axes.dedup();
        let mut flips = Vec::new();
        for size in 1..=axes.len() {
            combinations(&axes, size, &mut Vec::new(), &mut flips);
        }
        Ok(Mirroring { inner, flips, vectors })
    }

    /// The predictions averaged per window: 2^(number of axes).
    pub fn passes(&self) -> usize {
        self.flips.len() + 1
    }
}

/// Every `size`-subset of `axes` in lexicographic order (Python's `itertools.combinations`).
fn combinations(axes: &[usize], size: usize, chosen: &mut Vec<usize>, out: &mut Vec<[bool; 3]>) {
    if chosen.len() == size {
        out.push(std::array::from_fn(|a| chosen.contains(&a)));
        return;
    }
    for (i, &a) in axes.iter().enumerate() {
        if chosen.last().is_none_or(|&last| a > last) {
            chosen.push(a);
            combinations(&axes[i + 1..], size, chosen, out);
            chosen.pop();
        }
    }
}

/// The channels of a vector output to negate after flipping `axes`: channel c is the component
/// along axis 2 - c (x, y, z), as the augmentation stores normals.
fn negated_components(axes: [bool; 3]) -> u32 {
    (0..3).filter(|&c| axes[vector_channel(c)]).map(|c| 1u32 << c).sum()
}

impl<P: TilePredictor> TilePredictor for Mirroring<P> {
    fn in_channels(&self) -> usize {
        self.inner.in_channels()
    }

    /// On the inner predictor's device: the batch moves there once and is flipped there.
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
        let batch = batch.to_device(self.device())?;
        let mut sums = self.inner.predict(&batch)?;
        ensure!(
            sums.len() == self.vectors.len(),
            "mirroring: {} outputs but {} vector flags",
            sums.len(),
            self.vectors.len()
        );
        for &axes in &self.flips {
            let outputs = self.inner.predict(&flip(&batch, axes, 0)?)?;
            for ((sum, out), &vector) in sums.iter_mut().zip(outputs).zip(&self.vectors) {
                let negate = if vector { negated_components(axes) } else { 0 };
                sum.add_assign(&flip(&out, axes, negate)?, "mirroring")?;
            }
        }
        // 1 / 2^k, a power of two: the same bits as dividing by the count.
        let scale = 1.0 / self.passes() as f32;
        for sum in &mut sums {
            sum.scale_in_place(scale, "mirroring")?;
        }
        Ok(sums)
    }

    fn device(&self) -> Device {
        self.inner.device()
    }
}

/// A channels-last (N, D, H, W, C) tensor reversed along the chosen spatial axes, with channel k
/// negated where bit k of `negate` is set, on its device.
pub fn flip(t: &Tensor, axes: [bool; 3], negate: u32) -> Result<Tensor> {
    let [n, d, h, w, c] = t.shape().ndhwc()?;
    if t.device() != Device::Cpu {
        return Ok(Tensor::from_gpu(kernels::flip(t.gpu("flip")?, axes, negate)?));
    }
    ensure!(t.numel() == n * d * h * w * c, "flip: tensor {} is not contiguous", t.shape());
    let mut data = t.data().to_vec();
    let sample = d * h * w * c;
    if sample > 0 {
        data.chunks_exact_mut(sample).for_each(|s| flip_in_place(s, [d, h, w], c, axes));
    }
    if negate != 0 {
        for voxel in data.chunks_exact_mut(c) {
            for (k, x) in voxel.iter_mut().enumerate().take(32) {
                if (negate >> k) & 1 == 1 {
                    *x = -*x;
                }
            }
        }
    }
    Tensor::from_vec(t.dims().to_vec(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_reverses_the_chosen_axes_and_is_an_involution() {
        let t = Tensor::from_vec(vec![1, 2, 1, 3, 2], (0..12).map(|v| v as f32).collect()).unwrap();
        let f = flip(&t, [false, false, true], 0).unwrap();
        assert_eq!(&f.data()[..6], &[4.0, 5.0, 2.0, 3.0, 0.0, 1.0]);
        let z = flip(&t, [true, false, false], 0).unwrap();
        assert_eq!(&z.data()[..6], &t.data()[6..]);
        let m = Mirroring::new(Identity, &[0, 1, 2], vec![false]).unwrap();
        assert_eq!(m.passes(), 8);
        for &axes in &m.flips {
            for negate in [0, 0b01, 0b10] {
                assert_eq!(flip(&flip(&t, axes, negate).unwrap(), axes, negate).unwrap().data(), t.data());
            }
        }
        let negated = flip(&t, [false; 3], 0b10).unwrap();
        assert_eq!(&negated.data()[..4], &[0.0, -1.0, 2.0, -3.0]);
    }

    struct Identity;

    impl TilePredictor for Identity {
        fn in_channels(&self) -> usize {
            1
        }
        fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
            Ok(vec![batch.clone()])
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
    }

    #[test]
    fn mirroring_enumerates_the_subsets_of_its_axes_as_nnunet() {
        let order = |axes: &[usize]| Mirroring::new(Identity, axes, vec![false]).unwrap().flips;
        let t = |z, y, x| [z, y, x];
        assert_eq!(
            order(&[0, 1, 2]),
            [
                t(true, false, false),
                t(false, true, false),
                t(false, false, true),
                t(true, true, false),
                t(true, false, true),
                t(false, true, true),
                t(true, true, true)
            ]
        );
        assert_eq!(order(&[2, 1]), [t(false, true, false), t(false, false, true), t(false, true, true)]);
        assert!(order(&[]).is_empty());
        assert!(Mirroring::new(Identity, &[3], vec![false]).is_err());
        // Channel c of a vector is the component along axis 2 - c.
        assert_eq!(negated_components(t(true, false, false)), 0b100);
        assert_eq!(negated_components(t(false, true, true)), 0b011);
    }
}
