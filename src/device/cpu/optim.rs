//! Optimizer update kernels, element by element as torch.optim's single-tensor (non-foreach) code
//! computes them. They are also the CPU reference that the CUDA optimizer kernels are checked
//! against, so each element's math is written out in one place.
//!
//! Hyperparameters arrive as f64 (PyTorch keeps them as Python floats); scalars derived from them
//! (bias corrections, step sizes) are computed in f64 and converted to `T` once, as PyTorch passes
//! them to its float32 tensor ops.

use super::Real;
use super::elementwise::{CHUNK, for_units};
use super::reduce::sum_mid_with;
use crate::device::op::{AdamHyper, Bcast, SgdHyper};
use rayon::prelude::*;

/// Runs `f` over matching runs of at most [`CHUNK`] elements of a parameter, its `K` state slices
/// and its gradient, in parallel when there is more than one run. (`for_units` splits a single
/// output; an optimizer writes the parameter and its state together.)
fn for_runs<T: Real, const K: usize>(
    p: &mut [T],
    states: [&mut [T]; K],
    g: &[T],
    f: impl Fn(&mut [T], [&mut [T]; K], &[T]) + Sync,
) {
    assert_eq!(p.len(), g.len(), "optimizer step: parameter and gradient lengths differ");
    assert!(states.iter().all(|s| s.len() == p.len()), "optimizer step: state and parameter lengths differ");
    if p.len() <= CHUNK {
        return f(p, states, g);
    }
    let mut state_runs = states.map(|s| s.chunks_mut(CHUNK));
    let runs: Vec<_> = p
        .chunks_mut(CHUNK)
        .zip(g.chunks(CHUNK))
        .map(|(p, g)| (p, std::array::from_fn(|k| state_runs[k].next().expect("equal lengths")), g))
        .collect();
    runs.into_par_iter().for_each(|(p, s, g)| f(p, s, g));
}

/// One SGD step on one parameter. `buf` is the momentum buffer (None exactly when momentum is 0);
/// `first` says it has not been filled yet, and PyTorch then sets it to the gradient instead of
/// decaying it.
pub fn sgd_step<T: Real>(p: &mut [T], g: &[T], buf: Option<&mut [T]>, first: bool, h: &SgdHyper) {
    let (lr, wd, mu) = (T::c(h.lr), T::c(h.weight_decay), T::c(h.momentum));
    match buf {
        None => {
            assert!(h.momentum == 0.0, "sgd_step: momentum {} needs a buffer", h.momentum);
            for_runs(p, [], g, |p, [], g| {
                for (p, &g) in p.iter_mut().zip(g) {
                    *p = *p - lr * (g + wd * *p);
                }
            });
        }
        Some(buf) => for_runs(p, [buf], g, |p, [buf], g| {
            for ((p, b), &g) in p.iter_mut().zip(buf.iter_mut()).zip(g) {
                let d = g + wd * *p;
                *b = if first { d } else { mu * *b + d };
                let step = if h.nesterov { d + mu * *b } else { *b };
                *p = *p - lr * step;
            }
        }),
    }
}

/// One Adam / AdamW step on one parameter; `step` counts the steps taken including this one.
pub fn adam_step<T: Real>(
    p: &mut [T],
    g: &[T],
    exp_avg: &mut [T],
    exp_avg_sq: &mut [T],
    step: u64,
    h: &AdamHyper,
) {
    assert!(step >= 1, "adam_step: step counts from 1");
    let (b1, b2) = h.betas;
    let t = step as f64;
    let bias_correction1 = 1.0 - b1.powf(t);
    let bias_correction2_sqrt = (1.0 - b2.powf(t)).sqrt();
    let step_size = T::c(h.lr / bias_correction1);
    let bc2_sqrt = T::c(bias_correction2_sqrt);
    let (one_minus_b1, b2_t, one_minus_b2) = (T::c(1.0 - b1), T::c(b2), T::c(1.0 - b2));
    let eps = T::c(h.eps);
    let (l2, decay) = if h.decoupled {
        (T::zero(), T::c(1.0 - h.lr * h.weight_decay))
    } else {
        (T::c(h.weight_decay), T::one())
    };
    for_runs(p, [exp_avg, exp_avg_sq], g, |p, [m, v], g| {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g + l2 * *p;
            *p = *p * decay;
            // exp_avg.lerp_(g, 1 - beta1)
            *m = *m + one_minus_b1 * (g - *m);
            *v = b2_t * *v + one_minus_b2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p = *p - step_size * (*m / denom);
        }
    });
}

/// Sum of squares of `x`, accumulated in f64 in a fixed order (a gradient norm's partial).
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    sum_mid_with(x, x, Bcast { outer: 1, mid: x.len(), inner: 1 }, |a, _| a * a)[0]
}

/// `x *= s` in place (gradient clipping).
pub fn scale_in_place<T: Real>(x: &mut [T], s: T) {
    for_units(x, 1, |_, run| run.iter_mut().for_each(|v| *v = *v * s));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn large_tensors_update_in_parallel_runs_exactly_as_element_by_element() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 3 * CHUNK + 11;
        let p0: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let m0: Vec<f64> = (0..n).map(|_| rng.random_range(-0.1..0.1)).collect();
        let v0: Vec<f64> = (0..n).map(|_| rng.random_range(0.0..0.1)).collect();
        let h = AdamHyper { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, decoupled: false };
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adam_step(&mut p, &g, &mut m, &mut v, 5, &h);
        let sh = SgdHyper { lr: 1e-2, momentum: 0.99, nesterov: true, weight_decay: 3e-5 };
        let (mut ps, mut b) = (p0.clone(), m0.clone());
        sgd_step(&mut ps, &g, Some(&mut b), false, &sh);
        for i in 0..n {
            let (mut pi, mut mi, mut vi) = ([p0[i]], [m0[i]], [v0[i]]);
            adam_step(&mut pi, &g[i..=i], &mut mi, &mut vi, 5, &h);
            assert_eq!((pi[0], mi[0], vi[0]), (p[i], m[i], v[i]), "adam element {i}");
            let (mut pi, mut bi) = ([p0[i]], [m0[i]]);
            sgd_step(&mut pi, &g[i..=i], Some(&mut bi), false, &sh);
            assert_eq!((pi[0], bi[0]), (ps[i], b[i]), "sgd element {i}");
        }
        let want: f64 = g.iter().map(|x| x * x).sum();
        assert!((sum_squares(&g) - want).abs() < 1e-9 * want);
        let mut scaled = g.clone();
        scale_in_place(&mut scaled, 0.5);
        assert!(scaled.iter().zip(&g).all(|(s, g)| *s == 0.5 * g));
    }
}
