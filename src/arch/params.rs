//! Parameter names and PyTorch shapes of the network an [`Architecture`] describes, following
//! dynamic_network_architectures' state dict so weights move both ways between PyTorch and unet3d.
//! The names are spelled here only ([`names`]: the layers in src/nn bind what these build), and
//! each [`ParamSpec`] carries as data what loading needs besides the name: its layout and the
//! configuration keys behind its shape and its existence.

use std::fmt;

use super::spec::{Architecture, Block, DecoderStage, EncoderBlock};
use crate::device::op::se_reduced_channels;

/// The state-dict names, from the module path down: one function per level of
/// dynamic_network_architectures' module tree.
pub mod names {
    /// The stem's conv-norm-act.
    pub const STEM: &str = "encoder.stem.convs.0";

    /// Residual block `index` of encoder stage `stage`.
    pub fn block(stage: usize, index: usize) -> String {
        format!("encoder.stages.{stage}.blocks.{index}")
    }

    /// Conv-norm-act `i` (from 0) of a block's residual branch.
    pub fn branch_conv(block: &str, i: usize) -> String {
        format!("{block}.conv{}", i + 1)
    }

    pub fn squeeze_excitation(block: &str) -> String {
        format!("{block}.squeeze_excitation")
    }

    /// The SE's first (down, `i` = 1) or second (up, 2) 1x1 conv.
    pub fn se_fc(se: &str, i: usize) -> String {
        format!("{se}.fc{i}")
    }

    pub fn skip(block: &str) -> String {
        format!("{block}.skip")
    }

    /// The skip's projection: Sequential(avg pool if strided, projection), so its index follows
    /// the pool.
    pub fn skip_projection(skip: &str, pooled: bool) -> String {
        format!("{skip}.{}", usize::from(pooled))
    }

    /// Conv-norm-act `j` of decoder stage `stage` under a decoder prefix.
    pub fn decoder_conv(decoder: &str, stage: usize, j: usize) -> String {
        format!("{decoder}.stages.{stage}.convs.{j}")
    }

    pub fn transpconv(decoder: &str, stage: usize) -> String {
        format!("{decoder}.transpconvs.{stage}")
    }

    pub fn seg_layer(decoder: &str, stage: usize) -> String {
        format!("{decoder}.seg_layers.{stage}")
    }

    /// A conv-norm-act's conv and norm.
    pub fn conv(unit: &str) -> String {
        format!("{unit}.conv")
    }

    pub fn norm(unit: &str) -> String {
        format!("{unit}.norm")
    }

    /// A layer's weight and bias tensors.
    pub fn weight(layer: &str) -> String {
        format!("{layer}.weight")
    }

    pub fn bias(layer: &str) -> String {
        format!("{layer}.bias")
    }
}

/// How a parameter's PyTorch layout maps to unet3d's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamLayout {
    /// (C_out, C_in, kD, kH, kW) in PyTorch, (K, T, R, S, C) in unet3d.
    Conv,
    /// (C_in, C_out, kD, kH, kW) in PyTorch, (C_in, T, R, S, C_out) in unet3d.
    TransposedConv,
    /// Biases and norm parameters: the same on both sides.
    Vector,
}

/// How a fresh network initialises a parameter (nnU-Net's): He-normal conv weights, zero biases,
/// norms gamma 1 and beta 0, except the last norm of every residual branch (gamma 0, so each block
/// starts as its shortcut).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamInit {
    HeNormal,
    Zeros,
    Ones,
}

/// The configuration value one axis of a parameter's shape comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeKey {
    Features(usize),
    Bottleneck(usize),
    InChannels,
    Target(String),
    KernelSize(usize),
    Stride(usize),
}

impl fmt::Display for SizeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeKey::Features(s) => write!(f, "model_config.features_per_stage[{s}]"),
            SizeKey::Bottleneck(s) => write!(f, "model_config.bottleneck_channels[{s}]"),
            SizeKey::InChannels => write!(f, "dataset_config.in_channels"),
            SizeKey::Target(t) => write!(f, "dataset_config.targets.{t}.channels"),
            SizeKey::KernelSize(s) => write!(f, "model_config.kernel_sizes[{s}]"),
            SizeKey::Stride(s) => write!(f, "model_config.strides[{s}]"),
        }
    }
}

/// Why a parameter exists, outermost first: each module level (a name prefix) with the key that
/// decides whether that level is there, then the key that decides this tensor within it. A file
/// without the parameter is explained by the first level it lacks altogether.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub levels: Vec<(String, &'static str)>,
    pub own: Option<&'static str>,
}

const NUM_STAGES: &str = "model_config.num_stages";
const BLOCKS: &str = "model_config.n_blocks_per_stage";
const DECODER_CONVS: &str = "model_config.n_conv_per_stage_decoder";
const TARGETS: &str = "dataset_config.targets";
const SKIP: &str = "model_config.features_per_stage and model_config.strides (a block projects its skip when its width changes)";
const SE: &str = "model_config.squeeze_excitation";
const BOTTLENECK: &str = "model_config.basic_encoder_block";
const AFFINE: &str = "model_config.norm_op_kwargs.affine";
const BIAS: &str = "model_config.conv_bias";

/// One parameter tensor: its state-dict name, its shape in PyTorch's layout (conv weights
/// (C_out, C_in, kD, kH, kW); transposed conv weights (C_in, C_out, kD, kH, kW)), and what decides
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub layout: ParamLayout,
    pub init: ParamInit,
    /// The key behind each axis of `shape`.
    pub axis_keys: Vec<SizeKey>,
    pub presence: Presence,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where the parameters being listed sit: the levels above them and the keys their sizes take.
#[derive(Clone)]
struct Site {
    levels: Vec<(String, &'static str)>,
    /// The tensor-level key for everything in this unit (SE, the skip, a bottleneck's conv3).
    own: Option<&'static str>,
    out: SizeKey,
    input: SizeKey,
    kernel: SizeKey,
    /// The unit is a residual branch's last conv-norm: its gamma starts at 0.
    branch_end: bool,
}

impl Architecture {
    /// Every parameter in state-dict order. The state dict's `all_modules.<i>` and
    /// `decoder.encoder.*` entries are aliases of these and are not listed. With one target the
    /// decoder is `decoder.*` as in PyTorch; with several, target t's is `decoders.<t>.*`.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        let (c0, k0) = (self.features_per_stage[0], self.kernel_sizes[0]);
        let stem = Site {
            levels: vec![],
            own: None,
            out: SizeKey::Features(0),
            input: SizeKey::InChannels,
            kernel: SizeKey::KernelSize(0),
            branch_end: false,
        };
        self.conv_norm(&mut out, &stem, names::STEM, [c0, self.in_channels], k0);
        for b in self.encoder_blocks() {
            self.encoder_block(&mut out, &b);
        }
        let stages: Vec<DecoderStage> = self.decoder_stages().collect();
        for (i, t) in self.targets.iter().enumerate() {
            let prefix = self.decoder_prefix(i);
            let decoder = (format!("{prefix}."), TARGETS);
            let site = |st: &DecoderStage, level: Option<(String, &'static str)>| Site {
                levels: [decoder.clone()].into_iter().chain(level).collect(),
                own: None,
                out: SizeKey::Features(st.skip_stage),
                input: SizeKey::Features(st.skip_stage),
                kernel: SizeKey::KernelSize(st.skip_stage),
                branch_end: false,
            };
            for st in &stages {
                let level = (format!("{prefix}.stages.{}.", st.index), NUM_STAGES);
                for j in 0..st.n_convs {
                    let name = names::decoder_conv(&prefix, st.index, j);
                    let cin = if j == 0 { 2 * st.channels } else { st.channels };
                    let unit = Site {
                        levels: vec![decoder.clone(), level.clone(), (format!("{name}."), DECODER_CONVS)],
                        ..site(st, None)
                    };
                    self.conv_norm(&mut out, &unit, &name, [st.channels, cin], st.kernel);
                }
            }
            for st in &stages {
                let name = names::transpconv(&prefix, st.index);
                let up = Site {
                    input: SizeKey::Features(st.skip_stage + 1),
                    kernel: SizeKey::Stride(st.skip_stage + 1),
                    ..site(st, Some((format!("{name}."), NUM_STAGES)))
                };
                let shape = [st.below_channels, st.channels];
                push_conv(
                    &mut out,
                    &up,
                    ParamLayout::TransposedConv,
                    &name,
                    shape,
                    st.upsample,
                    self.bias(st.channels),
                );
            }
            for st in &stages {
                let name = names::seg_layer(&prefix, st.index);
                let head = Site {
                    out: SizeKey::Target(t.name.clone()),
                    ..site(st, Some((format!("{name}."), NUM_STAGES)))
                };
                push_conv(
                    &mut out,
                    &head,
                    ParamLayout::Conv,
                    &name,
                    [t.channels, st.channels],
                    [1; 3],
                    Some(t.channels),
                );
            }
        }
        out
    }

    /// State-dict prefix of target `i`'s decoder: PyTorch's `decoder` when there is one target,
    /// `decoders.<name>` when there are several.
    pub fn decoder_prefix(&self, i: usize) -> String {
        match &self.targets[..] {
            [_] => "decoder".to_string(),
            targets => format!("decoders.{}", targets[i].name),
        }
    }

    /// The number of trainable scalars.
    pub fn param_count(&self) -> u64 {
        self.param_specs().iter().map(|p| p.numel() as u64).sum()
    }

    fn encoder_block(&self, out: &mut Vec<ParamSpec>, b: &EncoderBlock) {
        let p = names::block(b.stage, b.index);
        let s = b.stage;
        let input = if b.index == 0 && s > 0 { SizeKey::Features(s - 1) } else { SizeKey::Features(s) };
        let site = Site {
            levels: vec![(format!("encoder.stages.{s}."), NUM_STAGES), (format!("{p}."), BLOCKS)],
            own: None,
            out: SizeKey::Features(s),
            input: input.clone(),
            kernel: SizeKey::KernelSize(s),
            branch_end: false,
        };
        let (cin, cout, k) = (b.in_channels, b.out_channels, b.kernel);
        match self.block {
            Block::BasicBlockD => {
                let conv1 = Site { input: input.clone(), ..site.clone() };
                self.conv_norm(out, &conv1, &names::branch_conv(&p, 0), [cout, cin], k);
                let conv2 = Site { input: SizeKey::Features(s), branch_end: true, ..site.clone() };
                self.conv_norm(out, &conv2, &names::branch_conv(&p, 1), [cout, cout], k);
            }
            Block::BottleneckD { .. } => {
                let mid = b.bottleneck_channels.expect("BottleneckD blocks carry their width");
                let bn = SizeKey::Bottleneck(s);
                let conv1 = Site { out: bn.clone(), ..site.clone() };
                self.conv_norm(out, &conv1, &names::branch_conv(&p, 0), [mid, cin], [1; 3]);
                let conv2 = Site { out: bn.clone(), input: bn.clone(), ..site.clone() };
                self.conv_norm(out, &conv2, &names::branch_conv(&p, 1), [mid, mid], k);
                let conv3 = Site { input: bn, own: Some(BOTTLENECK), branch_end: true, ..site.clone() };
                self.conv_norm(out, &conv3, &names::branch_conv(&p, 2), [cout, mid], [1; 3]);
            }
        }
        if self.squeeze_excitation.is_some() {
            let rd = se_reduced_channels(cout);
            let se = names::squeeze_excitation(&p);
            let fc = Site { input: SizeKey::Features(s), own: Some(SE), ..site.clone() };
            push_conv(out, &fc, ParamLayout::Conv, &names::se_fc(&se, 1), [rd, cout], [1; 3], Some(rd));
            push_conv(out, &fc, ParamLayout::Conv, &names::se_fc(&se, 2), [cout, rd], [1; 3], Some(cout));
        }
        if b.skip_projects() {
            let name = names::skip_projection(&names::skip(&p), b.skip_pools());
            let skip = Site { own: Some(SKIP), branch_end: false, ..site };
            push_conv(out, &skip, ParamLayout::Conv, &names::conv(&name), [cout, cin], [1; 3], None);
            self.push_norm(out, &skip, &name, cout);
        }
    }

    /// A ConvDropoutNormReLU: `{unit}.conv.*` then `{unit}.norm.*`; `channels` is (out, in).
    fn conv_norm(
        &self,
        out: &mut Vec<ParamSpec>,
        site: &Site,
        unit: &str,
        channels: [usize; 2],
        k: [usize; 3],
    ) {
        push_conv(out, site, ParamLayout::Conv, &names::conv(unit), channels, k, self.bias(channels[0]));
        self.push_norm(out, site, unit, channels[0]);
    }

    fn bias(&self, c_out: usize) -> Option<usize> {
        self.conv_bias.then_some(c_out)
    }

    fn push_norm(&self, out: &mut Vec<ParamSpec>, site: &Site, unit: &str, c: usize) {
        if self.norm.affine {
            let norm = names::norm(unit);
            let gamma = if site.branch_end { ParamInit::Zeros } else { ParamInit::Ones };
            out.push(vector(site, names::weight(&norm), c, AFFINE, gamma));
            out.push(vector(site, names::bias(&norm), c, AFFINE, ParamInit::Zeros));
        }
    }
}

/// A one-axis parameter (a bias or a norm's weight or bias) sized by the site's output channels.
fn vector(site: &Site, name: String, c: usize, own: &'static str, init: ParamInit) -> ParamSpec {
    ParamSpec {
        name,
        shape: vec![c],
        layout: ParamLayout::Vector,
        init,
        axis_keys: vec![site.out.clone()],
        presence: Presence { levels: site.levels.clone(), own: site.own.or(Some(own)) },
    }
}

/// `{name}.weight` shaped (lead[0], lead[1], k...) and `{name}.bias` shaped (bias,) when given.
/// `lead` is in PyTorch's order: (out, in) for a conv, (in, out) for a transposed conv.
fn push_conv(
    out: &mut Vec<ParamSpec>,
    site: &Site,
    layout: ParamLayout,
    name: &str,
    lead: [usize; 2],
    k: [usize; 3],
    bias: Option<usize>,
) {
    let mut shape = lead.to_vec();
    shape.extend_from_slice(&k);
    let (a, b) = match layout {
        ParamLayout::TransposedConv => (site.input.clone(), site.out.clone()),
        _ => (site.out.clone(), site.input.clone()),
    };
    let mut axis_keys = vec![a, b];
    axis_keys.extend(std::iter::repeat_n(site.kernel.clone(), 3));
    let presence = Presence { levels: site.levels.clone(), own: site.own };
    let init = ParamInit::HeNormal;
    out.push(ParamSpec { name: names::weight(name), shape, layout, init, axis_keys, presence });
    if let Some(c) = bias {
        out.push(vector(site, names::bias(name), c, BIAS, ParamInit::Zeros));
    }
}
