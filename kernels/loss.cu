// Fused losses over channels-last data, as src/device/cpu/loss.rs: a forward pass of per-block
// partial sums (f64) over the voxels, a finish kernel that adds the partials in a fixed order and
// forms the loss and the constants of its gradient on the device, and one backward pass.
//   - softmax + cross-entropy + soft Dice partials (nnU-Net's DC_and_CE_loss, CE alone);
//   - pointwise losses: MSE, L1, SmoothL1, BCE with logits (per-slice label smoothing), BCE;
//   - the seed's BCEDiceLoss (sigmoid Dice per channel over batch and space);
//   - the seed's MaskedCosineLoss.
// Label maps hold class indices as floats; a value that is not one is counted, not read through.
#include "fused.cuh"

constexpr int kLossThreads = 256;

/// Class index of a label value, or -1 when it is not an integer in 0..c.
__device__ __forceinline__ int loss_class(float label, int c) {
  return (label >= 0.0f && label < static_cast<float>(c) && label == floorf(label)) ? static_cast<int>(label)
                                                                                      : -1;
}

/// Softmax of one voxel's c <= K logits into p (zero past c); returns log-sum-exp. Fixed-size
/// arrays with loops over K, guarded by k < c, stay in registers.
template <int K>
__device__ __forceinline__ float softmax_voxel(const float* xr, int c, float (&x)[K], float (&p)[K]) {
  float m = -INFINITY;
  UNET3D_UNROLL
  for (int k = 0; k < K; ++k) {
    x[k] = k < c ? xr[k] : -INFINITY;
    m = fmaxf(m, x[k]);
  }
  float sum = 0.0f;
  UNET3D_UNROLL
  for (int k = 0; k < K; ++k) {
    p[k] = k < c ? expf(x[k] - m) : 0.0f;
    sum = sum + p[k];
  }
  UNET3D_UNROLL
  for (int k = 0; k < K; ++k) p[k] = p[k] / sum;
  return m + logf(sum);
}

/// Grid (blocks per sample, samples). partial[(n * gridDim.x + block) * (2 + 3c) + j]: j = 0 sum of
/// CE, 1 count of bad labels, then per class the sums of p over the class's voxels (intersection),
/// of p, and the class's voxel count.
template <int K>
__device__ void softmax_partials(const float* logits, const float* labels, double* partial, long long voxels, int c) {
  __shared__ double scratch[32];
  const long long n = blockIdx.y;
  double ce = 0.0, bad = 0.0, inter[K], pred[K], gt[K];
  UNET3D_UNROLL
  for (int k = 0; k < K; ++k) inter[k] = pred[k] = gt[k] = 0.0;
  for (long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; v < voxels;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long gv = n * voxels + v;
    float x[K], p[K];
    const float lse = softmax_voxel<K>(logits + gv * c, c, x, p);
    const int y = loss_class(labels[gv], c);
    float xy = 0.0f;
    UNET3D_UNROLL
    for (int k = 0; k < K; ++k) {
      if (k == y) xy = x[k];
      pred[k] += static_cast<double>(p[k]);
      if (k == y) {
        inter[k] += static_cast<double>(p[k]);
        gt[k] += 1.0;
      }
    }
    if (y < 0) {
      bad += 1.0;
    } else {
      ce += static_cast<double>(lse - xy);
    }
  }
  const int width = 2 + 3 * c;
  double* out = partial + (n * gridDim.x + blockIdx.x) * width;
  const double t_ce = block_sum(ce, scratch), t_bad = block_sum(bad, scratch);
  if (threadIdx.x == 0) {
    out[0] = t_ce;
    out[1] = t_bad;
  }
  UNET3D_UNROLL
  for (int k = 0; k < K; ++k) {
    if (k >= c) continue;
    const double i = block_sum(inter[k], scratch), pk = block_sum(pred[k], scratch), g = block_sum(gt[k], scratch);
    if (threadIdx.x == 0) {
      out[2 + k] = i;
      out[2 + c + k] = pk;
      out[2 + 2 * c + k] = g;
    }
  }
}

// One instantiation per bound on the class count (build.rs reads kernel names literally).
extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_softmax_partials_c4(const float* logits, const float* labels, double* partial, long long voxels, int c) {
  softmax_partials<4>(logits, labels, partial, voxels, c);
}
extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_softmax_partials_c8(const float* logits, const float* labels, double* partial, long long voxels, int c) {
  softmax_partials<8>(logits, labels, partial, voxels, c);
}
extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_softmax_partials_c16(const float* logits, const float* labels, double* partial, long long voxels, int c) {
  softmax_partials<16>(logits, labels, partial, voxels, c);
}

/// One block. Adds each (sample, j) partial over the blocks (a warp each, into dynamic shared memory
/// of n * (2 + 3c) doubles), then forms `ce_scale * CE - dice_weight * mean(dc)` with
/// dc = (2I + smooth) / max(G + P + smooth, 1e-8) over the Dice entries (per class over the batch,
/// or per (sample, class)), out = [loss, bad labels], and the backward's d loss / d I and d loss / d P
/// per (sample, class): coef[0 .. n*c) and coef[n*c .. 2n*c).
extern "C" __global__ void loss_softmax_finish(const double* partial, float* coef, double* out, int n, int c,
                                               int blocks, double ce_scale, double dice_weight, int batch_dice,
                                               int do_bg, double smooth) {
  double* tot = dynamic_shared<double>();
  const int width = 2 + 3 * c, entries = n * width;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int e = warp; e < entries; e += nwarps) {
    const int b = e / width, j = e - b * width;
    const double v = warp_sum_strided(partial + static_cast<long long>(b) * blocks * width + j, blocks, width);
    if ((threadIdx.x & 31) == 0) tot[e] = v;
  }
  for (int i = threadIdx.x; i < 2 * n * c; i += blockDim.x) coef[i] = 0.0f;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double ce = 0.0, bad = 0.0, dice = 0.0;
  for (int b = 0; b < n; ++b) {
    ce += tot[b * width];
    bad += tot[b * width + 1];
  }
  if (dice_weight != 0.0) {
    const int first = do_bg ? 0 : 1;
    const int per = batch_dice ? 1 : n;
    const double w = dice_weight / static_cast<double>((c - first) * per);
    // Entry (s, k) is class k of sample s, or of the whole batch (s = 0) with batch Dice.
    for (int s = 0; s < per; ++s) {
      for (int k = first; k < c; ++k) {
        const int b0 = batch_dice ? 0 : s, b1 = batch_dice ? n : s + 1;
        double i = 0.0, p = 0.0, g = 0.0;
        for (int b = b0; b < b1; ++b) {
          i += tot[b * width + 2 + k];
          p += tot[b * width + 2 + c + k];
          g += tot[b * width + 2 + 2 * c + k];
        }
        const double raw = g + p + smooth, den = fmax(raw, 1e-8), num = 2.0 * i + smooth;
        dice -= w * num / den;
        const double dp = raw >= 1e-8 ? w * num / (den * den) : 0.0;
        for (int b = b0; b < b1; ++b) {
          coef[b * c + k] = static_cast<float>(-w * 2.0 / den);
          coef[(n + b) * c + k] = static_cast<float>(dp);
        }
      }
    }
  }
  out[0] = ce_scale * ce + dice;
  out[1] = bad;
}

/// gx = gy * (ce_scale * (p - onehot) + p * (dp - p . dp)) with dp_k = d_pred[k] + [k == y] d_inter[k].
template <int K>
__device__ void softmax_bwd(const float* logits, const float* labels, const float* coef, float* gx, int n,
                            long long voxels, int c, float ce_scale, const float* gy_ptr) {
  const float gy = gy_ptr[0];
  const long long total = static_cast<long long>(n) * voxels;
  for (long long gv = global_thread(); gv < total; gv += grid_threads()) {
    const long long b = gv / voxels;
    float x[K], p[K], dp[K];
    softmax_voxel<K>(logits + gv * c, c, x, p);
    const int y = loss_class(labels[gv], c);
    const float* d_inter = coef + b * c;
    const float* d_pred = coef + (n + b) * c;
    float dot = 0.0f;
    UNET3D_UNROLL
    for (int k = 0; k < K; ++k) {
      dp[k] = k < c ? d_pred[k] : 0.0f;
      if (k == y) dp[k] = dp[k] + d_inter[k];
      dot = dot + p[k] * dp[k];
    }
    UNET3D_UNROLL
    for (int k = 0; k < K; ++k) {
      if (k < c) {
        const float onehot = k == y ? 1.0f : 0.0f;
        gx[gv * c + k] = gy * (ce_scale * (p[k] - onehot) + p[k] * (dp[k] - dot));
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_softmax_bwd_c4(const float* logits, const float* labels, const float* coef, float* gx, int n,
                          long long voxels, int c, float ce_scale, const float* gy) {
  softmax_bwd<4>(logits, labels, coef, gx, n, voxels, c, ce_scale, gy);
}
extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_softmax_bwd_c8(const float* logits, const float* labels, const float* coef, float* gx, int n,
                          long long voxels, int c, float ce_scale, const float* gy) {
  softmax_bwd<8>(logits, labels, coef, gx, n, voxels, c, ce_scale, gy);
}
extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_softmax_bwd_c16(const float* logits, const float* labels, const float* coef, float* gx, int n,
                          long long voxels, int c, float ce_scale, const float* gy) {
  softmax_bwd<16>(logits, labels, coef, gx, n, voxels, c, ce_scale, gy);
}

// ---- pointwise losses ----------------------------------------------------------------------------

/// `Pointwise` of src/device/cpu/loss.rs, in declaration order.
enum PointwiseKind : int { kMse = 0, kL1 = 1, kSmoothL1 = 2, kBceLogits = 3, kBce = 4 };

/// The seed's label smoothing t (1 - 2s) + s.
__device__ __forceinline__ float smooth_target(float t, float s) { return t * (1.0f - 2.0f * s) + s; }

/// BCE with logits in PyTorch's overflow-free form.
__device__ __forceinline__ float bce_logits(float x, float t) {
  return fmaxf(x, 0.0f) - x * t + log1pf(expf(-fabsf(x)));
}

__device__ __forceinline__ float sign_or_zero(float d) { return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : d); }

__device__ __forceinline__ float pointwise_value(int kind, float x, float t, float s, float beta) {
  switch (kind) {
    case kMse:
      return (x - t) * (x - t);
    case kL1:
      return fabsf(x - t);
    case kSmoothL1: {
      const float d = fabsf(x - t);
      return d < beta ? 0.5f * d * d / beta : d - 0.5f * beta;
    }
    case kBceLogits:
      return bce_logits(x, smooth_target(t, s));
    default:
      return -(t * fmaxf(logf(x), -100.0f) + (1.0f - t) * fmaxf(log1pf(-x), -100.0f));
  }
}

__device__ __forceinline__ float pointwise_grad(int kind, float x, float t, float s, float beta) {
  switch (kind) {
    case kMse:
      return 2.0f * (x - t);
    case kL1:
      return sign_or_zero(x - t);
    case kSmoothL1: {
      const float d = x - t;
      return fabsf(d) < beta ? d / beta : sign_or_zero(d);
    }
    case kBceLogits:
      return fused_sigmoid(x) - smooth_target(t, s);
    default:
      return (x - t) / fmaxf(x * (1.0f - x), 1e-12f);
  }
}

/// partial[block] = the block's sum of loss terms; element i lies in slice (i / slice_len) % depth
/// of the smoothing table.
extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_pointwise_partials(int kind, const float* x, const float* t, const float* smooth, long long slice_len,
                            int depth, double* partial, long long n, float beta) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const float s = smooth[(i / slice_len) % depth];
    acc += static_cast<double>(pointwise_value(kind, x[i], t[i], s, beta));
  }
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

/// gx = scale * d term / dx (scale: the forward's times the upstream gradient).
extern "C" __global__ void loss_pointwise_bwd(int kind, const float* x, const float* t, const float* smooth,
                                              long long slice_len, int depth, float* gx, long long n, float beta,
                                              float fwd_scale, const float* gy) {
  const float scale = fwd_scale * gy[0];
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const float s = smooth[(i / slice_len) % depth];
    gx[i] = scale * pointwise_grad(kind, x[i], t[i], s, beta);
  }
}

// ---- the seed's BCEDiceLoss ----------------------------------------------------------------------

/// Channel-tiled over (voxels, C): partial[(chunk * 4 + k) * c + ch], k = 0 BCE against smoothed
/// targets, 1 sum p t, 2 sum p^2, 3 sum t^2, with p = sigmoid(x).
extern "C" __global__ void __launch_bounds__(kTileThreads)
    loss_bce_dice_partials(const float* x, const float* t, double* partial, long long voxels, int c,
                           long long rows_per_chunk, float smoothing) {
  const ChannelTile tile = channel_tile(c, voxels, rows_per_chunk);
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  if (tile.active) {
    for (long long v = tile.v0 + tile.row; v < tile.v1; v += tile.rows) {
      const long long i = v * c + tile.ch;
      const float xi = x[i], ti = t[i], p = fused_sigmoid(xi);
      acc[0] += static_cast<double>(bce_logits(xi, smooth_target(ti, smoothing)));
      acc[1] += static_cast<double>(p * ti);
      acc[2] += static_cast<double>(p * p);
      acc[3] += static_cast<double>(ti * ti);
    }
  }
  tile_column_sums<4>(tile, acc, partial + static_cast<long long>(blockIdx.y) * 4 * c, c);
}

/// One block; dynamic shared memory 4c doubles. out[0] = alpha * mean BCE + beta * (1 - mean_c dc_c),
/// dc_c = 2 I_c / max(P2_c + T2_c, 1e-6); coef[ch] and coef[c + ch]: dL/dp = coef_t t + coef_p p.
extern "C" __global__ void loss_bce_dice_finish(const double* partial, float* coef, double* out, int c, int chunks,
                                                double beta, double bce_scale) {
  double* tot = dynamic_shared<double>();
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int e = warp; e < 4 * c; e += nwarps) {
    const double v = warp_sum_strided(partial + e, chunks, 4LL * c);
    if ((threadIdx.x & 31) == 0) tot[e] = v;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const double cf = c;
  double bce = 0.0, dice = 0.0;
  for (int k = 0; k < c; ++k) {
    bce += tot[k];
    const double i = tot[c + k], raw = tot[2 * c + k] + tot[3 * c + k], den = fmax(raw, 1e-6);
    dice += 2.0 * i / den;
    coef[k] = static_cast<float>(-2.0 * beta / (cf * den));
    coef[c + k] = static_cast<float>(raw >= 1e-6 ? 4.0 * beta * i / (cf * den * den) : 0.0);
  }
  out[0] = bce_scale * bce + beta * (1.0 - dice / cf);
}

/// gx = gy * (bce_scale * (p - smoothed t) + p (1 - p) (coef_t t + coef_p p)), channel-tiled.
extern "C" __global__ void __launch_bounds__(kTileThreads)
    loss_bce_dice_bwd(const float* x, const float* t, const float* coef, float* gx, long long voxels, int c,
                      long long rows_per_chunk, float bce_scale, float smoothing, const float* gy_ptr) {
  const ChannelTile tile = channel_tile(c, voxels, rows_per_chunk);
  if (!tile.active) return;
  const float gy = gy_ptr[0];
  const float ct = coef[tile.ch], cp = coef[c + tile.ch];
  for (long long v = tile.v0 + tile.row; v < tile.v1; v += tile.rows) {
    const long long i = v * c + tile.ch;
    const float p = fused_sigmoid(x[i]), ti = t[i];
    const float dice = ct * ti + cp * p;
    gx[i] = gy * (bce_scale * (p - smooth_target(ti, smoothing)) + p * (1.0f - p) * dice);
  }
}

// ---- the seed's MaskedCosineLoss -----------------------------------------------------------------

constexpr float kCosEps = 1e-8f;

/// One voxel's cosine terms: the target's norm must exceed 1e-6 (the mask); q = p / max(|p|, eps),
/// u = t / max(|t|, eps), cos = q . u / max(|q|, eps). Walks the c values several times instead of
/// keeping vectors (they are in L1 after the first walk).
struct CosParts {
  bool valid;
  float cos, np, cp, nq, cq, ct;
};

__device__ CosParts cosine_parts(const float* p, const float* t, int c) {
  CosParts r{};
  float st = 0.0f, sp = 0.0f;
  for (int k = 0; k < c; ++k) {
    st = st + t[k] * t[k];
    sp = sp + p[k] * p[k];
  }
  const float nt = sqrtf(st);
  r.valid = nt > 1e-6f;
  if (!r.valid) return r;
  r.ct = fmaxf(nt, kCosEps);
  r.np = sqrtf(sp);
  r.cp = fmaxf(r.np, kCosEps);
  float sq = 0.0f, dot = 0.0f;
  for (int k = 0; k < c; ++k) {
    const float q = p[k] / r.cp;
    sq = sq + q * q;
    dot = dot + q * (t[k] / r.ct);
  }
  r.nq = sqrtf(sq);
  r.cq = fmaxf(r.nq, kCosEps);
  r.cos = dot / r.cq;
  return r;
}

/// partial[block * 2 + {0, 1}] = the block's sum of masked cos and mask count.
extern "C" __global__ void __launch_bounds__(kLossThreads)
    loss_cosine_partials(const float* p, const float* t, double* partial, long long voxels, int c) {
  __shared__ double scratch[32];
  double s_cos = 0.0, s_mask = 0.0;
  for (long long v = global_thread(); v < voxels; v += grid_threads()) {
    const CosParts r = cosine_parts(p + v * c, t + v * c, c);
    if (r.valid) {
      s_cos += static_cast<double>(r.cos);
      s_mask += 1.0;
    }
  }
  const double a = block_sum(s_cos, scratch), b = block_sum(s_mask, scratch);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = a;
    partial[2 * blockIdx.x + 1] = b;
  }
}

/// One block of 64 threads: out[0] = 1 - sum(cos) / (count + 1e-8); scale[0] = 1 / (count + 1e-8).
extern "C" __global__ void loss_cosine_finish(const double* partial, double* out, double* scale, int blocks) {
  __shared__ double tot[2];
  const int warp = threadIdx.x >> 5;
  if (warp < 2) {
    const double v = warp_sum_strided(partial + warp, blocks, 2);
    if ((threadIdx.x & 31) == 0) tot[warp] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const double s = 1.0 / (tot[1] + 1e-8);
    scale[0] = s;
    out[0] = 1.0 - tot[0] * s;
  }
}

/// gx = -scale * gy * d cos / dp on masked voxels, 0 elsewhere; cos goes through both clamped
/// normalisations (the inner one's no-grad clamp lets the norm's gradient flow below eps).
extern "C" __global__ void loss_cosine_bwd(const float* p, const float* t, const double* scale, float* gx,
                                           long long voxels, int c, const float* gy) {
  const float sc = static_cast<float>(scale[0]) * gy[0];
  for (long long v = global_thread(); v < voxels; v += grid_threads()) {
    const float* pv = p + v * c;
    const float* tv = t + v * c;
    float* g = gx + v * c;
    const CosParts r = cosine_parts(pv, tv, c);
    if (!r.valid) {
      for (int k = 0; k < c; ++k) g[k] = 0.0f;
      continue;
    }
    // Upstream of q's normalisation: -sc * u; then q's, then p's normalisation backward.
    float dot1 = 0.0f;
    for (int k = 0; k < c; ++k) dot1 = dot1 + (pv[k] / r.cp) * (-sc * (tv[k] / r.ct));
    const float k1 = r.nq > 0.0f ? dot1 / (r.cq * r.cq * r.nq) : 0.0f;
    float dot2 = 0.0f;
    for (int k = 0; k < c; ++k) {
      const float q = pv[k] / r.cp, gq = (-sc * (tv[k] / r.ct)) / r.cq - k1 * q;
      dot2 = dot2 + pv[k] * gq;
    }
    const float k2 = (r.np > 0.0f && r.np >= kCosEps) ? dot2 / (r.cp * r.cp * r.np) : 0.0f;
    for (int k = 0; k < c; ++k) {
      const float q = pv[k] / r.cp, gq = (-sc * (tv[k] / r.ct)) / r.cq - k1 * q;
      g[k] = gq / r.cp - k2 * pv[k];
    }
  }
}

/// y[0] = scale * out[0] as float32: a loss value stays on the device. With check_bad, out[1] counts
/// label values that are not class indices, and any makes the value NaN (the host sees it when it
/// reads the loss; the CPU backend names the value instead).
extern "C" __global__ void loss_value(const double* out, float* y, double scale, int check_bad) {
  if (global_thread() != 0) return;
  y[0] = (check_bad && out[1] > 0.0) ? __int_as_float(0x7fc00000) : static_cast<float>(scale * out[0]);
}
