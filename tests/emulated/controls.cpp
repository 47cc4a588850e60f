// Small kernels for the tests of the emulated device itself
// (tests/test_cuda_emulated_runtime.py): correct ones that pin down its
// semantics (thread indices, barriers, warp collectives, atomics, dynamic
// shared memory, truly interleaved warps) and deliberately broken ones, the
// negative controls, that it must refuse. Built only into the test library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/device_compat.cuh"
#include "emulation/emulated_backend.h"

namespace lmm_fast {
namespace {

using Backend = EmulatedBackend;

// out[b, t] = (threadIdx, blockIdx, blockDim, gridDim) of every thread.
__global__ void indices_kernel(int64_t* out) {
  const int64_t block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int64_t thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int64_t threads = static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  int64_t* o = out + (block * threads + thread) * 12;
  const unsigned v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                          blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int k = 0; k < 12; ++k) o[k] = v[k];
}

at::Tensor control_indices(c10::IntArrayRef grid, c10::IntArrayRef block) {
  const dim3 g(grid[0], grid[1], grid[2]);
  const dim3 b(block[0], block[1], block[2]);
  at::Tensor out = at::full({grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2], 12}, -1, at::kLong);
  Backend::launch(indices_kernel, {.grid = g, .block = b, .name = "indices_kernel"}, out.data_ptr<int64_t>());
  return out;
}

// Block sums through shared memory: every thread stores its value, then
// thread 0 adds them up. sync=false leaves out the __syncthreads between
// the stores and the reads (the bug the race detector must see).
constexpr int kSumThreads = 128;

__global__ void __launch_bounds__(kSumThreads) block_sum_kernel(const float* x, int64_t n, bool sync,
                                                                float* out) {
  LMM_FAST_SHARED(float, values, [kSumThreads]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  values[threadIdx.x] = i < n ? x[i] : 0.0f;
  if (sync) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (unsigned t = 0; t < blockDim.x; ++t) s += values[t];
    out[blockIdx.x] = s;
  }
}

at::Tensor control_block_sum(const at::Tensor& x, bool sync) {
  const int64_t n = x.numel();
  const int64_t blocks = (n + kSumThreads - 1) / kSumThreads;
  at::Tensor out = at::zeros({blocks}, x.options());
  Backend::launch(block_sum_kernel,
                  {.grid = dim3(blocks), .block = kSumThreads, .launch_bound = kSumThreads, .name = "block_sum_kernel"},
                  x.data_ptr<float>(), n, sync, out.data_ptr<float>());
  return out;
}

// Two passes over one shared buffer, the second rewriting what the first
// read: without the __syncthreads between them a slow reader of pass 1
// would see pass 2's values (write-after-read race).
__global__ void __launch_bounds__(kSumThreads) reuse_kernel(const float* x, bool sync, float* out) {
  LMM_FAST_SHARED(float, buffer, [kSumThreads]);
  const unsigned t = threadIdx.x;
  buffer[t] = x[t];
  __syncthreads();
  float a = buffer[(t + 1) % kSumThreads];
  if (sync) __syncthreads();
  buffer[t] = 2.0f * x[t];
  __syncthreads();
  out[t] = a + buffer[(t + 1) % kSumThreads];
}

at::Tensor control_reuse(const at::Tensor& x, bool sync) {
  at::Tensor out = at::zeros({kSumThreads}, x.options());
  Backend::launch(reuse_kernel, {.grid = 1, .block = kSumThreads, .launch_bound = kSumThreads, .name = "reuse_kernel"},
                  x.data_ptr<float>(), sync, out.data_ptr<float>());
  return out;
}

// Each thread writes shared[threadIdx.x + shift]: any shift > 0 runs off
// the end of the array.
__global__ void __launch_bounds__(kSumThreads) shared_index_kernel(const float* x, int shift, float* out) {
  LMM_FAST_SHARED(float, values, [kSumThreads]);
  values[threadIdx.x + shift] = x[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = values[kSumThreads - 1 - threadIdx.x];
}

at::Tensor control_shared_index(const at::Tensor& x, int64_t shift) {
  at::Tensor out = at::zeros({kSumThreads}, x.options());
  Backend::launch(shared_index_kernel,
                  {.grid = 1, .block = kSumThreads, .launch_bound = kSumThreads, .name = "shared_index_kernel"},
                  x.data_ptr<float>(), static_cast<int>(shift), out.data_ptr<float>());
  return out;
}

// Warp sums. mode 0: xor butterfly over offsets 16..1 (every lane gets the
// sum); mode 1: the butterfly started at offset 8 by mistake (each lane gets
// the sum of its half of the warp); mode 2: __shfl_down_sync(0x0000ffff, v,
// 16), which reads lanes outside its mask.
__global__ void warp_sum_kernel(const float* x, int mode, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  if (mode == 2) {
    if ((threadIdx.x & 31) < 16) v += __shfl_down_sync(0x0000ffffu, v, 16);
  } else {
    for (int offset = mode == 0 ? 16 : 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  out[i] = v;
}

at::Tensor control_warp_sum(const at::Tensor& x, int64_t mode) {
  TORCH_CHECK(x.numel() % 64 == 0, "x must hold a multiple of 64 values");
  at::Tensor out = at::zeros_like(x);
  Backend::launch(warp_sum_kernel, {.grid = dim3(x.numel() / 64), .block = 64, .name = "warp_sum_kernel"},
                  x.data_ptr<float>(), static_cast<int>(mode), out.data_ptr<float>());
  return out;
}

// Every shuffle variant and the votes, for the tests to compare with the
// device's definitions: out[i, :] = (shfl idx from lane (lane * 5 + 3) % 32,
// up 3, down 5, xor 6, width-8 idx from lane 2, width-8 down 3, ballot of
// odd values, any value > 50, all values >= 0).
__global__ void collectives_kernel(const int* x, int* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const int v = x[i];
  int* o = out + static_cast<int64_t>(i) * 9;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 5 + 3) % 32);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 6);
  o[4] = __shfl_sync(0xffffffffu, v, 2, 8);
  o[5] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[6] = static_cast<int>(__ballot_sync(0xffffffffu, v & 1));
  o[7] = __any_sync(0xffffffffu, v > 50);
  o[8] = __all_sync(0xffffffffu, v >= 0);
}

at::Tensor control_collectives(const at::Tensor& x) {
  TORCH_CHECK(x.numel() % 32 == 0 && x.scalar_type() == at::kInt, "x must be int32, a multiple of 32 values");
  at::Tensor out = at::zeros({x.numel(), 9}, x.options());
  Backend::launch(collectives_kernel, {.grid = dim3(x.numel() / 32), .block = 32, .name = "collectives_kernel"},
                  x.data_ptr<int>(), out.data_ptr<int>());
  return out;
}

// A kernel bounded to 256 threads, for launches that break the limits.
__global__ void __launch_bounds__(256) bounded_kernel(int* out) {
  if (threadIdx.x == 0) atomicAdd(out, 1);
}
// One with dynamic shared memory: reverses each block's values through it.
__global__ void reverse_kernel(const float* x, float* out) {
  LMM_FAST_DYNAMIC_SHARED(float, values);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x;
  values[threadIdx.x] = x[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = values[blockDim.x - 1 - threadIdx.x];
}

// block_threads threads per block, grid_x blocks; bound: use bounded_kernel's
// launch bound; shared_bytes > 0 launches reverse_kernel with that much
// dynamic shared memory (opt_in: after raising its limit to that size).
// Returns what the kernel wrote.
at::Tensor control_launch(int64_t grid_x, c10::IntArrayRef block, int64_t shared_bytes, bool opt_in) {
  const dim3 b(block[0], block[1], block[2]);
  if (shared_bytes == 0) {
    at::Tensor out = at::zeros({1}, at::kInt);
    Backend::launch(bounded_kernel,
                    {.grid = dim3(static_cast<unsigned>(grid_x)), .block = b, .launch_bound = 256,
                     .name = "bounded_kernel"},
                    out.data_ptr<int>());
    return out;
  }
  if (opt_in) emu::set_max_dynamic_shared(reinterpret_cast<const void*>(&reverse_kernel), shared_bytes);
  const int64_t n = grid_x * block[0];
  at::Tensor x = at::arange(n, at::kFloat);
  at::Tensor out = at::zeros({n}, at::kFloat);
  Backend::launch(reverse_kernel,
                  {.grid = dim3(static_cast<unsigned>(grid_x)), .block = b,
                   .shared_bytes = static_cast<size_t>(shared_bytes), .name = "reverse_kernel"},
                  x.data_ptr<float>(), out.data_ptr<float>());
  emu::set_max_dynamic_shared(reinterpret_cast<const void*>(&reverse_kernel), 0);
  return out;
}

// Deadlocks. kind 0: only the first warp calls __syncthreads, the others
// return (they never reach it); kind 1: warp 0 waits at __syncthreads
// before it sets the flag that warp 1 spins on, so neither can go on
// (only the timeout ends it); kind 2: lanes 0..15 shuffle with the full
// mask while lanes 16..31 wait at __syncthreads.
__global__ void deadlock_kernel(int kind, int* flag) {
  const int warp = threadIdx.x / 32;
  if (kind == 0) {
    if (warp == 0) __syncthreads();
  } else if (kind == 1) {
    if (warp == 0) {
      __syncthreads();
      atomicExch(flag, 1);
    } else {
      while (atomicAdd(flag, 0) == 0) {
      }
    }
  } else {
    if ((threadIdx.x & 31) < 16) {
      flag[1 + threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
    } else {
      __syncthreads();
    }
  }
}

void control_deadlock(int64_t kind, double timeout) {
  at::Tensor flag = at::zeros({128}, at::kInt);
  const double before = emu::set_deadlock_timeout(timeout);
  try {
    Backend::launch(deadlock_kernel, {.grid = 1, .block = 64, .name = "deadlock_kernel"}, static_cast<int>(kind),
                    flag.data_ptr<int>());
  } catch (...) {
    emu::set_deadlock_timeout(before);
    throw;
  }
  emu::set_deadlock_timeout(before);
}

// Warp 1 spins on a flag that warp 0 sets, with no barrier: it finishes
// only if the warps of a block really run at the same time.
__global__ void handshake_kernel(int* flag, int* out) {
  const int warp = threadIdx.x / 32;
  if (warp == 0) {
    if (threadIdx.x == 0) atomicExch(flag, 1);
  } else {
    while (atomicAdd(flag, 0) == 0) {
    }
    if ((threadIdx.x & 31) == 0) atomicAdd(out, 1);
  }
}

int64_t control_handshake() {
  at::Tensor flag = at::zeros({1}, at::kInt);
  at::Tensor out = at::zeros({1}, at::kInt);
  Backend::launch(handshake_kernel, {.grid = 1, .block = 64, .name = "handshake_kernel"}, flag.data_ptr<int>(),
                  out.data_ptr<int>());
  return out.item<int>();
}

// Histogram of x by atomics from every thread of many blocks.
__global__ void histogram_kernel(const int64_t* x, int64_t n, int64_t* counts) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    atomicAdd(reinterpret_cast<unsigned long long*>(counts + x[i]), 1ull);
  }
}

at::Tensor control_histogram(const at::Tensor& x, int64_t bins) {
  at::Tensor counts = at::zeros({bins}, at::kLong);
  Backend::launch(histogram_kernel, {.grid = 5, .block = 96, .name = "histogram_kernel"}, x.data_ptr<int64_t>(),
                  x.numel(), counts.data_ptr<int64_t>());
  return counts;
}

__global__ void assert_kernel(const int64_t* x, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) CUDA_KERNEL_ASSERT(x[i] >= 0 && "values must be non-negative");
}

void control_kernel_assert(const at::Tensor& x) {
  Backend::launch(assert_kernel, {.grid = dim3((x.numel() + 63) / 64), .block = 64, .name = "assert_kernel"},
                  x.data_ptr<int64_t>(), x.numel());
}

int64_t control_launch_count(c10::optional<c10::string_view> name) {
  return name.has_value() ? emu::launch_count(std::string(*name)) : emu::launch_count();
}

}  // namespace

// Shared-memory atomics: every thread of `threads` adds its index + 1 to one
// shared word; thread 0 reads the total after a __syncthreads (sync) or
// with none (a race with the other threads' atomics, which the checker
// must report).
__global__ void shared_atomic_kernel(bool sync, float* out) {
  LMM_FAST_SHARED(float, total, [1]);
  if (threadIdx.x == 0) total[0] = 0.0f;
  __syncthreads();
  atomicAdd(total[0], static_cast<float>(threadIdx.x + 1));
  if (sync) __syncthreads();
  if (threadIdx.x == 0) out[0] = total[0];
}

at::Tensor control_shared_atomic(int64_t threads, bool sync) {
  at::Tensor out = at::zeros({1}, at::kFloat);
  Backend::launch(shared_atomic_kernel,
                  {.grid = dim3(1), .block = dim3(static_cast<unsigned>(threads)), .name = "shared_atomic_kernel"},
                  sync, out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_FRAGMENT(lmm_fast_emulated, m) {
  m.def("control_indices(int[] grid, int[] block) -> Tensor", &control_indices);
  m.def("control_block_sum(Tensor x, bool sync) -> Tensor", &control_block_sum);
  m.def("control_reuse(Tensor x, bool sync) -> Tensor", &control_reuse);
  m.def("control_shared_index(Tensor x, int shift) -> Tensor", &control_shared_index);
  m.def("control_warp_sum(Tensor x, int mode) -> Tensor", &control_warp_sum);
  m.def("control_collectives(Tensor x) -> Tensor", &control_collectives);
  m.def("control_launch(int grid_x, int[] block, int shared_bytes, bool opt_in) -> Tensor", &control_launch);
  m.def("control_deadlock(int kind, float timeout) -> ()", &control_deadlock);
  m.def("control_handshake() -> int", &control_handshake);
  m.def("control_histogram(Tensor x, int bins) -> Tensor", &control_histogram);
  m.def("control_kernel_assert(Tensor x) -> ()", &control_kernel_assert);
  m.def("control_launch_count(str? name=None) -> int", &control_launch_count);
  m.def("control_shared_atomic(int threads, bool sync) -> Tensor", &control_shared_atomic);
}

}  // namespace lmm_fast
