//! torch.optim.SGD with momentum and Nesterov (dampening 0).

use super::{Optimizer, OptimizerMeta, OptimizerState, params_with_grads};
use crate::device::cpu::optim::sgd_step;
use crate::device::kernels::optim::{self as kernels, SgdParam, TableCache};
use crate::device::launch::Gpu;
use crate::device::op::SgdHyper;
use crate::{Device, ParamStore, Tensor};
use std::collections::{BTreeMap, HashMap};

const KIND: &str = "SGD";
const BUFFER: &str = "momentum_buffer";

impl Default for SgdHyper {
    /// nnU-Net's recipe: lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5.
    fn default() -> Self {
        SgdHyper { lr: 1e-2, momentum: 0.99, nesterov: true, weight_decay: 3e-5 }
    }
}

impl SgdHyper {
    /// The ranges torch.optim.SGD accepts.
    pub fn validate(&self) -> anyhow::Result<()> {
        let SgdHyper { lr, momentum, nesterov, weight_decay } = *self;
        anyhow::ensure!(lr >= 0.0 && lr.is_finite(), "SGD: invalid learning rate {lr}");
        anyhow::ensure!(momentum >= 0.0 && momentum.is_finite(), "SGD: invalid momentum {momentum}");
        anyhow::ensure!(
            weight_decay >= 0.0 && weight_decay.is_finite(),
            "SGD: invalid weight_decay {weight_decay}"
        );
        anyhow::ensure!(!nesterov || momentum > 0.0, "SGD: Nesterov momentum requires a momentum > 0");
        Ok(())
    }
}

/// Stochastic gradient descent; with momentum, one buffer per parameter, created on its first step
/// on the parameters' device. On a kernel device one launch updates the parameters stepping for
/// the first time and one the others.
pub struct Sgd {
    hyper: SgdHyper,
    buffers: BTreeMap<String, Tensor>,
    /// The launch tables of the [later, first] steps.
    tables: [TableCache; 2],
}

impl Sgd {
    pub fn new(hyper: SgdHyper) -> anyhow::Result<Self> {
        hyper.validate()?;
        Ok(Sgd { hyper, buffers: BTreeMap::new(), tables: Default::default() })
    }

    pub fn hyper(&self) -> &SgdHyper {
        &self.hyper
    }

    /// The step on a kernel device, every parameter with a gradient updated in place.
    fn device_step(&mut self, gpu: &Gpu, params: &mut ParamStore, device: Device) -> anyhow::Result<()> {
        let momentum = self.hyper.momentum != 0.0;
        let mut first = std::collections::HashSet::new();
        if momentum {
            for id in params.ids() {
                let (name, p) = (params.name(id), params.value(id));
                if params.grad(id).is_some() && !self.buffers.contains_key(name) {
                    self.buffers.insert(name.to_string(), Tensor::zeros_on(p.dims(), device)?);
                    first.insert(name.to_string());
                }
            }
        }
        let mut buffers: HashMap<&str, &mut Tensor> =
            self.buffers.iter_mut().map(|(n, b)| (n.as_str(), b)).collect();
        let mut groups: [Vec<SgdParam<'_>>; 2] = Default::default();
        for (name, p, g) in params.entries_mut() {
            let Some(g) = g else { continue };
            let what = format!("{KIND}: parameter '{name}'");
            let momentum = match momentum {
                true => {
                    Some(buffers.remove(name).expect("a buffer for every parameter").gpu_mut(&what)?.out()?)
                }
                false => None,
            };
            let param = SgdParam { param: p.gpu_mut(&what)?.out()?, grad: g.gpu(&what)?.buf(), momentum };
            groups[usize::from(first.contains(name))].push(param);
        }
        for (i, (group, tables)) in groups.iter_mut().zip(&mut self.tables).enumerate() {
            if !group.is_empty() {
                kernels::sgd_step(gpu, tables, group, &self.hyper, i == 1)?;
            }
        }
        Ok(())
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut ParamStore) -> anyhow::Result<()> {
        let (ids, device) = params_with_grads(KIND, params, |name| self.buffers.get(name))?;
        if let Some(gpu) = Gpu::of(device)? {
            return self.device_step(&gpu, params, device);
        }
        for id in ids {
            let name = params.name(id).to_string();
            let (p, g) = params.value_and_grad_mut(id);
            let g = g.expect("checked to have a gradient").data();
            if self.hyper.momentum == 0.0 {
                sgd_step(p.data_mut(), g, None, false, &self.hyper);
            } else {
                let first = !self.buffers.contains_key(&name);
                let buf = self.buffers.entry(name).or_insert_with(|| Tensor::zeros(p.dims()));
                sgd_step(p.data_mut(), g, Some(buf.data_mut()), first, &self.hyper);
            }
        }
        Ok(())
    }

    fn lr(&self) -> f64 {
        self.hyper.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.hyper.lr = lr;
    }

    fn export_state(&self) -> anyhow::Result<OptimizerState> {
        let tensors = self
            .buffers
            .iter()
            .map(|(n, b)| Ok((format!("{BUFFER}.{n}"), b.to_device(Device::Cpu)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(OptimizerState { tensors, meta: OptimizerMeta::Sgd(self.hyper) })
    }

    fn import_state(&mut self, params: &ParamStore, state: &OptimizerState) -> anyhow::Result<()> {
        let OptimizerMeta::Sgd(hyper) = state.meta else {
            anyhow::bail!("optimizer state is for {}, but the optimizer is {KIND}", state.meta.kind());
        };
        hyper.validate()?;
        // Without momentum there are no buffers, so any tensor is an unknown slot.
        let slots: &[&str] = if hyper.momentum == 0.0 { &[] } else { &[BUFFER] };
        let device = params.one_device("optimizer state")?;
        let buffers = state
            .by_param(params, slots)?
            .into_iter()
            .map(|(n, mut ts)| Ok((n, ts.remove(0).to_device(device)?)))
            .collect::<anyhow::Result<_>>()?;
        self.hyper = hyper;
        self.buffers = buffers;
        Ok(())
    }
}
