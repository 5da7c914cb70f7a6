// The sim runtime: runs the blocks of a grid on the calling OS thread, each thread of a block as a
// cooperative fiber with its own stack. A fiber runs until it reaches a __syncthreads(), a warp
// collective or its end, then the scheduler runs the next runnable fiber; a barrier releases its
// threads once every thread of the block has arrived, a warp collective once every lane of its mask
// has. Kernels that would hang or be undefined on a GPU (a barrier some threads never reach, a
// shuffle naming an absent lane, mismatched warp collectives) fail the launch with a message.
//
// Two context switches: a hand-written one for x86-64 (callee-saved registers, MXCSR and the x87
// control word), and ucontext for every other architecture (and on x86-64 when selected, so that
// path is tested too). ucontext is much slower: glibc's swapcontext makes a system call per switch.
#include "cuda_shim.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

namespace unet3d_sim {

__thread ThreadState* t_thread __attribute__((tls_model("initial-exec")));
__thread BlockState* t_block __attribute__((tls_model("initial-exec")));

namespace {

#if defined(__x86_64__)
constexpr bool kHaveNativeSwitch = true;
#else
constexpr bool kHaveNativeSwitch = false;
#endif

/// Enough for the kernels' locals and for formatting an error message; a guard page below each
/// stack turns an overflow into a crash rather than corruption.
constexpr std::size_t kStackBytes = 64 * 1024;

enum class State : unsigned char { kRunnable, kBarrier, kWarp, kExited };

struct Fiber {
  ThreadState pub;
  State state;
  void* sp;             // native switch: stack pointer saved while switched out
  ucontext_t uc;        // ucontext switch
  std::uint64_t value;  // what this lane publishes to its warp collective
  int src;              // the lane it reads (-1: its own value)
  std::uint64_t result;
};

/// Lanes of one warp waiting in the same collective with the same mask.
struct Rendezvous {
  int op;  // 0: slot free
  unsigned mask;
  unsigned arrived;
};

struct Warp {
  unsigned lanes;   // lanes that exist: the block's last warp may be partial
  unsigned exited;  // lanes whose thread has returned
  Rendezvous pending[32];
};

/// Fiber stacks of one OS thread, kept between blocks and launches.
class Stacks {
 public:
  Stacks() = default;
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  ~Stacks() { release(); }

  void reserve(std::size_t n) {
    if (n <= count_) return;
    release();
    std::size_t bytes = n * stride();
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "unet3d sim: cannot map %zu bytes of fiber stacks\n", bytes);
      std::abort();
    }
    base_ = static_cast<unsigned char*>(p);
    count_ = n;
    for (std::size_t i = 0; i < n; ++i) {
      mprotect(base_ + i * stride(), guard(), PROT_NONE);
    }
  }

  /// The lowest and one-past-highest usable addresses of stack `i`.
  unsigned char* bottom(std::size_t i) const { return base_ + i * stride() + guard(); }
  unsigned char* top(std::size_t i) const { return base_ + (i + 1) * stride(); }

 private:
  static std::size_t guard() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
  static std::size_t stride() { return kStackBytes + guard(); }
  void release() {
    if (base_ != nullptr) munmap(base_, count_ * stride());
    base_ = nullptr;
    count_ = 0;
  }

  unsigned char* base_ = nullptr;
  std::size_t count_ = 0;
};

struct AlignedFree {
  void operator()(unsigned char* p) const { std::free(p); }
};

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Stacks stacks;
  std::unique_ptr<unsigned char, AlignedFree> dyn_smem;
  std::size_t dyn_capacity = 0;
  BlockState block{};
  unsigned nthreads = 0;
  unsigned live = 0;
  unsigned at_barrier = 0;
  unsigned current = 0;
  bool native = kHaveNativeSwitch;
  void* sched_sp = nullptr;
  ucontext_t sched_uc{};
  void (*kernel)(void**) = nullptr;
  void** params = nullptr;
  bool failed = false;
  char error[1024] = {};
};

std::atomic<bool> g_use_ucontext{!kHaveNativeSwitch};
thread_local std::unique_ptr<Runtime> t_runtime_owner;
__thread Runtime* t_rt __attribute__((tls_model("initial-exec")));

const char* op_name(int op) {
  switch (op) {
    case kShfl:
      return "a warp shuffle";
    case kBallot:
      return "a warp vote";
    default:
      return "__syncwarp()";
  }
}

}  // namespace
}  // namespace unet3d_sim

#if defined(__x86_64__)
// void unet3d_sim_switch(void** save_sp, void* load_sp): pushes the callee-saved state, stores the
// stack pointer in *save_sp, then resumes the context whose stack pointer is load_sp.
asm(R"(
    .text
    .p2align 4
    .globl unet3d_sim_switch
    .hidden unet3d_sim_switch
    .type unet3d_sim_switch, @function
unet3d_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size unet3d_sim_switch, .-unet3d_sim_switch
)");
extern "C" void unet3d_sim_switch(void** save_sp, void* load_sp);
#endif

namespace unet3d_sim {
namespace {

void switch_to(Runtime& rt, unsigned i) {
  Fiber& f = rt.fibers[i];
  rt.current = i;
  t_thread = &f.pub;
#if defined(__x86_64__)
  if (rt.native) {
    unet3d_sim_switch(&rt.sched_sp, f.sp);
    return;
  }
#endif
  swapcontext(&rt.sched_uc, &f.uc);
}

void yield(Runtime& rt) {
  Fiber& f = rt.fibers[rt.current];
#if defined(__x86_64__)
  if (rt.native) {
    unet3d_sim_switch(&f.sp, rt.sched_sp);
    return;
  }
#endif
  swapcontext(&f.uc, &rt.sched_uc);
}

[[noreturn]] void finish_thread(Runtime& rt) {
  Fiber& f = rt.fibers[rt.current];
  Warp& w = rt.warps[f.pub.warp];
  unsigned bit = 1u << f.pub.lane;
  f.state = State::kExited;
  rt.live -= 1;
  w.exited |= bit;
  if (rt.at_barrier > 0) {
    fail("returned while %u threads wait at __syncthreads() for it", rt.at_barrier);
  }
  for (const Rendezvous& r : w.pending) {
    if (r.op != 0 && (r.mask & bit) != 0) {
      fail("returned while lanes 0x%08x wait for it in %s with mask 0x%08x", r.arrived, op_name(r.op),
           r.mask);
    }
  }
  yield(rt);
  std::abort();  // the scheduler never resumes a finished fiber
}

[[noreturn]] void fiber_entry() {
  Runtime& rt = *t_rt;
  rt.kernel(rt.params);
  finish_thread(rt);
}

void init_fiber(Runtime& rt, unsigned i, std::uint64_t fp_control) {
  Fiber& f = rt.fibers[i];
  const dim3& bd = rt.block.block_dim;
  f.pub.tid = {i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
  f.pub.lane = i % 32;
  f.pub.warp = i / 32;
  f.state = State::kRunnable;
  if (rt.native) {
    // The frame unet3d_sim_switch pops: FP control words, six registers, then the address it
    // returns to (fiber_entry, entered with the stack aligned as after a call).
    auto* sp = reinterpret_cast<std::uint64_t*>(reinterpret_cast<std::uintptr_t>(rt.stacks.top(i)) & ~15ull);
    *--sp = 0;
    *--sp = reinterpret_cast<std::uint64_t>(&fiber_entry);
    for (int r = 0; r < 6; ++r) *--sp = 0;
    *--sp = fp_control;
    f.sp = sp;
  } else {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = rt.stacks.bottom(i);
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_entry, 0);
  }
}

std::uint64_t current_fp_control() {
#if defined(__x86_64__)
  unsigned mxcsr = 0;
  unsigned short x87 = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(x87));
  return mxcsr | (static_cast<std::uint64_t>(x87) << 32);
#else
  return 0;
#endif
}

void scheduler_error(Runtime& rt, const char* what) {
  const uint3& b = rt.block.block_idx;
  std::snprintf(rt.error, sizeof rt.error, "block (%u, %u, %u): %s", b.x, b.y, b.z, what);
  rt.failed = true;
}

void report_deadlock(Runtime& rt) {
  unsigned barrier = 0, warp = 0, exited = 0;
  for (unsigned i = 0; i < rt.nthreads; ++i) {
    State s = rt.fibers[i].state;
    barrier += s == State::kBarrier;
    warp += s == State::kWarp;
    exited += s == State::kExited;
  }
  char msg[256];
  std::snprintf(msg, sizeof msg,
                "deadlock: %u threads wait at __syncthreads(), %u in warp collectives whose lanes never "
                "all arrive, %u have returned",
                barrier, warp, exited);
  scheduler_error(rt, msg);
}

bool run_block(Runtime& rt, unsigned long long linear, std::uint64_t fp_control) {
  const dim3& g = rt.block.grid_dim;
  rt.block.block_idx = {static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
                        static_cast<unsigned>(linear / (static_cast<unsigned long long>(g.x) * g.y))};
  for (unsigned i = 0; i < rt.nthreads; ++i) init_fiber(rt, i, fp_control);
  for (unsigned w = 0; w < rt.warps.size(); ++w) {
    Warp& wp = rt.warps[w];
    unsigned n = rt.nthreads - w * 32;
    wp.lanes = n >= 32 ? 0xffffffffu : (1u << n) - 1;
    wp.exited = 0;
    for (Rendezvous& r : wp.pending) r = {};
  }
  // Shared memory is undefined at block start on a GPU; NaN bytes make a kernel that reads it early
  // visibly wrong.
  if (rt.dyn_capacity > 0) std::memset(rt.dyn_smem.get(), 0xff, rt.dyn_capacity);
  rt.live = rt.nthreads;
  rt.at_barrier = 0;
  while (rt.live > 0) {
    bool ran = false;
    for (unsigned i = 0; i < rt.nthreads; ++i) {
      if (rt.fibers[i].state != State::kRunnable) continue;
      ran = true;
      switch_to(rt, i);
      if (rt.failed) return false;
    }
    if (!ran) {
      report_deadlock(rt);
      return false;
    }
  }
  return true;
}

Runtime& runtime_for_this_thread() {
  if (!t_runtime_owner) t_runtime_owner = std::make_unique<Runtime>();
  return *t_runtime_owner;
}

void prepare(Runtime& rt, const unsigned grid[3], const unsigned block[3], unsigned dyn_smem) {
  rt.block.grid_dim = {grid[0], grid[1], grid[2]};
  rt.block.block_dim = {block[0], block[1], block[2]};
  rt.nthreads = block[0] * block[1] * block[2];
  rt.fibers.resize(rt.nthreads);
  rt.warps.resize((rt.nthreads + 31) / 32);
  rt.stacks.reserve(rt.nthreads);
  std::size_t want = (static_cast<std::size_t>(dyn_smem) + 63) & ~std::size_t{63};
  if (want > rt.dyn_capacity) {
    rt.dyn_smem.reset(static_cast<unsigned char*>(std::aligned_alloc(64, want)));
    if (!rt.dyn_smem) {
      std::fprintf(stderr, "unet3d sim: cannot allocate %zu bytes of dynamic shared memory\n", want);
      std::abort();
    }
    rt.dyn_capacity = want;
  }
  rt.block.dyn_smem = rt.dyn_smem.get();
  rt.native = !g_use_ucontext.load(std::memory_order_relaxed);
  rt.failed = false;
  rt.error[0] = '\0';
}

}  // namespace

void fail(const char* fmt, ...) {
  Runtime* rt = t_rt;
  char what[768];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  if (rt == nullptr) {
    std::fprintf(stderr, "unet3d sim: %s (outside a kernel launch)\n", what);
    std::abort();
  }
  const uint3& b = rt->block.block_idx;
  const uint3& t = rt->fibers[rt->current].pub.tid;
  std::snprintf(rt->error, sizeof rt->error, "block (%u, %u, %u) thread (%u, %u, %u): %s", b.x, b.y, b.z,
                t.x, t.y, t.z, what);
  rt->failed = true;
  yield(*rt);
  std::abort();  // a failed block is never resumed
}

void syncthreads_impl() {
  Runtime& rt = *t_rt;
  if (rt.live != rt.nthreads) {
    fail("__syncthreads() after %u of the block's %u threads returned (undefined on a GPU)",
         rt.nthreads - rt.live, rt.nthreads);
  }
  if (++rt.at_barrier == rt.nthreads) {
    for (Fiber& f : rt.fibers) {
      if (f.state == State::kBarrier) f.state = State::kRunnable;
    }
    rt.at_barrier = 0;
    return;
  }
  rt.fibers[rt.current].state = State::kBarrier;
  yield(rt);
}

std::uint64_t warp_collective(int op, unsigned mask, std::uint64_t value, int src_lane) {
  Runtime& rt = *t_rt;
  Fiber& self = rt.fibers[rt.current];
  Warp& w = rt.warps[self.pub.warp];
  unsigned bit = 1u << self.pub.lane;
  if ((mask & bit) == 0) {
    fail("%s with mask 0x%08x, which leaves out the calling lane %u", op_name(op), mask, self.pub.lane);
  }
  if ((mask & ~w.lanes) != 0) {
    fail("%s with mask 0x%08x names lanes beyond the block's %u threads", op_name(op), mask, rt.nthreads);
  }
  if ((mask & w.exited) != 0) {
    fail("%s with mask 0x%08x names lanes that have returned (0x%08x)", op_name(op), mask, mask & w.exited);
  }
  self.value = value;
  self.src = src_lane;
  Rendezvous* r = nullptr;
  for (Rendezvous& p : w.pending) {
    if (p.op == op && p.mask == mask) {
      r = &p;
      break;
    }
  }
  if (r == nullptr) {
    for (Rendezvous& p : w.pending) {
      if (p.op == 0) {
        r = &p;
        *r = {op, mask, 0};
        break;
      }
    }
  }
  r->arrived |= bit;
  if (r->arrived != mask) {
    self.state = State::kWarp;
    yield(rt);
    return self.result;
  }
  // The last lane to arrive computes every participant's result and wakes the others.
  Fiber* lanes = &rt.fibers[self.pub.warp * 32];
  std::uint64_t ballot = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) != 0 && lanes[l].value != 0) ballot |= 1ull << l;
  }
  for (unsigned l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) == 0) continue;
    Fiber& p = lanes[l];
    if (op == kShfl) {
      if (p.src < 0) {
        p.result = p.value;
      } else if ((mask >> p.src & 1u) == 0) {
        fail("lane %u shuffles from lane %d, which is not in the mask 0x%08x", l, p.src, mask);
      } else {
        p.result = lanes[p.src].value;
      }
    } else {
      p.result = op == kBallot ? ballot : 0;
    }
    if (&p != &self) p.state = State::kRunnable;
  }
  *r = {};
  return self.result;
}

}  // namespace unet3d_sim

/// Runs blocks `first .. first + count` (linear, x fastest) of a launch on the calling thread.
/// Returns 0, or 1 with a message in `err` when a block failed.
extern "C" int unet3d_sim_run_blocks(void (*kernel)(void**), void** params, const unsigned grid[3],
                                     const unsigned block[3], unsigned dyn_smem, unsigned long long first,
                                     unsigned long long count, char* err, std::size_t err_len) {
  using namespace unet3d_sim;
  Runtime& rt = runtime_for_this_thread();
  prepare(rt, grid, block, dyn_smem);
  rt.kernel = kernel;
  rt.params = params;
  t_rt = &rt;
  t_block = &rt.block;
  std::uint64_t fp_control = current_fp_control();
  bool ok = true;
  for (unsigned long long b = first; ok && b < first + count; ++b) ok = run_block(rt, b, fp_control);
  t_rt = nullptr;
  t_block = nullptr;
  t_thread = nullptr;
  if (ok) return 0;
  std::snprintf(err, err_len, "%s", rt.error);
  return 1;
}

/// Selects the ucontext switch (nonzero) or the native one; -1 when this architecture has no
/// native switch.
extern "C" int unet3d_sim_use_ucontext(int on) {
  if (on == 0 && !unet3d_sim::kHaveNativeSwitch) return -1;
  unet3d_sim::g_use_ucontext.store(on != 0, std::memory_order_relaxed);
  return 0;
}
