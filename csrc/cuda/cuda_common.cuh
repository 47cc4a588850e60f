// Device pieces shared by the CUDA loss and prediction kernels: the level
// table passed by value to every kernel, and the online log-sum-exp
// accumulators with their warp and block reductions. Included by the kernel
// headers (csrc/cuda/*_kernels.cuh), for nvcc and for the emulation.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>

#include "cuda/device_compat.cuh"

#include "loss_common.h"

namespace lmm_fast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kMaxLevels = 16;

struct DeviceLevels {
  int64_t offsets[kMaxLevels];
  int64_t sizes[kMaxLevels];
  int num_levels;
  int64_t width;
  int64_t upper_width;
  int64_t num_classes;
  int64_t theta_row_stride;  // 0: one theta for all rows; L: one per row
};

// what names the kernel family in the error ("loss", "prediction").
inline DeviceLevels make_device_levels(const LossGeometry& g, const char* what) {
  TORCH_CHECK(g.num_levels() <= kMaxLevels,
      "lmm_fast: the CUDA ", what, " supports at most ", kMaxLevels, " levels, got ",
      g.num_levels());
  DeviceLevels info{};
  for (int64_t l = 0; l < g.num_levels(); ++l) {
    info.offsets[l] = g.offsets[l];
    info.sizes[l] = g.sizes[l];
  }
  info.num_levels = static_cast<int>(g.num_levels());
  info.width = g.width;
  info.upper_width = g.upper_width;
  info.num_classes = g.num_classes;
  info.theta_row_stride = g.theta_row_stride;
  return info;
}

template <typename A>
__device__ __forceinline__ A neg_inf() { return -INFINITY; }

template <typename A>
__device__ __forceinline__ A fast_exp(A x) { return exp(x); }
template <>
__device__ __forceinline__ float fast_exp<float>(float x) { return __expf(x); }

// Merges two online log-sum-exp accumulators (max m, sum s of exp(x - m)).
template <typename A>
__device__ __forceinline__ void merge_lse(A& m, A& s, A om, A os) {
  if (om == neg_inf<A>()) return;
  if (m == neg_inf<A>()) { m = om; s = os; return; }
  if (om > m) {
    s = s * fast_exp(m - om) + os;
    m = om;
  } else {
    s += os * fast_exp(om - m);
  }
}

template <typename A>
__device__ __forceinline__ void add_lse(A& m, A& s, A x, A weight) {
  // A masked (-inf) logit adds nothing; without this, -inf - -inf is NaN.
  if (x == neg_inf<A>()) return;
  if (x > m) {
    s = s * fast_exp(m - x) + weight;
    m = x;
  } else {
    s += weight * fast_exp(x - m);
  }
}

template <typename A>
__device__ __forceinline__ void warp_merge_lse(A& m, A& s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    A om = __shfl_xor_sync(0xffffffff, m, offset);
    A os = __shfl_xor_sync(0xffffffff, s, offset);
    merge_lse(m, s, om, os);
  }
}

// Block-wide merge of kPairs (max, sum) pairs; every thread gets the result.
// Every thread of the block must call it (it synchronises, and leaves the
// shared buffer free for the next call).
template <typename A, int kPairs>
__device__ __forceinline__ void block_merge_lse(A (&m)[kPairs], A (&s)[kPairs]) {
  LMM_FAST_SHARED(A, shared_m, [kPairs][kThreads / 32]);
  LMM_FAST_SHARED(A, shared_s, [kPairs][kThreads / 32]);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kPairs; ++k) warp_merge_lse(m[k], s[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      shared_m[k][warp] = m[k];
      shared_s[k][warp] = s[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kPairs; ++k) {
    A mm = neg_inf<A>();
    A ss = A(0);
    for (int w = 0; w < kThreads / 32; ++w) merge_lse<A>(mm, ss, shared_m[k][w], shared_s[k][w]);
    m[k] = mm;
    s[k] = ss;
  }
  __syncthreads();
}

// Block-wide sum; every thread gets the result. Every thread of the block
// must call it (it synchronises, and leaves the shared buffer free).
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  LMM_FAST_SHARED(A, shared_sum, [kThreads / 32]);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  if ((threadIdx.x & 31) == 0) shared_sum[threadIdx.x >> 5] = v;
  __syncthreads();
  A total = A(0);
  for (int w = 0; w < kThreads / 32; ++w) total += shared_sum[w];
  __syncthreads();
  return total;
}

}  // namespace cuda
}  // namespace lmm_fast
