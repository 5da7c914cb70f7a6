//! Fully connected layers on row vectors (the 1x1 layers of squeeze-excitation on pooled vectors):
//! `y = x w^T + b` with `x` (rows, cin) and `w` (cout, cin) as PyTorch stores it.

use super::Real;
use super::gemm::{Mat, matmul};
use super::reduce::sum_over_rows;

/// Multiply-adds above which the GEMM is split over the rayon pool.
const PAR_FLOPS: usize = 1 << 20;

fn threads(rows: usize, cin: usize, cout: usize) -> usize {
    if rows * cin * cout >= PAR_FLOPS { rayon::current_num_threads() } else { 1 }
}

/// `y = x w^T (+ b)`.
pub fn linear_forward<T: Real>(y: &mut [T], x: &[T], w: &[T], b: Option<&[T]>, cin: usize, cout: usize) {
    assert!(cin > 0 && x.len().is_multiple_of(cin), "linear: input length {} is not rows x {cin}", x.len());
    let rows = x.len() / cin;
    assert_eq!(w.len(), cout * cin, "linear: weight length");
    assert_eq!(y.len(), rows * cout, "linear: output length");
    matmul(y, cout, Mat::new(x, rows, cin), Mat::new(w, cout, cin).t(), false, threads(rows, cin, cout));
    if let Some(b) = b {
        assert_eq!(b.len(), cout, "linear: bias length");
        for row in y.chunks_exact_mut(cout.max(1)) {
            row.iter_mut().zip(b).for_each(|(y, &b)| *y = *y + b);
        }
    }
}

/// Where [`linear_backward`] writes each gradient; a None is not computed.
pub struct LinearGrads<'a, T> {
    pub gx: Option<&'a mut [T]>,
    pub gw: Option<&'a mut [T]>,
    pub gb: Option<&'a mut [T]>,
}

/// Gradients of [`linear_forward`]: `gx = gy w`, `gw = gy^T x`, `gb = sum over rows of gy`.
pub fn linear_backward<T: Real>(
    out: LinearGrads<'_, T>,
    gy: &[T],
    x: &[T],
    w: &[T],
    cin: usize,
    cout: usize,
) {
    assert!(
        cin > 0 && x.len().is_multiple_of(cin),
        "linear backward: input length {} is not rows x {cin}",
        x.len()
    );
    let rows = x.len() / cin;
    assert_eq!(gy.len(), rows * cout, "linear backward: gy length");
    assert_eq!(w.len(), cout * cin, "linear backward: weight length");
    let t = threads(rows, cin, cout);
    if let Some(gx) = out.gx {
        assert_eq!(gx.len(), x.len(), "linear backward: gx length");
        matmul(gx, cin, Mat::new(gy, rows, cout), Mat::new(w, cout, cin), false, t);
    }
    if let Some(gw) = out.gw {
        assert_eq!(gw.len(), cout * cin, "linear backward: gw length");
        matmul(gw, cin, Mat::new(gy, rows, cout).t(), Mat::new(x, rows, cin), false, t);
    }
    if let Some(gb) = out.gb {
        assert_eq!(gb.len(), cout, "linear backward: gb length");
        gb.copy_from_slice(&sum_over_rows(gy, cout));
    }
}
