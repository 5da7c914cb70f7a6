// Kernels that test the execution model itself rather than an op: barriers, shared memory, warp
// shuffles and votes, atomics. tests/sim_runtime.rs runs them on the sim (which must reproduce a
// GPU's semantics, not just run threads one after another) and, with UNET3D_GPU_TESTS=1, on cuda:0.
#include "common.cuh"

/// Per block, the sum of its blockDim.x (a power of two, at most 1024) elements by a tree in shared
/// memory. Without barriers honoured, thread 0 would add slots no other thread has written yet.
extern "C" __global__ void selftest_block_tree_sum(const float* x, float* out, int n) {
  __shared__ float s[1024];
  const unsigned t = threadIdx.x;
  const long long i = global_thread();
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

/// Every thread takes a ticket from a shared counter before a barrier and another after it: with a
/// real barrier all tickets before it are smaller than all tickets after it.
extern "C" __global__ void selftest_barrier_tickets(int* before, int* after) {
  __shared__ int counter;
  const long long i = global_thread();
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  before[i] = atomicAdd(&counter, 1);
  __syncthreads();
  after[i] = atomicAdd(&counter, 1);
}

/// Warp shuffles over segments of `width` lanes. Per thread, five outputs: the butterfly (xor) sum
/// of its segment, the down-sweep sum (meaningful at the segment's first lane), lane 3's value of
/// the segment, the inclusive prefix sum by up-shuffles, and lane 1's value as a double.
extern "C" __global__ void selftest_shuffles(const float* x, float* out, double* out64, int width) {
  const long long i = global_thread();
  const int seg_lane = static_cast<int>(threadIdx.x & 31) & (width - 1);
  const float v = x[i];
  float xs = v;
  for (int o = width / 2; o > 0; o >>= 1) xs += __shfl_xor_sync(kFullMask, xs, o, width);
  float ds = v;
  for (int o = width / 2; o > 0; o >>= 1) ds += __shfl_down_sync(kFullMask, ds, o, width);
  const float b = __shfl_sync(kFullMask, v, 3, width);
  float scan = v;
  for (int o = 1; o < width; o <<= 1) {
    const float up = __shfl_up_sync(kFullMask, scan, o, width);
    if (seg_lane >= o) scan += up;
  }
  out64[i] = __shfl_sync(kFullMask, static_cast<double>(v) * 0.5, 1, width);
  out[5 * i + 0] = xs;
  out[5 * i + 1] = ds;
  out[5 * i + 2] = b;
  out[5 * i + 3] = scan;
  out[5 * i + 4] = __shfl_xor_sync(kFullMask, v, 1, width);
}

/// Warp votes on `pred`: the ballot of the full warp, any and all over it, and the ballot of the
/// even lanes taken by the even lanes alone.
extern "C" __global__ void selftest_votes(const int* pred, unsigned* ballot, int* any, int* all,
                                          unsigned* even_ballot) {
  const long long i = global_thread();
  const int p = pred[i];
  ballot[i] = __ballot_sync(kFullMask, p);
  any[i] = __any_sync(kFullMask, p);
  all[i] = __all_sync(kFullMask, p);
  even_ballot[i] = 0;
  if ((threadIdx.x & 1) == 0) even_ballot[i] = __ballot_sync(0x55555555u, p);
  __syncwarp();
}

/// Reverses each block's slice through dynamic shared memory (blockDim.x floats).
extern "C" __global__ void selftest_dynamic_shared(const float* x, float* out) {
  float* s = dynamic_shared<float>();
  const unsigned t = threadIdx.x;
  s[t] = x[global_thread()];
  __syncthreads();
  out[global_thread()] = s[blockDim.x - 1 - t];
}

/// Each block writes its index into static shared memory and reads it back after a few barriers
/// (during which other blocks run): a static shared by all blocks would show another block's tag.
extern "C" __global__ void selftest_shared_per_block(int* out) {
  __shared__ int tag;
  if (threadIdx.x == 0) tag = static_cast<int>(blockIdx.x);
  for (int k = 0; k < 4; ++k) __syncthreads();
  out[global_thread()] = tag;
}

/// Every thread adds to one global counter of each type.
extern "C" __global__ void selftest_atomics(int* count, float* fsum, unsigned long long* wide, int* maxv) {
  const long long i = global_thread();
  atomicAdd(count, 1);
  atomicAdd(fsum, 0.5f);
  atomicAdd(wide, 1ull << 33);
  atomicMax(maxv, static_cast<int>(i));
}

/// Misuses the sim must report instead of hanging or running on (mode 1: a barrier only some
/// threads reach; 2: a shuffle from a lane outside its mask; 3: a warp sync waiting for lanes that
/// returned; 4: a write one past the end of `out`). Only the sim tests launch it.
extern "C" __global__ void selftest_misuse(int mode, float* out, int n) {
  const unsigned t = threadIdx.x;
  if (mode == 1) {
    if (t >= 16) return;
    __syncthreads();
  } else if (mode == 2) {
    if (t < 16) out[t] = __shfl_sync(0x0000ffffu, 1.0f, 20);
  } else if (mode == 3) {
    if (t >= 16) return;
    __syncwarp();
  } else if (mode == 4) {
    if (global_thread() == 0) out[n] = 1.0f;
  }
}
