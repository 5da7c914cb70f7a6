//! The exported form of an optimizer's state and the checks that importing it makes.

use crate::device::op::SgdHyper;
use crate::{ParamStore, Tensor};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An optimizer's state as a checkpoint stores it: one tensor per parameter and state slot, named
/// `<slot>.<parameter>` (e.g. `exp_avg.encoder.stem.conv.weight`), and its kind, hyperparameters
/// and step counts.
#[derive(Clone, Debug)]
pub struct OptimizerState {
    pub tensors: BTreeMap<String, Tensor>,
    pub meta: OptimizerMeta,
}

/// What an optimizer's state records besides its tensors, as JSON tagged by kind:
/// `{"optimizer": "AdamW", "lr": ..., "betas": [...], "eps": ..., "weight_decay": ..., "step": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "optimizer")]
pub enum OptimizerMeta {
    #[serde(rename = "SGD")]
    Sgd(SgdHyper),
    Adam(AdamMeta),
    AdamW(AdamMeta),
}

/// Adam's and AdamW's hyperparameters and each parameter's step count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamMeta {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub step: BTreeMap<String, u64>,
}

impl OptimizerMeta {
    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerMeta::Sgd(_) => "SGD",
            OptimizerMeta::Adam(_) => "Adam",
            OptimizerMeta::AdamW(_) => "AdamW",
        }
    }
}

impl OptimizerState {
    /// The state tensors grouped by parameter, one per entry of `slots` in that order, after
    /// checking that every tensor is named `<slot>.<parameter>` with a known slot and an existing
    /// parameter of the same shape, and that every parameter present has all its slots.
    pub(crate) fn by_param(
        &self,
        params: &ParamStore,
        slots: &[&str],
    ) -> anyhow::Result<BTreeMap<String, Vec<Tensor>>> {
        let mut found: BTreeMap<String, Vec<Option<Tensor>>> = BTreeMap::new();
        for (name, t) in &self.tensors {
            let (slot, param) = name.split_once('.').unwrap_or((name, ""));
            let k = slots.iter().position(|s| *s == slot).with_context(|| {
                format!("optimizer state tensor '{name}': unknown slot '{slot}', expected one of {slots:?}")
            })?;
            let id = params.id(param).with_context(|| {
                format!("optimizer state tensor '{name}': the model has no parameter '{param}'")
            })?;
            t.expect_shape(&format!("optimizer state tensor '{name}'"), params.value(id).dims())?;
            found.entry(param.to_string()).or_insert_with(|| vec![None; slots.len()])[k] = Some(t.clone());
        }
        found
            .into_iter()
            .map(|(param, ts)| {
                let ts = ts
                    .into_iter()
                    .zip(slots)
                    .map(|(t, slot)| {
                        t.with_context(|| format!("optimizer state lacks tensor '{slot}.{param}'"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok((param, ts))
            })
            .collect()
    }
}
