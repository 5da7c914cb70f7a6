// Squeeze-excitation on channels-last data, after the pooled means (reduce.cu): per pooled row of C
// values (one per sample for pooling over D, H, W; one per (sample, w) for pooling over D, H) the
// two 1x1 layers, h = relu(W1 s + b1), gate = sigmoid(W2 h + b2), with W1 (R, C) and W2 (C, R) as
// PyTorch stores them; the gate multiply itself is ew_bcast_mul. The layers are tiny (C <= 320,
// R >= 8), so one block per row does both with the row in shared memory.
#include "fused.cuh"

/// Block per row: h[row, :] (saved for the backward) and gate[row, :]. Dynamic shared memory: C + R floats.
extern "C" __global__ void se_mlp_fwd(const float* s, const float* w1, const float* b1, const float* w2,
                                      const float* b2, float* h, float* gate, int c, int r) {
  float* sm_s = dynamic_shared<float>();
  float* sm_h = sm_s + c;
  const long long row = blockIdx.x;
  for (int k = threadIdx.x; k < c; k += blockDim.x) sm_s[k] = s[row * c + k];
  __syncthreads();
  for (int j = threadIdx.x; j < r; j += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < c; ++k) acc += w1[static_cast<long long>(j) * c + k] * sm_s[k];
    const float v = fused_act(acc + b1[j], 0.0f);
    sm_h[j] = v;
    h[row * r + j] = v;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < c; k += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < r; ++j) acc += w2[static_cast<long long>(k) * r + j] * sm_h[j];
    gate[row * c + k] = fused_sigmoid(acc + b2[k]);
  }
}

/// Block per row, from the gate's gradient gg: d2 = gg * gate * (1 - gate) (the gradient of fc2's
/// output), d1 = (W2^T d2) * relu'(h) (fc1's), ds = W1^T d1 (the pooled row's).
/// Dynamic shared memory: C + R floats.
extern "C" __global__ void se_mlp_bwd(const float* gg, const float* gate, const float* h, const float* w1,
                                      const float* w2, float* d2, float* d1, float* ds, int c, int r) {
  float* sm_d2 = dynamic_shared<float>();
  float* sm_d1 = sm_d2 + c;
  const long long row = blockIdx.x;
  for (int k = threadIdx.x; k < c; k += blockDim.x) {
    const float g = gate[row * c + k];
    const float v = gg[row * c + k] * g * (1.0f - g);
    sm_d2[k] = v;
    d2[row * c + k] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < r; j += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < c; ++k) acc += w2[static_cast<long long>(k) * r + j] * sm_d2[k];
    const float v = acc * fused_act_deriv(h[row * r + j], 0.0f);
    sm_d1[j] = v;
    d1[row * r + j] = v;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < c; k += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < r; ++j) acc += w1[static_cast<long long>(j) * c + k] * sm_d1[j];
    ds[row * c + k] = acc;
  }
}

/// The layers' parameter gradients, one thread per parameter summing over the rows in order:
/// dw1 = d1^T s (R, C), db1 = sum d1, dw2 = d2^T h (C, R), db2 = sum d2.
extern "C" __global__ void se_weight_grads(const float* d1, const float* d2, const float* s, const float* h,
                                           float* dw1, float* db1, float* dw2, float* db2, long long rows, int c,
                                           int r) {
  const long long rc = static_cast<long long>(r) * c, total = 2 * rc + r + c;
  for (long long e = global_thread(); e < total; e += grid_threads()) {
    double acc = 0.0;
    if (e < rc) {
      const long long j = e / c, k = e - j * c;
      for (long long q = 0; q < rows; ++q) acc += static_cast<double>(d1[q * r + j] * s[q * c + k]);
      dw1[e] = static_cast<float>(acc);
    } else if (e < 2 * rc) {
      const long long f = e - rc, k = f / r, j = f - k * r;
      for (long long q = 0; q < rows; ++q) acc += static_cast<double>(d2[q * c + k] * h[q * r + j]);
      dw2[f] = static_cast<float>(acc);
    } else if (e < 2 * rc + r) {
      const long long j = e - 2 * rc;
      for (long long q = 0; q < rows; ++q) acc += d1[q * r + j];
      db1[j] = static_cast<float>(acc);
    } else {
      const long long k = e - 2 * rc - r;
      for (long long q = 0; q < rows; ++q) acc += d2[q * c + k];
      db2[k] = static_cast<float>(acc);
    }
  }
}

/// dx = gy * gate + ds * scale, gate and ds (outer, inner) repeated over mid: the gate multiply's
/// input gradient and the pooled mean's (scale = 1 / pooled count) in one pass.
extern "C" __global__ void se_input_grad(const float* gy, const float* gate, const float* ds, float* gx,
                                         long long mid, long long inner, float scale, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const long long row = i / inner;
    const long long b = (row / mid) * inner + (i - row * inner);
    gx[i] = gy[i] * gate[b] + ds[b] * scale;
  }
}
