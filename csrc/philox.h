// Philox4x32-10 (Salmon, Moraes, Dror & Shaw, SC'11), the counter-based
// generator of Random123, for host and device code alike.
//
// A draw is a pure function of (key, counter): kernels derive the counter from
// what the draw is for (step, image, level), so the numbers do not depend on
// thread scheduling, batch order or device, and a run can be resumed by
// storing nothing but the step counter.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LMM_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LMM_FAST_HOST_DEVICE inline
#endif

// The device variant of the code below (intrinsics, atomics) where it runs
// as device code: on the GPU, or on the emulated device of the tests, which
// provides the same intrinsics (csrc/emulation/cuda_emulation.h).
#if defined(LMM_FAST_CUDA_EMULATION)
#include "emulation/cuda_emulation.h"
#endif
#if defined(__CUDA_ARCH__) || defined(LMM_FAST_CUDA_EMULATION)
#define LMM_FAST_DEVICE_PATH 1
#else
#define LMM_FAST_DEVICE_PATH 0
#endif

namespace lmm_fast {
namespace philox {

struct Block {
  uint32_t v[4];
};

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

LMM_FAST_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if LMM_FAST_DEVICE_PATH
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(product);
  hi = static_cast<uint32_t>(product >> 32);
#endif
}

LMM_FAST_HOST_DEVICE Block round(Block c, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kMul0, c.v[0], hi0, lo0);
  mulhilo(kMul1, c.v[2], hi1, lo1);
  Block out;
  out.v[0] = hi1 ^ c.v[1] ^ k0;
  out.v[1] = lo1;
  out.v[2] = hi0 ^ c.v[3] ^ k1;
  out.v[3] = lo0;
  return out;
}

// Philox4x32 with 10 rounds: four 32-bit words from a 128-bit counter and a
// 64-bit key (matches Random123's known-answer vectors).
LMM_FAST_HOST_DEVICE Block philox4x32_10(Block counter, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 9; ++r) {
    counter = round(counter, k0, k1);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return round(counter, k0, k1);
}

// 64 random bits for one (seed, step, stream, substream) tuple: the key is the
// seed, the counter (step low, step high, stream, substream).
LMM_FAST_HOST_DEVICE uint64_t random_u64(uint64_t seed, uint64_t step, uint32_t stream,
                                         uint32_t substream) {
  Block c;
  c.v[0] = static_cast<uint32_t>(step);
  c.v[1] = static_cast<uint32_t>(step >> 32);
  c.v[2] = stream;
  c.v[3] = substream;
  const Block r = philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (static_cast<uint64_t>(r.v[1]) << 32) | r.v[0];
}

}  // namespace philox
}  // namespace lmm_fast
