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

#include "cpu/vec_math.h"
#include "loss_common.h"

namespace lmm_fast {
namespace {

using vec::exp8;
using vec::exp_approx;
using vec::f32x8;
using vec::load8;
using vec::row_max;
using vec::row_sum_exp;
using vec::splat8;
using vec::store8;

// out[t] = scale * exp(x[t] - shift): the bottom level's backward.
template <typename T, typename A>
LMM_FAST_INLINE void scaled_exp(const T* x, int64_t n, A shift, A scale, T* out) {
  for (int64_t t = 0; t < n; ++t) out[t] = static_cast<T>(scale * exp_approx(static_cast<A>(x[t]) - shift));
}

template <>
LMM_FAST_INLINE void scaled_exp<float, float>(const float* x, int64_t n, float shift, float scale, float* out) {
  const f32x8 sh = splat8(shift), sc = splat8(scale);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) store8(out + t, sc * exp8(load8(x + t) - sh));
  for (; t < n; ++t) out[t] = scale * exp_approx(x[t] - shift);
}

// log(sum_t exp(x_t) * p_t) over the t with p_t > 0, stable for any logits;
// -inf when the class has no weight in this level.
// Psi weight of group t: psi_t's entry times the group's factor, if any.
template <typename A>
LMM_FAST_INLINE A psi_weight(const A* p, const A* scale, int64_t t) {
  return scale == nullptr ? p[t] : p[t] * scale[t];
}

template <typename T, typename A>
LMM_FAST_INLINE A weighted_log_sum_exp(const T* x, const A* p, const A* scale, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t t = 0; t < n; ++t) {
    A v = static_cast<A>(x[t]);
    m = (psi_weight(p, scale, t) > A(0) && v > m) ? v : m;
  }
  if (m == -std::numeric_limits<A>::infinity()) return m;
  A w = 0;
  for (int64_t t = 0; t < n; ++t) {
    const A weight = psi_weight(p, scale, t);
    if (weight > A(0)) w += weight * exp_approx(static_cast<A>(x[t]) - m);
  }
  return m + std::log(w);
}

template <typename A>
LMM_FAST_INLINE A log_add(A a, A b) {
  if (a == -std::numeric_limits<A>::infinity()) return b;
  if (b == -std::numeric_limits<A>::infinity()) return a;
  A hi = a > b ? a : b;
  A lo = a > b ? b : a;
  return hi + std::log1p(std::exp(lo - hi));
}

template <typename T, typename A>
struct LossArgs {
  const T* logits;
  int64_t row_stride;
  const int64_t* target;
  const A* psi_t;
  const A* psi_scale;  // nullptr: psi_t holds Psi itself
  const A* log_theta;
  const LossGeometry* geo;
  int64_t ignore_index;
};

template <typename T, typename A>
LMM_FAST_INLINE void forward_row(const LossArgs<T, A>& a, int64_t b, T* loss, A* lse, A* log_m) {
  const LossGeometry& g = *a.geo;
  const int64_t L = g.num_levels();
  const int64_t y = a.target[b];
  if (y == a.ignore_index) {
    loss[b] = T(0);
    for (int64_t l = 0; l < L; ++l) {
      lse[b * L + l] = A(0);
      log_m[b * L + l] = A(0);
    }
    return;
  }
  const T* row = a.logits + b * a.row_stride;
  const A* column = a.psi_t + y * g.upper_width;
  const A* log_theta = a.log_theta + b * g.theta_row_stride;
  A log_z = -std::numeric_limits<A>::infinity();
  for (int64_t l = 0; l < L; ++l) {
    const T* x = row + g.offsets[l];
    const int64_t n = g.sizes[l];
    const A mx = row_max<T, A>(x, n);
    const A level_lse = mx + std::log(row_sum_exp<T, A>(x, n, mx));
    A vote;
    if (l == L - 1) {
      vote = static_cast<A>(x[y]) - level_lse;
    } else {
      const A* scale = a.psi_scale == nullptr ? nullptr : a.psi_scale + g.offsets[l];
      vote = weighted_log_sum_exp<T, A>(x, column + g.offsets[l], scale, n) - level_lse;
    }
    lse[b * L + l] = level_lse;
    log_m[b * L + l] = vote;
    log_z = log_add(log_z, log_theta[l] + vote);
  }
  loss[b] = static_cast<T>(-log_z);
}

template <typename T, typename A>
LMM_FAST_INLINE void backward_row(const LossArgs<T, A>& a, int64_t b, const T* grad_loss,
                                  const A* lse, const A* log_m, T* grad) {
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
  const A* column = a.psi_t + y * g.upper_width;
  const A* log_theta = a.log_theta + b * g.theta_row_stride;
  A log_z = -std::numeric_limits<A>::infinity();
  for (int64_t l = 0; l < L; ++l) log_z = log_add(log_z, log_theta[l] + log_m[b * L + l]);
  for (int64_t l = 0; l < L; ++l) {
    const T* x = row + g.offsets[l];
    T* gx = out + g.offsets[l];
    const int64_t n = g.sizes[l];
    const A level_lse = lse[b * L + l];
    // r: this level's responsibility theta_l m_l / z for the target.
    const A r = std::exp(log_theta[l] + log_m[b * L + l] - log_z);
    const A scaled = go * r;
    if (l == L - 1) {
      scaled_exp<T, A>(x, n, level_lse, scaled, gx);
      gx[y] = static_cast<T>(scaled * (std::exp(static_cast<A>(x[y]) - level_lse) - A(1)));
    } else {
      // d/da_t = r z_t - theta_l z_t Psi[t, y] / z_y; the second term is
      // formed in log space so that it stays finite for extreme logits.
      const A* p = column + g.offsets[l];
      const A* scale = a.psi_scale == nullptr ? nullptr : a.psi_scale + g.offsets[l];
      const A shift = log_theta[l] - log_z;
      for (int64_t t = 0; t < n; ++t) {
        const A v = static_cast<A>(x[t]) - level_lse;
        A val = r * exp_approx(v);
        const A weight = psi_weight(p, scale, t);
        if (weight > A(0)) val -= weight * exp_approx(v + shift);
        gx[t] = static_cast<T>(go * val);
      }
    }
  }
}

// Non-template entry points so each can be compiled in several ISA versions.
#define LMM_FAST_DEFINE_ROWS(T, A, NAME)                                              \
  LMM_FAST_MULTIVERSION void forward_rows_##NAME(const LossArgs<T, A>& a, int64_t begin, \
                                                  int64_t end, T* loss, A* lse, A* log_m) { \
    for (int64_t b = begin; b < end; ++b) forward_row<T, A>(a, b, loss, lse, log_m);       \
  }                                                                                     \
  LMM_FAST_MULTIVERSION void backward_rows_##NAME(                                      \
      const LossArgs<T, A>& a, int64_t begin, int64_t end, const T* grad_loss,          \
      const A* lse, const A* log_m, T* grad) {                                          \
    for (int64_t b = begin; b < end; ++b)                                               \
      backward_row<T, A>(a, b, grad_loss, lse, log_m, grad);                            \
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
// first-touching its pages costs more than computing the gradient. So the
// storage of the last gradient is kept and handed out again once nothing
// else references it (the previous step's gradient has been consumed and
// freed), the way the CUDA caching allocator reuses device blocks. Set
// LMM_FAST_CPU_GRAD_CACHE=0 to allocate afresh every call.
class GradientStorageCache {
 public:
  at::Tensor get(int64_t rows, int64_t cols, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(rows) * cols * options.dtype().itemsize();
    if (!enabled() || bytes < kMinBytes) return at::empty({rows, cols}, options);
    std::lock_guard<std::mutex> lock(mutex_);
    // holder_ owns the storage; every tensor handed out adds a reference.
    if (!holder_.defined() || holder_.storage().use_count() != 1 ||
        holder_.storage().nbytes() != bytes || holder_.dtype() != options.dtype()) {
      holder_ = at::Tensor();
      holder_ = at::empty({rows, cols}, options);
    }
    return at::empty({0}, options).set_(holder_.storage(), 0, {rows, cols}, {cols, 1});
  }

 private:
  static bool enabled() {
    static const bool on = [] {
      const char* value = std::getenv("LMM_FAST_CPU_GRAD_CACHE");
      return value == nullptr || std::string(value) != "0";
    }();
    return on;
  }
  static constexpr size_t kMinBytes = size_t(1) << 22;  // small buffers come from malloc's free lists
  std::mutex mutex_;
  at::Tensor holder_;
};

GradientStorageCache& gradient_cache() {
  static GradientStorageCache cache;
  return cache;
}

int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lmm_loss_forward_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& psi_t_in,
    const at::Tensor& theta, c10::IntArrayRef level_sizes, int64_t ignore_index,
    const std::optional<at::Tensor>& psi_scale_in) {
  const LossGeometry g = check_loss_inputs(logits_in, target_in, psi_t_in, theta, level_sizes);
  const at::Tensor psi_scale = check_psi_scale(psi_scale_in, g, logits_in);
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  check_target_values_host(target, g.num_classes, ignore_index);
  const auto acc = accumulate_type(logits.scalar_type());
  at::Tensor loss = at::empty({g.batch}, logits.options());
  at::Tensor lse = at::empty({g.batch, g.num_levels()}, logits.options().dtype(acc));
  at::Tensor log_m = at::empty({g.batch, g.num_levels()}, logits.options().dtype(acc));
  if (g.batch == 0) return {loss, lse, log_m};
  const at::Tensor log_theta = theta.log().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_forward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    LossArgs<scalar_t, A> args{logits.data_ptr<scalar_t>(), logits.stride(0),
                               target.data_ptr<int64_t>(), psi_t.data_ptr<A>(),
                               psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr,
                               log_theta.data_ptr<A>(), &g, ignore_index};
    scalar_t* loss_p = loss.data_ptr<scalar_t>();
    A* lse_p = lse.data_ptr<A>();
    A* log_m_p = log_m.data_ptr<A>();
    at::parallel_for(0, g.batch, grain_rows(g.width), [&](int64_t begin, int64_t end) {
      forward_rows(args, begin, end, loss_p, lse_p, log_m_p);
    });
  });
  return {loss, lse, log_m};
}

at::Tensor lmm_loss_backward_cpu(
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
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor psi_t = psi_t_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor log_m = log_m_in.contiguous();
  check_target_values_host(target, g.num_classes, ignore_index);
  at::Tensor grad = gradient_cache().get(g.batch, g.width, logits.options());
  if (g.batch == 0) return grad;
  const at::Tensor log_theta = theta.log().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_loss_backward_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    LossArgs<scalar_t, A> args{logits.data_ptr<scalar_t>(), logits.stride(0),
                               target.data_ptr<int64_t>(), psi_t.data_ptr<A>(),
                               psi_scale.defined() ? psi_scale.data_ptr<A>() : nullptr,
                               log_theta.data_ptr<A>(), &g, ignore_index};
    const scalar_t* go = grad_loss.data_ptr<scalar_t>();
    const A* lse_p = lse.data_ptr<A>();
    const A* log_m_p = log_m.data_ptr<A>();
    scalar_t* grad_p = grad.data_ptr<scalar_t>();
    at::parallel_for(0, g.batch, grain_rows(g.width), [&](int64_t begin, int64_t end) {
      backward_rows(args, begin, end, go, lse_p, log_m_p, grad_p);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmm_fast, CPU, m) {
  m.impl("lmm_loss_forward", &lmm_loss_forward_cpu);
  m.impl("lmm_loss_backward", &lmm_loss_backward_cpu);
}

}  // namespace lmm_fast
