//! The multi-task residual U-Net: one shared encoder, one decoder per target (the seed's design,
//! reference-spec 1.6 and 2), bound to the parameters of a [`ParamStore`].

use anyhow::{Context, Result, ensure};

use crate::arch::spec::Architecture;
use crate::autograd::{Graph, ParamStore, Var};
use crate::config::Activation;
use crate::nn::{Decoder, Encoder, LayerSettings};
use crate::ops::activation as act;
use crate::tensor::Tensor;

/// The network of an [`Architecture`], holding the ids of its parameters in one store.
#[derive(Debug, Clone)]
pub struct Network {
    arch: Architecture,
    encoder: Encoder,
    decoders: Vec<Decoder>,
}

impl Network {
    /// Binds every layer of `arch` to its parameters in `store` (see [`init::initialize`] and
    /// [`super::weights::load`]); a missing or misshapen parameter is an error naming it.
    pub fn new(arch: &Architecture, store: &ParamStore) -> Result<Self> {
        arch.validate()?;
        let s = LayerSettings::of(arch);
        let encoder = Encoder::bind(store, arch, &s)?;
        let decoders =
            (0..arch.targets.len()).map(|t| Decoder::bind(store, arch, t, &s)).collect::<Result<Vec<_>>>()?;
        Ok(Network { arch: arch.clone(), encoder, decoders })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The training forward of a channels-last batch (N, D, H, W, C_in): per target (in
    /// `targets` order) its logits, every deep-supervision scale full resolution first when
    /// the architecture has deep supervision, else the full-resolution output only.
    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Vec<Vec<Var>>> {
        self.forward_heads(g, store, x, self.arch.deep_supervision)
    }

    /// [`forward`](Self::forward) with deep supervision chosen by the caller (validation and
    /// inference need the full-resolution head only).
    pub fn forward_heads(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        x: Var,
        deep_supervision: bool,
    ) -> Result<Vec<Vec<Var>>> {
        let [_, d, h, w, c] = g.shape(x).ndhwc().context("network input")?;
        ensure!(
            c == self.arch.in_channels,
            "network input of shape {} has {c} channels, the network takes {}",
            g.shape(x),
            self.arch.in_channels
        );
        self.arch.check_patch([d, h, w]).with_context(|| format!("network input of shape {}", g.shape(x)))?;
        let skips = self.encoder.forward(g, store, x)?;
        self.decoders.iter().map(|dec| dec.forward(g, store, &skips, deep_supervision)).collect()
    }

    /// Inference: the full-resolution output of each target with its activation applied
    /// (`activations` in `targets` order), without recording anything for backward.
    pub fn predict(&self, store: &ParamStore, x: &Tensor, activations: &[Activation]) -> Result<Vec<Tensor>> {
        ensure!(
            activations.len() == self.arch.targets.len(),
            "predict: {} activations for {} targets",
            activations.len(),
            self.arch.targets.len()
        );
        let mut g = Graph::no_grad();
        let xv = g.constant(x.clone());
        let outputs = self.forward_heads(&mut g, store, xv, false)?;
        outputs
            .into_iter()
            .zip(activations)
            .map(|(heads, &a)| {
                let y = apply_activation(&mut g, heads[0], a)?;
                Ok(g.value(y).clone())
            })
            .collect()
    }
}

/// A target's output activation (softmax over the channel axis).
pub fn apply_activation(g: &mut Graph, logits: Var, activation: Activation) -> Result<Var> {
    match activation {
        Activation::None => Ok(logits),
        Activation::Sigmoid => act::sigmoid(g, logits),
        Activation::Softmax => act::softmax(g, logits),
    }
}
