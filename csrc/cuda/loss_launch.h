// Host side of the CUDA loss, written once for both backends: the checks,
// allocations, dtype dispatch and launches of loss_kernels.cuh. Backend is
// CudaBackend (loss_cuda.cu: CUDA tensors, the current stream) or the tests'
// EmulatedBackend (CPU tensors, the emulated device).
//
// Host syncs per call: one, the read back of the target check (none for an
// empty batch).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/loss_kernels.cuh"
#include "loss_common.h"

namespace lmm_fast {
namespace {

// Per-group scratch of the label-smoothing pass: dynamic shared memory when
// it fits, else a global [B, k * upper_width] buffer passed as `scratch`.
// Below the 48 KiB a block may use without opting in, leaving room for the
// reductions' static shared memory.
constexpr size_t kMaxSmoothingSharedBytes = 40 * 1024;

// Launch shape of the label-smoothing pass: the dynamic shared memory of its
// per-group buffers (buffers_per_group of them), or a global scratch buffer
// when they do not fit.
struct SmoothingLaunch {
  size_t shared_bytes = 0;
  at::Tensor scratch;
};

inline SmoothingLaunch smoothing_launch(const LossGeometry& g, double eps, int64_t buffers_per_group,
                                        const at::Tensor& logits) {
  SmoothingLaunch launch;
  if (eps <= 0 || g.upper_width == 0) return launch;
  const auto acc = accumulate_type(logits.scalar_type());
  const size_t bytes = static_cast<size_t>(buffers_per_group * g.upper_width) * c10::elementSize(acc);
  if (bytes <= kMaxSmoothingSharedBytes) {
    launch.shared_bytes = bytes;
  } else {
    launch.scratch = at::empty({g.batch, buffers_per_group * g.upper_width}, logits.options().dtype(acc));
  }
  return launch;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lmm_loss_forward_launch(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& psi_t_in,
    const at::Tensor& theta_in, c10::IntArrayRef level_sizes, int64_t ignore_index,
    const std::optional<at::Tensor>& psi_scale_in, const std::optional<at::Tensor>& weight_in,
    double label_smoothing) {
  const LossInputs in = check_loss_forward_inputs(logits_in, target_in, psi_t_in, theta_in, level_sizes,
      psi_scale_in, weight_in, label_smoothing);
  const LossGeometry& g = in.g;
  const at::Tensor& psi_scale = in.psi_scale;
  const at::Tensor& weight = in.weight;
  const typename Backend::Guard guard(logits_in.device());
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  const auto acc = accumulate_type(logits.scalar_type());
  at::Tensor loss = at::empty({g.batch}, logits.options());
  at::Tensor stats = at::empty({g.batch, kStatRows * g.num_levels()}, logits.options().dtype(acc));
  at::Tensor log_m = at::empty({g.batch, g.num_levels()}, logits.options().dtype(acc));
  if (g.batch == 0) return {loss, stats, log_m};
  check_target_values(target, g.num_classes, ignore_index);
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor log_theta = theta.log().contiguous();
  const SmoothingLaunch smoothing = smoothing_launch(g, label_smoothing, 1, logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_forward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const DeviceLevels info = cuda::make_device_levels(g, "loss");
    Backend::launch(lmm_loss_forward_kernel<scalar_t, A>,
                    {.grid = dim3(static_cast<unsigned>(g.batch)), .block = kThreads,
                     .shared_bytes = smoothing.shared_bytes, .launch_bound = kThreads,
                     .name = "lmm_loss_forward_kernel"},
                    logits.data_ptr<scalar_t>(), logits.stride(0), target.data_ptr<int64_t>(),
                    psi_t.data_ptr<A>(), psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr,
                    theta.data_ptr<A>(), log_theta.data_ptr<A>(), info, ignore_index,
                    weight.defined() ? weight.data_ptr<A>() : nullptr, static_cast<A>(label_smoothing),
                    smoothing.scratch.defined() ? smoothing.scratch.data_ptr<A>() : nullptr,
                    loss.data_ptr<scalar_t>(), stats.data_ptr<A>(), log_m.data_ptr<A>());
  });
  return {loss, stats, log_m};
}

template <class Backend>
at::Tensor lmm_loss_backward_launch(
    const at::Tensor& grad_loss_in, const at::Tensor& logits_in, const at::Tensor& target_in,
    const at::Tensor& psi_t_in, const at::Tensor& theta_in, const at::Tensor& stats_in,
    const at::Tensor& log_m_in, c10::IntArrayRef level_sizes, int64_t ignore_index,
    const std::optional<at::Tensor>& psi_scale_in, const std::optional<at::Tensor>& weight_in,
    double label_smoothing) {
  const LossInputs in = check_loss_backward_inputs(grad_loss_in, logits_in, target_in, psi_t_in, theta_in,
      stats_in, log_m_in, level_sizes, psi_scale_in, weight_in, label_smoothing);
  const LossGeometry& g = in.g;
  const at::Tensor& psi_scale = in.psi_scale;
  const at::Tensor& weight = in.weight;
  const typename Backend::Guard guard(logits_in.device());
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const at::Tensor log_m = log_m_in.contiguous();
  at::Tensor grad = at::empty({g.batch, g.width}, logits.options());
  if (g.batch == 0) return grad;
  check_target_values(target, g.num_classes, ignore_index);
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor log_theta = theta.log().contiguous();
  const SmoothingLaunch smoothing = smoothing_launch(g, label_smoothing, 2, logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_backward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const DeviceLevels info = cuda::make_device_levels(g, "loss");
    Backend::launch(lmm_loss_backward_kernel<scalar_t, A>,
                    {.grid = dim3(static_cast<unsigned>(g.batch)), .block = kThreads,
                     .shared_bytes = smoothing.shared_bytes, .launch_bound = kThreads,
                     .name = "lmm_loss_backward_kernel"},
                    grad_loss.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), logits.stride(0),
                    target.data_ptr<int64_t>(), psi_t.data_ptr<A>(),
                    psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr, theta.data_ptr<A>(),
                    log_theta.data_ptr<A>(), info, stats.data_ptr<A>(), log_m.data_ptr<A>(), ignore_index,
                    weight.defined() ? weight.data_ptr<A>() : nullptr, static_cast<A>(label_smoothing),
                    smoothing.scratch.defined() ? smoothing.scratch.data_ptr<A>() : nullptr,
                    grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace
}  // namespace lmm_fast
