// CUDA kernels of LMM prediction, P(y | x) = sum_l theta_l softmax(a^l) Psi^l.
//
// One thread block per row. Each level's softmax statistics come from one
// read of its logits with an online (max, sum-exp) pair per thread, merged
// across the block. The upper levels' theta_l z^l (sum of the upper level
// sizes per row, small) go to a global scratch row that the block re-reads
// from L1/L2.
//
// Tree Psi: the output pass computes theta_L softmax(a^L)_y and gathers
// theta_l z^l[group_index[l, y]] * group_value[l, y] for every upper level.
// Dense Psi: the scratch rows go through one cuBLAS GEMM with psi_t, and a
// second kernel adds the bottom softmax in place. Top k: the tree mixture,
// then the radix selection of at::topk (no full sort). Gathered scores: one
// warp per requested (sample, weight row) dot product.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "cuda/cuda_common.cuh"
#include "predict_common.h"

namespace lmm_fast {
namespace {

using cuda::add_lse;
using cuda::block_merge_lse;
using cuda::DeviceLevels;
using cuda::fast_exp;
using cuda::kThreads;
using cuda::neg_inf;

// (max, sum exp(x - max)) of x[0..n), returned to every thread of the block.
// Every thread of the block must call it (it synchronises).
template <typename T, typename A>
__device__ void block_softmax_stats(const T* __restrict__ x, int64_t n, A& m_out, A& s_out) {
  A m[1] = {neg_inf<A>()};
  A s[1] = {A(0)};
  for (int64_t t = threadIdx.x; t < n; t += kThreads) add_lse(m[0], s[0], static_cast<A>(x[t]), A(1));
  block_merge_lse<A, 1>(m, s);
  m_out = m[0];
  s_out = s[0];
}

// Writes theta_l softmax(a^l)_t of every upper level to u_row[offset_l + t].
template <typename T, typename A>
__device__ void upper_softmax_block(const T* __restrict__ row, const A* __restrict__ theta,
                                    const DeviceLevels& info, A* __restrict__ u_row) {
  for (int l = 0; l + 1 < info.num_levels; ++l) {
    const T* x = row + info.offsets[l];
    const int64_t n = info.sizes[l];
    A m, s;
    block_softmax_stats<T, A>(x, n, m, s);
    const A scale = theta[l] / s;
    for (int64_t t = threadIdx.x; t < n; t += kThreads) {
      u_row[info.offsets[l] + t] = scale * fast_exp(static_cast<A>(x[t]) - m);
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) predict_tree_kernel(
    const T* __restrict__ logits, int64_t row_stride, const int32_t* __restrict__ group_index,
    const A* __restrict__ group_value, const A* __restrict__ theta, DeviceLevels info,
    A* scratch, T* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const T* row = logits + b * row_stride;
  A* u_row = scratch + b * info.upper_width;
  theta += b * info.theta_row_stride;
  upper_softmax_block<T, A>(row, theta, info, u_row);
  const int bottom = info.num_levels - 1;
  const T* x = row + info.offsets[bottom];
  const int64_t n = info.num_classes;
  A m, s;
  // Its closing __syncthreads also makes u_row, written by all threads of the
  // block, visible to the gathers below.
  block_softmax_stats<T, A>(x, n, m, s);
  const A scale = theta[bottom] / s;
  T* out_row = out + b * n;
  for (int64_t y = threadIdx.x; y < n; y += kThreads) {
    A v = scale * fast_exp(static_cast<A>(x[y]) - m);
    for (int l = 0; l < bottom; ++l) {
      const int32_t group = group_index[l * n + y];
      CUDA_KERNEL_ASSERT(group >= 0 && group < info.sizes[l] && "lmm_fast: group_index out of range");
      v += u_row[info.offsets[l] + group] * group_value[l * n + y];
    }
    out_row[y] = static_cast<T>(v);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) upper_softmax_kernel(
    const T* __restrict__ logits, int64_t row_stride, const A* __restrict__ theta, DeviceLevels info,
    A* __restrict__ u) {
  const int64_t b = blockIdx.x;
  upper_softmax_block<T, A>(logits + b * row_stride, theta + b * info.theta_row_stride, info,
                            u + b * info.upper_width);
}

// out[b, y] = mixed[b, y] + theta_L softmax(a^L)_y; out may alias mixed.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) add_bottom_kernel(
    const T* __restrict__ logits, int64_t row_stride, const A* __restrict__ theta, DeviceLevels info,
    const A* mixed, T* out) {
  const int64_t b = blockIdx.x;
  const int bottom = info.num_levels - 1;
  const T* x = logits + b * row_stride + info.offsets[bottom];
  const int64_t n = info.num_classes;
  A m, s;
  block_softmax_stats<T, A>(x, n, m, s);
  const A scale = theta[b * info.theta_row_stride + bottom] / s;
  for (int64_t y = threadIdx.x; y < n; y += kThreads) {
    const A v = mixed[b * n + y] + scale * fast_exp(static_cast<A>(x[y]) - m);
    out[b * n + y] = static_cast<T>(v);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) gather_scores_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    const int64_t* __restrict__ rows, int64_t width, int64_t dim, int64_t num_weight_rows,
    int64_t total, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5); item < total;
       item += warps) {
    const int64_t r = rows[item];
    if (r < 0) {
      if (lane == 0) out[item] = static_cast<T>(neg_inf<A>());
      continue;
    }
    CUDA_KERNEL_ASSERT(r < num_weight_rows && "lmm_fast: rows out of range");
    const T* xb = x + (item / width) * dim;
    const T* w = weight + r * dim;
    A s = A(0);
    for (int64_t i = lane; i < dim; i += 32) s += static_cast<A>(xb[i]) * static_cast<A>(w[i]);
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffff, s, offset);
    if (lane == 0) {
      if (bias != nullptr) s += static_cast<A>(bias[r]);
      out[item] = static_cast<T>(s);
    }
  }
}

void check_grid(const LossGeometry& g) {
  TORCH_CHECK(g.batch <= 2147483647LL,
      "lmm_fast: the CUDA prediction handles at most 2^31 - 1 rows per call, got ", g.batch);
}

at::Tensor predict_tree_cuda_impl(const at::Tensor& logits_in, const at::Tensor& group_index_in,
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
  at::Tensor scratch = at::empty({g.batch, std::max<int64_t>(g.upper_width, 1)}, logits.options().dtype(acc));
  const DeviceLevels info = cuda::make_device_levels(g, "prediction");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_predict_proba_tree_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    predict_tree_kernel<scalar_t, A><<<static_cast<unsigned int>(g.batch), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), group_index.data_ptr<int32_t>(),
        group_value.data_ptr<A>(), theta.data_ptr<A>(), info, scratch.data_ptr<A>(),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lmm_predict_proba_tree_cuda(const at::Tensor& logits, const at::Tensor& group_index,
                                       const at::Tensor& group_value, const at::Tensor& theta,
                                       c10::IntArrayRef level_sizes) {
  const LossGeometry g = check_predict_inputs(logits, theta, level_sizes);
  check_tree_index(group_index, group_value, g, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  return predict_tree_cuda_impl(logits, group_index, group_value, theta, g);
}

at::Tensor lmm_predict_proba_dense_cuda(const at::Tensor& logits_in, const at::Tensor& psi_t,
                                        const at::Tensor& theta_in, c10::IntArrayRef level_sizes) {
  const LossGeometry g = check_predict_inputs(logits_in, theta_in, level_sizes);
  check_dense_psi(psi_t, g, logits_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor theta = theta_in.contiguous();
  const auto acc = accumulate_type(logits.scalar_type());
  if (g.batch == 0) return at::empty({0, g.num_classes}, logits.options());
  check_grid(g);
  const DeviceLevels info = cuda::make_device_levels(g, "prediction");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor mixed, out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_predict_proba_dense_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (g.upper_width > 0) {
      at::Tensor u = at::empty({g.batch, g.upper_width}, logits.options().dtype(acc));
      upper_softmax_kernel<scalar_t, A><<<static_cast<unsigned int>(g.batch), kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), theta.data_ptr<A>(), info, u.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // One GEMM for all upper levels: [B, sum N_l] x [sum N_l, N].
      mixed = at::mm(u, psi_t.t());
    } else {
      mixed = at::zeros({g.batch, g.num_classes}, logits.options().dtype(acc));
    }
    // Float and double results are finished in the GEMM's output.
    out = std::is_same_v<scalar_t, A> ? mixed : at::empty({g.batch, g.num_classes}, logits.options());
    add_bottom_kernel<scalar_t, A><<<static_cast<unsigned int>(g.batch), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), theta.data_ptr<A>(), info,
        mixed.data_ptr<A>(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lmm_topk_tree_cuda(const at::Tensor& logits, const at::Tensor& group_index,
                                                      const at::Tensor& group_value, const at::Tensor& theta,
                                                      c10::IntArrayRef level_sizes, int64_t k) {
  const LossGeometry g = check_predict_inputs(logits, theta, level_sizes);
  check_tree_index(group_index, group_value, g, logits);
  check_k(k, g);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor proba = predict_tree_cuda_impl(logits, group_index, group_value, theta, g);
  auto [values, indices] = at::topk(proba, k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
  return {values, indices};
}

at::Tensor lmm_gather_scores_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                  const std::optional<at::Tensor>& bias_in, const at::Tensor& rows_in) {
  check_gather_scores_inputs(x_in, weight_in, bias_in, rows_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t total = rows.numel();
  at::Tensor out = at::empty({x.size(0), rows.size(1)}, x.options());
  if (total == 0) return out;
  // One warp per (sample, row) pair; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>((total + kThreads / 32 - 1) / (kThreads / 32), int64_t{1} << 20);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lmm_gather_scores_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gather_scores_kernel<scalar_t, A><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, rows.data_ptr<int64_t>(), rows.size(1),
        x.size(1), weight.size(0), total, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmm_fast, CUDA, m) {
  m.impl("lmm_gather_scores", &lmm_gather_scores_cuda);
  m.impl("lmm_predict_proba_tree", &lmm_predict_proba_tree_cuda);
  m.impl("lmm_predict_proba_dense", &lmm_predict_proba_dense_cuda);
  m.impl("lmm_topk_tree", &lmm_topk_tree_cuda);
}

}  // namespace lmm_fast
