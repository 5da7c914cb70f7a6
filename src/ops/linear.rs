//! Differentiable fully connected layer over the last axis (squeeze-excitation's 1x1 convolutions
//! on pooled (N, 1, 1, 1, C) vectors).

use super::elementwise::{filled, value};
use super::{dev, same_device};
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::linear::{self as k, LinearGrads};
use crate::device::kernels::conv::{self as kc, ConvPrecision};
use crate::tensor::{Shape, Tensor};
use anyhow::{Result, ensure};

/// `y = x w^T + b` over the last axis: `x` (..., Cin), `w` (Cout, Cin) as PyTorch stores a Linear
/// (or a 1x1x1 Conv3d weight reshaped), `b` (Cout); `y` is (..., Cout).
pub fn linear(g: &mut Graph, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
    let (tx, tw) = (value(g, x), value(g, w));
    let tb = b.map(|b| value(g, b));
    let mut all = vec![&tx, &tw];
    all.extend(tb.as_ref());
    let device = same_device("linear", &all)?;
    ensure!(tw.shape().rank() == 2, "linear: weight must be (Cout, Cin), got shape {}", tw.shape());
    let (cout, cin) = (tw.dims()[0], tw.dims()[1]);
    ensure!(
        tx.shape().rank() >= 1 && tx.shape().last() == cin && cin > 0,
        "linear: input of shape {} does not end in the weight's {cin} input features (weight {})",
        tx.shape(),
        tw.shape()
    );
    if let Some(tb) = &tb {
        ensure!(
            tb.dims() == [cout],
            "linear: bias has shape {}, weight {} needs [{cout}]",
            tb.shape(),
            tw.shape()
        );
    }
    let dims = tx.dims();
    let out = Shape::from([&dims[..dims.len() - 1], &[cout]].concat());
    if device != Device::Cpu {
        return record_gpu(g, [x, w], b, [tx, tw], tb, out);
    }
    let y = filled(&out, |y| {
        k::linear_forward(y, tx.data(), tw.data(), tb.as_ref().map(|t| t.data()), cin, cout)
    })?;
    let need = [g.requires_grad(x), g.requires_grad(w), b.is_some_and(|b| g.requires_grad(b))];
    let has_bias = b.is_some();
    let mut inputs = vec![x, w];
    inputs.extend(b);
    Ok(g.record("linear", y, &inputs, move |gy| {
        let mut gx = need[0].then(|| vec![0.0; tx.numel()]);
        let mut gw = need[1].then(|| vec![0.0; cout * cin]);
        let mut gb = need[2].then(|| vec![0.0; cout]);
        let out = LinearGrads { gx: gx.as_deref_mut(), gw: gw.as_deref_mut(), gb: gb.as_deref_mut() };
        k::linear_backward(out, gy.data(), tx.data(), tw.data(), cin, cout);
        let mut grads = vec![
            gx.map(|v| Tensor::from_vec(tx.shape().clone(), v)).transpose()?,
            gw.map(|v| Tensor::from_vec(tw.shape().clone(), v)).transpose()?,
        ];
        if has_bias {
            grads.push(gb.map(|v| Tensor::from_vec([cout], v)).transpose()?);
        }
        Ok(grads)
    }))
}

/// The layer on a kernel device, as the 1x1x1 convolution it is: rows of `x` as voxels.
fn record_gpu(
    g: &mut Graph,
    [x, w]: [Var; 2],
    b: Option<Var>,
    [tx, tw]: [Tensor; 2],
    tb: Option<Tensor>,
    out: Shape,
) -> Result<Var> {
    const P: ConvPrecision = ConvPrecision::Fp32;
    let op = "linear";
    let (cout, cin) = (tw.dims()[0], tw.dims()[1]);
    let rows = tx.numel() / cin;
    let x5 = tx.gpu(op)?.clone().reshape([rows, 1, 1, 1, cin])?;
    let w5 = tw.gpu(op)?.clone().reshape([cout, 1, 1, 1, cin])?;
    let bg = tb.as_ref().map(|t| t.gpu(op)).transpose()?;
    let y = kc::conv3d_forward(&x5, &w5, bg, [1; 3], P)?.reshape(out)?;
    let need = [g.requires_grad(x), g.requires_grad(w), b.is_some_and(|b| g.requires_grad(b))];
    let (x_shape, w_shape) = (tx.shape().clone(), tw.shape().clone());
    let mut inputs = vec![x, w];
    inputs.extend(b);
    Ok(g.record(op, dev(y), &inputs, move |gy| {
        let gy5 = gy.gpu(op)?.clone().reshape([rows, 1, 1, 1, cout])?;
        let gx = need[0]
            .then(|| kc::conv3d_backward_data(&gy5, &w5, [1, 1, 1], [1; 3], P)?.reshape(x_shape.clone()))
            .transpose()?;
        let (gw, gb) = if need[1] || need[2] {
            let (gw, gb) = kc::conv3d_backward_weight(&gy5, &x5, [1; 3], [1; 3], P, need[2])?;
            (need[1].then(|| gw.reshape(w_shape)).transpose()?, gb)
        } else {
            (None, None)
        };
        let mut grads = vec![gx.map(dev), gw.map(dev)];
        if b.is_some() {
            grads.push(gb.map(dev));
        }
        Ok(grads)
    }))
}
