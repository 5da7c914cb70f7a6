//! One training step of any network on any device: its median time, its peak memory beside the
//! planner's estimate, and on a kernel device what one step moves and launches.

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;

use crate::arch::{Architecture, MemoryEstimate};
use crate::autograd::{Graph, ParamStore};
use crate::device::Device;
use crate::device::launch::DeviceCounters;
use crate::loss::{self, DiceCe, LabelResample, Loss};
use crate::model::{Network, init};
use crate::tensor::{Tensor, memory};

/// The cost of one training step.
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchmark {
    pub device: String,
    pub batch_size: usize,
    pub patch: [usize; 3],
    pub reps: usize,
    /// Median wall time of the batch upload, forward, loss and backward, after one warm-up step.
    pub median_secs: f64,
    /// Peak memory during the first step (host tensor storage on the CPU, the device's buffers on
    /// a kernel device): weights, batch, labels, activations, gradients.
    pub peak_bytes: u64,
    /// [`Architecture::training_memory`] for the same step, without optimizer state.
    pub estimate: MemoryEstimate,
    /// The activation factor the peak implies: (peak - weights - gradients - batch data) over
    /// 4 bytes times batch times feature-map size (compare [`crate::arch::size::ACTIVATION_FACTOR`]).
    /// Low where the parameters outweigh the activations: the peak comes before every gradient
    /// exists. The peak difference between two batch sizes measures the factor exactly.
    pub measured_activation_factor: f64,
    /// On a kernel device, what the second step (the steady state) moved and launched.
    pub counters: Option<DeviceCounters>,
}

/// Times one training step (the batch uploaded, forward, nnU-Net's Dice + CE with the
/// architecture's deep supervision on every target, backward) of a freshly initialised `arch` on
/// random data on `device`, and measures its peak memory. Every target needs at least 2 channels
/// (the Dice excludes the background). On the CPU the peak is process-wide: run this with
/// nothing else allocating tensors.
pub fn training_step_benchmark(
    arch: &Architecture,
    device: Device,
    batch_size: usize,
    patch: [usize; 3],
    reps: usize,
    seed: u64,
) -> Result<StepBenchmark> {
    ensure!(batch_size > 0, "training step benchmark: batch size must be positive");
    if let Some(t) = arch.targets.iter().find(|t| t.channels < 2) {
        bail!(
            "training step benchmark: target {:?} has {} channel; Dice + CE needs 2 or more",
            t.name,
            t.channels
        );
    }
    let gpu = device.gpu().with_context(|| format!("device {device}"))?;
    let estimate = arch.training_memory(patch, batch_size, 0)?;
    let mut store = init::initialize(arch, seed)?;
    store.to_device(device)?;
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
        let x = g.constant(input.to_device(device)?);
        let outputs = net.forward(&mut g, store, x)?;
        let terms = outputs
            .iter()
            .zip(&labels)
            .map(|(outs, ls)| {
                let ls = ls.iter().map(|l| l.to_device(device)).collect::<Result<Vec<_>>>()?;
                Ok((loss::deep_supervision(&mut g, &dice_ce, outs, &ls, &weights)?, 1.0))
            })
            .collect::<Result<Vec<_>>>()?;
        let total = loss::weighted_sum(&mut g, &terms)?;
        g.backward(total, store)
    };
    memory::reset_peak();
    if let Some(gpu) = &gpu {
        gpu.reset_peak();
    }
    step(&mut store)?;
    let peak_bytes = match &gpu {
        Some(gpu) => gpu.counters().peak_bytes,
        None => memory::peak_bytes() as u64,
    };
    let counters = match &gpu {
        Some(gpu) => {
            let before = gpu.counters();
            step(&mut store)?;
            Some(gpu.counters().since(&before))
        }
        None => None,
    };
    let mut result = Ok(());
    let median_secs = super::median_secs(reps, || {
        if result.is_ok() {
            result = step(&mut store);
        }
    });
    result?;
    let rest = estimate.weights + estimate.gradients + estimate.batch_data;
    let per_factor = 4.0 * batch_size as f64 * estimate.feature_map_size as f64;
    Ok(StepBenchmark {
        device: device.to_string(),
        batch_size,
        patch,
        reps,
        median_secs,
        peak_bytes,
        estimate,
        measured_activation_factor: peak_bytes.saturating_sub(rest) as f64 / per_factor,
        counters,
    })
}
