// Helpers shared by every kernels/*.cu. Each .cu includes this file and stands alone: CI compiles
// every file by itself (scripts/ci-kernels.sh), build.rs compiles them all as one module.
#ifndef UNET3D_KERNELS_COMMON_CUH
#define UNET3D_KERNELS_COMMON_CUH

#include <cfloat>
#include <cstdint>

constexpr unsigned kFullMask = 0xffffffffu;

#ifndef UNET3D_SIM
/// The block's dynamic shared memory, sized by the launch. One untyped declaration for every
/// kernel, as `extern __shared__ T x[]` with different T in one module do not compile.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char unet3d_dynamic_smem[];
  return reinterpret_cast<T*>(unet3d_dynamic_smem);
}
#endif

/// Index of this thread in a 1-D grid, and the number of threads in it, for grid-stride loops.
__device__ __forceinline__ long long global_thread() {
  return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_threads() {
  return static_cast<long long>(gridDim.x) * blockDim.x;
}

/// Sum over the 32 lanes of a full warp; every lane gets the result.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

/// Sum over a 1-D block whose size is a multiple of 32; every thread gets the result. `scratch`
/// is shared memory for 32 values; the call ends with a barrier, so it can be reused at once.
template <class T>
__device__ T block_sum(T v, T* scratch) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? scratch[lane] : T(0);
    w = warp_sum(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  T r = scratch[0];
  __syncthreads();
  return r;
}

#endif  // UNET3D_KERNELS_COMMON_CUH
