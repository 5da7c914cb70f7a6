//! [`TilePredictor`] for a [`GpuNetwork`], so that tiled inference runs on a kernel device.

use anyhow::Result;

use super::GpuNetwork;
use crate::config::Activation;
use crate::infer::predictor::{TilePredictor, output_indices};
use crate::tensor::Tensor;

/// The full-resolution logits of the targets a run writes, computed on the network's device.
pub struct GpuNetworkPredictor {
    network: GpuNetwork,
    /// Indices into the architecture's targets, in output order.
    outputs: Vec<usize>,
}

impl GpuNetworkPredictor {
    /// `outputs` names the written targets; each must be one of the network's.
    pub fn new(network: GpuNetwork, outputs: &[String]) -> Result<Self> {
        let outputs = output_indices(network.architecture(), outputs)?;
        Ok(GpuNetworkPredictor { network, outputs })
    }
}

impl TilePredictor for GpuNetworkPredictor {
    fn in_channels(&self) -> usize {
        self.network.architecture().in_channels
    }

    /// One batched forward on the device; logits only (activations apply after blending).
    fn predict(&self, batch: &Tensor) -> Result<Vec<Tensor>> {
        let none = vec![Activation::None; self.network.architecture().targets.len()];
        let all = self.network.predict(batch, &none)?;
        Ok(self.outputs.iter().map(|&t| all[t].clone()).collect())
    }
}
