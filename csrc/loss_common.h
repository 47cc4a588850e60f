// Host-side argument checks and the per-row math shared by the CPU and CUDA
// loss kernels (the math is __host__ __device__ under nvcc).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define LMM_FAST_HD __host__ __device__ __forceinline__
#else
#define LMM_FAST_HD inline
#endif

namespace lmm_fast {

// The dtype every statistic, Psi and theta are held in for a given logits
// dtype: float64 logits accumulate in float64, everything else in float32.
inline c10::ScalarType accumulate_type(c10::ScalarType logits_dtype) {
  return logits_dtype == c10::ScalarType::Double ? c10::ScalarType::Double
                                                 : c10::ScalarType::Float;
}

struct LossGeometry {
  int64_t batch = 0;
  int64_t width = 0;          // sum of all level sizes
  int64_t num_classes = 0;    // bottom level size N
  int64_t upper_width = 0;    // sum of the upper level sizes
  std::vector<int64_t> sizes; // per level, top first
  std::vector<int64_t> offsets;  // column offset of each level in the logits
  int64_t theta_row_stride = 0;  // 0: one theta for all rows; L: one per row
  int64_t num_levels() const { return static_cast<int64_t>(sizes.size()); }
};

// Checks every op that takes packed logits shares, in the order the ops
// apply them.
inline void check_logits_matrix(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2,
      "lmm_fast: logits must be 2-D [batch, sum(level_sizes)], got ",
      logits.dim(), "-D with shape ", logits.sizes());
}

inline void check_logits_dtype(const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ||
                  dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16,
      "lmm_fast: logits must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_theta_dtype(const at::Tensor& theta, const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(theta.scalar_type() == accumulate_type(dtype),
      "lmm_fast: theta must be ", accumulate_type(dtype), " for ", dtype, " logits, got ",
      theta.scalar_type());
}

// The level layout of the packed logits; their width must match it.
inline LossGeometry level_geometry(const at::Tensor& logits, c10::IntArrayRef level_sizes) {
  TORCH_CHECK(!level_sizes.empty(), "lmm_fast: level_sizes must not be empty");
  LossGeometry g;
  g.batch = logits.size(0);
  int64_t offset = 0;
  for (size_t l = 0; l < level_sizes.size(); ++l) {
    TORCH_CHECK(level_sizes[l] > 0,
        "lmm_fast: level_sizes[", l, "] must be positive, got ", level_sizes[l]);
    g.sizes.push_back(level_sizes[l]);
    g.offsets.push_back(offset);
    offset += level_sizes[l];
  }
  g.width = offset;
  g.num_classes = level_sizes.back();
  g.upper_width = offset - g.num_classes;
  TORCH_CHECK(logits.size(1) == g.width,
      "lmm_fast: logits has ", logits.size(1),
      " columns but the levels need sum(level_sizes) = ", g.width);
  return g;
}

// theta is shared by all rows ([L]) or given per row ([B, L], e.g. from a
// gating network).
inline void set_theta_layout(LossGeometry& g, const at::Tensor& theta) {
  TORCH_CHECK((theta.dim() == 1 && theta.size(0) == g.num_levels()) ||
                  (theta.dim() == 2 && theta.size(0) == g.batch &&
                   theta.size(1) == g.num_levels()),
      "lmm_fast: theta must have one weight per level, [", g.num_levels(),
      "] or per row [", g.batch, ", ", g.num_levels(), "], got shape ", theta.sizes());
  g.theta_row_stride = theta.dim() == 2 ? g.num_levels() : 0;
}

inline LossGeometry check_loss_inputs(
    const at::Tensor& logits,
    const at::Tensor& target,
    const at::Tensor& psi_t,
    const at::Tensor& theta,
    c10::IntArrayRef level_sizes) {
  check_logits_matrix(logits);
  TORCH_CHECK(target.dim() == 1,
      "lmm_fast: target must be 1-D [batch], got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == c10::ScalarType::Long,
      "lmm_fast: target must be int64 (long) class indices, got ",
      target.scalar_type());
  TORCH_CHECK(target.size(0) == logits.size(0),
      "lmm_fast: target has ", target.size(0), " rows but logits has ",
      logits.size(0));
  check_logits_dtype(logits);
  const auto dtype = logits.scalar_type();
  const auto acc = accumulate_type(dtype);
  TORCH_CHECK(psi_t.scalar_type() == acc,
      "lmm_fast: psi_t must be ", acc, " for ", dtype, " logits, got ",
      psi_t.scalar_type());
  check_theta_dtype(theta, logits);
  for (const auto& [t, name] : {std::pair{&target, "target"}, std::pair{&psi_t, "psi_t"},
                                std::pair{&theta, "theta"}}) {
    TORCH_CHECK(t->device() == logits.device(),
        "lmm_fast: ", name, " must be on the logits' device ", logits.device(), ", got ", t->device());
  }
  LossGeometry g = level_geometry(logits, level_sizes);
  TORCH_CHECK(psi_t.dim() == 2 && psi_t.size(0) == g.num_classes &&
                  psi_t.size(1) == g.upper_width,
      "lmm_fast: psi_t must be [N, sum(upper level sizes)] = [", g.num_classes,
      ", ", g.upper_width, "], got ", psi_t.sizes());
  set_theta_layout(g, theta);
  return g;
}

// Validates the optional per-group Psi factors; returns a contiguous tensor
// (undefined when absent).
inline at::Tensor check_psi_scale(const std::optional<at::Tensor>& psi_scale,
                                  const LossGeometry& g, const at::Tensor& logits) {
  if (!psi_scale.has_value() || !psi_scale->defined()) return at::Tensor();
  const at::Tensor& s = *psi_scale;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == g.upper_width,
      "lmm_fast: psi_scale must be [sum(upper level sizes)] = [", g.upper_width,
      "], got shape ", s.sizes());
  TORCH_CHECK(s.scalar_type() == accumulate_type(logits.scalar_type()),
      "lmm_fast: psi_scale must be ", accumulate_type(logits.scalar_type()), ", got ",
      s.scalar_type());
  TORCH_CHECK(s.device() == logits.device(),
      "lmm_fast: psi_scale must be on the logits' device ", logits.device(), ", got ", s.device());
  return s.contiguous();
}

// stats: [batch, rows * levels]: log_m (rows = 1) or the saved row
// statistics lse (rows = kStatRows).
inline void check_stats(const at::Tensor& stats, const char* name,
                        const LossGeometry& g, const at::Tensor& logits, int64_t rows = 1) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == g.batch &&
                  stats.size(1) == rows * g.num_levels(),
      "lmm_fast: ", name, " must be [batch, ", (rows > 1 ? std::to_string(rows) + " * " : std::string()),
      "levels] = [", g.batch, ", ", rows * g.num_levels(), "], got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == accumulate_type(logits.scalar_type()),
      "lmm_fast: ", name, " must be ", accumulate_type(logits.scalar_type()),
      ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == logits.device(),
      "lmm_fast: ", name, " must be on the logits' device ", logits.device(), ", got ", stats.device());
}

// Target values as the CPU kernels check them (target: a CPU tensor):
// class indices in [0, N) or ignore_index; names the first bad row.
inline void check_target_values_host(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t b = 0; b < target.numel(); ++b) {
    TORCH_CHECK(t[b] == ignore_index || (t[b] >= 0 && t[b] < num_classes),
        "lmm_fast: target[", b, "] = ", t[b], " is out of range: class indices must be in [0, ",
        num_classes, ") or equal ignore_index (", ignore_index, ")");
  }
}

// The same check on the target's own device, before a launch: one reduction
// and one read back (a host sync); only a failing batch is copied to the
// host, for the same message as on the CPU.
inline void check_target_values(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  if (target.numel() == 0) return;
  const bool bad = target.ne(ignore_index)
                       .logical_and(target.lt(0).logical_or(target.ge(num_classes)))
                       .any()
                       .item<bool>();
  if (bad) check_target_values_host(target.cpu().contiguous(), num_classes, ignore_index);
}

// Logits only need unit stride along the columns; rows may be strided.
inline at::Tensor rows_contiguous(const at::Tensor& logits) {
  if (logits.size(1) <= 1 || logits.stride(1) == 1) return logits;
  return logits.contiguous();
}

// Optional per-class weights [N] of the loss (nn.CrossEntropyLoss's weight);
// returns a contiguous tensor, undefined when absent.
inline at::Tensor check_class_weight(const std::optional<at::Tensor>& weight,
                                     const LossGeometry& g, const at::Tensor& logits) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == g.num_classes,
      "lmm_fast: weight must be [N] = [", g.num_classes, "] (one weight per class), got shape ",
      w.sizes());
  TORCH_CHECK(w.scalar_type() == accumulate_type(logits.scalar_type()),
      "lmm_fast: weight must be ", accumulate_type(logits.scalar_type()), " for ",
      logits.scalar_type(), " logits, got ", w.scalar_type());
  TORCH_CHECK(w.device() == logits.device(),
      "lmm_fast: weight must be on ", logits.device(), ", got ", w.device());
  return w.contiguous();
}

inline void check_label_smoothing(double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
      "lmm_fast: label_smoothing must be in [0, 1], got ", label_smoothing);
}

// The inputs of the loss ops, checked alike on every backend.
struct LossInputs {
  LossGeometry g;
  at::Tensor psi_scale;  // undefined when not given
  at::Tensor weight;     // undefined when not given
};

// ------------------------------------------------------------ per-row math
//
// The forward saves, per row and level, kStatRows statistics (the op's `lse`
// output, [B, kStatRows * L]: kStatRows blocks of L per row):
//   kStatMax, kStatSum: the level's largest logit and sum_t exp(a_t - max)
//       (in [1, N_l]), its log-sum-exp in two parts;
//   kStatGroupMax, kStatGroupSum: the same restricted to the groups that hold
//       the target y, weighted by Psi[t, y] (for the bottom level: a_y and 1),
//       so that log m^l_y = (group_max - max) + log(group_sum / sum);
//   kStatSmooth: with label smoothing, sum_c w_c m^l_c / z_c (the smoothing
//       term's theta-gradient up to -eps/N); 0 without.
// No large sum is ever formed: a float32 max of 1e8 has an ulp of 8, so max +
// log(sum) would round the log away (and with it every Psi weight). Each
// difference of logits is taken first and the sums divide, as softmax does:
// the backward's z_t is exp(a_t - max) / sum and its target term z_t Psi[t, y]
// / m^l_y is Psi[t, y] exp(a_t - group_max) / group_sum, never the exp of a
// difference of two huge logs.
constexpr int kStatRows = 5;
constexpr int kStatMax = 0;
constexpr int kStatSum = 1;
constexpr int kStatGroupMax = 2;
constexpr int kStatGroupSum = 3;
constexpr int kStatSmooth = 4;

// lmm_loss_forward's: logits, target, Psi, theta and the options.
inline LossInputs check_loss_forward_inputs(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& psi_t, const at::Tensor& theta,
    c10::IntArrayRef level_sizes, const std::optional<at::Tensor>& psi_scale,
    const std::optional<at::Tensor>& weight, double label_smoothing) {
  LossInputs in{check_loss_inputs(logits, target, psi_t, theta, level_sizes), {}, {}};
  in.psi_scale = check_psi_scale(psi_scale, in.g, logits);
  in.weight = check_class_weight(weight, in.g, logits);
  check_label_smoothing(label_smoothing);
  return in;
}

// lmm_loss_backward's: the forward's, the saved statistics and grad_loss.
inline LossInputs check_loss_backward_inputs(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& psi_t,
    const at::Tensor& theta, const at::Tensor& stats, const at::Tensor& log_m, c10::IntArrayRef level_sizes,
    const std::optional<at::Tensor>& psi_scale, const std::optional<at::Tensor>& weight, double label_smoothing,
    int stat_rows = kStatRows) {
  LossInputs in = check_loss_forward_inputs(logits, target, psi_t, theta, level_sizes, psi_scale, weight,
                                            label_smoothing);
  check_stats(stats, "lse", in.g, logits, stat_rows);
  check_stats(log_m, "log_m", in.g, logits);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == in.g.batch,
      "lmm_fast: grad_loss must be [batch] = [", in.g.batch, "], got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == logits.scalar_type(),
      "lmm_fast: grad_loss must have the logits' dtype ", logits.scalar_type(),
      ", got ", grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.device() == logits.device(),
      "lmm_fast: grad_loss must be on the logits' device ", logits.device(), ", got ", grad_loss.device());
  return in;
}

LMM_FAST_HD int64_t stat_index(int64_t row, int stat, int64_t level, int64_t num_levels) {
  return (row * kStatRows + stat) * num_levels + level;
}

template <typename A>
LMM_FAST_HD A log_add(A a, A b) {
  using std::exp;
  using std::log1p;
  if (a == -std::numeric_limits<A>::infinity()) return b;
  if (b == -std::numeric_limits<A>::infinity()) return a;
  const A hi = a > b ? a : b;
  const A lo = a > b ? b : a;
  return hi + log1p(exp(lo - hi));
}

// log softmax(a)_t of a level from its (max, log of the sum): the maximum
// is subtracted first, as log_softmax does.
template <typename A>
LMM_FAST_HD A log_softmax_of(A logit, A level_max, A level_log_sum) {
  return (logit - level_max) - level_log_sum;
}

// log m^l_y of a level from the log-sum-exp restricted to the groups that
// hold y (group_max, group_sum = sum_t Psi[t, y] exp(a_t - group_max)) and
// the level's own: every large term cancels before the small ones are added.
template <typename A>
LMM_FAST_HD A relative_vote(A group_max, A group_sum, A level_max, A level_sum) {
  using std::log;
  if (group_max == -std::numeric_limits<A>::infinity()) return group_max;
  return (group_max - level_max) + log(group_sum / level_sum);
}

// The per-row loss of a class-index target as F.cross_entropy(weight,
// label_smoothing) forms it: (1 - eps) w_y (-log z_y) + (eps / N) sum_c w_c
// (-log z_c); smooth_sum is sum_c w_c log z_c (unused when eps == 0).
template <typename A>
LMM_FAST_HD A combine_loss(A log_z_y, A weight_y, A eps, A smooth_sum, int64_t num_classes) {
  const A nll = -log_z_y * weight_y;
  if (eps == A(0)) return nll;
  return (A(1) - eps) * nll - eps * smooth_sum / static_cast<A>(num_classes);
}

// Below this, a class's mixture probability is rebuilt in log space, and its
// inverse (the smoothing gradient's weight) is capped at 1 / kTinyMixture.
template <typename A>
LMM_FAST_HD A tiny_mixture() { return sizeof(A) == sizeof(float) ? A(1e-30f) : A(1e-290); }

// One class c of the label-smoothing term: z_c = theta_L p_c + upper, where
// log_bottom = log theta_L + log p_c (p_c: bottom softmax), bottom =
// theta_L p_c as a number, upper = sum_{l<L} theta_l m^l_c.
template <typename A>
struct ClassMixture {
  A log_z;         // log z_c (0 when not asked for and z_c is not tiny)
  A inv_z;         // 1 / z_c (capped for vanishing z_c)
  A bottom_ratio;  // p_c / z_c
};

template <typename A>
LMM_FAST_HD ClassMixture<A> class_mixture(A log_theta_bottom, A log_p, A p, A theta_bottom, A upper,
                                          bool want_log = true) {
  using std::exp;
  using std::log;
  const A tiny = tiny_mixture<A>();
  const A z = theta_bottom * p + upper;
  ClassMixture<A> out;
  if (z > tiny) {
    out.log_z = want_log ? log(z) : A(0);  // the backward needs only 1 / z here
    out.inv_z = A(1) / z;
    out.bottom_ratio = p * out.inv_z;
  } else {
    // Both shares may have underflowed: keep the bottom level's in log space,
    // which also keeps F.cross_entropy's value at theta = (0, ..., 0, 1).
    const A log_bottom = log_theta_bottom + log_p;
    out.log_z = upper > A(0) ? log_add(log_bottom, A(log(upper))) : log_bottom;
    out.inv_z = A(1) / tiny;
    out.bottom_ratio = exp(log_p - out.log_z);
  }
  return out;
}

}  // namespace lmm_fast
