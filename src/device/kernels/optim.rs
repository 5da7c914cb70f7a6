//! kernels/optim.cu: SGD (Nesterov) / Adam / AdamW steps and the global gradient norm, each one
//! launch over every parameter. The kernels follow a table of segments (buffer addresses and
//! lengths) and a table of fixed-size chunks, one block per chunk; both tables are built and
//! uploaded per call (a few bytes per parameter), so they can never point at freed buffers.

use anyhow::{Result, ensure};

use crate::device::launch::{Arg, Gpu, GpuBuffer, Kernel, LaunchConfig};
use crate::device::op::{AdamHyper, SgdHyper};

/// Elements per block, as kOptimChunk in kernels/optim.cu.
const CHUNK: usize = 4096;
const THREADS: u32 = 256;

/// One parameter of an SGD step; `momentum` is its buffer, None exactly when momentum is 0.
pub struct SgdParam<'a> {
    pub param: &'a mut GpuBuffer<f32>,
    pub grad: &'a GpuBuffer<f32>,
    pub momentum: Option<&'a mut GpuBuffer<f32>>,
}

/// One parameter of an Adam / AdamW step with its two moment buffers.
pub struct AdamParam<'a> {
    pub param: &'a mut GpuBuffer<f32>,
    pub grad: &'a GpuBuffer<f32>,
    pub exp_avg: &'a mut GpuBuffer<f32>,
    pub exp_avg_sq: &'a mut GpuBuffer<f32>,
}

/// The segment and chunk tables of one launch (kernels/optim.cu's layout).
struct Tables {
    seg: GpuBuffer<u64>,
    chunks: GpuBuffer<u32>,
    count: usize,
}

impl Tables {
    /// `entries`: per parameter its (parameter, gradient, state 1, state 2) addresses (0: none) and
    /// its length.
    fn new(gpu: &Gpu, entries: &[([u64; 4], usize)]) -> Result<Self> {
        let mut seg = Vec::with_capacity(entries.len() * 5);
        let mut chunks = Vec::new();
        for (s, (addrs, len)) in entries.iter().enumerate() {
            seg.extend_from_slice(addrs);
            seg.push(*len as u64);
            let s = u32::try_from(s)?;
            for c in 0..len.div_ceil(CHUNK) {
                chunks.extend_from_slice(&[s, u32::try_from(c)?]);
            }
        }
        let count = chunks.len() / 2;
        Ok(Tables { seg: gpu.upload(&seg)?, chunks: gpu.upload(&chunks)?, count })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig::linear(self.count as u32, THREADS)
    }
}

/// The tables of the last launch and the entries they were built from. Parameters are updated in
/// place and gradients and moments keep their buffers from step to step, so after the first step
/// the tables match and nothing is uploaded; any change of buffer rebuilds them.
#[derive(Default)]
pub struct TableCache {
    entries: Vec<([u64; 4], usize)>,
    tables: Option<Tables>,
}

impl TableCache {
    fn get(&mut self, gpu: &Gpu, entries: Vec<([u64; 4], usize)>) -> Result<&Tables> {
        let stale = match &self.tables {
            Some(t) => self.entries != entries || !t.seg.on(gpu),
            None => true,
        };
        if stale {
            self.tables = Some(Tables::new(gpu, &entries)?);
            self.entries = entries;
        }
        Ok(self.tables.as_ref().expect("set above"))
    }
}

fn check_len(what: &str, i: usize, param: usize, other: usize) -> Result<()> {
    ensure!(param == other, "optimizer step: parameter {i} has {param} elements but its {what} has {other}");
    Ok(())
}

/// One SGD step on every parameter (torch.optim.SGD, dampening 0). `first`: the momentum buffers
/// have not been filled yet, so they are set to the gradient (PyTorch's first step).
pub fn sgd_step(
    gpu: &Gpu,
    cache: &mut TableCache,
    params: &mut [SgdParam<'_>],
    h: &SgdHyper,
    first: bool,
) -> Result<()> {
    let mut entries = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        check_len("gradient", i, p.param.len(), p.grad.len())?;
        let buf = match &p.momentum {
            Some(b) => {
                check_len("momentum buffer", i, p.param.len(), b.len())?;
                b.device_addr()
            }
            None => {
                ensure!(
                    h.momentum == 0.0,
                    "sgd step: parameter {i} has no momentum buffer but momentum is {}",
                    h.momentum
                );
                0
            }
        };
        entries.push(([p.param.device_addr(), p.grad.device_addr(), buf, 0], p.param.len()));
    }
    let t = cache.get(gpu, entries)?;
    if t.count == 0 {
        return Ok(());
    }
    let mut args = vec![
        Arg::read(&t.seg),
        Arg::read(&t.chunks),
        Arg::val(h.lr as f32),
        Arg::val(h.weight_decay as f32),
        Arg::val(h.momentum as f32),
        Arg::val(h.nesterov as i32),
        Arg::val(first as i32),
    ];
    for p in params.iter_mut() {
        args.push(Arg::reached(p.param));
        if let Some(b) = p.momentum.as_deref_mut() {
            args.push(Arg::reached(b));
        }
    }
    gpu.launch(Kernel::OPTIM_SGD, t.launch_config(), &args)
}

/// One Adam (or, with `h.decoupled`, AdamW) step on every parameter; `step` counts the steps taken
/// including this one. The step's scalars are computed in f64 as torch.optim does.
pub fn adam_step(
    gpu: &Gpu,
    cache: &mut TableCache,
    params: &mut [AdamParam<'_>],
    step: u64,
    h: &AdamHyper,
) -> Result<()> {
    ensure!(step >= 1, "adam step: steps count from 1, got {step}");
    let mut entries = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        check_len("gradient", i, p.param.len(), p.grad.len())?;
        check_len("exp_avg", i, p.param.len(), p.exp_avg.len())?;
        check_len("exp_avg_sq", i, p.param.len(), p.exp_avg_sq.len())?;
        let addrs = [
            p.param.device_addr(),
            p.grad.device_addr(),
            p.exp_avg.device_addr(),
            p.exp_avg_sq.device_addr(),
        ];
        entries.push((addrs, p.param.len()));
    }
    let t = cache.get(gpu, entries)?;
    if t.count == 0 {
        return Ok(());
    }
    let (b1, b2) = h.betas;
    let tf = step as f64;
    let step_size = h.lr / (1.0 - b1.powf(tf));
    let bc2_sqrt = (1.0 - b2.powf(tf)).sqrt();
    let (l2, decay) = if h.decoupled { (0.0, 1.0 - h.lr * h.weight_decay) } else { (h.weight_decay, 1.0) };
    let mut args = vec![Arg::read(&t.seg), Arg::read(&t.chunks)];
    for v in [step_size, bc2_sqrt, 1.0 - b1, b2, 1.0 - b2, h.eps, l2, decay] {
        args.push(Arg::val(v as f32));
    }
    for p in params.iter_mut() {
        args.extend([Arg::reached(p.param), Arg::reached(p.exp_avg), Arg::reached(p.exp_avg_sq)]);
    }
    gpu.launch(Kernel::OPTIM_ADAM, t.launch_config(), &args)
}

/// The L2 norm of all gradients together (for clipping), from f64 partial sums in a fixed order.
pub fn grad_norm(gpu: &Gpu, cache: &mut TableCache, grads: &[&GpuBuffer<f32>]) -> Result<f64> {
    let entries: Vec<_> = grads.iter().map(|g| ([0, g.device_addr(), 0, 0], g.len())).collect();
    let t = cache.get(gpu, entries)?;
    if t.count == 0 {
        return Ok(0.0);
    }
    let mut partial = gpu.alloc::<f64>(t.count)?;
    gpu.launch(
        Kernel::OPTIM_GRAD_SUMSQ,
        t.launch_config(),
        &[Arg::read(&t.seg), Arg::read(&t.chunks), Arg::write(&mut partial)],
    )?;
    let mut total = gpu.alloc::<f64>(1)?;
    let args = [Arg::read(&partial), Arg::write(&mut total), Arg::val(t.count as i64)];
    gpu.launch(Kernel::REDUCE_PARTIALS_F64, LaunchConfig::linear(1, THREADS), &args)?;
    Ok(gpu.download(&total)?[0].sqrt())
}
