// Host side of the CUDA owner update (gibbs_update_owners), written once for
// both backends: the phases of gibbs_owners_parallel.h, each launched as
// owners_phase_kernel on the backend. Scratch comes from the backend's
// allocator; the stable sort of the classes by owner is at::sort's. Host
// syncs per call: one, the copy of the 4 numbers of the value checks in an
// incremental call (none in a rebuild). The results are bit-identical to the
// CPU op's.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "cuda/gibbs_owners_kernels.cuh"
#include "gibbs_owners_parallel.h"

namespace lmm_fast {
namespace {

// The Runner of gibbs::owners::run_phases on a backend.
template <class Backend>
class PhaseRunner {
 public:
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
    Backend::launch(owners_phase_kernel<Phase>,
                    {.grid = blocks, .block = kOwnerThreads, .launch_bound = kOwnerThreads,
                     .name = Phase::kName},
                    phase, base, dynamic, per);
  }
};

template <class Backend>
void gibbs_update_owners_launch(at::Tensor& psi_t, at::Tensor& psi_scale, at::Tensor& owner,
                                at::Tensor& numerator, at::Tensor& kept, at::Tensor& nonzero,
                                at::Tensor& bound, const at::Tensor& counts_t, const at::Tensor& group_totals,
                                const at::Tensor& beta, double beta0, int64_t offset, int64_t size,
                                const at::Tensor& classes, const at::Tensor& old_groups,
                                const at::Tensor& new_groups, bool full) {
  // shapes, dtypes and devices first (the guard needs psi_t on the backend's device)
  gibbs::check_update_owners_inputs(psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t,
                                    group_totals, beta, beta0, offset, size, classes, old_groups,
                                    new_groups);
  const typename Backend::Guard guard(psi_t.device());
  PhaseRunner<Backend> run;
  gibbs::owners::update_owners_parallel(run, psi_t, psi_scale, owner, numerator, kept, nonzero, bound,
                                        counts_t, group_totals, beta, beta0, offset, size, classes,
                                        old_groups, new_groups, full);
}

}  // namespace
}  // namespace lmm_fast
