// The kernel of the owner update of the non-overlapping Psi: one launch per
// phase of gibbs_owners_parallel.h, each a grid-stride loop with one thread
// per index. Compiled by nvcc for gibbs_owners_cuda.cu and as host C++ for
// the emulated backend of the tests; gibbs_owners_launch.h launches it.
#pragma once

#include <cstdint>

#include "cuda/device_compat.cuh"
#include "gibbs_owners_parallel.h"

namespace lmm_fast {
namespace {

constexpr int kOwnerThreads = 256;
constexpr int64_t kOwnerMaxBlocks = 4096;

template <typename Phase>
__global__ void __launch_bounds__(kOwnerThreads)
owners_phase_kernel(Phase phase, int64_t base, const int64_t* dynamic, int64_t per) {
  const int64_t count = base + (dynamic != nullptr ? *dynamic * per : 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    phase(i);
  }
}

}  // namespace
}  // namespace lmm_fast
