//! Deliberately naive convolutions: the textbook nested loops, one multiply-add at a time, summed
//! in f64. They exist to check the fast kernels of [`conv`](super::conv) and to show in the
//! benchmark what those kernels gain; nothing else should call them.

use super::Real;
use crate::device::op::{ConvDims, TransposedDims};

fn f64_of<T: Real>(v: T) -> f64 {
    v.to_f64().expect("finite float")
}

/// Calls `f(output voxel, tap, input voxel)` for every output voxel and every tap that lands
/// inside the input (voxels as flat indices without channels, taps as flat (t, r, s) indices).
fn for_each_tap(d: &ConvDims, mut f: impl FnMut(usize, usize, usize)) {
    let [id, ih, iw] = d.input;
    let [od, oh, ow] = d.output();
    let [kt, kr, ks] = d.kernel;
    let [sd, sh, sw] = d.stride;
    let [pd, ph, pw] = d.pad();
    for n in 0..d.n {
        for zo in 0..od {
            for yo in 0..oh {
                for xo in 0..ow {
                    let o = ((n * od + zo) * oh + yo) * ow + xo;
                    for t in 0..kt {
                        for r in 0..kr {
                            for s in 0..ks {
                                let (z, y, x) = (zo * sd + t, yo * sh + r, xo * sw + s);
                                if z < pd || y < ph || x < pw || z - pd >= id || y - ph >= ih || x - pw >= iw
                                {
                                    continue;
                                }
                                let i = ((n * id + z - pd) * ih + y - ph) * iw + x - pw;
                                f(o, (t * kr + r) * ks + s, i);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv3d(x, w) + b` with "same" padding.
pub fn conv3d_forward<T: Real>(y: &mut [T], x: &[T], w: &[T], b: Option<&[T]>, d: &ConvDims) {
    let (c, k, taps) = (d.cin, d.cout, d.kernel.iter().product::<usize>());
    let mut acc = vec![0.0f64; d.y_len()];
    for_each_tap(d, |o, tap, i| {
        for ko in 0..k {
            for ci in 0..c {
                acc[o * k + ko] += f64_of(x[i * c + ci]) * f64_of(w[(ko * taps + tap) * c + ci]);
            }
        }
    });
    for (j, (y, a)) in y.iter_mut().zip(acc).enumerate() {
        *y = T::c(a + b.map_or(0.0, |b| f64_of(b[j % k])));
    }
}

/// `gx` of [`conv3d_forward`].
pub fn conv3d_backward_data<T: Real>(gx: &mut [T], gy: &[T], w: &[T], d: &ConvDims) {
    let (c, k, taps) = (d.cin, d.cout, d.kernel.iter().product::<usize>());
    let mut acc = vec![0.0f64; d.x_len()];
    for_each_tap(d, |o, tap, i| {
        for ko in 0..k {
            for ci in 0..c {
                acc[i * c + ci] += f64_of(gy[o * k + ko]) * f64_of(w[(ko * taps + tap) * c + ci]);
            }
        }
    });
    gx.iter_mut().zip(acc).for_each(|(g, a)| *g = T::c(a));
}

/// `gw` of [`conv3d_forward`].
pub fn conv3d_backward_weight<T: Real>(gw: &mut [T], gy: &[T], x: &[T], d: &ConvDims) {
    let (c, k, taps) = (d.cin, d.cout, d.kernel.iter().product::<usize>());
    let mut acc = vec![0.0f64; d.w_len()];
    for_each_tap(d, |o, tap, i| {
        for ko in 0..k {
            for ci in 0..c {
                acc[(ko * taps + tap) * c + ci] += f64_of(gy[o * k + ko]) * f64_of(x[i * c + ci]);
            }
        }
    });
    gw.iter_mut().zip(acc).for_each(|(g, a)| *g = T::c(a));
}

/// Bias gradient of a conv or transposed conv with `gb.len()` output channels.
pub fn conv_backward_bias<T: Real>(gb: &mut [T], gy: &[T]) {
    let k = gb.len();
    let mut acc = vec![0.0f64; k];
    for (j, &g) in gy.iter().enumerate() {
        acc[j % k] += f64_of(g);
    }
    gb.iter_mut().zip(acc).for_each(|(g, a)| *g = T::c(a));
}

/// Calls `f(input voxel, tap, output voxel)` for every input voxel of a transposed conv and every
/// tap of its block (flat indices without channels).
fn for_each_block_tap(d: &TransposedDims, mut f: impl FnMut(usize, usize, usize)) {
    let [id, ih, iw] = d.input;
    let [od, oh, ow] = d.output();
    let [kt, kr, ks] = d.kernel;
    for n in 0..d.n {
        for z in 0..id {
            for y in 0..ih {
                for x in 0..iw {
                    let i = ((n * id + z) * ih + y) * iw + x;
                    for t in 0..kt {
                        for r in 0..kr {
                            for s in 0..ks {
                                let o = ((n * od + z * kt + t) * oh + y * kr + r) * ow + x * ks + s;
                                f(i, (t * kr + r) * ks + s, o);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv_transpose3d(x, w) + b` with kernel = stride; `w` is (C_in, T, R, S, C_out).
pub fn conv_transpose3d_forward<T: Real>(y: &mut [T], x: &[T], w: &[T], b: Option<&[T]>, d: &TransposedDims) {
    let (c, k, taps) = (d.cin, d.cout, d.kernel.iter().product::<usize>());
    let mut acc = vec![0.0f64; d.y_len()];
    for_each_block_tap(d, |i, tap, o| {
        for ci in 0..c {
            for ko in 0..k {
                acc[o * k + ko] += f64_of(x[i * c + ci]) * f64_of(w[(ci * taps + tap) * k + ko]);
            }
        }
    });
    for (j, (y, a)) in y.iter_mut().zip(acc).enumerate() {
        *y = T::c(a + b.map_or(0.0, |b| f64_of(b[j % k])));
    }
}

/// `gx` of [`conv_transpose3d_forward`].
pub fn conv_transpose3d_backward_data<T: Real>(gx: &mut [T], gy: &[T], w: &[T], d: &TransposedDims) {
    let (c, k, taps) = (d.cin, d.cout, d.kernel.iter().product::<usize>());
    let mut acc = vec![0.0f64; d.x_len()];
    for_each_block_tap(d, |i, tap, o| {
        for ci in 0..c {
            for ko in 0..k {
                acc[i * c + ci] += f64_of(gy[o * k + ko]) * f64_of(w[(ci * taps + tap) * k + ko]);
            }
        }
    });
    gx.iter_mut().zip(acc).for_each(|(g, a)| *g = T::c(a));
}

/// `gw` of [`conv_transpose3d_forward`].
pub fn conv_transpose3d_backward_weight<T: Real>(gw: &mut [T], gy: &[T], x: &[T], d: &TransposedDims) {
    let (c, k, taps) = (d.cin, d.cout, d.kernel.iter().product::<usize>());
    let mut acc = vec![0.0f64; d.w_len()];
    for_each_block_tap(d, |i, tap, o| {
        for ci in 0..c {
            for ko in 0..k {
                acc[(ci * taps + tap) * k + ko] += f64_of(x[i * c + ci]) * f64_of(gy[o * k + ko]);
            }
        }
    });
    gw.iter_mut().zip(acc).for_each(|(g, a)| *g = T::c(a));
}
