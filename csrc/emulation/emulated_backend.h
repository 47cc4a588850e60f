// The emulated backend of the generic launchers (csrc/cuda/*_launch.h): the
// same host code as the CUDA ops, on CPU tensors, with every launch run by
// the emulated device of cuda_emulation.h.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <utility>

#include "emulation/cuda_emulation.h"

namespace lmm_fast {

struct EmulatedBackend {
  // The CUDA backend's device guard; here the check that the tensors are
  // host memory, which the emulated kernels read and write directly.
  struct Guard {
    explicit Guard(const c10::Device& device) {
      TORCH_CHECK(device.is_cpu(), "lmm_fast_emulated: the emulated CUDA ops take CPU tensors, got one on ",
                  device);
    }
  };

  template <typename... Params, typename... Args>
  static void launch(void (*kernel)(Params...), const LaunchSpec& spec, Args&&... args) {
    emu::launch(kernel, spec, std::forward<Args>(args)...);
  }
};

}  // namespace lmm_fast
