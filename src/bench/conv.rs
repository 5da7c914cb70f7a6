//! conv3d throughput on nnU-Net ResEncM encoder shapes (k3 s1, batch 2), side by side with the
//! naive loop and with the `gemm` crate on a plain matrix multiply of the same size, so that the
//! fraction of what this machine can do is visible.
//!
//! GFLOP/s count useful work only: 2 x C_in x C_out per (output voxel, tap inside the input), so
//! the multiplications by padding zeros that the GEMM formulation performs earn nothing and sizes
//! with different border fractions compare fairly. The naive loop runs on a smaller volume of the
//! same channel counts (it would take minutes at full size); its GFLOP/s are still comparable.

use super::median_secs;
use crate::device::cpu::conv;
use crate::device::cpu::gemm::{Mat, matmul};
use crate::device::cpu::naive;
use crate::device::op::ConvDims;
use rayon::prelude::*;
use std::fmt::Write;

/// Options of [`run`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvBenchOptions {
    /// Half the spatial sizes and fewer repetitions: a smoke run in seconds.
    pub quick: bool,
    /// Size of the rayon pool to measure with; None uses rayon's default (all cores).
    pub threads: Option<usize>,
}

/// The pass of a convolution being timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    BackwardData,
    BackwardWeight,
}

impl Pass {
    pub const ALL: [Pass; 3] = [Pass::Forward, Pass::BackwardData, Pass::BackwardWeight];

    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::BackwardData => "bwd-data",
            Pass::BackwardWeight => "bwd-weight",
        }
    }
}

/// One timed measurement.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Median seconds per call.
    pub secs: f64,
    pub gflops: f64,
}

impl Timing {
    fn of(flops: f64, secs: f64) -> Self {
        Timing { secs, gflops: flops / secs / 1e9 }
    }
}

/// One row of the table: one pass of one conv shape.
#[derive(Clone, Debug)]
pub struct ConvRow {
    pub pass: Pass,
    /// The timed conv (C_in = C_out = channels, kernel 3, stride 1).
    pub dims: ConvDims,
    pub fast: Timing,
    /// The `gemm` crate on the (m, n, k) multiply this pass amounts to.
    pub gemm: Timing,
    pub gemm_mnk: [usize; 3],
    /// The naive loop, on `naive_dims` (smaller volume, same channels).
    pub naive: Timing,
    pub naive_dims: ConvDims,
}

/// Batch and (channels, edge) of the ResEncM stages timed.
const BATCH: usize = 2;
const STAGES: [(usize, usize); 4] = [(32, 64), (64, 32), (128, 16), (320, 4)];
/// Elements above which the GEMM reference shortens its long dimension (same n and k): the full
/// im2col matrix of the largest stage would take 1.8 GB, and the GEMM rate is flat long before.
const GEMM_MAX_ELEMS: usize = 1 << 25;

fn k3(n: usize, edge: usize, channels: usize) -> ConvDims {
    ConvDims { n, input: [edge; 3], cin: channels, cout: channels, kernel: [3; 3], stride: [1; 3] }
}

/// Useful flops of one pass of `d` (every pass does the same multiply-adds).
pub fn useful_flops(d: &ConvDims) -> f64 {
    let out = d.output();
    let pad = d.pad();
    let per_axis = (0..3).map(|a| {
        (0..out[a])
            .map(|o| {
                let start = (o * d.stride[a]) as isize - pad[a] as isize;
                (0..d.kernel[a] as isize).filter(|t| (0..d.input[a] as isize).contains(&(start + t))).count()
            })
            .sum::<usize>() as f64
    });
    2.0 * d.n as f64 * per_axis.product::<f64>() * (d.cin * d.cout) as f64
}

/// Deterministic values in [-1, 1].
fn filler(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 + seed * 104729) % 2001) as f32 / 1000.0 - 1.0).collect()
}

/// Operands of one conv: (x, w, y) with y standing in for gy in the backward passes.
fn operands(d: &ConvDims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (filler(d.x_len(), 1), filler(d.w_len(), 2), filler(d.y_len(), 3))
}

/// Times one pass of `d`, fast or naive (the output buffer doubles as gy in the backward passes).
fn time_pass(d: &ConvDims, pass: Pass, reps: usize, naive_impl: bool) -> Timing {
    let (mut x, mut w, mut y) = operands(d);
    let secs = median_secs(reps, || match (pass, naive_impl) {
        (Pass::Forward, false) => conv::conv3d_forward(&mut y, &x, &w, None, d),
        (Pass::Forward, true) => naive::conv3d_forward(&mut y, &x, &w, None, d),
        (Pass::BackwardData, false) => conv::conv3d_backward_data(&mut x, &y, &w, d),
        (Pass::BackwardData, true) => naive::conv3d_backward_data(&mut x, &y, &w, d),
        (Pass::BackwardWeight, false) => conv::conv3d_backward_weight(&mut w, &y, &x, d),
        (Pass::BackwardWeight, true) => naive::conv3d_backward_weight(&mut w, &y, &x, d),
    });
    Timing::of(useful_flops(d), secs)
}

/// The (m, n, k) of the plain multiply a pass amounts to, with the long side shortened so that
/// no operand exceeds [`GEMM_MAX_ELEMS`].
fn gemm_shape(d: &ConvDims, pass: Pass) -> [usize; 3] {
    let voxels = d.n * d.output().iter().product::<usize>();
    let cols = 27 * d.cin;
    let long = voxels.min((GEMM_MAX_ELEMS / cols).max(1));
    match pass {
        Pass::Forward | Pass::BackwardData => [long, d.cout, cols],
        Pass::BackwardWeight => [d.cout, cols, long],
    }
}

/// Times the `gemm` crate on the `m x n x k` multiply with the operand layouts the conv kernels
/// use for `pass` (im2col rows times the transposed weight; gy transposed times im2col rows), on
/// every thread of the current pool: the better of the crate's own threading and a split of the
/// rows of `c` into one single-threaded multiply per thread (the crate's threading cannot split
/// a narrow output, and the split is what the conv kernels do).
fn time_gemm(pass: Pass, [m, n, k]: [usize; 3], reps: usize) -> Timing {
    let a = filler(m * k, 4);
    let b = filler(k * n, 5);
    let mut c = vec![0.0f32; m * n];
    let threads = rayon::current_num_threads();
    let operands = |rows: std::ops::Range<usize>| match pass {
        Pass::Forward | Pass::BackwardData => {
            (Mat::new(&a[rows.start * k..rows.end * k], rows.len(), k), Mat::new(&b, n, k).t())
        }
        Pass::BackwardWeight => {
            let lhs = Mat { data: &a[rows.start..], rows: k, cols: rows.len(), ld: m, trans: true };
            (lhs, Mat::new(&b, k, n))
        }
    };
    let own = median_secs(reps, || {
        let (lhs, rhs) = operands(0..m);
        matmul(&mut c, n, lhs, rhs, false, threads)
    });
    let per = m.div_ceil(threads);
    let split = median_secs(reps, || {
        c.par_chunks_mut(per * n).enumerate().for_each(|(i, ct)| {
            let (lhs, rhs) = operands(i * per..i * per + ct.len() / n);
            matmul(ct, n, lhs, rhs, false, 1)
        })
    });
    Timing::of(2.0 * (m * n * k) as f64, own.min(split))
}

/// A smaller volume of the same channels whose naive pass does at most `budget` flops.
fn naive_dims(d: &ConvDims, budget: f64) -> ConvDims {
    let mut small = *d;
    while useful_flops(&small) > budget && small.input[0] > 4 {
        small.input = small.input.map(|e| e / 2);
    }
    if useful_flops(&small) > budget {
        small.n = 1;
    }
    small
}

/// The measured table, with the machine's GEMM peak to put the rows in proportion.
#[derive(Clone, Debug)]
pub struct ConvBench {
    pub threads: usize,
    /// The `gemm` crate on a square multiply of side `peak_side`, on every thread.
    pub peak: Timing,
    pub peak_side: usize,
    pub rows: Vec<ConvRow>,
}

/// Measures every pass of every stage; see the module docs for what is counted.
pub fn run(opts: &ConvBenchOptions) -> anyhow::Result<ConvBench> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = opts.threads {
        anyhow::ensure!(t > 0, "bench conv: --threads must be at least 1");
        pool = pool.num_threads(t);
    }
    let pool = pool.build()?;
    let (reps, naive_reps, budget, peak_side) =
        if opts.quick { (2, 1, 2e7, 1024) } else { (5, 3, 2e8, 2048) };
    pool.install(|| {
        let peak = time_gemm(Pass::Forward, [peak_side; 3], reps);
        let mut rows = Vec::new();
        for (channels, edge) in STAGES {
            let edge = if opts.quick { (edge / 2).max(4) } else { edge };
            let dims = k3(BATCH, edge, channels);
            let small = naive_dims(&dims, budget);
            for pass in Pass::ALL {
                let gemm_mnk = gemm_shape(&dims, pass);
                rows.push(ConvRow {
                    pass,
                    dims,
                    fast: time_pass(&dims, pass, reps, false),
                    gemm: time_gemm(pass, gemm_mnk, reps),
                    gemm_mnk,
                    naive: time_pass(&small, pass, naive_reps, true),
                    naive_dims: small,
                });
            }
        }
        Ok(ConvBench { threads: rayon::current_num_threads(), peak, peak_side, rows })
    })
}

fn volume(d: &ConvDims) -> String {
    format!("{}x{}^3x{}", d.n, d.input[0], d.cin)
}

/// The table as plain text with a legend.
pub fn format_table(b: &ConvBench) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "conv3d k3 s1 (ResEncM stages, batch {BATCH}), f32, {} threads; GFLOP/s of useful work.\n\
         gemm crate peak (square {side}^3 multiply): {:.1} GFLOP/s",
        b.threads,
        b.peak.gflops,
        side = b.peak_side,
    );
    let _ = writeln!(
        s,
        "{:<14} {:<10} {:>8} {:>8} {:>16} {:>8} {:>7} {:>7} {:>13} {:>7} {:>7}",
        "volume NxD^3xC",
        "pass",
        "ms",
        "GFLOP/s",
        "gemm m,n,k",
        "gemm",
        "vs gemm",
        "vs peak",
        "naive at",
        "naive",
        "speedup"
    );
    for r in &b.rows {
        let [m, n, k] = r.gemm_mnk;
        let _ = writeln!(
            s,
            "{:<14} {:<10} {:>8.2} {:>8.1} {:>16} {:>8.1} {:>6.0}% {:>6.0}% {:>13} {:>7.2} {:>6.0}x",
            volume(&r.dims),
            r.pass.name(),
            r.fast.secs * 1e3,
            r.fast.gflops,
            format!("{m},{n},{k}"),
            r.gemm.gflops,
            100.0 * r.fast.gflops / r.gemm.gflops,
            100.0 * r.fast.gflops / b.peak.gflops,
            volume(&r.naive_dims),
            r.naive.gflops,
            r.fast.gflops / r.naive.gflops,
        );
    }
    let _ = writeln!(
        s,
        "gemm = the gemm crate on the multiply the pass amounts to (long side capped at {GEMM_MAX_ELEMS} operand \
         elements); naive = nested loops, timed on the smaller volume shown (same channels)."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn useful_flops_skip_padding_taps() {
        // 1-voxel input, k3 "same": only the centre tap is inside.
        let d = k3(1, 1, 2);
        assert_eq!(useful_flops(&d), 2.0 * 4.0);
        // Edge 4: per axis 2 + 3 + 3 + 2 taps inside.
        let d = k3(2, 4, 1);
        assert_eq!(useful_flops(&d), 2.0 * 2.0 * 1000.0);
    }

    #[test]
    fn naive_volume_shrinks_to_budget() {
        let d = k3(2, 64, 32);
        let s = naive_dims(&d, 2e8);
        assert!(useful_flops(&s) <= 2e8 && s.cin == 32 && s.input[0] < 64, "{s:?}");
    }
}
