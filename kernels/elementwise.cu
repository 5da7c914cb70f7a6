// Element-wise kernels over flat float32 buffers, and the (outer, mid, inner) broadcast of
// channels-last gates: a (N,1,1,1,C) or (N,1,1,W,C) operand repeated over the axes between. The
// math of each element is written as src/device/cpu/elementwise.rs writes it.
#include "common.cuh"

extern "C" __global__ void ew_add(const float* a, const float* b, float* y, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) y[i] = a[i] + b[i];
}

extern "C" __global__ void ew_mul(const float* a, const float* b, float* y, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) y[i] = a[i] * b[i];
}

/// x *= s (gradient clipping).
extern "C" __global__ void ew_scale_in_place(float* x, float s, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) x[i] = x[i] * s;
}

/// y = x * b with b (outer, inner) repeated over mid.
extern "C" __global__ void ew_bcast_mul(const float* x, const float* b, float* y, long long mid, long long inner,
                                        long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const long long row = i / inner;
    y[i] = x[i] * b[(row / mid) * inner + (i - row * inner)];
  }
}

/// y = b * scale with b (outer, inner) repeated over mid (the backward of a sum or mean).
extern "C" __global__ void ew_bcast_expand(const float* b, float* y, float scale, long long mid, long long inner,
                                           long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const long long row = i / inner;
    y[i] = b[(row / mid) * inner + (i - row * inner)] * scale;
  }
}

/// Copies `width` columns of every row from src (rows of src_stride, from column src_off) to dst
/// (rows of dst_stride, from column dst_off): channel concat forward, and its backward (a slice).
extern "C" __global__ void ew_copy_columns(const float* src, float* dst, long long rows, int width, int src_stride,
                                           int src_off, int dst_stride, int dst_off) {
  const long long n = rows * width;
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const long long r = i / width;
    const int c = static_cast<int>(i - r * width);
    dst[r * dst_stride + dst_off + c] = src[r * src_stride + src_off + c];
  }
}

/// y = v everywhere (device-side constants: a backward's seed, a non-affine norm's gamma and beta).
extern "C" __global__ void ew_fill(float* y, float v, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) y[i] = v;
}

/// y = s * x (a scaled copy).
extern "C" __global__ void ew_scale(const float* x, float* y, float s, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) y[i] = x[i] * s;
}

/// y += a * x (gradient accumulation in place, weighted sums of loss terms).
extern "C" __global__ void ew_axpy(const float* x, float* y, float a, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) y[i] = y[i] + a * x[i];
}
