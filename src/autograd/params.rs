//! Named parameters and their accumulated gradients.

use crate::device::{Device, kernels};
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
    /// Device gradients between steps: [`zero_grad`](Self::zero_grad) keeps their buffers here
    /// and the next gradient is copied into them, so parameters, gradients and optimizer state keep
    /// their addresses from step to step (the optimizer's launch tables then stay valid).
    spare: Vec<Option<Tensor>>,
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
        self.spare.push(None);
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

    /// Every parameter's name, value and gradient at once, for optimizers that update all of
    /// them in one launch.
    pub fn entries_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor, Option<&Tensor>)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(&mut self.values)
            .zip(&self.grads)
            .map(|((n, v), g)| (n, v, g.as_ref()))
    }

    /// Scales every gradient by `s` in place (on the gradients' device).
    pub fn scale_grads(&mut self, s: f32) -> anyhow::Result<()> {
        for (name, g) in self.names.iter().zip(&mut self.grads) {
            if let Some(g) = g {
                g.scale_in_place(s, &format!("gradient of '{name}'"))?;
            }
        }
        Ok(())
    }

    pub fn grad_mut(&mut self, id: ParamId) -> Option<&mut Tensor> {
        self.grads[id.0].as_mut()
    }

    /// Adds `g` to the parameter's gradient.
    pub fn accumulate_grad(&mut self, id: ParamId, g: Tensor) -> anyhow::Result<()> {
        let name = &self.names[id.0];
        g.expect_shape(&format!("gradient of '{name}'"), self.values[id.0].dims())?;
        crate::tensor::same_device(&format!("gradient of '{name}'"), &[&self.values[id.0], &g])?;
        match (&mut self.grads[id.0], self.spare[id.0].take()) {
            (Some(acc), _) => add_into(acc, &g)?,
            (slot @ None, Some(mut buf)) if buf.device() == g.device() => {
                copy_into(&mut buf, &g)?;
                *slot = Some(buf);
            }
            (slot @ None, _) => *slot = Some(g),
        }
        Ok(())
    }

    /// Forgets every gradient (the next backward starts from zero); device gradients keep their
    /// buffers for the next step.
    pub fn zero_grad(&mut self) {
        for (g, spare) in self.grads.iter_mut().zip(&mut self.spare) {
            match g.take() {
                Some(t) if t.device() != Device::Cpu => *spare = Some(t),
                _ => {}
            }
        }
    }

    /// The device the parameters live on (the CPU for an empty store).
    pub fn device(&self) -> Device {
        self.values.first().map_or(Device::Cpu, Tensor::device)
    }

    /// The one device every parameter and gradient lives on; an error naming `what` and the first
    /// tensor elsewhere.
    pub fn one_device(&self, what: &str) -> anyhow::Result<Device> {
        let device = self.device();
        let tensors = self.values.iter().map(|v| ("parameter", v)).zip(&self.names);
        let grads = self
            .grads
            .iter()
            .zip(&self.names)
            .filter_map(|(g, n)| g.as_ref().map(|g| (("gradient of", g), n)));
        for ((kind, t), name) in tensors.chain(grads) {
            anyhow::ensure!(
                t.device() == device,
                "{what}: {kind} '{name}' is on {}, the parameters on {device}",
                t.device()
            );
        }
        Ok(device)
    }

    /// Moves every parameter and gradient to `device` (a copy per tensor that is elsewhere).
    pub fn to_device(&mut self, device: Device) -> anyhow::Result<()> {
        for (name, v) in self.names.iter().zip(&mut self.values) {
            *v = v
                .to_device(device)
                .map_err(|e| e.context(format!("moving parameter '{name}' to {device}")))?;
        }
        for (name, g) in self.names.iter().zip(&mut self.grads) {
            if let Some(t) = g {
                *t =
                    t.to_device(device).map_err(|e| e.context(format!("moving the gradient of '{name}'")))?;
            }
        }
        self.spare.iter_mut().for_each(|s| *s = None);
        Ok(())
    }

    /// A copy of the store on the host (what a checkpoint saves).
    pub fn to_host(&self) -> anyhow::Result<ParamStore> {
        let mut host = self.clone();
        host.to_device(Device::Cpu)?;
        Ok(host)
    }
}

/// `acc += g`, element-wise, for tensors of one shape on one device (in place on a kernel device).
pub(crate) fn add_into(acc: &mut Tensor, g: &Tensor) -> anyhow::Result<()> {
    acc.add_assign(g, "gradient accumulation")
}

/// `dst = src` into `dst`'s buffer (same shape and device), so a gradient keeps its buffer.
fn copy_into(dst: &mut Tensor, src: &Tensor) -> anyhow::Result<()> {
    let what = "gradient buffer";
    let n = src.numel();
    let s = src.gpu(what)?;
    let d = dst.gpu_mut(what)?;
    anyhow::ensure!(d.numel() == n, "{what}: {} elements into {}", n, d.numel());
    kernels::elementwise::copy_into(d, s)
}
