// Math and host-side checks shared by the CPU and CUDA collapsed Gibbs kernels.
//
// One draw of an image's group label at one level (paper Eq. 4):
//
//   w_t = exp(-(max a - a_t)) * (Omega'[t, y] + beta_y) * (1 / (n'_t + beta_0))
//
// where Omega' and n' exclude the image's own current label. To give the same
// label on every device, for any thread count and summation order:
//   * w_t is computed in float32 with plain IEEE operations (+, -, *, / are
//     correctly rounded everywhere) and a polynomial exp built from them; no
//     libm call, no fused multiply-add (device code uses the __f*_rn
//     intrinsics, which the compiler never contracts; the CPU file turns
//     contraction off);
//   * the weights are turned into 40-bit fixed-point integers relative to the
//     largest one (a power-of-two scale, so exactly), whose sums are exact and
//     therefore independent of the order of summation;
//   * the inverse CDF is taken in integers: with 64 random bits r and the
//     integer total Q, the target is floor(r * Q / 2^64) and the label the
//     first t whose inclusive prefix sum exceeds it.
// The weights carry float32 rounding (a few 1e-7 relative, the exp included)
// and the quantisation at most 2^-40 of the largest weight per candidate:
// both far below what any feasible number of draws can detect.
#pragma once

#include <cstdint>
#include <cstring>

#include "philox.h"

namespace lmm_fast {
namespace gibbs {

// Fixed-point bits of the largest weight; sums of up to 2^22 candidates stay
// below 2^63.
constexpr int kFixedBits = 40;
constexpr int64_t kMaxGroups = int64_t(1) << 22;

LMM_FAST_HOST_DEVICE float add_rn(float a, float b) {
#if LMM_FAST_DEVICE_PATH
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LMM_FAST_HOST_DEVICE float sub_rn(float a, float b) {
#if LMM_FAST_DEVICE_PATH
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LMM_FAST_HOST_DEVICE float mul_rn(float a, float b) {
#if LMM_FAST_DEVICE_PATH
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LMM_FAST_HOST_DEVICE float div_rn(float a, float b) {
#if LMM_FAST_DEVICE_PATH
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LMM_FAST_HOST_DEVICE double dadd_rn(double a, double b) {
#if LMM_FAST_DEVICE_PATH
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
LMM_FAST_HOST_DEVICE double dmul_rn(double a, double b) {
#if LMM_FAST_DEVICE_PATH
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
LMM_FAST_HOST_DEVICE double ddiv_rn(double a, double b) {
#if LMM_FAST_DEVICE_PATH
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// Eq. 6 in the factored form the loss reads, Psi[t, y] = psi_t[y, t] *
// psi_scale[t]: the numerator Omega[t, y] + beta_y and the group factor
// 1 / (n_t + beta0), each formed in float64 from the integer counts (never
// accumulated, so every entry is a pure function of the current counts and
// incremental updates equal a rebuild bit for bit) and rounded once to Psi's
// dtype by the caller.
LMM_FAST_HOST_DEVICE double psi_numerator(int32_t count, float beta) {
  return dadd_rn(static_cast<double>(count), static_cast<double>(beta));
}
LMM_FAST_HOST_DEVICE double psi_group_scale(int32_t total, double beta0) {
  return ddiv_rn(1.0, dadd_rn(static_cast<double>(total), beta0));
}

LMM_FAST_HOST_DEVICE int64_t double_to_bits(double d) {
#if LMM_FAST_DEVICE_PATH
  return __double_as_longlong(d);
#else
  int64_t i;
  std::memcpy(&i, &d, sizeof(i));
  return i;
#endif
}

LMM_FAST_HOST_DEVICE double bits_to_double(int64_t bits) {
#if LMM_FAST_DEVICE_PATH
  return __longlong_as_double(bits);
#else
  double d;
  std::memcpy(&d, &bits, sizeof(d));
  return d;
#endif
}

LMM_FAST_HOST_DEVICE uint32_t float_to_bits(float f) {
#if LMM_FAST_DEVICE_PATH
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LMM_FAST_HOST_DEVICE float uint_bits_to_float(uint32_t u) {
#if LMM_FAST_DEVICE_PATH
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// exp(-y) for y >= 0 (Cephes range reduction and degree-6 polynomial, about
// 1 ulp), bit-identical on every IEEE machine. y above about 87.7, +inf, NaN
// and (invalid here) negative y give 0.
LMM_FAST_HOST_DEVICE float exp_negated(float y) {
  // Clamp on the bits, where it is one unsigned min: a float compare would
  // keep the CPU loop from vectorising. Non-negative floats order like their
  // bit patterns; +inf, NaN and negative numbers all read as larger than 88.
  constexpr uint32_t kBits88 = 0x42B00000u;
  // -0 + 0 = +0: y = -0 arises as max - logit when the max is a -0 logit and
  // another logit is +0; it must count as 0, not as a negative number.
  uint32_t bits = float_to_bits(add_rn(y, 0.0f));
  bits = bits < kBits88 ? bits : kBits88;
  const float x = uint_bits_to_float(bits | 0x80000000u);  // -y, in [-88, 0]
  // Adding and removing 1.5 * 2^23 rounds to the nearest integer without a
  // libm call (valid for |v| < 2^22).
  const float v = mul_rn(x, 1.44269504088896341f);
  const float n = sub_rn(add_rn(v, 12582912.0f), 12582912.0f);
  const float r = add_rn(sub_rn(x, mul_rn(n, 0.693359375f)), mul_rn(n, 2.12194440e-4f));
  const float r2 = mul_rn(r, r);
  float p = 1.9875691500e-4f;
  p = add_rn(mul_rn(p, r), 1.3981999507e-3f);
  p = add_rn(mul_rn(p, r), 8.3334519073e-3f);
  p = add_rn(mul_rn(p, r), 4.1665795894e-2f);
  p = add_rn(mul_rn(p, r), 1.6666665459e-1f);
  p = add_rn(mul_rn(p, r), 5.0000001201e-1f);
  p = add_rn(add_rn(mul_rn(p, r2), r), 1.0f);
  // n >= -127 after the clamp, so the biased exponent is >= 0; 0 gives +0.
  const uint32_t biased = static_cast<uint32_t>(static_cast<int32_t>(n) + 127);
  return mul_rn(p, uint_bits_to_float(biased << 23));
}

// 1 / (n_t + beta0) of a group in float32. The CPU forms it once per group
// and call, the device per candidate: the same bits either way.
LMM_FAST_HOST_DEVICE float group_reciprocal(int32_t total, float beta0) {
  return div_rn(1.0f, add_rn(static_cast<float>(total), beta0));
}

// Unnormalised probability of one candidate group (see the top of the file):
// exp(-(max - logit)) * ((count + beta_y) * reciprocal), with the group's
// group_reciprocal. Anything but a positive finite number (only inconsistent
// counts or NaN logits lead there) is 0, so the candidate cannot be drawn.
LMM_FAST_HOST_DEVICE float candidate_weight(float logit, float max_logit, int32_t count,
                                            float reciprocal, float beta_y) {
  const float e = exp_negated(sub_rn(max_logit, logit));
  const float numerator = add_rn(static_cast<float>(count), beta_y);
  const uint32_t bits = float_to_bits(mul_rn(e, mul_rn(numerator, reciprocal)));
  // Positive finite floats are the patterns 1 .. 0x7f7fffff (integer select,
  // as in exp_negated).
  return uint_bits_to_float(bits - 1u < 0x7F7FFFFFu ? bits : 0u);
}

// Power-of-two scale that maps the largest weight into [2^39, 2^40).
LMM_FAST_HOST_DEVICE double fixed_point_scale(float max_weight) {
  // Exponent of max_weight read from its bits, so that host and device agree
  // without frexp; subnormal weights (below 2^-126) use the smallest exponent.
  int32_t exponent = static_cast<int32_t>((float_to_bits(max_weight) >> 23) & 0xffu) - 127;
  exponent = exponent > -126 ? exponent : -126;
  // 2^(kFixedBits - 1 - exponent) built from its bits: the exponent field
  // stays within double's normal range for every float exponent.
  const int64_t e = static_cast<int64_t>(kFixedBits - 1 - exponent) + 1023;
  return bits_to_double(e << 52);
}

// round-to-nearest(w * scale) as an integer: adding 2^52 puts the integer
// part in the low mantissa bits (exact for values below 2^52).
LMM_FAST_HOST_DEVICE uint64_t quantize(float w, double scale) {
  const double shifted = dadd_rn(dmul_rn(static_cast<double>(w), scale), 4503599627370496.0);
  return static_cast<uint64_t>(double_to_bits(shifted) - int64_t(0x4330000000000000));
}

// floor(r * total / 2^64): a uniform integer in [0, total).
LMM_FAST_HOST_DEVICE uint64_t scale_draw(uint64_t r, uint64_t total) {
#if LMM_FAST_DEVICE_PATH
  return __umul64hi(r, total);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * total) >> 64);
#endif
}

// The random bits of image `image` at level `level` in step `step`.
LMM_FAST_HOST_DEVICE uint64_t label_draw(uint64_t seed, uint64_t step, uint64_t image,
                                         uint32_t level) {
  return philox::random_u64(seed, step, static_cast<uint32_t>(image), level);
}

}  // namespace gibbs
}  // namespace lmm_fast

// ---------------------------------------------------------------- host checks
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace lmm_fast {
namespace gibbs {

struct Geometry {
  int64_t batch = 0;
  int64_t num_classes = 0;    // N, the bottom level
  int64_t upper_width = 0;    // sum of the upper level sizes
  int64_t logits_width = 0;   // sum of all level sizes, or of the upper ones
  std::vector<int64_t> sizes;    // upper levels only, top first
  std::vector<int64_t> offsets;  // column of each upper level, in logits and counts_t alike
  int64_t num_upper() const { return static_cast<int64_t>(sizes.size()); }
  int64_t max_size() const {
    int64_t m = 0;
    for (auto s : sizes) m = s > m ? s : m;
    return m;
  }
};

// Upper level sizes and offsets and N from level_sizes [N_1, ..., N_{L-1}, N].
inline Geometry parse_level_sizes(c10::IntArrayRef level_sizes) {
  TORCH_CHECK(level_sizes.size() >= 2,
              "lmm_fast: level_sizes must list the upper levels and the classes (at least 2 "
              "entries), got ", level_sizes.size());
  Geometry g;
  int64_t offset = 0;
  for (size_t l = 0; l + 1 < level_sizes.size(); ++l) {
    TORCH_CHECK(level_sizes[l] > 0 && level_sizes[l] <= kMaxGroups,
                "lmm_fast: level_sizes[", l, "] must be in [1, ", kMaxGroups, "], got ",
                level_sizes[l]);
    g.sizes.push_back(level_sizes[l]);
    g.offsets.push_back(offset);
    offset += level_sizes[l];
  }
  g.upper_width = offset;
  g.num_classes = level_sizes.back();
  TORCH_CHECK(g.num_classes > 0, "lmm_fast: level_sizes[-1] (the number of classes) must be "
              "positive, got ", g.num_classes);
  return g;
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), "lmm_fast: ", name, " must be on the logits' device ",
              logits.device(), ", got ", t.device());
}

// Checks shared by the batched and the exact sampler; returns the geometry.
inline Geometry check_sample_inputs(const at::Tensor& logits, const at::Tensor& target,
                                    const at::Tensor& old_labels, const at::Tensor& counts_t,
                                    const at::Tensor& group_totals, const at::Tensor& beta,
                                    double beta0, c10::IntArrayRef level_sizes,
                                    const at::Tensor& image_ids) {
  Geometry g = parse_level_sizes(level_sizes);
  const int64_t offset = g.upper_width;
  // The bottom level's logits are never read: the packed logits of the loss
  // or just their upper-level columns are both accepted.
  TORCH_CHECK(logits.dim() == 2 && (logits.size(1) == offset + g.num_classes ||
                                    logits.size(1) == offset),
              "lmm_fast: logits must be [batch, sum(level_sizes)] = [batch, ",
              offset + g.num_classes, "] or hold the upper levels only, [batch, ", offset,
              "], got shape ", logits.sizes());
  g.logits_width = logits.size(1);
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "lmm_fast: logits must be float32, float64, float16 or bfloat16, got ", dtype);
  g.batch = logits.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == g.batch,
              "lmm_fast: target must be [batch] = [", g.batch, "], got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "lmm_fast: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(old_labels.dim() == 2 && old_labels.size(0) == g.batch &&
                  old_labels.size(1) == g.num_upper(),
              "lmm_fast: old_labels must be [batch, upper levels] = [", g.batch, ", ",
              g.num_upper(), "], got shape ", old_labels.sizes());
  TORCH_CHECK(old_labels.scalar_type() == at::kLong, "lmm_fast: old_labels must be int64, got ",
              old_labels.scalar_type());
  TORCH_CHECK(counts_t.dim() == 2 && counts_t.size(0) == g.num_classes &&
                  counts_t.size(1) == g.upper_width,
              "lmm_fast: counts_t must be [N, sum(upper level sizes)] = [", g.num_classes, ", ",
              g.upper_width, "], got shape ", counts_t.sizes());
  TORCH_CHECK(counts_t.scalar_type() == at::kInt, "lmm_fast: counts_t must be int32, got ",
              counts_t.scalar_type());
  TORCH_CHECK(group_totals.dim() == 1 && group_totals.size(0) == g.upper_width,
              "lmm_fast: group_totals must be [sum(upper level sizes)] = [", g.upper_width,
              "], got shape ", group_totals.sizes());
  TORCH_CHECK(group_totals.scalar_type() == at::kInt,
              "lmm_fast: group_totals must be int32, got ", group_totals.scalar_type());
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == g.num_classes,
              "lmm_fast: beta must be [N] = [", g.num_classes, "], got shape ", beta.sizes());
  TORCH_CHECK(beta.scalar_type() == at::kFloat, "lmm_fast: beta must be float32, got ",
              beta.scalar_type());
  TORCH_CHECK(std::isfinite(beta0) && beta0 > 0.0,
              "lmm_fast: beta0 must be positive and finite, got ", beta0);
  TORCH_CHECK(image_ids.dim() == 1 && image_ids.size(0) == g.batch,
              "lmm_fast: image_ids must be [batch] = [", g.batch, "], got shape ",
              image_ids.sizes());
  TORCH_CHECK(image_ids.scalar_type() == at::kLong, "lmm_fast: image_ids must be int64, got ",
              image_ids.scalar_type());
  check_device(target, "target", logits);
  check_device(old_labels, "old_labels", logits);
  check_device(counts_t, "counts_t", logits);
  check_device(group_totals, "group_totals", logits);
  check_device(beta, "beta", logits);
  check_device(image_ids, "image_ids", logits);
  TORCH_CHECK(counts_t.is_contiguous(), "lmm_fast: counts_t must be contiguous");
  TORCH_CHECK(group_totals.is_contiguous(), "lmm_fast: group_totals must be contiguous");
  return g;
}

// The sampler's inputs after the checks, in the layout its kernels read:
// logits need unit stride along the columns only, the rest contiguous.
struct PreparedSample {
  Geometry geo;
  at::Tensor logits, target, old_labels, beta, image_ids;
};

inline PreparedSample prepare_sample_inputs(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& old_labels,
    const at::Tensor& counts_t, const at::Tensor& group_totals, const at::Tensor& beta,
    double beta0, c10::IntArrayRef level_sizes, const at::Tensor& image_ids) {
  PreparedSample p;
  p.geo = check_sample_inputs(logits, target, old_labels, counts_t, group_totals, beta, beta0,
                              level_sizes, image_ids);
  p.logits = (logits.size(1) <= 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
  p.target = target.contiguous();
  p.old_labels = old_labels.contiguous();
  p.beta = beta.contiguous();
  p.image_ids = image_ids.contiguous();
  return p;
}

// Eq. 6 in factored form on the class-major psi_t: psi_t holds the
// unnormalised Omega + beta, psi_scale the per-group 1 / (n_t + beta0).
inline void check_refresh_inputs(const at::Tensor& psi_t, const at::Tensor& psi_scale,
                                 const at::Tensor& counts_t, const at::Tensor& group_totals,
                                 const at::Tensor& beta, double beta0) {
  TORCH_CHECK(psi_t.dim() == 2, "lmm_fast: psi_t must be 2-D [N, sum(upper level sizes)], got "
              "shape ", psi_t.sizes());
  TORCH_CHECK(psi_t.scalar_type() == at::kFloat || psi_t.scalar_type() == at::kDouble,
              "lmm_fast: psi_t must be float32 or float64, got ", psi_t.scalar_type());
  TORCH_CHECK(psi_t.is_contiguous(), "lmm_fast: psi_t must be contiguous (it is written in place)");
  TORCH_CHECK(psi_scale.dim() == 1 && psi_scale.size(0) == psi_t.size(1),
              "lmm_fast: psi_scale must be [", psi_t.size(1), "], got shape ", psi_scale.sizes());
  TORCH_CHECK(psi_scale.scalar_type() == psi_t.scalar_type(),
              "lmm_fast: psi_scale must have psi_t's dtype ", psi_t.scalar_type(), ", got ",
              psi_scale.scalar_type());
  TORCH_CHECK(psi_scale.is_contiguous(), "lmm_fast: psi_scale must be contiguous (it is written in place)");
  TORCH_CHECK(counts_t.sizes() == psi_t.sizes(), "lmm_fast: counts_t must have psi_t's shape ",
              psi_t.sizes(), ", got ", counts_t.sizes());
  TORCH_CHECK(counts_t.scalar_type() == at::kInt, "lmm_fast: counts_t must be int32, got ",
              counts_t.scalar_type());
  TORCH_CHECK(counts_t.is_contiguous(), "lmm_fast: counts_t must be contiguous");
  TORCH_CHECK(group_totals.dim() == 1 && group_totals.size(0) == psi_t.size(1),
              "lmm_fast: group_totals must be [", psi_t.size(1), "], got shape ",
              group_totals.sizes());
  TORCH_CHECK(group_totals.scalar_type() == at::kInt,
              "lmm_fast: group_totals must be int32, got ", group_totals.scalar_type());
  TORCH_CHECK(group_totals.is_contiguous(), "lmm_fast: group_totals must be contiguous");
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == psi_t.size(0),
              "lmm_fast: beta must be [N] = [", psi_t.size(0), "], got shape ", beta.sizes());
  TORCH_CHECK(beta.scalar_type() == at::kFloat, "lmm_fast: beta must be float32, got ",
              beta.scalar_type());
  TORCH_CHECK(std::isfinite(beta0) && beta0 > 0.0,
              "lmm_fast: beta0 must be positive and finite, got ", beta0);
  for (const auto& [t, name] : {std::pair{&psi_scale, "psi_scale"}, std::pair{&counts_t, "counts_t"},
                                std::pair{&group_totals, "group_totals"}, std::pair{&beta, "beta"}}) {
    TORCH_CHECK(t->device() == psi_t.device(), "lmm_fast: ", name, " must be on psi_t's device ",
                psi_t.device(), ", got ", t->device());
  }
}

inline void check_index_vector(const at::Tensor& psi_t, const at::Tensor& index, const char* name) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "lmm_fast: ", name,
              " must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(index.device() == psi_t.device(), "lmm_fast: ", name, " must be on psi_t's device ",
              psi_t.device(), ", got ", index.device());
}


// ------------------------------------------------------------ value checks
// The values the kernels index with, checked before anything is written.
// The *_host forms take CPU tensors and are the CPU ops' checks; the others
// run on the tensors' own device with one read back (a host sync) and, only
// when something is out of range, copy the inputs to the host for the same
// message as the CPU op's.

inline void check_sample_values_host(const Geometry& g, const at::Tensor& target, const at::Tensor& old_labels,
                                     const at::Tensor& image_ids) {
  const int64_t* y = target.data_ptr<int64_t>();
  const int64_t* labels = old_labels.data_ptr<int64_t>();
  const int64_t* ids = image_ids.data_ptr<int64_t>();
  const int64_t levels = g.num_upper();
  for (int64_t b = 0; b < g.batch; ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < g.num_classes, "lmm_fast: target[", b, "] = ", y[b],
                " is out of range [0, ", g.num_classes, ")");
    TORCH_CHECK(ids[b] >= 0 && ids[b] <= int64_t(0xffffffff), "lmm_fast: image_ids[", b, "] = ",
                ids[b], " is out of range [0, 2^32)");
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t s = labels[b * levels + l];
      TORCH_CHECK(s >= 0 && s < g.sizes[l], "lmm_fast: old_labels[", b, ", ", l, "] = ", s,
                  " is out of range [0, ", g.sizes[l], ") for upper level ", l);
    }
  }
}

inline void check_moves_values_host(const Geometry& g, const at::Tensor& target, const at::Tensor& image_ids,
                                    const at::Tensor& old_labels, const at::Tensor& new_labels, int64_t images) {
  const int64_t* y = target.data_ptr<int64_t>();
  const int64_t* id = image_ids.data_ptr<int64_t>();
  const int64_t* o = old_labels.data_ptr<int64_t>();
  const int64_t* w = new_labels.data_ptr<int64_t>();
  const int64_t levels = g.num_upper();
  for (int64_t b = 0; b < g.batch; ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < g.num_classes, "lmm_fast: target[", b, "] = ", y[b],
                " is out of range [0, ", g.num_classes, ")");
    TORCH_CHECK(id[b] >= 0 && id[b] < images, "lmm_fast: image_ids[", b, "] = ", id[b],
                " is out of range [0, ", images, ")");
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t k = b * levels + l;
      TORCH_CHECK(o[k] >= 0 && o[k] < g.sizes[l], "lmm_fast: old_labels[", b, ", ", l, "] = ",
                  o[k], " is out of range [0, ", g.sizes[l], ") for upper level ", l);
      TORCH_CHECK(w[k] >= 0 && w[k] < g.sizes[l], "lmm_fast: new_labels[", b, ", ", l, "] = ",
                  w[k], " is out of range [0, ", g.sizes[l], ") for upper level ", l);
    }
  }
}

// index[i] in [0, limit) for every i; `name` names the argument.
inline void check_index_values_host(const at::Tensor& index, int64_t limit, const char* name) {
  const int64_t* v = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(v[i] >= 0 && v[i] < limit, "lmm_fast: ", name, "[", i, "] = ", v[i],
                " is out of range [0, ", limit, ")");
  }
}

// rows[i] in [0, n) and columns[i] in [0, width), entry by entry.
inline void check_entry_values_host(const at::Tensor& rows, const at::Tensor& columns, int64_t n, int64_t width) {
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = columns.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < n, "lmm_fast: rows[", i, "] = ", r[i], " is out of range [0, ", n, ")");
    TORCH_CHECK(c[i] >= 0 && c[i] < width, "lmm_fast: columns[", i, "] = ", c[i],
                " is out of range [0, ", width, ")");
  }
}

// A bool tensor: whether any value of t lies outside [lo, hi).
inline at::Tensor any_outside(const at::Tensor& t, int64_t lo, int64_t hi) {
  return t.lt(lo).logical_or(t.ge(hi)).any();
}

// Whether any label of the [batch, upper levels] tensor lies outside its level.
inline at::Tensor any_label_outside(const at::Tensor& labels, const Geometry& g) {
  at::Tensor bad = labels.lt(0).any();
  for (int64_t l = 0; l < g.num_upper(); ++l) bad = bad.logical_or(labels.select(1, l).ge(g.sizes[l]).any());
  return bad;
}

inline void check_sample_values(const Geometry& g, const at::Tensor& target, const at::Tensor& old_labels,
                                const at::Tensor& image_ids) {
  if (g.batch == 0) return;
  const at::Tensor bad = any_outside(target, 0, g.num_classes)
                             .logical_or(any_outside(image_ids, 0, int64_t(0xffffffff) + 1))
                             .logical_or(any_label_outside(old_labels, g));
  if (bad.item<bool>()) {
    check_sample_values_host(g, target.cpu().contiguous(), old_labels.cpu().contiguous(),
                             image_ids.cpu().contiguous());
  }
}

inline void check_moves_values(const Geometry& g, const at::Tensor& target, const at::Tensor& image_ids,
                               const at::Tensor& old_labels, const at::Tensor& new_labels, int64_t images) {
  if (g.batch == 0) return;
  const at::Tensor bad = any_outside(target, 0, g.num_classes)
                             .logical_or(any_outside(image_ids, 0, images))
                             .logical_or(any_label_outside(old_labels, g))
                             .logical_or(any_label_outside(new_labels, g));
  if (bad.item<bool>()) {
    check_moves_values_host(g, target.cpu().contiguous(), image_ids.cpu().contiguous(),
                            old_labels.cpu().contiguous(), new_labels.cpu().contiguous(), images);
  }
}

inline void check_index_values(const at::Tensor& index, int64_t limit, const char* name) {
  if (index.numel() == 0) return;
  if (any_outside(index, 0, limit).item<bool>()) check_index_values_host(index.cpu().contiguous(), limit, name);
}

inline void check_entry_values(const at::Tensor& rows, const at::Tensor& columns, int64_t n, int64_t width) {
  if (rows.numel() == 0) return;
  if (any_outside(rows, 0, n).logical_or(any_outside(columns, 0, width)).item<bool>()) {
    check_entry_values_host(rows.cpu().contiguous(), columns.cpu().contiguous(), n, width);
  }
}

// gibbs_check_batch: 1-D int64 indices and target of one length, 1-D int64
// train_targets, one device.
inline void check_batch_inputs(const at::Tensor& indices, const at::Tensor& target,
                               const at::Tensor& train_targets) {
  for (const auto& pair : {std::make_pair(&indices, "indices"), std::make_pair(&target, "target"),
                           std::make_pair(&train_targets, "train_targets")}) {
    TORCH_CHECK(pair.first->dim() == 1 && pair.first->scalar_type() == at::kLong,
                "lmm_fast: ", pair.second, " must be a 1-D int64 tensor, got ",
                pair.first->scalar_type(), " of shape ", pair.first->sizes());
    TORCH_CHECK(pair.first->device() == indices.device(), "lmm_fast: ", pair.second,
                " must be on indices' device ", indices.device(), ", got ", pair.first->device());
  }
  TORCH_CHECK(target.size(0) == indices.size(0), "lmm_fast: target must have indices' length ",
              indices.size(0), ", got ", target.size(0));
}

// gibbs_apply_moves: shapes, dtypes, devices and layout; returns the geometry
// of the levels (upper level sizes and offsets, N).
inline Geometry check_apply_moves_inputs(const at::Tensor& counts_t, const at::Tensor& group_totals,
                                         const at::Tensor& labels, const at::Tensor& target,
                                         const at::Tensor& image_ids, const at::Tensor& old_labels,
                                         const at::Tensor& new_labels, c10::IntArrayRef level_sizes) {
  Geometry g = parse_level_sizes(level_sizes);
  const int64_t levels = g.num_upper();
  TORCH_CHECK(counts_t.dim() == 2 && counts_t.size(0) == g.num_classes &&
                  counts_t.size(1) == g.upper_width && counts_t.scalar_type() == at::kInt &&
                  counts_t.is_contiguous(),
              "lmm_fast: counts_t must be a contiguous int32 [N, sum(upper level sizes)] = [",
              g.num_classes, ", ", g.upper_width, "] tensor, got ", counts_t.scalar_type(),
              " of shape ", counts_t.sizes());
  TORCH_CHECK(group_totals.dim() == 1 && group_totals.size(0) == g.upper_width &&
                  group_totals.scalar_type() == at::kInt && group_totals.is_contiguous(),
              "lmm_fast: group_totals must be a contiguous int32 [", g.upper_width,
              "] tensor, got ", group_totals.scalar_type(), " of shape ", group_totals.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(1) == levels && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "lmm_fast: labels must be a contiguous int64 [images, ", levels,
              "] tensor, got ", labels.scalar_type(), " of shape ", labels.sizes());
  g.batch = target.dim() == 1 ? target.size(0) : -1;
  TORCH_CHECK(target.dim() == 1 && target.scalar_type() == at::kLong,
              "lmm_fast: target must be a 1-D int64 tensor, got ", target.scalar_type(),
              " of shape ", target.sizes());
  TORCH_CHECK(image_ids.dim() == 1 && image_ids.size(0) == g.batch &&
                  image_ids.scalar_type() == at::kLong,
              "lmm_fast: image_ids must be int64 [batch] = [", g.batch, "], got ",
              image_ids.scalar_type(), " of shape ", image_ids.sizes());
  for (const auto& pair : {std::make_pair(&old_labels, "old_labels"),
                           std::make_pair(&new_labels, "new_labels")}) {
    TORCH_CHECK(pair.first->dim() == 2 && pair.first->size(0) == g.batch &&
                    pair.first->size(1) == levels && pair.first->scalar_type() == at::kLong,
                "lmm_fast: ", pair.second, " must be int64 [batch, upper levels] = [", g.batch,
                ", ", levels, "], got ", pair.first->scalar_type(), " of shape ",
                pair.first->sizes());
  }
  for (const auto& pair : {std::make_pair(&group_totals, "group_totals"),
                           std::make_pair(&labels, "labels"), std::make_pair(&target, "target"),
                           std::make_pair(&image_ids, "image_ids"),
                           std::make_pair(&old_labels, "old_labels"),
                           std::make_pair(&new_labels, "new_labels")}) {
    TORCH_CHECK(pair.first->device() == counts_t.device(), "lmm_fast: ", pair.second,
                " must be on counts_t's device ", counts_t.device(), ", got ",
                pair.first->device());
  }
  return g;
}

// ------------------------------------------- owners of the non-overlapping Psi
// State of one upper level under the constraint (paper Table I, "TC"):
//   owner [N] int64       owner(y) = argmax_t Eq6[t, y], lowest t on exact ties
//   numerator [N] float64 Omega[owner(y), y] + beta_y (psi_numerator)
//   kept [N_l] int64      classes owned by each group
//   nonzero [N_l, ceil(N / 64)] int64: bit y of row t set iff Omega[t, y] > 0,
//                         so a group's classes with images are found by
//                         scanning N / 8 bytes instead of its N counts
//   bound [N] float64     at least the value of every group but the owner
//                         (an upper bound of the runner-up, not a function of
//                         the counts: it only spares rescans)
// and the factored Psi it implies: psi_t[y, t] = Omega[t, y] + beta_y where t
// owns y or t owns no class (such a group keeps its Eq. 6 row), else 0;
// psi_scale[t] = 1 / sum_{y owned by t} numerator[y], or 1 / (n_t + beta0) for
// a group that owns nothing.
inline void check_update_owners_inputs(const at::Tensor& psi_t, const at::Tensor& psi_scale,
                                       const at::Tensor& owner, const at::Tensor& numerator,
                                       const at::Tensor& kept, const at::Tensor& nonzero,
                                       const at::Tensor& bound, const at::Tensor& counts_t, const at::Tensor& group_totals,
                                       const at::Tensor& beta, double beta0, int64_t offset,
                                       int64_t size, const at::Tensor& classes,
                                       const at::Tensor& old_groups, const at::Tensor& new_groups) {
  check_refresh_inputs(psi_t, psi_scale, counts_t, group_totals, beta, beta0);
  const int64_t n = psi_t.size(0);
  TORCH_CHECK(size > 0 && offset >= 0 && offset + size <= psi_t.size(1), "lmm_fast: level columns [",
              offset, ", ", offset + size, ") must lie within psi_t's ", psi_t.size(1), " columns");
  const int64_t words = (n + 63) / 64;
  struct Spec { const at::Tensor* t; const char* name; at::ScalarType dtype; std::vector<int64_t> shape; };
  const Spec specs[] = {{&owner, "owner", at::kLong, {n}},
                        {&numerator, "numerator", at::kDouble, {n}},
                        {&kept, "kept", at::kLong, {size}},
                        {&nonzero, "nonzero", at::kLong, {size, words}},
                        {&bound, "bound", at::kDouble, {n}}};
  for (const auto& s : specs) {
    TORCH_CHECK(s.t->scalar_type() == s.dtype && s.t->sizes().vec() == s.shape && s.t->is_contiguous(),
                "lmm_fast: ", s.name, " must be a contiguous ", s.dtype, " tensor of shape ",
                c10::IntArrayRef(s.shape), ", got ", s.t->scalar_type(), " of shape ", s.t->sizes());
    TORCH_CHECK(s.t->device() == psi_t.device(), "lmm_fast: ", s.name, " must be on psi_t's device ",
                psi_t.device(), ", got ", s.t->device());
  }
  check_index_vector(psi_t, classes, "classes");
  check_index_vector(psi_t, old_groups, "old_groups");
  check_index_vector(psi_t, new_groups, "new_groups");
  TORCH_CHECK(classes.numel() == old_groups.numel() && classes.numel() == new_groups.numel(),
              "lmm_fast: classes, old_groups and new_groups must have the same length, got ",
              classes.numel(), ", ", old_groups.numel(), " and ", new_groups.numel());
}

// The update itself, on host memory (the CPU kernel; the CUDA kernels are the
// phases of gibbs_owners_parallel.h, with the same results). full: rebuild the level's state and block of Psi from the
// counts; else the counts changed exactly at the m moves (class cls[i] from
// level-local group olds[i] to news[i]) since the state was last updated.
//
// Incremental argument (the result equals a rebuild bit for bit): let C be
// the groups of the moves, D those of C whose n_t fell. A group outside C
// kept its value for every class; a group of C whose n_t did not fall and
// whose count of y did not change did not gain value for y. Both lost to the
// old owner o before, so they still lose to o unless o's own value fell
// (o in C): only those classes are rescanned over all N_l groups. Every other
// class's new owner is the best of o, its moves' groups, the groups of D in
// which it has images (the bitmap), and the group of D with the fewest images
// (lowest index on ties), which beats every group of D where the class has
// none (there its value is beta_y / (n_t + beta0)).
// Values are (Omega + beta) / (n + beta0) in float64, exactly the reference's
// expression, so that ties are seen as ties everywhere.

// Per-group float64 sums in the order of the adds. Consecutive adds to one
// group (classes of a group tend to be neighbours) accumulate in a register
// instead of through memory, which would chain each add to the previous
// one's store; the order, hence every bit, is that of plain `sum[g] += v`.
struct RunningSums {
  double* sum;
  int64_t group = -1;
  double acc = 0.0;
  explicit RunningSums(double* s) : sum(s) {}
  void add(int64_t g, double v) {
    if (g != group) {
      if (group >= 0) sum[group] = acc;
      group = g;
      acc = sum[g];
    }
    acc = dadd_rn(acc, v);
  }
  void flush() {
    if (group >= 0) sum[group] = acc;
  }
};

template <typename scalar_t>
void update_owners_host(scalar_t* psi, scalar_t* scale, int64_t* owner, double* numerator,
                        int64_t* kept, uint64_t* bits, double* bound, const int32_t* counts,
                        const int32_t* totals, const float* beta, double beta0, int64_t n,
                        int64_t width, int64_t offset, int64_t size, const int64_t* cls,
                        const int64_t* olds, const int64_t* news, int64_t m, bool full) {
  if (!full && m == 0) return;
  // The incremental argument below also relies on distinct totals giving
  // distinct values (see `sparse`): rebuild when beta0 is that large.
  if (beta0 >= 1099511627776.0) full = true;
  const int64_t words = (n + 63) / 64;
  const int32_t* level_counts = counts + offset;
  std::vector<double> den(size);
  for (int64_t t = 0; t < size; ++t) den[t] = dadd_rn(static_cast<double>(totals[offset + t]), beta0);
  auto count_of = [&](int64_t y, int64_t t) { return level_counts[y * width + t]; };
  auto has_images = [&](int64_t t, int64_t y) { return (bits[t * words + (y >> 6)] >> (y & 63)) & 1u; };
  auto set_bit = [&](int64_t t, int64_t y, bool on) {
    uint64_t& w = bits[t * words + (y >> 6)];
    const uint64_t mask = uint64_t(1) << (y & 63);
    w = on ? (w | mask) : (w & ~mask);
  };
  // Comparisons of values (Omega + beta_y) / (n_t + beta0) go through
  // products with a reciprocal first: num * inv_den[t] is within 2^-51 of the
  // correctly rounded quotient (both positive), so when two products differ
  // by more than a factor 1 + 2^-40 the quotients compare the same way. Only
  // closer pairs (exact ties above all, common where counts are equal) form
  // the two divisions of the reference and break ties by index. Bounds are
  // raised by upper estimates (product * (1 + 2^-40)), never below a value.
  std::vector<double> inv_den(size);
  for (int64_t t = 0; t < size; ++t) inv_den[t] = 1.0 / den[t];
  constexpr double kUp = 1.0 + 1.0 / 1099511627776.0;
  constexpr double kDown = 1.0 - 1.0 / 1099511627776.0;
  // Does (num_a in group a) come before (num_b in group b): larger value,
  // lower index on exact ties.
  auto beats = [&](double num_a, int64_t a, double num_b, int64_t b) {
    const double pa = num_a * inv_den[a];
    const double pb = num_b * inv_den[b];
    if (pa > pb * kUp) return true;
    if (pa < pb * kDown) return false;
    const double va = ddiv_rn(num_a, den[a]);
    const double vb = ddiv_rn(num_b, den[b]);
    return va > vb || (va == vb && a < b);
  };
  auto upper = [&](double num, int64_t t) { return num * inv_den[t] * kUp; };
  // argmax over the level's groups, first maximum. Where Omega[t, y] = 0 the
  // value beta_y / (n_t + beta0) is largest in the group with the fewest
  // images (lowest index on ties), so only that group and those where the
  // class has images (a scan of its row of counts, no division) are
  // compared. That needs distinct totals to give distinct values, true for
  // beta0 < 2^40 (the gap between n + beta0 and n + 1 + beta0 is then far
  // above double rounding); beyond, every group is compared.
  const bool sparse = beta0 < 1099511627776.0;
  int64_t fewest_all = 0;
  for (int64_t t = 1; t < size; ++t) {
    if (totals[offset + t] < totals[offset + fewest_all]) fewest_all = t;
  }
  // Returns the argmax and its numerator; also sets bound[y] to at least the
  // value of every other group (the runner-up; for the groups not compared,
  // their common upper bound beta_y / (n_fewest + beta0)).
  auto rescan = [&](int64_t y, double& best_num) {
    const int32_t* row = level_counts + y * width;
    const int64_t first = sparse ? fewest_all : 0;
    int64_t arg = first;
    best_num = psi_numerator(row[first], beta[y]);
    double second = sparse ? upper(psi_numerator(0, beta[y]), fewest_all) : 0.0;
    for (int64_t t = 0; t < size; ++t) {
      if ((sparse && row[t] == 0) || t == first) continue;
      const double num = psi_numerator(row[t], beta[y]);
      if (beats(num, t, best_num, arg)) {
        second = std::max(second, upper(best_num, arg));
        best_num = num;
        arg = t;
      } else {
        second = std::max(second, upper(num, t));
      }
    }
    bound[y] = second;
    return arg;
  };
  std::vector<int64_t> switched;     // classes whose owner changed
  std::vector<int64_t> previous;     // and their owner before the update
  std::vector<int64_t> new_kept(size, 0);
  // Normalisers summed in class order over the kept numerators, in full and
  // incremental updates alike, so both give the same bits.
  std::vector<double> normaliser(size, 0.0);
  if (full) {
    std::fill(bits, bits + size * words, uint64_t(0));
    for (int64_t y = 0; y < n; ++y) {
      double best_num;
      owner[y] = rescan(y, best_num);
      numerator[y] = best_num;
      for (int64_t t = 0; t < size; ++t) {
        if (count_of(y, t) != 0) set_bit(t, y, true);
      }
    }
  } else {
    std::vector<int32_t> delta(size, 0);
    std::vector<char> in_changed(size, 0);
    std::vector<int64_t> changed;
    for (int64_t i = 0; i < m; ++i) {
      for (const int64_t t : {olds[i], news[i]}) {
        if (!in_changed[t]) {
          in_changed[t] = 1;
          changed.push_back(t);
        }
        set_bit(t, cls[i], count_of(cls[i], t) != 0);
      }
      delta[olds[i]] -= 1;
      delta[news[i]] += 1;
    }
    int64_t fewest = -1;
    for (const int64_t t : changed) {
      if (delta[t] < 0 && (fewest < 0 || totals[offset + t] < totals[offset + fewest] ||
                           (totals[offset + t] == totals[offset + fewest] && t < fewest))) {
        fewest = t;
      }
    }
    // Kept all zero between calls: set for the moved classes, cleared at the end.
    thread_local std::vector<char> touched_buffer;
    if (static_cast<int64_t>(touched_buffer.size()) < n) touched_buffer.assign(n, 0);
    char* touched = touched_buffer.data();
    for (int64_t i = 0; i < m; ++i) touched[cls[i]] = 1;
    // Scratch reused across calls (no allocation and page faults per step);
    // every entry is written by the first pass over the classes.
    thread_local std::vector<double> best_num_buffer;
    thread_local std::vector<int64_t> best_group_buffer;
    if (static_cast<int64_t>(best_num_buffer.size()) < n) {
      best_num_buffer.resize(n);
      best_group_buffer.resize(n);
    }
    double* best_num = best_num_buffer.data();
    int64_t* best_group = best_group_buffer.data();
    // A group of D gained value for each class by at most its factor
    // (n_t - delta_t + beta0) / (n_t + beta0) where the class's count there
    // did not change; `gain` bounds the largest factor from above. Such a
    // group lost to the owner before, so its value is at most the class's
    // bound times `gain` now (`lifted`); a class whose best beats that needs
    // none of its counts in the groups of D read, only its bound raised.
    // The others are marked in `needs` and challenged pair by pair.
    double gain = 1.0;
    for (const int64_t t : changed) {
      if (delta[t] < 0) {
        const double before = dadd_rn(static_cast<double>(totals[offset + t] - delta[t]), beta0);
        gain = std::max(gain, before * inv_den[t] * kUp);
      }
    }
    gain *= kUp;
    // Classes with images in some group of D (the union of their bitmap rows).
    thread_local std::vector<uint64_t> in_d_buffer, needs_buffer;
    in_d_buffer.assign(words, 0);
    needs_buffer.assign(words, 0);
    uint64_t* in_d = in_d_buffer.data();
    uint64_t* needs = needs_buffer.data();
    for (const int64_t t : changed) {
      if (delta[t] >= 0) continue;
      const uint64_t* row = bits + t * words;
      for (int64_t w = 0; w < words; ++w) in_d[w] |= row[w];
    }
    // After the class's first candidates are settled: if its best beats the
    // lifted bound (with the 2^-40 product margin), the groups of D are only
    // folded into its bound, else it is marked in `needs`.
    auto settle = [&](int64_t y) {
      const uint64_t bit = uint64_t(1) << (y & 63);
      if (!(in_d[y >> 6] & bit)) return;
      const double lifted = bound[y] * gain;
      if (best_num[y] * inv_den[best_group[y]] > lifted * kUp) {
        bound[y] = lifted;
      } else {
        needs[y >> 6] |= bit;
      }
    };
    // Keeps bound[y] above every group but the current best: a group that
    // loses raises it, a best that is beaten does.
    auto challenge = [&](int64_t y, int64_t t, double num) {
      const int64_t b = best_group[y];
      if (t == b) return;
      if (beats(num, t, best_num[y], b)) {
        bound[y] = std::max(bound[y], upper(best_num[y], b));
        best_num[y] = num;
        best_group[y] = t;
      } else {
        bound[y] = std::max(bound[y], upper(num, t));
      }
    };
    for (int64_t y = 0; y < n; ++y) {
      const int64_t o = owner[y];
      best_group[y] = o;
      best_num[y] = numerator[y];
      if (in_changed[o]) {
        bool fell;
        if (touched[y]) {
          const double now = psi_numerator(count_of(y, o), beta[y]);
          const double before = ddiv_rn(
              numerator[y], dadd_rn(static_cast<double>(totals[offset + o] - delta[o]), beta0));
          fell = ddiv_rn(now, den[o]) < before;
          best_num[y] = now;
        } else {
          // Same numerator over a total that changed by delta[o]: with
          // beta0 < 2^40 a different total is a different quotient.
          fell = delta[o] > 0;
        }
        // Its value fell: it still beats every group that did not gain
        // value if it beats their bound, the old runner-up (strictly, as the
        // bound knows no indices); else rescan.
        if (fell) {
          const double p = best_num[y] * inv_den[o];
          const bool above = p > bound[y] * kUp ||
                             (!(p < bound[y] * kDown) && ddiv_rn(best_num[y], den[o]) > bound[y]);
          if (!above) {
            best_group[y] = rescan(y, best_num[y]);
            continue;
          }
        }
      } else if (fewest >= 0) {
        // An owner outside C kept its value. Most classes are beyond the
        // reach of `fewest` even with no image there (the pass over D below
        // challenges it where the class has some): only the bound rises.
        const double reach = psi_numerator(0, beta[y]) * inv_den[fewest];
        if (reach < numerator[y] * inv_den[o] * kDown) {
          settle(y);
          const double up = reach * kUp;
          if (up > bound[y]) bound[y] = up;
          continue;
        }
      }
      if (fewest >= 0) {
        settle(y);
        // `fewest` with no image of the class challenges with its zero-count
        // value, which beats every other group of D where the class has none;
        // where the class has images there, `fewest` is one of D's pairs
        // (challenged if the class needs it, else under the lifted bound).
        if (!has_images(fewest, y)) challenge(y, fewest, psi_numerator(0, beta[y]));
        bound[y] = std::max(bound[y], upper(psi_numerator(0, beta[y]), fewest));
      }
    }
    // A rescanned class already holds its argmax, which these cannot beat.
    for (int64_t i = 0; i < m; ++i) {
      const int64_t y = cls[i];
      challenge(y, olds[i], psi_numerator(count_of(y, olds[i]), beta[y]));
      challenge(y, news[i], psi_numerator(count_of(y, news[i]), beta[y]));
    }
    // The groups of D against the classes marked in `needs` (their counts
    // read); the others folded the groups into their bound in `settle`, and
    // a rescanned class holds its argmax and a tight bound.
    for (const int64_t t : changed) {
      if (delta[t] >= 0) continue;
      const uint64_t* row = bits + t * words;
      for (int64_t w = 0; w < words; ++w) {
        uint64_t word = row[w] & needs[w];
        while (word) {
          const int64_t y = w * 64 + __builtin_ctzll(word);
          word &= word - 1;
          challenge(y, t, psi_numerator(count_of(y, t), beta[y]));
        }
      }
    }
    // The owners settle here, and every group's normaliser is re-summed on
    // the way, in class order (the order of a rebuild, so the same bits).
    RunningSums sums(normaliser.data());
    for (int64_t y = 0; y < n; ++y) {
      const int64_t g = best_group[y];
      if (g != owner[y]) {
        switched.push_back(y);
        previous.push_back(owner[y]);
        owner[y] = g;
        numerator[y] = best_num[y];
      } else if (touched[y]) {
        numerator[y] = best_num[y];
      }
      sums.add(g, numerator[y]);
    }
    sums.flush();
    for (int64_t i = 0; i < m; ++i) touched[cls[i]] = 0;
    std::copy(kept, kept + size, new_kept.begin());
    for (size_t i = 0; i < switched.size(); ++i) {
      new_kept[previous[i]] -= 1;
      new_kept[owner[switched[i]]] += 1;
    }
  }
  if (full) {
    RunningSums sums(normaliser.data());
    for (int64_t y = 0; y < n; ++y) {
      new_kept[owner[y]] += 1;
      sums.add(owner[y], numerator[y]);
    }
    sums.flush();
  }
  auto entry = [&](int64_t y, int64_t t) {
    psi[y * width + offset + t] = (owner[y] == t || new_kept[t] == 0)
                                      ? static_cast<scalar_t>(psi_numerator(count_of(y, t), beta[y]))
                                      : scalar_t(0);
  };
  if (full) {
    for (int64_t y = 0; y < n; ++y) {
      for (int64_t t = 0; t < size; ++t) entry(y, t);
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      entry(cls[i], olds[i]);
      entry(cls[i], news[i]);
    }
    for (size_t i = 0; i < switched.size(); ++i) {
      entry(switched[i], previous[i]);
      entry(switched[i], owner[switched[i]]);
    }
    // a group that starts or stops owning classes changes its whole column
    for (int64_t t = 0; t < size; ++t) {
      if ((kept[t] == 0) != (new_kept[t] == 0)) {
        for (int64_t y = 0; y < n; ++y) entry(y, t);
      }
    }
  }
  for (int64_t t = 0; t < size; ++t) {
    scale[offset + t] = static_cast<scalar_t>(
        new_kept[t] != 0 ? ddiv_rn(1.0, normaliser[t]) : psi_group_scale(totals[offset + t], beta0));
    kept[t] = new_kept[t];
  }
}

// The update on CPU tensors (checked with check_update_owners_inputs; indices
// are validated here before anything is written).
inline void update_owners_on_host(at::Tensor& psi_t, at::Tensor& psi_scale, at::Tensor& owner,
                                  at::Tensor& numerator, at::Tensor& kept, at::Tensor& nonzero,
                                  at::Tensor& bound,
                                  const at::Tensor& counts_t, const at::Tensor& group_totals,
                                  const at::Tensor& beta_in, double beta0, int64_t offset,
                                  int64_t size, const at::Tensor& classes_in,
                                  const at::Tensor& old_in, const at::Tensor& new_in, bool full) {
  const at::Tensor beta = beta_in.contiguous();
  const at::Tensor classes = classes_in.contiguous();
  const at::Tensor olds = old_in.contiguous();
  const at::Tensor news = new_in.contiguous();
  const int64_t n = psi_t.size(0);
  const int64_t m = full ? 0 : classes.numel();
  const int64_t* c = classes.data_ptr<int64_t>();
  const int64_t* o = olds.data_ptr<int64_t>();
  const int64_t* w = news.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(c[i] >= 0 && c[i] < n, "lmm_fast: classes[", i, "] = ", c[i], " is out of range [0, ", n, ")");
    TORCH_CHECK(o[i] >= 0 && o[i] < size && w[i] >= 0 && w[i] < size, "lmm_fast: old_groups[", i, "] = ",
                o[i], " or new_groups[", i, "] = ", w[i], " is out of range [0, ", size, ")");
  }
  // Entries with old == new are no moves (the caller may pass every image of
  // the batch); dropping them keeps their groups out of the changed set.
  std::vector<int64_t> moved_cls, moved_old, moved_new;
  for (int64_t i = 0; i < m; ++i) {
    if (o[i] == w[i]) continue;
    moved_cls.push_back(c[i]);
    moved_old.push_back(o[i]);
    moved_new.push_back(w[i]);
  }
  if (!full && moved_cls.empty()) return;
  if (!full) {
    // One branch-free pass (it vectorises); the message is built only on failure.
    const int64_t* own = owner.data_ptr<int64_t>();
    bool bad = false;
    for (int64_t y = 0; y < n; ++y) bad |= static_cast<uint64_t>(own[y]) >= static_cast<uint64_t>(size);
    for (int64_t y = 0; bad && y < n; ++y) {
      TORCH_CHECK(own[y] >= 0 && own[y] < size, "lmm_fast: owner[", y, "] = ", own[y],
                  " is out of range [0, ", size, "): the state was never built (full=True)");
    }
  }
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_update_owners", [&] {
    update_owners_host<scalar_t>(
        psi_t.data_ptr<scalar_t>(), psi_scale.data_ptr<scalar_t>(), owner.data_ptr<int64_t>(),
        numerator.data_ptr<double>(), kept.data_ptr<int64_t>(),
        reinterpret_cast<uint64_t*>(nonzero.data_ptr<int64_t>()), bound.data_ptr<double>(), counts_t.data_ptr<int32_t>(),
        group_totals.data_ptr<int32_t>(), beta.data_ptr<float>(), beta0, n, psi_t.size(1), offset,
        size, moved_cls.data(), moved_old.data(), moved_new.data(),
        static_cast<int64_t>(moved_cls.size()), full);
  });
}

}  // namespace gibbs
}  // namespace lmm_fast
