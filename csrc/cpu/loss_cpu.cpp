// CPU kernels of the fused level-wise mixture loss.
//
// Per row and level, the forward makes a max pass and an exp-sum pass over the
// level's logits (the second pass reads from cache: a row of 10^4..10^5
// floats stays in L2), so the logits are read once from memory. The backward
// reads them once more and writes the gradient: two reads and one write of the
// logits in all, and no [B, N] temporary besides the gradient itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/vec_math.h"
#include "loss_common.h"

namespace lmm_fast {
namespace {

using vec::dot;
using vec::exp8;
using vec::exp_approx;
using vec::f32x8;
using vec::load8;
using vec::row_max;
using vec::row_sum_exp;
using vec::splat8;
using vec::store8;

// out[t] = scale * exp(x[t] - max): the bottom level's backward, with the
// softmax's 1 / sum folded into scale.
template <typename T, typename A>
LMM_FAST_INLINE void scaled_exp(const T* x, int64_t n, A max, A scale, T* out) {
  for (int64_t t = 0; t < n; ++t) out[t] = static_cast<T>(scale * exp_approx(static_cast<A>(x[t]) - max));
}

template <>
LMM_FAST_INLINE void scaled_exp<float, float>(const float* x, int64_t n, float max, float scale, float* out) {
  const f32x8 mx = splat8(max), sc = splat8(scale);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) store8(out + t, sc * exp8(load8(x + t) - mx));
  for (; t < n; ++t) out[t] = scale * exp_approx(x[t] - max);
}

// Psi weight of group t: psi_t's entry times the group's factor, if any.
template <typename A>
LMM_FAST_INLINE A psi_weight(const A* p, const A* scale, int64_t t) {
  return scale == nullptr ? p[t] : p[t] * scale[t];
}

// The sum of p_t exp(x_t) over the t with p_t > 0, as (max, sum of p_t
// exp(x_t - max)); max = -inf when the class has no weight in this level.
template <typename T, typename A>
LMM_FAST_INLINE void weighted_sum_exp(const T* x, const A* p, const A* scale, int64_t n, A* max, A* sum) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    A v = static_cast<A>(x[t]);
    m = (psi_weight(p, scale, t) > A(0) && v > m) ? v : m;
  }
  *max = m;
  *sum = A(0);
  if (m == -std::numeric_limits<A>::infinity()) return;
  A w = 0;
  for (int64_t t = 0; t < n; ++t) {
    const A weight = psi_weight(p, scale, t);
    if (weight > A(0)) w += weight * exp_approx(static_cast<A>(x[t]) - m);
  }
  *sum = w;
}

template <typename T, typename A>
struct LossArgs {
  const T* logits;
  int64_t row_stride;
  const int64_t* target;
  const A* psi_t;
  const A* psi_scale;  // nullptr: psi_t holds Psi itself
  const A* theta;
  const A* log_theta;
  const LossGeometry* geo;
  int64_t ignore_index;
  const A* class_weight;  // nullptr: every class weighs 1
  A label_smoothing;
};

// Scratch of one thread for the label-smoothing pass (never [B, N]).
template <typename T, typename A>
int64_t smoothing_scratch_size(const LossArgs<T, A>& a) {
  return a.label_smoothing > A(0) ? 2 * a.geo->upper_width + 2 * a.geo->num_levels() : 0;
}

// se[j] = Psi factor * softmax probability of every upper group j of a row.
template <typename T, typename A>
LMM_FAST_INLINE void upper_softmax(const LossArgs<T, A>& a, const T* row, const A* stats, A* se) {
  const LossGeometry& g = *a.geo;
  for (int64_t l = 0; l + 1 < g.num_levels(); ++l) {
    const A max = stats[stat_index(0, kStatMax, l, g.num_levels())];
    const A inv_sum = A(1) / stats[stat_index(0, kStatSum, l, g.num_levels())];
    for (int64_t t = g.offsets[l]; t < g.offsets[l] + g.sizes[l]; ++t) {
      const A e = exp_approx(static_cast<A>(row[t]) - max) * inv_sum;
      se[t] = a.psi_scale == nullptr ? e : e * a.psi_scale[t];
    }
  }
}

// The bottom level's softmax of a row as the class pass reads it.
template <typename A>
struct BottomSoftmax {
  A max, log_sum, inv_sum;
};

template <typename A>
LMM_FAST_INLINE BottomSoftmax<A> bottom_softmax(const LossGeometry& g, const A* stats) {
  const int64_t L = g.num_levels();
  const A sum = stats[stat_index(0, kStatSum, L - 1, L)];
  return {stats[stat_index(0, kStatMax, L - 1, L)], std::log(sum), A(1) / sum};
}

// Class c's mixture z_c = sum_l theta_l m^l_c of a row; votes[l] gets m^l_c
// of every upper level, *p_out the bottom softmax probability.
template <typename T, typename A>
LMM_FAST_INLINE ClassMixture<A> row_class_mixture(const LossArgs<T, A>& a, const T* row,
                                                  const BottomSoftmax<A>& bottom, const A* theta,
                                                  const A* log_theta, const A* se, int64_t c,
                                                  A* votes, A* p_out, bool want_log) {
  const LossGeometry& g = *a.geo;
  const int64_t L = g.num_levels();
  const A* psi_row = a.psi_t + c * g.upper_width;
  A upper = 0;
  for (int64_t l = 0; l + 1 < L; ++l) {
    votes[l] = dot<A>(psi_row + g.offsets[l], se + g.offsets[l], g.sizes[l]);
    upper += theta[l] * votes[l];
  }
  const A shifted = static_cast<A>(row[g.offsets[L - 1] + c]) - bottom.max;
  const A p = exp_approx(shifted) * bottom.inv_sum;
  *p_out = p;
  return class_mixture<A>(log_theta[L - 1], shifted - bottom.log_sum, p, theta[L - 1], upper, want_log);
}

// The label-smoothing pass of the forward over one row's classes: returns
// sum_c w_c log z_c and writes the kStatSmooth statistics.
template <typename T, typename A>
LMM_FAST_INLINE A smoothing_forward(const LossArgs<T, A>& a, const T* row, A* stats, const A* theta,
                                    const A* log_theta, A* scratch) {
  const LossGeometry& g = *a.geo;
  const int64_t L = g.num_levels();
  A* se = scratch;
  A* votes = scratch + 2 * g.upper_width;
  A* ratio_sum = votes + L;
  upper_softmax(a, row, stats, se);
  const BottomSoftmax<A> bottom = bottom_softmax(g, stats);
  for (int64_t l = 0; l < L; ++l) ratio_sum[l] = A(0);
  A smooth = 0;
  for (int64_t c = 0; c < g.num_classes; ++c) {
    A p;
    const ClassMixture<A> cm = row_class_mixture(a, row, bottom, theta, log_theta, se, c, votes, &p, true);
    const A w = a.class_weight == nullptr ? A(1) : a.class_weight[c];
    smooth += w * cm.log_z;
    for (int64_t l = 0; l + 1 < L; ++l) ratio_sum[l] += w * votes[l] * cm.inv_z;
    ratio_sum[L - 1] += w * cm.bottom_ratio;
  }
  for (int64_t l = 0; l < L; ++l) stats[stat_index(0, kStatSmooth, l, L)] = ratio_sum[l];
  return smooth;
}

template <typename T, typename A>
LMM_FAST_INLINE void forward_row(const LossArgs<T, A>& a, int64_t b, T* loss, A* stats_all, A* log_m,
                                 A* scratch) {
  const LossGeometry& g = *a.geo;
  const int64_t L = g.num_levels();
  const int64_t y = a.target[b];
  A* stats = stats_all + b * kStatRows * L;
  if (y == a.ignore_index) {
    loss[b] = T(0);
    for (int64_t k = 0; k < kStatRows * L; ++k) stats[k] = A(0);
    for (int64_t l = 0; l < L; ++l) log_m[b * L + l] = A(0);
    return;
  }
  const T* row = a.logits + b * a.row_stride;
  const A* column = a.psi_t + y * g.upper_width;
  const A* theta = a.theta + b * g.theta_row_stride;
  const A* log_theta = a.log_theta + b * g.theta_row_stride;
  A log_z = -std::numeric_limits<A>::infinity();
  for (int64_t l = 0; l < L; ++l) {
    const T* x = row + g.offsets[l];
    const int64_t n = g.sizes[l];
    const A max = row_max<T, A>(x, n);
    const A sum = row_sum_exp<T, A>(x, n, max);
    A group_max, group_sum;
    if (l == L - 1) {
      group_max = static_cast<A>(x[y]);
      group_sum = A(1);
    } else {
      const A* scale = a.psi_scale == nullptr ? nullptr : a.psi_scale + g.offsets[l];
      weighted_sum_exp<T, A>(x, column + g.offsets[l], scale, n, &group_max, &group_sum);
    }
    const A vote = relative_vote(group_max, group_sum, max, sum);
    stats[stat_index(0, kStatMax, l, L)] = max;
    stats[stat_index(0, kStatSum, l, L)] = sum;
    stats[stat_index(0, kStatGroupMax, l, L)] = group_max;
    stats[stat_index(0, kStatGroupSum, l, L)] = group_sum;
    stats[stat_index(0, kStatSmooth, l, L)] = A(0);
    log_m[b * L + l] = vote;
    log_z = log_add(log_z, log_theta[l] + vote);
  }
  const A eps = a.label_smoothing;
  const A smooth = eps > A(0) ? smoothing_forward(a, row, stats, theta, log_theta, scratch) : A(0);
  const A weight_y = a.class_weight == nullptr ? A(1) : a.class_weight[y];
  loss[b] = static_cast<T>(combine_loss(log_z, weight_y, eps, smooth, g.num_classes));
}

// The label-smoothing part of the backward that needs every class: writes
// the bottom level's whole gradient (nll part included) and leaves in q[j]
// sum_c psi_t[c, j] w_c / z_c for the upper groups, in se their softmax.
template <typename T, typename A>
LMM_FAST_INLINE void smoothing_backward_classes(const LossArgs<T, A>& a, int64_t y, const T* row,
                                                const A* stats, const A* theta, const A* log_theta,
                                                A nll_scale, A smooth_scale, T* bottom_grad,
                                                A* scratch) {
  const LossGeometry& g = *a.geo;
  const int64_t L = g.num_levels();
  A* se = scratch;
  A* q = scratch + g.upper_width;
  A* votes = scratch + 2 * g.upper_width;
  upper_softmax(a, row, stats, se);
  const BottomSoftmax<A> bottom = bottom_softmax(g, stats);
  for (int64_t j = 0; j < g.upper_width; ++j) q[j] = A(0);
  const A bottom_ratio_sum = stats[stat_index(0, kStatSmooth, L - 1, L)];
  for (int64_t c = 0; c < g.num_classes; ++c) {
    A p;
    const ClassMixture<A> cm = row_class_mixture(a, row, bottom, theta, log_theta, se, c, votes, &p, false);
    const A w = a.class_weight == nullptr ? A(1) : a.class_weight[c];
    const A u = w * cm.inv_z;
    const A* psi_row = a.psi_t + c * g.upper_width;
    for (int64_t j = 0; j < g.upper_width; ++j) q[j] += u * psi_row[j];
    bottom_grad[c] = static_cast<T>(
        nll_scale * (c == y ? p - A(1) : p) -
        smooth_scale * theta[L - 1] * (w * cm.bottom_ratio - p * bottom_ratio_sum));
  }
}

template <typename T, typename A>
LMM_FAST_INLINE void backward_row(const LossArgs<T, A>& a, int64_t b, const T* grad_loss,
                                  const A* stats_all, const A* log_m, T* grad, A* scratch) {
  const LossGeometry& g = *a.geo;
  const int64_t L = g.num_levels();
  const int64_t y = a.target[b];
  T* out = grad + b * g.width;
  const A go = static_cast<A>(grad_loss[b]);
  if (y == a.ignore_index || go == A(0)) {
    for (int64_t i = 0; i < g.width; ++i) out[i] = T(0);
    return;
  }
  const T* row = a.logits + b * a.row_stride;
  const A* stats = stats_all + b * kStatRows * L;
  const A* column = a.psi_t + y * g.upper_width;
  const A* theta = a.theta + b * g.theta_row_stride;
  const A* log_theta = a.log_theta + b * g.theta_row_stride;
  A log_z = -std::numeric_limits<A>::infinity();
  for (int64_t l = 0; l < L; ++l) log_z = log_add(log_z, log_theta[l] + log_m[b * L + l]);
  const A eps = a.label_smoothing;
  const A weight_y = a.class_weight == nullptr ? A(1) : a.class_weight[y];
  const A nll_go = go * (A(1) - eps) * weight_y;
  const A smooth_go = go * eps / static_cast<A>(g.num_classes);
  // r: each level's responsibility theta_l m_l / z for the target.
  auto responsibility = [&](int64_t l) { return std::exp(log_theta[l] + log_m[b * L + l] - log_z); };
  if (eps > A(0)) {
    smoothing_backward_classes(a, y, row, stats, theta, log_theta, nll_go * responsibility(L - 1),
                               smooth_go, out + g.offsets[L - 1], scratch);
  }
  const A* q = scratch + g.upper_width;
  const A* se = scratch;
  for (int64_t l = 0; l < L; ++l) {
    const T* x = row + g.offsets[l];
    T* gx = out + g.offsets[l];
    const int64_t n = g.sizes[l];
    const A max = stats[stat_index(0, kStatMax, l, L)];
    const A inv_sum = A(1) / stats[stat_index(0, kStatSum, l, L)];
    const A r = responsibility(l);
    if (l == L - 1) {
      if (eps > A(0)) continue;  // written with the smoothing pass
      const A scaled = nll_go * r;
      scaled_exp<T, A>(x, n, max, scaled * inv_sum, gx);
      gx[y] = static_cast<T>(scaled * (exp_approx(static_cast<A>(x[y]) - max) * inv_sum - A(1)));
    } else {
      // d/da_t = r (z_t - z_t Psi[t, y] / m_l); the target term is formed
      // from the logits relative to the target groups' own maximum, so that
      // it stays exact for extreme logits.
      const A* p = column + g.offsets[l];
      const A* scale = a.psi_scale == nullptr ? nullptr : a.psi_scale + g.offsets[l];
      const A group_max = stats[stat_index(0, kStatGroupMax, l, L)];
      const A inv_group_sum = A(1) / stats[stat_index(0, kStatGroupSum, l, L)];
      const A ratio_sum = stats[stat_index(0, kStatSmooth, l, L)];
      for (int64_t t = 0; t < n; ++t) {
        const A v = static_cast<A>(x[t]);
        const A e = exp_approx(v - max) * inv_sum;
        A val = e;
        const A weight = psi_weight(p, scale, t);
        if (weight > A(0)) val -= weight * exp_approx(v - group_max) * inv_group_sum;
        val *= nll_go * r;
        if (eps > A(0)) {
          const int64_t j = g.offsets[l] + t;
          val -= smooth_go * theta[l] * (se[j] * q[j] - e * ratio_sum);
        }
        gx[t] = static_cast<T>(val);
      }
    }
  }
}

// Non-template entry points so each can be compiled in several ISA versions.
#define LMM_FAST_DEFINE_ROWS(T, A, NAME)                                                   \
  LMM_FAST_MULTIVERSION void forward_rows_##NAME(const LossArgs<T, A>& a, int64_t begin,     \
                                                  int64_t end, T* loss, A* stats, A* log_m) { \
    std::vector<A> scratch(smoothing_scratch_size(a));                                      \
    for (int64_t b = begin; b < end; ++b)                                                   \
      forward_row<T, A>(a, b, loss, stats, log_m, scratch.data());                          \
  }                                                                                         \
  LMM_FAST_MULTIVERSION void backward_rows_##NAME(                                          \
      const LossArgs<T, A>& a, int64_t begin, int64_t end, const T* grad_loss,              \
      const A* stats, const A* log_m, T* grad) {                                            \
    std::vector<A> scratch(smoothing_scratch_size(a));                                      \
    for (int64_t b = begin; b < end; ++b)                                                   \
      backward_row<T, A>(a, b, grad_loss, stats, log_m, grad, scratch.data());              \
  }

LMM_FAST_DEFINE_ROWS(float, float, f32)
LMM_FAST_DEFINE_ROWS(double, double, f64)
LMM_FAST_DEFINE_ROWS(c10::Half, float, f16)
LMM_FAST_DEFINE_ROWS(c10::BFloat16, float, bf16)

void forward_rows(const LossArgs<float, float>& a, int64_t s, int64_t e, float* l, float* x, float* m) { forward_rows_f32(a, s, e, l, x, m); }
void forward_rows(const LossArgs<double, double>& a, int64_t s, int64_t e, double* l, double* x, double* m) { forward_rows_f64(a, s, e, l, x, m); }
void forward_rows(const LossArgs<c10::Half, float>& a, int64_t s, int64_t e, c10::Half* l, float* x, float* m) { forward_rows_f16(a, s, e, l, x, m); }
void forward_rows(const LossArgs<c10::BFloat16, float>& a, int64_t s, int64_t e, c10::BFloat16* l, float* x, float* m) { forward_rows_bf16(a, s, e, l, x, m); }
void backward_rows(const LossArgs<float, float>& a, int64_t s, int64_t e, const float* go, const float* x, const float* m, float* g) { backward_rows_f32(a, s, e, go, x, m, g); }
void backward_rows(const LossArgs<double, double>& a, int64_t s, int64_t e, const double* go, const double* x, const double* m, double* g) { backward_rows_f64(a, s, e, go, x, m, g); }
void backward_rows(const LossArgs<c10::Half, float>& a, int64_t s, int64_t e, const c10::Half* go, const float* x, const float* m, c10::Half* g) { backward_rows_f16(a, s, e, go, x, m, g); }
void backward_rows(const LossArgs<c10::BFloat16, float>& a, int64_t s, int64_t e, const c10::BFloat16* go, const float* x, const float* m, c10::BFloat16* g) { backward_rows_bf16(a, s, e, go, x, m, g); }

// The gradient of the logits is as large as the logits (165 MB for 4096 x
// 10110 floats). A fresh CPU allocation of that size is served by mmap, and
// first-touching its pages costs more than computing the gradient. So a loss
// module keeps the storage of its last gradient (FusedLMMLoss(grad_cache=True),
// lmm_fast/ops/loss.py) and offers it to the next backward through
// _offer_grad_storage, just before calling it on the same thread; the
// backward writes into it only when nothing else references that storage any
// more (the previous gradient has been consumed and freed), the way the CUDA
// caching allocator reuses device blocks. Nothing is offered: a fresh
// allocation. The storage lives as long as the module that owns it.
thread_local at::Tensor offered_grad_storage;

void offer_grad_storage(const std::optional<at::Tensor>& storage) {
  offered_grad_storage = storage.has_value() ? *storage : at::Tensor();
}

at::Tensor gradient_storage(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const at::Tensor holder = std::move(offered_grad_storage);
  offered_grad_storage = at::Tensor();  // an offer serves one call
  const size_t bytes = static_cast<size_t>(rows) * cols * options.dtype().itemsize();
  // use_count() == 1: only the holder refers to the storage, no gradient
  // handed out earlier is alive.
  if (holder.defined() && holder.storage().use_count() == 1 && holder.storage().nbytes() == bytes &&
      holder.dtype() == options.dtype() && holder.device() == options.device()) {
    return at::empty({0}, options).set_(holder.storage(), 0, {rows, cols}, {cols, 1});
  }
  return at::empty({rows, cols}, options);
}

int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lmm_loss_forward_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& psi_t_in,
    const at::Tensor& theta_in, c10::IntArrayRef level_sizes, int64_t ignore_index,
    const std::optional<at::Tensor>& psi_scale_in, const std::optional<at::Tensor>& weight_in,
    double label_smoothing) {
  const LossInputs in = check_loss_forward_inputs(logits_in, target_in, psi_t_in, theta_in, level_sizes,
      psi_scale_in, weight_in, label_smoothing);
  const LossGeometry& g = in.g;
  const at::Tensor& psi_scale = in.psi_scale;
  const at::Tensor& weight = in.weight;
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  check_target_values_host(target, g.num_classes, ignore_index);
  const auto acc = accumulate_type(logits.scalar_type());
  at::Tensor loss = at::empty({g.batch}, logits.options());
  at::Tensor stats = at::empty({g.batch, kStatRows * g.num_levels()}, logits.options().dtype(acc));
  at::Tensor log_m = at::empty({g.batch, g.num_levels()}, logits.options().dtype(acc));
  if (g.batch == 0) return {loss, stats, log_m};
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor log_theta = theta.log().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    LossArgs<scalar_t, A> args{logits.data_ptr<scalar_t>(), logits.stride(0),
                               target.data_ptr<int64_t>(), psi_t.data_ptr<A>(),
                               psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr,
                               theta.data_ptr<A>(), log_theta.data_ptr<A>(), &g, ignore_index,
                               weight.defined() ? weight.data_ptr<A>() : nullptr,
                               static_cast<A>(label_smoothing)};
    scalar_t* loss_p = loss.data_ptr<scalar_t>();
    A* stats_p = stats.data_ptr<A>();
    A* log_m_p = log_m.data_ptr<A>();
    const int64_t cost = label_smoothing > 0 ? g.num_classes * std::max<int64_t>(g.upper_width, 1) : g.width;
    at::parallel_for(0, g.batch, grain_rows(cost), [&](int64_t begin, int64_t end) {
      forward_rows(args, begin, end, loss_p, stats_p, log_m_p);
    });
  });
  return {loss, stats, log_m};
}

at::Tensor lmm_loss_backward_cpu(
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
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const at::Tensor log_m = log_m_in.contiguous();
  check_target_values_host(target, g.num_classes, ignore_index);
  at::Tensor grad = gradient_storage(g.batch, g.width, logits.options());
  if (g.batch == 0) return grad;
  const at::Tensor theta = theta_in.contiguous();
  const at::Tensor log_theta = theta.log().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    LossArgs<scalar_t, A> args{logits.data_ptr<scalar_t>(), logits.stride(0),
                               target.data_ptr<int64_t>(), psi_t.data_ptr<A>(),
                               psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr,
                               theta.data_ptr<A>(), log_theta.data_ptr<A>(), &g, ignore_index,
                               weight.defined() ? weight.data_ptr<A>() : nullptr,
                               static_cast<A>(label_smoothing)};
    const scalar_t* go = grad_loss.data_ptr<scalar_t>();
    const A* stats_p = stats.data_ptr<A>();
    const A* log_m_p = log_m.data_ptr<A>();
    scalar_t* grad_p = grad.data_ptr<scalar_t>();
    const int64_t cost = label_smoothing > 0 ? g.num_classes * std::max<int64_t>(g.upper_width, 1) : g.width;
    at::parallel_for(0, g.batch, grain_rows(cost), [&](int64_t begin, int64_t end) {
      backward_rows(args, begin, end, go, stats_p, log_m_p, grad_p);
    });
  });
  return grad;
}

}  // namespace

// No tensor to dispatch on when nothing is offered: one kernel for every key.
TORCH_LIBRARY_IMPL(lmm_fast, CompositeExplicitAutograd, m) {
  m.impl("_offer_grad_storage", &offer_grad_storage);
}

TORCH_LIBRARY_IMPL(lmm_fast, CPU, m) {
  m.impl("lmm_loss_forward", &lmm_loss_forward_cpu);
  m.impl("lmm_loss_backward", &lmm_loss_backward_cpu);
}

}  // namespace lmm_fast
