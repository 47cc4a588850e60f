// The device backend of the generic launchers (csrc/cuda/*_launch.h): CUDA
// tensors, launches on the current stream, launch errors checked.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>

#include "cuda/device_compat.cuh"

namespace lmm_fast {

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  template <typename... Params, typename... Args>
  static void launch(void (*kernel)(Params...), const LaunchSpec& spec, Args&&... args) {
    kernel<<<spec.grid, spec.block, spec.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace lmm_fast
