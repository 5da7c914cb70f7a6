//! The layers of src/nn on a kernel device, each with an explicit forward that records what its
//! backward reads and that backward. Activations live in one [`Acts`] arena indexed by [`Id`];
//! gradients of activations accumulate in a parallel arena, so a tensor read by several layers
//! (a stage output: the next stage and a decoder's skip) sums its gradients without a tape.

use anyhow::{Context, Result, ensure};

use crate::autograd::ParamStore;
use crate::device::cpu::activation::Act;
use crate::device::kernels::conv::{self, ConvPrecision};
use crate::device::kernels::norm::{self, GpuNormStats};
use crate::device::kernels::se::{self, SeParams, SeSaved};
use crate::device::kernels::{GpuTensor, activation, elementwise, pool};
use crate::device::launch::Gpu;
use crate::model::{EncoderBlock, SePool, se_reduced_channels};
use crate::nn::{self, ConvSpec, LayerSettings};
use crate::tensor::{Shape, Tensor};

/// Parity with the CPU reference first: every conv in fp32 on CUDA cores.
const PRECISION: ConvPrecision = ConvPrecision::Fp32;

/// An activation in the arena.
pub(super) type Id = usize;

/// The forward's activations and, during backward, their gradients.
#[derive(Default)]
pub(super) struct Acts {
    values: Vec<GpuTensor>,
    grads: Vec<Option<GpuTensor>>,
}

impl Acts {
    pub fn clear(&mut self) {
        self.values.clear();
        self.grads.clear();
    }

    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }

    pub fn push(&mut self, t: GpuTensor) -> Id {
        self.values.push(t);
        self.grads.push(None);
        self.values.len() - 1
    }

    pub fn get(&self, id: Id) -> &GpuTensor {
        &self.values[id]
    }

    /// Adds `g` to the gradient of activation `id`.
    pub fn accumulate(&mut self, id: Id, g: GpuTensor) -> Result<()> {
        let slot = &mut self.grads[id];
        *slot = Some(match slot.take() {
            Some(prev) => elementwise::add(&prev, &g).context("accumulating an activation gradient")?,
            None => g,
        });
        Ok(())
    }

    /// The gradient of `id`, None when nothing downstream contributed one.
    pub fn take_grad(&mut self, id: Id) -> Option<GpuTensor> {
        self.grads[id].take()
    }
}

/// A device tensor per parameter, in the store's layout, and its gradient after backward.
/// The non-affine norms' fixed gamma = 1, beta = 0 are entries without a store name.
pub(super) struct Params {
    gpu: Gpu,
    names: Vec<Option<String>>,
    values: Vec<GpuTensor>,
    grads: Vec<Option<GpuTensor>>,
}

/// A parameter's index in [`Params`].
type P = usize;

impl Params {
    pub fn new(gpu: &Gpu) -> Self {
        Params { gpu: gpu.clone(), names: Vec::new(), values: Vec::new(), grads: Vec::new() }
    }

    fn insert(&mut self, name: Option<String>, value: GpuTensor) -> P {
        self.names.push(name);
        self.values.push(value);
        self.grads.push(None);
        self.values.len() - 1
    }

    /// Uploads the store's parameter `name`, checked to have `shape`.
    fn bind(&mut self, store: &ParamStore, name: &str, shape: &[usize]) -> Result<P> {
        let id = store.id(name).ok_or_else(|| {
            anyhow::anyhow!(
                "parameter '{name}' (shape {}) is not in the parameter store ({} parameters)",
                Shape::new(shape),
                store.len()
            )
        })?;
        let value = store.value(id);
        ensure!(
            value.dims() == shape,
            "parameter '{name}' has shape {} in the store, but the layer needs {}",
            value.shape(),
            Shape::new(shape)
        );
        let t =
            GpuTensor::upload(&self.gpu, value).with_context(|| format!("uploading parameter '{name}'"))?;
        Ok(self.insert(Some(name.to_string()), t))
    }

    fn constant(&mut self, t: &Tensor) -> Result<P> {
        let t = GpuTensor::upload(&self.gpu, t)?;
        Ok(self.insert(None, t))
    }

    fn get(&self, p: P) -> &GpuTensor {
        &self.values[p]
    }

    fn name(&self, p: P) -> &str {
        self.names[p].as_deref().unwrap_or("(fixed)")
    }

    /// Sets the gradient of `p` (shaped as the parameter); none is kept for fixed entries.
    fn set_grad(&mut self, p: P, g: GpuTensor) -> Result<()> {
        if self.names[p].is_none() {
            return Ok(());
        }
        let g = g.reshape(self.values[p].shape().clone())?;
        let slot = &mut self.grads[p];
        *slot = Some(match slot.take() {
            Some(prev) => elementwise::add(&prev, &g)?,
            None => g,
        });
        Ok(())
    }

    /// Replaces every named parameter's value with the store's (after a host-side update).
    pub fn load(&mut self, store: &ParamStore) -> Result<()> {
        for (name, value) in self.names.iter().zip(&mut self.values) {
            let Some(name) = name else { continue };
            let t = store.id(name).map(|id| store.value(id)).with_context(|| {
                format!("parameter '{name}' is not in the parameter store ({} parameters)", store.len())
            })?;
            ensure!(
                t.dims() == value.dims(),
                "parameter '{name}' has shape {} in the store, but the network holds {}",
                t.shape(),
                value.shape()
            );
            *value =
                GpuTensor::upload(&self.gpu, t).with_context(|| format!("uploading parameter '{name}'"))?;
        }
        Ok(())
    }

    /// Every named parameter's value on the host.
    pub fn download(&self) -> Result<Vec<(String, Tensor)>> {
        self.trainable()
            .map(|(name, value, _)| {
                let t = value.to_host().with_context(|| format!("downloading parameter '{name}'"))?;
                Ok((name.to_string(), t))
            })
            .collect()
    }

    /// Every named parameter with its gradient from the last backward, if one arrived.
    fn trainable(&self) -> impl Iterator<Item = (&str, &GpuTensor, Option<&GpuTensor>)> {
        self.names
            .iter()
            .zip(&self.values)
            .zip(&self.grads)
            .filter_map(|((n, v), g)| Some((n.as_deref()?, v, g.as_ref())))
    }

    /// [`trainable`](Self::trainable) with the values writable, for a device optimizer step.
    pub fn trainable_mut(&mut self) -> impl Iterator<Item = (&str, &mut GpuTensor, Option<&GpuTensor>)> {
        self.names
            .iter()
            .zip(&mut self.values)
            .zip(&self.grads)
            .filter_map(|((n, v), g)| Some((n.as_deref()?, v, g.as_ref())))
    }

    pub fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }

    /// Every named parameter with its gradient on the host, zeros where none arrived.
    pub fn gradients(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for ((name, value), grad) in self.names.iter().zip(&self.values).zip(&self.grads) {
            if let Some(name) = name {
                let g = match grad {
                    Some(g) => {
                        g.to_host().with_context(|| format!("downloading the gradient of '{name}'"))?
                    }
                    None => Tensor::zeros(value.shape().clone()),
                };
                out.push((name.clone(), g));
            }
        }
        Ok(out)
    }
}

/// A conv with "same" padding, or (transposed) the decoder's kernel = stride upsampling.
#[derive(Debug, Clone, Copy)]
pub(super) struct Conv {
    w: P,
    b: Option<P>,
    kernel: [usize; 3],
    stride: [usize; 3],
    transposed: bool,
}

impl Conv {
    pub fn bind(p: &mut Params, store: &ParamStore, prefix: &str, spec: ConvSpec) -> Result<Self> {
        let ConvSpec { cin, cout, kernel: [t, r, s], stride, bias } = spec;
        let w = p.bind(store, &format!("{prefix}.weight"), &[cout, t, r, s, cin])?;
        let b = bias.then(|| p.bind(store, &format!("{prefix}.bias"), &[cout])).transpose()?;
        Ok(Conv { w, b, kernel: spec.kernel, stride, transposed: false })
    }

    pub fn bind_transposed(
        p: &mut Params,
        store: &ParamStore,
        prefix: &str,
        [cin, cout]: [usize; 2],
        stride: [usize; 3],
        bias: bool,
    ) -> Result<Self> {
        let w = p.bind(store, &format!("{prefix}.weight"), &[cin, stride[0], stride[1], stride[2], cout])?;
        let b = bias.then(|| p.bind(store, &format!("{prefix}.bias"), &[cout])).transpose()?;
        Ok(Conv { w, b, kernel: stride, stride, transposed: true })
    }

    fn layer(&self, p: &Params) -> String {
        let w = p.name(self.w);
        format!("layer {}", w.strip_suffix(".weight").unwrap_or(w))
    }

    pub fn forward(&self, p: &Params, acts: &mut Acts, x: Id) -> Result<Id> {
        let (w, b, x) = (p.get(self.w), self.b.map(|b| p.get(b)), acts.get(x));
        let y = if self.transposed {
            conv::conv_transpose3d_forward(x, w, b, self.stride, PRECISION)
        } else {
            conv::conv3d_forward(x, w, b, self.stride, PRECISION)
        };
        Ok(acts.push(y.with_context(|| self.layer(p))?))
    }

    /// Sets the weight and bias gradients from the output gradient `gy`; returns the input's
    /// gradient when `input_grad`.
    pub fn backward(
        &self,
        p: &mut Params,
        acts: &Acts,
        gy: &GpuTensor,
        x: Id,
        input_grad: bool,
    ) -> Result<Option<GpuTensor>> {
        let (xt, w, bias) = (acts.get(x), p.get(self.w), self.b.is_some());
        let layer = || format!("backward of {}", self.layer(p));
        let ((gw, gb), gx) = if self.transposed {
            let wg = conv::conv_transpose3d_backward_weight(gy, xt, self.stride, PRECISION, bias);
            let gx = input_grad.then(|| conv::conv_transpose3d_backward_data(gy, w, self.stride, PRECISION));
            (wg.with_context(layer)?, gx.transpose().with_context(layer)?)
        } else {
            let wg = conv::conv3d_backward_weight(gy, xt, self.kernel, self.stride, PRECISION, bias);
            let [_, d, h, wd, _] = xt.shape().ndhwc()?;
            let gx =
                input_grad.then(|| conv::conv3d_backward_data(gy, w, [d, h, wd], self.stride, PRECISION));
            (wg.with_context(layer)?, gx.transpose().with_context(layer)?)
        };
        p.set_grad(self.w, gw)?;
        if let (Some(b), Some(gb)) = (self.b, gb) {
            p.set_grad(b, gb)?;
        }
        Ok(gx)
    }
}

/// Instance norm fused with its activation (and, for BasicBlockD without SE, the residual add).
#[derive(Debug, Clone, Copy)]
struct InstanceNorm {
    gamma: P,
    beta: P,
    eps: f64,
}

impl InstanceNorm {
    fn bind(p: &mut Params, store: &ParamStore, prefix: &str, c: usize, s: &LayerSettings) -> Result<Self> {
        let (gamma, beta) = if s.norm_affine {
            (
                p.bind(store, &format!("{prefix}.weight"), &[c])?,
                p.bind(store, &format!("{prefix}.bias"), &[c])?,
            )
        } else {
            (p.constant(&Tensor::full([c], 1.0))?, p.constant(&Tensor::zeros([c]))?)
        };
        Ok(InstanceNorm { gamma, beta, eps: s.norm_eps })
    }
}

/// What a [`ConvNormAct`] forward keeps: its input, the conv output, the statistics, the output.
pub(super) struct ConvNormActRec {
    x: Id,
    z: Id,
    stats: GpuNormStats,
    pub y: Id,
}

/// conv -> instance norm -> activation, as `nn::ConvNormAct`.
#[derive(Debug, Clone)]
pub(super) struct ConvNormAct {
    name: String,
    conv: Conv,
    norm: InstanceNorm,
    act: Act,
}

impl ConvNormAct {
    pub fn bind(
        p: &mut Params,
        store: &ParamStore,
        prefix: &str,
        spec: ConvSpec,
        s: &LayerSettings,
        act: Act,
    ) -> Result<Self> {
        let conv = Conv::bind(p, store, &format!("{prefix}.conv"), spec)?;
        let norm = InstanceNorm::bind(p, store, &format!("{prefix}.norm"), spec.cout, s)?;
        Ok(ConvNormAct { name: prefix.to_string(), conv, norm, act })
    }

    /// The forward of `x`; with `residual` (and `act` in place of the layer's own) the fused
    /// `act(norm(conv(x)) + residual)` of BasicBlockD's last norm.
    fn forward_fused(
        &self,
        p: &Params,
        acts: &mut Acts,
        x: Id,
        residual: Option<(Id, Act)>,
    ) -> Result<ConvNormActRec> {
        let z = self.conv.forward(p, acts, x)?;
        let (act, res) = match residual {
            Some((r, act)) => (act, Some(acts.get(r))),
            None => (self.act, None),
        };
        let n = &self.norm;
        let (y, stats) =
            norm::instance_norm_forward(acts.get(z), p.get(n.gamma), p.get(n.beta), n.eps, act, res)
                .with_context(|| format!("norm of layer {}", self.name))?;
        Ok(ConvNormActRec { x, z, stats, y: acts.push(y) })
    }

    pub fn forward(&self, p: &Params, acts: &mut Acts, x: Id) -> Result<ConvNormActRec> {
        self.forward_fused(p, acts, x, None)
    }

    /// Backward from the output gradient `gy`: parameter gradients set, the input's gradient
    /// returned when `input_grad`, and with `residual` (as in the forward) the residual's.
    fn backward_fused(
        &self,
        p: &mut Params,
        acts: &Acts,
        gy: &GpuTensor,
        rec: &ConvNormActRec,
        residual: Option<Act>,
        input_grad: bool,
    ) -> Result<(Option<GpuTensor>, Option<GpuTensor>)> {
        let n = &self.norm;
        let (act, y) = match residual {
            Some(act) => (act, Some(acts.get(rec.y))),
            None => (self.act, None),
        };
        let g = norm::instance_norm_backward(
            gy,
            acts.get(rec.z),
            &rec.stats,
            p.get(n.gamma),
            p.get(n.beta),
            act,
            y,
        )
        .with_context(|| format!("backward of the norm of layer {}", self.name))?;
        p.set_grad(n.gamma, g.dgamma)?;
        p.set_grad(n.beta, g.dbeta)?;
        let gx = self.conv.backward(p, acts, &g.gx, rec.x, input_grad)?;
        Ok((gx, g.dresidual))
    }

    pub fn backward(
        &self,
        p: &mut Params,
        acts: &Acts,
        gy: &GpuTensor,
        rec: &ConvNormActRec,
        input_grad: bool,
    ) -> Result<Option<GpuTensor>> {
        Ok(self.backward_fused(p, acts, gy, rec, None, input_grad)?.0)
    }
}

/// Squeeze-excitation, as `nn::SqueezeExcite`.
#[derive(Debug, Clone)]
struct SqueezeExcite {
    name: String,
    fc: [P; 4],
    pool: SePool,
}

impl SqueezeExcite {
    fn bind(p: &mut Params, store: &ParamStore, prefix: &str, c: usize, pool: SePool) -> Result<Self> {
        let rd = se_reduced_channels(c);
        let fc = [
            p.bind(store, &format!("{prefix}.fc1.weight"), &[rd, 1, 1, 1, c])?,
            p.bind(store, &format!("{prefix}.fc1.bias"), &[rd])?,
            p.bind(store, &format!("{prefix}.fc2.weight"), &[c, 1, 1, 1, rd])?,
            p.bind(store, &format!("{prefix}.fc2.bias"), &[c])?,
        ];
        Ok(SqueezeExcite { name: prefix.to_string(), fc, pool })
    }

    fn params<'a>(&self, p: &'a Params) -> SeParams<'a> {
        let [w1, b1, w2, b2] = self.fc.map(|i| p.get(i));
        SeParams { w1, b1, w2, b2 }
    }
}

/// What a residual block's forward keeps.
pub(super) struct BlockRec {
    x: Id,
    branch: Vec<ConvNormActRec>,
    /// With SE: the branch before SE, what SE saved, and the sum before the activation.
    se: Option<(Id, SeSaved, Id)>,
    pooled: Option<Id>,
    projection: Option<ConvNormActRec>,
    pub out: Id,
}

/// BasicBlockD or BottleneckD with the ResNet-D shortcut, as `nn::ResidualBlock`.
#[derive(Debug, Clone)]
pub(super) struct ResidualBlock {
    name: String,
    branch: Vec<ConvNormAct>,
    se: Option<SqueezeExcite>,
    pool: Option<[usize; 3]>,
    projection: Option<ConvNormAct>,
    act: Act,
}

impl ResidualBlock {
    pub fn bind(
        p: &mut Params,
        store: &ParamStore,
        prefix: &str,
        b: &EncoderBlock,
        s: &LayerSettings,
    ) -> Result<Self> {
        let (cin, cout) = (b.in_channels, b.out_channels);
        let mut branch = Vec::new();
        for (name, spec, act) in nn::ResidualBlock::branch_convs(prefix, b, s) {
            branch.push(ConvNormAct::bind(p, store, &name, spec, s, act)?);
        }
        let se = s
            .squeeze_excitation
            .map(|pool| SqueezeExcite::bind(p, store, &format!("{prefix}.squeeze_excitation"), cout, pool))
            .transpose()?;
        let pool = b.skip_pools().then_some(b.stride);
        let projection = if b.skip_projects() {
            let name = format!("{prefix}.skip.{}", usize::from(pool.is_some()));
            let spec = ConvSpec::pointwise(cin, cout, false);
            Some(ConvNormAct::bind(p, store, &name, spec, s, Act::None)?)
        } else {
            None
        };
        Ok(ResidualBlock { name: prefix.to_string(), branch, se, pool, projection, act: s.act })
    }

    pub fn forward(&self, p: &Params, acts: &mut Acts, x: Id) -> Result<BlockRec> {
        let pooled = match self.pool {
            Some(k) => Some(acts.push(pool::avg_pool(acts.get(x), k).with_context(|| self.at("skip pool"))?)),
            None => None,
        };
        let projection = match &self.projection {
            Some(c) => Some(c.forward(p, acts, pooled.unwrap_or(x))?),
            None => None,
        };
        let skip = projection.as_ref().map(|r| r.y).or(pooled).unwrap_or(x);
        let (last, inner) = self.branch.split_last().expect("a residual branch has convs");
        let mut branch = Vec::with_capacity(self.branch.len());
        let mut y = x;
        for c in inner {
            let rec = c.forward(p, acts, y)?;
            y = rec.y;
            branch.push(rec);
        }
        let (se, out) = match &self.se {
            None => {
                let rec = last.forward_fused(p, acts, y, Some((skip, self.act)))?;
                let out = rec.y;
                branch.push(rec);
                (None, out)
            }
            Some(se) => {
                let rec = last.forward(p, acts, y)?;
                let b = rec.y;
                branch.push(rec);
                let (e, saved) = se::se_forward(acts.get(b), &se.params(p), se.pool)
                    .with_context(|| format!("layer {}", se.name))?;
                let sum = elementwise::add(&e, acts.get(skip)).with_context(|| self.at("residual add"))?;
                let out = activation::act_forward(&sum, self.act)?;
                (Some((b, saved, acts.push(sum))), acts.push(out))
            }
        };
        Ok(BlockRec { x, branch, se, pooled, projection, out })
    }

    fn at(&self, what: &str) -> String {
        format!("{what} of {}", self.name)
    }

    /// Adds the gradient of the block's input to `acts`, from the gradient of its output.
    pub fn backward(&self, p: &mut Params, acts: &mut Acts, rec: &BlockRec) -> Result<()> {
        let x = rec.x;
        let Some(gout) = acts.take_grad(rec.out) else { return Ok(()) };
        let (last, inner) = self.branch.split_last().expect("a residual branch has convs");
        let last_rec = rec.branch.last().expect("a residual branch has records");
        let (mut g, gskip) = match (&self.se, &rec.se) {
            (Some(se), Some((b, saved, sum))) => {
                let gsum = activation::act_backward(&gout, acts.get(*sum), self.act)?;
                let sg = se::se_backward(&gsum, acts.get(*b), &se.params(p), saved)
                    .with_context(|| format!("backward of layer {}", se.name))?;
                for (i, g) in se.fc.into_iter().zip([sg.gw1, sg.gb1, sg.gw2, sg.gb2]) {
                    p.set_grad(i, g)?;
                }
                (last.backward(p, acts, &sg.gx, last_rec, true)?, gsum)
            }
            _ => {
                let (gx, gres) = last.backward_fused(p, acts, &gout, last_rec, Some(self.act), true)?;
                (gx, gres.context("the fused residual norm returns the residual's gradient")?)
            }
        };
        for (c, r) in inner.iter().zip(&rec.branch).rev() {
            let gy = g.take().expect("conv backward returns the input gradient");
            g = c.backward(p, acts, &gy, r, true)?;
        }
        let mut gskip = match (&self.projection, &rec.projection) {
            (Some(c), Some(r)) => c.backward(p, acts, &gskip, r, true)?.expect("input gradient requested"),
            _ => gskip,
        };
        if let (Some(k), Some(_)) = (self.pool, rec.pooled) {
            gskip = pool::avg_pool_backward(&gskip, acts.get(x).shape().clone(), k)
                .with_context(|| self.at("backward of the skip pool"))?;
        }
        acts.accumulate(x, g.expect("conv backward returns the input gradient"))?;
        acts.accumulate(x, gskip)
    }
}
