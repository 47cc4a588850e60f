// The Gibbs ops on the emulated device: gibbs_launch.h with EmulatedBackend.
#include <torch/library.h>

#include "emulation/emulated_backend.h"
#include "cuda/gibbs_launch.h"

namespace lmm_fast {

TORCH_LIBRARY_IMPL(lmm_fast_emulated, CPU, m) {
  m.impl("gibbs_sample", &gibbs_sample_launch<EmulatedBackend>);
  m.impl("gibbs_sample_exact", &gibbs_sample_exact_launch<EmulatedBackend>);
  m.impl("gibbs_refresh_psi", &gibbs_refresh_psi_launch<EmulatedBackend>);
  m.impl("gibbs_refresh_psi_entries", &gibbs_refresh_psi_entries_launch<EmulatedBackend>);
  m.impl("gibbs_apply_moves", &gibbs_apply_moves_launch<EmulatedBackend>);
  m.impl("gibbs_check_batch", &gibbs_check_batch_launch<EmulatedBackend>);
}

}  // namespace lmm_fast
