//! Convolutions and the conv-norm-act unit (dynamic_network_architectures' ConvDropoutNormReLU
//! without dropout; its `all_modules.*` names are aliases of `conv.*` and `norm.*`).

use super::{LayerSettings, bind};
use crate::arch::params::names;
use crate::autograd::{Graph, ParamId, ParamStore, Var};
use crate::device::op::Act;
use crate::ops::{conv, norm};
use crate::tensor::Tensor;
use anyhow::{Context, Result};

/// What a conv computes: channels in and out, kernel, stride, and whether it has a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub bias: bool,
}

impl ConvSpec {
    /// A 1x1x1 stride-1 conv (heads, skip projections, squeeze-excitation).
    pub fn pointwise(cin: usize, cout: usize, bias: bool) -> Self {
        ConvSpec { cin, cout, kernel: [1; 3], stride: [1; 3], bias }
    }
}

/// A 3D convolution with "same" padding: `{prefix}.weight` (K, T, R, S, C) and `{prefix}.bias` (K).
#[derive(Debug, Clone)]
pub struct Conv {
    name: String,
    weight: ParamId,
    bias: Option<ParamId>,
    stride: [usize; 3],
}

impl Conv {
    pub fn bind(store: &ParamStore, prefix: &str, spec: ConvSpec) -> Result<Self> {
        let ConvSpec { cin, cout, kernel: [t, r, s], stride, bias } = spec;
        let weight = bind(store, &names::weight(prefix), &[cout, t, r, s, cin])?;
        let bias = bias.then(|| bind(store, &names::bias(prefix), &[cout])).transpose()?;
        Ok(Conv { name: prefix.to_string(), weight, bias, stride })
    }

    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        let w = g.param(store, self.weight);
        let b = self.bias.map(|b| g.param(store, b));
        conv::conv3d(g, x, w, b, self.stride).with_context(|| format!("layer {}", self.name))
    }
}

/// The decoder's upsampling: a transposed conv with kernel = stride, `{prefix}.weight`
/// (C_in, T, R, S, C_out) and `{prefix}.bias` (C_out).
#[derive(Debug, Clone)]
pub struct TransposedConv {
    name: String,
    weight: ParamId,
    bias: Option<ParamId>,
    stride: [usize; 3],
}

impl TransposedConv {
    pub fn bind(
        store: &ParamStore,
        prefix: &str,
        channels: [usize; 2],
        stride: [usize; 3],
        bias: bool,
    ) -> Result<Self> {
        let [cin, cout] = channels;
        let weight = bind(store, &names::weight(prefix), &[cin, stride[0], stride[1], stride[2], cout])?;
        let bias = bias.then(|| bind(store, &names::bias(prefix), &[cout])).transpose()?;
        Ok(TransposedConv { name: prefix.to_string(), weight, bias, stride })
    }

    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        let w = g.param(store, self.weight);
        let b = self.bias.map(|b| g.param(store, b));
        conv::conv_transpose3d(g, x, w, b, self.stride).with_context(|| format!("layer {}", self.name))
    }
}

/// Instance norm fused with an activation: `{prefix}.weight` and `{prefix}.bias` (C) when affine,
/// otherwise the identity affine (gamma 1, beta 0) as a constant.
#[derive(Debug, Clone)]
pub struct InstanceNorm {
    name: String,
    affine: Option<(ParamId, ParamId)>,
    channels: usize,
    eps: f64,
    act: Act,
}

impl InstanceNorm {
    pub fn bind(
        store: &ParamStore,
        prefix: &str,
        channels: usize,
        s: &LayerSettings,
        act: Act,
    ) -> Result<Self> {
        let affine = if s.norm_affine {
            let gamma = bind(store, &names::weight(prefix), &[channels])?;
            Some((gamma, bind(store, &names::bias(prefix), &[channels])?))
        } else {
            None
        };
        Ok(InstanceNorm { name: prefix.to_string(), affine, channels, eps: s.norm_eps, act })
    }

    /// The affine parameters, or the identity affine made on `x`'s device.
    fn affine(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<(Var, Var)> {
        Ok(match self.affine {
            Some((gamma, beta)) => (g.param(store, gamma), g.param(store, beta)),
            None => {
                let device = g.value(x).device();
                let ones = Tensor::full_on([self.channels], 1.0, device)?;
                (g.constant(ones), g.constant(Tensor::zeros_on([self.channels], device)?))
            }
        })
    }

    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        let (gamma, beta) = self.affine(g, store, x)?;
        norm::instance_norm_act(g, x, gamma, beta, self.eps, self.act)
            .with_context(|| format!("layer {}", self.name))
    }

    /// `act(norm(x) + residual)`: the norm's own activation must be none (a residual branch's
    /// last norm); fused into one kernel pass on a kernel device.
    pub fn forward_add_act(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        x: Var,
        residual: Var,
        act: Act,
    ) -> Result<Var> {
        debug_assert_eq!(self.act, Act::None, "a residual branch's last norm has no activation of its own");
        let (gamma, beta) = self.affine(g, store, x)?;
        norm::instance_norm_add_act(g, x, gamma, beta, self.eps, residual, act)
            .with_context(|| format!("layer {} with the residual", self.name))
    }
}

/// conv -> instance norm -> activation (`Act::None` for the last conv of a residual branch and
/// the skip projection): `{prefix}.conv.*` and `{prefix}.norm.*`.
#[derive(Debug, Clone)]
pub struct ConvNormAct {
    pub(super) conv: Conv,
    pub(super) norm: InstanceNorm,
}

impl ConvNormAct {
    pub fn bind(
        store: &ParamStore,
        prefix: &str,
        spec: ConvSpec,
        s: &LayerSettings,
        act: Act,
    ) -> Result<Self> {
        let conv = Conv::bind(store, &names::conv(prefix), spec)?;
        let norm = InstanceNorm::bind(store, &names::norm(prefix), spec.cout, s, act)?;
        Ok(ConvNormAct { conv, norm })
    }

    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
        let y = self.conv.forward(g, store, x)?;
        self.norm.forward(g, store, y)
    }
}
