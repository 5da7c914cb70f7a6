//! Differentiable element-wise ops: add, scale, broadcast multiply (the squeeze-excitation gate)
//! and concatenation along the channel (last) axis.

use super::{dev, same_device};
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::elementwise as k;
use crate::device::kernels::elementwise as kg;
use crate::device::op::Bcast;
use crate::tensor::{Shape, Tensor};
use anyhow::{Result, ensure};

/// The value of `v` (a cheap shared clone).
pub(crate) fn value(g: &Graph, v: Var) -> Tensor {
    g.value(v).clone()
}

/// A new tensor of `shape` whose elements `fill` writes.
pub(crate) fn filled(shape: &Shape, fill: impl FnOnce(&mut [f32])) -> Result<Tensor> {
    let mut data = vec![0.0; shape.numel()];
    fill(&mut data);
    Tensor::from_vec(shape.clone(), data)
}

/// `a + b` for tensors of one shape.
pub fn add(g: &mut Graph, a: Var, b: Var) -> Result<Var> {
    let (ta, tb) = (value(g, a), value(g, b));
    ensure!(ta.dims() == tb.dims(), "add: operand shapes {} and {} differ", ta.shape(), tb.shape());
    let y = match same_device("add", &[&ta, &tb])? {
        Device::Cpu => filled(ta.shape(), |y| k::map2(y, ta.data(), tb.data(), |a, b| a + b))?,
        _ => dev(kg::add(ta.gpu("add")?, tb.gpu("add")?)?),
    };
    Ok(g.record("add", y, &[a, b], |gy| Ok(vec![Some(gy.clone()), Some(gy.clone())])))
}

/// `s * x` for a constant `s`.
pub fn scale(g: &mut Graph, x: Var, s: f32) -> Result<Var> {
    let y = scaled(g.value(x), s)?;
    Ok(g.record("scale", y, &[x], move |gy| Ok(vec![Some(scaled(gy, s)?)])))
}

/// `s * t` on `t`'s device.
pub(crate) fn scaled(t: &Tensor, s: f32) -> Result<Tensor> {
    match t.device() {
        Device::Cpu => filled(t.shape(), |y| k::map1(y, t.data(), |v| v * s)),
        _ => Ok(dev(kg::scale(t.gpu("scale")?, s)?)),
    }
}

/// `x * gate`, where `gate` has x's rank and size 1 on one contiguous run of axes (or matches x):
/// (N, 1, 1, 1, C) for a channel gate, (N, 1, 1, W, C) for the D,H-pooled squeeze-excitation.
/// The gate's gradient sums over the axes it was broadcast along.
pub fn mul(g: &mut Graph, x: Var, gate: Var) -> Result<Var> {
    let (tx, tg) = (value(g, x), value(g, gate));
    let device = same_device("mul", &[&tx, &tg])?;
    let bc = Bcast::of(tx.dims(), tg.dims()).ok_or_else(|| {
        anyhow::anyhow!(
            "mul: gate of shape {} cannot broadcast over input of shape {}: it needs the same rank, \
             and each axis equal to the input's or 1, the 1s on one contiguous run of axes",
            tg.shape(),
            tx.shape()
        )
    })?;
    let need = [g.requires_grad(x), g.requires_grad(gate)];
    if device != Device::Cpu {
        let y = dev(kg::bcast_mul(tx.gpu("mul")?, tg.gpu("mul")?)?);
        return Ok(g.record("mul", y, &[x, gate], move |gy| {
            let (gx, gg) = kg::bcast_mul_backward(gy.gpu("mul backward")?, tx.gpu("mul")?, tg.gpu("mul")?)?;
            Ok(vec![need[0].then(|| dev(gx)), need[1].then(|| dev(gg))])
        }));
    }
    let y = filled(tx.shape(), |y| k::bcast_mul(y, tx.data(), tg.data(), bc))?;
    Ok(g.record("mul", y, &[x, gate], move |gy| {
        let gx = need[0]
            .then(|| filled(tx.shape(), |gx| k::bcast_mul(gx, gy.data(), tg.data(), bc)))
            .transpose()?;
        let gg = need[1]
            .then(|| filled(tg.shape(), |gg| k::bcast_mul_grad_small(gg, gy.data(), tx.data(), bc)))
            .transpose()?;
        Ok(vec![gx, gg])
    }))
}

/// Concatenation along the last (channel) axis; all other axes must agree.
pub fn concat(g: &mut Graph, parts: &[Var]) -> Result<Var> {
    ensure!(!parts.is_empty(), "concat: no tensors to concatenate");
    let ts: Vec<Tensor> = parts.iter().map(|&p| value(g, p)).collect();
    let device = same_device("concat", &ts.iter().collect::<Vec<_>>())?;
    let first = ts[0].dims();
    ensure!(!first.is_empty(), "concat: part 0 is a scalar; parts need a last axis to join along");
    let lead = &first[..first.len() - 1];
    for (i, t) in ts.iter().enumerate() {
        ensure!(
            t.dims().len() == first.len() && &t.dims()[..lead.len()] == lead,
            "concat: part {i} has shape {} but part 0 has {}; all axes but the last must agree",
            t.shape(),
            ts[0].shape()
        );
    }
    let widths: Vec<usize> = ts.iter().map(|t| t.shape().last()).collect();
    let total: usize = widths.iter().sum();
    let shape = Shape::from([lead, &[total]].concat());
    let need: Vec<bool> = parts.iter().map(|&p| g.requires_grad(p)).collect();
    if device != Device::Cpu {
        let gs = ts.iter().map(|t| t.gpu("concat")).collect::<Result<Vec<_>>>()?;
        let y = dev(kg::concat_channels(&gs)?);
        return Ok(g.record("concat", y, parts, move |gy| {
            let grads = kg::concat_channels_backward(gy.gpu("concat backward")?, &widths)?;
            Ok(grads.into_iter().zip(need).map(|(gi, n)| n.then(|| dev(gi))).collect())
        }));
    }
    let slices: Vec<&[f32]> = ts.iter().map(Tensor::data).collect();
    let y = filled(&shape, |y| k::concat_last(y, &slices, &widths))?;
    let shapes: Vec<Shape> = ts.iter().map(|t| t.shape().clone()).collect();
    Ok(g.record("concat", y, parts, move |gy| {
        let mut start = 0;
        let mut grads = Vec::with_capacity(widths.len());
        for ((&w, shape), need) in widths.iter().zip(shapes).zip(need) {
            grads.push(
                need.then(|| Tensor::from_vec(shape, k::slice_last(gy.data(), total, start, w)))
                    .transpose()?,
            );
            start += w;
        }
        Ok(grads)
    }))
}
