//! The residual encoder (stem + stages, every stage's output kept as a skip) and the U-Net
//! decoder (transposed conv, concatenation with the skip, conv-norm-acts, 1x1 heads).

use super::LayerSettings;
use super::conv::{Conv, ConvNormAct, ConvSpec, TransposedConv};
use super::residual::{ResidualBlock, ResidualStage};
use crate::arch::params::names;
use crate::arch::{Architecture, DecoderStage};
use crate::autograd::{Graph, ParamStore, Var};
use crate::ops::elementwise;
use anyhow::{Result, ensure};

/// dynamic_network_architectures' ResidualEncoder with a stem: `encoder.stem.convs.0.*`, then
/// `encoder.stages.<s>.blocks.<i>.*`.
#[derive(Debug, Clone)]
pub struct Encoder {
    stem: ConvNormAct,
    stages: Vec<ResidualStage>,
}

impl Encoder {
    /// The stem conv's parameter name and spec.
    pub fn stem(arch: &Architecture, s: &LayerSettings) -> (&'static str, ConvSpec) {
        let spec = ConvSpec {
            cin: arch.in_channels,
            cout: arch.features_per_stage[0],
            kernel: arch.kernel_sizes[0],
            stride: [1; 3],
            bias: s.conv_bias,
        };
        (names::STEM, spec)
    }

    pub fn bind(store: &ParamStore, arch: &Architecture, s: &LayerSettings) -> Result<Self> {
        let (name, stem) = Self::stem(arch, s);
        let stem = ConvNormAct::bind(store, name, stem, s, s.act)?;
        let mut stages: Vec<Vec<ResidualBlock>> = vec![Vec::new(); arch.n_stages()];
        for b in arch.encoder_blocks() {
            let prefix = names::block(b.stage, b.index);
            stages[b.stage].push(ResidualBlock::bind(store, &prefix, &b, s)?);
        }
        Ok(Encoder { stem, stages: stages.into_iter().map(ResidualStage::new).collect() })
    }

    /// Every stage's output, full resolution first; the last is the bottleneck.
    pub fn forward(&self, g: &mut Graph, store: &ParamStore, x: Var) -> Result<Vec<Var>> {
        let mut x = self.stem.forward(g, store, x)?;
        let mut skips = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            x = stage.forward(g, store, x)?;
            skips.push(x);
        }
        Ok(skips)
    }
}

/// One decoder stage's layers: `transpconvs.<i>`, `stages.<i>.convs.<j>`, `seg_layers.<i>`.
#[derive(Debug, Clone)]
pub struct DecoderStageLayers {
    skip_stage: usize,
    upsample: TransposedConv,
    convs: Vec<ConvNormAct>,
    head: Conv,
}

/// dynamic_network_architectures' UNetDecoder for one target, under its prefix (`decoder` or
/// `decoders.<target>`). Stages run deepest first; every stage has a head, but only the ones
/// whose output is used are evaluated.
#[derive(Debug, Clone)]
pub struct Decoder {
    stages: Vec<DecoderStageLayers>,
}

impl Decoder {
    /// The convs of decoder stage `st` under `prefix`: parameter name and spec, the first taking
    /// the upsampled features concatenated with the skip.
    pub fn stage_convs(prefix: &str, st: &DecoderStage, s: &LayerSettings) -> Vec<(String, ConvSpec)> {
        (0..st.n_convs)
            .map(|j| {
                let spec = ConvSpec {
                    cin: if j == 0 { 2 * st.channels } else { st.channels },
                    cout: st.channels,
                    kernel: st.kernel,
                    stride: [1; 3],
                    bias: s.conv_bias,
                };
                (names::decoder_conv(prefix, st.index, j), spec)
            })
            .collect()
    }

    /// The decoder of `arch.targets[target]`.
    pub fn bind(store: &ParamStore, arch: &Architecture, target: usize, s: &LayerSettings) -> Result<Self> {
        let prefix = arch.decoder_prefix(target);
        let classes = arch.targets[target].channels;
        let stages = arch
            .decoder_stages()
            .map(|st| {
                let i = st.index;
                let upsample = TransposedConv::bind(
                    store,
                    &names::transpconv(&prefix, i),
                    [st.below_channels, st.channels],
                    st.upsample,
                    s.conv_bias,
                )?;
                let convs = Decoder::stage_convs(&prefix, &st, s)
                    .into_iter()
                    .map(|(name, spec)| ConvNormAct::bind(store, &name, spec, s, s.act))
                    .collect::<Result<Vec<_>>>()?;
                let head = ConvSpec::pointwise(st.channels, classes, true);
                let head = Conv::bind(store, &names::seg_layer(&prefix, i), head)?;
                Ok(DecoderStageLayers { skip_stage: st.skip_stage, upsample, convs, head })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder { stages })
    }

    /// The head outputs for the encoder's `skips`: with `deep_supervision` one per stage, full
    /// resolution first; otherwise only the full-resolution one.
    pub fn forward(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        skips: &[Var],
        deep_supervision: bool,
    ) -> Result<Vec<Var>> {
        ensure!(
            skips.len() == self.stages.len() + 1,
            "decoder: {} skips for {} decoder stages; the encoder gives one per stage",
            skips.len(),
            self.stages.len()
        );
        let mut x = skips[skips.len() - 1];
        let mut outputs = Vec::new();
        let last = self.stages.len() - 1;
        for (i, st) in self.stages.iter().enumerate() {
            let up = st.upsample.forward(g, store, x)?;
            x = elementwise::concat(g, &[up, skips[st.skip_stage]])?;
            for c in &st.convs {
                x = c.forward(g, store, x)?;
            }
            if deep_supervision || i == last {
                outputs.push(st.head.forward(g, store, x)?);
            }
        }
        outputs.reverse();
        Ok(outputs)
    }
}
