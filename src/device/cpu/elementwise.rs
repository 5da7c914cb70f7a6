//! Element-wise kernels: maps, the (outer, mid, inner) broadcast, channel concat and split, and the
//! chunked parallel loop that the other CPU kernels share.

use super::Real;
use crate::device::op::Bcast;
use rayon::prelude::*;

/// Elements per parallel task. Below this, handing work to the rayon pool costs more than doing it.
pub(crate) const CHUNK: usize = 1 << 14;

/// Runs `f(first, run)` over `out` cut into runs of whole `unit`-element units, where `first` is the
/// index of the run's first unit. Runs go to the rayon pool only when there is more than one.
pub(crate) fn for_units<T: Send>(out: &mut [T], unit: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if out.is_empty() || unit == 0 {
        return;
    }
    debug_assert_eq!(out.len() % unit, 0, "output is not a whole number of units");
    let per_run = (CHUNK / unit).max(1);
    let run = per_run * unit;
    if out.len() <= run {
        f(0, out);
    } else {
        out.par_chunks_mut(run).enumerate().for_each(|(i, r)| f(i * per_run, r));
    }
}

/// `y[i] = f(x[i])`.
pub fn map1<T: Real>(y: &mut [T], x: &[T], f: impl Fn(T) -> T + Sync) {
    assert_eq!(y.len(), x.len(), "map1: output and input lengths differ");
    for_units(y, 1, |o, r| {
        let n = r.len();
        for (y, &x) in r.iter_mut().zip(&x[o..o + n]) {
            *y = f(x);
        }
    });
}

/// `y[i] = f(a[i], b[i])`.
pub fn map2<T: Real>(y: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) {
    assert!(y.len() == a.len() && y.len() == b.len(), "map2: output and input lengths differ");
    for_units(y, 1, |o, r| {
        let n = r.len();
        for ((y, &a), &b) in r.iter_mut().zip(&a[o..o + n]).zip(&b[o..o + n]) {
            *y = f(a, b);
        }
    });
}

/// Runs `f(row, out_row, small_row)` for every `inner`-long row of the full operand, with the row of
/// the small operand it is paired with.
fn for_bcast_rows<T: Real>(out: &mut [T], small: &[T], bc: Bcast, f: impl Fn(usize, &mut [T], &[T]) + Sync) {
    assert_eq!(out.len(), bc.full_len(), "broadcast: full operand length");
    assert_eq!(small.len(), bc.small_len(), "broadcast: small operand length");
    let inner = bc.inner;
    for_units(out, inner, |first, run| {
        for (j, row) in run.chunks_exact_mut(inner).enumerate() {
            let r = first + j;
            let o = r / bc.mid;
            f(r, row, &small[o * inner..(o + 1) * inner]);
        }
    });
}

/// `y = x * b` with `b` broadcast over `mid`.
pub fn bcast_mul<T: Real>(y: &mut [T], x: &[T], b: &[T], bc: Bcast) {
    assert_eq!(x.len(), y.len(), "bcast_mul: input length");
    for_bcast_rows(y, b, bc, |r, row, b| {
        let x = &x[r * row.len()..(r + 1) * row.len()];
        for ((y, &x), &b) in row.iter_mut().zip(x).zip(b) {
            *y = x * b;
        }
    });
}

/// `y = b * scale` with `b` broadcast over `mid` (the backward of a mean).
pub fn bcast_expand<T: Real>(y: &mut [T], b: &[T], bc: Bcast, scale: T) {
    for_bcast_rows(y, b, bc, |_, row, b| {
        for (y, &b) in row.iter_mut().zip(b) {
            *y = b * scale;
        }
    });
}

/// Gradient of the broadcast operand of `y = x * b`: `gb[o, i] = sum over m of gy * x`.
pub fn bcast_mul_grad_small<T: Real>(gb: &mut [T], gy: &[T], x: &[T], bc: Bcast) {
    assert!(gy.len() == bc.full_len() && x.len() == bc.full_len(), "bcast_mul_grad_small: input lengths");
    assert_eq!(gb.len(), bc.small_len(), "bcast_mul_grad_small: output length");
    if bc.mid == 1 {
        return map2(gb, gy, x, |g, x| g * x);
    }
    let sums = super::reduce::sum_mid_with(gy, x, bc, |g, x| g * x);
    for (g, s) in gb.iter_mut().zip(sums) {
        *g = T::c(s);
    }
}

/// Concatenates row-major tensors along their last axis: `parts[p]` holds `rows x widths[p]`.
pub fn concat_last<T: Real>(y: &mut [T], parts: &[&[T]], widths: &[usize]) {
    assert_eq!(parts.len(), widths.len(), "concat_last: one width per part");
    let total: usize = widths.iter().sum();
    let rows = y.len().checked_div(total).unwrap_or(0);
    assert_eq!(y.len(), rows * total, "concat_last: output length");
    for (p, w) in parts.iter().zip(widths) {
        assert_eq!(p.len(), rows * w, "concat_last: part length");
    }
    for_units(y, total, |first, run| {
        for (j, row) in run.chunks_exact_mut(total).enumerate() {
            let r = first + j;
            let mut at = 0;
            for (p, &w) in parts.iter().zip(widths) {
                row[at..at + w].copy_from_slice(&p[r * w..(r + 1) * w]);
                at += w;
            }
        }
    });
}

/// Columns `[start, start + width)` of a row-major tensor with rows of `total` elements: the
/// backward of [`concat_last`] for one part.
pub fn slice_last<T: Real>(x: &[T], total: usize, start: usize, width: usize) -> Vec<T> {
    assert!(start + width <= total, "slice_last: columns {start}+{width} exceed {total}");
    let rows = x.len().checked_div(total).unwrap_or(0);
    let mut out = vec![T::zero(); rows * width];
    for_units(&mut out, width, |first, run| {
        for (j, row) in run.chunks_exact_mut(width).enumerate() {
            let src = (first + j) * total + start;
            row.copy_from_slice(&x[src..src + width]);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_views() {
        let b = |o, m, i| Some(Bcast { outer: o, mid: m, inner: i });
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[2, 1, 1, 1, 6]), b(2, 60, 6));
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[2, 1, 1, 5, 6]), b(2, 12, 30));
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[1, 1, 1, 1, 6]), b(1, 120, 6));
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[2, 1, 1, 1, 1]), b(2, 360, 1));
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[2, 3, 4, 5, 6]), b(720, 1, 1));
        // A size-1 axis of both operands may sit inside the run.
        assert_eq!(Bcast::of(&[2, 3, 1, 5, 6], &[2, 1, 1, 1, 6]), b(2, 15, 6));
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[2, 1, 4, 1, 6]), None);
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[2, 3, 4, 5]), None);
        assert_eq!(Bcast::of(&[2, 3, 4, 5, 6], &[2, 3, 2, 5, 6]), None);
    }

    #[test]
    fn parallel_runs_cover_large_outputs_once() {
        let n = 3 * CHUNK + 7;
        let x: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let mut y = vec![0.0; n];
        map1(&mut y, &x, |v| 2.0 * v);
        assert!(y.iter().enumerate().all(|(i, &v)| v == 2.0 * i as f64));
    }
}
