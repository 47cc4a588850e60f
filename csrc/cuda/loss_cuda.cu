// The CUDA loss ops: the kernels of loss_kernels.cuh launched by the generic
// host code of loss_launch.h on the current CUDA stream.
#include <torch/library.h>

#include "cuda/cuda_backend.cuh"
#include "cuda/loss_launch.h"

namespace lmm_fast {

TORCH_LIBRARY_IMPL(lmm_fast, CUDA, m) {
  m.impl("lmm_loss_forward", &lmm_loss_forward_launch<CudaBackend>);
  m.impl("lmm_loss_backward", &lmm_loss_backward_launch<CudaBackend>);
}

}  // namespace lmm_fast
