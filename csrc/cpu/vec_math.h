// Vectorisable float math shared by the CPU kernels: a polynomial exp the
// compiler can vectorise, eight-lane helpers on GCC/Clang vector extensions,
// and row reductions (max, sum of exp) over a level's logits.
//
// The functions are always inlined, so they take the instruction set of the
// multiversioned (LMM_FAST_MULTIVERSION) entry point that calls them: AVX2+FMA
// registers in the x86-64-v3 clone, SSE in the baseline one.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifndef LMM_FAST_MULTIVERSION
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// One AVX2+FMA clone and one baseline clone of each hot loop; the loader picks
// the best one for the running processor.
#define LMM_FAST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LMM_FAST_MULTIVERSION
#endif
#endif
#ifndef LMM_FAST_INLINE
#define LMM_FAST_INLINE inline __attribute__((always_inline))
#endif

// The eight-lane helpers pass 256-bit vectors by value; they are always
// inlined, so the calling convention GCC warns about is never used.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace lmm_fast {
namespace vec {

// exp(x) for float (Cephes-style range reduction and degree-6 polynomial,
// about 1 ulp). NaN propagates; the result is flushed to zero below about
// -87.6 instead of going subnormal.
LMM_FAST_INLINE float exp_approx(float x) {
  x = x < -88.0f ? -88.0f : x;
  x = x > 88.37f ? 88.37f : x;
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t biased = static_cast<int32_t>(fx) + 127;
  biased = biased < 0 ? 0 : biased;
  int32_t bits = biased << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

LMM_FAST_INLINE double exp_approx(double x) { return std::exp(x); }

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

LMM_FAST_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LMM_FAST_INLINE void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

LMM_FAST_INLINE f32x8 splat8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

// exp_approx on eight lanes; rounding by the 1.5 * 2^23 trick keeps it free
// of ISA-specific intrinsics.
LMM_FAST_INLINE f32x8 exp8(f32x8 x) {
  const f32x8 lo = splat8(-88.0f), hi = splat8(88.37f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x8 magic = splat8(12582912.0f);
  f32x8 fx = (x * splat8(1.44269504088896341f) + magic) - magic;
  f32x8 r = x - fx * splat8(0.693359375f) + fx * splat8(2.12194440e-4f);
  f32x8 r2 = r * r;
  f32x8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * r2 + r + splat8(1.0f);
  i32x8 biased = __builtin_convertvector(fx, i32x8) + 127;
  const i32x8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  biased = biased < zero ? zero : biased;
  i32x8 bits = biased << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

LMM_FAST_INLINE float hmax8(f32x8 v) {
  float m = v[0];
  for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

LMM_FAST_INLINE float hsum8(f32x8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Maximum of x[0..n) in the accumulation type (-inf for n == 0; NaN is
// skipped by the comparison, so a NaN row still yields NaN probabilities
// later through exp(NaN - max)).
template <typename T, typename A>
LMM_FAST_INLINE A row_max(const T* x, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    A v = static_cast<A>(x[i]);
    m = v > m ? v : m;
  }
  return m;
}

template <>
LMM_FAST_INLINE float row_max<float, float>(const float* x, int64_t n) {
  f32x8 a0 = splat8(-std::numeric_limits<float>::infinity()), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    f32x8 v0 = load8(x + i), v1 = load8(x + i + 8);
    a0 = v0 > a0 ? v0 : a0;
    a1 = v1 > a1 ? v1 : a1;
  }
  a0 = a1 > a0 ? a1 : a0;
  float m = hmax8(a0);
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum_i exp(x[i] - shift).
template <typename T, typename A>
LMM_FAST_INLINE A row_sum_exp(const T* x, int64_t n, A shift) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += exp_approx(static_cast<A>(x[i]) - shift);
  return s;
}

template <>
LMM_FAST_INLINE float row_sum_exp<float, float>(const float* x, int64_t n, float shift) {
  const f32x8 sh = splat8(shift);
  f32x8 a0 = splat8(0.0f), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 += exp8(load8(x + i) - sh);
    a1 += exp8(load8(x + i + 8) - sh);
  }
  float s = hsum8(a0 + a1);
  for (; i < n; ++i) s += exp_approx(x[i] - shift);
  return s;
}

// out[i] = exp(x[i] - shift) in the accumulation type; returns their sum.
// Fuses the exp-sum pass of a softmax with the store of the numerators, so a
// softmax reads its input twice (max, then this) and the output once more.
template <typename T, typename A>
LMM_FAST_INLINE A exp_store_sum(const T* x, int64_t n, A shift, A* out) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const A e = exp_approx(static_cast<A>(x[i]) - shift);
    out[i] = e;
    s += e;
  }
  return s;
}

template <>
LMM_FAST_INLINE float exp_store_sum<float, float>(const float* x, int64_t n, float shift, float* out) {
  const f32x8 sh = splat8(shift);
  f32x8 a0 = splat8(0.0f), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x8 e0 = exp8(load8(x + i) - sh);
    const f32x8 e1 = exp8(load8(x + i + 8) - sh);
    store8(out + i, e0);
    store8(out + i + 8, e1);
    a0 += e0;
    a1 += e1;
  }
  float s = hsum8(a0 + a1);
  for (; i < n; ++i) {
    const float e = exp_approx(x[i] - shift);
    out[i] = e;
    s += e;
  }
  return s;
}

// sum_i a[i] * b[i].
template <typename A>
LMM_FAST_INLINE A dot(const A* a, const A* b, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <>
LMM_FAST_INLINE float dot<float>(const float* a, const float* b, int64_t n) {
  f32x8 a0 = splat8(0.0f), a1 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 += load8(a + i) * load8(b + i);
    a1 += load8(a + i + 8) * load8(b + i + 8);
  }
  float s = hsum8(a0 + a1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace vec
}  // namespace lmm_fast
