//! Global gradient-norm clipping as torch.nn.utils.clip_grad_norm_ (L2 norm), on the device the
//! gradients live on.

use crate::ParamStore;
use crate::device::cpu::optim::sum_squares;
use crate::device::kernels::optim::{TableCache, grad_norm as device_grad_norm};
use crate::device::launch::Gpu;

/// The gradient norm of a store, measured step after step: on a kernel device the launch tables
/// of the last measurement are kept, so a step uploads nothing and downloads only the norm.
#[derive(Default)]
pub struct GradNorm {
    cache: TableCache,
}

impl GradNorm {
    /// The L2 norm of all gradients of the store taken together; parameters without a gradient
    /// contribute nothing.
    pub fn measure(&mut self, params: &ParamStore) -> anyhow::Result<f64> {
        let device = params.one_device("gradient norm")?;
        let grads: Vec<_> = params.ids().filter_map(|id| params.grad(id).map(|g| (id, g))).collect();
        let Some(gpu) = Gpu::of(device)? else {
            return Ok(grads.iter().map(|(_, g)| sum_squares(g.data())).sum::<f64>().sqrt());
        };
        let bufs = grads
            .iter()
            .map(|(id, g)| Ok(g.gpu(&format!("gradient norm: gradient of '{}'", params.name(*id)))?.buf()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        device_grad_norm(&gpu, &mut self.cache, &bufs)
    }

    /// Scales every gradient by `max_norm / (total + 1e-6)` when that is below 1 and returns
    /// `total`, the norm before clipping. A non-finite total is returned for the caller to act on
    /// (skip the step); the `< 1` rule then scales by 0 for an infinite total and not at all for NaN.
    pub fn clip(&mut self, params: &mut ParamStore, max_norm: f64) -> anyhow::Result<f64> {
        anyhow::ensure!(max_norm > 0.0, "gradient clipping: max_norm must be > 0, got {max_norm}");
        let total = self.measure(params)?;
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            params.scale_grads(coef as f32)?;
        }
        Ok(total)
    }
}

/// [`GradNorm::measure`] once.
pub fn grad_norm(params: &ParamStore) -> anyhow::Result<f64> {
    GradNorm::default().measure(params)
}

/// [`GradNorm::clip`] once.
pub fn clip_grad_norm(params: &mut ParamStore, max_norm: f64) -> anyhow::Result<f64> {
    GradNorm::default().clip(params, max_norm)
}
