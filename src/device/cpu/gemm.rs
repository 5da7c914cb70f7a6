//! The one safe entry point to the `gemm` crate's matrix multiply.

use super::Real;

/// A row-major matrix view: `rows x cols` with `ld` elements between row starts, optionally
/// read transposed (then it is used as a `cols x rows` matrix).
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub trans: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A dense row-major `rows x cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, ld: cols, trans: false }
    }

    /// The same storage read as its transpose.
    pub fn t(self) -> Self {
        Mat { trans: !self.trans, ..self }
    }

    /// Rows and columns as the multiply sees them.
    fn logical(&self) -> (usize, usize) {
        if self.trans { (self.cols, self.rows) } else { (self.rows, self.cols) }
    }

    /// (column stride, row stride) of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.trans { (self.ld as isize, 1) } else { (1, self.ld as isize) }
    }

    fn check(&self, what: &str) {
        assert!(self.cols <= self.ld || self.rows <= 1, "{what}: ld {} < cols {}", self.ld, self.cols);
        if self.rows > 0 && self.cols > 0 {
            let need = (self.rows - 1) * self.ld + self.cols;
            assert!(self.data.len() >= need, "{what}: {} elements, needs {need}", self.data.len());
        }
    }
}

/// `c = beta_c * c + a * b` with `c` dense row-major `m x n` (`ldc` between rows).
/// `accumulate` false overwrites `c`. Threads: `threads` > 1 lets the crate split the work with rayon.
pub fn matmul<T: Real>(
    c: &mut [T],
    ldc: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    threads: usize,
) {
    let (m, k) = a.logical();
    let (kb, n) = b.logical();
    assert_eq!(k, kb, "matmul inner dimensions differ: {k} vs {kb}");
    a.check("matmul lhs");
    b.check("matmul rhs");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n, "matmul: ldc {ldc} < n {n}");
    assert!(
        c.len() >= (m - 1) * ldc + n,
        "matmul: output has {} elements, needs {}",
        c.len(),
        (m - 1) * ldc + n
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(T::zero());
            }
        }
        return;
    }
    let (a_cs, a_rs) = a.strides();
    let (b_cs, b_rs) = b.strides();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above bound every index the multiply touches: rows x cols of each view
    // lie inside its slice given its strides, and m x n of `c` with row stride ldc lies inside `c`,
    // which is borrowed mutably and so aliases neither input. T is f32 or f64, both supported.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f64> = (0..m * k).map(|v| (v as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|v| (v as f64 * 0.91).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        matmul(&mut c, n, Mat::new(&a, m, k), Mat::new(&b, k, n), false, 1);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
        // a^T stored as k x m, b^T stored as n x k, accumulated on top of the first result.
        let at: Vec<f64> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        matmul(&mut c, n, Mat::new(&at, k, m).t(), Mat::new(&bt, n, k).t(), true, 2);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - 2.0 * y).abs() < 1e-12);
        }
    }
}
