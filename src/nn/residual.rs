//! ResNet-D residual blocks (dynamic_network_architectures' BasicBlockD and BottleneckD),
//! squeeze-excitation, and the stages of blocks the encoder is made of.

use super::LayerSettings;
use super::conv::{Conv, ConvNormAct, ConvSpec};
use crate::arch::params::names;
use crate::arch::{EncoderBlock, SePool, se_reduced_channels};
use crate::autograd::{Graph, ParamStore, Var};
use crate::device::op::Act;
use crate::ops::{activation, elementwise, pool, reduce};
use anyhow::{Context, Result};

/// Squeeze-excitation: mean over the pooled axes, 1x1 conv down to `se_reduced_channels(C)`,
/// ReLU, 1x1 conv back up, sigmoid, and the input scaled by that gate. `{prefix}.fc1.*`,
/// `{prefix}.fc2.*` are 1x1x1 convs with bias, as in PyTorch.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    fc1: Conv,
    fc2: Conv,
    pool: SePool,
}

impl SqueezeExcite {
    pub fn bind(store: &ParamStore, prefix: &str, channels: usize, pool: SePool) -> Result<Self> {
        let rd = se_reduced_channels(channels);
        let fc1 = Conv::bind(store, &names::se_fc(prefix, 1), ConvSpec::pointwise(channels, rd, true))?;
        let fc2 = Conv::bind(store, &names::se_fc(prefix, 2), ConvSpec::pointwise(rd, channels, true))?;
        Ok(SqueezeExcite { fc1, fc2, pool })
    }

    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        let axes: &[usize] = match self.pool {
            SePool::Dhw => &[1, 2, 3],
            SePool::Dh => &[1, 2],
        };
        let s = reduce::mean_axes(g, x, axes)?;
        let h = self.fc1.forward(g, store, s)?;
        let h = activation::relu(g, h)?;
        let h = self.fc2.forward(g, store, h)?;
        let gate = activation::sigmoid(g, h)?;
        elementwise::mul(g, x, gate)
    }
}

/// The ResNet-D shortcut: identity, or average pooling (kernel = stride) when the block is
/// strided, then a bias-free 1x1 conv + norm when the width changes (`{prefix}.{0|1}.*`: the
/// projection's index in PyTorch's Sequential follows the pool).
#[derive(Debug, Clone)]
pub struct Skip {
    pool: Option<[usize; 3]>,
    projection: Option<ConvNormAct>,
}

impl Skip {
    pub fn bind(store: &ParamStore, prefix: &str, b: &EncoderBlock, s: &LayerSettings) -> Result<Self> {
        let pool = b.skip_pools().then_some(b.stride);
        let projection = if b.skip_projects() {
            let name = names::skip_projection(prefix, pool.is_some());
            let spec = ConvSpec::pointwise(b.in_channels, b.out_channels, false);
            Some(ConvNormAct::bind(store, &name, spec, s, Act::None)?)
        } else {
            None
        };
        Ok(Skip { pool, projection })
    }

    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        let x = match self.pool {
            Some(k) => pool::avg_pool3d(g, x, k)?,
            None => x,
        };
        match &self.projection {
            Some(p) => p.forward(g, store, x),
            None => Ok(x),
        }
    }
}

/// One residual block: a branch of conv-norm-acts whose last has no activation, optional
/// squeeze-excitation on the branch, the shortcut added, then the activation.
/// BasicBlockD's branch is `conv1` (k, strided), `conv2` (k); BottleneckD's is `conv1` (1x1 to
/// the bottleneck width), `conv2` (k, strided), `conv3` (1x1 back up).
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    name: String,
    branch: Vec<ConvNormAct>,
    se: Option<SqueezeExcite>,
    skip: Skip,
    act: Act,
}

impl ResidualBlock {
    /// The branch of block `b` under `prefix`: each conv's parameter name, spec and activation
    /// (none on the last).
    pub fn branch_convs(prefix: &str, b: &EncoderBlock, s: &LayerSettings) -> Vec<(String, ConvSpec, Act)> {
        let (cin, cout, bias) = (b.in_channels, b.out_channels, s.conv_bias);
        let conv = |cin, cout, kernel, stride| ConvSpec { cin, cout, kernel, stride, bias };
        let specs = match b.bottleneck_channels {
            None => vec![conv(cin, cout, b.kernel, b.stride), conv(cout, cout, b.kernel, [1; 3])],
            Some(mid) => vec![
                conv(cin, mid, [1; 3], [1; 3]),
                conv(mid, mid, b.kernel, b.stride),
                conv(mid, cout, [1; 3], [1; 3]),
            ],
        };
        let last = specs.len() - 1;
        specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| (names::branch_conv(prefix, i), spec, if i == last { Act::None } else { s.act }))
            .collect()
    }

    /// Binds block `b` under `prefix` (`encoder.stages.<s>.blocks.<i>`); a block with a
    /// bottleneck width is a BottleneckD, otherwise a BasicBlockD.
    pub fn bind(store: &ParamStore, prefix: &str, b: &EncoderBlock, s: &LayerSettings) -> Result<Self> {
        let cout = b.out_channels;
        let branch = Self::branch_convs(prefix, b, s)
            .into_iter()
            .map(|(name, spec, act)| ConvNormAct::bind(store, &name, spec, s, act))
            .collect::<Result<Vec<_>>>()?;
        let se = s
            .squeeze_excitation
            .map(|pool| SqueezeExcite::bind(store, &names::squeeze_excitation(prefix), cout, pool))
            .transpose()?;
        let skip = Skip::bind(store, &names::skip(prefix), b, s)?;
        Ok(ResidualBlock { name: prefix.to_string(), branch, se, skip, act: s.act })
    }

    /// Without squeeze-excitation the last norm, the residual add and the activation are one op
    /// (one fused kernel on a kernel device); SE sits between the norm and the add.
    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        let (last, convs) = self.branch.split_last().expect("a residual branch has at least two convs");
        let mut y = x;
        for c in convs {
            y = c.forward(g, store, y)?;
        }
        let skip = self.skip.forward(g, store, x)?;
        let Some(se) = &self.se else {
            let y = last.conv.forward(g, store, y)?;
            return last.norm.forward_add_act(g, store, y, skip, self.act);
        };
        let y = last.forward(g, store, y)?;
        let y = se.forward(g, store, y)?;
        let sum = elementwise::add(g, y, skip).with_context(|| format!("residual add of {}", self.name))?;
        activation::activation(g, sum, self.act)
    }
}

/// A stage of residual blocks, the first carrying the stage's stride.
#[derive(Debug, Clone)]
pub struct ResidualStage {
    blocks: Vec<ResidualBlock>,
}

impl ResidualStage {
    pub fn new(blocks: Vec<ResidualBlock>) -> Self {
        ResidualStage { blocks }
    }

    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        self.blocks.iter().try_fold(x, |x, b| b.forward(g, store, x))
    }
}
