//! Throughput of the kernels of this module on a kernel device: time per launch (CUDA events) and
//! the effective memory bandwidth, counting each tensor read or written once. These kernels are
//! bandwidth-bound, so GB/s against the card's copy bandwidth says how close each is to its limit.

use anyhow::Result;

use super::{GpuTensor, activation, elementwise, loss, norm, optim, pool, reduce, se};
use crate::device::launch::{Gpu, GpuBuffer};
use crate::device::op::Act;
use crate::device::op::AdamHyper;
use crate::device::op::SoftmaxLoss;
use crate::device::op::{SePool, se_reduced_channels};
use crate::device::shape::Shape;

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
    GpuTensor::from_host(gpu, dims, &pattern(dims.iter().product(), salt))
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
    let mut cache = optim::TableCache::default();
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
        optim::adam_step(gpu, &mut cache, &mut segs, step, &h)
    })?;
    let refs: Vec<&GpuBuffer<f32>> = grads.iter().collect();
    time("gradient norm", &pshape, 4 * total, &mut || optim::grad_norm(gpu, &mut cache, &refs).map(drop))?;
    Ok(rows)
}

/// The activation sizes of ResEncM at a 128^3 patch, batch 2: one per stage.
const RESENC_M_STAGES: [[usize; 5]; 6] = [
    [2, 128, 128, 128, 32],
    [2, 64, 64, 64, 64],
    [2, 32, 32, 32, 128],
    [2, 16, 16, 16, 256],
    [2, 8, 8, 8, 320],
    [2, 4, 4, 4, 320],
];

/// The fused kernels (kernels/{norm,se,loss}.cu): instance norm + leaky ReLU (+ residual) forward
/// and backward and squeeze-excitation at every ResEncM stage size, and nnU-Net's Dice + CE at 2 x
/// 128^3 x 3 classes. GB/s counts each tensor read or written once (not the statistics pass's
/// second read of x).
pub fn run_fused(gpu: &Gpu, opts: &KernelBenchOptions) -> Result<Vec<KernelBenchRow>> {
    let (stages, logits, reps): (Vec<[usize; 5]>, [usize; 5], usize) = if opts.quick {
        (vec![[1, 5, 6, 7, 17]], [1, 5, 6, 7, 3], 1)
    } else {
        (RESENC_M_STAGES.to_vec(), [2, 128, 128, 128, 3], 20)
    };
    let mut rows = Vec::new();
    let mut time = |op: &'static str, dims: &[usize], bytes: usize, f: &mut dyn FnMut() -> Result<()>| {
        let ms = gpu.time_ms(reps, f)?;
        let shape = format!("{dims:?}");
        rows.push(KernelBenchRow { op, shape, ms, gb_per_s: bytes as f64 / (ms * 1e6) });
        anyhow::Ok(())
    };
    let leaky = Act::LeakyRelu(0.01);
    for (i, dims) in stages.iter().enumerate() {
        let c = dims[4];
        let f = 4 * dims.iter().product::<usize>();
        let s = 100 * i;
        let (x, r, gy) = (tensor(gpu, dims, s + 1)?, tensor(gpu, dims, s + 2)?, tensor(gpu, dims, s + 3)?);
        let (gamma, beta) = (tensor(gpu, &[c], s + 4)?, tensor(gpu, &[c], s + 5)?);
        let fwd = |res| norm::instance_norm_forward(&x, &gamma, &beta, 1e-5, leaky, res);
        time("instance norm + lrelu", dims, 2 * f, &mut || fwd(None).map(drop))?;
        time("instance norm + residual + lrelu", dims, 3 * f, &mut || fwd(Some(&r)).map(drop))?;
        let (_, stats) = fwd(None)?;
        time("instance norm + lrelu backward", dims, 3 * f, &mut || {
            norm::instance_norm_backward(&gy, &x, &stats, &gamma, &beta, leaky, None).map(drop)
        })?;
        let (y, stats) = fwd(Some(&r))?;
        time("instance norm + residual + lrelu backward", dims, 5 * f, &mut || {
            norm::instance_norm_backward(&gy, &x, &stats, &gamma, &beta, leaky, Some(&y)).map(drop)
        })?;
        let rd = se_reduced_channels(c);
        let w = [tensor(gpu, &[rd, c], s + 6)?, tensor(gpu, &[rd], s + 7)?, tensor(gpu, &[c, rd], s + 8)?];
        let b2 = tensor(gpu, &[c], s + 9)?;
        let p = se::SeParams { w1: &w[0], b1: &w[1], w2: &w[2], b2: &b2 };
        time("squeeze-excitation", dims, 2 * f, &mut || se::se_forward(&x, &p, SePool::Dhw).map(drop))?;
        let (_, saved) = se::se_forward(&x, &p, SePool::Dhw)?;
        time("squeeze-excitation backward", dims, 3 * f, &mut || {
            se::se_backward(&gy, &x, &p, &saved).map(drop)
        })?;
    }
    let [n, d, h, w, c] = logits;
    let vox = n * d * h * w;
    let x = tensor(gpu, &logits, 900)?;
    let labels: Vec<f32> = (0..vox).map(|i| ((i * 7919) % c) as f32).collect();
    let labels = GpuTensor::from_host(gpu, [n, d, h, w, 1], &labels)?;
    let cfg = SoftmaxLoss {
        ce_scale: 1.0 / vox as f64,
        dice_weight: 1.0,
        batch_dice: true,
        do_bg: false,
        smooth: 1e-5,
    };
    time("softmax dice + CE loss", &logits, 4 * vox * (c + 1), &mut || {
        loss::softmax_loss_forward(&x, &labels, &cfg).map(drop)
    })?;
    let (_, grad) = loss::softmax_loss_forward(&x, &labels, &cfg)?;
    let gy = GpuTensor::full(gpu, Shape::new(&[]), 1.0)?;
    time("softmax dice + CE loss backward", &logits, 4 * vox * (2 * c + 1), &mut || {
        loss::softmax_loss_backward(&x, &labels, &grad, &gy).map(drop)
    })?;
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

/// One conv pass: time per call and the arithmetic rate (2 flops per multiply-add).
#[derive(Clone, Debug)]
pub struct ConvBenchRow {
    pub op: &'static str,
    pub shape: String,
    pub ms: f64,
    pub tflop_per_s: f64,
}

/// Conv layers as (kind, input size, input channels, output channels): "k3s1", "k3s2" (the
/// encoder's downsampling), "k1s1" (the avg-pool + 1x1 shortcut, at the pooled size) and "t2s2"
/// (the decoder's transposed conv), on cubes.
type ConvLayer = (&'static str, usize, usize, usize);

/// The convs of ResEncM at a 128^3 patch (batch 2).
const RESENC_M_CONVS: [ConvLayer; 20] = [
    ("k3s1", 128, 32, 32),
    ("k3s1", 64, 64, 64),
    ("k3s1", 32, 128, 128),
    ("k3s1", 16, 256, 256),
    ("k3s1", 8, 320, 320),
    ("k3s1", 4, 320, 320),
    ("k3s2", 128, 32, 64),
    ("k3s2", 64, 64, 128),
    ("k3s2", 32, 128, 256),
    ("k3s2", 16, 256, 320),
    ("k3s2", 8, 320, 320),
    ("k1s1", 64, 32, 64),
    ("k1s1", 32, 64, 128),
    ("k1s1", 16, 128, 256),
    ("k1s1", 8, 256, 320),
    ("t2s2", 64, 64, 32),
    ("t2s2", 32, 128, 64),
    ("t2s2", 16, 256, 128),
    ("t2s2", 8, 320, 256),
    ("t2s2", 4, 320, 320),
];

/// The op names of the rows, [conv, transposed][fwd, bwd-data, bwd-weight][fp32, tf32]; the same
/// strings as scripts/gpu-bench-torch.py prints, which joins the two tables on (op, shape).
const CONV_OPS: [[[&str; 2]; 3]; 2] = [
    [
        ["conv3d fwd fp32", "conv3d fwd tf32"],
        ["conv3d bwd-data fp32", "conv3d bwd-data tf32"],
        ["conv3d bwd-weight fp32", "conv3d bwd-weight tf32"],
    ],
    [
        ["conv_transpose3d fwd fp32", "conv_transpose3d fwd tf32"],
        ["conv_transpose3d bwd-data fp32", "conv_transpose3d bwd-data tf32"],
        ["conv_transpose3d bwd-weight fp32", "conv_transpose3d bwd-weight tf32"],
    ],
];

/// The conv kernels (kernels/conv.cu) on the ResEncM conv layers: forward, backward-data and
/// backward-weight in fp32 and TF32 (`quick`: one tiny layer of each kind, for the sim).
pub fn run_conv(gpu: &Gpu, opts: &KernelBenchOptions) -> Result<Vec<ConvBenchRow>> {
    use super::conv::{self as kc, ConvPrecision};
    const QUICK: [ConvLayer; 4] =
        [("k3s1", 5, 8, 8), ("k3s2", 6, 8, 16), ("k1s1", 4, 8, 16), ("t2s2", 3, 16, 8)];
    let (layers, n, reps) = if opts.quick { (&QUICK[..], 1, 1) } else { (&RESENC_M_CONVS[..], 2, 5) };
    let mut rows = Vec::new();
    for (i, &(kind, size, cin, cout)) in layers.iter().enumerate() {
        let transposed = kind == "t2s2";
        let (k, s) = match kind {
            "k3s1" => (3, 1),
            "k3s2" => (3, 2),
            "k1s1" => (1, 1),
            _ => (2, 2),
        };
        let (kernel, stride) = ([k; 3], [s; 3]);
        let out = if transposed { size * s } else { (size + 2 * ((k - 1) / 2) - k) / s + 1 };
        let x = tensor(gpu, &[n, size, size, size, cin], 10 * i)?;
        let gy = tensor(gpu, &[n, out, out, out, cout], 10 * i + 1)?;
        let w_dims = if transposed { [cin, k, k, k, cout] } else { [cout, k, k, k, cin] };
        let w = tensor(gpu, &w_dims, 10 * i + 2)?;
        // Multiply-adds: one per (voxel of the strided side, tap, input channel, output channel).
        let macs = n * size.min(out).pow(3) * k.pow(3) * cin * cout;
        let shape = format!("{kind} {n}x{cin}@{size}^3 -> {cout}");
        for (pi, p) in [ConvPrecision::Fp32, ConvPrecision::Tf32].into_iter().enumerate() {
            let passes: [&mut dyn FnMut() -> Result<()>; 3] = if transposed {
                [
                    &mut || kc::conv_transpose3d_forward(&x, &w, None, stride, p).map(drop),
                    &mut || kc::conv_transpose3d_backward_data(&gy, &w, stride, p).map(drop),
                    &mut || kc::conv_transpose3d_backward_weight(&gy, &x, stride, p, false).map(drop),
                ]
            } else {
                [
                    &mut || kc::conv3d_forward(&x, &w, None, stride, p).map(drop),
                    &mut || kc::conv3d_backward_data(&gy, &w, [size; 3], stride, p).map(drop),
                    &mut || kc::conv3d_backward_weight(&gy, &x, kernel, stride, p, false).map(drop),
                ]
            };
            for (pass, f) in passes.into_iter().enumerate() {
                let ms = gpu.time_ms(reps, f)?;
                let op = CONV_OPS[transposed as usize][pass][pi];
                rows.push(ConvBenchRow {
                    op,
                    shape: shape.clone(),
                    ms,
                    tflop_per_s: 2.0 * macs as f64 / (ms * 1e9),
                });
            }
        }
    }
    Ok(rows)
}

/// The conv rows as a Markdown table.
pub fn format_conv_table(gpu: &Gpu, rows: &[ConvBenchRow]) -> String {
    let mut s = format!(
        "Conv throughput on {}\n\n| op | shape | ms | TFLOP/s |\n|---|---|---:|---:|\n",
        gpu.describe()
    );
    for r in rows {
        s.push_str(&format!("| {} | {} | {:.4} | {:.2} |\n", r.op, r.shape, r.ms, r.tflop_per_s));
    }
    s
}

/// Every kernel table on `gpu`: the elementwise / reduction / optimizer and fused norm, SE and loss
/// rows, then the convolution layers. What `unet3d bench kernels` and `cargo bench --bench kernels` print.
pub fn report(gpu: &Gpu, opts: &KernelBenchOptions) -> Result<String> {
    let mut rows = run(gpu, opts)?;
    rows.extend(run_fused(gpu, opts)?);
    let conv = run_conv(gpu, opts)?;
    Ok(format!("{}\n{}", format_table(gpu, &rows), format_conv_table(gpu, &conv)))
}
