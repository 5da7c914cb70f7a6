//! The multi-task residual U-Net: one shared encoder, one decoder per target (the seed's design,
//! reference-spec 1.6 and 2), bound to the parameters of a [`ParamStore`].

use anyhow::{Context, Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;

use super::arch::Architecture;
use super::init;
use super::size::MemoryEstimate;
use crate::autograd::{Graph, ParamStore, Var};
use crate::config::Activation;
use crate::loss::{self, DiceCe, LabelResample, Loss};
use crate::nn::{Decoder, Encoder, LayerSettings};
use crate::ops::activation as act;
use crate::tensor::{Tensor, memory};

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

/// The cost of one CPU training step.
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchmark {
    pub batch_size: usize,
    pub patch: [usize; 3],
    pub reps: usize,
    /// Median wall time of forward, loss and backward, after one warm-up step.
    pub median_secs: f64,
    /// Peak tensor storage during one step: weights, batch, labels, activations, gradients.
    pub peak_bytes: u64,
    /// [`Architecture::training_memory`] for the same step, without optimizer state.
    pub estimate: MemoryEstimate,
    /// The activation factor the peak implies: (peak - weights - gradients - batch data) over
    /// 4 bytes times batch times feature-map size (compare [`super::size::ACTIVATION_FACTOR`]).
    /// Low where the parameters outweigh the activations: the peak comes before every gradient
    /// exists. The peak difference between two batch sizes measures the factor exactly.
    pub measured_activation_factor: f64,
}

/// Times one training step (forward, nnU-Net's Dice + CE with the architecture's deep
/// supervision on every target, backward) of a freshly initialised `arch` on random data and
/// measures its peak memory. Every target needs at least 2 channels (the Dice excludes the
/// background). Peak memory is process-wide: run this with nothing else allocating tensors.
pub fn training_step_benchmark(
    arch: &Architecture,
    batch_size: usize,
    patch: [usize; 3],
    reps: usize,
    seed: u64,
) -> Result<StepBenchmark> {
    ensure!(batch_size > 0, "training step benchmark: batch size must be positive");
    if let Some(t) = arch.targets.iter().find(|t| t.channels < 2) {
        anyhow::bail!(
            "training step benchmark: target {:?} has {} channel; Dice + CE needs 2 or more",
            t.name,
            t.channels
        );
    }
    let estimate = arch.training_memory(patch, batch_size, 0)?;
    let mut store = init::initialize(arch, seed)?;
    let net = Network::new(arch, &store)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let [d, h, w] = patch;
    let voxels = batch_size * d * h * w;
    let input: Vec<f32> = (0..voxels * arch.in_channels).map(|_| rng.sample(StandardNormal)).collect();
    let input = Tensor::from_vec([batch_size, d, h, w, arch.in_channels], input)?;
    let labels = arch
        .targets
        .iter()
        .map(|t| {
            let l: Vec<f32> = (0..voxels).map(|_| rng.random_range(0..t.channels) as f32).collect();
            let l = Tensor::from_vec([batch_size, d, h, w, 1], l)?;
            if arch.deep_supervision {
                loss::deep_supervision_labels(&l, &arch.strides, LabelResample::NearestExact)
            } else {
                Ok(vec![l])
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let weights = loss::deep_supervision_weights(labels[0].len());
    let dice_ce = Loss::DiceCe(DiceCe::default());
    let step = |store: &mut ParamStore| -> Result<()> {
        store.zero_grad();
        let mut g = Graph::new();
        let x = g.constant(input.clone());
        let outputs = net.forward(&mut g, store, x)?;
        let terms = outputs
            .iter()
            .zip(&labels)
            .map(|(outs, ls)| Ok((loss::deep_supervision(&mut g, &dice_ce, outs, ls, &weights)?, 1.0)))
            .collect::<Result<Vec<_>>>()?;
        let total = loss::weighted_sum(&mut g, &terms)?;
        g.backward(total, store)
    };
    memory::reset_peak();
    step(&mut store)?;
    let peak_bytes = memory::peak_bytes() as u64;
    let mut result = Ok(());
    let median_secs = crate::bench::median_secs(reps, || {
        if result.is_ok() {
            result = step(&mut store);
        }
    });
    result?;
    let rest = estimate.weights + estimate.gradients + estimate.batch_data;
    let per_factor = 4.0 * batch_size as f64 * estimate.feature_map_size as f64;
    Ok(StepBenchmark {
        batch_size,
        patch,
        reps,
        median_secs,
        peak_bytes,
        estimate,
        measured_activation_factor: peak_bytes.saturating_sub(rest) as f64 / per_factor,
    })
}
