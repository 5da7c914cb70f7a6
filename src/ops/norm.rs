//! Differentiable instance normalisation with affine parameters, optionally fused with the
//! activation that follows it (the U-Net's conv-norm-act) and with BasicBlockD's residual add.

use super::elementwise::{add, filled, value};
use super::{activation, dev, same_device};
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::norm as k;
use crate::device::kernels::norm as kg;
use crate::device::op::Act;
use crate::tensor::Tensor;
use anyhow::{Result, ensure};

/// nnU-Net's (and PyTorch's) InstanceNorm epsilon.
pub const DEFAULT_EPS: f64 = 1e-5;

/// `(x - mean) / sqrt(var + eps) * gamma + beta` per (sample, channel) over the spatial axes of a
/// channels-last `x` (N, ..., C), with the biased variance; `gamma` and `beta` are (C).
pub fn instance_norm(g: &mut Graph, x: Var, gamma: Var, beta: Var, eps: f64) -> Result<Var> {
    instance_norm_act(g, x, gamma, beta, eps, Act::None)
}

/// The operands of a norm, checked: (x, gamma, beta) and their device.
fn operands(g: &Graph, x: Var, gamma: Var, beta: Var, eps: f64) -> Result<([Tensor; 3], Device)> {
    let (tx, tg, tb) = (value(g, x), value(g, gamma), value(g, beta));
    let device = same_device("instance norm", &[&tx, &tg, &tb])?;
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
    Ok(([tx, tg, tb], device))
}

/// [`instance_norm`] followed by `act`, in one pass over memory after the statistics. The backward
/// recomputes the normalised input from `x` and the saved (mean, rstd) instead of saving it.
pub fn instance_norm_act(g: &mut Graph, x: Var, gamma: Var, beta: Var, eps: f64, act: Act) -> Result<Var> {
    let ([tx, tg, tb], device) = operands(g, x, gamma, beta, eps)?;
    let need = [g.requires_grad(x), g.requires_grad(gamma), g.requires_grad(beta)];
    let op = if act == Act::None { "instance_norm" } else { "instance_norm_act" };
    if device != Device::Cpu {
        return record_gpu(g, op, [x, gamma, beta], None, [tx, tg, tb], eps, act);
    }
    let (dims, c) = (tx.dims().to_vec(), tx.shape().last());
    let mut stats = None;
    let y = filled(tx.shape(), |y| {
        stats = Some(k::instance_norm_forward(y, tx.data(), dims[0], tg.data(), tb.data(), eps, act));
    })?;
    let stats = stats.expect("forward ran");
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

/// `act(instance_norm(x) * gamma + beta + residual)`: BasicBlockD's last norm, the shortcut added
/// before the block's activation. One fused kernel pass on a kernel device; on the CPU the norm,
/// the add and the activation as three ops (the same math, and the CPU's numbers of old).
pub fn instance_norm_add_act(
    g: &mut Graph,
    x: Var,
    gamma: Var,
    beta: Var,
    eps: f64,
    residual: Var,
    act: Act,
) -> Result<Var> {
    let ([tx, tg, tb], device) = operands(g, x, gamma, beta, eps)?;
    if device == Device::Cpu {
        let y = instance_norm_act(g, x, gamma, beta, eps, Act::None)?;
        let sum = add(g, y, residual)?;
        return activation::activation(g, sum, act);
    }
    let tr = value(g, residual);
    same_device("instance norm residual", &[&tx, &tr])?;
    ensure!(
        tr.dims() == tx.dims(),
        "instance norm residual: shape {} differs from the input's {}",
        tr.shape(),
        tx.shape()
    );
    record_gpu(g, "instance_norm_add_act", [x, gamma, beta], Some((residual, tr)), [tx, tg, tb], eps, act)
}

/// The norm on a kernel device; with `residual`, the fused residual variant (its backward reads the
/// output to differentiate the activation, and returns the residual's gradient too).
fn record_gpu(
    g: &mut Graph,
    op: &'static str,
    vars: [Var; 3],
    residual: Option<(Var, Tensor)>,
    [tx, tg, tb]: [Tensor; 3],
    eps: f64,
    act: Act,
) -> Result<Var> {
    let rg = residual.as_ref().map(|(_, t)| t.gpu(op)).transpose()?;
    let (y, stats) = kg::instance_norm_forward(tx.gpu(op)?, tg.gpu(op)?, tb.gpu(op)?, eps, act, rg)?;
    let y = dev(y);
    let saved_y = residual.is_some().then(|| y.clone());
    let mut inputs = vars.to_vec();
    inputs.extend(residual.map(|(v, _)| v));
    let need: Vec<bool> = inputs.iter().map(|&v| g.requires_grad(v)).collect();
    Ok(g.record(op, y, &inputs, move |gy| {
        let out = saved_y.as_ref().map(|y| y.gpu(op)).transpose()?;
        let r =
            kg::instance_norm_backward(gy.gpu(op)?, tx.gpu(op)?, &stats, tg.gpu(op)?, tb.gpu(op)?, act, out)?;
        let mut grads = vec![Some(dev(r.gx)), Some(dev(r.dgamma)), Some(dev(r.dbeta))];
        if let Some(dr) = r.dresidual {
            grads.push(Some(dev(dr)));
        }
        Ok(grads.into_iter().zip(&need).map(|(g, &n)| g.filter(|_| n)).collect())
    }))
}
