// The CUDA prediction ops: the kernels of predict_kernels.cuh launched by the
// generic host code of predict_launch.h on the current CUDA stream.
#include <torch/library.h>

#include "cuda/cuda_backend.cuh"
#include "cuda/predict_launch.h"

namespace lmm_fast {

TORCH_LIBRARY_IMPL(lmm_fast, CUDA, m) {
  m.impl("lmm_gather_scores", &lmm_gather_scores_launch<CudaBackend>);
  m.impl("lmm_predict_proba_tree", &lmm_predict_proba_tree_launch<CudaBackend>);
  m.impl("lmm_predict_proba_dense", &lmm_predict_proba_dense_launch<CudaBackend>);
  m.impl("lmm_topk_tree", &lmm_topk_tree_launch<CudaBackend>);
}

}  // namespace lmm_fast
