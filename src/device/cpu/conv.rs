//! 3D convolutions on channels-last volumes as implicit GEMMs.
//!
//! Layouts: activations (N, D, H, W, C); conv3d weights (K, T, R, S, C) so that one output
//! channel's weights are one row of a `K x (T*R*S*C)` matrix; transposed conv3d weights
//! (C_in, T, R, S, C_out). Every pass is a GEMM against the weight matrix over tiles of voxels:
//! each rayon task gathers the im2col rows of one tile into its own buffer (the whole im2col
//! matrix is never built) and multiplies it single-threaded, so the threads never contend.
//!
//! - forward: `y_tile = im2col(x)_tile * W^T`, tiles of output voxels (disjoint rows of `y`).
//! - backward-data: for stride 1 a forward conv of `gy` with the flipped, transposed kernel; for
//!   other strides the input voxels split into `stride` phases per axis, each of which sees a fixed
//!   subset of the taps and is again a stride-1 forward conv. No scatter-add, so no races.
//! - backward-weight: `gW += gy_tile^T * im2col(x)_tile`, one partial sum per group of tiles,
//!   added in a fixed order; deep layers (few voxels, large weight) split the output channels.
//!
//! Tiles are sized by the shape and the thread count only, so results are bitwise reproducible
//! for a given thread count.
//!
//! Fast paths: a 1x1x1 stride-1 conv multiplies the activations in place (no gather); a conv with
//! kernel = stride and no padding covers the input with disjoint blocks, so its backward-data is
//! one GEMM per tile whose rows are copied (not added) into the blocks. The transposed conv with
//! kernel = stride is exactly that blocked conv with the passes exchanged.

use super::Real;
use super::gemm::{Mat, matmul};
use super::reduce::sum_over_rows;
use crate::device::op::{ConvDims, TransposedDims};
use rayon::prelude::*;

/// Elements of one im2col tile (1 MiB in f32): large enough for the GEMM to run near its peak,
/// small enough to stay in the L2 cache while it is multiplied.
const TILE_ELEMS: usize = 1 << 18;
/// Multiply-adds below which a pass runs as one task on the calling thread.
const PAR_MACS: usize = 1 << 18;

impl ConvDims {
    fn geom(&self) -> Geom {
        Geom {
            n: self.n,
            input: self.input,
            output: self.output(),
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad().map(|p| p as isize),
            cin: self.cin,
            cout: self.cout,
        }
    }

    fn check(&self, what: &str, x: usize, y: usize, w: usize) {
        assert!(self.validate().is_ok(), "{what}: invalid dims {self:?}");
        assert_eq!(x, self.x_len(), "{what}: input length");
        assert_eq!(y, self.y_len(), "{what}: output length");
        assert_eq!(w, self.w_len(), "{what}: weight length");
    }
}

impl TransposedDims {
    /// The blocked conv3d (kernel = stride, no padding) from this op's output space to its input
    /// space, whose weight matrix (K = C_in rows of T*R*S*C_out) is this op's weight as stored.
    fn geom(&self) -> Geom {
        Geom {
            n: self.n,
            input: self.output(),
            output: self.input,
            kernel: self.kernel,
            stride: self.kernel,
            pad: [0; 3],
            cin: self.cout,
            cout: self.cin,
        }
    }

    fn check(&self, what: &str, x: usize, y: usize, w: usize) {
        assert!(self.kernel.iter().all(|&k| k > 0), "{what}: zero kernel {:?}", self.kernel);
        assert_eq!(x, self.x_len(), "{what}: input length");
        assert_eq!(y, self.y_len(), "{what}: output length");
        assert_eq!(w, self.w_len(), "{what}: weight length");
    }
}

/// A conv as the GEMM kernels see it: input coordinate = output * stride + tap - pad, where a
/// negative pad is an offset into the input (the phases of a strided backward-data need that).
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    input: [usize; 3],
    output: [usize; 3],
    kernel: [usize; 3],
    stride: [usize; 3],
    pad: [isize; 3],
    cin: usize,
    cout: usize,
}

impl Geom {
    /// Columns of the im2col matrix: one per (tap, input channel).
    fn cols(&self) -> usize {
        self.kernel.iter().product::<usize>() * self.cin
    }

    /// Rows of the im2col matrix: one per output voxel.
    fn rows(&self) -> usize {
        self.n * self.output.iter().product::<usize>()
    }

    /// A 1x1x1 stride-1 conv, whose im2col matrix is the input itself.
    fn pointwise(&self) -> bool {
        self.kernel == [1; 3] && self.stride == [1; 3] && self.pad == [0; 3]
    }

    /// Kernel = stride with no padding: the receptive fields tile the input without overlap.
    fn blocked(&self) -> bool {
        self.kernel == self.stride && self.pad == [0; 3]
    }

    fn macs(&self) -> usize {
        self.rows() * self.cols() * self.cout
    }

    /// One sample of the batch. Forward tiles are sized from it and never span two samples, so a
    /// sample's output does not depend on its batch-mates down to the last bit (tiled inference
    /// relies on that to be independent of how tiles are batched).
    fn per_sample(&self) -> Geom {
        Geom { n: 1, ..*self }
    }

    /// Output voxels per tile: about [`TILE_ELEMS`] im2col elements but 128 to 512 rows (each
    /// GEMM call re-packs the whole weight, so short tiles pay for it over too little work), fewer
    /// (not under 64) when that would leave threads idle, and one tile when the pass is tiny.
    fn tile_rows(&self) -> usize {
        let rows = self.rows().max(1);
        if self.macs() < PAR_MACS {
            return rows;
        }
        let by_cache = (TILE_ELEMS / self.cols().max(1)).clamp(128, 512);
        let by_threads = rows.div_ceil(2 * rayon::current_num_threads()).max(64);
        by_cache.min(by_threads).min(rows)
    }
}

/// Writes the im2col rows of output voxels `m0..m0 + rows` into `a` (`rows x cols`): the input
/// values under each tap in (t, r, s, c) order, zero where the tap falls outside the input.
fn gather<T: Real>(a: &mut [T], x: &[T], g: &Geom, m0: usize, rows: usize) {
    let [od, oh, ow] = g.output;
    let [id, ih, iw] = g.input.map(|v| v as isize);
    let [_, kr, ks] = g.kernel;
    let c = g.cin;
    let run = ks * c;
    for (i, row) in a.chunks_exact_mut(g.cols()).take(rows).enumerate() {
        let m = m0 + i;
        let (xo, rest) = (m % ow, m / ow);
        let (yo, rest) = (rest % oh, rest / oh);
        let (zo, n) = (rest % od, rest / od);
        let z0 = (zo * g.stride[0]) as isize - g.pad[0];
        let y0 = (yo * g.stride[1]) as isize - g.pad[1];
        let x0 = (xo * g.stride[2]) as isize - g.pad[2];
        // Taps s in lo..hi land inside the input row.
        let lo = (-x0).clamp(0, ks as isize) as usize;
        let hi = (iw - x0).clamp(0, ks as isize) as usize;
        for (t, plane) in row.chunks_exact_mut(kr * run).enumerate() {
            let z = z0 + t as isize;
            if z < 0 || z >= id {
                plane.fill(T::zero());
                continue;
            }
            for (r, dst) in plane.chunks_exact_mut(run).enumerate() {
                let y = y0 + r as isize;
                if y < 0 || y >= ih || lo >= hi {
                    dst.fill(T::zero());
                    continue;
                }
                dst[..lo * c].fill(T::zero());
                dst[hi * c..].fill(T::zero());
                let start = ((((n as isize * id + z) * ih + y) * iw + x0) + lo as isize) as usize;
                dst[lo * c..hi * c].copy_from_slice(&x[start * c..(start + hi - lo) * c]);
            }
        }
    }
}

/// The im2col rows `m0..m0 + rows`: the input itself for a pointwise conv, else gathered into `buf`.
fn im2col_tile<'a, T: Real>(buf: &'a mut Vec<T>, x: &'a [T], g: &Geom, m0: usize, rows: usize) -> &'a [T] {
    if g.pointwise() {
        return &x[m0 * g.cin..(m0 + rows) * g.cin];
    }
    let len = rows * g.cols();
    buf.resize(len, T::zero());
    gather(&mut buf[..len], x, g, m0, rows);
    &buf[..len]
}

/// `y = im2col(x) * W^T (+ b)` with `w` the `cout x cols` weight matrix.
fn forward_gemm<T: Real>(y: &mut [T], x: &[T], w: &[T], b: Option<&[T]>, g: &Geom) {
    let (cols, k) = (g.cols(), g.cout);
    if y.is_empty() {
        return;
    }
    let per_sample = g.per_sample();
    let (rows, sample_rows) = (per_sample.tile_rows(), per_sample.rows());
    let wt = Mat::new(w, k, cols).t();
    let tile = |buf: &mut Vec<T>, (m0, yt): (usize, &mut [T])| {
        let r = yt.len() / k;
        let a = im2col_tile(buf, x, g, m0, r);
        if let Some(b) = b {
            yt.chunks_exact_mut(k).for_each(|row| row.copy_from_slice(b));
        }
        matmul(yt, k, Mat::new(a, r, cols), wt, b.is_some(), 1);
    };
    y.par_chunks_mut(sample_rows * k)
        .enumerate()
        .flat_map(|(n, ys)| {
            ys.par_chunks_mut(rows * k).enumerate().map(move |(i, yt)| (n * sample_rows + i * rows, yt))
        })
        .for_each_init(Vec::new, tile);
}

/// `gw = gy^T * im2col(x)`. The tiles fall into a fixed number of groups: the first sums straight
/// into `gw`, each other into its own partial, added in group order at the end (deterministic for
/// a given thread count). In deep layers (few voxels, a large weight) the output channels are
/// split into blocks as well.
fn weight_grad_gemm<T: Real>(gw: &mut [T], gy: &[T], x: &[T], g: &Geom) {
    let (cols, k, m) = (g.cols(), g.cout, g.rows());
    let rows = g.tile_rows();
    let tiles = m.div_ceil(rows);
    let threads = rayon::current_num_threads();
    // An extra group costs one K x J partial sum, an extra channel block a second gather of the
    // im2col rows: split the channels when there are fewer voxels than that.
    let split = if g.macs() >= PAR_MACS && m < 2 * k { threads.min(k.div_ceil(16)) } else { 1 };
    let kb = k.div_ceil(split).max(1);
    let kblocks = k.div_ceil(kb).max(1);
    let groups = tiles.min(threads.div_ceil(kblocks)).max(1);
    // Sums the tiles of group `grp` for the output channels of block `b` into `out`.
    let sum_group = |grp: usize, b: usize, out: &mut [T]| {
        let (k0, width) = (b * kb, out.len() / cols.max(1));
        let mut buf = Vec::new();
        let range = grp * tiles / groups..(grp + 1) * tiles / groups;
        if range.is_empty() {
            out.fill(T::zero());
        }
        for (i, t) in range.enumerate() {
            let (m0, r) = (t * rows, rows.min(m - t * rows));
            let a = im2col_tile(&mut buf, x, g, m0, r);
            let gyt = Mat { data: &gy[m0 * k + k0..], rows: r, cols: width, ld: k, trans: false };
            matmul(out, cols, gyt.t(), Mat::new(a, r, cols), i > 0, 1);
        }
    };
    let serial = groups * kblocks == 1;
    let (_, parts) = rayon::join(
        || for_each_chunk(gw, kb * cols, serial, |b, out| sum_group(0, b, out)),
        || {
            let partial = |task: usize| {
                let (grp, b) = (1 + task / kblocks, task % kblocks);
                let mut out = vec![T::zero(); (kb.min(k - b * kb)) * cols];
                sum_group(grp, b, &mut out);
                out
            };
            (0..(groups - 1) * kblocks).into_par_iter().map(partial).collect::<Vec<Vec<T>>>()
        },
    );
    if parts.is_empty() {
        return;
    }
    for (b, out) in gw.chunks_mut(kb * cols).enumerate() {
        let rest: Vec<&[T]> = (0..groups - 1).map(|grp| parts[grp * kblocks + b].as_slice()).collect();
        const CHUNK: usize = 1 << 14;
        for_each_chunk(out, CHUNK, false, |i, o| {
            for p in &rest {
                o.iter_mut().zip(&p[i * CHUNK..]).for_each(|(o, &v)| *o = *o + v);
            }
        });
    }
}

/// Backward-data of a blocked conv, and the forward of a transposed conv: for each output voxel
/// the row `gy * W` (+ bias per input channel) is copied into its block of `gx`. Input voxels that
/// no block covers (when a size is not a multiple of the kernel) get zero.
fn blocked_data_grad<T: Real>(gx: &mut [T], gy: &[T], w: &[T], bias: Option<&[T]>, g: &Geom) {
    let [id, ih, iw] = g.input;
    let [od, oh, ow] = g.output;
    let [kt, kr, ks] = g.kernel;
    let (c, k, cols) = (g.cin, g.cout, g.cols());
    let (plane, run) = (ih * iw * c, ks * c);
    if gx.is_empty() {
        return;
    }
    let rows = g.per_sample().tile_rows().min(oh * ow).max(1);
    let ragged = ih % kr != 0 || iw % ks != 0;
    // One task per output depth plane: it owns the `kt` input planes of its blocks.
    let slab = |n: usize, zo: usize, blk: &mut [T]| {
        if zo >= od || ragged {
            blk.fill(T::zero());
        }
        if zo >= od {
            return;
        }
        let mut buf = Vec::new();
        for v0 in (0..oh * ow).step_by(rows) {
            let r = rows.min(oh * ow - v0);
            let m0 = (n * od + zo) * oh * ow + v0;
            buf.resize(r * cols, T::zero());
            let col = &mut buf[..r * cols];
            matmul(col, cols, Mat::new(&gy[m0 * k..(m0 + r) * k], r, k), Mat::new(w, k, cols), false, 1);
            for (v, src) in col.chunks_exact(cols).enumerate() {
                let (yo, xo) = ((v0 + v) / ow, (v0 + v) % ow);
                for (tr, seg) in src.chunks_exact(run).enumerate() {
                    let (t, r) = (tr / kr, tr % kr);
                    let at = ((t * ih + yo * kr + r) * iw + xo * ks) * c;
                    let dst = &mut blk[at..at + run];
                    match bias {
                        Some(b) => {
                            dst.iter_mut().zip(seg).enumerate().for_each(|(j, (d, &s))| *d = s + b[j % c])
                        }
                        None => dst.copy_from_slice(seg),
                    }
                }
            }
        }
    };
    let small = g.macs() < PAR_MACS;
    for_each_chunk(gx, id * plane, small, |n, sample| {
        for_each_chunk(sample, kt * plane, small, |zo, blk| slab(n, zo, blk));
    });
}

/// Runs `f(index, chunk)` over `size`-element chunks of `data`, in parallel unless `serial`.
fn for_each_chunk<T: Send>(data: &mut [T], size: usize, serial: bool, f: impl Fn(usize, &mut [T]) + Sync) {
    if serial {
        data.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// One phase of a strided backward-data along one axis: the input coordinates `phase + s * a`
/// receive the taps `tau + s * u`, and form a stride-1 conv over the phase's lattice.
#[derive(Clone, Copy)]
struct Phase {
    /// First tap that reaches this phase.
    tau: usize,
    /// Number of taps reaching it.
    taps: usize,
    /// Pad of the stride-1 conv of `gy` that yields this phase.
    pad: isize,
    /// Input coordinates in the phase.
    len: usize,
}

fn phase(rho: usize, n_in: usize, k: usize, s: usize, p: usize) -> Phase {
    let tau = (rho + p) % s;
    let taps = if tau < k { (k - tau - 1) / s + 1 } else { 0 };
    // gy index of tap u at lattice point a is a + q - u.
    let q = (rho + p - tau) / s;
    let len = if rho < n_in { (n_in - rho - 1) / s + 1 } else { 0 };
    Phase { tau, taps, pad: taps as isize - 1 - q as isize, len }
}

/// The forward weight of a phase's conv of `gy`: (C, T', R', S', K), flipped taps of `w`.
fn phase_weight<T: Real>(w: &[T], d: &ConvDims, ph: &[Phase; 3]) -> Vec<T> {
    let [kt, kr, ks] = d.kernel;
    let (c, k, taps) = (d.cin, d.cout, kt * kr * ks);
    let [pt, pr, ps] = ph.map(|p| p.taps);
    let sub_taps = pt * pr * ps;
    let src_tap = |dst: usize| {
        let (ut, ur, us) = (dst / (pr * ps), dst / ps % pr, dst % ps);
        let t = ph[0].tau + d.stride[0] * (pt - 1 - ut);
        let r = ph[1].tau + d.stride[1] * (pr - 1 - ur);
        let s = ph[2].tau + d.stride[2] * (ps - 1 - us);
        (t * kr + r) * ks + s
    };
    // A K x C to C x K transpose per tap in B x B tiles (the weight can be megabytes), one task
    // per block of B input channels, which owns those rows of the output.
    const B: usize = 32;
    let mut out = vec![T::zero(); c * sub_taps * k];
    for_each_chunk(&mut out, B * sub_taps * k, c * sub_taps * k < PAR_MACS, |blk, rows| {
        let c0 = blk * B;
        let width = rows.len() / (sub_taps * k);
        for dst in 0..sub_taps {
            let src = src_tap(dst);
            for k0 in (0..k).step_by(B) {
                let kb = B.min(k - k0);
                for j in 0..width {
                    let row = &mut rows[(j * sub_taps + dst) * k + k0..][..kb];
                    for (o, ko) in row.iter_mut().zip(k0..) {
                        *o = w[(ko * taps + src) * c + c0 + j];
                    }
                }
            }
        }
    });
    out
}

/// Copies a phase's result (N, D', H', W', C) into its lattice of `gx`, or zeros when `tmp` is None.
fn scatter_phase<T: Real>(gx: &mut [T], tmp: Option<&[T]>, d: &ConvDims, rho: [usize; 3], ph: &[Phase; 3]) {
    let [id, ih, iw] = d.input;
    let [sd, sh, sw] = d.stride;
    let c = d.cin;
    let [ld, lh, lw] = ph.map(|p| p.len);
    let small = gx.len() < PAR_MACS;
    for_each_chunk(gx, ih * iw * c, small, |plane_idx, plane| {
        let (n, z) = (plane_idx / id, plane_idx % id);
        if z % sd != rho[0] {
            return;
        }
        let a = (z - rho[0]) / sd;
        for b in 0..lh {
            let y = rho[1] + sh * b;
            for e in 0..lw {
                let at = (y * iw + rho[2] + sw * e) * c;
                let dst = &mut plane[at..at + c];
                match tmp {
                    Some(t) => dst.copy_from_slice(&t[(((n * ld + a) * lh + b) * lw + e) * c..][..c]),
                    None => dst.fill(T::zero()),
                }
            }
        }
    });
}

/// `y = conv3d(x, w) + b` with "same" padding.
pub fn conv3d_forward<T: Real>(y: &mut [T], x: &[T], w: &[T], b: Option<&[T]>, d: &ConvDims) {
    d.check("conv3d forward", x.len(), y.len(), w.len());
    if let Some(b) = b {
        assert_eq!(b.len(), d.cout, "conv3d forward: bias length");
    }
    forward_gemm(y, x, w, b, &d.geom());
}

/// `gx` of [`conv3d_forward`] given the output gradient `gy`.
pub fn conv3d_backward_data<T: Real>(gx: &mut [T], gy: &[T], w: &[T], d: &ConvDims) {
    d.check("conv3d backward-data", gx.len(), gy.len(), w.len());
    let g = d.geom();
    if g.blocked() {
        return blocked_data_grad(gx, gy, w, None, &g);
    }
    let single = d.stride == [1; 3];
    let [sd, sh, sw] = d.stride;
    let pad = d.pad();
    for rho in (0..sd * sh * sw).map(|i| [i / (sh * sw), i / sw % sh, i % sw]) {
        let ph: [Phase; 3] =
            std::array::from_fn(|a| phase(rho[a], d.input[a], d.kernel[a], d.stride[a], pad[a]));
        if ph.iter().any(|p| p.len == 0) {
            continue;
        }
        if ph.iter().any(|p| p.taps == 0) {
            scatter_phase(gx, None, d, rho, &ph);
            continue;
        }
        let sub = Geom {
            n: d.n,
            input: g.output,
            output: ph.map(|p| p.len),
            kernel: ph.map(|p| p.taps),
            stride: [1; 3],
            pad: ph.map(|p| p.pad),
            cin: d.cout,
            cout: d.cin,
        };
        let wp = phase_weight(w, d, &ph);
        if single {
            forward_gemm(gx, gy, &wp, None, &sub);
        } else {
            let mut tmp = vec![T::zero(); sub.rows() * d.cin];
            forward_gemm(&mut tmp, gy, &wp, None, &sub);
            scatter_phase(gx, Some(&tmp), d, rho, &ph);
        }
    }
}

/// `gw` of [`conv3d_forward`] given the output gradient `gy` and the input `x`.
pub fn conv3d_backward_weight<T: Real>(gw: &mut [T], gy: &[T], x: &[T], d: &ConvDims) {
    d.check("conv3d backward-weight", x.len(), gy.len(), gw.len());
    weight_grad_gemm(gw, gy, x, &d.geom());
}

/// Bias gradient of a conv or transposed conv: `gy` summed over every voxel, per channel.
pub fn conv_backward_bias<T: Real>(gb: &mut [T], gy: &[T]) {
    assert!(
        !gb.is_empty() && gy.len().is_multiple_of(gb.len()),
        "conv backward-bias: gy length is not voxels x channels"
    );
    gb.copy_from_slice(&sum_over_rows(gy, gb.len()));
}

/// `y = conv_transpose3d(x, w) + b` with kernel = stride.
pub fn conv_transpose3d_forward<T: Real>(y: &mut [T], x: &[T], w: &[T], b: Option<&[T]>, d: &TransposedDims) {
    d.check("conv_transpose3d forward", x.len(), y.len(), w.len());
    if let Some(b) = b {
        assert_eq!(b.len(), d.cout, "conv_transpose3d forward: bias length");
    }
    blocked_data_grad(y, x, w, b, &d.geom());
}

/// `gx` of [`conv_transpose3d_forward`]: the blocked conv of `gy`.
pub fn conv_transpose3d_backward_data<T: Real>(gx: &mut [T], gy: &[T], w: &[T], d: &TransposedDims) {
    d.check("conv_transpose3d backward-data", gx.len(), gy.len(), w.len());
    forward_gemm(gx, gy, w, None, &d.geom());
}

/// `gw` of [`conv_transpose3d_forward`] given the output gradient `gy` and the input `x`.
pub fn conv_transpose3d_backward_weight<T: Real>(gw: &mut [T], gy: &[T], x: &[T], d: &TransposedDims) {
    d.check("conv_transpose3d backward-weight", x.len(), gy.len(), gw.len());
    weight_grad_gemm(gw, x, gy, &d.geom());
}
