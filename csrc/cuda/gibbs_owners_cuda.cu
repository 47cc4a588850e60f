// The CUDA owner update of the non-overlapping Psi (gibbs_update_owners):
// the phases of gibbs_owners_parallel.h launched by gibbs_owners_launch.h as
// grid-stride kernels on the current CUDA stream.
#include <torch/library.h>

#include "cuda/cuda_backend.cuh"
#include "cuda/gibbs_owners_launch.h"

namespace lmm_fast {

TORCH_LIBRARY_IMPL(lmm_fast, CUDA, m) {
  m.impl("gibbs_update_owners", &gibbs_update_owners_launch<CudaBackend>);
}

}  // namespace lmm_fast
