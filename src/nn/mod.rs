//! The layers of the residual U-Net (reference-spec 2). A layer owns no tensors: it holds the
//! [`ParamId`]s of its parameters in a [`ParamStore`], resolved and shape-checked once when it is
//! bound, and its forward records ops on a [`Graph`](crate::Graph). Parameter names are
//! dynamic_network_architectures' state-dict names; the store holds unet3d's layouts (conv
//! (K, T, R, S, C), transposed conv (C_in, T, R, S, C_out)).

mod conv;
mod residual;
mod unet;

pub use conv::{Conv, ConvNormAct, ConvSpec, InstanceNorm, TransposedConv};
pub use residual::{ResidualBlock, ResidualStage, Skip, SqueezeExcite};
pub use unet::{Decoder, DecoderStageLayers, Encoder};

use crate::arch::{Architecture, Nonlin, SePool};
use crate::autograd::{ParamId, ParamStore};
use crate::device::op::Act;
use crate::tensor::Shape;
use anyhow::{Result, ensure};

/// The settings every layer of one network shares, taken from its [`Architecture`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSettings {
    /// Bias on the convs and transposed convs (never on the 1x1 skip projections).
    pub conv_bias: bool,
    pub norm_eps: f64,
    pub norm_affine: bool,
    pub act: Act,
    pub squeeze_excitation: Option<SePool>,
}

impl LayerSettings {
    pub fn of(arch: &Architecture) -> Self {
        LayerSettings {
            conv_bias: arch.conv_bias,
            norm_eps: f64::from(arch.norm.eps),
            norm_affine: arch.norm.affine,
            act: nonlin_act(arch.nonlin),
            squeeze_excitation: arch.squeeze_excitation,
        }
    }
}

/// The activation kernel of a configured nonlinearity.
pub fn nonlin_act(n: Nonlin) -> Act {
    match n {
        Nonlin::LeakyRelu { negative_slope } => Act::LeakyRelu(f64::from(negative_slope)),
        Nonlin::Relu => Act::Relu,
    }
}

/// The parameter `name`, checked to have `shape` (unet3d layout).
fn bind(store: &ParamStore, name: &str, shape: &[usize]) -> Result<ParamId> {
    let id = store.id(name).ok_or_else(|| {
        anyhow::anyhow!(
            "parameter '{name}' (shape {}) is not in the parameter store ({} parameters); \
             initialise or load the weights of this architecture first",
            Shape::new(shape),
            store.len()
        )
    })?;
    let got = store.value(id).dims();
    ensure!(
        got == shape,
        "parameter '{name}' has shape {} in the store, but the layer needs {}",
        Shape::new(got),
        Shape::new(shape)
    );
    Ok(id)
}
