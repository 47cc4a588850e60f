// Host side of CUDA prediction, written once for both backends: the checks,
// allocations, dtype dispatch and launches of predict_kernels.cuh (and the
// GEMM and top-k they are combined with). Backend is CudaBackend
// (predict_cuda.cu) or the tests' EmulatedBackend.
//
// Host syncs per call: one for the tree ops and the top k (the group_index
// check), one for the gathered scores (the rows check), none for the dense op.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/predict_kernels.cuh"
#include "predict_common.h"

namespace lmm_fast {
namespace {

inline void check_grid(const LossGeometry& g) {
  TORCH_CHECK(g.batch <= 2147483647LL,
      "lmm_fast: the CUDA prediction handles at most 2^31 - 1 rows per call, got ", g.batch);
}

template <class Backend>
at::Tensor predict_tree_impl(const at::Tensor& logits_in, const at::Tensor& group_index_in,
                             const at::Tensor& group_value_in, const at::Tensor& theta_in,
                             const LossGeometry& g) {
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor group_index = group_index_in.contiguous();
  const at::Tensor group_value = group_value_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  const auto acc = accumulate_type(logits.scalar_type());
  at::Tensor out = at::empty({g.batch, g.num_classes}, logits.options());
  if (g.batch == 0) return out;
  check_grid(g);
  check_group_index_values(group_index, g);
  at::Tensor scratch = at::empty({g.batch, std::max<int64_t>(g.upper_width, 1)}, logits.options().dtype(acc));
  const DeviceLevels info = cuda::make_device_levels(g, "prediction");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_predict_proba_tree_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Backend::launch(predict_tree_kernel<scalar_t, A>,
                    {.grid = dim3(static_cast<unsigned>(g.batch)), .block = kThreads, .launch_bound = kThreads,
                     .name = "predict_tree_kernel"},
                    logits.data_ptr<scalar_t>(), logits.stride(0), group_index.data_ptr<int32_t>(),
                    group_value.data_ptr<A>(), theta.data_ptr<A>(), info, scratch.data_ptr<A>(),
                    out.data_ptr<scalar_t>());
  });
  return out;
}

template <class Backend>
at::Tensor lmm_predict_proba_tree_launch(const at::Tensor& logits, const at::Tensor& group_index,
                                         const at::Tensor& group_value, const at::Tensor& theta,
                                         c10::IntArrayRef level_sizes) {
  const LossGeometry g = check_predict_inputs(logits, theta, level_sizes);
  check_tree_index(group_index, group_value, g, logits);
  const typename Backend::Guard guard(logits.device());
  return predict_tree_impl<Backend>(logits, group_index, group_value, theta, g);
}

template <class Backend>
at::Tensor lmm_predict_proba_dense_launch(const at::Tensor& logits_in, const at::Tensor& psi_t,
                                          const at::Tensor& theta_in, c10::IntArrayRef level_sizes) {
  const LossGeometry g = check_predict_inputs(logits_in, theta_in, level_sizes);
  check_dense_psi(psi_t, g, logits_in);
  const typename Backend::Guard guard(logits_in.device());
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor theta = theta_in.contiguous();
  const auto acc = accumulate_type(logits.scalar_type());
  if (g.batch == 0) return at::empty({0, g.num_classes}, logits.options());
  check_grid(g);
  const DeviceLevels info = cuda::make_device_levels(g, "prediction");
  at::Tensor mixed, out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_predict_proba_dense_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const LaunchSpec per_row{.grid = dim3(static_cast<unsigned>(g.batch)), .block = kThreads,
                             .launch_bound = kThreads, .name = "upper_softmax_kernel"};
    if (g.upper_width > 0) {
      at::Tensor u = at::empty({g.batch, g.upper_width}, logits.options().dtype(acc));
      Backend::launch(upper_softmax_kernel<scalar_t, A>, per_row, logits.data_ptr<scalar_t>(), logits.stride(0),
                      theta.data_ptr<A>(), info, u.data_ptr<A>());
      // One GEMM for all upper levels: [B, sum N_l] x [sum N_l, N].
      mixed = at::mm(u, psi_t.t());
    } else {
      mixed = at::zeros({g.batch, g.num_classes}, logits.options().dtype(acc));
    }
    // Float and double results are finished in the GEMM's output.
    out = std::is_same_v<scalar_t, A> ? mixed : at::empty({g.batch, g.num_classes}, logits.options());
    LaunchSpec bottom = per_row;
    bottom.name = "add_bottom_kernel";
    Backend::launch(add_bottom_kernel<scalar_t, A>, bottom, logits.data_ptr<scalar_t>(), logits.stride(0),
                    theta.data_ptr<A>(), info, mixed.data_ptr<A>(), out.data_ptr<scalar_t>());
  });
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> lmm_topk_tree_launch(const at::Tensor& logits, const at::Tensor& group_index,
                                                        const at::Tensor& group_value, const at::Tensor& theta,
                                                        c10::IntArrayRef level_sizes, int64_t k) {
  const LossGeometry g = check_predict_inputs(logits, theta, level_sizes);
  check_tree_index(group_index, group_value, g, logits);
  check_k(k, g);
  const typename Backend::Guard guard(logits.device());
  const at::Tensor proba = predict_tree_impl<Backend>(logits, group_index, group_value, theta, g);
  auto [values, indices] = at::topk(proba, k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
  return {values, indices};
}

template <class Backend>
at::Tensor lmm_gather_scores_launch(const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const std::optional<at::Tensor>& bias_in, const at::Tensor& rows_in) {
  check_gather_scores_inputs(x_in, weight_in, bias_in, rows_in);
  const typename Backend::Guard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t total = rows.numel();
  at::Tensor out = at::empty({x.size(0), rows.size(1)}, x.options());
  if (total == 0) return out;
  check_gather_rows_values(rows, weight.size(0));
  // One warp per (sample, row) pair; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>((total + kThreads / 32 - 1) / (kThreads / 32), int64_t{1} << 20);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lmm_gather_scores_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Backend::launch(gather_scores_kernel<scalar_t, A>,
                    {.grid = dim3(static_cast<unsigned>(blocks)), .block = kThreads, .launch_bound = kThreads,
                     .name = "gather_scores_kernel"},
                    x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                    bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, rows.data_ptr<int64_t>(), rows.size(1),
                    x.size(1), weight.size(0), total, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace lmm_fast
