// CUDA kernels of the collapsed Gibbs sampler of group labels (paper Eq. 4) and
// of the Psi-from-counts update (Eq. 6, factored as psi_t * psi_scale).
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
#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>

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

LevelTable make_level_table(const Geometry& g) {
  TORCH_CHECK(g.num_upper() <= kMaxUpperLevels, "lmm_fast: the CUDA Gibbs sampler supports at "
              "most ", kMaxUpperLevels, " upper levels, got ", g.num_upper());
  LevelTable table{};
  for (int64_t l = 0; l < g.num_upper(); ++l) {
    table.offsets[l] = g.offsets[l];
    table.sizes[l] = g.sizes[l];
  }
  table.num_upper = static_cast<int>(g.num_upper());
  table.upper_width = g.upper_width;
  table.num_classes = g.num_classes;
  return table;
}

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
  CUDA_KERNEL_ASSERT(y >= 0 && y < levels.num_classes && "lmm_fast: target out of range");
  CUDA_KERNEL_ASSERT(old >= 0 && old < n && "lmm_fast: old label out of range");
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
    CUDA_KERNEL_ASSERT(y >= 0 && y < levels.num_classes && "lmm_fast: target out of range");
    for (int l = 0; l < num_upper; ++l) {
      const int64_t n = levels.sizes[l];
      const int64_t offset = levels.offsets[l];
      const int64_t old = old_labels[b * num_upper + l];
      CUDA_KERNEL_ASSERT(old >= 0 && old < n && "lmm_fast: old label out of range");
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
    CUDA_KERNEL_ASSERT(c >= 0 && c < width && "lmm_fast: column out of range");
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
    CUDA_KERNEL_ASSERT(y >= 0 && y < n && "lmm_fast: row out of range");
    CUDA_KERNEL_ASSERT(c >= 0 && c < width && "lmm_fast: column out of range");
    psi[y * width + c] = static_cast<scalar_t>(gibbs::psi_numerator(counts[y * width + c], beta[y]));
    scale[c] = static_cast<scalar_t>(gibbs::psi_group_scale(totals[c], beta0));
  }
}

using Prepared = gibbs::PreparedSample;
using gibbs::prepare_sample_inputs;

at::Tensor gibbs_sample_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                             const at::Tensor& old_labels_in, const at::Tensor& counts_t,
                             const at::Tensor& group_totals, const at::Tensor& beta_in,
                             double beta0, c10::IntArrayRef level_sizes, int64_t seed,
                             int64_t step, const at::Tensor& image_ids_in) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Prepared p = prepare_sample_inputs(logits_in, target_in, old_labels_in, counts_t,
                                           group_totals, beta_in, beta0, level_sizes, image_ids_in);
  const Geometry& g = p.geo;
  at::Tensor out = at::empty({g.batch, g.num_upper()}, p.old_labels.options());
  if (g.batch == 0) return out;
  const LevelTable levels = make_level_table(g);
  const int64_t tasks = g.batch * g.num_upper();
  const int64_t blocks = (tasks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lmm_fast: batch too large for one "
              "launch: ", g.batch, " images");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "gibbs_sample_cuda", [&] {
    gibbs_sample_kernel<scalar_t><<<static_cast<unsigned>(blocks), kWarp * kWarpsPerBlock, 0,
                                    stream>>>(
        p.logits.data_ptr<scalar_t>(), p.logits.stride(0), p.target.data_ptr<int64_t>(),
        p.old_labels.data_ptr<int64_t>(), counts_t.data_ptr<int32_t>(),
        group_totals.data_ptr<int32_t>(), p.beta.data_ptr<float>(), static_cast<float>(beta0),
        levels, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
        p.image_ids.data_ptr<int64_t>(), g.batch, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gibbs_sample_exact_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                   const at::Tensor& old_labels_in, at::Tensor& counts_t,
                                   at::Tensor& group_totals, const at::Tensor& beta_in,
                                   double beta0, c10::IntArrayRef level_sizes, int64_t seed,
                                   int64_t step, const at::Tensor& image_ids_in) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Prepared p = prepare_sample_inputs(logits_in, target_in, old_labels_in, counts_t,
                                           group_totals, beta_in, beta0, level_sizes, image_ids_in);
  const Geometry& g = p.geo;
  at::Tensor out = at::empty({g.batch, g.num_upper()}, p.old_labels.options());
  if (g.batch == 0) return out;
  const LevelTable levels = make_level_table(g);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "gibbs_sample_exact_cuda", [&] {
    gibbs_sample_exact_kernel<scalar_t><<<1, kWarp, 0, stream>>>(
        p.logits.data_ptr<scalar_t>(), p.logits.stride(0), p.target.data_ptr<int64_t>(),
        p.old_labels.data_ptr<int64_t>(), counts_t.data_ptr<int32_t>(),
        group_totals.data_ptr<int32_t>(), p.beta.data_ptr<float>(), static_cast<float>(beta0),
        levels, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
        p.image_ids.data_ptr<int64_t>(), g.batch, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void gibbs_refresh_psi_cuda(at::Tensor& psi_t, at::Tensor& psi_scale, const at::Tensor& counts_t,
                            const at::Tensor& group_totals, const at::Tensor& beta_in,
                            double beta0, const at::Tensor& columns_in) {
  gibbs::check_refresh_inputs(psi_t, psi_scale, counts_t, group_totals, beta_in, beta0);
  gibbs::check_index_vector(psi_t, columns_in, "columns");
  const c10::cuda::CUDAGuard guard(psi_t.device());
  const at::Tensor columns = columns_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const int64_t rows = psi_t.size(0);
  const int64_t ncols = columns.numel();
  if (rows == 0 || ncols == 0) return;
  constexpr int kThreads = 256;
  const int64_t needed = (rows * ncols + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(needed, 65535 * 8));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_refresh_psi_cuda", [&] {
    gibbs_refresh_psi_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        psi_t.data_ptr<scalar_t>(), psi_scale.data_ptr<scalar_t>(), counts_t.data_ptr<int32_t>(),
        group_totals.data_ptr<int32_t>(), beta.data_ptr<float>(), beta0,
        columns.data_ptr<int64_t>(), ncols, rows, psi_t.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void gibbs_refresh_psi_entries_cuda(at::Tensor& psi_t, at::Tensor& psi_scale,
                                    const at::Tensor& counts_t, const at::Tensor& group_totals,
                                    const at::Tensor& beta_in, double beta0,
                                    const at::Tensor& rows_in, const at::Tensor& columns_in) {
  gibbs::check_refresh_inputs(psi_t, psi_scale, counts_t, group_totals, beta_in, beta0);
  gibbs::check_index_vector(psi_t, rows_in, "rows");
  gibbs::check_index_vector(psi_t, columns_in, "columns");
  TORCH_CHECK(rows_in.numel() == columns_in.numel(), "lmm_fast: rows and columns must have the same "
              "length, got ", rows_in.numel(), " and ", columns_in.numel());
  const c10::cuda::CUDAGuard guard(psi_t.device());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor columns = columns_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const int64_t count = rows.numel();
  if (count == 0) return;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>((count + kThreads - 1) / kThreads, 65535 * 8));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_refresh_psi_entries_cuda", [&] {
    gibbs_refresh_psi_entries_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        psi_t.data_ptr<scalar_t>(), psi_scale.data_ptr<scalar_t>(), counts_t.data_ptr<int32_t>(),
        group_totals.data_ptr<int32_t>(), beta.data_ptr<float>(), beta0,
        rows.data_ptr<int64_t>(), columns.data_ptr<int64_t>(), count, psi_t.size(0), psi_t.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One thread per (image, upper level): integer atomics, so the counts do not
// depend on the order of the threads. Values are checked by device asserts,
// like the sampler's (a host check would cost a synchronisation per step).
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
    CUDA_KERNEL_ASSERT(y >= 0 && y < levels.num_classes && "lmm_fast: target out of range");
    CUDA_KERNEL_ASSERT(id >= 0 && id < images && "lmm_fast: image_ids out of range");
    CUDA_KERNEL_ASSERT(from >= 0 && from < levels.sizes[l] && "lmm_fast: old_labels out of range");
    CUDA_KERNEL_ASSERT(to >= 0 && to < levels.sizes[l] && "lmm_fast: new_labels out of range");
    labels[id * levels.num_upper + l] = to;
    if (from == to) continue;
    int32_t* row = counts + y * levels.upper_width + levels.offsets[l];
    atomicSub(row + from, 1);
    atomicAdd(row + to, 1);
    atomicSub(totals + levels.offsets[l] + from, 1);
    atomicAdd(totals + levels.offsets[l] + to, 1);
  }
}

void gibbs_apply_moves_cuda(at::Tensor& counts_t, at::Tensor& group_totals, at::Tensor& labels,
                            const at::Tensor& target_in, const at::Tensor& image_ids_in,
                            const at::Tensor& old_in, const at::Tensor& new_in,
                            c10::IntArrayRef level_sizes) {
  const Geometry g = gibbs::check_apply_moves_inputs(counts_t, group_totals, labels, target_in,
                                                     image_ids_in, old_in, new_in, level_sizes);
  if (g.batch == 0) return;
  const c10::cuda::CUDAGuard guard(counts_t.device());
  const LevelTable levels = make_level_table(g);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor ids = image_ids_in.contiguous();
  const at::Tensor olds = old_in.contiguous();
  const at::Tensor news = new_in.contiguous();
  constexpr int kThreads = 256;
  const int64_t tasks = g.batch * g.num_upper();
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((tasks + kThreads - 1) / kThreads, 65535 * 8));
  gibbs_apply_moves_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      counts_t.data_ptr<int32_t>(), group_totals.data_ptr<int32_t>(), labels.data_ptr<int64_t>(),
      target.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), olds.data_ptr<int64_t>(),
      news.data_ptr<int64_t>(), levels, g.batch, labels.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The same answers from a few ATen ops on the device (a sort for the
// repeats); the caller reads the 3 numbers with one synchronisation.
at::Tensor gibbs_check_batch_cuda(const at::Tensor& indices, const at::Tensor& target,
                                  const at::Tensor& train_targets) {
  gibbs::check_batch_inputs(indices, target, train_targets);
  const c10::cuda::CUDAGuard guard(indices.device());
  const int64_t batch = indices.numel();
  const int64_t images = train_targets.numel();
  const auto none = at::full({1}, -1, indices.options());
  if (batch == 0) return none.expand({3}).clone();
  const auto positions = at::arange(batch, indices.options());
  // the first position where `bad` holds, or -1
  const auto first = [&](const at::Tensor& bad) {
    return at::where(bad, positions, at::full_like(positions, batch)).min().where(bad.any(), none[0]);
  };
  const at::Tensor out_of_range = (indices < 0).logical_or(indices >= images);
  const at::Tensor wrong =
      images == 0 ? at::zeros_like(out_of_range)
                  : train_targets.index_select(0, indices.clamp(0, images - 1))
                        .ne(target)
                        .logical_and(out_of_range.logical_not());
  const at::Tensor sorted = std::get<0>(indices.sort());
  const at::Tensor same = sorted.narrow(0, 1, batch - 1).eq(sorted.narrow(0, 0, batch - 1));
  const at::Tensor repeated = batch > 1
      ? at::where(same, sorted.narrow(0, 1, batch - 1),
                  at::full_like(same, std::numeric_limits<int64_t>::max(), indices.options()))
            .min().where(same.any(), none[0])
      : none[0];
  return at::stack({first(out_of_range), repeated, first(wrong)});
}

}  // namespace

// gibbs_update_owners has its own kernels and registration in
// gibbs_owners_cuda.cu (the phases of gibbs_owners_parallel.h).
TORCH_LIBRARY_IMPL(lmm_fast, CUDA, m) {
  m.impl("gibbs_sample", &gibbs_sample_cuda);
  m.impl("gibbs_sample_exact", &gibbs_sample_exact_cuda);
  m.impl("gibbs_refresh_psi", &gibbs_refresh_psi_cuda);
  m.impl("gibbs_refresh_psi_entries", &gibbs_refresh_psi_entries_cuda);
  m.impl("gibbs_apply_moves", &gibbs_apply_moves_cuda);
  m.impl("gibbs_check_batch", &gibbs_check_batch_cuda);
}

}  // namespace lmm_fast
