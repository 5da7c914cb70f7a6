//! Activation kernels: the leaky-ReLU family, sigmoid, and softmax over the channel (last) axis.

use super::Real;
use super::elementwise::{for_units, map1, map2};
use crate::device::op::Act;

impl Act {
    /// The activation of `z`, with `slope` = `T::c(self.slope())` hoisted by the caller. ReLU maps
    /// -inf to 0 (not `-inf * 0 = NaN`) and keeps NaN, as PyTorch does.
    #[inline(always)]
    pub(crate) fn apply<T: Real>(z: T, slope: T) -> T {
        if z > T::zero() {
            z
        } else if z <= T::zero() && slope == T::zero() {
            T::zero()
        } else {
            z * slope
        }
    }

    /// The derivative at pre-activation `z` (PyTorch's convention: `slope` at `z == 0`).
    #[inline(always)]
    pub(crate) fn deriv<T: Real>(z: T, slope: T) -> T {
        if z > T::zero() { T::one() } else { slope }
    }
}

/// `y = act(x)`.
pub fn act_forward<T: Real>(y: &mut [T], x: &[T], act: Act) {
    let s = T::c(act.slope());
    map1(y, x, |x| Act::apply(x, s));
}

/// `gx = gy * act'(x)` with `x` the activation's input.
pub fn act_backward<T: Real>(gx: &mut [T], gy: &[T], x: &[T], act: Act) {
    let s = T::c(act.slope());
    map2(gx, gy, x, |g, x| g * Act::deriv(x, s));
}

/// The logistic function, without overflow for either sign of `x`.
#[inline(always)]
pub(crate) fn sigmoid<T: Real>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// `y = 1 / (1 + exp(-x))`.
pub fn sigmoid_forward<T: Real>(y: &mut [T], x: &[T]) {
    map1(y, x, sigmoid);
}

/// `gx = gy * y * (1 - y)` from the forward output `y`.
pub fn sigmoid_backward<T: Real>(gx: &mut [T], gy: &[T], y: &[T]) {
    map2(gx, gy, y, |g, y| g * y * (T::one() - y));
}

/// Each `c`-long row scaled to unit length: vector targets (normals) as inference writes them;
/// the 1e-8 keeps a zero row zero.
pub fn unit_rows(v: &mut [f32], c: usize) {
    for_units(v, c, |_, run| {
        for u in run.chunks_exact_mut(c) {
            let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt() + 1e-8;
            u.iter_mut().for_each(|x| *x /= norm);
        }
    });
}

/// Softmax over each `c`-long row (the channels of channels-last data), shifted by the row maximum
/// so that `exp` never overflows.
pub fn softmax_forward<T: Real>(y: &mut [T], x: &[T], c: usize) {
    assert_eq!(y.len(), x.len(), "softmax: output and input lengths differ");
    for_units(y, c, |first, run| {
        let x = &x[first * c..first * c + run.len()];
        for (y, x) in run.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let m = x.iter().copied().fold(T::neg_infinity(), T::max);
            let mut sum = T::zero();
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - m).exp();
                sum = sum + *y;
            }
            let inv = T::one() / sum;
            y.iter_mut().for_each(|y| *y = *y * inv);
        }
    });
}

/// `gx = y * (gy - sum_c gy * y)` per row, from the forward output `y`.
pub fn softmax_backward<T: Real>(gx: &mut [T], gy: &[T], y: &[T], c: usize) {
    assert!(gx.len() == gy.len() && gx.len() == y.len(), "softmax backward: lengths differ");
    for_units(gx, c, |first, run| {
        let range = first * c..first * c + run.len();
        let (gy, y) = (&gy[range.clone()], &y[range]);
        for ((gx, gy), y) in run.chunks_exact_mut(c).zip(gy.chunks_exact(c)).zip(y.chunks_exact(c)) {
            let dot = gy.iter().zip(y).fold(T::zero(), |s, (&g, &y)| s + g * y);
            for ((gx, &g), &y) in gx.iter_mut().zip(gy).zip(y) {
                *gx = y * (g - dot);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_and_softmax_survive_extreme_inputs() {
        let x = [-1000.0f32, -30.0, 0.0, 30.0, 1000.0];
        let mut y = [0.0f32; 5];
        sigmoid_forward(&mut y, &x);
        assert_eq!(y[0], 0.0);
        assert_eq!(y[2], 0.5);
        assert_eq!(y[4], 1.0);
        assert!(y.iter().all(|v| v.is_finite()));
        let x = [1000.0f32, 999.0, -1000.0];
        let mut y = [0.0f32; 3];
        softmax_forward(&mut y, &x, 3);
        assert!(y.iter().all(|v| v.is_finite()));
        assert!((y.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((y[0] / y[1] - std::f32::consts::E).abs() < 1e-4);
    }

    #[test]
    fn relu_family_at_zero_follows_pytorch() {
        let mut y = [0.0f32; 3];
        act_forward(&mut y, &[f32::NEG_INFINITY, f32::NAN, 1.0], Act::Relu);
        assert!(y[0] == 0.0 && y[1].is_nan() && y[2] == 1.0);
        let x = [-2.0f64, 0.0, 3.0];
        let gy = [1.0f64; 3];
        let mut g = [0.0; 3];
        act_backward(&mut g, &gy, &x, Act::Relu);
        assert_eq!(g, [0.0, 0.0, 1.0]);
        act_backward(&mut g, &gy, &x, Act::LeakyRelu(0.01));
        assert_eq!(g, [0.01, 0.01, 1.0]);
        let mut y = [0.0; 3];
        act_forward(&mut y, &x, Act::LeakyRelu(0.01));
        assert_eq!(y, [-0.02, 0.0, 3.0]);
        act_forward(&mut y, &x, Act::None);
        assert_eq!(y, x);
    }
}
