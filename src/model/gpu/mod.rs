//! The residual U-Net of [`super::Network`] on a kernel device (`sim` or `cuda:N`): weights
//! uploaded once in the store's layouts, an explicit forward that keeps what backward reads, the
//! losses on the device, and an explicit backward mirroring src/nn layer by layer (no tape: the
//! architecture is fixed).

mod layers;
mod loss;
mod predictor;

use anyhow::{Context, Result, ensure};

use self::layers::{Acts, BlockRec, Conv, ConvNormAct, ConvNormActRec, Id, Params, ResidualBlock};
pub use self::predictor::GpuNetworkPredictor;
use super::arch::Architecture;
use crate::autograd::ParamStore;
use crate::config::Activation;
use crate::device::kernels::{GpuTensor, activation, elementwise};
use crate::device::launch::Gpu;
use crate::loss::Loss;
use crate::nn::{self, ConvSpec, LayerSettings};
use crate::tensor::Tensor;

/// One decoder stage: upsampling, the convs after the concatenation, the head.
struct DecoderStage {
    skip_stage: usize,
    upsample: Conv,
    convs: Vec<ConvNormAct>,
    head: Conv,
}

/// What one decoder stage's forward keeps.
struct DecoderRec {
    below: Id,
    up: Id,
    cat: Id,
    convs: Vec<ConvNormActRec>,
    out: Id,
    head: Option<Id>,
}

/// What the last forward kept for backward.
struct Forward {
    stem: ConvNormActRec,
    /// Per stage, per block.
    blocks: Vec<Vec<BlockRec>>,
    /// Per target, per decoder stage (deepest first).
    decoders: Vec<Vec<DecoderRec>>,
}

/// The network of an [`Architecture`] on a [`Gpu`], with its parameters and, after
/// What [`GpuNetwork::loss_and_backward`] computed: the task-weighted total it differentiated,
/// and per target its deep-supervision-weighted loss before the task weight (what training logs).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLoss {
    pub total: f64,
    pub per_target: Vec<f64>,
}

/// [`forward`](Self::forward), the activations its backward needs.
pub struct GpuNetwork {
    gpu: Gpu,
    arch: Architecture,
    params: Params,
    stem: ConvNormAct,
    stages: Vec<Vec<ResidualBlock>>,
    decoders: Vec<Vec<DecoderStage>>,
    acts: Acts,
    last: Option<Forward>,
}

impl GpuNetwork {
    /// Uploads every parameter of `arch` from `store`; a missing or misshapen one is an error
    /// naming it.
    pub fn new(gpu: &Gpu, arch: &Architecture, store: &ParamStore) -> Result<Self> {
        arch.validate()?;
        let s = LayerSettings::of(arch);
        let mut p = Params::new(gpu);
        let (name, stem) = nn::Encoder::stem(arch, &s);
        let stem = ConvNormAct::bind(&mut p, store, name, stem, &s, s.act)?;
        let mut stages: Vec<Vec<ResidualBlock>> = (0..arch.n_stages()).map(|_| Vec::new()).collect();
        for b in arch.encoder_blocks() {
            let prefix = format!("encoder.stages.{}.blocks.{}", b.stage, b.index);
            stages[b.stage].push(ResidualBlock::bind(&mut p, store, &prefix, &b, &s)?);
        }
        let mut decoders = Vec::with_capacity(arch.targets.len());
        for (t, target) in arch.targets.iter().enumerate() {
            let prefix = arch.decoder_prefix(t);
            let mut dec = Vec::new();
            for st in arch.decoder_stages() {
                let i = st.index;
                let upsample = Conv::bind_transposed(
                    &mut p,
                    store,
                    &format!("{prefix}.transpconvs.{i}"),
                    [st.below_channels, st.channels],
                    st.upsample,
                    s.conv_bias,
                )?;
                let mut convs = Vec::with_capacity(st.n_convs);
                for (name, spec) in nn::Decoder::stage_convs(&prefix, &st, &s) {
                    convs.push(ConvNormAct::bind(&mut p, store, &name, spec, &s, s.act)?);
                }
                let head = ConvSpec::pointwise(st.channels, target.channels, true);
                let head = Conv::bind(&mut p, store, &format!("{prefix}.seg_layers.{i}"), head)?;
                dec.push(DecoderStage { skip_stage: st.skip_stage, upsample, convs, head });
            }
            decoders.push(dec);
        }
        Ok(GpuNetwork {
            gpu: gpu.clone(),
            arch: arch.clone(),
            params: p,
            stem,
            stages,
            decoders,
            acts: Acts::default(),
            last: None,
        })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The training forward of a channels-last batch (N, D, H, W, C_in) on this network's
    /// device: per target its logits, every deep-supervision scale full resolution first when
    /// `deep_supervision`, else the full-resolution output only. Keeps what backward needs
    /// until the next forward.
    pub fn forward(&mut self, x: GpuTensor, deep_supervision: bool) -> Result<Vec<Vec<&GpuTensor>>> {
        self.last = None;
        let mut acts = std::mem::take(&mut self.acts);
        acts.clear();
        let f = self.run(&mut acts, x, deep_supervision);
        self.acts = acts;
        let f = self.last.insert(f?);
        Ok(heads(&self.acts, f))
    }

    /// The forward of `x` into `acts`.
    fn run(&self, acts: &mut Acts, x: GpuTensor, deep_supervision: bool) -> Result<Forward> {
        let [_, d, h, w, c] = x.shape().ndhwc().context("network input")?;
        ensure!(
            c == self.arch.in_channels,
            "network input of shape {} has {c} channels, the network takes {}",
            x.shape(),
            self.arch.in_channels
        );
        self.arch.check_patch([d, h, w]).with_context(|| format!("network input of shape {}", x.shape()))?;
        ensure!(
            x.gpu().same(&self.gpu),
            "network input is on {}, the network on {}",
            x.gpu().describe(),
            self.gpu.describe()
        );
        let p = &self.params;
        let input = acts.push(x);
        let stem = self.stem.forward(p, acts, input)?;
        let mut y = stem.y;
        let mut blocks = Vec::with_capacity(self.stages.len());
        let mut skips = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let mut recs = Vec::with_capacity(stage.len());
            for b in stage {
                let rec = b.forward(p, acts, y)?;
                y = rec.out;
                recs.push(rec);
            }
            blocks.push(recs);
            skips.push(y);
        }
        let mut decoders = Vec::with_capacity(self.decoders.len());
        for dec in &self.decoders {
            let mut x = skips[skips.len() - 1];
            let mut recs = Vec::with_capacity(dec.len());
            for (i, st) in dec.iter().enumerate() {
                let up = st.upsample.forward(p, acts, x)?;
                let cat = concat(acts, up, skips[st.skip_stage])?;
                let mut y = cat;
                let mut convs = Vec::with_capacity(st.convs.len());
                for c in &st.convs {
                    let rec = c.forward(p, acts, y)?;
                    y = rec.y;
                    convs.push(rec);
                }
                let head = if deep_supervision || i == dec.len() - 1 {
                    Some(st.head.forward(p, acts, y)?)
                } else {
                    None
                };
                recs.push(DecoderRec { below: x, up, cat, convs, out: y, head });
                x = y;
            }
            decoders.push(recs);
        }
        Ok(Forward { stem, blocks, decoders })
    }

    /// The loss of the last forward and the gradient of every parameter (replacing earlier
    /// ones): `sum_t task_weights[t] * sum_i ds_weights[i] * losses[t](output t i, labels[t][i])`,
    /// labels per target per output scale on the host (see `loss::deep_supervision_labels`);
    /// terms of weight 0 are skipped, as in `loss::deep_supervision`.
    pub fn loss_and_backward(
        &mut self,
        labels: &[Vec<Tensor>],
        losses: &[Loss],
        task_weights: &[f64],
        ds_weights: &[f64],
    ) -> Result<DeviceLoss> {
        let targets = self.arch.targets.len();
        ensure!(
            labels.len() == targets && losses.len() == targets && task_weights.len() == targets,
            "loss: {} label sets, {} losses and {} task weights for {targets} targets",
            labels.len(),
            losses.len(),
            task_weights.len()
        );
        let f = self.last.take().context("loss_and_backward needs a forward first")?;
        let result = self.backward(&f, labels, losses, task_weights, ds_weights);
        self.last = Some(f);
        result
    }

    fn backward(
        &mut self,
        f: &Forward,
        labels: &[Vec<Tensor>],
        losses: &[Loss],
        task_weights: &[f64],
        ds_weights: &[f64],
    ) -> Result<DeviceLoss> {
        self.params.zero_grad();
        self.acts.zero_grad();
        let (p, acts) = (&mut self.params, &mut self.acts);
        let mut per_target = vec![0.0; f.decoders.len()];
        for (t, recs) in f.decoders.iter().enumerate() {
            let name = &self.arch.targets[t].name;
            let heads: Vec<Id> = recs.iter().rev().filter_map(|r| r.head).collect();
            ensure!(
                heads.len() == labels[t].len() && heads.len() == ds_weights.len(),
                "target {name:?}: {} outputs, {} label maps and {} deep-supervision weights; the counts must match",
                heads.len(),
                labels[t].len(),
                ds_weights.len()
            );
            for (i, ((&h, label), &w)) in heads.iter().zip(&labels[t]).zip(ds_weights).enumerate() {
                if w == 0.0 {
                    continue;
                }
                let what = || format!("loss of target {name:?}, output {i}");
                let label = GpuTensor::upload(&self.gpu, label).with_context(what)?;
                let (value, grad) = loss::forward(&losses[t], acts.get(h), &label).with_context(what)?;
                per_target[t] += w * value;
                let g = loss::backward(&grad, acts.get(h), &label, (task_weights[t] * w) as f32)
                    .with_context(what)?;
                acts.accumulate(h, g)?;
            }
        }
        for (dec, recs) in self.decoders.iter().zip(&f.decoders) {
            for (st, r) in dec.iter().zip(recs).rev() {
                if let Some(h) = r.head
                    && let Some(g) = acts.take_grad(h)
                {
                    let gx = st.head.backward(p, acts, &g, r.out, true)?;
                    acts.accumulate(r.out, gx.expect("input gradient requested"))?;
                }
                let Some(mut g) = acts.take_grad(r.out) else { continue };
                for (c, cr) in st.convs.iter().zip(&r.convs).rev() {
                    g = c.backward(p, acts, &g, cr, true)?.expect("input gradient requested");
                }
                let up_channels = acts.get(r.up).shape().last();
                let skip = acts.get(r.cat).shape().last() - up_channels;
                let mut parts = elementwise::concat_channels_backward(&g, &[up_channels, skip])?;
                let gskip = parts.pop().expect("two parts");
                let gup = parts.pop().expect("two parts");
                acts.accumulate(stage_output(f, st.skip_stage), gskip)?;
                let gx = st.upsample.backward(p, acts, &gup, r.below, true)?;
                acts.accumulate(r.below, gx.expect("input gradient requested"))?;
            }
        }
        for (stage, recs) in self.stages.iter().zip(&f.blocks).rev() {
            for (b, r) in stage.iter().zip(recs).rev() {
                b.backward(p, acts, r)?;
            }
        }
        if let Some(g) = acts.take_grad(f.stem.y) {
            self.stem.backward(p, acts, &g, &f.stem, false)?;
        }
        let total = per_target.iter().zip(task_weights).map(|(l, w)| w * l).sum();
        Ok(DeviceLoss { total, per_target })
    }

    /// Every parameter's gradient from the last [`loss_and_backward`](Self::loss_and_backward),
    /// in the store's layouts, zeros where none arrived.
    pub fn gradients(&self) -> Result<Vec<(String, Tensor)>> {
        self.params.gradients()
    }

    /// Every parameter's value, downloaded (for checkpoints), in the store's layouts.
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.params.download()
    }

    /// Re-uploads every parameter from `store` after a host-side optimizer step.
    pub fn load_parameters(&mut self, store: &ParamStore) -> Result<()> {
        self.params.load(store)
    }

    /// Every parameter with its gradient from the last backward (None where none arrived), the
    /// value writable for an optimizer step on the device (`device::kernels::optim`).
    pub fn parameters_mut(&mut self) -> impl Iterator<Item = (&str, &mut GpuTensor, Option<&GpuTensor>)> {
        self.params.trainable_mut()
    }

    /// Inference: the full-resolution output of each target with its activation applied
    /// (`activations` in `targets` order), on the host.
    pub fn predict(&self, x: &Tensor, activations: &[Activation]) -> Result<Vec<Tensor>> {
        ensure!(
            activations.len() == self.arch.targets.len(),
            "predict: {} activations for {} targets",
            activations.len(),
            self.arch.targets.len()
        );
        let x = GpuTensor::upload(&self.gpu, x).context("uploading the network input")?;
        let mut acts = Acts::default();
        let f = self.run(&mut acts, x, false)?;
        heads(&acts, &f)
            .iter()
            .zip(activations)
            .map(|(heads, a)| {
                let y = heads[0];
                match a {
                    Activation::None => y.to_host(),
                    Activation::Sigmoid => activation::sigmoid_forward(y)?.to_host(),
                    Activation::Softmax => activation::softmax_forward(y)?.to_host(),
                }
            })
            .collect()
    }
}

/// The head outputs of forward `f`: per target, full resolution first.
fn heads<'a>(acts: &'a Acts, f: &Forward) -> Vec<Vec<&'a GpuTensor>> {
    f.decoders
        .iter()
        .map(|recs| recs.iter().rev().filter_map(|r| r.head).map(|h| acts.get(h)).collect())
        .collect()
}

/// The channel concatenation of the upsampled `up` and the skip.
fn concat(acts: &mut Acts, up: Id, skip: Id) -> Result<Id> {
    let cat =
        elementwise::concat_channels(&[acts.get(up), acts.get(skip)]).context("decoder concatenation")?;
    Ok(acts.push(cat))
}

/// The output of encoder stage `s` in forward `f`.
fn stage_output(f: &Forward, s: usize) -> Id {
    f.blocks[s].last().map(|r| r.out).expect("every stage has a block")
}
