//! Differentiable activations: the leaky-ReLU family, sigmoid, and softmax over channels.

use super::elementwise::{filled, value};
use super::{dev, same_device};
use crate::autograd::{Graph, Var};
use crate::device::Device;
use crate::device::cpu::activation as k;
use crate::device::kernels::activation as kg;
use crate::tensor::Tensor;
use anyhow::{Result, ensure};

pub use crate::device::op::Act;

/// `act(x)` on `x`'s device.
pub(crate) fn act_value(x: &Tensor, act: Act) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => filled(x.shape(), |y| k::act_forward(y, x.data(), act)),
        _ => Ok(dev(kg::act_forward(x.gpu("activation")?, act)?)),
    }
}

/// The gradient of `act` at `x` times `gy`.
pub(crate) fn act_grad(gy: &Tensor, x: &Tensor, act: Act) -> Result<Tensor> {
    match same_device("activation backward", &[gy, x])? {
        Device::Cpu => filled(gy.shape(), |gx| k::act_backward(gx, gy.data(), x.data(), act)),
        _ => Ok(dev(kg::act_backward(gy.gpu("activation backward")?, x.gpu("activation")?, act)?)),
    }
}

/// `act(x)`; [`Act::None`] returns `x` itself. The backward reads the saved input.
pub fn activation(g: &mut Graph, x: Var, act: Act) -> Result<Var> {
    let op = match act {
        Act::None => return Ok(x),
        Act::Relu => "relu",
        Act::LeakyRelu(_) => "leaky_relu",
    };
    let tx = value(g, x);
    let y = act_value(&tx, act)?;
    Ok(g.record(op, y, &[x], move |gy| Ok(vec![Some(act_grad(gy, &tx, act)?)])))
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
    let tx = value(g, x);
    let y = match tx.device() {
        Device::Cpu => filled(tx.shape(), |y| k::sigmoid_forward(y, tx.data()))?,
        _ => dev(kg::sigmoid_forward(tx.gpu("sigmoid")?)?),
    };
    let ty = y.clone();
    Ok(g.record("sigmoid", y, &[x], move |gy| {
        Ok(vec![Some(match same_device("sigmoid backward", &[gy, &ty])? {
            Device::Cpu => filled(gy.shape(), |gx| k::sigmoid_backward(gx, gy.data(), ty.data()))?,
            _ => dev(kg::sigmoid_backward(gy.gpu("sigmoid backward")?, ty.gpu("sigmoid")?)?),
        })])
    }))
}

/// Softmax over the last axis (the channels of channels-last data); the backward reads the output.
pub fn softmax(g: &mut Graph, x: Var) -> Result<Var> {
    let tx = value(g, x);
    ensure!(tx.shape().rank() > 0, "softmax: input is a scalar; it needs a channel axis");
    let c = tx.shape().last();
    let y = match tx.device() {
        Device::Cpu => filled(tx.shape(), |y| k::softmax_forward(y, tx.data(), c))?,
        _ => dev(kg::softmax_forward(tx.gpu("softmax")?)?),
    };
    let ty = y.clone();
    Ok(g.record("softmax", y, &[x], move |gy| {
        Ok(vec![Some(match same_device("softmax backward", &[gy, &ty])? {
            Device::Cpu => filled(gy.shape(), |gx| k::softmax_backward(gx, gy.data(), ty.data(), c))?,
            _ => dev(kg::softmax_backward(gy.gpu("softmax backward")?, ty.gpu("softmax")?)?),
        })])
    }))
}
