// An emulated CUDA device for host C++: the kernel sources of csrc/cuda/*.cuh
// compiled by the host compiler and run on the CPU, the way nvcc's old
// -deviceemu mode did. Only the tests use it (they build it, with the
// emulated ops, as a separate library; see tests/emulated_backend.py).
//
// Execution model:
//   * blocks run one after another (in a scrambled order); within a block
//     every warp is a host thread, so warps truly interleave;
//   * the 32 lanes of a warp are fibers on their warp's thread, switched at
//     every warp collective (__shfl_*_sync, __ballot_sync, __syncwarp) and
//     at __syncthreads: lanes run in step from one collective to the next;
//   * __syncthreads is a barrier over the block's warps; a barrier that some
//     threads never reach is reported (at once where that is certain, such
//     as threads that exited, else after the deadlock timeout);
//   * shared memory (LMM_FAST_SHARED, LMM_FAST_DYNAMIC_SHARED) is storage
//     per block, poisoned at the start, bounds-checked on every index, and
//     watched by a race detector: a read or write that conflicts with
//     another thread's access since the last barrier that orders them
//     (__syncthreads, or __syncwarp within a warp), and a read of a word
//     never written in the block, raise an error; atomicAdd on shared memory
//     is checked too (atomics of different threads do not race with each
//     other, only with plain accesses);
//   * launch limits are those of the device (1024 threads per block, grid
//     limits, 48 KiB of shared memory unless more was requested, the
//     kernel's launch bound) and a launch that breaks one is refused;
//   * CUDA_KERNEL_ASSERT and every detected fault raise a C++ error
//     (c10::Error, RuntimeError in Python) naming the kernel, block and thread.
//
// Only what csrc's kernels use is provided, plus the collectives' usual
// variants. Global memory is plain host memory: races there are only as
// visible as host threads make them.
#pragma once

#ifndef LMM_FAST_CUDA_EMULATION
#error "cuda_emulation.h is for the emulation build (define LMM_FAST_CUDA_EMULATION)"
#endif

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------ built-in types
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// One value per emulated thread: lanes are fibers of a host thread, and the
// scheduler stores the running lane's index before it switches to it.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

#include "cuda/launch_spec.h"

// ------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Shared memory must be declared through the checked forms.
#define __shared__ _Pragma("GCC error \"declare shared memory with LMM_FAST_SHARED or LMM_FAST_DYNAMIC_SHARED\"")

namespace lmm_fast {
namespace emu {

// ------------------------------------------------------------ launches
// Device limits the emulator enforces (those of sm_80 and sm_90 alike,
// except the opt-in shared memory, sm_90's).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kMaxOptInSharedBytes = 227 * 1024;

// Shared memory above 48 KiB for `kernel` (cudaFuncSetAttribute with
// cudaFuncAttributeMaxDynamicSharedMemorySize): at most 227 KiB.
void set_max_dynamic_shared(const void* kernel, size_t bytes);
size_t max_dynamic_shared(const void* kernel);

// Seconds a barrier or collective waits for the rest of its block before it
// reports a deadlock (LMM_FAST_EMULATION_TIMEOUT, default 60). Returns the
// previous value.
double set_deadlock_timeout(double seconds);

// Number of kernel launches the emulator has run, in all or of the kernels
// of one name (the tests check that every kernel ran).
int64_t launch_count();
int64_t launch_count(const std::string& name);

// Runs `thread_body` once per thread of the grid; throws c10::Error on a
// refused launch or a fault in the kernel.
void run_grid(const LaunchSpec& spec, const void* kernel, const std::function<void()>& thread_body);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchSpec& spec, Args&&... args) {
  // Each thread gets its own copy of the parameters, as on the device.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(spec, reinterpret_cast<const void*>(kernel), [&] {
    std::tuple<std::decay_t<Params>...> own = params;
    std::apply(kernel, own);
  });
}

// ------------------------------------------------------------ faults
[[noreturn]] void fault(const std::string& what);
[[noreturn]] void kernel_assert_failed(const char* cond, const char* file, int line);
// Throws if the running block was aborted (lets spinning threads stop).
void check_abort();

// ------------------------------------------------------------ collectives
enum class WarpOp : int { kSyncWarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int param, int width, const char* name);
void block_barrier();
unsigned active_mask();

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "collectives move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// ------------------------------------------------------------ shared memory
struct SharedRegion;  // a block's allocation of one declaration
// Per-word access checks and copies, under the block's lock.
void shared_read(const SharedRegion* region, size_t byte, void* out, size_t size);
void shared_write(const SharedRegion* region, size_t byte, const void* in, size_t size);
// An atomic read-modify-write: update(word, operand) under the block's lock;
// the old value goes to *old. Atomics of different threads do not race with
// each other, only with plain reads and writes not ordered by a barrier.
void shared_atomic(const SharedRegion* region, size_t byte, const void* operand, void* old, size_t size,
                   void (*update)(void* word, const void* operand));
[[noreturn]] void shared_out_of_bounds(const SharedRegion* region, int64_t index, size_t extent);

// Key of one static declaration (a function-local static per instantiation).
struct SharedSlot {};
const SharedRegion* static_shared_region(SharedSlot* slot, size_t bytes, size_t align, const char* name);
const SharedRegion* dynamic_shared_region(size_t elem_size, size_t align, const char* name, size_t* extent);

template <typename T>
class SharedRef {
 public:
  SharedRef(const SharedRegion* region, size_t byte) : region_(region), byte_(byte) {}
  operator T() const {
    T v;
    shared_read(region_, byte_, &v, sizeof(T));
    return v;
  }
  const SharedRef& operator=(const T& v) const {
    shared_write(region_, byte_, &v, sizeof(T));
    return *this;
  }
  const SharedRef& operator=(const SharedRef& other) const { return *this = static_cast<T>(other); }
  template <typename U>
  const SharedRef& operator+=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) + v); }
  template <typename U>
  const SharedRef& operator-=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) - v); }
  template <typename U>
  const SharedRef& operator*=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) * v); }
  template <typename U>
  const SharedRef& operator|=(const U& v) const { return *this = static_cast<T>(static_cast<T>(*this) | v); }
  // atomicAdd on this element; returns the old value.
  T atomic_add(const T& v) const {
    T old;
    shared_atomic(region_, byte_, &v, &old, sizeof(T), [](void* word, const void* operand) {
      T w, o;
      std::memcpy(&w, word, sizeof(T));
      std::memcpy(&o, operand, sizeof(T));
      w = static_cast<T>(w + o);
      std::memcpy(word, &w, sizeof(T));
    });
    return old;
  }

 private:
  const SharedRegion* region_;
  size_t byte_;
};

// A view of shared memory with the shape of the array type A (T[n]..., or
// T[] for the dynamic allocation): every index is checked.
template <typename A>
class SharedArray {
  using Elem = std::remove_extent_t<A>;

 public:
  SharedArray(const SharedRegion* region, size_t byte, size_t extent)
      : region_(region), byte_(byte), extent_(extent) {}
  auto operator[](int64_t i) const {
    if (i < 0 || static_cast<size_t>(i) >= extent_) shared_out_of_bounds(region_, i, extent_);
    const size_t byte = byte_ + static_cast<size_t>(i) * sizeof(Elem);
    if constexpr (std::is_array_v<Elem>) {
      return SharedArray<Elem>(region_, byte, std::extent_v<Elem>);
    } else {
      return SharedRef<Elem>(region_, byte);
    }
  }
  size_t size() const { return extent_; }

 private:
  const SharedRegion* region_;
  size_t byte_;
  size_t extent_;
};

template <typename A>
SharedArray<A> static_shared(SharedSlot* slot, const char* name) {
  static_assert(std::is_array_v<A> && std::extent_v<A> > 0, "LMM_FAST_SHARED needs an array with bounds");
  const SharedRegion* region = static_shared_region(slot, sizeof(A), alignof(std::remove_all_extents_t<A>), name);
  return SharedArray<A>(region, 0, std::extent_v<A>);
}

template <typename T>
SharedArray<T[]> dynamic_shared(const char* name) {
  size_t extent = 0;
  const SharedRegion* region = dynamic_shared_region(sizeof(T), alignof(T), name, &extent);
  return SharedArray<T[]>(region, 0, extent);
}

}  // namespace emu
}  // namespace lmm_fast

// `LMM_FAST_SHARED(float, buf, [4][32]);` declares __shared__ float buf[4][32].
#define LMM_FAST_SHARED(type, name, extents)                                  \
  static ::lmm_fast::emu::SharedSlot lmm_fast_shared_slot_##name;             \
  const auto name = ::lmm_fast::emu::static_shared<type extents>(&lmm_fast_shared_slot_##name, #name)
// `LMM_FAST_DYNAMIC_SHARED(float, buf);` declares extern __shared__ float buf[]
// (the launch's dynamic shared memory).
#define LMM_FAST_DYNAMIC_SHARED(type, name) const auto name = ::lmm_fast::emu::dynamic_shared<type>(#name)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                 \
  do {                                                                           \
    if (!(cond)) ::lmm_fast::emu::kernel_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)

// ------------------------------------------------------------ intrinsics
inline void __syncthreads() { ::lmm_fast::emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::lmm_fast::emu::warp_collective(::lmm_fast::emu::WarpOp::kSyncWarp, mask, 0, 0, 32, "__syncwarp");
}
inline unsigned __activemask() { return ::lmm_fast::emu::active_mask(); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  using namespace ::lmm_fast::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflIdx, mask, to_bits(var), src_lane, width, "__shfl_sync"));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace ::lmm_fast::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflUp, mask, to_bits(var), static_cast<int>(delta), width,
                                      "__shfl_up_sync"));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace ::lmm_fast::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflDown, mask, to_bits(var), static_cast<int>(delta), width,
                                      "__shfl_down_sync"));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  using namespace ::lmm_fast::emu;
  return from_bits<T>(warp_collective(WarpOp::kShflXor, mask, to_bits(var), lane_mask, width, "__shfl_xor_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  using namespace ::lmm_fast::emu;
  return static_cast<unsigned>(warp_collective(WarpOp::kBallot, mask, predicate != 0, 0, 32, "__ballot_sync"));
}
inline int __any_sync(unsigned mask, int predicate) {
  using namespace ::lmm_fast::emu;
  return static_cast<int>(warp_collective(WarpOp::kAny, mask, predicate != 0, 0, 32, "__any_sync"));
}
inline int __all_sync(unsigned mask, int predicate) {
  using namespace ::lmm_fast::emu;
  return static_cast<int>(warp_collective(WarpOp::kAll, mask, predicate != 0, 0, 32, "__all_sync"));
}

// Atomics: std::atomic_ref on the host memory; each also stops a thread of
// an aborted block (a spin loop on a flag would otherwise never end).
template <typename T, typename V>
T atomicAdd(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  return std::atomic_ref<T>(*p).fetch_add(static_cast<T>(v));
}
// atomicAdd on shared memory (an element of LMM_FAST_SHARED or
// LMM_FAST_DYNAMIC_SHARED): checked like its other accesses.
template <typename T, typename V>
T atomicAdd(const ::lmm_fast::emu::SharedRef<T>& ref, V v) {
  ::lmm_fast::emu::check_abort();
  return ref.atomic_add(static_cast<T>(v));
}
template <typename T, typename V>
T atomicSub(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  return std::atomic_ref<T>(*p).fetch_sub(static_cast<T>(v));
}
template <typename T, typename V>
T atomicExch(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  return std::atomic_ref<T>(*p).exchange(static_cast<T>(v));
}
template <typename T, typename V>
T atomicAnd(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  return std::atomic_ref<T>(*p).fetch_and(static_cast<T>(v));
}
template <typename T, typename V>
T atomicOr(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  return std::atomic_ref<T>(*p).fetch_or(static_cast<T>(v));
}
template <typename T, typename V>
T atomicXor(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  return std::atomic_ref<T>(*p).fetch_xor(static_cast<T>(v));
}
template <typename T, typename V>
T atomicMax(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < static_cast<T>(v) && !a.compare_exchange_weak(old, static_cast<T>(v))) {
  }
  return old;
}
template <typename T, typename V>
T atomicMin(T* p, V v) {
  ::lmm_fast::emu::check_abort();
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (static_cast<T>(v) < old && !a.compare_exchange_weak(old, static_cast<T>(v))) {
  }
  return old;
}
template <typename T, typename C, typename V>
T atomicCAS(T* p, C compare, V v) {
  ::lmm_fast::emu::check_abort();
  T expected = static_cast<T>(compare);
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, static_cast<T>(v));
  return expected;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __ldg(const T* p) { return *p; }

// Math: the correctly rounded host operations for the _rn intrinsics (the
// emulation TUs are compiled without floating-point contraction) and the
// structure of the device's fast exp (2^(x log2 e)).
using std::exp;
using std::log;
using std::log1p;
inline float __expf(float x) { return std::exp2(x * 1.4426950408889634f); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline unsigned int __float_as_uint(float f) { return ::lmm_fast::emu::from_bits<unsigned int>(::lmm_fast::emu::to_bits(f)); }
inline float __uint_as_float(unsigned int u) { return ::lmm_fast::emu::from_bits<float>(::lmm_fast::emu::to_bits(u)); }
inline long long __double_as_longlong(double d) { return ::lmm_fast::emu::from_bits<long long>(::lmm_fast::emu::to_bits(d)); }
inline double __longlong_as_double(long long i) { return ::lmm_fast::emu::from_bits<double>(::lmm_fast::emu::to_bits(i)); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// The device's min and max overloads, as one template per operand type.
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
