//! Reductions over rows of a (outer, rows, row_len) view: the blocked, parallel, deterministic
//! accumulation that means, sums, normalisation statistics and broadcast gradients share.
//!
//! Every partial result is accumulated in f64 over a fixed block of rows and the partials are merged
//! in block order, so the result does not depend on the number of threads.

use super::Real;
use super::elementwise::{CHUNK, bcast_expand};
use crate::device::op::Bcast;
use rayon::prelude::*;
use std::ops::Range;

/// `x` in the accumulation type.
#[inline(always)]
pub(crate) fn f64_of<T: Real>(x: T) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

/// Folds every outer index's rows into one partial `P`: the rows are cut into blocks of about
/// [`CHUNK`] elements, each block is folded from `init()` by `fold(outer, rows, &mut partial)`
/// (in parallel when the work is large), and the blocks of one outer index are merged in order.
pub(crate) fn reduce_rows<P: Send>(
    outer: usize,
    rows: usize,
    row_len: usize,
    init: impl Fn() -> P + Sync,
    fold: impl Fn(usize, Range<usize>, &mut P) + Sync,
    merge: impl Fn(&mut P, P),
) -> Vec<P> {
    let per_block = (CHUNK / row_len.max(1)).max(1);
    let blocks = rows.div_ceil(per_block).max(1);
    let task = |t: usize| {
        let (o, b) = (t / blocks, t % blocks);
        let mut p = init();
        fold(o, b * per_block..((b + 1) * per_block).min(rows), &mut p);
        p
    };
    let tasks = outer * blocks;
    let parts: Vec<P> = if tasks > 1 && outer * rows * row_len > CHUNK {
        (0..tasks).into_par_iter().map(task).collect()
    } else {
        (0..tasks).map(task).collect()
    };
    let mut parts = parts.into_iter();
    (0..outer)
        .map(|_| {
            let mut acc = parts.next().expect("one partial per block");
            for p in parts.by_ref().take(blocks - 1) {
                merge(&mut acc, p);
            }
            acc
        })
        .collect()
}

/// `out[o * width + i]` = the sum over rows of what `fold(o, rows, acc)` adds into `acc[i]`
/// (`acc` has `width` entries, e.g. one or two per channel).
pub(crate) fn sum_rows(
    outer: usize,
    rows: usize,
    row_len: usize,
    width: usize,
    fold: impl Fn(usize, Range<usize>, &mut [f64]) + Sync,
) -> Vec<f64> {
    let parts = reduce_rows(
        outer,
        rows,
        row_len,
        || vec![0.0; width],
        |o, r, acc| fold(o, r, acc),
        |acc, p| acc.iter_mut().zip(p).for_each(|(a, p)| *a += p),
    );
    parts.concat()
}

/// Sums `f(a, b)` over `mid` of the (outer, mid, inner) view of `a` and `b`, into f64.
pub(crate) fn sum_mid_with<T: Real>(a: &[T], b: &[T], bc: Bcast, f: impl Fn(T, T) -> T + Sync) -> Vec<f64> {
    assert!(a.len() == bc.full_len() && b.len() == bc.full_len(), "sum over a broadcast view: input lengths");
    sum_rows(bc.outer, bc.mid, bc.inner, bc.inner, |o, rows, acc| {
        let span = (o * bc.mid + rows.start) * bc.inner..(o * bc.mid + rows.end) * bc.inner;
        let (a, b) = (&a[span.clone()], &b[span]);
        for (a, b) in a.chunks_exact(bc.inner).zip(b.chunks_exact(bc.inner)) {
            for ((acc, &a), &b) in acc.iter_mut().zip(a).zip(b) {
                *acc += f64_of(f(a, b));
            }
        }
    })
}

/// Sums `x` viewed as (outer, mid, inner) over `mid`, into f64.
fn sum_mid<T: Real>(x: &[T], bc: Bcast) -> Vec<f64> {
    sum_mid_with(x, x, bc, |x, _| x)
}

/// Mean of `x` viewed as (outer, mid, inner) over `mid`: `y` holds `outer * inner` values.
pub fn mean_mid<T: Real>(y: &mut [T], x: &[T], bc: Bcast) {
    assert_eq!(y.len(), bc.small_len(), "mean_mid: output length");
    let inv = 1.0 / bc.mid as f64;
    for (y, s) in y.iter_mut().zip(sum_mid(x, bc)) {
        *y = T::c(s * inv);
    }
}

/// Backward of [`mean_mid`]: every input position gets its mean's gradient over `mid`.
pub fn mean_mid_backward<T: Real>(gx: &mut [T], gy: &[T], bc: Bcast) {
    bcast_expand(gx, gy, bc, T::c(1.0 / bc.mid as f64));
}

/// Sum over the rows of a row-major `rows x row_len` matrix (a bias gradient).
pub fn sum_over_rows<T: Real>(x: &[T], row_len: usize) -> Vec<T> {
    let rows = x.len().checked_div(row_len).unwrap_or(0);
    let bc = Bcast { outer: 1, mid: rows, inner: row_len };
    sum_mid(x, bc).into_iter().map(T::c).collect()
}

/// The sum of every element.
pub fn sum_all<T: Real>(x: &[T]) -> T {
    T::c(sum_mid(x, Bcast { outer: 1, mid: x.len(), inner: 1 })[0])
}

/// numpy's default percentile (linear interpolation between the order statistics) of `values`,
/// which it sorts.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = q / 100.0 * (values.len() - 1) as f64;
    let (i, frac) = (rank.floor() as usize, rank.fract());
    match values.get(i + 1) {
        Some(next) => values[i] + frac * (next - values[i]),
        None => values[i],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_sums_match_a_serial_loop() {
        // Large enough to split into several parallel blocks per outer index.
        let (outer, mid, inner) = (3, 2 * CHUNK / 5 + 3, 5);
        let x: Vec<f64> = (0..outer * mid * inner).map(|i| ((i * 7919) % 1000) as f64 * 1e-3).collect();
        let mut y = vec![0.0; outer * inner];
        mean_mid(&mut y, &x, Bcast { outer, mid, inner });
        for o in 0..outer {
            for i in 0..inner {
                let s: f64 = (0..mid).map(|m| x[(o * mid + m) * inner + i]).sum();
                assert!((y[o * inner + i] - s / mid as f64).abs() < 1e-12);
            }
        }
        let total: f64 = x.iter().sum();
        assert!((sum_all(&x) - total).abs() < 1e-9 * total);
        assert_eq!(sum_all::<f32>(&[]), 0.0);
    }
}
