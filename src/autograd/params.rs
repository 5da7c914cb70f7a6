//! Named parameters and their accumulated gradients.

use crate::tensor::Tensor;
use std::collections::HashMap;

/// Index of a parameter in its [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

impl ParamId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// Parameters by name in insertion order, each with the gradient accumulated by backward passes.
#[derive(Default, Clone)]
pub struct ParamStore {
    names: Vec<String>,
    values: Vec<Tensor>,
    grads: Vec<Option<Tensor>>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter; names are unique.
    pub fn add(&mut self, name: &str, value: Tensor) -> anyhow::Result<ParamId> {
        anyhow::ensure!(!self.index.contains_key(name), "parameter '{name}' is defined twice");
        let id = self.names.len();
        self.index.insert(name.to_string(), id);
        self.names.push(name.to_string());
        self.values.push(value);
        self.grads.push(None);
        Ok(ParamId(id))
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.values.iter().map(Tensor::numel).sum()
    }

    pub fn ids(&self) -> impl Iterator<Item = ParamId> + use<> {
        (0..self.names.len()).map(ParamId)
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied().map(ParamId)
    }

    pub fn name(&self, id: ParamId) -> &str {
        &self.names[id.0]
    }

    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.values[id.0]
    }

    /// Replaces a parameter's value; the shape must stay the same.
    pub fn set_value(&mut self, id: ParamId, value: Tensor) -> anyhow::Result<()> {
        let name = &self.names[id.0];
        value.expect_shape(&format!("parameter '{name}'"), self.values[id.0].dims())?;
        self.values[id.0] = value;
        Ok(())
    }

    pub fn value_mut(&mut self, id: ParamId) -> &mut Tensor {
        &mut self.values[id.0]
    }

    pub fn grad(&self, id: ParamId) -> Option<&Tensor> {
        self.grads[id.0].as_ref()
    }

    /// The value and gradient of one parameter, for optimizers that update in place.
    pub fn value_and_grad_mut(&mut self, id: ParamId) -> (&mut Tensor, Option<&Tensor>) {
        (&mut self.values[id.0], self.grads[id.0].as_ref())
    }

    pub fn grad_mut(&mut self, id: ParamId) -> Option<&mut Tensor> {
        self.grads[id.0].as_mut()
    }

    /// Adds `g` to the parameter's gradient.
    pub fn accumulate_grad(&mut self, id: ParamId, g: Tensor) -> anyhow::Result<()> {
        let name = &self.names[id.0];
        g.expect_shape(&format!("gradient of '{name}'"), self.values[id.0].dims())?;
        match &mut self.grads[id.0] {
            Some(acc) => add_into(acc, &g),
            slot @ None => *slot = Some(g),
        }
        Ok(())
    }

    /// Forgets every gradient (the next backward starts from zero).
    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }
}

/// `acc += g`, element-wise, for tensors of one shape.
pub(crate) fn add_into(acc: &mut Tensor, g: &Tensor) {
    for (a, b) in acc.data_mut().iter_mut().zip(g.data()) {
        *a += *b;
    }
}
