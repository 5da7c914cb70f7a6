// Sums over the middle axis of an (outer, mid, inner) view: spatial sums and means of channels-last
// data (inner = C, or W*C for the D,H-pooled gate), broadcast gradients, totals (inner = 1).
// Deterministic in two passes, as src/device/cpu/reduce.rs: the middle axis is cut into chunks of
// fixed size whose partial sums (f64) are added in chunk order by the second kernel.
#include "common.cuh"

constexpr int kReduceThreads = 256;

/// Block (x = column tile, y = chunk, z = outer index) of 256 threads: `cols` = min(inner, 32)
/// columns, and 256 / cols lanes striding over the chunk's rows of each, so a warp always reads
/// consecutive addresses. partial[(o * gridDim.y + chunk) * inner + i] gets the chunk's sum.
template <bool kProduct>
__device__ void mid_partials(const float* a, const float* b, double* partial, long long mid, int inner,
                             long long rows_per_chunk) {
  __shared__ double s[kReduceThreads];
  const int cols = min(inner, 32);
  const int lanes = kReduceThreads / cols;
  const int t = threadIdx.x;
  const int col = t % cols, lane = t / cols;
  const int i = blockIdx.x * cols + col;
  const long long o = blockIdx.z;
  const long long m0 = blockIdx.y * rows_per_chunk;
  const long long m1 = min(mid, m0 + rows_per_chunk);
  double acc = 0.0;
  if (i < inner && lane < lanes) {
    for (long long m = m0 + lane; m < m1; m += lanes) {
      const long long idx = (o * mid + m) * inner + i;
      acc += kProduct ? static_cast<double>(a[idx] * b[idx]) : static_cast<double>(a[idx]);
    }
  }
  s[t] = acc;
  __syncthreads();
  if (lane == 0 && i < inner) {
    double total = 0.0;
    for (int l = 0; l < lanes; ++l) total += s[l * cols + col];
    partial[(o * gridDim.y + blockIdx.y) * inner + i] = total;
  }
}

extern "C" __global__ void __launch_bounds__(kReduceThreads)
    reduce_mid_partials(const float* x, double* partial, long long mid, int inner, long long rows_per_chunk) {
  mid_partials<false>(x, x, partial, mid, inner, rows_per_chunk);
}

/// The same over a * b (the gradient of a broadcast product's small operand).
extern "C" __global__ void __launch_bounds__(kReduceThreads)
    reduce_mid_prod_partials(const float* a, const float* b, double* partial, long long mid, int inner,
                             long long rows_per_chunk) {
  mid_partials<true>(a, b, partial, mid, inner, rows_per_chunk);
}

/// y[o * inner + i] = scale * (sum over chunks of partial), chunks added in order.
extern "C" __global__ void reduce_mid_finish(const double* partial, float* y, long long outer, int inner, int chunks,
                                             double scale) {
  const long long n = outer * inner;
  for (long long j = global_thread(); j < n; j += grid_threads()) {
    const long long o = j / inner, i = j - o * inner;
    double total = 0.0;
    for (int c = 0; c < chunks; ++c) total += partial[(o * chunks + c) * inner + i];
    y[j] = static_cast<float>(total * scale);
  }
}

/// out[0] = the sum of n partials, by one block in a fixed order.
extern "C" __global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_f64(const double* partial, double* out, long long n) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (long long j = threadIdx.x; j < n; j += blockDim.x) acc += partial[j];
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[0] = total;
}
