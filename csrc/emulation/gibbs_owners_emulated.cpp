// The owner update on the emulated device: gibbs_owners_launch.h with
// EmulatedBackend. Its phases run on truly concurrent warps, with real
// atomics, in a block order that changes from launch to launch.
#include <torch/library.h>

#include "emulation/emulated_backend.h"
#include "cuda/gibbs_owners_launch.h"

namespace lmm_fast {

TORCH_LIBRARY_IMPL(lmm_fast_emulated, CPU, m) {
  m.impl("gibbs_update_owners", &gibbs_update_owners_launch<EmulatedBackend>);
}

}  // namespace lmm_fast
