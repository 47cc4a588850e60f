// Kernels of LMM prediction, P(y | x) = sum_l theta_l softmax(a^l) Psi^l,
// compiled by nvcc for predict_cuda.cu and as host C++ for the emulated
// backend of the tests (csrc/emulation); predict_launch.h launches them.
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
// warp per requested (sample, weight row) dot product. Group indices and
// weight rows are checked on the host before the launch.
#pragma once

#include "cuda/cuda_common.cuh"

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

}  // namespace
}  // namespace lmm_fast
