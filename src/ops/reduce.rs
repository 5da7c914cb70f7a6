//! Differentiable reductions: the mean over spatial axes that squeezes for squeeze-excitation, and
//! the sum of all elements.

use super::elementwise::{cpu_value, filled};
use crate::autograd::{Graph, Var};
use crate::device::cpu::elementwise::Bcast;
use crate::device::cpu::reduce as k;
use crate::tensor::{Shape, Tensor};
use anyhow::{Result, ensure};

/// The mean over `axes` (ascending, contiguous), keeping them as size 1: `[1, 2, 3]` pools a
/// channels-last volume over (D, H, W); `[1, 2]` over (D, H) only, the dynamic_network_architectures
/// squeeze-excitation quirk (reference-spec 2.3).
pub fn mean_axes(g: &mut Graph, x: Var, axes: &[usize]) -> Result<Var> {
    let tx = cpu_value(g, x, "mean input")?;
    let dims = tx.dims();
    ensure!(
        axes.windows(2).all(|w| w[1] == w[0] + 1) && axes.iter().all(|&a| a < dims.len()),
        "mean: axes {axes:?} must be ascending, contiguous and within the rank of shape {}",
        tx.shape()
    );
    let mut small = dims.to_vec();
    axes.iter().for_each(|&a| small[a] = 1);
    let bc = Bcast::of(dims, &small).expect("contiguous axes form one run");
    ensure!(bc.mid > 0, "mean: axes {axes:?} of shape {} hold no elements", tx.shape());
    let small = Shape::from(small);
    let y = filled(&small, |y| k::mean_mid(y, tx.data(), bc))?;
    let in_shape = tx.shape().clone();
    Ok(g.record("mean", y, &[x], move |gy| {
        Ok(vec![Some(filled(&in_shape, |gx| k::mean_mid_backward(gx, gy.data(), bc))?)])
    }))
}

/// The sum of every element, as a scalar (shape []).
pub fn sum(g: &mut Graph, x: Var) -> Result<Var> {
    let tx = cpu_value(g, x, "sum input")?;
    let y = Tensor::scalar(k::sum_all(tx.data()));
    let in_shape = tx.shape().clone();
    Ok(g.record("sum", y, &[x], move |gy| Ok(vec![Some(Tensor::full(in_shape, gy.item()?))])))
}
