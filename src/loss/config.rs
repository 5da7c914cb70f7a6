//! `Loss::from_config`: the seed's `loss_fn` names and `loss_kwargs`, validated.

use super::{DiceCe, LabelSmoothing, Loss, Pointwise, Reduction};
use anyhow::{Result, bail};
use serde_json::{Map, Value};

/// Every accepted `loss_fn` name.
pub const LOSS_NAMES: &[&str] = &[
    "BCEDiceLoss",
    "BCEWithLogitsLoss",
    "BCEWithLogitsLossLabelSmoothing",
    "BCEWithLogitsLossZSmooth",
    "BCELoss",
    "CrossEntropyLoss",
    "MSELoss",
    "MaskedCosineLoss",
    "DC_and_CE_loss",
    "DiceCELoss",
    "L1Loss",
    "SmoothL1Loss",
];

/// The kwargs of one loss, checked against the keys it accepts.
struct Kwargs<'a> {
    loss: &'a str,
    map: Map<String, Value>,
}

impl<'a> Kwargs<'a> {
    fn new(loss: &'a str, kwargs: &Value, allowed: &[&str]) -> Result<Self> {
        let map = match kwargs {
            Value::Null => Map::new(),
            Value::Object(m) => m.clone(),
            other => bail!("loss '{loss}': loss_kwargs must be a mapping, got {other}"),
        };
        if let Some(key) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            let valid = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
            bail!("loss '{loss}': unknown kwarg '{key}'; valid kwargs: {valid}");
        }
        Ok(Kwargs { loss, map })
    }

    fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(x),
                _ => bail!("loss '{}': kwarg '{key}' must be a finite number, got {v}", self.loss),
            },
        }
    }

    /// A number in [0, 1] (a smoothing factor).
    fn fraction(&self, key: &str, default: f64) -> Result<f64> {
        let x = self.number(key, default)?;
        if !(0.0..=1.0).contains(&x) {
            bail!("loss '{}': kwarg '{key}' is {x}, expected a value in [0, 1]", self.loss);
        }
        Ok(x)
    }

    fn non_negative(&self, key: &str, default: f64) -> Result<f64> {
        let x = self.number(key, default)?;
        if x < 0.0 {
            bail!("loss '{}': kwarg '{key}' is {x}, expected a value >= 0", self.loss);
        }
        Ok(x)
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => bail!("loss '{}': kwarg '{key}' must be true or false, got {v}", self.loss),
        }
    }

    fn reduction(&self) -> Result<Reduction> {
        match self.map.get("reduction") {
            None => Ok(Reduction::Mean),
            Some(Value::String(s)) if s == "mean" => Ok(Reduction::Mean),
            Some(Value::String(s)) if s == "sum" => Ok(Reduction::Sum),
            Some(v) => bail!(
                "loss '{}': kwarg 'reduction' is {v}; allowed: \"mean\", \"sum\" (training needs a scalar loss)",
                self.loss
            ),
        }
    }
}

/// Builds a loss from its config name and kwargs (a JSON object, or null for none).
pub(super) fn from_config(name: &str, kwargs: &Value) -> Result<Loss> {
    let kw = |allowed: &[&str]| Kwargs::new(name, kwargs, allowed);
    let pointwise =
        |kind: Pointwise| -> Result<Loss> { Ok(Loss::Pointwise(kind, kw(&["reduction"])?.reduction()?)) };
    match name {
        // The seed's BCEDiceLoss has no defaults and crashed without them; 0.5/0.5 is what its
        // examples pass (decisions.md).
        "BCEDiceLoss" => {
            let a = kw(&["alpha", "beta"])?;
            Ok(Loss::BceDice { alpha: a.number("alpha", 0.5)?, beta: a.number("beta", 0.5)? })
        }
        "BCEWithLogitsLoss" => pointwise(Pointwise::BceWithLogits(LabelSmoothing::None)),
        "BCEWithLogitsLossLabelSmoothing" => {
            let a = kw(&["smoothing", "reduction"])?;
            let s = a.fraction("smoothing", 0.1)?;
            Ok(Loss::Pointwise(Pointwise::BceWithLogits(LabelSmoothing::Constant(s)), a.reduction()?))
        }
        "BCEWithLogitsLossZSmooth" => {
            let a = kw(&["center_smoothing", "edge_smoothing", "reduction"])?;
            let center = a.fraction("center_smoothing", 0.1)?;
            let edge = a.fraction("edge_smoothing", 0.4)?;
            Ok(Loss::Pointwise(
                Pointwise::BceWithLogits(LabelSmoothing::ZSlices { center, edge }),
                a.reduction()?,
            ))
        }
        "BCELoss" => pointwise(Pointwise::Bce),
        "CrossEntropyLoss" => Ok(Loss::CrossEntropy(kw(&["reduction"])?.reduction()?)),
        "MSELoss" => pointwise(Pointwise::Mse),
        "L1Loss" => pointwise(Pointwise::L1),
        "SmoothL1Loss" => {
            let a = kw(&["beta", "reduction"])?;
            let beta = a.non_negative("beta", 1.0)?;
            Ok(Loss::Pointwise(Pointwise::SmoothL1 { beta }, a.reduction()?))
        }
        "MaskedCosineLoss" => {
            kw(&[])?;
            Ok(Loss::MaskedCosine)
        }
        "DC_and_CE_loss" | "DiceCELoss" => {
            let a = kw(&["batch_dice", "do_bg", "smooth", "weight_ce", "weight_dice"])?;
            let d = DiceCe::default();
            Ok(Loss::DiceCe(DiceCe {
                batch_dice: a.flag("batch_dice", d.batch_dice)?,
                do_bg: a.flag("do_bg", d.do_bg)?,
                smooth: a.non_negative("smooth", d.smooth)?,
                weight_ce: a.number("weight_ce", d.weight_ce)?,
                weight_dice: a.number("weight_dice", d.weight_dice)?,
            }))
        }
        _ => bail!("unknown loss '{name}'; valid losses: {}", LOSS_NAMES.join(", ")),
    }
}
