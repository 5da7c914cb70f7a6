//! Differentiable fully connected layer over the last axis (squeeze-excitation's 1x1 convolutions
//! on pooled (N, 1, 1, 1, C) vectors).

use super::elementwise::{cpu_value, filled};
use crate::autograd::{Graph, Var};
use crate::device::cpu::linear::{self as k, LinearGrads};
use crate::tensor::{Shape, Tensor};
use anyhow::{Result, ensure};

/// `y = x w^T + b` over the last axis: `x` (..., Cin), `w` (Cout, Cin) as PyTorch stores a Linear
/// (or a 1x1x1 Conv3d weight reshaped), `b` (Cout); `y` is (..., Cout).
pub fn linear(g: &mut Graph, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
    let tx = cpu_value(g, x, "linear input")?;
    let tw = cpu_value(g, w, "linear weight")?;
    let tb = b.map(|b| cpu_value(g, b, "linear bias")).transpose()?;
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
