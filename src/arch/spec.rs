//! The description of a residual-encoder U-Net: one shared encoder, one decoder per target
//! (reference-spec 2, decisions.md "Model"), built by nnU-Net ResEncM's autoconfigure or from
//! explicit per-stage values.

use std::collections::HashSet;

use crate::device::op::SePool;
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::plan::{self, MAX_NUMPOOL, MIN_FEATURE_MAP_SIZE};

/// The residual block of the encoder stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Block {
    /// conv-norm-act, conv-norm, (+SE), + ResNet-D skip, act.
    BasicBlockD,
    /// 1x1 down to `bottleneck_channels[stage]`, kxk with the stride, 1x1 up, (+SE), + skip, act.
    BottleneckD { bottleneck_channels: Vec<usize> },
}

/// Instance normalisation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Norm {
    pub eps: f32,
    pub affine: bool,
}

impl Default for Norm {
    fn default() -> Self {
        Norm { eps: 1e-5, affine: true }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nonlin {
    LeakyRelu { negative_slope: f32 },
    Relu,
}

impl Default for Nonlin {
    fn default() -> Self {
        Nonlin::LeakyRelu { negative_slope: 0.01 }
    }
}

/// One output head: a decoder of its own with `channels` outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub channels: usize,
}

impl Target {
    pub fn new(name: &str, channels: usize) -> Self {
        Target { name: name.to_string(), channels }
    }
}

/// A fully resolved network: every per-stage list has one entry per encoder stage
/// (`n_conv_per_stage_decoder` one per decoder stage, deepest first, as in
/// dynamic_network_architectures). Deserialised descriptions should be checked with `validate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    pub in_channels: usize,
    pub features_per_stage: Vec<usize>,
    pub strides: Vec<[usize; 3]>,
    pub kernel_sizes: Vec<[usize; 3]>,
    pub n_blocks_per_stage: Vec<usize>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub block: Block,
    /// None: no squeeze-excitation; otherwise SE in every encoder residual block.
    pub squeeze_excitation: Option<SePool>,
    /// Bias on every conv and transposed conv except the 1x1 skip projections (never biased)
    /// and the 1x1 heads (always biased).
    pub conv_bias: bool,
    pub norm: Norm,
    pub nonlin: Nonlin,
    pub deep_supervision: bool,
    pub targets: Vec<Target>,
}

/// One residual block of the encoder, as the network builder and the size walks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderBlock {
    pub stage: usize,
    pub index: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Inner width of a BottleneckD block; None for BasicBlockD.
    pub bottleneck_channels: Option<usize>,
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
}

impl EncoderBlock {
    /// ResNet-D skip: average pooling when strided.
    pub fn skip_pools(&self) -> bool {
        self.stride != [1; 3]
    }

    /// ResNet-D skip: 1x1 conv + norm when the width changes.
    pub fn skip_projects(&self) -> bool {
        self.in_channels != self.out_channels
    }
}

/// One decoder stage, deepest first: upsample the stage below, concatenate the skip, convolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderStage {
    pub index: usize,
    /// The encoder stage whose output is the skip input (and whose resolution this stage has).
    pub skip_stage: usize,
    pub below_channels: usize,
    pub channels: usize,
    /// Kernel and stride of the transposed convolution.
    pub upsample: [usize; 3],
    pub kernel: [usize; 3],
    pub n_convs: usize,
}

impl Architecture {
    pub fn n_stages(&self) -> usize {
        self.features_per_stage.len()
    }

    /// Product of the strides per axis: every patch must be a multiple of it.
    pub fn must_divide(&self) -> [usize; 3] {
        self.strides.iter().fold([1; 3], |acc, s| std::array::from_fn(|d| acc[d] * s[d]))
    }

    /// Checks every length and value; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let n = self.n_stages();
        ensure!(
            n >= 2,
            "features_per_stage has {n} entries: a U-Net needs at least 2 stages (one pooling); \
             a patch too small to pool gives 1"
        );
        ensure!(self.in_channels > 0, "in_channels must be positive");
        let lengths = [
            ("strides", self.strides.len(), n),
            ("kernel_sizes", self.kernel_sizes.len(), n),
            ("n_blocks_per_stage", self.n_blocks_per_stage.len(), n),
            ("n_conv_per_stage_decoder", self.n_conv_per_stage_decoder.len(), n - 1),
        ];
        for (key, got, want) in lengths {
            ensure!(got == want, "{key} has {got} entries, but a {n}-stage network needs {want}");
        }
        positive("features_per_stage", &self.features_per_stage)?;
        positive("n_blocks_per_stage", &self.n_blocks_per_stage)?;
        positive("n_conv_per_stage_decoder", &self.n_conv_per_stage_decoder)?;
        for (s, st) in self.strides.iter().enumerate() {
            ensure!(st.iter().all(|&x| x > 0), "strides[{s}] = {st:?} must be positive");
        }
        for (s, k) in self.kernel_sizes.iter().enumerate() {
            ensure!(
                k.iter().all(|&x| x % 2 == 1),
                "kernel_sizes[{s}] = {k:?}: kernel sizes must be odd so that 'same' padding keeps the size"
            );
        }
        if let Block::BottleneckD { bottleneck_channels } = &self.block {
            let got = bottleneck_channels.len();
            ensure!(got == n, "bottleneck_channels has {got} entries, but a {n}-stage network needs {n}");
            positive("bottleneck_channels", bottleneck_channels)?;
        }
        ensure!(
            self.norm.eps.is_finite() && self.norm.eps > 0.0,
            "norm eps {} must be positive and finite",
            self.norm.eps
        );
        if let Nonlin::LeakyRelu { negative_slope } = self.nonlin {
            ensure!(negative_slope.is_finite(), "nonlin negative_slope {negative_slope} must be finite");
        }
        ensure!(!self.targets.is_empty(), "targets: a network needs at least one target");
        let mut seen = HashSet::new();
        for t in &self.targets {
            ensure!(
                !t.name.is_empty() && !t.name.contains('.'),
                "target name {:?} must be non-empty and free of '.' (it is part of parameter names)",
                t.name
            );
            ensure!(seen.insert(&t.name), "target {:?} appears twice", t.name);
            ensure!(t.channels > 0, "target {:?} has 0 channels", t.name);
        }
        Ok(())
    }

    /// Errors unless the strides divide `patch` on every axis, proposing the nearest valid sizes.
    pub fn check_patch(&self, patch: [usize; 3]) -> Result<()> {
        let must = self.must_divide();
        check_divisible(patch, must, "the product of the strides", |_| must)
    }

    /// The encoder's residual blocks in order.
    pub fn encoder_blocks(&self) -> impl Iterator<Item = EncoderBlock> + '_ {
        (0..self.n_stages()).flat_map(move |s| {
            let out = self.features_per_stage[s];
            let first_in = if s == 0 { out } else { self.features_per_stage[s - 1] };
            let mid = match &self.block {
                Block::BasicBlockD => None,
                Block::BottleneckD { bottleneck_channels } => Some(bottleneck_channels[s]),
            };
            (0..self.n_blocks_per_stage[s]).map(move |b| EncoderBlock {
                stage: s,
                index: b,
                in_channels: if b == 0 { first_in } else { out },
                out_channels: out,
                bottleneck_channels: mid,
                kernel: self.kernel_sizes[s],
                stride: if b == 0 { self.strides[s] } else { [1; 3] },
            })
        })
    }

    /// The decoder stages of one target, deepest first (the order of parameter indices).
    pub fn decoder_stages(&self) -> impl Iterator<Item = DecoderStage> + '_ {
        let n = self.n_stages();
        (0..n - 1).map(move |i| {
            let below = n - 1 - i;
            let skip = below - 1;
            DecoderStage {
                index: i,
                skip_stage: skip,
                below_channels: self.features_per_stage[below],
                channels: self.features_per_stage[skip],
                upsample: self.strides[below],
                kernel: self.kernel_sizes[skip],
                n_convs: self.n_conv_per_stage_decoder[i],
            }
        })
    }
}

fn positive(key: &str, values: &[usize]) -> Result<()> {
    match values.iter().position(|&v| v == 0) {
        Some(i) => bail!("{key}[{i}] is 0; every entry must be positive"),
        None => Ok(()),
    }
}

/// The divisibility error with proposals; `must_divide_for` gives the divisor of a proposal.
fn check_divisible(
    patch: [usize; 3],
    must: [usize; 3],
    what: &str,
    must_divide_for: impl Fn([usize; 3]) -> [usize; 3],
) -> Result<()> {
    if (0..3).all(|d| patch[d] > 0 && patch[d].is_multiple_of(must[d])) {
        return Ok(());
    }
    let (down, up) = plan::nearest_valid_patches(patch, must_divide_for);
    let proposals: Vec<String> = [down, up].into_iter().flatten().map(|p| format!("{p:?}")).collect();
    bail!(
        "patch size {patch:?} is not divisible by {what} {must:?} on every axis; nearest valid patch sizes: {}",
        if proposals.is_empty() { "none".to_string() } else { proposals.join(" or ") }
    )
}

/// A value given once for every stage or once per stage. In serialised form a list is always per
/// stage, so `[1, 2, 2]` for strides means three isotropic stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerStage<T> {
    Each(Vec<T>),
    All(T),
}

impl<T: Clone> PerStage<T> {
    /// `n` values; a list must have exactly `n` entries. `need` says why, after "needs {n}: ".
    pub fn resolve(&self, key: &str, n: usize, need: &str) -> Result<Vec<T>> {
        match self {
            PerStage::All(v) => Ok(vec![v.clone(); n]),
            PerStage::Each(v) if v.len() == n => Ok(v.clone()),
            PerStage::Each(v) => bail!("model_config.{key} has {} entries but needs {n}: {need}", v.len()),
        }
    }

    fn len(&self) -> Option<usize> {
        match self {
            PerStage::Each(v) => Some(v.len()),
            PerStage::All(_) => None,
        }
    }
}

/// A kernel size or stride: one number for all axes or one per axis (D, H, W).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Axes {
    Iso(usize),
    PerAxis([usize; 3]),
}

impl Axes {
    pub fn get(self) -> [usize; 3] {
        match self {
            Axes::Iso(v) => [v; 3],
            Axes::PerAxis(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    #[default]
    BasicBlockD,
    BottleneckD,
}

/// How to build an [`Architecture`]. The default is nnU-Net ResEncM; `seed()` the original project.
/// With `autoconfigure`, strides and kernels come from nnU-Net's topology rules on the patch and
/// spacing; every per-stage value given here overrides its autoconfigured value. Without it,
/// strides and kernel sizes are required. Unset per-stage values follow ResEncM's rules:
/// features min(base * 2^i, max), blocks (1, 3, 4, 6, 6, ...), one decoder conv per stage,
/// bottleneck width features / 4.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchConfig {
    pub autoconfigure: bool,
    pub spacing: [f64; 3],
    pub num_stages: Option<usize>,
    pub features_per_stage: Option<PerStage<usize>>,
    pub strides: Option<PerStage<Axes>>,
    pub kernel_sizes: Option<PerStage<Axes>>,
    pub n_blocks_per_stage: Option<PerStage<usize>>,
    pub n_conv_per_stage_decoder: Option<PerStage<usize>>,
    pub block: BlockKind,
    pub bottleneck_channels: Option<PerStage<usize>>,
    pub base_features: usize,
    pub max_features: usize,
    pub squeeze_excitation: Option<SePool>,
    pub conv_bias: bool,
    pub norm: Norm,
    pub nonlin: Nonlin,
    pub deep_supervision: bool,
}

impl Default for ArchConfig {
    fn default() -> Self {
        ArchConfig {
            autoconfigure: true,
            spacing: [1.0; 3],
            num_stages: None,
            features_per_stage: None,
            strides: None,
            kernel_sizes: None,
            n_blocks_per_stage: None,
            n_conv_per_stage_decoder: None,
            block: BlockKind::BasicBlockD,
            bottleneck_channels: None,
            base_features: 32,
            max_features: 320,
            squeeze_excitation: None,
            conv_bias: true,
            norm: Norm::default(),
            nonlin: Nonlin::default(),
            deep_supervision: true,
        }
    }
}

impl ArchConfig {
    /// The original project's autoconfigure: features capped at 512, no conv bias, no norm affine,
    /// no deep supervision (reference-spec 1.6).
    pub fn seed() -> Self {
        ArchConfig {
            max_features: 512,
            conv_bias: false,
            norm: Norm { eps: 1e-5, affine: false },
            deep_supervision: false,
            ..ArchConfig::default()
        }
    }

    /// The network for `patch` (D, H, W), validated, with the patch checked against its strides.
    pub fn build(&self, in_channels: usize, targets: Vec<Target>, patch: [usize; 3]) -> Result<Architecture> {
        ensure!(patch.iter().all(|&p| p > 0), "patch size {patch:?} must be positive on every axis");
        let topology = if self.autoconfigure {
            let t = plan::get_pool_and_conv_props(self.spacing, patch, MIN_FEATURE_MAP_SIZE, MAX_NUMPOOL)
                .context("model_config: autoconfigure")?;
            Some(t)
        } else {
            None
        };

        let (n, source) = self.stage_count(patch, topology.as_ref())?;
        let need = format!("one per stage, and the network has {n} stages ({source})");
        let axes = |key: &str, given: &Option<PerStage<Axes>>, planned: Option<&Vec<[usize; 3]>>| match (
            given, planned,
        ) {
            (Some(v), _) => Ok(v.resolve(key, n, &need)?.into_iter().map(Axes::get).collect()),
            (None, Some(t)) if t.len() == n => Ok(t.clone()),
            (None, Some(t)) => bail!(
                "model_config.{key}: autoconfigure plans {} stages for patch {patch:?}, but the network has \
                 {n} stages ({source}); give {key} explicitly",
                t.len()
            ),
            (None, None) => bail!("model_config.{key} is required when autoconfigure is off"),
        };
        let strides = axes("strides", &self.strides, topology.as_ref().map(|t| &t.strides))?;
        let kernel_sizes =
            axes("kernel_sizes", &self.kernel_sizes, topology.as_ref().map(|t| &t.kernel_sizes))?;
        let per_stage =
            |key: &str, given: &Option<PerStage<usize>>, rule: &dyn Fn(usize) -> usize| match given {
                Some(v) => v.resolve(key, n, &need),
                None => Ok((0..n).map(rule).collect()),
            };
        let (base, cap) = (self.base_features, self.max_features);
        let features = per_stage("features_per_stage", &self.features_per_stage, &|i| {
            base.saturating_mul(2usize.saturating_pow(i as u32)).min(cap)
        })?;
        let blocks = per_stage("n_blocks_per_stage", &self.n_blocks_per_stage, &|i| {
            [1, 3, 4].get(i).copied().unwrap_or(6)
        })?;
        let n_dec = n.saturating_sub(1);
        let decoder_convs = match &self.n_conv_per_stage_decoder {
            Some(v) => v.resolve(
                "n_conv_per_stage_decoder",
                n_dec,
                &format!("one per decoder stage, and the network has {n} stages ({source}), so {n_dec} decoder stages"),
            )?,
            None => vec![1; n_dec],
        };
        let block = match self.block {
            BlockKind::BasicBlockD => Block::BasicBlockD,
            BlockKind::BottleneckD => Block::BottleneckD {
                bottleneck_channels: per_stage("bottleneck_channels", &self.bottleneck_channels, &|i| {
                    (features[i] / 4).max(1)
                })?,
            },
        };
        let arch = Architecture {
            in_channels,
            features_per_stage: features,
            strides,
            kernel_sizes,
            n_blocks_per_stage: blocks,
            n_conv_per_stage_decoder: decoder_convs,
            block,
            squeeze_excitation: self.squeeze_excitation,
            conv_bias: self.conv_bias,
            norm: self.norm,
            nonlin: self.nonlin,
            deep_supervision: self.deep_supervision,
            targets,
        };
        arch.validate().context("model_config")?;
        match &topology {
            // Autoconfigured strides: a proposal must also suit the topology planned for it.
            Some(t) if self.strides.is_none() => {
                check_divisible(patch, t.must_divide, "autoconfigure's total stride", |p| {
                    plan::topology(self.spacing, p, MIN_FEATURE_MAP_SIZE, MAX_NUMPOOL).must_divide
                })
            }
            _ => arch.check_patch(patch),
        }
        .context("model_config")?;
        Ok(arch)
    }

    /// The stage count and where it comes from: num_stages, else the first per-stage list,
    /// else the planned topology.
    fn stage_count(&self, patch: [usize; 3], topology: Option<&plan::Topology>) -> Result<(usize, String)> {
        if let Some(n) = self.num_stages {
            return Ok((n, "model_config.num_stages".to_string()));
        }
        let decoder = self.n_conv_per_stage_decoder.as_ref().and_then(PerStage::len).map(|l| l + 1);
        let lists = [
            ("strides", self.strides.as_ref().and_then(PerStage::len)),
            ("kernel_sizes", self.kernel_sizes.as_ref().and_then(PerStage::len)),
            ("features_per_stage", self.features_per_stage.as_ref().and_then(PerStage::len)),
            ("n_blocks_per_stage", self.n_blocks_per_stage.as_ref().and_then(PerStage::len)),
            ("bottleneck_channels", self.bottleneck_channels.as_ref().and_then(PerStage::len)),
            ("n_conv_per_stage_decoder", decoder),
        ];
        if let Some((key, len)) = lists.into_iter().find_map(|(k, l)| l.map(|l| (k, l))) {
            return Ok((len, format!("from the length of model_config.{key}")));
        }
        match topology {
            Some(t) => Ok((t.n_stages(), format!("planned by autoconfigure for patch {patch:?}"))),
            None => bail!(
                "model_config.num_stages is required when autoconfigure is off and every per-stage key is one value"
            ),
        }
    }
}
