// Activations: the leaky-ReLU family (identity, ReLU and leaky ReLU are one kernel with a slope),
// sigmoid, and softmax over the channels (last axis) of channels-last data. Element math as
// src/device/cpu/activation.rs.
#include "common.cuh"

/// PyTorch's leaky ReLU, with ReLU (slope 0) mapping -inf to 0 rather than -inf * 0 = NaN.
__device__ __forceinline__ float act_apply(float z, float slope) {
  if (z > 0.0f) return z;
  if (z <= 0.0f && slope == 0.0f) return 0.0f;
  return z * slope;
}

extern "C" __global__ void act_leaky_fwd(const float* x, float* y, float slope, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) y[i] = act_apply(x[i], slope);
}

/// gx = gy * act'(x), with the derivative `slope` at x == 0 as PyTorch.
extern "C" __global__ void act_leaky_bwd(const float* gy, const float* x, float* gx, float slope, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) gx[i] = gy[i] * (x[i] > 0.0f ? 1.0f : slope);
}

/// The logistic function, without overflow for either sign.
extern "C" __global__ void act_sigmoid_fwd(const float* x, float* y, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const float v = x[i];
    if (v >= 0.0f) {
      y[i] = 1.0f / (1.0f + expf(-v));
    } else {
      const float e = expf(v);
      y[i] = e / (1.0f + e);
    }
  }
}

/// gx = gy * y * (1 - y) from the forward output y.
extern "C" __global__ void act_sigmoid_bwd(const float* gy, const float* y, float* gx, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) gx[i] = gy[i] * y[i] * (1.0f - y[i]);
}

/// Softmax over each c-long row, shifted by the row maximum; one thread per row (the class count
/// of a segmentation head is small).
extern "C" __global__ void act_softmax_fwd(const float* x, float* y, long long rows, int c) {
  for (long long r = global_thread(); r < rows; r += grid_threads()) {
    const float* xr = x + r * c;
    float* yr = y + r * c;
    float m = -INFINITY;
    for (int k = 0; k < c; ++k) m = fmaxf(m, xr[k]);
    float sum = 0.0f;
    for (int k = 0; k < c; ++k) {
      yr[k] = expf(xr[k] - m);
      sum += yr[k];
    }
    const float inv = 1.0f / sum;
    for (int k = 0; k < c; ++k) yr[k] = yr[k] * inv;
  }
}

/// gx = y * (gy - sum_c gy * y) per row, from the forward output y.
extern "C" __global__ void act_softmax_bwd(const float* gy, const float* y, float* gx, long long rows, int c) {
  for (long long r = global_thread(); r < rows; r += grid_threads()) {
    const float* g = gy + r * c;
    const float* yr = y + r * c;
    float dot = 0.0f;
    for (int k = 0; k < c; ++k) dot += g[k] * yr[k];
    for (int k = 0; k < c; ++k) gx[r * c + k] = yr[k] * (g[k] - dot);
  }
}
