// Kernels of the fused level-wise mixture loss, compiled by nvcc for
// loss_cuda.cu and as host C++ for the emulated backend of the tests
// (csrc/emulation); the host code that launches them is loss_launch.h.
//
// One thread block per row. The forward reads each logit once and keeps, per
// thread, an online (max, sum-exp) pair for the level's softmax and, on the
// upper levels, a second pair restricted to the groups that hold the target
// class (their weighted log-sum-exp is the level's vote). The backward reads
// the logits once more and writes the gradient. Accumulation is float32 for
// float32/bfloat16/float16 logits and float64 for float64 logits; the row
// statistics and the per-row math are loss_common.h's, shared with the CPU.
// With label smoothing, each block also visits every class of its row, with
// per-group buffers in dynamic shared memory or in a global scratch buffer
// (loss_launch.h chooses). Targets are checked on the host before the launch
// (loss_launch.h).
#pragma once

#include "cuda/cuda_common.cuh"

namespace lmm_fast {
namespace {

using cuda::add_lse;
using cuda::block_merge_lse;
using cuda::block_sum;
using cuda::DeviceLevels;
using cuda::fast_exp;
using cuda::kMaxLevels;
using cuda::kThreads;
using cuda::neg_inf;

constexpr int kUnroll = 4;

// Per-group scratch of the label-smoothing pass: the launch's dynamic shared
// memory, or this row's part of a global [B, per_row] buffer (`scratch`).
#if defined(LMM_FAST_CUDA_EMULATION)
// On the emulated device shared memory is a checked view, not a pointer: the
// buffer holds either, and its elements read and write through either.
template <typename A>
class RowBuffer {
  using Shared = ::lmm_fast::emu::SharedArray<A[]>;

 public:
  // One element: global memory (global != nullptr) or shared element i.
  class Ref {
   public:
    Ref(A* global, const Shared& shared, int64_t i) : global_(global), shared_(shared), i_(i) {}
    operator A() const { return global_ != nullptr ? *global_ : static_cast<A>(shared_[i_]); }
    const Ref& operator=(A v) const {
      if (global_ != nullptr) {
        *global_ = v;
      } else {
        shared_[i_] = v;
      }
      return *this;
    }

   private:
    A* global_;
    Shared shared_;
    int64_t i_;
  };

  RowBuffer(A* global, const Shared& shared, int64_t base) : global_(global), shared_(shared), base_(base) {}
  Ref operator[](int64_t i) const {
    return Ref(global_ == nullptr ? nullptr : global_ + base_ + i, shared_, base_ + i);
  }
  RowBuffer operator+(int64_t k) const { return RowBuffer(global_, shared_, base_ + k); }
  void atomic_add(int64_t i, A v) const {
    if (global_ != nullptr) {
      atomicAdd(global_ + base_ + i, v);
    } else {
      atomicAdd(shared_[base_ + i], v);
    }
  }

 private:
  A* global_;
  Shared shared_;
  int64_t base_;
};

template <typename A>
RowBuffer<A> smoothing_buffer(A* scratch, int64_t row, int64_t per_row) {
  LMM_FAST_DYNAMIC_SHARED(A, smoothing_shared);
  return scratch != nullptr ? RowBuffer<A>(scratch + row * per_row, smoothing_shared, 0)
                            : RowBuffer<A>(nullptr, smoothing_shared, 0);
}
#else
template <typename A>
struct RowBuffer {
  A* p;
  __device__ __forceinline__ A& operator[](int64_t i) const { return p[i]; }
  __device__ __forceinline__ RowBuffer operator+(int64_t k) const { return RowBuffer{p + k}; }
  __device__ __forceinline__ void atomic_add(int64_t i, A v) const { atomicAdd(p + i, v); }
};

template <typename A>
__device__ __forceinline__ RowBuffer<A> smoothing_buffer(A* scratch, int64_t row, int64_t per_row) {
  // One declaration for every A (nvcc refuses extern shared arrays of one
  // name and different types); double keeps it 8-byte aligned.
  LMM_FAST_DYNAMIC_SHARED(double, smoothing_shared);
  return RowBuffer<A>{scratch != nullptr ? scratch + row * per_row : reinterpret_cast<A*>(smoothing_shared)};
}
#endif

// se[j] = Psi factor * softmax probability of every upper group j of a row.
template <typename T, typename A>
__device__ __forceinline__ void upper_softmax(const T* row, const A* psi_scale, const DeviceLevels& info,
                                              const A* level_max, const A* level_sum, const RowBuffer<A>& se) {
  for (int l = 0; l + 1 < info.num_levels; ++l) {
    const A inv_sum = A(1) / level_sum[l];
    for (int64_t t = threadIdx.x; t < info.sizes[l]; t += kThreads) {
      const int64_t j = info.offsets[l] + t;
      const A e = fast_exp(static_cast<A>(row[j]) - level_max[l]) * inv_sum;
      se[j] = psi_scale == nullptr ? e : e * psi_scale[j];
    }
  }
}

// Class c's mixture z_c = sum_l theta_l m^l_c; votes[l] gets m^l_c of every
// upper level, *p the bottom softmax probability (bottom_log_sum: log of the
// bottom level's sum, computed once per row).
template <typename T, typename A>
__device__ __forceinline__ ClassMixture<A> class_mixture_at(
    const T* row, const A* psi_t, const DeviceLevels& info, const A* theta, const A* log_theta,
    const A* level_max, const A* level_sum, A bottom_log_sum, const RowBuffer<A>& se, int64_t c, A* votes,
    A* p, bool want_log) {
  const int L = info.num_levels;
  const A* psi_row = psi_t + c * info.upper_width;
  A upper = 0;
  for (int l = 0; l + 1 < L; ++l) {
    A m = 0;
    for (int64_t t = info.offsets[l]; t < info.offsets[l] + info.sizes[l]; ++t) {
      m += psi_row[t] * static_cast<A>(se[t]);
    }
    votes[l] = m;
    upper += theta[l] * m;
  }
  const A shifted = static_cast<A>(row[info.offsets[L - 1] + c]) - level_max[L - 1];
  *p = fast_exp(shifted) / level_sum[L - 1];
  return class_mixture<A>(log_theta[L - 1], shifted - bottom_log_sum, *p, theta[L - 1], upper, want_log);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) lmm_loss_forward_kernel(
    const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ target,
    const A* __restrict__ psi_t, const A* __restrict__ psi_scale, const A* __restrict__ theta,
    const A* __restrict__ log_theta, DeviceLevels info, int64_t ignore_index,
    const A* __restrict__ class_weight, A eps, A* __restrict__ scratch,
    T* __restrict__ loss, A* __restrict__ stats, A* __restrict__ log_m_out) {
  const int64_t b = blockIdx.x;
  const int L = info.num_levels;
  const int64_t y = target[b];
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      loss[b] = T(0);
      for (int k = 0; k < kStatRows * L; ++k) stats[b * kStatRows * L + k] = A(0);
      for (int l = 0; l < L; ++l) log_m_out[b * L + l] = A(0);
    }
    return;
  }
  const T* row = logits + b * row_stride;
  const A* column = psi_t + y * info.upper_width;
  theta += b * info.theta_row_stride;
  log_theta += b * info.theta_row_stride;
  A level_max[kMaxLevels], level_sum[kMaxLevels];
  A log_z = neg_inf<A>();
  for (int l = 0; l < L; ++l) {
    const T* x = row + info.offsets[l];
    const int64_t n = info.sizes[l];
    A group_max, group_sum;
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
      level_max[l] = m[0];
      level_sum[l] = s[0];
      group_max = static_cast<A>(x[y]);
      group_sum = A(1);
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
      level_max[l] = m[0];
      level_sum[l] = s[0];
      group_max = m[1];
      group_sum = s[1];
    }
    const A vote = relative_vote(group_max, group_sum, level_max[l], level_sum[l]);
    log_z = log_add(log_z, log_theta[l] + vote);
    if (threadIdx.x == 0) {
      stats[stat_index(b, kStatMax, l, L)] = level_max[l];
      stats[stat_index(b, kStatSum, l, L)] = level_sum[l];
      stats[stat_index(b, kStatGroupMax, l, L)] = group_max;
      stats[stat_index(b, kStatGroupSum, l, L)] = group_sum;
      stats[stat_index(b, kStatSmooth, l, L)] = A(0);
      log_m_out[b * L + l] = vote;
    }
  }
  A smooth = 0;
  if (eps > A(0)) {
    const RowBuffer<A> se = smoothing_buffer(scratch, b, info.upper_width);
    upper_softmax(row, psi_scale, info, level_max, level_sum, se);
    __syncthreads();
    A ratio_sum[kMaxLevels];
    for (int l = 0; l < L; ++l) ratio_sum[l] = A(0);
    const A bottom_log_sum = log(level_sum[L - 1]);
    for (int64_t c = threadIdx.x; c < info.num_classes; c += kThreads) {
      A votes[kMaxLevels], p;
      const ClassMixture<A> cm = class_mixture_at(row, psi_t, info, theta, log_theta, level_max, level_sum,
                                                  bottom_log_sum, se, c, votes, &p, true);
      const A w = class_weight == nullptr ? A(1) : class_weight[c];
      smooth += w * cm.log_z;
      for (int l = 0; l + 1 < L; ++l) ratio_sum[l] += w * votes[l] * cm.inv_z;
      ratio_sum[L - 1] += w * cm.bottom_ratio;
    }
    smooth = block_sum(smooth);
    for (int l = 0; l < L; ++l) {
      const A total = block_sum(ratio_sum[l]);
      if (threadIdx.x == 0) stats[stat_index(b, kStatSmooth, l, L)] = total;
    }
  }
  if (threadIdx.x == 0) {
    const A weight_y = class_weight == nullptr ? A(1) : class_weight[y];
    loss[b] = static_cast<T>(combine_loss(log_z, weight_y, eps, smooth, info.num_classes));
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) lmm_loss_backward_kernel(
    const T* __restrict__ grad_loss, const T* __restrict__ logits, int64_t row_stride,
    const int64_t* __restrict__ target, const A* __restrict__ psi_t,
    const A* __restrict__ psi_scale, const A* __restrict__ theta, const A* __restrict__ log_theta,
    DeviceLevels info, const A* __restrict__ stats, const A* __restrict__ log_m, int64_t ignore_index,
    const A* __restrict__ class_weight, A eps, A* __restrict__ scratch, T* __restrict__ grad) {
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
  theta += b * info.theta_row_stride;
  log_theta += b * info.theta_row_stride;
  A log_z = neg_inf<A>();
  for (int l = 0; l < L; ++l) log_z = log_add(log_z, log_theta[l] + log_m[b * L + l]);
  const A weight_y = class_weight == nullptr ? A(1) : class_weight[y];
  const A nll_go = go * (A(1) - eps) * weight_y;
  const A smooth_go = go * eps / static_cast<A>(info.num_classes);
  // se[j]: Psi factor * softmax of upper group j; q[j]: sum_c psi_t[c, j]
  // w_c / z_c (both only with label smoothing).
  const RowBuffer<A> se = smoothing_buffer(scratch, b, 2 * info.upper_width);
  const RowBuffer<A> q = se + info.upper_width;
  if (eps > A(0)) {
    // Every class at once: the bottom level's whole gradient, and q.
    A level_max[kMaxLevels], level_sum[kMaxLevels];
    for (int l = 0; l < L; ++l) {
      level_max[l] = stats[stat_index(b, kStatMax, l, L)];
      level_sum[l] = stats[stat_index(b, kStatSum, l, L)];
    }
    upper_softmax(row, psi_scale, info, level_max, level_sum, se);
    for (int64_t j = threadIdx.x; j < info.upper_width; j += kThreads) q[j] = A(0);
    __syncthreads();
    const A r_bottom = exp(log_theta[L - 1] + log_m[b * L + L - 1] - log_z);
    const A bottom_ratio_sum = stats[stat_index(b, kStatSmooth, L - 1, L)];
    T* bottom_grad = out + info.offsets[L - 1];
    const A bottom_log_sum = log(level_sum[L - 1]);
    for (int64_t c = threadIdx.x; c < info.num_classes; c += kThreads) {
      A votes[kMaxLevels], p;
      const ClassMixture<A> cm = class_mixture_at(row, psi_t, info, theta, log_theta, level_max, level_sum,
                                                  bottom_log_sum, se, c, votes, &p, false);
      const A w = class_weight == nullptr ? A(1) : class_weight[c];
      const A u = w * cm.inv_z;
      const A* psi_row = psi_t + c * info.upper_width;
      for (int64_t j = 0; j < info.upper_width; ++j) {
        if (psi_row[j] != A(0)) q.atomic_add(j, u * psi_row[j]);
      }
      bottom_grad[c] = static_cast<T>(
          nll_go * r_bottom * (c == y ? p - A(1) : p) -
          smooth_go * theta[L - 1] * (w * cm.bottom_ratio - p * bottom_ratio_sum));
    }
    __syncthreads();
  }
  for (int l = 0; l < L; ++l) {
    const T* x = row + info.offsets[l];
    T* gx = out + info.offsets[l];
    const int64_t n = info.sizes[l];
    const A max = stats[stat_index(b, kStatMax, l, L)];
    const A inv_sum = A(1) / stats[stat_index(b, kStatSum, l, L)];
    // r: this level's responsibility theta_l m_l / z for the target.
    const A r = exp(log_theta[l] + log_m[b * L + l] - log_z);
    if (l == L - 1) {
      if (eps > A(0)) continue;  // written with the smoothing pass
      const A scaled = nll_go * r;
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
            const A e = fast_exp(v[u] - max) * inv_sum;
            gx[t] = static_cast<T>(scaled * (t == y ? e - A(1) : e));
          }
        }
      }
    } else {
      // d/da_t = r (z_t - z_t Psi[t, y] / m_l), the target term relative to
      // the target groups' own maximum (exact for extreme logits).
      const A* p = column + info.offsets[l];
      const A* scale = psi_scale == nullptr ? nullptr : psi_scale + info.offsets[l];
      const A group_max = stats[stat_index(b, kStatGroupMax, l, L)];
      const A inv_group_sum = A(1) / stats[stat_index(b, kStatGroupSum, l, L)];
      const A ratio_sum = stats[stat_index(b, kStatSmooth, l, L)];
      for (int64_t t = threadIdx.x; t < n; t += kThreads) {
        const A v = static_cast<A>(x[t]);
        const A e = fast_exp(v - max) * inv_sum;
        A val = e;
        const A w = scale == nullptr ? p[t] : p[t] * scale[t];
        if (w > A(0)) val -= w * fast_exp(v - group_max) * inv_group_sum;
        val *= nll_go * r;
        if (eps > A(0)) {
          const int64_t j = info.offsets[l] + t;
          val -= smooth_go * theta[l] * (static_cast<A>(se[j]) * static_cast<A>(q[j]) - e * ratio_sum);
        }
        gx[t] = static_cast<T>(val);
      }
    }
  }
}

}  // namespace
}  // namespace lmm_fast
