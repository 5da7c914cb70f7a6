//! nnU-Net's initialisation (reference-spec 2.6), deterministic from a seed.

use anyhow::Result;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use super::weights::from_torch;
use crate::arch::params::ParamInit;
use crate::arch::spec::Architecture;
use crate::autograd::ParamStore;
use crate::tensor::Tensor;

/// LeakyReLU slope dynamic_network_architectures passes to kaiming_normal_.
pub const HE_NEG_SLOPE: f64 = 0.01;

/// kaiming_normal_(a=0.01, mode fan_in)'s standard deviation: sqrt(2 / (1 + a^2)) / sqrt(fan_in).
pub fn he_std(fan_in: usize) -> f64 {
    (2.0 / (1.0 + HE_NEG_SLOPE * HE_NEG_SLOPE)).sqrt() / (fan_in as f64).sqrt()
}

/// PyTorch's fan_in of a 5-D weight in its own layout: `shape[1] * prod(kernel)`, which for a
/// transposed conv (C_in, C_out, k...) is C_out * k^3.
pub fn torch_fan_in(torch_shape: &[usize]) -> usize {
    torch_shape[1..].iter().product()
}

/// A fresh store for `arch`: He-normal conv, transposed-conv and squeeze-excitation weights,
/// zero biases, norms gamma 1 and beta 0, except the last norm of every residual block (gamma 0,
/// so each block starts as its shortcut). Weights are drawn in state-dict order and PyTorch's
/// layout from one StdRng, so a seed gives the same weights whatever the layout.
pub fn initialize(arch: &Architecture, seed: u64) -> Result<ParamStore> {
    arch.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut store = ParamStore::new();
    for spec in arch.param_specs() {
        let n = spec.numel();
        let data = match spec.init {
            ParamInit::HeNormal => {
                let normal = Normal::new(0.0, he_std(torch_fan_in(&spec.shape)))?;
                (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
            }
            ParamInit::Zeros => vec![0.0; n],
            ParamInit::Ones => vec![1.0; n],
        };
        let t = Tensor::from_vec(spec.shape.clone(), data)?;
        store.add(&spec.name, from_torch(spec.layout, &t)?)?;
    }
    Ok(store)
}
