// Instance normalisation of channels-last (N, S, C) data (S = D*H*W), fused with the affine map,
// a leaky-ReLU-family activation and optionally the residual add of BasicBlockD:
//   y = act((x - mean) * rstd * gamma + beta [+ residual])
// with PyTorch's InstanceNorm3d statistics (biased variance), as src/device/cpu/norm.rs.
//
// Forward: one pass of shifted sums (sum and sum of squares of x - x[n, 0, c] in f64) per block of
// voxels, a combine of the blocks' partials in a fixed order, one read-modify-write pass. Backward:
// one pass for sum(gz) and sum(gz * (x - mean)) (and, fused with a residual, gz itself, which is the
// residual's gradient), the same combine, one pass for dx. Every pass is a channel-tiled block
// (fused.cuh): each thread keeps one channel's constants in registers.
#include "fused.cuh"

/// Partial shifted sums: partial[((n * chunks + chunk) * 2 + k) * c + ch], k = 0 for
/// sum(x - shift), 1 for sum((x - shift)^2), shift = the sample's first voxel.
extern "C" __global__ void __launch_bounds__(kTileThreads)
    norm_stats_partials(const float* x, double* partial, long long s, int c, long long rows_per_chunk) {
  const ChannelTile t = channel_tile(c, s, rows_per_chunk);
  const long long n = blockIdx.z;
  double acc[2] = {0.0, 0.0};
  if (t.active) {
    const float* xs = x + n * s * c + t.ch;
    const double shift = xs[0];
    for (long long v = t.v0 + t.row; v < t.v1; v += t.rows) {
      const double d = static_cast<double>(xs[v * c]) - shift;
      acc[0] += d;
      acc[1] += d * d;
    }
  }
  tile_column_sums<2>(t, acc, partial + (n * gridDim.y + blockIdx.y) * 2 * c, c);
}

/// mean and rstd = 1 / sqrt(var + eps) per (n, c) from the partials; one warp per (n, c).
extern "C" __global__ void norm_stats_finish(const double* partial, const float* x, float* mean, float* rstd,
                                             int n, int c, long long s, int chunks, double eps) {
  const long long entry = global_thread() >> 5;
  if (entry >= static_cast<long long>(n) * c) return;
  const long long b = entry / c, ch = entry - b * c;
  const double* p = partial + b * chunks * 2 * c + ch;
  const double s1 = warp_sum_strided(p, chunks, 2LL * c);
  const double s2 = warp_sum_strided(p + c, chunks, 2LL * c);
  if ((threadIdx.x & 31) == 0) {
    const double m1 = s1 / static_cast<double>(s);
    const double var = fmax(s2 / static_cast<double>(s) - m1 * m1, 0.0);
    mean[entry] = static_cast<float>(static_cast<double>(x[b * s * c + ch]) + m1);
    rstd[entry] = static_cast<float>(1.0 / sqrt(var + eps));
  }
}

template <bool kResidual>
__device__ void norm_apply(const float* x, const float* r, const float* mean, const float* rstd,
                           const float* gamma, const float* beta, float* y, long long s, int c,
                           long long rows_per_chunk, float slope) {
  const ChannelTile t = channel_tile(c, s, rows_per_chunk);
  if (!t.active) return;
  const long long n = blockIdx.z;
  const float m = mean[n * c + t.ch], sc = rstd[n * c + t.ch] * gamma[t.ch], b = beta[t.ch];
  const long long base = n * s * c + t.ch;
  for (long long v = t.v0 + t.row; v < t.v1; v += t.rows) {
    const long long i = base + v * c;
    float z = affine_rn(x[i] - m, sc, b);
    if (kResidual) z = z + r[i];
    y[i] = fused_act(z, slope);
  }
}

/// y = act((x - mean) * rstd * gamma + beta).
extern "C" __global__ void __launch_bounds__(kTileThreads)
    norm_apply_fwd(const float* x, const float* mean, const float* rstd, const float* gamma, const float* beta,
                   float* y, long long s, int c, long long rows_per_chunk, float slope) {
  norm_apply<false>(x, nullptr, mean, rstd, gamma, beta, y, s, c, rows_per_chunk, slope);
}

/// y = act((x - mean) * rstd * gamma + beta + r): BasicBlockD's last norm, residual add and act.
extern "C" __global__ void __launch_bounds__(kTileThreads)
    norm_apply_res_fwd(const float* x, const float* r, const float* mean, const float* rstd, const float* gamma,
                       const float* beta, float* y, long long s, int c, long long rows_per_chunk, float slope) {
  norm_apply<true>(x, r, mean, rstd, gamma, beta, y, s, c, rows_per_chunk, slope);
}

/// Backward partials: partial[((n * chunks + chunk) * 2 + k) * c + ch], k = 0 for sum(gz), 1 for
/// sum(gz * (x - mean)). Without a residual gz = gy * act'(z) with z recomputed as the forward
/// computes it; with one, act' is read off the forward output y (same sign as the pre-activation
/// for slopes >= 0) and gz, the residual's gradient too, is written to gz_out.
template <bool kResidual>
__device__ void norm_bwd_partials(const float* gy, const float* x, const float* y, const float* mean,
                                  const float* rstd, const float* gamma, const float* beta, float* gz_out,
                                  double* partial, long long s, int c, long long rows_per_chunk, float slope) {
  const ChannelTile t = channel_tile(c, s, rows_per_chunk);
  const long long n = blockIdx.z;
  double acc[2] = {0.0, 0.0};
  if (t.active) {
    const float m = mean[n * c + t.ch];
    const float sc = kResidual ? 0.0f : rstd[n * c + t.ch] * gamma[t.ch];
    const float b = kResidual ? 0.0f : beta[t.ch];
    const long long base = n * s * c + t.ch;
    for (long long v = t.v0 + t.row; v < t.v1; v += t.rows) {
      const long long i = base + v * c;
      const float d = x[i] - m;
      float gz;
      if (kResidual) {
        gz = gy[i] * (y[i] > 0.0f ? 1.0f : slope);
        gz_out[i] = gz;
      } else {
        gz = gy[i] * fused_act_deriv(affine_rn(d, sc, b), slope);
      }
      acc[0] += static_cast<double>(gz);
      acc[1] += static_cast<double>(gz * d);
    }
  }
  tile_column_sums<2>(t, acc, partial + (n * gridDim.y + blockIdx.y) * 2 * c, c);
}

extern "C" __global__ void __launch_bounds__(kTileThreads)
    norm_bwd_partials_act(const float* gy, const float* x, const float* mean, const float* rstd, const float* gamma,
                          const float* beta, double* partial, long long s, int c, long long rows_per_chunk,
                          float slope) {
  norm_bwd_partials<false>(gy, x, nullptr, mean, rstd, gamma, beta, nullptr, partial, s, c, rows_per_chunk, slope);
}

extern "C" __global__ void __launch_bounds__(kTileThreads)
    norm_bwd_partials_res(const float* gy, const float* x, const float* y, const float* mean, float* gz,
                          double* partial, long long s, int c, long long rows_per_chunk, float slope) {
  norm_bwd_partials<true>(gy, x, y, mean, nullptr, nullptr, nullptr, gz, partial, s, c, rows_per_chunk, slope);
}

/// One warp per channel: over the samples in order, sum(gz) and sum(gz * xhat) = rstd * sum(gz * d)
/// from the partials; dbeta and dgamma are their sums over samples, and coef holds the per-(n, c)
/// constants of dx: coef[n * c + ch] = mean(gz), coef[(N + n) * c + ch] = rstd * mean(gz * xhat).
extern "C" __global__ void norm_bwd_finish(const double* partial, const float* rstd, float* coef, float* dgamma,
                                           float* dbeta, int n, int c, long long s, int chunks) {
  const long long ch = global_thread() >> 5;
  if (ch >= c) return;
  const double inv = 1.0 / static_cast<double>(s);
  double dg = 0.0, db = 0.0;
  for (int b = 0; b < n; ++b) {
    const double* p = partial + static_cast<long long>(b) * chunks * 2 * c + ch;
    const double g = warp_sum_strided(p, chunks, 2LL * c);
    const double r = rstd[b * c + ch];
    const double gx = warp_sum_strided(p + c, chunks, 2LL * c) * r;
    db += g;
    dg += gx;
    if ((threadIdx.x & 31) == 0) {
      coef[b * c + ch] = static_cast<float>(g * inv);
      coef[(static_cast<long long>(n) + b) * c + ch] = static_cast<float>(gx * inv * r);
    }
  }
  if ((threadIdx.x & 31) == 0) {
    dgamma[ch] = static_cast<float>(dg);
    dbeta[ch] = static_cast<float>(db);
  }
}

/// dx = rstd * gamma * (gz - mean(gz) - (x - mean) * rstd * mean(gz * xhat)), gz recomputed from gy
/// (no residual) or read from the partials pass (residual).
template <bool kResidual>
__device__ void norm_bwd_apply(const float* g, const float* x, const float* mean, const float* rstd,
                               const float* gamma, const float* beta, const float* coef, float* gx, int n_samples,
                               long long s, int c, long long rows_per_chunk, float slope) {
  const ChannelTile t = channel_tile(c, s, rows_per_chunk);
  if (!t.active) return;
  const long long n = blockIdx.z, nc = n * c + t.ch;
  const float m = mean[nc], sc = rstd[nc] * gamma[t.ch], b = kResidual ? 0.0f : beta[t.ch];
  const float mg = coef[nc], kd = coef[static_cast<long long>(n_samples) * c + nc];
  const long long base = n * s * c + t.ch;
  for (long long v = t.v0 + t.row; v < t.v1; v += t.rows) {
    const long long i = base + v * c;
    const float d = x[i] - m;
    const float gz = kResidual ? g[i] : g[i] * fused_act_deriv(affine_rn(d, sc, b), slope);
    gx[i] = sc * (gz - mg - d * kd);
  }
}

extern "C" __global__ void __launch_bounds__(kTileThreads)
    norm_bwd_apply_act(const float* gy, const float* x, const float* mean, const float* rstd, const float* gamma,
                       const float* beta, const float* coef, float* gx, int n, long long s, int c,
                       long long rows_per_chunk, float slope) {
  norm_bwd_apply<false>(gy, x, mean, rstd, gamma, beta, coef, gx, n, s, c, rows_per_chunk, slope);
}

extern "C" __global__ void __launch_bounds__(kTileThreads)
    norm_bwd_apply_res(const float* gz, const float* x, const float* mean, const float* rstd, const float* gamma,
                       const float* coef, float* gx, int n, long long s, int c, long long rows_per_chunk) {
  norm_bwd_apply<true>(gz, x, mean, rstd, gamma, nullptr, coef, gx, n, s, c, rows_per_chunk, 1.0f);
}
