//! The training step's network on a kernel device (cuda:N or sim): the forward and the backward
//! run there, the host [`ParamStore`] stays the truth. Each step uploads the batch and labels and
//! downloads the per-target loss values and the gradients into the store's grads; accumulation,
//! clipping and the optimizer step stay the CPU's, and the updated parameters are re-uploaded
//! before the next forward.
//!
//! Simple and correct first: a device-resident optimizer (`device::kernels::optim` on
//! [`GpuNetwork::parameters_mut`]) that skips the per-step parameter and gradient transfers is a
//! later step.

use anyhow::{Context, Result, bail};

use crate::autograd::{Graph, ParamStore, Var};
use crate::config::TargetConfig;
use crate::device::kernels::GpuTensor;
use crate::device::launch::Gpu;
use crate::loss::Loss;
use crate::model::Architecture;
use crate::model::gpu::{DeviceLoss, GpuNetwork};
use crate::tensor::Tensor;

use super::metrics;

pub(super) struct GpuStep {
    net: GpuNetwork,
    /// The store changed (an optimizer step) since the device's parameters were uploaded.
    stale: bool,
}

impl GpuStep {
    /// Uploads `store`; refuses targets whose loss the device step cannot express.
    pub(super) fn new(
        gpu: &Gpu,
        arch: &Architecture,
        store: &ParamStore,
        targets: &[TargetConfig],
    ) -> Result<Self> {
        if let Some(t) = targets.iter().find(|t| metrics::needs_probabilities(t)) {
            // The CPU puts a sigmoid between the logits and BCELoss; the device loss takes the
            // logits as they are.
            bail!(
                "target '{}': {} is not trained on a GPU device yet; use BCEWithLogitsLoss, or train on \
                 the CPU with --device cpu",
                t.name,
                t.loss_fn
            );
        }
        let net = GpuNetwork::new(gpu, arch, store).context("uploading the network to the device")?;
        Ok(GpuStep { net, stale: false })
    }

    /// Marks the device's parameters out of date after the store was updated.
    pub(super) fn parameters_changed(&mut self) {
        self.stale = true;
    }

    /// The forward of `input` on the device (re-uploading the parameters from `store` if they
    /// changed), kept for [`backward`](Self::backward); the number of heads per target.
    pub(super) fn forward(&mut self, store: &ParamStore, input: &Tensor) -> Result<usize> {
        Ok(self.run(store, input)?.first().map_or(0, Vec::len))
    }

    /// [`forward`](Self::forward), its heads (per target, full resolution first) downloaded as
    /// constants of `g`: what validation's losses and metrics read.
    pub(super) fn forward_heads(
        &mut self,
        g: &mut Graph,
        store: &ParamStore,
        input: &Tensor,
    ) -> Result<Vec<Vec<Var>>> {
        self.run(store, input)?
            .iter()
            .map(|t| {
                t.iter().map(|h| Ok(g.constant(h.to_host().context("downloading an output")?))).collect()
            })
            .collect()
    }

    fn run(&mut self, store: &ParamStore, input: &Tensor) -> Result<Vec<Vec<&GpuTensor>>> {
        if self.stale {
            self.net.load_parameters(store).context("re-uploading the parameters")?;
            self.stale = false;
        }
        let x = GpuTensor::upload(self.net.gpu(), input).context("uploading the batch")?;
        let ds = self.net.architecture().deep_supervision;
        self.net.forward(x, ds)
    }

    /// The backward of the last forward with the CPU step's weighting, its gradients added to
    /// `store`'s (as `Graph::backward` does): a parameter no gradient reached (a head of
    /// deep-supervision weight 0) keeps none, so the optimizer treats it as the CPU's does.
    pub(super) fn backward(
        &mut self,
        store: &mut ParamStore,
        labels: &[Vec<Tensor>],
        losses: &[Loss],
        task_weights: &[f64],
        ds_weights: &[f64],
    ) -> Result<DeviceLoss> {
        let loss = self.net.loss_and_backward(labels, losses, task_weights, ds_weights)?;
        for (name, _, grad) in self.net.parameters_mut() {
            let Some(grad) = grad else { continue };
            let id = store.id(name).with_context(|| format!("parameter '{name}' is not in the store"))?;
            let g = grad.to_host().with_context(|| format!("downloading the gradient of '{name}'"))?;
            store.accumulate_grad(id, g)?;
        }
        Ok(loss)
    }
}
