//! Differentiable instance normalisation with affine parameters, optionally fused with the
//! activation that follows it (the U-Net's conv-norm-act).

use super::elementwise::{cpu_value, filled};
use crate::autograd::{Graph, Var};
use crate::device::cpu::activation::Act;
use crate::device::cpu::norm as k;
use crate::tensor::Tensor;
use anyhow::{Result, ensure};

/// nnU-Net's (and PyTorch's) InstanceNorm epsilon.
pub const DEFAULT_EPS: f64 = 1e-5;

/// `(x - mean) / sqrt(var + eps) * gamma + beta` per (sample, channel) over the spatial axes of a
/// channels-last `x` (N, ..., C), with the biased variance; `gamma` and `beta` are (C).
pub fn instance_norm(g: &mut Graph, x: Var, gamma: Var, beta: Var, eps: f64) -> Result<Var> {
    instance_norm_act(g, x, gamma, beta, eps, Act::None)
}

/// [`instance_norm`] followed by `act`, in one pass over memory after the statistics. The backward
/// recomputes the normalised input from `x` and the saved (mean, rstd) instead of saving it.
pub fn instance_norm_act(g: &mut Graph, x: Var, gamma: Var, beta: Var, eps: f64, act: Act) -> Result<Var> {
    let tx = cpu_value(g, x, "instance norm input")?;
    let tg = cpu_value(g, gamma, "instance norm gamma")?;
    let tb = cpu_value(g, beta, "instance norm beta")?;
    let dims = tx.dims();
    ensure!(
        dims.len() >= 3 && dims.iter().all(|&d| d > 0),
        "instance norm: input must be a non-empty channels-last (N, ..., C) tensor with spatial axes, got shape {}",
        tx.shape()
    );
    let c = tx.shape().last();
    for (name, t) in [("gamma", &tg), ("beta", &tb)] {
        ensure!(
            t.dims() == [c],
            "instance norm: {name} has shape {} but the input of shape {} has {c} channels",
            t.shape(),
            tx.shape()
        );
    }
    ensure!(eps >= 0.0, "instance norm: eps must be non-negative, got {eps}");
    let mut stats = None;
    let y = filled(tx.shape(), |y| {
        stats = Some(k::instance_norm_forward(y, tx.data(), dims[0], tg.data(), tb.data(), eps, act));
    })?;
    let stats = stats.expect("forward ran");
    let need = [g.requires_grad(x), g.requires_grad(gamma), g.requires_grad(beta)];
    let op = if act == Act::None { "instance_norm" } else { "instance_norm_act" };
    Ok(g.record(op, y, &[x, gamma, beta], move |gy| {
        let mut gx = need[0].then(|| vec![0.0; tx.numel()]);
        let (dgamma, dbeta) = k::instance_norm_backward(
            gx.as_deref_mut(),
            gy.data(),
            tx.data(),
            &stats,
            tg.data(),
            tb.data(),
            act,
        );
        Ok(vec![
            gx.map(|gx| Tensor::from_vec(tx.shape().clone(), gx)).transpose()?,
            need[1].then(|| Tensor::from_vec([c], dgamma)).transpose()?,
            need[2].then(|| Tensor::from_vec([c], dbeta)).transpose()?,
        ])
    }))
}
