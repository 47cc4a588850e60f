// Host side of the CUDA Gibbs ops, written once for both backends: checks,
// allocations, dtype dispatch and launches of gibbs_kernels.cuh. Backend is
// CudaBackend (gibbs_cuda.cu) or the tests' EmulatedBackend.
//
// Host syncs per call: one, the read back of the value checks (target,
// image ids, labels, rows, columns), skipped for an empty batch;
// gibbs_check_batch's caller reads its 3 numbers with one.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <limits>

#include "cuda/gibbs_kernels.cuh"
#include "gibbs_common.h"

namespace lmm_fast {
namespace {

constexpr int kGibbsThreads = 256;  // the grid-stride kernels' block

inline LevelTable make_level_table(const Geometry& g) {
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

inline unsigned grid_stride_blocks(int64_t count) {
  return static_cast<unsigned>(std::min<int64_t>((count + kGibbsThreads - 1) / kGibbsThreads, 65535 * 8));
}

template <class Backend>
at::Tensor gibbs_sample_launch(const at::Tensor& logits_in, const at::Tensor& target_in,
                               const at::Tensor& old_labels_in, const at::Tensor& counts_t,
                               const at::Tensor& group_totals, const at::Tensor& beta_in, double beta0,
                               c10::IntArrayRef level_sizes, int64_t seed, int64_t step,
                               const at::Tensor& image_ids_in) {
  const typename Backend::Guard guard(logits_in.device());
  const gibbs::PreparedSample p = gibbs::prepare_sample_inputs(
      logits_in, target_in, old_labels_in, counts_t, group_totals, beta_in, beta0, level_sizes, image_ids_in);
  const Geometry& g = p.geo;
  at::Tensor out = at::empty({g.batch, g.num_upper()}, p.old_labels.options());
  if (g.batch == 0) return out;
  const LevelTable levels = make_level_table(g);
  const int64_t tasks = g.batch * g.num_upper();
  const int64_t blocks = (tasks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lmm_fast: batch too large for one "
              "launch: ", g.batch, " images");
  gibbs::check_sample_values(g, p.target, p.old_labels, p.image_ids);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "gibbs_sample_cuda", [&] {
    Backend::launch(gibbs_sample_kernel<scalar_t>,
                    {.grid = dim3(static_cast<unsigned>(blocks)), .block = kWarp * kWarpsPerBlock,
                     .launch_bound = kWarp * kWarpsPerBlock, .name = "gibbs_sample_kernel"},
                    p.logits.data_ptr<scalar_t>(), p.logits.stride(0), p.target.data_ptr<int64_t>(),
                    p.old_labels.data_ptr<int64_t>(), counts_t.data_ptr<int32_t>(),
                    group_totals.data_ptr<int32_t>(), p.beta.data_ptr<float>(), static_cast<float>(beta0),
                    levels, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                    p.image_ids.data_ptr<int64_t>(), g.batch, out.data_ptr<int64_t>());
  });
  return out;
}

template <class Backend>
at::Tensor gibbs_sample_exact_launch(const at::Tensor& logits_in, const at::Tensor& target_in,
                                     const at::Tensor& old_labels_in, at::Tensor& counts_t,
                                     at::Tensor& group_totals, const at::Tensor& beta_in, double beta0,
                                     c10::IntArrayRef level_sizes, int64_t seed, int64_t step,
                                     const at::Tensor& image_ids_in) {
  const typename Backend::Guard guard(logits_in.device());
  const gibbs::PreparedSample p = gibbs::prepare_sample_inputs(
      logits_in, target_in, old_labels_in, counts_t, group_totals, beta_in, beta0, level_sizes, image_ids_in);
  const Geometry& g = p.geo;
  at::Tensor out = at::empty({g.batch, g.num_upper()}, p.old_labels.options());
  if (g.batch == 0) return out;
  const LevelTable levels = make_level_table(g);
  gibbs::check_sample_values(g, p.target, p.old_labels, p.image_ids);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "gibbs_sample_exact_cuda", [&] {
    Backend::launch(gibbs_sample_exact_kernel<scalar_t>,
                    {.grid = 1, .block = kWarp, .launch_bound = kWarp, .name = "gibbs_sample_exact_kernel"},
                    p.logits.data_ptr<scalar_t>(), p.logits.stride(0), p.target.data_ptr<int64_t>(),
                    p.old_labels.data_ptr<int64_t>(), counts_t.data_ptr<int32_t>(),
                    group_totals.data_ptr<int32_t>(), p.beta.data_ptr<float>(), static_cast<float>(beta0),
                    levels, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                    p.image_ids.data_ptr<int64_t>(), g.batch, out.data_ptr<int64_t>());
  });
  return out;
}

template <class Backend>
void gibbs_refresh_psi_launch(at::Tensor& psi_t, at::Tensor& psi_scale, const at::Tensor& counts_t,
                              const at::Tensor& group_totals, const at::Tensor& beta_in, double beta0,
                              const at::Tensor& columns_in) {
  gibbs::check_refresh_inputs(psi_t, psi_scale, counts_t, group_totals, beta_in, beta0);
  gibbs::check_index_vector(psi_t, columns_in, "columns");
  const typename Backend::Guard guard(psi_t.device());
  const at::Tensor columns = columns_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const int64_t rows = psi_t.size(0);
  const int64_t ncols = columns.numel();
  if (rows == 0 || ncols == 0) return;
  gibbs::check_index_values(columns, psi_t.size(1), "columns");
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_refresh_psi_cuda", [&] {
    Backend::launch(gibbs_refresh_psi_kernel<scalar_t>,
                    {.grid = grid_stride_blocks(rows * ncols), .block = kGibbsThreads,
                     .name = "gibbs_refresh_psi_kernel"},
                    psi_t.data_ptr<scalar_t>(), psi_scale.data_ptr<scalar_t>(), counts_t.data_ptr<int32_t>(),
                    group_totals.data_ptr<int32_t>(), beta.data_ptr<float>(), beta0,
                    columns.data_ptr<int64_t>(), ncols, rows, psi_t.size(1));
  });
}

template <class Backend>
void gibbs_refresh_psi_entries_launch(at::Tensor& psi_t, at::Tensor& psi_scale, const at::Tensor& counts_t,
                                      const at::Tensor& group_totals, const at::Tensor& beta_in, double beta0,
                                      const at::Tensor& rows_in, const at::Tensor& columns_in) {
  gibbs::check_refresh_inputs(psi_t, psi_scale, counts_t, group_totals, beta_in, beta0);
  gibbs::check_index_vector(psi_t, rows_in, "rows");
  gibbs::check_index_vector(psi_t, columns_in, "columns");
  TORCH_CHECK(rows_in.numel() == columns_in.numel(), "lmm_fast: rows and columns must have the same "
              "length, got ", rows_in.numel(), " and ", columns_in.numel());
  const typename Backend::Guard guard(psi_t.device());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor columns = columns_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const int64_t count = rows.numel();
  if (count == 0) return;
  gibbs::check_entry_values(rows, columns, psi_t.size(0), psi_t.size(1));
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_refresh_psi_entries_cuda", [&] {
    Backend::launch(gibbs_refresh_psi_entries_kernel<scalar_t>,
                    {.grid = grid_stride_blocks(count), .block = kGibbsThreads,
                     .name = "gibbs_refresh_psi_entries_kernel"},
                    psi_t.data_ptr<scalar_t>(), psi_scale.data_ptr<scalar_t>(), counts_t.data_ptr<int32_t>(),
                    group_totals.data_ptr<int32_t>(), beta.data_ptr<float>(), beta0,
                    rows.data_ptr<int64_t>(), columns.data_ptr<int64_t>(), count, psi_t.size(0), psi_t.size(1));
  });
}

template <class Backend>
void gibbs_apply_moves_launch(at::Tensor& counts_t, at::Tensor& group_totals, at::Tensor& labels,
                              const at::Tensor& target_in, const at::Tensor& image_ids_in,
                              const at::Tensor& old_in, const at::Tensor& new_in, c10::IntArrayRef level_sizes) {
  const Geometry g = gibbs::check_apply_moves_inputs(counts_t, group_totals, labels, target_in,
                                                     image_ids_in, old_in, new_in, level_sizes);
  if (g.batch == 0) return;
  const typename Backend::Guard guard(counts_t.device());
  const LevelTable levels = make_level_table(g);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor ids = image_ids_in.contiguous();
  const at::Tensor olds = old_in.contiguous();
  const at::Tensor news = new_in.contiguous();
  gibbs::check_moves_values(g, target, ids, olds, news, labels.size(0));
  Backend::launch(gibbs_apply_moves_kernel,
                  {.grid = grid_stride_blocks(g.batch * g.num_upper()), .block = kGibbsThreads,
                   .name = "gibbs_apply_moves_kernel"},
                  counts_t.data_ptr<int32_t>(), group_totals.data_ptr<int32_t>(), labels.data_ptr<int64_t>(),
                  target.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), olds.data_ptr<int64_t>(),
                  news.data_ptr<int64_t>(), levels, g.batch, labels.size(0));
}

// The answers of the CPU op from a few ATen ops on the tensors' device (a
// sort for the repeats); the caller reads the 3 numbers with one sync.
template <class Backend>
at::Tensor gibbs_check_batch_launch(const at::Tensor& indices, const at::Tensor& target,
                                    const at::Tensor& train_targets) {
  gibbs::check_batch_inputs(indices, target, train_targets);
  const typename Backend::Guard guard(indices.device());
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
}  // namespace lmm_fast
