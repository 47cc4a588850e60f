// Kernels of the collapsed Gibbs sampler of group labels (paper Eq. 4), of
// the Psi-from-counts update (Eq. 6, factored as psi_t * psi_scale) and of
// the count moves, compiled by nvcc for gibbs_cuda.cu and as host C++ for
// the emulated backend of the tests (csrc/emulation); gibbs_launch.h
// launches them, after checking every value they index with on the host.
//
// Batched sampler: one warp per (image, upper level). The warp reads the
// level's logits and the image's class row of the class-major counts
// coalesced: a max pass, a pass for the largest weight, then each lane sums
// the fixed-point weights of a contiguous chunk, a warp scan of the 32 chunk
// sums gives the total, and the one lane whose chunk holds the drawn target
// walks it. Max and integer sums do not depend on the order of evaluation, so
// the label is bit-identical to the CPU kernel's (gibbs_common.h).
//
// Exact sampler: a single warp walks the batch in order, running the same
// per-image routine and updating the counts in global memory between images.
// It is sequential by definition and meant as the oracle, not for speed.
#pragma once

#include <cstdint>

#include "cuda/device_compat.cuh"
#include "gibbs_common.h"

namespace lmm_fast {
namespace {

using gibbs::Geometry;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxUpperLevels = 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct LevelTable {
  int64_t offsets[kMaxUpperLevels];
  int64_t sizes[kMaxUpperLevels];
  int num_upper;
  int64_t upper_width;
  int64_t num_classes;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float o = __shfl_xor_sync(kFullMask, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// The weight of candidate t, excluding the image's own label `old` (Eq. 4).
struct Candidates {
  const int32_t* counts;  // the image's class row of counts_t, at the level's offset
  const int32_t* totals;  // group_totals at the level's offset
  float beta_y;
  float beta0;
  int64_t old;

  __device__ __forceinline__ float weight(float logit, float max_logit, int64_t t) const {
    const int32_t own = t == old ? 1 : 0;
    return gibbs::candidate_weight(logit, max_logit, counts[t] - own,
                                   gibbs::group_reciprocal(totals[t] - own, beta0), beta_y);
  }
};

// Every lane of the warp calls this with the same arguments and gets the label.
template <typename T>
__device__ int64_t warp_sample(const T* x, int64_t n, const Candidates& c, uint64_t random,
                               int lane) {
  float max_logit = -INFINITY;
  for (int64_t t = lane; t < n; t += kWarp) {
    const float v = static_cast<float>(x[t]);
    max_logit = v > max_logit ? v : max_logit;
  }
  max_logit = warp_max(max_logit);

  float max_weight = 0.0f;
  for (int64_t t = lane; t < n; t += kWarp) {
    const float w = c.weight(static_cast<float>(x[t]), max_logit, t);
    max_weight = w > max_weight ? w : max_weight;
  }
  max_weight = warp_max(max_weight);
  if (!(max_weight > 0.0f)) return c.old;  // no finite logit: nothing to sample from
  const double scale = gibbs::fixed_point_scale(max_weight);

  const int64_t chunk = (n + kWarp - 1) / kWarp;
  const int64_t begin = min(n, lane * chunk);
  const int64_t end = min(n, begin + chunk);
  uint64_t own = 0;
  for (int64_t t = begin; t < end; ++t) {
    own += gibbs::quantize(c.weight(static_cast<float>(x[t]), max_logit, t), scale);
  }
  uint64_t inclusive = own;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const uint64_t v = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  const uint64_t total = __shfl_sync(kFullMask, inclusive, kWarp - 1);
  const uint64_t target = gibbs::scale_draw(random, total);
  const uint64_t exclusive = inclusive - own;
  const bool mine = exclusive <= target && target < inclusive;
  int64_t found = c.old;
  if (mine) {
    uint64_t prefix = exclusive;
    for (int64_t t = begin; t < end; ++t) {
      prefix += gibbs::quantize(c.weight(static_cast<float>(x[t]), max_logit, t), scale);
      if (prefix > target) {
        found = t;
        break;
      }
    }
  }
  // Exactly one lane holds the target: chunk intervals partition [0, total).
  const unsigned holders = __ballot_sync(kFullMask, mine);
  return __shfl_sync(kFullMask, found, __ffs(holders) - 1);
}

template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock) gibbs_sample_kernel(
    const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ target,
    const int64_t* __restrict__ old_labels, const int32_t* __restrict__ counts_t,
    const int32_t* __restrict__ totals, const float* __restrict__ beta, float beta0,
    LevelTable levels, uint64_t seed, uint64_t step, const int64_t* __restrict__ image_ids,
    int64_t batch, int64_t* __restrict__ out) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x / kWarp);
  const int num_upper = levels.num_upper;
  if (task >= batch * num_upper) return;  // warp-uniform
  const int64_t b = task / num_upper;
  const int l = static_cast<int>(task % num_upper);
  const int64_t y = target[b];
  const int64_t n = levels.sizes[l];
  const int64_t offset = levels.offsets[l];
  const int64_t old = old_labels[task];
  const Candidates c{counts_t + y * levels.upper_width + offset, totals + offset, beta[y], beta0,
                     old};
  const uint64_t random =
      gibbs::label_draw(seed, step, static_cast<uint64_t>(image_ids[b]), static_cast<uint32_t>(l));
  const int64_t label = warp_sample(logits + b * row_stride + offset, n, c, random, lane);
  if (lane == 0) out[task] = label;
}

// One warp; counts and totals are read back after every update, so no
// read-only (non-coherent) loads on them.
template <typename T>
__global__ void __launch_bounds__(kWarp) gibbs_sample_exact_kernel(
    const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ target,
    const int64_t* __restrict__ old_labels, int32_t* counts_t, int32_t* totals,
    const float* __restrict__ beta, float beta0, LevelTable levels, uint64_t seed, uint64_t step,
    const int64_t* __restrict__ image_ids, int64_t batch, int64_t* __restrict__ out) {
  const int lane = threadIdx.x;
  const int num_upper = levels.num_upper;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t y = target[b];
    for (int l = 0; l < num_upper; ++l) {
      const int64_t n = levels.sizes[l];
      const int64_t offset = levels.offsets[l];
      const int64_t old = old_labels[b * num_upper + l];
      int32_t* row = counts_t + y * levels.upper_width + offset;
      const Candidates c{row, totals + offset, beta[y], beta0, old};
      const uint64_t random = gibbs::label_draw(seed, step, static_cast<uint64_t>(image_ids[b]),
                                                static_cast<uint32_t>(l));
      const int64_t label = warp_sample(logits + b * row_stride + offset, n, c, random, lane);
      if (lane == 0) {
        out[b * num_upper + l] = label;
        if (label != old) {
          row[old] -= 1;
          row[label] += 1;
          totals[offset + old] -= 1;
          totals[offset + label] += 1;
        }
      }
      // Orders lane 0's count updates before every lane's next reads.
      __syncwarp();
    }
  }
}

// Whole columns of the factored Eq. 6 (see gibbs_refresh_psi_cpu); the thread
// of a column's row 0 also writes the column's factor.
template <typename scalar_t>
__global__ void gibbs_refresh_psi_kernel(scalar_t* __restrict__ psi, scalar_t* __restrict__ scale,
                                         const int32_t* __restrict__ counts,
                                         const int32_t* __restrict__ totals,
                                         const float* __restrict__ beta, double beta0,
                                         const int64_t* __restrict__ columns, int64_t ncols,
                                         int64_t rows, int64_t width) {
  const int64_t count = rows * ncols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t y = i / ncols;
    const int64_t c = columns[i - y * ncols];
    psi[y * width + c] = static_cast<scalar_t>(gibbs::psi_numerator(counts[y * width + c], beta[y]));
    if (y == 0) scale[c] = static_cast<scalar_t>(gibbs::psi_group_scale(totals[c], beta0));
  }
}

// Single entries of the factored Eq. 6 (see gibbs_refresh_psi_entries_cpu).
// Repeated pairs write the same bits, so their order does not matter.
template <typename scalar_t>
__global__ void gibbs_refresh_psi_entries_kernel(scalar_t* __restrict__ psi, scalar_t* __restrict__ scale,
                                                 const int32_t* __restrict__ counts,
                                                 const int32_t* __restrict__ totals,
                                                 const float* __restrict__ beta, double beta0,
                                                 const int64_t* __restrict__ rows,
                                                 const int64_t* __restrict__ columns, int64_t count,
                                                 int64_t n, int64_t width) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t y = rows[i];
    const int64_t c = columns[i];
    psi[y * width + c] = static_cast<scalar_t>(gibbs::psi_numerator(counts[y * width + c], beta[y]));
    scale[c] = static_cast<scalar_t>(gibbs::psi_group_scale(totals[c], beta0));
  }
}

// One thread per (image, upper level): integer atomics, so the counts do not
// depend on the order of the threads.
__global__ void gibbs_apply_moves_kernel(int32_t* __restrict__ counts, int32_t* __restrict__ totals,
                                         int64_t* __restrict__ labels,
                                         const int64_t* __restrict__ target,
                                         const int64_t* __restrict__ ids,
                                         const int64_t* __restrict__ olds,
                                         const int64_t* __restrict__ news, LevelTable levels,
                                         int64_t batch, int64_t images) {
  const int64_t tasks = batch * levels.num_upper;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < tasks;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = k / levels.num_upper;
    const int l = static_cast<int>(k - b * levels.num_upper);
    const int64_t y = target[b];
    const int64_t id = ids[b];
    const int64_t from = olds[k];
    const int64_t to = news[k];
    labels[id * levels.num_upper + l] = to;
    if (from == to) continue;
    int32_t* row = counts + y * levels.upper_width + levels.offsets[l];
    atomicSub(row + from, 1);
    atomicAdd(row + to, 1);
    atomicSub(totals + levels.offsets[l] + from, 1);
    atomicAdd(totals + levels.offsets[l] + to, 1);
  }
}

}  // namespace
}  // namespace lmm_fast
