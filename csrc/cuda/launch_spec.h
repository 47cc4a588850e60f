// The description of one kernel launch that the generic launchers hand to a
// backend (csrc/cuda/cuda_backend.cuh on the device, csrc/emulation on the
// CPU). Needs dim3, from the CUDA runtime or the emulated device.
#pragma once

#include <cstddef>

namespace lmm_fast {

struct LaunchSpec {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;  // dynamic shared memory
  int launch_bound = 0;     // the kernel's __launch_bounds__, 0 if it has none
  const char* name = "kernel";
};

}  // namespace lmm_fast
