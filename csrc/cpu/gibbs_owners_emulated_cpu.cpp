// gibbs_update_owners_emulated: the CUDA owner update (gibbs_owners_parallel.h)
// run on the CPU, phase by phase, each phase a serial loop over its thread
// indices. The indices are visited in a scrambled order (residue classes of a
// stride, alternately reversed) so that a phase whose result depended on the
// order of its threads would show it; the atomics are plain operations here.
// The tests compare it with the sequential op bit for bit, which checks the
// device algorithm without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

// Every product and sum separately rounded, as on the device and in the host
// op (see gibbs_cpu.cpp).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "gibbs_owners_parallel.h"

namespace lmm_fast {
namespace {

class SerialRunner {
 public:
  template <typename Phase>
  void operator()(const Phase& phase, int64_t count) {
    visit(phase, count);
  }
  template <typename Phase>
  void operator()(const Phase& phase, int64_t base, const int64_t* dynamic, int64_t per, int64_t most) {
    const int64_t count = base + *dynamic * per;
    TORCH_INTERNAL_ASSERT(count <= most, "lmm_fast: phase of ", count, " threads above its bound ", most);
    visit(phase, count);
  }

 private:
  template <typename Phase>
  void visit(const Phase& phase, int64_t count) {
    ++calls_;
    const int64_t stride = calls_ % 3 == 0 ? 3 : 7;
    const bool reversed = calls_ % 2 == 1;
    for (int64_t r = 0; r < stride; ++r) {
      const int64_t residue = reversed ? stride - 1 - r : r;
      if (residue >= count) continue;
      if (reversed) {
        const int64_t last = residue + (count - 1 - residue) / stride * stride;
        for (int64_t i = last; i >= residue; i -= stride) phase(i);
      } else {
        for (int64_t i = residue; i < count; i += stride) phase(i);
      }
    }
  }
  int64_t calls_ = 0;
};

void gibbs_update_owners_emulated_cpu(at::Tensor& psi_t, at::Tensor& psi_scale, at::Tensor& owner,
                                      at::Tensor& numerator, at::Tensor& kept, at::Tensor& nonzero,
                                      at::Tensor& bound, const at::Tensor& counts_t,
                                      const at::Tensor& group_totals, const at::Tensor& beta, double beta0,
                                      int64_t offset, int64_t size, const at::Tensor& classes,
                                      const at::Tensor& old_groups, const at::Tensor& new_groups, bool full) {
  gibbs::check_update_owners_inputs(psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t,
                                    group_totals, beta, beta0, offset, size, classes, old_groups,
                                    new_groups);
  SerialRunner run;
  gibbs::owners::update_owners_parallel(run, psi_t, psi_scale, owner, numerator, kept, nonzero, bound,
                                        counts_t, group_totals, beta, beta0, offset, size, classes,
                                        old_groups, new_groups, full);
}

}  // namespace

TORCH_LIBRARY_IMPL(lmm_fast, CPU, m) {
  m.impl("gibbs_update_owners_emulated", &gibbs_update_owners_emulated_cpu);
}

}  // namespace lmm_fast
