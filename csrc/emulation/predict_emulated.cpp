// The prediction ops on the emulated device: predict_launch.h with
// EmulatedBackend.
#include <torch/library.h>

#include "emulation/emulated_backend.h"
#include "cuda/predict_launch.h"

namespace lmm_fast {

TORCH_LIBRARY_IMPL(lmm_fast_emulated, CPU, m) {
  m.impl("lmm_gather_scores", &lmm_gather_scores_launch<EmulatedBackend>);
  m.impl("lmm_predict_proba_tree", &lmm_predict_proba_tree_launch<EmulatedBackend>);
  m.impl("lmm_predict_proba_dense", &lmm_predict_proba_dense_launch<EmulatedBackend>);
  m.impl("lmm_topk_tree", &lmm_topk_tree_launch<EmulatedBackend>);
}

}  // namespace lmm_fast
