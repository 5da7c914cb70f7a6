//! A minimal reverse-mode autograd tape.
//!
//! Ops push a node holding their output and a backward closure that captures exactly what it needs
//! (cheap shared clones of tensors). `backward` walks the tape once in reverse; each closure is
//! consumed when it runs, so saved activations are freed as soon as backward has used them.
//! A graph made with [`Graph::no_grad`] records values only.

mod params;

pub use params::{ParamId, ParamStore};

use crate::tensor::{Shape, Tensor};
use anyhow::Context;

/// Handle of a value on a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

/// Maps the gradient of an op's output to one gradient per input (None where an input needs none).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> anyhow::Result<Vec<Option<Tensor>>>>;

struct Node {
    op: &'static str,
    shape: Shape,
    value: Option<Tensor>,
    grad: Option<Tensor>,
    inputs: Vec<usize>,
    backward: Option<BackwardFn>,
    requires_grad: bool,
    param: Option<ParamId>,
}

/// The tape of one forward pass.
pub struct Graph {
    nodes: Vec<Node>,
    recording: bool,
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

impl Graph {
    /// A graph that records ops for a backward pass.
    pub fn new() -> Self {
        Graph { nodes: Vec::new(), recording: true }
    }

    /// A graph for inference: values only, no backward closures, nothing saved.
    pub fn no_grad() -> Self {
        Graph { nodes: Vec::new(), recording: false }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    fn push(&mut self, op: &'static str, value: Tensor, requires_grad: bool, param: Option<ParamId>) -> Var {
        self.nodes.push(Node {
            op,
            shape: value.shape().clone(),
            value: Some(value),
            grad: None,
            inputs: Vec::new(),
            backward: None,
            requires_grad,
            param,
        });
        Var(self.nodes.len() - 1)
    }

    /// A value that needs no gradient (an input batch, a label).
    pub fn constant(&mut self, value: Tensor) -> Var {
        self.push("constant", value, false, None)
    }

    /// A leaf whose gradient is kept on the graph, readable with [`Graph::grad`] after backward.
    pub fn leaf(&mut self, value: Tensor) -> Var {
        let rec = self.recording;
        self.push("leaf", value, rec, None)
    }

    /// A parameter of `store`; backward adds its gradient to the store.
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Var {
        let rec = self.recording;
        self.push("param", store.value(id).clone(), rec, Some(id))
    }

    /// The forward value of `v`. Panics after backward has released it; read values before.
    pub fn value(&self, v: Var) -> &Tensor {
        self.nodes[v.0].value.as_ref().expect("value read after backward released it")
    }

    pub fn shape(&self, v: Var) -> &Shape {
        &self.nodes[v.0].shape
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// Whether any of `inputs` needs a gradient, i.e. whether an op on them must save anything.
    pub fn needs_grad(&self, inputs: &[Var]) -> bool {
        self.recording && inputs.iter().any(|v| self.nodes[v.0].requires_grad)
    }

    /// Records an op's output. `backward` runs only if the output's gradient is needed; it must
    /// return one entry per input, shaped like that input.
    pub fn record(
        &mut self,
        op: &'static str,
        value: Tensor,
        inputs: &[Var],
        backward: impl FnOnce(&Tensor) -> anyhow::Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var {
        let needs = self.needs_grad(inputs);
        let v = self.push(op, value, needs, None);
        if needs {
            let node = &mut self.nodes[v.0];
            node.inputs = inputs.iter().map(|i| i.0).collect();
            node.backward = Some(Box::new(backward));
        }
        v
    }

    /// The gradient of a leaf after backward.
    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        self.nodes[v.0].grad.as_ref()
    }

    /// Backward from a one-element loss (seed gradient 1).
    pub fn backward(&mut self, loss: Var, store: &mut ParamStore) -> anyhow::Result<()> {
        let shape = self.nodes[loss.0].shape.clone();
        anyhow::ensure!(shape.numel() == 1, "backward() needs a scalar loss, got shape {shape}");
        let device = self.nodes[loss.0].value.as_ref().map_or(crate::device::Device::Cpu, Tensor::device);
        self.backward_from(loss, Tensor::full_on(shape, 1.0, device)?, store)
    }

    /// Backward from `v` with an explicit upstream gradient shaped like `v`.
    pub fn backward_from(&mut self, v: Var, grad: Tensor, store: &mut ParamStore) -> anyhow::Result<()> {
        grad.expect_shape("upstream gradient", self.nodes[v.0].shape.dims())?;
        if !self.nodes[v.0].requires_grad {
            return Ok(());
        }
        self.nodes[v.0].grad = Some(grad);
        // The closures hold what each backward reads; the op outputs themselves are not needed any
        // more, so what no closure saved is freed before the first gradient is allocated.
        for node in &mut self.nodes {
            if node.backward.is_some() {
                node.value = None;
            }
        }
        for i in (0..=v.0).rev() {
            let node = &mut self.nodes[i];
            let Some(g) = node.grad.take() else {
                if node.backward.is_some() {
                    // Not on the path to the loss: release what it saved.
                    node.backward = None;
                    node.value = None;
                }
                continue;
            };
            if let Some(id) = node.param {
                store.accumulate_grad(id, g)?;
                continue;
            }
            let Some(backward) = node.backward.take() else {
                node.grad = Some(g); // a leaf: keep its gradient for the caller
                continue;
            };
            node.value = None;
            let op = node.op;
            let inputs = std::mem::take(&mut node.inputs);
            let grads = backward(&g).with_context(|| format!("backward of {op}"))?;
            drop(g);
            anyhow::ensure!(
                grads.len() == inputs.len(),
                "backward of {op} returned {} gradients for {} inputs",
                grads.len(),
                inputs.len()
            );
            for (inp, gi) in inputs.into_iter().zip(grads) {
                let Some(gi) = gi else { continue };
                let target = &mut self.nodes[inp];
                if !target.requires_grad {
                    continue;
                }
                gi.expect_shape(
                    &format!("gradient from {op} to its input {}", target.op),
                    target.shape.dims(),
                )?;
                match &mut target.grad {
                    Some(acc) => params::add_into(acc, &gi)?,
                    slot @ None => *slot = Some(gi),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mul(g: &mut Graph, a: Var, b: Var) -> Var {
        let (ta, tb) = (g.value(a).clone(), g.value(b).clone());
        let out: Vec<f32> = ta.data().iter().zip(tb.data()).map(|(x, y)| x * y).collect();
        let value = Tensor::from_vec(ta.shape().clone(), out).unwrap();
        g.record("mul", value, &[a, b], move |gy| {
            let ga: Vec<f32> = gy.data().iter().zip(tb.data()).map(|(g, y)| g * y).collect();
            let gb: Vec<f32> = gy.data().iter().zip(ta.data()).map(|(g, x)| g * x).collect();
            Ok(vec![
                Some(Tensor::from_vec(gy.shape().clone(), ga)?),
                Some(Tensor::from_vec(gy.shape().clone(), gb)?),
            ])
        })
    }

    #[test]
    fn gradients_accumulate_over_shared_uses() {
        // loss = x * x * w  => dloss/dx = 2 x w, dloss/dw = x^2
        let mut store = ParamStore::new();
        let w = store.add("w", Tensor::scalar(3.0)).unwrap();
        let mut g = Graph::new();
        let x = g.leaf(Tensor::scalar(2.0));
        let wv = g.param(&store, w);
        let xx = mul(&mut g, x, x);
        let loss = mul(&mut g, xx, wv);
        g.backward(loss, &mut store).unwrap();
        assert_eq!(g.grad(x).unwrap().item().unwrap(), 12.0);
        assert_eq!(store.grad(w).unwrap().item().unwrap(), 4.0);
        // A second pass accumulates into the store until zero_grad.
        let mut g = Graph::new();
        let x = g.constant(Tensor::scalar(1.0));
        let wv = g.param(&store, w);
        let loss = mul(&mut g, x, wv);
        g.backward(loss, &mut store).unwrap();
        assert_eq!(store.grad(w).unwrap().item().unwrap(), 5.0);
        store.zero_grad();
        assert!(store.grad(w).is_none());
    }

    #[test]
    fn no_grad_records_nothing() {
        let store = ParamStore::new();
        let mut g = Graph::no_grad();
        let x = g.leaf(Tensor::scalar(2.0));
        let y = mul(&mut g, x, x);
        assert!(!g.requires_grad(y));
        assert!(g.nodes.iter().all(|n| n.backward.is_none()));
        assert_eq!(g.value(y).item().unwrap(), 4.0);
        drop(store);
    }

    #[test]
    fn backward_releases_saved_values() {
        let mut store = ParamStore::new();
        let mut g = Graph::new();
        let x = g.leaf(Tensor::full([1000], 2.0));
        let y = mul(&mut g, x, x);
        let z = mul(&mut g, y, x);
        g.backward_from(z, Tensor::full([1000], 1.0), &mut store).unwrap();
        assert!(g.nodes[y.0].value.is_none() && g.nodes[z.0].value.is_none());
        assert!(g.nodes[z.0].backward.is_none());
        assert_eq!(g.grad(x).unwrap().data()[0], 12.0); // d(x^3)/dx = 3x^2
    }

    #[test]
    fn non_scalar_loss_is_rejected() {
        let mut store = ParamStore::new();
        let mut g = Graph::new();
        let x = g.leaf(Tensor::zeros([2]));
        let e = g.backward(x, &mut store).unwrap_err().to_string();
        assert!(e.contains("scalar"), "{e}");
    }
}
