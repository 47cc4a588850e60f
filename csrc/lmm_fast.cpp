// Operator schemas of the lmm_fast namespace, declared once. Each kernel file
// registers its own CPU or CUDA implementation with TORCH_LIBRARY_IMPL; the
// fake (meta) kernels and the autograd formulas live in lmm_fast/_ops.py.
#include <torch/library.h>

#ifdef LMM_FAST_PYTHON_MODULE
#include <Python.h>

// Importing lmm_fast._C loads this library, which registers the operators.
// The module itself exposes nothing: everything goes through torch.ops.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(lmm_fast, m) {
  // Fused level-wise mixture loss. logits: [B, sum(level_sizes)] packed top
  // level first; psi_t: [N, sum(upper level sizes)], row y holds column y of
  // every upper level's Psi (class-major); theta: [L]. Returns the per-row
  // loss [B] and the per-row, per-level statistics the backward needs:
  // lse [B, L] (log-sum-exp of each level's logits) and log_m [B, L]
  // (log of each level's vote for the target class).
  m.def(
      "lmm_loss_forward(Tensor logits, Tensor target, Tensor psi_t, "
      "Tensor theta, int[] level_sizes, int ignore_index) "
      "-> (Tensor loss, Tensor lse, Tensor log_m)");
  // Gradient of sum(grad_loss * loss) with respect to the logits, written in
  // one read of the logits from the statistics the forward saved.
  m.def(
      "lmm_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor psi_t, Tensor theta, Tensor lse, Tensor log_m, "
      "int[] level_sizes, int ignore_index) -> Tensor");
}
