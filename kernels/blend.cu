// Sliding-window inference on the device: the Gaussian-weighted sum of each window's logits into
// the box being predicted, its division by the summed weights, and the flips of nnU-Net's
// mirroring. The math of each element is src/infer/blend.rs's and src/infer/predictor.rs's.
#include "common.cuh"

/// acc + g * s rounded as the CPU rounds it (a product, then a sum; nvcc would contract it into one
/// fma), so the device's blended logits are the CPU's to the bit.
#ifdef UNET3D_SIM
__device__ __forceinline__ float add_product_rn(float acc, float g, float s) { return acc + g * s; }
#else
__device__ __forceinline__ float add_product_rn(float acc, float g, float s) {
  return __fadd_rn(acc, __fmul_rn(g, s));
}
#endif

/// acc[box voxel, k] += gauss[window voxel] * src[offset + window voxel * c + k] over the part of
/// one window in the box: its start in the box (az, ay, ax) and in the window (wz, wy, wx), its
/// size (nz, ny, nx); a box of (by, bx) rows and a window of (py, px) rows, c channels; `offset`
/// is where the window's sample starts in the batch. With `weight` set it adds gauss itself (the
/// weight map, c = 1; src is not read). One thread per element of the part: no two threads write
/// one element, and windows are added launch after launch in global order, so the sums are the
/// same whatever the box.
extern "C" __global__ void blend_add(float* acc, const float* src, long long offset, const float* gauss, int weight,
                                     int c, int by, int bx, int py, int px, int az, int ay, int ax, int wz, int wy,
                                     int wx, int nz, int ny, int nx) {
  const long long n = static_cast<long long>(nz) * ny * nx * c;
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const int k = static_cast<int>(i % c);
    const long long v = i / c;
    const int x = static_cast<int>(v % nx);
    const int y = static_cast<int>((v / nx) % ny);
    const int z = static_cast<int>(v / (static_cast<long long>(nx) * ny));
    const long long w = (static_cast<long long>(wz + z) * py + wy + y) * px + wx + x;
    const long long b = (static_cast<long long>(az + z) * by + ay + y) * bx + ax + x;
    const float g = gauss[w];
    acc[b * c + k] = weight ? acc[b * c + k] + g : add_product_rn(acc[b * c + k], g, src[offset + w * c + k]);
  }
}

/// acc[v, k] /= weights[v]: the blended logits from the weighted sums.
extern "C" __global__ void blend_divide(float* acc, const float* weights, int c, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) acc[i] = acc[i] / weights[i / c];
}

/// y = x reversed along the flagged spatial axes of a channels-last (N, D, H, W, C) tensor, with
/// channel k negated where bit k of `negate` is set (a vector's components along flipped axes).
extern "C" __global__ void blend_flip(const float* x, float* y, int d, int h, int w, int c, int fz, int fy, int fx,
                                      unsigned int negate, long long n) {
  for (long long i = global_thread(); i < n; i += grid_threads()) {
    const int k = static_cast<int>(i % c);
    long long v = i / c;
    const int ix = static_cast<int>(v % w);
    v /= w;
    const int iy = static_cast<int>(v % h);
    v /= h;
    const int iz = static_cast<int>(v % d);
    const long long s = v / d;
    const int sz = fz ? d - 1 - iz : iz, sy = fy ? h - 1 - iy : iy, sx = fx ? w - 1 - ix : ix;
    const float value = x[(((s * d + sz) * h + sy) * w + sx) * c + k];
    y[i] = k < 32 && ((negate >> k) & 1u) ? -value : value;
  }
}
