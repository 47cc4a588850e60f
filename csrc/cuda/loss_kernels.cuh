// Kernels of the fused level-wise mixture loss, compiled by nvcc for
// loss_cuda.cu and as host C++ for the emulated backend of the tests
// (csrc/emulation); the host code that launches them is loss_launch.h.
//
// One thread block per row. The forward reads each logit once and keeps, per
// thread, an online (max, sum-exp) pair for the level's softmax and, on the
// upper levels, a second pair restricted to the groups that hold the target
// class (their weighted log-sum-exp is the level's vote). The backward reads
// the logits once more and writes the gradient. Accumulation is float32 for
// float32/bfloat16/float16 logits and float64 for float64 logits. Targets
// are checked on the host before the launch (loss_launch.h).
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

constexpr int kUnroll = 4;

template <typename A>
__device__ __forceinline__ A log_add(A a, A b) {
  if (a == neg_inf<A>()) return b;
  if (b == neg_inf<A>()) return a;
  A hi = a > b ? a : b;
  A lo = a > b ? b : a;
  return hi + log1p(exp(lo - hi));
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) lmm_loss_forward_kernel(
    const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ target,
    const A* __restrict__ psi_t, const A* __restrict__ psi_scale,
    const A* __restrict__ log_theta, DeviceLevels info, int64_t ignore_index, T* __restrict__ loss, A* __restrict__ lse_out, A* __restrict__ log_m_out) {
  const int64_t b = blockIdx.x;
  const int L = info.num_levels;
  const int64_t y = target[b];
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      loss[b] = T(0);
      for (int l = 0; l < L; ++l) {
        lse_out[b * L + l] = A(0);
        log_m_out[b * L + l] = A(0);
      }
    }
    return;
  }
  const T* row = logits + b * row_stride;
  const A* column = psi_t + y * info.upper_width;
  log_theta += b * info.theta_row_stride;
  A log_z = neg_inf<A>();
  for (int l = 0; l < L; ++l) {
    const T* x = row + info.offsets[l];
    const int64_t n = info.sizes[l];
    A level_lse, vote;
    if (l == L - 1) {
      A m[1] = {neg_inf<A>()};
      A s[1] = {A(0)};
      for (int64_t base = threadIdx.x; base < n; base += kThreads * kUnroll) {
        // Issue all loads of the batch before the dependent max/sum updates.
        A v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t t = base + u * kThreads;
          v[u] = t < n ? static_cast<A>(x[t]) : neg_inf<A>();
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) add_lse(m[0], s[0], v[u], A(1));
      }
      block_merge_lse<A, 1>(m, s);
      level_lse = m[0] + log(s[0]);
      vote = static_cast<A>(x[y]) - level_lse;
    } else {
      const A* p = column + info.offsets[l];
      const A* scale = psi_scale == nullptr ? nullptr : psi_scale + info.offsets[l];
      A m[2] = {neg_inf<A>(), neg_inf<A>()};
      A s[2] = {A(0), A(0)};
      for (int64_t base = threadIdx.x; base < n; base += kThreads * kUnroll) {
        A v[kUnroll], w[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t t = base + u * kThreads;
          v[u] = t < n ? static_cast<A>(x[t]) : neg_inf<A>();
          w[u] = t < n ? (scale == nullptr ? p[t] : p[t] * scale[t]) : A(0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          add_lse(m[0], s[0], v[u], A(1));
          if (w[u] > A(0)) add_lse(m[1], s[1], v[u], w[u]);
        }
      }
      block_merge_lse<A, 2>(m, s);
      level_lse = m[0] + log(s[0]);
      vote = (m[1] == neg_inf<A>()) ? neg_inf<A>() : m[1] + log(s[1]) - level_lse;
    }
    log_z = log_add(log_z, log_theta[l] + vote);
    if (threadIdx.x == 0) {
      lse_out[b * L + l] = level_lse;
      log_m_out[b * L + l] = vote;
    }
  }
  if (threadIdx.x == 0) loss[b] = static_cast<T>(-log_z);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) lmm_loss_backward_kernel(
    const T* __restrict__ grad_loss, const T* __restrict__ logits, int64_t row_stride,
    const int64_t* __restrict__ target, const A* __restrict__ psi_t,
    const A* __restrict__ psi_scale, const A* __restrict__ log_theta, DeviceLevels info,
    const A* __restrict__ lse,
    const A* __restrict__ log_m, int64_t ignore_index,
    T* __restrict__ grad) {
  const int64_t b = blockIdx.x;
  const int L = info.num_levels;
  const int64_t y = target[b];
  T* out = grad + b * info.width;
  const A go = static_cast<A>(grad_loss[b]);
  if (y == ignore_index || go == A(0)) {
    for (int64_t i = threadIdx.x; i < info.width; i += kThreads) out[i] = T(0);
    return;
  }
  const T* row = logits + b * row_stride;
  const A* column = psi_t + y * info.upper_width;
  log_theta += b * info.theta_row_stride;
  A log_z = neg_inf<A>();
  for (int l = 0; l < L; ++l) log_z = log_add(log_z, log_theta[l] + log_m[b * L + l]);
  for (int l = 0; l < L; ++l) {
    const T* x = row + info.offsets[l];
    T* gx = out + info.offsets[l];
    const int64_t n = info.sizes[l];
    const A level_lse = lse[b * L + l];
    const A r = exp(log_theta[l] + log_m[b * L + l] - log_z);
    if (l == L - 1) {
      const A scaled = go * r;
      for (int64_t base = threadIdx.x; base < n; base += kThreads * kUnroll) {
        A v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t t = base + u * kThreads;
          v[u] = t < n ? static_cast<A>(x[t]) : A(0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t t = base + u * kThreads;
          if (t < n) {
            const A e = fast_exp(v[u] - level_lse);
            gx[t] = static_cast<T>(scaled * (t == y ? e - A(1) : e));
          }
        }
      }
    } else {
      const A* p = column + info.offsets[l];
      const A* scale = psi_scale == nullptr ? nullptr : psi_scale + info.offsets[l];
      const A shift = log_theta[l] - log_z;
      for (int64_t t = threadIdx.x; t < n; t += kThreads) {
        const A v = static_cast<A>(x[t]) - level_lse;
        A val = r * fast_exp(v);
        const A w = scale == nullptr ? p[t] : p[t] * scale[t];
        if (w > A(0)) val -= w * fast_exp(v + shift);
        gx[t] = static_cast<T>(go * val);
      }
    }
  }
}

}  // namespace
}  // namespace lmm_fast
