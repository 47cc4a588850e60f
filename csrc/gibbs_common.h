// Math and host-side checks shared by the CPU and CUDA collapsed Gibbs kernels.
//
// One draw of an image's group label at one level (paper Eq. 4):
//
//   w_t = exp(-(max a - a_t)) * (Omega'[t, y] + beta_y) / (n'_t + beta_0)
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
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LMM_FAST_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LMM_FAST_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LMM_FAST_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LMM_FAST_HOST_DEVICE double dadd_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
LMM_FAST_HOST_DEVICE double dmul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
LMM_FAST_HOST_DEVICE double ddiv_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
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
#if defined(__CUDA_ARCH__)
  return __double_as_longlong(d);
#else
  int64_t i;
  std::memcpy(&i, &d, sizeof(i));
  return i;
#endif
}

LMM_FAST_HOST_DEVICE double bits_to_double(int64_t bits) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(bits);
#else
  double d;
  std::memcpy(&d, &bits, sizeof(d));
  return d;
#endif
}

LMM_FAST_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LMM_FAST_HOST_DEVICE float uint_bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
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

// Unnormalised probability of one candidate group (see the top of the file).
// Anything but a positive finite number (only inconsistent counts or NaN
// logits lead there) is 0, so the candidate cannot be drawn.
LMM_FAST_HOST_DEVICE float candidate_weight(float logit, float max_logit, int32_t count,
                                            int32_t total, float beta_y, float beta0) {
  const float e = exp_negated(sub_rn(max_logit, logit));
  const float numerator = add_rn(static_cast<float>(count), beta_y);
  const float denominator = add_rn(static_cast<float>(total), beta0);
  const uint32_t bits = float_to_bits(mul_rn(e, div_rn(numerator, denominator)));
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
#if defined(__CUDA_ARCH__)
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
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
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
  for (const auto* t : {&psi_scale, &counts_t, &group_totals, &beta}) {
    TORCH_CHECK(t->device() == psi_t.device(), "lmm_fast: all inputs must be on psi_t's device ",
                psi_t.device(), ", got one on ", t->device());
  }
}

inline void check_index_vector(const at::Tensor& psi_t, const at::Tensor& index, const char* name) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "lmm_fast: ", name,
              " must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(index.device() == psi_t.device(), "lmm_fast: all inputs must be on psi_t's device ",
              psi_t.device(), ", got ", name, " on ", index.device());
}

}  // namespace gibbs
}  // namespace lmm_fast
