//! torch.optim.SGD with momentum and Nesterov (dampening 0).

use super::{Optimizer, OptimizerState, params_with_grads};
use crate::device::cpu::optim::{SgdHyper, sgd_step};
use crate::{ParamStore, Tensor};
use std::collections::BTreeMap;

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

/// Stochastic gradient descent; with momentum, one buffer per parameter, created on its first step.
pub struct Sgd {
    hyper: SgdHyper,
    buffers: BTreeMap<String, Tensor>,
}

impl Sgd {
    pub fn new(hyper: SgdHyper) -> anyhow::Result<Self> {
        hyper.validate()?;
        Ok(Sgd { hyper, buffers: BTreeMap::new() })
    }

    pub fn hyper(&self) -> &SgdHyper {
        &self.hyper
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut ParamStore) -> anyhow::Result<()> {
        let ids = params_with_grads(KIND, params, |name| self.buffers.get(name).map(Tensor::dims))?;
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

    fn export_state(&self) -> OptimizerState {
        let SgdHyper { lr, momentum, nesterov, weight_decay } = self.hyper;
        OptimizerState {
            tensors: self.buffers.iter().map(|(n, b)| (format!("{BUFFER}.{n}"), b.clone())).collect(),
            meta: serde_json::json!({
                "optimizer": KIND, "lr": lr, "momentum": momentum, "nesterov": nesterov,
                "weight_decay": weight_decay,
            }),
        }
    }

    fn import_state(&mut self, params: &ParamStore, state: &OptimizerState) -> anyhow::Result<()> {
        state.expect_kind(KIND)?;
        let hyper = SgdHyper {
            lr: state.meta_value("lr")?,
            momentum: state.meta_value("momentum")?,
            nesterov: state.meta_value("nesterov")?,
            weight_decay: state.meta_value("weight_decay")?,
        };
        hyper.validate()?;
        // Without momentum there are no buffers, so any tensor is an unknown slot.
        let slots: &[&str] = if hyper.momentum == 0.0 { &[] } else { &[BUFFER] };
        let buffers = state.by_param(params, slots)?;
        self.hyper = hyper;
        self.buffers = buffers.into_iter().map(|(n, mut ts)| (n, ts.remove(0))).collect();
        Ok(())
    }
}
