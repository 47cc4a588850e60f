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

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lmm_loss_forward_launch(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& psi_t_in,
    const at::Tensor& theta, c10::IntArrayRef level_sizes, int64_t ignore_index,
    const std::optional<at::Tensor>& psi_scale_in) {
  const LossGeometry g = check_loss_inputs(logits_in, target_in, psi_t_in, theta, level_sizes);
  const at::Tensor psi_scale = check_psi_scale(psi_scale_in, g, logits_in);
  const typename Backend::Guard guard(logits_in.device());
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  const auto acc = accumulate_type(logits.scalar_type());
  at::Tensor loss = at::empty({g.batch}, logits.options());
  at::Tensor lse = at::empty({g.batch, g.num_levels()}, logits.options().dtype(acc));
  at::Tensor log_m = at::empty({g.batch, g.num_levels()}, logits.options().dtype(acc));
  if (g.batch == 0) return {loss, lse, log_m};
  check_target_values(target, g.num_classes, ignore_index);
  const at::Tensor log_theta = theta.log().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_forward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const DeviceLevels info = cuda::make_device_levels(g, "loss");
    Backend::launch(lmm_loss_forward_kernel<scalar_t, A>,
                    {.grid = dim3(static_cast<unsigned>(g.batch)), .block = kThreads, .launch_bound = kThreads,
                     .name = "lmm_loss_forward_kernel"},
                    logits.data_ptr<scalar_t>(), logits.stride(0), target.data_ptr<int64_t>(),
                    psi_t.data_ptr<A>(), psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr,
                    log_theta.data_ptr<A>(), info, ignore_index, loss.data_ptr<scalar_t>(),
                    lse.data_ptr<A>(), log_m.data_ptr<A>());
  });
  return {loss, lse, log_m};
}

template <class Backend>
at::Tensor lmm_loss_backward_launch(
    const at::Tensor& grad_loss_in, const at::Tensor& logits_in, const at::Tensor& target_in,
    const at::Tensor& psi_t_in, const at::Tensor& theta, const at::Tensor& lse_in,
    const at::Tensor& log_m_in, c10::IntArrayRef level_sizes, int64_t ignore_index,
    const std::optional<at::Tensor>& psi_scale_in) {
  const LossGeometry g = check_loss_inputs(logits_in, target_in, psi_t_in, theta, level_sizes);
  const at::Tensor psi_scale = check_psi_scale(psi_scale_in, g, logits_in);
  check_stats(lse_in, "lse", g, logits_in);
  check_stats(log_m_in, "log_m", g, logits_in);
  TORCH_CHECK(grad_loss_in.dim() == 1 && grad_loss_in.size(0) == g.batch,
      "lmm_fast: grad_loss must be [batch] = [", g.batch, "], got ", grad_loss_in.sizes());
  TORCH_CHECK(grad_loss_in.scalar_type() == logits_in.scalar_type(),
      "lmm_fast: grad_loss must have the logits' dtype ", logits_in.scalar_type(),
      ", got ", grad_loss_in.scalar_type());
  TORCH_CHECK(grad_loss_in.device() == logits_in.device(),
      "lmm_fast: grad_loss must be on ", logits_in.device(), ", got ", grad_loss_in.device());
  const typename Backend::Guard guard(logits_in.device());
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor log_m = log_m_in.contiguous();
  at::Tensor grad = at::empty({g.batch, g.width}, logits.options());
  if (g.batch == 0) return grad;
  check_target_values(target, g.num_classes, ignore_index);
  const at::Tensor log_theta = theta.log().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_backward_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const DeviceLevels info = cuda::make_device_levels(g, "loss");
    Backend::launch(lmm_loss_backward_kernel<scalar_t, A>,
                    {.grid = dim3(static_cast<unsigned>(g.batch)), .block = kThreads, .launch_bound = kThreads,
                     .name = "lmm_loss_backward_kernel"},
                    grad_loss.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), logits.stride(0),
                    target.data_ptr<int64_t>(), psi_t.data_ptr<A>(),
                    psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr, log_theta.data_ptr<A>(), info,
                    lse.data_ptr<A>(), log_m.data_ptr<A>(), ignore_index, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace
}  // namespace lmm_fast
