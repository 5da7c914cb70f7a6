// 3D convolutions on channels-last data as implicit GEMMs, with the layouts and math of
// src/device/cpu/conv.rs: activations (N, D, H, W, C), conv weight (K, T, R, S, C).
//
// Every kernel is one block-tiled GEMM (64 x 64 or 128 x 128 tile, 16-deep stages, 256 threads)
// whose operand tiles are gathered straight from the tensors into shared memory (no im2col
// buffer), with the next stage's global loads in registers while the current stage is multiplied
// (two shared buffers, one barrier per stage). The multiply is fp32 on CUDA cores (4 x 4 or 8 x 8
// outputs per thread) or TF32 wmma m16n16k8 with fp32 accumulation (32 x 16 or 64 x 32 per warp).
//
// - forward: rows = output voxels, columns = output channels, depth = (tap, input channel);
// - backward-data: for each residue of the input coordinate modulo the stride (blockIdx.z), the
//   input voxels of that residue see a fixed subset of the taps, so each is a stride-1 GEMM over
//   the output gradient with those taps (reversed) and no scatter: kernel = stride gives one tap
//   per residue, i.e. a GEMM per kernel offset, which is also the transposed conv's forward;
// - backward-weight: rows = output channels, columns = (tap, input channel), depth = voxels, cut
//   into blockIdx.z ranges whose partial sums conv_split_sum adds in a fixed order (deterministic).
#include "common.cuh"
#ifndef UNET3D_SIM
#include <mma.h>
#endif

namespace conv_detail {

constexpr int kBK = 16;  // reduction depth per stage
constexpr int kThreads = 256;
constexpr int kPass = 64;  // operand rows that one pass of the block's loads covers
static_assert(kThreads == 16 * 16 && kThreads * 4 == kPass * kBK, "a pass loads 4 values per thread");

/// The shared layout of a BM x BN tile: per stage each operand depth-major, stage[kk * ld + row],
/// with ld = rows + 4: float4 and wmma ldm alignment, and 8 rows of it a multiple of 32 bytes
/// (wmma tiles start at depths 0 and 8 of a stage).
template <int BM, int BN>
struct Tile {
  static constexpr int kLdA = BM + 4, kLdB = BN + 4;
  static constexpr int kStageA = kBK * kLdA, kStage = kStageA + kBK * kLdB;
  static_assert(BM % kPass == 0 && BN % kPass == 0, "tiles are whole loader passes");
  static_assert(2 * kStage >= kPass * kLdB, "64 accumulator rows fit in the operand buffers");
};

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

/// Depths [kbeg, kend) of split z of `splits` over `depth`, in whole stages.
__device__ __forceinline__ void split_range(int depth, int z, int splits, int& kbeg, int& kend) {
  const long long stages = cdiv(depth, kBK);
  kbeg = static_cast<int>(stages * z / splits) * kBK;
  kend = min(depth, static_cast<int>(stages * (z + 1) / splits) * kBK);
}

/// One spatial axis of a GEMM problem: GEMM row coordinate j and tap u read the source at
/// j * as + u * au + ao, use weight tap u * wu + w0, and write output coordinate j * os + oo.
struct Axis {
  int src, rows, taps, as, au, ao, wu, w0, os, oo, out;
};

struct Geom {
  Axis ax[3];
  int batch;
  int csrc;   // channels of the gathered source: the reduction runs over (tap, csrc)
  int ncols;  // GEMM columns of the forward and backward-data problems
  int wk[3];  // the weight's kernel extents, which weight taps u * wu + w0 index
  int wtaps;  // T * R * S
  __device__ int ktaps() const { return ax[0].taps * ax[1].taps * ax[2].taps; }
  __device__ int kdim() const { return ktaps() * csrc; }
  __device__ long long rows() const { return static_cast<long long>(batch) * ax[0].rows * ax[1].rows * ax[2].rows; }
};

/// The conv as launched: x (n, i[3], c), y (n, o[3], k), kernel t[3], stride s[3], padding p[3].
struct Dims {
  int n, c, k, i[3], o[3], t[3], s[3], p[3];
};

#define CONV_DIMS_PARAMS                                                                                   \
  int n, int id, int ih, int iw, int c, int od, int oh, int ow, int k, int kt, int kr, int ks, int sd, int sh, \
      int sw, int pd, int ph, int pw
#define CONV_DIMS_ARGS \
  conv_detail::Dims { n, c, k, {id, ih, iw}, {od, oh, ow}, {kt, kr, ks}, {sd, sh, sw}, { pd, ph, pw } }

__device__ __forceinline__ void set_kernel(Geom& g, const Dims& d) {
  for (int a = 0; a < 3; ++a) g.wk[a] = d.t[a];
  g.wtaps = d.t[0] * d.t[1] * d.t[2];
}

/// Forward (and the backward-weight gather): rows are output voxels, the source is x.
__device__ Geom forward_geom(const Dims& d) {
  Geom g;
  for (int a = 0; a < 3; ++a) g.ax[a] = Axis{d.i[a], d.o[a], d.t[a], d.s[a], 1, -d.p[a], 1, 0, 1, 0, d.o[a]};
  g.batch = d.n;
  g.csrc = d.c;
  g.ncols = d.k;
  set_kernel(g, d);
  return g;
}

/// Backward-data for the input voxels congruent to `phase` (per axis, row-major over the stride):
/// i = rho + s j gets taps t = t0 + s u with (rho + p - t0) % s == 0, from output voxel j + q - u.
__device__ Geom data_geom(const Dims& d, int phase) {
  Geom g;
  int rho[3];
  rho[2] = phase % d.s[2];
  rho[1] = phase / d.s[2] % d.s[1];
  rho[0] = phase / (d.s[2] * d.s[1]);
  for (int a = 0; a < 3; ++a) {
    const int s = d.s[a], t0 = (rho[a] + d.p[a]) % s;
    const int rows = rho[a] < d.i[a] ? cdiv(d.i[a] - rho[a], s) : 0;
    const int taps = t0 < d.t[a] ? cdiv(d.t[a] - t0, s) : 0;
    g.ax[a] = Axis{d.o[a], rows, taps, 1, -1, (rho[a] + d.p[a] - t0) / s, s, t0, s, rho[a], d.i[a]};
  }
  g.batch = d.n;
  g.csrc = d.k;
  g.ncols = d.c;
  set_kernel(g, d);
  return g;
}

/// A GEMM row's batch index and per-axis row coordinates.
struct RowPos {
  int b, j[3];
};

/// In 32-bit unsigned arithmetic (a fraction of the 64-bit division's code and time): the host
/// checks that voxel counts fit an int.
__device__ __forceinline__ RowPos row_pos(const Geom& g, long long row) {
  RowPos r;
  unsigned m = static_cast<unsigned>(row);
  const unsigned r2 = g.ax[2].rows, r1 = g.ax[1].rows, r0 = g.ax[0].rows;
  r.j[2] = static_cast<int>(m % r2);
  m /= r2;
  r.j[1] = static_cast<int>(m % r1);
  m /= r1;
  r.j[0] = static_cast<int>(m % r0);
  r.b = static_cast<int>(m / r0);
  return r;
}

/// Splits a reduction index into its tap (per axis) and channel.
__device__ __forceinline__ void split_k(const Geom& g, int kk, int u[3], int& ch) {
  const int tap = kk / g.csrc;
  ch = kk - tap * g.csrc;
  u[2] = tap % g.ax[2].taps;
  u[1] = tap / g.ax[2].taps % g.ax[1].taps;
  u[0] = tap / (g.ax[2].taps * g.ax[1].taps);
}

/// A reduction index kk = tap * csrc + ch with the tap split per axis, which the main loop moves
/// forward without the divisions of split_k.
struct KPos {
  int u[3], ch;

  __device__ void advance(const Geom& g, int by) {
    ch += by;
    while (ch >= g.csrc) {
      ch -= g.csrc;
      if (++u[2] == g.ax[2].taps) {
        u[2] = 0;
        if (++u[1] == g.ax[1].taps) u[1] = 0, ++u[0];
      }
    }
  }
};

/// The position of depth `kk` for a loader whose fetches step through the depth a stage at a
/// time: split once at the first fetch, advanced by a stage at each later one.
__device__ __forceinline__ void track(const Geom& g, KPos& kp, bool& started, int kk) {
  if (started) {
    kp.advance(g, kBK);
  } else {
    split_k(g, kk, kp.u, kp.ch);
    started = true;
  }
}

/// Offset of (row, taps, channel) in the source, or -1 where the tap falls into the padding.
__device__ __forceinline__ long long src_offset(const Geom& g, const RowPos& r, const int u[3], int ch) {
  long long off = r.b;
  for (int a = 0; a < 3; ++a) {
    const int v = r.j[a] * g.ax[a].as + u[a] * g.ax[a].au + g.ax[a].ao;
    if (v < 0 || v >= g.ax[a].src) return -1;
    off = off * g.ax[a].src + v;
  }
  return off * g.csrc + ch;
}

__device__ __forceinline__ void load4(float v[4], const float* p, bool vec, long long off, int valid) {
  if (vec && valid == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p + off);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    for (int i = 0; i < 4; ++i) v[i] = i < valid ? p[off + i] : 0.0f;
  }
}

/// Operand tiles are stored depth-major, stage[kk * ld + row]. One pass of a "row-fast" loader
/// has thread t fetch 4 consecutive depths of row t / 4, one of a "depth-fast" loader 4
/// consecutive rows of depth t / 16, so both read contiguous memory where the tensor is
/// contiguous; a tile of R rows takes R / 64 passes.

/// Row-fast: the gathered source of the forward and backward-data (row = voxel, depth = (tap,
/// channel)), or with kPlain a row-major matrix p[row * ld + kk] (the 1x1x1 input, the weight).
template <bool kPlain, int R>
struct RowLoader {
  static constexpr int H = R / kPass;
  const float* p;
  const Geom* g;
  long long row[H];
  bool ok[H], vec, started;
  RowPos pos[H];
  KPos kp;
  int ld, kend, r, kq;
  float v[H][4];

  __device__ void init(const float* ptr, const Geom* geom, long long m0, long long nrows, int ldm, int depth) {
    p = ptr, g = geom, ld = ldm, kend = depth, started = false;
    r = threadIdx.x >> 2, kq = (threadIdx.x & 3) * 4;
    vec = (kPlain ? ld : g->csrc) % 4 == 0;
    for (int h = 0; h < H; ++h) {
      row[h] = m0 + r + h * kPass;
      ok[h] = row[h] < nrows;
      if (!kPlain && ok[h]) pos[h] = row_pos(*g, row[h]);
    }
  }

  __device__ void fetch(int k0) {
    const int kk = k0 + kq;
    for (int h = 0; h < H; ++h) v[h][0] = v[h][1] = v[h][2] = v[h][3] = 0.0f;
    if (kk >= kend) return;
    if (kPlain) {
      for (int h = 0; h < H; ++h)
        if (ok[h]) load4(v[h], p, vec, row[h] * ld + kk, min(4, kend - kk));
    } else if (vec) {
      track(*g, kp, started, kk);
      for (int h = 0; h < H; ++h) {
        const long long off = ok[h] ? src_offset(*g, pos[h], kp.u, kp.ch) : -1;
        load4(v[h], p, true, off, off < 0 ? 0 : 4);
      }
    } else {
      track(*g, kp, started, kk);
      KPos q = kp;
      for (int i = 0; i < 4 && kk + i < kend; ++i, q.advance(*g, 1)) {
        for (int h = 0; h < H; ++h) {
          const long long off = ok[h] ? src_offset(*g, pos[h], q.u, q.ch) : -1;
          if (off >= 0) v[h][i] = p[off];
        }
      }
    }
  }

  __device__ void put(float* s, int lds) const {
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < 4; ++i) s[(kq + i) * lds + r + h * kPass] = v[h][i];
  }
};

/// Depth-fast over memory contiguous along the GEMM row: with kWeight the backward-data weight
/// (depth (taps u, k), row c: w[(k * wtaps + tap(u)) * ld + c]), else p[kk * ld + row] (the output
/// gradient as the backward-weight's row operand).
template <bool kWeight, int R>
struct DepthLoader {
  static constexpr int H = R / kPass;
  const float* p;
  const Geom* g;
  long long row0;
  int ld, nrows, kend, kr, rq;
  bool vec, started;
  KPos kp;
  float v[H][4];

  __device__ void init(const float* ptr, const Geom* geom, long long r0, int rows, int ldm, int depth) {
    p = ptr, g = geom, ld = ldm, nrows = rows, kend = depth, started = false;
    kr = threadIdx.x >> 4, rq = (threadIdx.x & 15) * 4;
    row0 = r0 + rq;
    vec = ld % 4 == 0;
  }

  __device__ void fetch(int k0) {
    const int kk = k0 + kr;
    long long base = 0;
    if (kk < kend && kWeight) {
      track(*g, kp, started, kk);
      int tap = 0;
      for (int a = 0; a < 3; ++a) tap = tap * g->wk[a] + kp.u[a] * g->ax[a].wu + g->ax[a].w0;
      base = (static_cast<long long>(kp.ch) * g->wtaps + tap) * ld;
    } else if (kk < kend) {
      base = static_cast<long long>(kk) * ld;
    }
    for (int h = 0; h < H; ++h) {
      const long long r = row0 + h * kPass;
      const int valid = kk < kend ? static_cast<int>(min(4LL, max(0LL, nrows - r))) : 0;
      load4(v[h], p, vec, base + r, valid);
    }
  }

  __device__ void put(float* s, int lds) const {
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < 4; ++i) s[kr * lds + rq + h * kPass + i] = v[h][i];
  }
};

/// Depth-fast gather of the backward-weight's column operand: row = weight column (tap,
/// channel), depth = output voxel; the columns of a thread are split into taps once.
template <int R>
struct GatherDepthLoader {
  static constexpr int H = R / kPass;
  const float* p;
  const Geom* g;
  int kend, kr, rq, u[H * 4][3], ch[H * 4];
  bool ok[H * 4], vec;
  float v[H][4];

  __device__ void init(const float* ptr, const Geom* geom, int n0, int depth) {
    p = ptr, g = geom, kend = depth;
    kr = threadIdx.x >> 4, rq = (threadIdx.x & 15) * 4;
    vec = g->csrc % 4 == 0;
    for (int h = 0; h < H; ++h) {
      for (int i = 0; i < 4; ++i) {
        const int col = n0 + rq + h * kPass + i;
        ok[h * 4 + i] = col < g->kdim();
        if (ok[h * 4 + i]) split_k(*g, col, u[h * 4 + i], ch[h * 4 + i]);
      }
    }
  }

  __device__ void fetch(int k0) {
    const int m = k0 + kr;
    for (int h = 0; h < H; ++h) v[h][0] = v[h][1] = v[h][2] = v[h][3] = 0.0f;
    if (m >= kend) return;
    const RowPos pos = row_pos(*g, m);
    for (int h = 0; h < H; ++h) {
      if (vec) {
        const int c = h * 4;
        const long long off = ok[c] ? src_offset(*g, pos, u[c], ch[c]) : -1;
        load4(v[h], p, true, off, off < 0 ? 0 : 4);
      } else {
        for (int i = 0; i < 4; ++i) {
          const int c = h * 4 + i;
          const long long off = ok[c] ? src_offset(*g, pos, u[c], ch[c]) : -1;
          if (off >= 0) v[h][i] = p[off];
        }
      }
    }
  }

  __device__ void put(float* s, int lds) const {
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < 4; ++i) s[kr * lds + rq + h * kPass + i] = v[h][i];
  }
};

#ifdef UNET3D_SIM
#define CONV_UNROLL
#else
#define CONV_UNROLL _Pragma("unroll")
#endif

/// Writes the valid of 4 consecutive columns at out + off, plus bias[n..] when given.
__device__ __forceinline__ void store4(float* out, long long off, const float v[4], int valid, bool vec,
                                       const float* bias, int n) {
  float w[4];
  for (int i = 0; i < 4; ++i) w[i] = v[i] + (bias != nullptr && i < valid ? bias[n + i] : 0.0f);
  if (vec && valid == 4) {
    *reinterpret_cast<float4*>(out + off) = make_float4(w[0], w[1], w[2], w[3]);
  } else {
    for (int i = 0; i < valid; ++i) out[off + i] = w[i];
  }
}

/// fp32 on CUDA cores: thread (ty, tx) of a 16 x 16 grid owns rows 4ty.. and columns 4tx.. of
/// every 64 x 64 quarter of the tile (4 x 4 outputs per 64 x 64 tile, 8 x 8 per 128 x 128).
template <int BM, int BN>
struct FmaCore {
  static constexpr int HM = BM / kPass, HN = BN / kPass;
  float acc[HM * 4][HN * 4];

  __device__ void init() {
    for (int i = 0; i < HM * 4; ++i)
      for (int j = 0; j < HN * 4; ++j) acc[i][j] = 0.0f;
  }

  __device__ void stage(const float* as, const float* bs) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    CONV_UNROLL
    for (int kk = 0; kk < kBK; ++kk) {
      float a[HM * 4], b[HN * 4];
      CONV_UNROLL
      for (int h = 0; h < HM; ++h) {
        const float4 q = *reinterpret_cast<const float4*>(as + kk * Tile<BM, BN>::kLdA + h * kPass + ty * 4);
        a[4 * h] = q.x, a[4 * h + 1] = q.y, a[4 * h + 2] = q.z, a[4 * h + 3] = q.w;
      }
      CONV_UNROLL
      for (int h = 0; h < HN; ++h) {
        const float4 q = *reinterpret_cast<const float4*>(bs + kk * Tile<BM, BN>::kLdB + h * kPass + tx * 4);
        b[4 * h] = q.x, b[4 * h + 1] = q.y, b[4 * h + 2] = q.z, b[4 * h + 3] = q.w;
      }
      CONV_UNROLL
      for (int i = 0; i < HM * 4; ++i) {
        CONV_UNROLL
        for (int j = 0; j < HN * 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }

  template <class Epi>
  __device__ void epilogue(float*, const Epi& epi, long long m0, int n0) const {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    // Unrolled, with the values copied out, so that acc stays in registers.
    CONV_UNROLL
    for (int i = 0; i < HM * 4; ++i) {
      const long long base = epi.row_base(m0 + (i / 4) * kPass + ty * 4 + i % 4);
      if (base < 0) continue;
      CONV_UNROLL
      for (int h = 0; h < HN; ++h) {
        const float v[4] = {acc[i][4 * h], acc[i][4 * h + 1], acc[i][4 * h + 2], acc[i][4 * h + 3]};
        epi.store(base, n0 + h * kPass + tx * 4, v);
      }
    }
  }
};

/// TF32 tensor cores: the 8 warps form a 2 x 4 grid of (BM / 2) x (BN / 4) warp tiles of 16 x 16
/// accumulators; the operands are rounded to TF32 (cvt.rna) in the fragments, the sums stay fp32.
template <int BM, int BN>
struct MmaCore {
  static constexpr int WM = BM / 2, WN = BN / 4, FM = WM / 16, FN = WN / 16;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> c[FM][FN];

  __device__ void init() {
    for (int i = 0; i < FM; ++i)
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.0f);
  }

  __device__ void stage(const float* as, const float* bs) {
    using namespace nvcuda::wmma;
    constexpr int lda = Tile<BM, BN>::kLdA, ldb = Tile<BM, BN>::kLdB;
    const int warp = threadIdx.x >> 5, wm = warp & 1, wn = warp >> 1;
    CONV_UNROLL
    for (int kk = 0; kk < kBK; kk += 8) {
      fragment<matrix_b, 16, 16, 8, precision::tf32, row_major> b[FN];
      CONV_UNROLL
      for (int j = 0; j < FN; ++j) {
        load_matrix_sync(b[j], bs + kk * ldb + wn * WN + j * 16, ldb);
        for (int e = 0; e < b[j].num_elements; ++e) b[j].x[e] = __float_to_tf32(b[j].x[e]);
      }
      CONV_UNROLL
      for (int i = 0; i < FM; ++i) {
        fragment<matrix_a, 16, 16, 8, precision::tf32, col_major> a;
        load_matrix_sync(a, as + kk * lda + wm * WM + i * 16, lda);
        for (int e = 0; e < a.num_elements; ++e) a.x[e] = __float_to_tf32(a.x[e]);
        CONV_UNROLL
        for (int j = 0; j < FN; ++j) mma_sync(c[i][j], a, b[j], c[i][j]);
      }
    }
  }

  /// The accumulators through shared memory (free after the main loop's last barrier), 64 rows
  /// at a time, then stored with the FmaCore thread layout.
  template <class Epi>
  __device__ void epilogue(float* smem, const Epi& epi, long long m0, int n0) const {
    using namespace nvcuda::wmma;
    constexpr int ld = Tile<BM, BN>::kLdB;
    const int warp = threadIdx.x >> 5, wm = warp & 1, wn = warp >> 1;
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    for (int hm = 0; hm < BM / kPass; ++hm) {
      for (int i = 0; i < FM; ++i) {
        const int r = wm * WM + i * 16 - hm * kPass;
        if (r < 0 || r >= kPass) continue;
        for (int j = 0; j < FN; ++j) store_matrix_sync(smem + r * ld + wn * WN + j * 16, c[i][j], ld, mem_row_major);
      }
      __syncthreads();
      for (int i = 0; i < 4; ++i) {
        const long long base = epi.row_base(m0 + hm * kPass + ty * 4 + i);
        if (base < 0) continue;
        for (int h = 0; h < BN / kPass; ++h)
          epi.store(base, n0 + h * kPass + tx * 4, smem + (ty * 4 + i) * ld + h * kPass + tx * 4);
      }
      __syncthreads();
    }
  }
};

/// Forward and backward-data: GEMM row m is the voxel at j * os + oo of the output tensor.
struct ConvEpi {
  float* out;
  const float* bias;
  const Geom* g;
  long long rows;

  /// Offset of row m in `out`, or -1 past the last row.
  __device__ long long row_base(long long m) const {
    if (m >= rows) return -1;
    const RowPos r = row_pos(*g, m);
    long long off = r.b;
    for (int a = 0; a < 3; ++a) off = off * g->ax[a].out + r.j[a] * g->ax[a].os + g->ax[a].oo;
    return off * g->ncols;
  }

  __device__ void store(long long base, int n, const float v[4]) const {
    if (n < g->ncols) store4(out, base + n, v, min(4, g->ncols - n), g->ncols % 4 == 0, bias, n);
  }
};

/// Backward-weight: a row-major (rows, ncols) matrix.
struct MatEpi {
  float* out;
  long long rows;
  int ncols;

  __device__ long long row_base(long long m) const { return m < rows ? m * ncols : -1; }

  __device__ void store(long long base, int n, const float v[4]) const {
    if (n < ncols) store4(out, base + n, v, min(4, ncols - n), ncols % 4 == 0, nullptr, n);
  }
};

/// The block's GEMM tile (rows m0.., columns n0..) over depths kbeg..kend: two shared stages, the
/// next one's global loads issued before the current one is multiplied, one barrier per stage.
template <template <int, int> class Core, int BM, int BN, class LA, class LB, class Epi>
__device__ void gemm_tile(LA& a, LB& b, int kbeg, int kend, const Epi& epi, long long m0, int n0) {
  using T = Tile<BM, BN>;
  __shared__ __align__(32) float smem[2 * T::kStage];
  Core<BM, BN> core;
  core.init();
  a.fetch(kbeg);
  b.fetch(kbeg);
  a.put(smem, T::kLdA);
  b.put(smem + T::kStageA, T::kLdB);
  __syncthreads();
  int stage = 0;
  for (int k0 = kbeg; k0 < kend; k0 += kBK) {
    const bool more = k0 + kBK < kend;
    if (more) {
      a.fetch(k0 + kBK);
      b.fetch(k0 + kBK);
    }
    const float* cur = smem + stage * T::kStage;
    core.stage(cur, cur + T::kStageA);
    if (more) {
      float* next = smem + (stage ^ 1) * T::kStage;
      a.put(next, T::kLdA);
      b.put(next + T::kStageA, T::kLdB);
    }
    __syncthreads();
    stage ^= 1;
  }
  core.epilogue(smem, epi, m0, n0);
}

/// y = conv(x, w) (+ bias); kPw: 1x1x1 stride 1, the input is the im2col matrix itself. With
/// splits > 1, split blockIdx.z of the depth writes its partial sum to y + blockIdx.z * |y| (the
/// bias in split 0), for conv_split_sum.
template <bool kPw, template <int, int> class Core, int BM, int BN>
__device__ void forward(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits,
                        const Dims& d) {
  const Geom g = forward_geom(d);
  const long long rows = g.rows(), m0 = static_cast<long long>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN, kdim = g.kdim(), z = blockIdx.z;
  if (m0 >= rows) return;
  int kbeg, kend;
  split_range(kdim, z, splits, kbeg, kend);
  RowLoader<kPw, BM> a;
  a.init(x, &g, m0, rows, d.c, kend);
  RowLoader<true, BN> b;
  b.init(w, &g, n0, g.ncols, kdim, kend);
  const ConvEpi epi{y + z * rows * g.ncols, has_bias && z == 0 ? bias : nullptr, &g, rows};
  gemm_tile<Core, BM, BN>(a, b, kbeg, kend, epi, m0, n0);
}

/// gx of the conv from gy for the residue class blockIdx.z / splits of the input voxels (see
/// data_geom), split blockIdx.z % splits of the depth as in `forward`; the bias, when given, is
/// added per input channel (the transposed conv's forward).
template <bool kPw, template <int, int> class Core, int BM, int BN>
__device__ void data(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits,
                     const Dims& d) {
  const int phase = blockIdx.z / splits, z = blockIdx.z % splits;
  const Geom g = data_geom(d, phase);
  const long long rows = g.rows(), m0 = static_cast<long long>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN, kdim = g.kdim();
  if (m0 >= rows) return;
  int kbeg, kend;
  split_range(kdim, z, splits, kbeg, kend);
  RowLoader<kPw, BM> a;
  a.init(gy, &g, m0, rows, d.k, kend);
  DepthLoader<true, BN> b;
  b.init(w, &g, n0, g.ncols, g.ncols, kend);
  const long long len = static_cast<long long>(d.n) * d.i[0] * d.i[1] * d.i[2] * d.c;
  const ConvEpi epi{gx + z * len, has_bias && z == 0 ? bias : nullptr, &g, rows};
  gemm_tile<Core, BM, BN>(a, b, kbeg, kend, epi, m0, n0);
}

/// gw partial sum of the voxel range blockIdx.z of gridDim.z into ws + blockIdx.z * K * kdim.
template <bool kPw, template <int, int> class Core, int BM, int BN>
__device__ void weight(const float* gy, const float* x, float* ws, const Dims& d) {
  const Geom g = forward_geom(d);
  const int voxels = static_cast<int>(g.rows()), kdim = g.kdim(), z = blockIdx.z;
  int kbeg, kend;
  split_range(voxels, z, gridDim.z, kbeg, kend);
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  DepthLoader<false, BM> a;
  a.init(gy, &g, m0, d.k, d.k, kend);
  const MatEpi epi{ws + static_cast<long long>(z) * d.k * kdim, d.k, kdim};
  if constexpr (kPw) {
    DepthLoader<false, BN> b;
    b.init(x, &g, n0, d.c, d.c, kend);
    gemm_tile<Core, BM, BN>(a, b, kbeg, kend, epi, m0, n0);
  } else {
    GatherDepthLoader<BN> b;
    b.init(x, &g, n0, kend);
    gemm_tile<Core, BM, BN>(a, b, kbeg, kend, epi, m0, n0);
  }
}

}  // namespace conv_detail

// Grids for a T x T tile (T = 64, or 128 for the _128 kernels): forward (ceil(rows / T), ceil(K /
// T), splits); backward-data (ceil(N * prod ceil(I / s) / T), ceil(C / T), prod s * splits);
// backward-weight (ceil(T R S C / T), ceil(K / T), splits). Blocks of 256 threads; `bias` is read only when
// has_bias != 0. The 64 tiles keep two blocks per SM (<= 128 registers), the 128 tiles one.

extern "C" __global__ void __launch_bounds__(256, 2) conv_fwd_f32(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<false, conv_detail::FmaCore, 64, 64>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_fwd_f32_128(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<false, conv_detail::FmaCore, 128, 128>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_fwd_tf32(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<false, conv_detail::MmaCore, 64, 64>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_fwd_tf32_128(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<false, conv_detail::MmaCore, 128, 128>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_fwd_1x1_f32(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<true, conv_detail::FmaCore, 64, 64>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_fwd_1x1_f32_128(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<true, conv_detail::FmaCore, 128, 128>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_fwd_1x1_tf32(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<true, conv_detail::MmaCore, 64, 64>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_fwd_1x1_tf32_128(const float* x, const float* w, const float* bias, float* y, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::forward<true, conv_detail::MmaCore, 128, 128>(x, w, bias, y, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_dgrad_f32(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<false, conv_detail::FmaCore, 64, 64>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_dgrad_f32_128(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<false, conv_detail::FmaCore, 128, 128>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_dgrad_tf32(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<false, conv_detail::MmaCore, 64, 64>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_dgrad_tf32_128(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<false, conv_detail::MmaCore, 128, 128>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_dgrad_1x1_f32(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<true, conv_detail::FmaCore, 64, 64>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_dgrad_1x1_f32_128(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<true, conv_detail::FmaCore, 128, 128>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_dgrad_1x1_tf32(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<true, conv_detail::MmaCore, 64, 64>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_dgrad_1x1_tf32_128(const float* gy, const float* w, const float* bias, float* gx, int has_bias, int splits, CONV_DIMS_PARAMS) {
  conv_detail::data<true, conv_detail::MmaCore, 128, 128>(gy, w, bias, gx, has_bias, splits, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_wgrad_f32(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<false, conv_detail::FmaCore, 64, 64>(gy, x, ws, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_wgrad_f32_128(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<false, conv_detail::FmaCore, 128, 128>(gy, x, ws, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_wgrad_tf32(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<false, conv_detail::MmaCore, 64, 64>(gy, x, ws, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_wgrad_tf32_128(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<false, conv_detail::MmaCore, 128, 128>(gy, x, ws, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_wgrad_1x1_f32(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<true, conv_detail::FmaCore, 64, 64>(gy, x, ws, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_wgrad_1x1_f32_128(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<true, conv_detail::FmaCore, 128, 128>(gy, x, ws, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_wgrad_1x1_tf32(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<true, conv_detail::MmaCore, 64, 64>(gy, x, ws, CONV_DIMS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_wgrad_1x1_tf32_128(const float* gy, const float* x, float* ws, CONV_DIMS_PARAMS) {
  conv_detail::weight<true, conv_detail::MmaCore, 128, 128>(gy, x, ws, CONV_DIMS_ARGS);
}

/// out[i] = the sum over the splits of ws[z * len + i], in split order (deterministic).
extern "C" __global__ void conv_split_sum(const float* ws, float* out, int splits, long long len) {
  for (long long i = global_thread(); i < len; i += grid_threads()) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += ws[z * len + i];
    out[i] = s;
  }
}
