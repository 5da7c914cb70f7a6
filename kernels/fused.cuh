// Helpers of the fused kernels (norm.cu, se.cu, loss.cu): the channel-tiled block that walks
// channels-last data with fixed per-thread channels, the activation and sigmoid element math of
// src/device/cpu/activation.rs, and the warp-per-entry sum that combines per-block partials in a
// fixed order.
#ifndef UNET3D_KERNELS_FUSED_CUH
#define UNET3D_KERNELS_FUSED_CUH

#include "common.cuh"

/// Full unrolling of a loop over a compile-time bound, so that arrays indexed by its counter stay in
/// registers (the host compiler of the sim unrolls by itself).
#ifdef UNET3D_SIM
#define UNET3D_UNROLL
#else
#define UNET3D_UNROLL _Pragma("unroll")
#endif

/// Threads per block of every channel-tiled kernel.
constexpr int kTileThreads = 256;

/// A thread's place in a channel-tiled block over channels-last (groups, voxels, C) data: `cols` =
/// min(C, 32) channels side by side, so consecutive threads read consecutive addresses, and `rows`
/// = 256 / cols voxels. Grid: x = channel tile, y = chunk of `rows_per_chunk` voxels, z = group.
/// Each thread keeps one channel, so its per-channel constants stay in registers.
struct ChannelTile {
  int cols, rows, col, row, ch;
  long long v0, v1;
  bool active;
};

__device__ __forceinline__ ChannelTile channel_tile(int c, long long voxels, long long rows_per_chunk) {
  ChannelTile t;
  t.cols = min(c, 32);
  t.rows = kTileThreads / t.cols;
  t.col = static_cast<int>(threadIdx.x) % t.cols;
  t.row = static_cast<int>(threadIdx.x) / t.cols;
  t.ch = static_cast<int>(blockIdx.x) * t.cols + t.col;
  t.v0 = static_cast<long long>(blockIdx.y) * rows_per_chunk;
  t.v1 = min(voxels, t.v0 + rows_per_chunk);
  t.active = t.ch < c && t.row < t.rows;
  return t;
}

/// Adds the `kWidth` per-thread sums of each column of the tile over its rows, in row order, and
/// lets the first row write them to out[k * c + ch] (`out` points at this chunk's partials).
template <int kWidth>
__device__ void tile_column_sums(const ChannelTile& t, const double (&acc)[kWidth], double* out, int c) {
  __shared__ double s[kWidth][kTileThreads];
  for (int k = 0; k < kWidth; ++k) s[k][threadIdx.x] = acc[k];
  __syncthreads();
  if (t.row == 0 && t.ch < c) {
    for (int k = 0; k < kWidth; ++k) {
      double total = 0.0;
      for (int l = 0; l < t.rows; ++l) total += s[k][l * t.cols + t.col];
      out[k * c + t.ch] = total;
    }
  }
}

/// The sum of p[0], p[stride], ... (`count` terms) by one full warp: lane l adds terms l, l + 32, ...
/// in order, then the lanes are added in a fixed tree, so the result is the same on every run.
__device__ __forceinline__ double warp_sum_strided(const double* p, long long count, long long stride) {
  double acc = 0.0;
  for (long long i = threadIdx.x & 31; i < count; i += 32) acc += p[i * stride];
  return warp_sum(acc);
}

/// The affine map `d * scale + shift` rounded as the CPU rounds it (a product, then a sum; nvcc would
/// contract it into one fma): the activation's derivative jumps at zero, so the backward must see the
/// same sign of the pre-activation as the CPU reference for the same statistics.
#ifdef UNET3D_SIM
__device__ __forceinline__ float affine_rn(float d, float scale, float shift) { return d * scale + shift; }
#else
__device__ __forceinline__ float affine_rn(float d, float scale, float shift) {
  return __fadd_rn(__fmul_rn(d, scale), shift);
}
#endif

/// PyTorch's leaky ReLU family (slope 1: identity, 0: ReLU mapping -inf to 0 and keeping NaN).
__device__ __forceinline__ float fused_act(float z, float slope) {
  if (z > 0.0f) return z;
  if (z <= 0.0f && slope == 0.0f) return 0.0f;
  return z * slope;
}

/// The activation's derivative at pre-activation z (slope at z == 0, as PyTorch).
__device__ __forceinline__ float fused_act_deriv(float z, float slope) { return z > 0.0f ? 1.0f : slope; }

/// The logistic function, without overflow for either sign.
__device__ __forceinline__ float fused_sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}

#endif  // UNET3D_KERNELS_FUSED_CUH
