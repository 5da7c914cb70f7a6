//! Differentiable activations: the leaky-ReLU family, sigmoid, and softmax over channels.

use super::elementwise::{cpu_value, filled};
use crate::autograd::{Graph, Var};
use crate::device::cpu::activation as k;
use anyhow::{Result, ensure};

pub use crate::device::cpu::activation::Act;

/// `act(x)`; [`Act::None`] returns `x` itself. The backward reads the saved input.
pub fn activation(g: &mut Graph, x: Var, act: Act) -> Result<Var> {
    let op = match act {
        Act::None => return Ok(x),
        Act::Relu => "relu",
        Act::LeakyRelu(_) => "leaky_relu",
    };
    let tx = cpu_value(g, x, op)?;
    let y = filled(tx.shape(), |y| k::act_forward(y, tx.data(), act))?;
    Ok(g.record(op, y, &[x], move |gy| {
        Ok(vec![Some(filled(gy.shape(), |gx| k::act_backward(gx, gy.data(), tx.data(), act))?)])
    }))
}

/// LeakyReLU with `slope` for negative inputs (nnU-Net: 0.01).
pub fn leaky_relu(g: &mut Graph, x: Var, slope: f64) -> Result<Var> {
    activation(g, x, Act::LeakyRelu(slope))
}

pub fn relu(g: &mut Graph, x: Var) -> Result<Var> {
    activation(g, x, Act::Relu)
}

/// The logistic function; the backward reads the saved output.
pub fn sigmoid(g: &mut Graph, x: Var) -> Result<Var> {
    let tx = cpu_value(g, x, "sigmoid")?;
    let y = filled(tx.shape(), |y| k::sigmoid_forward(y, tx.data()))?;
    let ty = y.clone();
    Ok(g.record("sigmoid", y, &[x], move |gy| {
        Ok(vec![Some(filled(gy.shape(), |gx| k::sigmoid_backward(gx, gy.data(), ty.data()))?)])
    }))
}

/// Softmax over the last axis (the channels of channels-last data); the backward reads the output.
pub fn softmax(g: &mut Graph, x: Var) -> Result<Var> {
    let tx = cpu_value(g, x, "softmax")?;
    ensure!(tx.shape().rank() > 0, "softmax: input is a scalar; it needs a channel axis");
    let c = tx.shape().last();
    let y = filled(tx.shape(), |y| k::softmax_forward(y, tx.data(), c))?;
    let ty = y.clone();
    Ok(g.record("softmax", y, &[x], move |gy| {
        Ok(vec![Some(filled(gy.shape(), |gx| k::softmax_backward(gx, gy.data(), ty.data(), c))?)])
    }))
}
