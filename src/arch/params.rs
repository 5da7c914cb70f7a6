//! Parameter names and PyTorch shapes of the network an [`Architecture`] describes, following
//! dynamic_network_architectures' state dict so weights move both ways between PyTorch and unet3d.

use super::spec::{Architecture, Block, DecoderStage, EncoderBlock};
use crate::device::op::se_reduced_channels;

/// One parameter tensor: its state-dict name and its shape in PyTorch's layout
/// (conv weights (C_out, C_in, kD, kH, kW); transposed conv weights (C_in, C_out, kD, kH, kW)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Architecture {
    /// Every parameter in state-dict order. The state dict's `all_modules.<i>` and
    /// `decoder.encoder.*` entries are aliases of these and are not listed. With one target the
    /// decoder is `decoder.*` as in PyTorch; with several, target t's is `decoders.<t>.*`.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        let (c0, k0) = (self.features_per_stage[0], self.kernel_sizes[0]);
        self.conv_norm(&mut out, "encoder.stem.convs.0", self.in_channels, c0, k0);
        for b in self.encoder_blocks() {
            self.encoder_block(&mut out, &b);
        }
        let stages: Vec<DecoderStage> = self.decoder_stages().collect();
        for (i, t) in self.targets.iter().enumerate() {
            let prefix = self.decoder_prefix(i);
            for st in &stages {
                for j in 0..st.n_convs {
                    let cin = if j == 0 { 2 * st.channels } else { st.channels };
                    let name = format!("{prefix}.stages.{}.convs.{j}", st.index);
                    self.conv_norm(&mut out, &name, cin, st.channels, st.kernel);
                }
            }
            for st in &stages {
                let name = format!("{prefix}.transpconvs.{}", st.index);
                push_conv(
                    &mut out,
                    &name,
                    [st.below_channels, st.channels],
                    st.upsample,
                    self.bias(st.channels),
                );
            }
            for st in &stages {
                let name = format!("{prefix}.seg_layers.{}", st.index);
                push_conv(&mut out, &name, [t.channels, st.channels], [1; 3], Some(t.channels));
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
        let p = format!("encoder.stages.{}.blocks.{}", b.stage, b.index);
        let (cin, cout, k) = (b.in_channels, b.out_channels, b.kernel);
        match self.block {
            Block::BasicBlockD => {
                self.conv_norm(out, &format!("{p}.conv1"), cin, cout, k);
                self.conv_norm(out, &format!("{p}.conv2"), cout, cout, k);
            }
            Block::BottleneckD { .. } => {
                let mid = b.bottleneck_channels.expect("BottleneckD blocks carry their width");
                self.conv_norm(out, &format!("{p}.conv1"), cin, mid, [1; 3]);
                self.conv_norm(out, &format!("{p}.conv2"), mid, mid, k);
                self.conv_norm(out, &format!("{p}.conv3"), mid, cout, [1; 3]);
            }
        }
        if self.squeeze_excitation.is_some() {
            let rd = se_reduced_channels(cout);
            push_conv(out, &format!("{p}.squeeze_excitation.fc1"), [rd, cout], [1; 3], Some(rd));
            push_conv(out, &format!("{p}.squeeze_excitation.fc2"), [cout, rd], [1; 3], Some(cout));
        }
        if b.skip_projects() {
            // The skip is Sequential(avg pool if strided, projection): the projection's index shifts.
            let i = usize::from(b.skip_pools());
            let name = format!("{p}.skip.{i}");
            push_conv(out, &format!("{name}.conv"), [cout, cin], [1; 3], None);
            self.push_norm(out, &name, cout);
        }
    }

    /// A ConvDropoutNormReLU: `{prefix}.conv.*` then `{prefix}.norm.*`.
    fn conv_norm(&self, out: &mut Vec<ParamSpec>, prefix: &str, cin: usize, cout: usize, k: [usize; 3]) {
        push_conv(out, &format!("{prefix}.conv"), [cout, cin], k, self.bias(cout));
        self.push_norm(out, prefix, cout);
    }

    fn bias(&self, c_out: usize) -> Option<usize> {
        self.conv_bias.then_some(c_out)
    }

    fn push_norm(&self, out: &mut Vec<ParamSpec>, prefix: &str, c: usize) {
        if self.norm.affine {
            out.push(ParamSpec { name: format!("{prefix}.norm.weight"), shape: vec![c] });
            out.push(ParamSpec { name: format!("{prefix}.norm.bias"), shape: vec![c] });
        }
    }
}

/// `{name}.weight` shaped (lead[0], lead[1], k...) and `{name}.bias` shaped (bias,) when given.
fn push_conv(out: &mut Vec<ParamSpec>, name: &str, lead: [usize; 2], k: [usize; 3], bias: Option<usize>) {
    let mut shape = lead.to_vec();
    shape.extend_from_slice(&k);
    out.push(ParamSpec { name: format!("{name}.weight"), shape });
    if let Some(c) = bias {
        out.push(ParamSpec { name: format!("{name}.bias"), shape: vec![c] });
    }
}
