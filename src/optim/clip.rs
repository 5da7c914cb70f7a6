//! Global gradient-norm clipping as torch.nn.utils.clip_grad_norm_ (L2 norm).

use crate::ParamStore;
use crate::device::cpu::optim::{scale_in_place, sum_squares};

/// The L2 norm of all gradients of the store taken together; parameters without a gradient
/// contribute nothing.
pub fn grad_norm(params: &ParamStore) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for id in params.ids() {
        if let Some(g) = params.grad(id) {
            g.expect_cpu(&format!("gradient norm: gradient of '{}'", params.name(id)))?;
            sum += sum_squares(g.data());
        }
    }
    Ok(sum.sqrt())
}

/// Scales every gradient by `max_norm / (total + 1e-6)` when that is below 1 and returns `total`,
/// the norm before clipping. A non-finite total is returned for the caller to act on (skip the
/// step); the `< 1` rule then scales by 0 for an infinite total and not at all for NaN.
pub fn clip_grad_norm(params: &mut ParamStore, max_norm: f64) -> anyhow::Result<f64> {
    anyhow::ensure!(max_norm > 0.0, "gradient clipping: max_norm must be > 0, got {max_norm}");
    let total = grad_norm(params)?;
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for id in params.ids() {
            if let Some(g) = params.grad_mut(id) {
                scale_in_place(g.data_mut(), coef as f32);
            }
        }
    }
    Ok(total)
}
