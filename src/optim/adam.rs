//! torch.optim.Adam (L2 weight decay) and AdamW (decoupled weight decay).

use super::{AdamMeta, Optimizer, OptimizerMeta, OptimizerState, params_with_grads};
use crate::device::cpu::optim::adam_step;
use crate::device::kernels::optim::{self as kernels, AdamParam, TableCache};
use crate::device::launch::Gpu;
use crate::device::op::AdamHyper;
use crate::{Device, ParamStore, Tensor};
use std::collections::{BTreeMap, HashMap};

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

impl Default for AdamHyper {
    /// The seed's optimizer: AdamW, lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.
    fn default() -> Self {
        AdamHyper { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0, decoupled: true }
    }
}

impl AdamHyper {
    /// "AdamW" or "Adam", the names PyTorch and the seed's config use.
    pub fn kind(&self) -> &'static str {
        if self.decoupled { "AdamW" } else { "Adam" }
    }

    /// The ranges torch.optim.Adam accepts.
    pub fn validate(&self) -> anyhow::Result<()> {
        let AdamHyper { lr, betas: (b1, b2), eps, weight_decay, .. } = *self;
        let kind = self.kind();
        anyhow::ensure!(lr >= 0.0 && lr.is_finite(), "{kind}: invalid learning rate {lr}");
        anyhow::ensure!(eps >= 0.0 && eps.is_finite(), "{kind}: invalid eps {eps}");
        anyhow::ensure!((0.0..1.0).contains(&b1), "{kind}: invalid beta1 {b1}, expected 0 <= beta1 < 1");
        anyhow::ensure!((0.0..1.0).contains(&b2), "{kind}: invalid beta2 {b2}, expected 0 <= beta2 < 1");
        anyhow::ensure!(
            weight_decay >= 0.0 && weight_decay.is_finite(),
            "{kind}: invalid weight_decay {weight_decay}"
        );
        Ok(())
    }
}

/// One parameter's moments and the number of steps it has taken.
struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// Adam or AdamW (after [`AdamHyper::decoupled`]), with bias correction; moments start at zero on
/// a parameter's first step. The moments live on the parameters' device; on a kernel device one
/// launch updates every parameter that has taken the same number of steps.
pub struct Adam {
    hyper: AdamHyper,
    state: BTreeMap<String, Moments>,
    /// One per group of parameters with the same step count (almost always one group).
    tables: Vec<TableCache>,
}

impl Adam {
    pub fn new(hyper: AdamHyper) -> anyhow::Result<Self> {
        hyper.validate()?;
        Ok(Adam { hyper, state: BTreeMap::new(), tables: Vec::new() })
    }

    pub fn hyper(&self) -> &AdamHyper {
        &self.hyper
    }

    /// The step on a kernel device: every parameter with a gradient and its moments (created
    /// already) updated in place, one launch per step count.
    fn device_step(&mut self, gpu: &Gpu, params: &mut ParamStore) -> anyhow::Result<()> {
        let kind = self.hyper.kind();
        let mut moments: HashMap<&str, &mut Moments> =
            self.state.iter_mut().map(|(n, m)| (n.as_str(), m)).collect();
        let mut groups: BTreeMap<u64, Vec<AdamParam<'_>>> = BTreeMap::new();
        for (name, p, g) in params.entries_mut() {
            let Some(g) = g else { continue };
            let what = format!("{kind}: parameter '{name}'");
            let m = moments.remove(name).expect("moments created for every parameter with a gradient");
            m.step += 1;
            groups.entry(m.step).or_default().push(AdamParam {
                param: p.gpu_mut(&what)?.out()?,
                grad: g.gpu(&what)?.buf(),
                exp_avg: m.exp_avg.gpu_mut(&what)?.out()?,
                exp_avg_sq: m.exp_avg_sq.gpu_mut(&what)?.out()?,
            });
        }
        self.tables.resize_with(groups.len(), TableCache::default);
        for ((step, mut group), tables) in groups.into_iter().zip(&mut self.tables) {
            kernels::adam_step(gpu, tables, &mut group, step, &self.hyper)?;
        }
        Ok(())
    }
}

impl Optimizer for Adam {
    fn step(&mut self, params: &mut ParamStore) -> anyhow::Result<()> {
        let (ids, device) =
            params_with_grads(self.hyper.kind(), params, |name| self.state.get(name).map(|s| &s.exp_avg))?;
        for &id in &ids {
            let (name, dims) = (params.name(id), params.value(id).dims());
            if !self.state.contains_key(name) {
                let zeros = || Tensor::zeros_on(dims, device);
                let m = Moments { exp_avg: zeros()?, exp_avg_sq: zeros()?, step: 0 };
                self.state.insert(name.to_string(), m);
            }
        }
        let Some(gpu) = Gpu::of(device)? else {
            for id in ids {
                let s = self.state.get_mut(params.name(id)).expect("created above");
                let (p, g) = params.value_and_grad_mut(id);
                let g = g.expect("checked to have a gradient").data();
                s.step += 1;
                adam_step(
                    p.data_mut(),
                    g,
                    s.exp_avg.data_mut(),
                    s.exp_avg_sq.data_mut(),
                    s.step,
                    &self.hyper,
                );
            }
            return Ok(());
        };
        self.device_step(&gpu, params)
    }

    fn lr(&self) -> f64 {
        self.hyper.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.hyper.lr = lr;
    }

    fn export_state(&self) -> anyhow::Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        for (n, s) in &self.state {
            tensors.insert(format!("{EXP_AVG}.{n}"), s.exp_avg.to_device(Device::Cpu)?);
            tensors.insert(format!("{EXP_AVG_SQ}.{n}"), s.exp_avg_sq.to_device(Device::Cpu)?);
        }
        let step: BTreeMap<String, u64> = self.state.iter().map(|(n, s)| (n.clone(), s.step)).collect();
        let AdamHyper { lr, betas, eps, weight_decay, decoupled } = self.hyper;
        let meta = AdamMeta { lr, betas, eps, weight_decay, step };
        let meta = if decoupled { OptimizerMeta::AdamW(meta) } else { OptimizerMeta::Adam(meta) };
        Ok(OptimizerState { tensors, meta })
    }

    fn import_state(&mut self, params: &ParamStore, state: &OptimizerState) -> anyhow::Result<()> {
        let meta = match (&state.meta, self.hyper.decoupled) {
            (OptimizerMeta::Adam(m), false) | (OptimizerMeta::AdamW(m), true) => m,
            (other, _) => anyhow::bail!(
                "optimizer state is for {}, but the optimizer is {}",
                other.kind(),
                self.hyper.kind()
            ),
        };
        let AdamMeta { lr, betas, eps, weight_decay, .. } = *meta;
        let hyper = AdamHyper { lr, betas, eps, weight_decay, decoupled: self.hyper.decoupled };
        hyper.validate()?;
        let mut steps = meta.step.clone();
        let device = params.one_device("optimizer state")?;
        let mut moments = BTreeMap::new();
        for (name, ts) in state.by_param(params, &[EXP_AVG, EXP_AVG_SQ])? {
            let step = steps.remove(&name).filter(|&s| s >= 1).ok_or_else(|| {
                anyhow::anyhow!("optimizer state: parameter '{name}' has moments but no step count >= 1")
            })?;
            let [exp_avg, exp_avg_sq] = <[Tensor; 2]>::try_from(ts).expect("one tensor per slot");
            let (exp_avg, exp_avg_sq) = (exp_avg.to_device(device)?, exp_avg_sq.to_device(device)?);
            moments.insert(name, Moments { exp_avg, exp_avg_sq, step });
        }
        if let Some(name) = steps.keys().next() {
            anyhow::bail!("optimizer state: parameter '{name}' has a step count but no moments");
        }
        self.hyper = hyper;
        self.state = moments;
        Ok(())
    }
}
