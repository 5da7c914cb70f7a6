//! Differentiable reductions: the mean over spatial axes that squeezes for squeeze-excitation, and
//! the sum of all elements.

use super::dev;
use super::elementwise::{filled, value};
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::reduce as k;
use crate::device::kernels::reduce as kg;
use crate::device::op::Bcast;
use crate::tensor::{Shape, Tensor};
use anyhow::{Result, ensure};

/// The mean over `axes` (ascending, contiguous), keeping them as size 1: `[1, 2, 3]` pools a
/// channels-last volume over (D, H, W); `[1, 2]` over (D, H) only, the dynamic_network_architectures
/// squeeze-excitation quirk (reference-spec 2.3).
pub fn mean_axes(g: &mut Graph, x: Var, axes: &[usize]) -> Result<Var> {
    let tx = value(g, x);
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
    let in_shape = tx.shape().clone();
    if tx.device() != Device::Cpu {
        let y = dev(kg::mean_over(tx.gpu("mean")?, small)?);
        return Ok(g.record("mean", y, &[x], move |gy| {
            Ok(vec![Some(dev(kg::mean_over_backward(gy.gpu("mean backward")?, in_shape)?))])
        }));
    }
    let y = filled(&small, |y| k::mean_mid(y, tx.data(), bc))?;
    Ok(g.record("mean", y, &[x], move |gy| {
        Ok(vec![Some(filled(&in_shape, |gx| k::mean_mid_backward(gx, gy.data(), bc))?)])
    }))
}

/// The sum of every element, as a scalar (shape []).
pub fn sum(g: &mut Graph, x: Var) -> Result<Var> {
    let tx = value(g, x);
    let in_shape = tx.shape().clone();
    if tx.device() != Device::Cpu {
        let ones = Shape::from(vec![1; in_shape.rank()]);
        let y = dev(kg::sum_over(tx.gpu("sum")?, ones.clone())?.reshape(Shape::new(&[]))?);
        return Ok(g.record("sum", y, &[x], move |gy| {
            let gy = gy.gpu("sum backward")?.clone().reshape(ones)?;
            Ok(vec![Some(dev(kg::sum_over_backward(&gy, in_shape)?))])
        }));
    }
    let y = Tensor::scalar(k::sum_all(tx.data()));
    Ok(g.record("sum", y, &[x], move |gy| Ok(vec![Some(Tensor::full(in_shape, gy.item()?))])))
}
