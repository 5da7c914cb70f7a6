//! Optimizers, learning-rate schedules and gradient clipping, numerically as PyTorch's
//! torch.optim.SGD / Adam / AdamW, CosineAnnealingLR, nnU-Net's PolyLRScheduler and
//! torch.nn.utils.clip_grad_norm_.
//!
//! An [`Optimizer`] updates the parameters of a [`ParamStore`](crate::ParamStore) that have an
//! accumulated gradient and keeps its per-parameter state by parameter name, so the state can be
//! exported into a checkpoint as named tensors ([`OptimizerState`]) and imported on resume.

mod adam;
mod clip;
mod schedule;
mod sgd;
mod state;

pub use crate::device::op::{AdamHyper, SgdHyper};
pub use adam::Adam;
pub use clip::{GradNorm, clip_grad_norm, grad_norm};
pub use schedule::LrSchedule;
pub use sgd::Sgd;
pub use state::{AdamMeta, OptimizerMeta, OptimizerState};

use crate::{ParamId, ParamStore};

/// A first-order optimizer over a [`ParamStore`].
pub trait Optimizer: Send {
    /// Updates every parameter that has a gradient; parameters without one are skipped and get no
    /// state, as in PyTorch. Gradients are checked before anything changes, so an error leaves
    /// parameters and state untouched.
    fn step(&mut self, params: &mut ParamStore) -> anyhow::Result<()>;

    /// The learning rate of the next step.
    fn lr(&self) -> f64;

    /// Sets the learning rate (schedules do, once per epoch).
    fn set_lr(&mut self, lr: f64);

    /// The state (moments, step counts, hyperparameters) a checkpoint needs to resume exactly,
    /// copied to the host.
    fn export_state(&self) -> anyhow::Result<OptimizerState>;

    /// Replaces the state with `state`, hyperparameters included (as PyTorch's load_state_dict
    /// does), after checking it against the optimizer kind and the parameters' names and shapes;
    /// the state moves to the parameters' device. On error nothing changes.
    fn import_state(&mut self, params: &ParamStore, state: &OptimizerState) -> anyhow::Result<()>;
}

/// The parameters that have a gradient and their device, after checking that each gradient, and
/// the state tensor `state(name)` holds for it, have the parameter's shape and device.
fn params_with_grads<'a>(
    optimizer: &str,
    params: &ParamStore,
    state: impl Fn(&str) -> Option<&'a crate::Tensor>,
) -> anyhow::Result<(Vec<ParamId>, crate::Device)> {
    let device = params.one_device(optimizer)?;
    let mut ids = Vec::new();
    for id in params.ids() {
        let Some(g) = params.grad(id) else { continue };
        let (name, p) = (params.name(id), params.value(id));
        g.expect_shape(&format!("{optimizer}: gradient of '{name}'"), p.dims())?;
        if let Some(s) = state(name) {
            anyhow::ensure!(
                s.dims() == p.dims(),
                "{optimizer}: state of parameter '{name}' has shape {}, the parameter has {}",
                s.shape(),
                p.shape()
            );
            anyhow::ensure!(
                s.device() == device,
                "{optimizer}: state of parameter '{name}' is on {}, the parameter on {device}",
                s.device()
            );
        }
        ids.push(id);
    }
    Ok((ids, device))
}
