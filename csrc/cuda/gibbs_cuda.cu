// The CUDA Gibbs ops: the kernels of gibbs_kernels.cuh launched by the
// generic host code of gibbs_launch.h on the current CUDA stream.
#include <torch/library.h>

#include "cuda/cuda_backend.cuh"
#include "cuda/gibbs_launch.h"

namespace lmm_fast {

// gibbs_update_owners has its own kernels and registration in
// gibbs_owners_cuda.cu (the phases of gibbs_owners_parallel.h).
TORCH_LIBRARY_IMPL(lmm_fast, CUDA, m) {
  m.impl("gibbs_sample", &gibbs_sample_launch<CudaBackend>);
  m.impl("gibbs_sample_exact", &gibbs_sample_exact_launch<CudaBackend>);
  m.impl("gibbs_refresh_psi", &gibbs_refresh_psi_launch<CudaBackend>);
  m.impl("gibbs_refresh_psi_entries", &gibbs_refresh_psi_entries_launch<CudaBackend>);
  m.impl("gibbs_apply_moves", &gibbs_apply_moves_launch<CudaBackend>);
  m.impl("gibbs_check_batch", &gibbs_check_batch_launch<CudaBackend>);
}

}  // namespace lmm_fast
