//! How big a network is: nnU-Net's VRAM proxy (`compute_conv_feature_map_size`, reference-spec
//! 3.3), nnU-Net ResEncM's batch-size rule (3.4), and unet3d's float32 training-memory estimate.

use std::fmt;

use anyhow::{Result, bail, ensure};
use serde::Serialize;

use super::spec::{Architecture, Block};

/// ResEncM's reference: a network whose feature-map size is 680e6 trains batch 2 in 8 GB.
pub const RESENC_M_REFERENCE_VAL: f64 = 680e6;
pub const REFERENCE_VRAM_GB: f64 = 8.0;
pub const REFERENCE_BATCH_SIZE: f64 = 2.0;
/// nnU-Net never plans a batch below this.
pub const MIN_BATCH_SIZE: usize = 2;

/// float32 values kept per feature-map element (per sample) while training. The feature-map size
/// counts each conv's output once; the tape also keeps what the backward closures read (the
/// norm inputs, the residual sums, the pooled skips, the decoder's concatenations, the loss's
/// buffers), drops every other op output when backward starts, and holds gradients of the skips
/// while it works down. Measured with
/// [`training_step_benchmark`](crate::bench::step::training_step_benchmark) (CPU, float32, Dice + CE
/// with deep supervision; tests/model.rs `measure_training_step`, 2026-12-07) as the peak-memory
/// difference between batch 2 and batch 1, which weights and gradients cancel out of: 2.65 for the
/// model fixture's network (8 to 64 features) at 8x32x32 and 16x64x64, 2.68 for ResEncM at 64^3
/// (5 stages); before the tape dropped unread outputs these were 2.76 and 2.80. At small patches
/// of wide networks the peak falls elsewhere (1.55 for ResEncM at 32^3), so the estimate stays an
/// upper bound there; it excludes allocator fragmentation and kernel workspaces. A kernel device
/// keeps the gradient buffers across steps, so its peak is weights + gradients + activations at
/// every step, which is what the estimate adds up.
pub const ACTIVATION_FACTOR: f64 = 2.7;

const F32_BYTES: u64 = 4;

/// A float32 training-memory estimate, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    pub batch_size: usize,
    pub parameters: u64,
    /// Per-parameter optimizer state tensors: 2 for Adam/AdamW, 1 for SGD with momentum.
    pub optimizer_moments: usize,
    /// nnU-Net's feature-map size of one sample, with this network's deep supervision and targets.
    pub feature_map_size: u64,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer_state: u64,
    /// batch * feature-map size * ACTIVATION_FACTOR float32 values.
    pub activations: u64,
    /// The input batch and one float32 per target channel and voxel (an upper bound for
    /// class-index labels; deep supervision's downsampled targets add under 1/7 and are left out).
    pub batch_data: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer_state + self.activations + self.batch_data
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "{:.2} GiB for batch {} (float32): weights {:.2} + gradients {:.2} + optimizer state {:.2} \
             ({} moments x {} parameters) + activations {:.2} ({} feature-map values x {ACTIVATION_FACTOR} \
             per sample) + batch data {:.2}",
            gib(self.total()),
            self.batch_size,
            gib(self.weights),
            gib(self.gradients),
            gib(self.optimizer_state),
            self.optimizer_moments,
            self.parameters,
            gib(self.activations),
            self.feature_map_size,
            gib(self.batch_data),
        )
    }
}

fn voxels(size: [usize; 3]) -> u64 {
    size.iter().map(|&s| s as u64).product()
}

fn divided(size: [usize; 3], stride: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|d| size[d] / stride[d])
}

impl Architecture {
    /// dynamic_network_architectures' `compute_conv_feature_map_size` for one sample of `patch`:
    /// the summed output sizes (channels x voxels) of the stem, every residual block's convs and
    /// skip, and per target decoder its convs, transposed conv and the heads that run (all with
    /// deep supervision, else the last). Norms and squeeze-excitation are not counted.
    pub fn feature_map_size(&self, patch: [usize; 3]) -> u64 {
        let mut total = self.features_per_stage[0] as u64 * voxels(patch);
        let mut size = patch;
        let mut stage_sizes = vec![patch; self.n_stages()];
        for b in self.encoder_blocks() {
            let after = divided(size, b.stride);
            let (c, v) = (b.out_channels as u64, voxels(after));
            total += match self.block {
                Block::BasicBlockD => 2 * c * v,
                Block::BottleneckD { .. } => {
                    let mid = b.bottleneck_channels.expect("BottleneckD blocks carry their width") as u64;
                    mid * voxels(size) + mid * v + c * v
                }
            };
            if b.in_channels != b.out_channels || after != size {
                total += c * v;
            }
            size = after;
            stage_sizes[b.stage] = after;
        }
        let last = self.n_stages() - 2;
        for t in &self.targets {
            for st in self.decoder_stages() {
                let (c, v) = (st.channels as u64, voxels(stage_sizes[st.skip_stage]));
                total += st.n_convs as u64 * c * v + c * v;
                if self.deep_supervision || st.index == last {
                    total += t.channels as u64 * v;
                }
            }
        }
        total
    }

    /// The float32 training memory for `batch_size` samples of `patch` (see [`MemoryEstimate`]).
    pub fn training_memory(
        &self,
        patch: [usize; 3],
        batch_size: usize,
        optimizer_moments: usize,
    ) -> Result<MemoryEstimate> {
        ensure!(batch_size > 0, "training memory: batch size must be positive");
        self.check_patch(patch)?;
        let parameters = self.param_count();
        let feature_map_size = self.feature_map_size(patch);
        let (activations, batch_data) = self.per_sample_bytes(patch, feature_map_size);
        let b = batch_size as u64;
        Ok(MemoryEstimate {
            batch_size,
            parameters,
            optimizer_moments,
            feature_map_size,
            weights: parameters * F32_BYTES,
            gradients: parameters * F32_BYTES,
            optimizer_state: optimizer_moments as u64 * parameters * F32_BYTES,
            activations: b * activations,
            batch_data: b * batch_data,
        })
    }

    /// The largest batch whose [`training_memory`](Self::training_memory) fits `budget_bytes`.
    pub fn max_batch_size(
        &self,
        patch: [usize; 3],
        budget_bytes: u64,
        optimizer_moments: usize,
    ) -> Result<usize> {
        let one = self.training_memory(patch, 1, optimizer_moments)?;
        let per_sample = one.activations + one.batch_data;
        let fixed = one.total() - per_sample;
        if budget_bytes < one.total() {
            bail!(
                "patch {patch:?} does not fit a memory budget of {:.2} GiB even at batch 1: needs {one}",
                budget_bytes as f64 / (1u64 << 30) as f64
            );
        }
        Ok(((budget_bytes - fixed) / per_sample) as usize)
    }

    /// nnU-Net ResEncM's planned batch size: round(reference * vram / 8 GB / estimate * 2), where
    /// the estimate is the feature-map size without deep supervision (as the planner builds it),
    /// capped by the number of patches in the dataset (`dataset_voxels`, the median shape times the
    /// number of training cases; ResEncM covers the whole dataset) and at least 2.
    pub fn nnunet_batch_size(
        &self,
        patch: [usize; 3],
        vram_target_gb: f64,
        dataset_voxels: Option<u64>,
    ) -> Result<usize> {
        ensure!(
            vram_target_gb.is_finite() && vram_target_gb > 0.0,
            "nnU-Net batch size: VRAM target {vram_target_gb} GB must be positive"
        );
        let planner = Architecture { deep_supervision: false, ..self.clone() };
        let estimate = planner.feature_map_size(patch) as f64;
        let reference = RESENC_M_REFERENCE_VAL * vram_target_gb / REFERENCE_VRAM_GB;
        let mut batch = (reference / estimate * REFERENCE_BATCH_SIZE).round_ties_even();
        if let Some(n) = dataset_voxels {
            batch = batch.min((n as f64 / voxels(patch) as f64).round_ties_even());
        }
        Ok((batch as usize).max(MIN_BATCH_SIZE))
    }

    /// Bytes per sample of activations and of batch data.
    fn per_sample_bytes(&self, patch: [usize; 3], feature_map_size: u64) -> (u64, u64) {
        let activations = (feature_map_size as f64 * ACTIVATION_FACTOR).ceil() as u64 * F32_BYTES;
        let channels = self.in_channels + self.targets.iter().map(|t| t.channels).sum::<usize>();
        (activations, channels as u64 * voxels(patch) * F32_BYTES)
    }
}
