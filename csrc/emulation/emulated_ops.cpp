// The lmm_fast_emulated operator namespace of the tests' emulated backend:
// one twin of each package op that has CUDA kernels, with the package op's
// own schema (read from the dispatcher, so lmm_fast._C must be loaded
// first). The *_emulated.cpp files register the implementations: the CUDA
// ops' generic host code with the emulated backend, on CPU tensors.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <sstream>
#include <string>

namespace {

constexpr const char* kOps[] = {
    "lmm_loss_forward",       "lmm_loss_backward",  "lmm_predict_proba_tree", "lmm_predict_proba_dense",
    "lmm_topk_tree",          "lmm_gather_scores",  "gibbs_sample",           "gibbs_sample_exact",
    "gibbs_refresh_psi",      "gibbs_refresh_psi_entries", "gibbs_apply_moves", "gibbs_check_batch",
    "gibbs_update_owners",
};

}  // namespace

TORCH_LIBRARY(lmm_fast_emulated, m) {
  for (const char* name : kOps) {
    const std::string qualified = std::string("lmm_fast::") + name;
    const auto handle = c10::Dispatcher::singleton().findSchema({qualified, ""});
    TORCH_CHECK(handle.has_value(), "lmm_fast_emulated: no schema for ", qualified,
                " (import lmm_fast before loading the emulated library)");
    std::ostringstream schema;
    schema << handle->schema();
    const std::string own = schema.str().substr(std::string("lmm_fast::").size());
    m.def(own.c_str());
  }
}
