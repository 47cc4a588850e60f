// CUDA owner update of the non-overlapping Psi (gibbs_update_owners): the
// phases of gibbs_owners_parallel.h, each launched as a grid-stride kernel on
// the current stream, one thread per index. Scratch comes from the caching
// allocator; the stable sort of the classes by owner is at::sort's. The only
// host synchronisation is the copy of the 4 numbers of the value checks in an
// incremental call (none in a rebuild). The results are bit-identical to the
// CPU op's; the same phases run on the CPU in gibbs_update_owners_emulated,
// which the tests compare with the CPU op.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

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

class DeviceRunner {
 public:
  explicit DeviceRunner(cudaStream_t stream) : stream_(stream) {}
  template <typename Phase>
  void operator()(const Phase& phase, int64_t count) {
    launch(phase, count, nullptr, 0, count);
  }
  // the thread count base + *dynamic * per is read on the device; the grid
  // is sized for `most`
  template <typename Phase>
  void operator()(const Phase& phase, int64_t base, const int64_t* dynamic, int64_t per, int64_t most) {
    launch(phase, base, dynamic, per, most);
  }

 private:
  template <typename Phase>
  void launch(const Phase& phase, int64_t base, const int64_t* dynamic, int64_t per, int64_t most) {
    if (most <= 0) return;
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((most + kOwnerThreads - 1) / kOwnerThreads, kOwnerMaxBlocks));
    owners_phase_kernel<Phase><<<blocks, kOwnerThreads, 0, stream_>>>(phase, base, dynamic, per);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  cudaStream_t stream_;
};

void gibbs_update_owners_cuda(at::Tensor& psi_t, at::Tensor& psi_scale, at::Tensor& owner,
                              at::Tensor& numerator, at::Tensor& kept, at::Tensor& nonzero,
                              at::Tensor& bound, const at::Tensor& counts_t, const at::Tensor& group_totals,
                              const at::Tensor& beta, double beta0, int64_t offset, int64_t size,
                              const at::Tensor& classes, const at::Tensor& old_groups,
                              const at::Tensor& new_groups, bool full) {
  // shapes, dtypes and devices first (the guard needs psi_t on a CUDA device)
  gibbs::check_update_owners_inputs(psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t,
                                    group_totals, beta, beta0, offset, size, classes, old_groups,
                                    new_groups);
  const c10::cuda::CUDAGuard guard(psi_t.device());
  DeviceRunner run(c10::cuda::getCurrentCUDAStream());
  gibbs::owners::update_owners_parallel(run, psi_t, psi_scale, owner, numerator, kept, nonzero, bound,
                                        counts_t, group_totals, beta, beta0, offset, size, classes,
                                        old_groups, new_groups, full);
}

}  // namespace

TORCH_LIBRARY_IMPL(lmm_fast, CUDA, m) {
  m.impl("gibbs_update_owners", &gibbs_update_owners_cuda);
}

}  // namespace lmm_fast
