// Optimizer steps over every parameter in one launch. The launch layer passes a table of parameter
// segments (five u64 each: parameter, gradient, first and second state buffer addresses (0 when
// unused), length) and a table of chunks (two u32 each: segment, chunk index within it); block b
// updates chunk b, kOptimChunk elements of one segment. Element math as src/device/cpu/optim.rs
// (torch.optim's single-tensor code), with the step's scalars computed on the host in f64 as there.
#include "common.cuh"

constexpr int kOptimThreads = 256;
constexpr long long kOptimChunk = 4096;

struct Segment {
  float* p;
  const float* g;
  float* s1;
  float* s2;
  long long begin, end;  // this block's element range within the segment
};

__device__ __forceinline__ Segment block_segment(const unsigned long long* seg, const unsigned* chunks) {
  const unsigned si = chunks[2 * blockIdx.x];
  const long long begin = static_cast<long long>(chunks[2 * blockIdx.x + 1]) * kOptimChunk;
  const unsigned long long* e = seg + 5 * static_cast<unsigned long long>(si);
  const long long len = static_cast<long long>(e[4]);
  return {reinterpret_cast<float*>(e[0]), reinterpret_cast<const float*>(e[1]), reinterpret_cast<float*>(e[2]),
          reinterpret_cast<float*>(e[3]), begin, min(len, begin + kOptimChunk)};
}

/// SGD with optional (Nesterov) momentum; s1 is the momentum buffer, or 0 when momentum is 0.
/// `first`: the buffer is set to the gradient instead of decayed (PyTorch's first step).
extern "C" __global__ void __launch_bounds__(kOptimThreads)
    optim_sgd(const unsigned long long* seg, const unsigned* chunks, float lr, float wd, float mu, int nesterov,
              int first) {
  const Segment s = block_segment(seg, chunks);
  for (long long i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const float p = s.p[i];
    const float d = s.g[i] + wd * p;
    if (s.s1 == nullptr) {
      s.p[i] = p - lr * d;
      continue;
    }
    const float b = first ? d : mu * s.s1[i] + d;
    s.s1[i] = b;
    s.p[i] = p - lr * (nesterov ? d + mu * b : b);
  }
}

/// Adam (l2 = weight decay, decay = 1) and AdamW (l2 = 0, decay = 1 - lr * weight decay); s1 and s2
/// are exp_avg and exp_avg_sq.
extern "C" __global__ void __launch_bounds__(kOptimThreads)
    optim_adam(const unsigned long long* seg, const unsigned* chunks, float step_size, float bc2_sqrt,
               float one_minus_b1, float b2, float one_minus_b2, float eps, float l2, float decay) {
  const Segment s = block_segment(seg, chunks);
  for (long long i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    float p = s.p[i];
    const float g = s.g[i] + l2 * p;
    p = p * decay;
    float m = s.s1[i];
    m = m + one_minus_b1 * (g - m);
    const float v = b2 * s.s2[i] + one_minus_b2 * g * g;
    s.s1[i] = m;
    s.s2[i] = v;
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    s.p[i] = p - step_size * (m / denom);
  }
}

/// partial[b] = sum of the squared gradients of chunk b (f64), for the global gradient norm.
extern "C" __global__ void __launch_bounds__(kOptimThreads)
    optim_grad_sumsq(const unsigned long long* seg, const unsigned* chunks, double* partial) {
  __shared__ double scratch[32];
  const Segment s = block_segment(seg, chunks);
  double acc = 0.0;
  for (long long i = s.begin + threadIdx.x; i < s.end; i += blockDim.x) {
    const float g = s.g[i];
    acc += static_cast<double>(g * g);
  }
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}
