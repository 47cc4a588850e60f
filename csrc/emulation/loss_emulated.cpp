// The loss ops on the emulated device: loss_launch.h with EmulatedBackend.
#include <torch/library.h>

#include "emulation/emulated_backend.h"
#include "cuda/loss_launch.h"

namespace lmm_fast {

TORCH_LIBRARY_IMPL(lmm_fast_emulated, CPU, m) {
  m.impl("lmm_loss_forward", &lmm_loss_forward_launch<EmulatedBackend>);
  m.impl("lmm_loss_backward", &lmm_loss_backward_launch<EmulatedBackend>);
}

}  // namespace lmm_fast
