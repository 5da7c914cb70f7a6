//! Learning rate as a function of the epoch.

/// A per-epoch learning-rate schedule, applied with `optimizer.set_lr(schedule.lr(lr0, epoch)?)`
/// at the start of each epoch.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr0` throughout.
    Constant,
    /// The seed's CosineAnnealingLR(T_max = max_epochs, eta_min = 0), in closed form:
    /// `lr0 * (1 + cos(pi * e / T)) / 2`; past `T` it rises again, as PyTorch's does.
    Cosine { max_epochs: usize },
    /// nnU-Net's PolyLRScheduler: `lr0 * (1 - e / T)^exponent`, 0 from epoch `T` on.
    Poly { max_epochs: usize, exponent: f64 },
}

impl LrSchedule {
    /// nnU-Net's poly schedule (exponent 0.9).
    pub fn poly(max_epochs: usize) -> Self {
        LrSchedule::Poly { max_epochs, exponent: 0.9 }
    }

    /// The learning rate of `epoch` (counted from 0) for initial rate `initial_lr`.
    pub fn lr(&self, initial_lr: f64, epoch: usize) -> anyhow::Result<f64> {
        let e = epoch as f64;
        Ok(match *self {
            LrSchedule::Constant => initial_lr,
            LrSchedule::Cosine { max_epochs } => {
                anyhow::ensure!(max_epochs > 0, "cosine schedule: max_epochs must be > 0");
                initial_lr * (1.0 + (std::f64::consts::PI * e / max_epochs as f64).cos()) / 2.0
            }
            LrSchedule::Poly { max_epochs, exponent } => {
                anyhow::ensure!(max_epochs > 0, "poly schedule: max_epochs must be > 0");
                anyhow::ensure!(exponent > 0.0, "poly schedule: exponent must be > 0, got {exponent}");
                initial_lr * (1.0 - e / max_epochs as f64).max(0.0).powf(exponent)
            }
        })
    }
}
