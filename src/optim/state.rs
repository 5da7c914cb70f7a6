//! The exported form of an optimizer's state and the checks that importing it makes.

use crate::{ParamStore, Tensor};
use anyhow::Context;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// An optimizer's state as a checkpoint stores it: one tensor per parameter and state slot, named
/// `<slot>.<parameter>` (e.g. `exp_avg.encoder.stem.conv.weight`), and a JSON object with the
/// optimizer kind, its hyperparameters and step counts.
#[derive(Clone, Debug)]
pub struct OptimizerState {
    pub tensors: BTreeMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl OptimizerState {
    /// Fails unless the state was exported by an optimizer of kind `expected`.
    pub(crate) fn expect_kind(&self, expected: &str) -> anyhow::Result<()> {
        let kind: String = self.meta_value("optimizer")?;
        anyhow::ensure!(kind == expected, "optimizer state is for {kind}, but the optimizer is {expected}");
        Ok(())
    }

    /// The metadata entry `key`, deserialised.
    pub(crate) fn meta_value<V: DeserializeOwned>(&self, key: &str) -> anyhow::Result<V> {
        let v = self.meta.get(key).with_context(|| format!("optimizer state metadata lacks '{key}'"))?;
        serde_json::from_value(v.clone())
            .with_context(|| format!("optimizer state metadata '{key}' has the wrong type: {v}"))
    }

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
