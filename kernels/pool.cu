// Average pooling with kernel = stride over channels-last (N, D, H, W, C), no padding, trailing
// voxels that fill no window dropped, as src/device/cpu/pool.rs (and PyTorch's AvgPool3d).
#include "common.cuh"

/// One thread per output value; the window is summed in the CPU's order (depth, height, width).
extern "C" __global__ void pool_avg_fwd(const float* x, float* y, int d, int h, int w, int c, int od, int oh, int ow,
                                        int kd, int kh, int kw, long long n_out) {
  const float inv = 1.0f / static_cast<float>(kd * kh * kw);
  for (long long j = global_thread(); j < n_out; j += grid_threads()) {
    long long q = j / c;
    const int ch = static_cast<int>(j - q * c);
    const int xx = static_cast<int>(q % ow);
    q /= ow;
    const int yy = static_cast<int>(q % oh);
    q /= oh;
    const int z = static_cast<int>(q % od);
    const long long n = q / od;
    float acc = 0.0f;
    for (int a = 0; a < kd; ++a) {
      for (int b = 0; b < kh; ++b) {
        const long long row = ((n * d + z * kd + a) * h + yy * kh + b) * w + static_cast<long long>(xx) * kw;
        for (int e = 0; e < kw; ++e) acc += x[(row + e) * c + ch];
      }
    }
    y[j] = acc * inv;
  }
}

/// One thread per input value: its window's gradient / window size, or 0 if it is in none.
extern "C" __global__ void pool_avg_bwd(const float* gy, float* gx, int d, int h, int w, int c, int od, int oh, int ow,
                                        int kd, int kh, int kw, long long n_in) {
  const float inv = 1.0f / static_cast<float>(kd * kh * kw);
  for (long long j = global_thread(); j < n_in; j += grid_threads()) {
    long long q = j / c;
    const int ch = static_cast<int>(j - q * c);
    const int xx = static_cast<int>(q % w) / kw;
    q /= w;
    const int yy = static_cast<int>(q % h) / kh;
    q /= h;
    const int z = static_cast<int>(q % d) / kd;
    const long long n = q / d;
    gx[j] = (z < od && yy < oh && xx < ow) ? gy[(((n * od + z) * oh + yy) * ow + xx) * c + ch] * inv : 0.0f;
  }
}
