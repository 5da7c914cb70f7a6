//! Instance normalisation over channels-last data, optionally fused with a leaky-ReLU-family
//! activation: statistics in one Welford pass, then one pass that normalises, scales, shifts and
//! activates; the backward needs two (the per-channel sums, then the input gradient).
//!
//! Data is (N, S, C) with S = D*H*W voxels. Every pass walks memory in order and keeps per-channel
//! vectors, parallel over samples and over blocks of voxels.

use super::Real;
use super::elementwise::for_units;
use super::reduce::{f64_of, reduce_rows, sum_rows};
use crate::device::op::Act;

/// Per-(sample, channel) mean and 1/sqrt(var + eps), `n * c` each, saved for the backward.
#[derive(Clone, Debug)]
pub struct NormStats<T> {
    pub mean: Vec<T>,
    pub rstd: Vec<T>,
}

/// Count, per-channel mean and per-channel sum of squared deviations of a block of voxels.
struct Welford {
    count: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Welford {
    fn new(c: usize) -> Self {
        Welford { count: 0.0, mean: vec![0.0; c], m2: vec![0.0; c] }
    }

    /// Adds one voxel's channel vector; the count, and so the reciprocal, is shared by all channels.
    fn push<T: Real>(&mut self, v: &[T]) {
        self.count += 1.0;
        let inv = 1.0 / self.count;
        for ((m, m2), &x) in self.mean.iter_mut().zip(&mut self.m2).zip(v) {
            let x = f64_of(x);
            let d = x - *m;
            *m += d * inv;
            *m2 += d * (x - *m);
        }
    }

    /// Chan et al.'s combination of two disjoint blocks.
    fn merge(&mut self, o: Welford) {
        if o.count == 0.0 {
            return;
        }
        let n = self.count + o.count;
        let wb = o.count / n;
        for (((m, m2), om), om2) in self.mean.iter_mut().zip(&mut self.m2).zip(o.mean).zip(o.m2) {
            let d = om - *m;
            *m += d * wb;
            *m2 += om2 + d * d * self.count * wb;
        }
        self.count = n;
    }
}

/// (samples, voxels per sample) of channels-last data of `len` elements with `c` channels.
fn dims(len: usize, n: usize, c: usize) -> (usize, usize) {
    assert!(
        n > 0 && c > 0 && len.is_multiple_of(n * c),
        "instance norm: {len} elements are not n={n} x c={c} x voxels"
    );
    (n, len / (n * c))
}

/// Runs `f(sample, first_voxel, out)` over channels-last `out` (`s` voxels of `c` channels per
/// sample) in parallel runs cut so that none straddles two samples.
fn for_sample_runs<T: Send>(out: &mut [T], s: usize, c: usize, f: impl Fn(usize, usize, &mut [T]) + Sync) {
    for_units(out, c, |first, run| {
        let (mut v, mut rest) = (first, run);
        while !rest.is_empty() {
            let n = v / s;
            let take = ((n + 1) * s - v).min(rest.len() / c);
            let (head, tail) = rest.split_at_mut(take * c);
            f(n, v, head);
            v += take;
            rest = tail;
        }
    });
}

/// Mean and reciprocal standard deviation (biased variance) per (sample, channel) of `x`.
pub fn instance_norm_stats<T: Real>(x: &[T], n: usize, c: usize, eps: f64) -> NormStats<T> {
    let (n, s) = dims(x.len(), n, c);
    assert!(s > 0, "instance norm needs at least one voxel");
    let parts = reduce_rows(
        n,
        s,
        c,
        || Welford::new(c),
        |o, rows, w| {
            let span = (o * s + rows.start) * c..(o * s + rows.end) * c;
            x[span].chunks_exact(c).for_each(|v| w.push(v));
        },
        Welford::merge,
    );
    let mut stats = NormStats { mean: Vec::with_capacity(n * c), rstd: Vec::with_capacity(n * c) };
    for w in parts {
        for (m, m2) in w.mean.into_iter().zip(w.m2) {
            stats.mean.push(T::c(m));
            stats.rstd.push(T::c(1.0 / (m2 / s as f64 + eps).sqrt()));
        }
    }
    stats
}

/// Per-(sample, channel) constants of the affine map, `n * c` each (beta is shared by samples).
struct Affine<'a, T> {
    mean: &'a [T],
    /// `rstd * gamma`: the factor from `x - mean` to the affine output.
    scale: Vec<T>,
    c: usize,
}

impl<'a, T: Real> Affine<'a, T> {
    fn new(stats: &'a NormStats<T>, gamma: &[T]) -> Self {
        let c = gamma.len();
        let scale = stats.rstd.iter().enumerate().map(|(i, &r)| r * gamma[i % c]).collect();
        Affine { mean: &stats.mean, scale, c }
    }

    /// Sample n's (mean, scale) channel vectors.
    fn sample(&self, n: usize) -> (&[T], &[T]) {
        let k = n * self.c..(n + 1) * self.c;
        (&self.mean[k.clone()], &self.scale[k])
    }
}

/// The centred input `d = x - mean` and `gz = gy * act'(z)`, with `z` computed exactly as the
/// forward computes it so that `act'` sees the same sign.
#[inline(always)]
fn centred_grad<T: Real>(x: T, gy: T, mean: T, scale: T, beta: T, slope: T) -> (T, T) {
    let d = x - mean;
    (d, gy * Act::deriv(d * scale + beta, slope))
}

// The channel loops below are zipped iterators rather than indexed loops: that is what lets the
// compiler drop bounds checks and vectorise them (measured 1.6x on the backward sums).

/// `y = act((x - mean) * rstd * gamma + beta)` with saved statistics.
pub fn instance_norm_apply<T: Real>(
    y: &mut [T],
    x: &[T],
    stats: &NormStats<T>,
    gamma: &[T],
    beta: &[T],
    act: Act,
) {
    let c = gamma.len();
    assert!(beta.len() == c && x.len() == y.len(), "instance norm apply: lengths differ");
    let (_, s) = dims(x.len(), stats.mean.len() / c.max(1), c);
    let aff = Affine::new(stats, gamma);
    let slope = T::c(act.slope());
    for_sample_runs(y, s, c, |n, v, y| {
        let (mean, scale) = aff.sample(n);
        for (y, x) in y.chunks_exact_mut(c).zip(x[v * c..].chunks_exact(c)) {
            for ((((y, &x), &m), &sc), &b) in y.iter_mut().zip(x).zip(mean).zip(scale).zip(beta) {
                *y = Act::apply((x - m) * sc + b, slope);
            }
        }
    });
}

/// Statistics and output of an instance norm (+ activation) of `x` with `n` samples.
pub fn instance_norm_forward<T: Real>(
    y: &mut [T],
    x: &[T],
    n: usize,
    gamma: &[T],
    beta: &[T],
    eps: f64,
    act: Act,
) -> NormStats<T> {
    let stats = instance_norm_stats(x, n, gamma.len(), eps);
    instance_norm_apply(y, x, &stats, gamma, beta, act);
    stats
}

/// Gradients of an instance norm (+ activation) from the forward input `x` and its statistics.
/// Writes the input gradient into `gx` when given and returns (d gamma, d beta).
///
/// With `z = xhat * gamma + beta`, `gz = gy * act'(z)` and M voxels:
/// `gx = rstd * gamma * (gz - mean(gz) - xhat * mean(gz * xhat))`,
/// `d gamma = sum(gz * xhat)`, `d beta = sum(gz)` (sums over samples and voxels).
pub fn instance_norm_backward<T: Real>(
    gx: Option<&mut [T]>,
    gy: &[T],
    x: &[T],
    stats: &NormStats<T>,
    gamma: &[T],
    beta: &[T],
    act: Act,
) -> (Vec<T>, Vec<T>) {
    let c = gamma.len();
    assert!(beta.len() == c && gy.len() == x.len(), "instance norm backward: lengths differ");
    let (n, s) = dims(x.len(), stats.mean.len() / c.max(1), c);
    let aff = Affine::new(stats, gamma);
    let slope = T::c(act.slope());
    // Per (sample, channel): [sum gz ..., sum gz * d ...].
    let sums = sum_rows(n, s, c, 2 * c, |o, rows, acc| {
        let span = (o * s + rows.start) * c..(o * s + rows.end) * c;
        let (acc_g, acc_gd) = acc.split_at_mut(c);
        let (mean, scale) = aff.sample(o);
        for (gy, x) in gy[span.clone()].chunks_exact(c).zip(x[span].chunks_exact(c)) {
            let ch = mean.iter().zip(scale).zip(beta);
            for ((((ag, agd), &gy), &x), ((&m, &sc), &b)) in
                acc_g.iter_mut().zip(&mut *acc_gd).zip(gy).zip(x).zip(ch)
            {
                let (d, gz) = centred_grad(x, gy, m, sc, b, slope);
                *ag += f64_of(gz);
                *agd += f64_of(gz * d);
            }
        }
    });
    // sum gz * xhat = rstd * sum gz * d.
    let sum_gx: Vec<f64> = sums
        .chunks_exact(2 * c)
        .flat_map(|v| &v[c..])
        .zip(&stats.rstd)
        .map(|(g, &r)| g * f64_of(r))
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (sample, sgx) in sums.chunks_exact(2 * c).zip(sum_gx.chunks_exact(c)) {
        for i in 0..c {
            dbeta[i] += sample[i];
            dgamma[i] += sgx[i];
        }
    }
    if let Some(gx) = gx {
        assert_eq!(gx.len(), x.len(), "instance norm backward: gx length");
        let inv = 1.0 / s as f64;
        // gx = scale * (gz - mean(gz) - d * k_d) with k_d = rstd * mean(gz * xhat).
        let mean_g: Vec<T> =
            sums.chunks_exact(2 * c).flat_map(|v| v[..c].iter().map(|&g| T::c(g * inv))).collect();
        let k_d: Vec<T> = sum_gx.iter().zip(&stats.rstd).map(|(&g, &r)| T::c(g * inv * f64_of(r))).collect();
        for_sample_runs(gx, s, c, |n, v, gx| {
            let (mean, scale) = aff.sample(n);
            let (mean_g, k_d) = (&mean_g[n * c..(n + 1) * c], &k_d[n * c..(n + 1) * c]);
            let span = v * c..v * c + gx.len();
            let (gy, x) = (&gy[span.clone()], &x[span]);
            for ((gx, gy), x) in gx.chunks_exact_mut(c).zip(gy.chunks_exact(c)).zip(x.chunks_exact(c)) {
                let ch = mean.iter().zip(scale).zip(beta).zip(mean_g.iter().zip(k_d));
                for (((gx, &gy), &x), (((&m, &sc), &b), (&mg, &kd))) in gx.iter_mut().zip(gy).zip(x).zip(ch) {
                    let (d, gz) = centred_grad(x, gy, m, sc, b, slope);
                    *gx = sc * (gz - mg - d * kd);
                }
            }
        });
    }
    (dgamma.into_iter().map(T::c).collect(), dbeta.into_iter().map(T::c).collect())
}
