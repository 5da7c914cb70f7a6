// The CUDA subset that kernels/*.cu may use, for the `sim` device: build.rs compiles the same .cu
// sources with the host C++ compiler against this header (never seen by nvcc), and fiber.cpp runs
// every thread of a block as a cooperative fiber, so barriers, shared memory, warp shuffles, votes
// and atomics behave as on a GPU.
//
// Anything not declared here does not compile in the sim build: a kernel cannot silently do
// something different on the sim. In particular:
// - dynamic shared memory is taken with `dynamic_shared<T>()` from kernels/common.cuh;
//   `extern __shared__ T x[];` is rejected (it expands to `extern static`);
// - `__shared__` variables are `static thread_local`: the threads of a block are fibers of one OS
//   thread and parallel blocks run on different OS threads, so every running block has its own copy;
// - each thread has a 64 KiB stack (a guard page below it), so large per-thread local arrays
//   crash the sim; they would spill to local memory on a GPU anyway;
// - `__syncthreads()` after some threads of the block returned is an error (undefined on a GPU);
// - `__activemask()`, `__constant__`, textures, cooperative groups and PTX asm are not provided.
#ifndef UNET3D_CUDA_SHIM_H
#define UNET3D_CUDA_SHIM_H

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <string>
#include <type_traits>
#include <utility>

#define UNET3D_SIM 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
struct __align__(8) float2 {
  float x, y;
};
struct __align__(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace unet3d_sim {

/// What a kernel can see of the thread it runs as; the runtime points `t_thread` at the running
/// fiber's record before every switch into it.
struct ThreadState {
  uint3 tid;
  unsigned lane;
  unsigned warp;
};

/// The block being run by this OS thread.
struct BlockState {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dyn_smem;
};

extern __thread ThreadState* t_thread __attribute__((tls_model("initial-exec")));
extern __thread BlockState* t_block __attribute__((tls_model("initial-exec")));

enum WarpOp : int { kShfl = 1, kBallot = 2, kSyncWarp = 3 };

void syncthreads_impl();
std::uint64_t warp_collective(int op, unsigned mask, std::uint64_t value, int src_lane);
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/// The compiler must not keep shared or global memory in registers across a point where other
/// threads of the block run.
inline void compiler_fence() { asm volatile("" ::: "memory"); }

template <class T>
inline std::uint64_t to_bits(T v) {
  static_assert(std::is_arithmetic<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                "warp shuffles take 32- or 64-bit arithmetic values");
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof v);
  return b;
}

template <class T>
inline T from_bits(std::uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

inline int segment_base(int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("shuffle width %d is not a power of two in 1..32", width);
  }
  return static_cast<int>(t_thread->lane) & ~(width - 1);
}

/// Every lane of `mask` publishes `v` and reads lane `src` (its own value when `src` < 0).
template <class T>
inline T shuffle(unsigned mask, T v, int src) {
  compiler_fence();
  T r = from_bits<T>(warp_collective(kShfl, mask, to_bits(v), src));
  compiler_fence();
  return r;
}

}  // namespace unet3d_sim

/// kernels/common.cuh declares the nvcc version.
template <class T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(::unet3d_sim::t_block->dyn_smem);
}

#define threadIdx (static_cast<const uint3&>(::unet3d_sim::t_thread->tid))
#define blockIdx (static_cast<const uint3&>(::unet3d_sim::t_block->block_idx))
#define blockDim (static_cast<const dim3&>(::unet3d_sim::t_block->block_dim))
#define gridDim (static_cast<const dim3&>(::unet3d_sim::t_block->grid_dim))
#define warpSize 32

inline void __syncthreads() {
  ::unet3d_sim::compiler_fence();
  ::unet3d_sim::syncthreads_impl();
  ::unet3d_sim::compiler_fence();
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::unet3d_sim::compiler_fence();
  ::unet3d_sim::warp_collective(::unet3d_sim::kSyncWarp, mask, 0, -1);
  ::unet3d_sim::compiler_fence();
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { ::unet3d_sim::fail("__trap() called"); }

// ---- warp shuffles and votes -------------------------------------------------------------------

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  int base = ::unet3d_sim::segment_base(width);
  return ::unet3d_sim::shuffle(mask, var, base + (src_lane & (width - 1)));
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  int base = ::unet3d_sim::segment_base(width);
  int lane = static_cast<int>(::unet3d_sim::t_thread->lane);
  int src = lane - static_cast<int>(delta);
  return ::unet3d_sim::shuffle(mask, var, src < base ? -1 : src);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  int base = ::unet3d_sim::segment_base(width);
  int lane = static_cast<int>(::unet3d_sim::t_thread->lane);
  int src = lane + static_cast<int>(delta);
  return ::unet3d_sim::shuffle(mask, var, src >= base + width ? -1 : src);
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  int base = ::unet3d_sim::segment_base(width);
  int lane = static_cast<int>(::unet3d_sim::t_thread->lane);
  int src = lane ^ (lane_mask & 31);
  return ::unet3d_sim::shuffle(mask, var, src >= base + width ? -1 : src);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  ::unet3d_sim::compiler_fence();
  return static_cast<unsigned>(::unet3d_sim::warp_collective(::unet3d_sim::kBallot, mask, pred != 0, -1));
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics: blocks run in parallel on OS threads, so these are real atomics -------------------

template <class T>
inline T unet3d_sim_atomic_update(T* p, T (*f)(T, T), T v) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T next = f(old, v);
  while (!__atomic_compare_exchange(p, &old, &next, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    next = f(old, v);
  }
  return old;
}

#define UNET3D_SIM_INT_ATOMICS(T)                                                                    \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }               \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }               \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }             \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }               \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }               \
  inline T atomicMax(T* p, T v) {                                                                    \
    return unet3d_sim_atomic_update<T>(p, [](T a, T b) { return a > b ? a : b; }, v);                \
  }                                                                                                  \
  inline T atomicMin(T* p, T v) {                                                                    \
    return unet3d_sim_atomic_update<T>(p, [](T a, T b) { return a < b ? a : b; }, v);                \
  }                                                                                                  \
  inline T atomicCAS(T* p, T compare, T v) {                                                         \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);          \
    return compare;                                                                                  \
  }

UNET3D_SIM_INT_ATOMICS(int)
UNET3D_SIM_INT_ATOMICS(unsigned)
UNET3D_SIM_INT_ATOMICS(unsigned long long)
#undef UNET3D_SIM_INT_ATOMICS

inline float atomicAdd(float* p, float v) {
  return unet3d_sim_atomic_update<float>(p, [](float a, float b) { return a + b; }, v);
}
inline double atomicAdd(double* p, double v) {
  return unet3d_sim_atomic_update<double>(p, [](double a, double b) { return a + b; }, v);
}
inline float atomicExch(float* p, float v) {
  float old;
  __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST);
  return old;
}

// ---- math and bit intrinsics --------------------------------------------------------------------

#define UNET3D_SIM_MINMAX(T)                                                                         \
  inline T min(T a, T b) { return a < b ? a : b; }                                                   \
  inline T max(T a, T b) { return a > b ? a : b; }
UNET3D_SIM_MINMAX(int)
UNET3D_SIM_MINMAX(unsigned)
UNET3D_SIM_MINMAX(long long)
UNET3D_SIM_MINMAX(unsigned long long)
#undef UNET3D_SIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __int_as_float(int x) { return ::unet3d_sim::from_bits<float>(static_cast<unsigned>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(::unet3d_sim::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::unet3d_sim::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(::unet3d_sim::to_bits(x)); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- nvcuda::wmma, TF32 m16n16k8 only (kernels/conv.cu) -----------------------------------------
// Every lane holds the whole tile (the element mapping of a fragment is opaque, so this mapping is
// legal): element-wise loops over `x[0..num_elements)` behave as on a GPU, and mma_sync is one
// lane's full product. As on a GPU, pointers must be 256-bit aligned and ldm a multiple of 4, and
// the tensor core ignores the 13 low mantissa bits of an operand that was not rounded to TF32.

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 8, "the sim emulates wmma m16n16k8 only");
  static_assert(std::is_same<Use, accumulator>::value ? std::is_same<T, float>::value
                                                      : std::is_same<T, precision::tf32>::value,
                "the sim emulates tf32 operand and float accumulator fragments only");
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

/// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
inline float __float_to_tf32(float in) {
  unsigned b = __float_as_uint(in);
  if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;
  return __uint_as_float(b);
}

inline void check_tile(const void* p, unsigned ldm) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || ldm % 4 != 0) {
    ::unet3d_sim::fail("wmma: pointer %p is not 256-bit aligned or ldm %u is not a multiple of 4", p, ldm);
  }
}

template <class F>
inline void load_tile(F& f, const float* p, unsigned ldm, bool row) {
  check_tile(p, ldm);
  for (int i = 0; i < F::rows; ++i) {
    for (int j = 0; j < F::cols; ++j) f.x[i * F::cols + j] = row ? p[i * ldm + j] : p[i + j * ldm];
  }
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout");
  load_tile(f, p, ldm, std::is_same<Layout, row_major>::value);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  load_tile(f, p, ldm, l == mem_row_major);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  check_tile(p, ldm);
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) (l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * N + j];
  }
}

template <class F>
inline void fill_fragment(F& f, float v) {
  for (int i = 0; i < F::num_elements; ++i) f.x[i] = v;
}

inline float tf32_operand(float v) { return __uint_as_float(__float_as_uint(v) & 0xffffe000u); }

template <int M, int N, int K, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
                     const fragment<matrix_b, M, N, K, precision::tf32, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  __syncwarp();  // a warp-wide operation: every lane must take part
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += tf32_operand(a.x[i * K + k]) * tf32_operand(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

}  // namespace wmma
}  // namespace nvcuda

// ---- what build.rs generates per kernel: a trampoline and the parameter signature ----------------

namespace unet3d_sim {

template <class T>
constexpr char type_code() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    (std::is_integral<T>::value && !std::is_same<T, bool>::value &&
                     (sizeof(T) == 4 || sizeof(T) == 8)),
                "kernel parameters must be float, double, 32/64-bit integers or pointers to them");
  return std::is_same<T, float>::value    ? 'f'
         : std::is_same<T, double>::value ? 'd'
         : sizeof(T) == 4                 ? (std::is_signed<T>::value ? 'i' : 'u')
                                          : (std::is_signed<T>::value ? 'l' : 'L');
}

/// Two letters per parameter: `S` scalar, `C` pointer to const, `P` pointer; then the type code.
template <class P>
std::string param_code() {
  if constexpr (std::is_pointer<P>::value) {
    using E = typename std::remove_pointer<P>::type;
    return std::string(1, std::is_const<E>::value ? 'C' : 'P') +
           type_code<typename std::remove_cv<E>::type>();
  } else {
    return std::string(1, 'S') + type_code<P>();
  }
}

template <class... P>
const char* signature(void (*)(P...)) {
  static const std::string s = (std::string() + ... + param_code<P>());
  return s.c_str();
}

/// The launch layer passes `void* params[]` exactly as cuLaunchKernel takes it: one pointer per
/// parameter, to that parameter's value.
template <class T>
T load_param(void* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class... P, std::size_t... I>
void invoke(void (*k)(P...), void** params, std::index_sequence<I...>) {
  k(load_param<P>(params[I])...);
}

template <class... P>
void invoke(void (*k)(P...), void** params) {
  invoke(k, params, std::index_sequence_for<P...>{});
}

}  // namespace unet3d_sim

#define UNET3D_SIM_EXPORT(name)                                                                      \
  extern "C" void unet3d_sim_tramp_##name(void** params) { ::unet3d_sim::invoke(name, params); }     \
  extern "C" const char* unet3d_sim_sig_##name() { return ::unet3d_sim::signature(name); }

#endif  // UNET3D_CUDA_SHIM_H
