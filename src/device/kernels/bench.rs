//! Throughput of the kernels of this module on a kernel device: time per launch (CUDA events) and
//! the effective memory bandwidth, counting each tensor read or written once. These kernels are
//! bandwidth-bound, so GB/s against the card's copy bandwidth says how close each is to its limit.

use anyhow::Result;

use super::{GpuTensor, activation, elementwise, optim, pool, reduce};
use crate::device::cpu::activation::Act;
use crate::device::cpu::optim::AdamHyper;
use crate::device::launch::{Gpu, GpuBuffer};
use crate::tensor::Tensor;

/// One measured kernel (or short sequence of launches making one op).
#[derive(Clone, Debug)]
pub struct KernelBenchRow {
    pub op: &'static str,
    pub shape: String,
    pub ms: f64,
    pub gb_per_s: f64,
}

/// Sizes of one benchmark run: `quick` is for the sim and smoke tests.
pub struct KernelBenchOptions {
    pub quick: bool,
}

fn pattern(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn tensor(gpu: &Gpu, dims: &[usize], salt: usize) -> Result<GpuTensor> {
    GpuTensor::upload(gpu, &Tensor::from_vec(dims, pattern(dims.iter().product(), salt))?)
}

/// Runs every benchmark on `gpu`.
pub fn run(gpu: &Gpu, opts: &KernelBenchOptions) -> Result<Vec<KernelBenchRow>> {
    let (dims, reps, params) = if opts.quick {
        ([1, 8, 8, 6, 8], 1, vec![3000, 5000])
    } else {
        // A 128^3 patch at the first stage of ResEncM (batch 2, 32 channels), and about as many
        // parameters as ResEncM has.
        ([2, 128, 128, 128, 32], 20, vec![320 * 320 * 27; 80])
    };
    let [n, d, h, w, c] = dims;
    let elems = dims.iter().product::<usize>();
    let shape = format!("{dims:?}");
    let mut rows = Vec::new();
    let mut time = |op: &'static str,
                    shape: &str,
                    bytes: usize,
                    f: &mut dyn FnMut() -> Result<()>|
     -> Result<()> {
        let ms = gpu.time_ms(reps, f)?;
        rows.push(KernelBenchRow { op, shape: shape.to_string(), ms, gb_per_s: bytes as f64 / (ms * 1e6) });
        Ok(())
    };
    let (a, b, g) = (tensor(gpu, &dims, 1)?, tensor(gpu, &dims, 2)?, tensor(gpu, &dims, 3)?);
    let gate = tensor(gpu, &[n, 1, 1, 1, c], 4)?;
    let f = 4 * elems;
    time("add", &shape, 3 * f, &mut || elementwise::add(&a, &b).map(drop))?;
    time("mul", &shape, 3 * f, &mut || elementwise::mul(&a, &b).map(drop))?;
    time("gate multiply (N,1,1,1,C)", &shape, 2 * f, &mut || elementwise::bcast_mul(&a, &gate).map(drop))?;
    time("gate multiply backward", &shape, 5 * f, &mut || {
        elementwise::bcast_mul_backward(&g, &a, &gate).map(drop)
    })?;
    let leaky = Act::LeakyRelu(0.01);
    time("leaky relu", &shape, 2 * f, &mut || activation::act_forward(&a, leaky).map(drop))?;
    time("leaky relu backward", &shape, 3 * f, &mut || activation::act_backward(&g, &a, leaky).map(drop))?;
    time("sigmoid", &shape, 2 * f, &mut || activation::sigmoid_forward(&a).map(drop))?;
    time("softmax over channels", &shape, 2 * f, &mut || activation::softmax_forward(&a).map(drop))?;
    time("spatial mean", &shape, f, &mut || reduce::mean_over(&a, [n, 1, 1, 1, c]).map(drop))?;
    time("avg pool 2x2x2", &shape, f + f / 8, &mut || pool::avg_pool(&a, [2, 2, 2]).map(drop))?;
    let half = [n, d, h, w, c / 2];
    let (p1, p2) = (tensor(gpu, &half, 5)?, tensor(gpu, &half, 6)?);
    time("concat channels", &format!("2 x {half:?}"), 2 * f, &mut || {
        elementwise::concat_channels(&[&p1, &p2]).map(drop)
    })?;

    let total: usize = params.iter().sum();
    let up = |salt: usize| -> Result<Vec<GpuBuffer<f32>>> {
        params.iter().enumerate().map(|(i, &len)| gpu.upload(&pattern(len, salt + i))).collect()
    };
    let (mut p, grads, mut m, mut v) = (up(10)?, up(20)?, up(30)?, up(40)?);
    let pshape = format!("{} tensors, {total} parameters", params.len());
    let h = AdamHyper { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, decoupled: true };
    let mut step = 0u64;
    time("adamw step", &pshape, 7 * 4 * total, &mut || {
        step += 1;
        let mut segs: Vec<optim::AdamParam> = p
            .iter_mut()
            .zip(&grads)
            .zip(m.iter_mut().zip(v.iter_mut()))
            .map(|((param, grad), (exp_avg, exp_avg_sq))| optim::AdamParam {
                param,
                grad,
                exp_avg,
                exp_avg_sq,
            })
            .collect();
        optim::adam_step(gpu, &mut segs, step, &h)
    })?;
    let refs: Vec<&GpuBuffer<f32>> = grads.iter().collect();
    time("gradient norm", &pshape, 4 * total, &mut || optim::grad_norm(gpu, &refs).map(drop))?;
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn format_table(gpu: &Gpu, rows: &[KernelBenchRow]) -> String {
    let mut s = format!(
        "Kernel throughput on {}\n\n| op | shape | ms | GB/s |\n|---|---|---:|---:|\n",
        gpu.describe()
    );
    for r in rows {
        s.push_str(&format!("| {} | {} | {:.4} | {:.1} |\n", r.op, r.shape, r.ms, r.gb_per_s));
    }
    s
}
