//! `model_config` into [`ArchConfig`]: every key of the seed (reference-spec 1.6) and the
//! architectural numbers unet3d adds. Unset keys keep nnU-Net ResEncM's defaults.

use anyhow::Result;

use super::reader::{Section, boolean, choice, count_from, list_of, number, positive};
use super::tree::Node;
use crate::arch::{ArchConfig, Axes, BlockKind, Nonlin, Norm, PerStage, SePool};

const ENCODER_BLOCKS: &[(&str, BlockKind)] = &[
    ("BasicBlockD", BlockKind::BasicBlockD),
    ("BottleneckBlockD", BlockKind::BottleneckD),
    ("BottleneckD", BlockKind::BottleneckD),
];

/// `nonlin`'s spellings; `negative_slope` completes the leaky one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NonlinKind {
    LeakyRelu,
    Relu,
}

const NONLINS: &[(&str, NonlinKind)] = &[
    ("nn.LeakyReLU", NonlinKind::LeakyRelu),
    ("LeakyReLU", NonlinKind::LeakyRelu),
    ("nn.ReLU", NonlinKind::Relu),
    ("ReLU", NonlinKind::Relu),
];
const SE_POOLS: &[(&str, SePool)] = &[("dhw", SePool::Dhw), ("dh", SePool::Dh)];

const EARLIER_SEED: &str = "the seed ignores it too: a key of its earlier pytorch-3dunet configs";
const OPS_FIXED: &str =
    "the seed ignores it too: 3D patches always use Conv3d, AvgPool3d, InstanceNorm3d and Dropout3d";

/// model_config keys that seed YAMLs carry and nothing reads.
const MODEL_IGNORED: &[(&str, &str)] = &[
    ("conv_op", OPS_FIXED),
    ("pool_op", OPS_FIXED),
    ("norm_op", OPS_FIXED),
    ("dropout_op", OPS_FIXED),
    ("op_dims", "the seed ignores it too: the patch size makes it 3D"),
    ("conv_op_kwargs", "the seed ignores it too: conv_bias sets the bias"),
    ("nonlin_kwargs", "the seed ignores it too: it overwrites them; negative_slope sets LeakyReLU's slope"),
    ("stem_channels", "the seed ignores it too: the stem has features_per_stage[0] channels"),
    (
        "squeeze_excitation_reduction_ratio",
        "the seed ignores it too: SE reduces to C/16 channels, rounded to a multiple of 8",
    ),
    ("bottleneck_block", "the encoder's block type is basic_encoder_block"),
    ("use_timm_encoder", "the seed ignores it too: there are no timm encoders"),
    ("timm_encoder_class", "the seed ignores it too: there are no timm encoders"),
    ("pool_op_kernel_sizes", "a key of the seed's earlier versions; strides sets the downsampling"),
    (
        "f_maps",
        "the seed ignores it too: a key of its earlier pytorch-3dunet configs; see features_per_stage",
    ),
    ("n_levels", "the seed ignores it too: a key of its earlier pytorch-3dunet configs; see num_stages"),
    ("pool_kernel_size", "the seed ignores it too: a key of its earlier pytorch-3dunet configs; see strides"),
    (
        "se_module",
        "the seed ignores it too: a key of its earlier pytorch-3dunet configs; see squeeze_excitation",
    ),
    ("basic_module", EARLIER_SEED),
    ("basic_block", EARLIER_SEED),
];

/// One value for every stage, or a list with one per stage.
fn per_stage<T: Clone>(
    item: impl Fn(&Node) -> Result<T, String>,
    what: &'static str,
) -> impl Fn(&Node) -> Result<PerStage<T>, String> {
    move |n| {
        let allowed = || format!("{what} for every stage, or a list with one per stage");
        match n {
            Node::Seq(items) => {
                let v: Result<Vec<T>, String> = items.iter().map(&item).collect();
                v.map(PerStage::Each).map_err(|_| allowed())
            }
            scalar => item(scalar).map(PerStage::All).map_err(|_| allowed()),
        }
    }
}

/// A kernel size or stride: one number for all axes or [z, y, x].
fn axes(n: &Node) -> Result<Axes, String> {
    match n {
        Node::Seq(_) => {
            let v = list_of(3, false, count_from(1))(n)?;
            Ok(Axes::PerAxis([v[0], v[1], v[2]]))
        }
        _ => count_from(1)(n).map(Axes::Iso),
    }
}

/// A key the seed reads whose only supported value is its default.
fn fixed(want: Node, why: &'static str) -> impl Fn(&Node) -> Result<(), String> {
    move |n| {
        let same = match (n, &want) {
            (Node::Int(_) | Node::Float(_), Node::Int(_) | Node::Float(_)) => number(n) == number(&want),
            _ => *n == want,
        };
        if same { Ok(()) } else { Err(format!("{want} ({why})")) }
    }
}

/// Reads `model_config`; `autoconfigure` comes from `tr_setup`.
pub(crate) fn read_model_config(mut s: Section<'_>, autoconfigure: bool) -> Result<ArchConfig> {
    let d = ArchConfig::default();
    let count = |n: &Node| count_from(1)(n);
    let block = s.get("basic_encoder_block", BlockKind::BasicBlockD, &choice(ENCODER_BLOCKS))?;
    s.get("basic_decoder_block", (), &|n| match n {
        Node::Str(b) if b == "ConvBlock" => Ok(()),
        _ => Err("\"ConvBlock\" (conv-norm-act decoder stages as nnU-Net; the seed's \"ResidualBlock\" \
                  decoder is not supported)"
            .into()),
    })?;
    s.get(
        "do_stem",
        (),
        &fixed(Node::Bool(true), "the stem conv is always there, as in the seed and nnU-Net"),
    )?;
    s.get("return_skips", (), &fixed(Node::Bool(true), "a U-Net needs the encoder's skips"))?;
    s.get("stochastic_depth_p", (), &fixed(Node::Float(0.0), "unet3d has no stochastic depth"))?;
    let mut dropout = s.section("dropout_op_kwargs")?;
    dropout.get("p", (), &fixed(Node::Float(0.0), "unet3d has no dropout, as nnU-Net ResEncM"))?;
    dropout.finish(&[("inplace", "the seed ignores it too")]);

    let mut norm_kwargs = s.section("norm_op_kwargs")?;
    let norm = Norm {
        affine: norm_kwargs.get("affine", d.norm.affine, &boolean)?,
        eps: norm_kwargs.get("eps", f64::from(d.norm.eps), &positive)? as f32,
    };
    norm_kwargs.finish(&[]);

    let kind = s.get("nonlin", NonlinKind::LeakyRelu, &choice(NONLINS))?;
    let slope = s.optional("negative_slope", &number)?;
    let nonlin = if kind == NonlinKind::LeakyRelu {
        Nonlin::LeakyRelu { negative_slope: slope.map_or(0.01, |x| x as f32) }
    } else {
        if slope.is_some() {
            s.ctx().warn(format!("{}: ignored (nonlin is ReLU)", s.key_path("negative_slope")));
        }
        Nonlin::Relu
    };

    let se = s.get("squeeze_excitation", false, &boolean)?;
    let pool = s.optional("squeeze_excitation_pool", &choice(SE_POOLS))?;
    if !se && pool.is_some() {
        let key = s.key_path("squeeze_excitation_pool");
        s.ctx().warn(format!("{key}: ignored (squeeze_excitation is off)"));
    }

    let bottleneck_channels = s.optional("bottleneck_channels", &per_stage(count, "a whole number >= 1"))?;
    if block == BlockKind::BasicBlockD && bottleneck_channels.is_some() {
        let key = s.key_path("bottleneck_channels");
        s.ctx().warn(format!("{key}: ignored (only basic_encoder_block BottleneckBlockD uses it)"));
    }
    let spacing = s.get("spacing", d.spacing.to_vec(), &list_of(3, true, positive))?;
    let config = ArchConfig {
        autoconfigure,
        spacing: [spacing[0], spacing[1], spacing[2]],
        num_stages: s.optional("num_stages", &count_from(2))?,
        features_per_stage: s.optional("features_per_stage", &per_stage(count, "a whole number >= 1"))?,
        strides: s.optional("strides", &per_stage(axes, "a stride (a number or [z, y, x])"))?,
        kernel_sizes: s
            .optional("kernel_sizes", &per_stage(axes, "a kernel size (a number or [z, y, x])"))?,
        n_blocks_per_stage: s.optional("n_blocks_per_stage", &per_stage(count, "a whole number >= 1"))?,
        n_conv_per_stage_decoder: s.optional(
            "n_conv_per_stage_decoder",
            &per_stage(count, "a whole number >= 1 (per decoder stage)"),
        )?,
        block,
        bottleneck_channels,
        base_features: s.get("base_features", d.base_features, &count_from(1))?,
        max_features: s.get("max_features", d.max_features, &count_from(1))?,
        squeeze_excitation: se.then(|| pool.unwrap_or_default()),
        conv_bias: s.get("conv_bias", d.conv_bias, &boolean)?,
        norm,
        nonlin,
        deep_supervision: s.get("deep_supervision", d.deep_supervision, &boolean)?,
    };
    s.finish(MODEL_IGNORED);
    Ok(config)
}
