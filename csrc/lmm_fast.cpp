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
  // every upper level's Psi (class-major); theta: [L] or [B, L]. Returns the
  // per-row loss [B], the per-row, per-level statistics the backward needs,
  // lse [B, 5 * L] (five blocks of L per row: the level's maximum logit and log sum exp(a - max), the
  // same over the target's groups weighted by Psi, and with label smoothing
  // sum_c w_c m^l_c / z_c; see loss_common.h),
  // and log_m [B, L] (log of each level's vote for the target class).
  // psi_scale, when given: [sum(upper level sizes)] per-group factors, the
  // effective Psi^l[t, y] being psi_t[y, t] * psi_scale[t] (lets the Gibbs
  // adaptation keep unnormalised counts in psi_t and renormalise a group by
  // writing one number).
  // weight [N] and label_smoothing eps, as in F.cross_entropy: the loss is
  // (1 - eps) w_y (-log z_y) + (eps / N) sum_c w_c (-log z_c), with z_c the
  // mixture's probability of class c (eps > 0 costs O(N * sum(upper sizes))
  // per row, without a [B, N] temporary).
  m.def(
      "lmm_loss_forward(Tensor logits, Tensor target, Tensor psi_t, "
      "Tensor theta, int[] level_sizes, int ignore_index, Tensor? psi_scale=None, "
      "Tensor? weight=None, float label_smoothing=0.0) "
      "-> (Tensor loss, Tensor lse, Tensor log_m)");
  // Gradient of sum(grad_loss * loss) with respect to the logits, written in
  // one read of the logits from the statistics the forward saved.
  m.def(
      "lmm_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor psi_t, Tensor theta, Tensor lse, Tensor log_m, "
      "int[] level_sizes, int ignore_index, Tensor? psi_scale=None, "
      "Tensor? weight=None, float label_smoothing=0.0) -> Tensor");
  // The CPU backward's gradient storage: a tensor whose storage the next
  // lmm_loss_backward on this thread may write its gradient into, if nothing
  // else references that storage by then (None: allocate afresh). The loss
  // module keeps its last gradient's storage and offers it (see loss_cpu.cpp).
  m.def("_offer_grad_storage(Tensor? storage) -> ()");
  // Collapsed Gibbs draw of the group labels (paper Eq. 4) of a mini-batch at
  // every upper level, each image conditioned on counts that exclude only
  // itself. logits: packed [B, sum(level_sizes)] or the upper levels only;
  // counts_t: class-major Omega [N, sum(upper sizes)] int32;
  // group_totals: n_t [sum(upper sizes)] int32; old_labels and the result:
  // [B, L-1] int64; randomness keyed by (seed, step, image_ids[b], level).
  m.def(
      "gibbs_sample(Tensor logits, Tensor target, Tensor old_labels, "
      "Tensor counts_t, Tensor group_totals, Tensor beta, float beta0, "
      "int[] level_sizes, int seed, int step, Tensor image_ids) -> Tensor");
  // The exact sequential sampler: images one at a time in batch order, each
  // seeing the counts its predecessors left; updates counts_t and group_totals.
  m.def(
      "gibbs_sample_exact(Tensor logits, Tensor target, Tensor old_labels, "
      "Tensor(a!) counts_t, Tensor(b!) group_totals, Tensor beta, float beta0, "
      "int[] level_sizes, int seed, int step, Tensor image_ids) -> Tensor");
  // Eq. 6 factored as the loss reads it (Psi[t, y] = psi_t[y, t] * psi_scale[t]):
  // psi_t[:, c] = counts_t[:, c] + beta and psi_scale[c] = 1 / (group_totals[c]
  // + beta0), rewritten in place for the listed columns c only.
  m.def(
      "gibbs_refresh_psi(Tensor(a!) psi_t, Tensor(b!) psi_scale, Tensor counts_t, "
      "Tensor group_totals, Tensor beta, float beta0, Tensor columns) -> ()");
  // The same for single entries: psi_t[rows[i], columns[i]] = counts_t[...] +
  // beta[rows[i]] and psi_scale[columns[i]] = 1 / (group_totals[...] + beta0).
  m.def(
      "gibbs_refresh_psi_entries(Tensor(a!) psi_t, Tensor(b!) psi_scale, Tensor counts_t, "
      "Tensor group_totals, Tensor beta, float beta0, Tensor rows, Tensor columns) -> ()");
  // Checks a batch of training-image indices against the dataset: returns
  // int64 [3] = (first position b with indices[b] outside [0, len(train_targets)),
  // an image id that occurs twice, first position with train_targets[indices[b]]
  // != target[b]), each -1 if there is none. One read of the result on the
  // host answers all three.
  m.def("gibbs_check_batch(Tensor indices, Tensor target, Tensor train_targets) -> Tensor");
  // Moves a batch's images from their old to their new group labels: for
  // every image b and upper level l with old_labels[b, l] != new_labels[b, l],
  // counts_t[target[b], off_l + old] -= 1 and += 1 at the new label,
  // group_totals likewise; then labels[image_ids[b]] = new_labels[b].
  // Integer updates, so the result does not depend on their order.
  m.def(
      "gibbs_apply_moves(Tensor(a!) counts_t, Tensor(b!) group_totals, Tensor(c!) labels, "
      "Tensor target, Tensor image_ids, Tensor old_labels, Tensor new_labels, "
      "int[] level_sizes) -> ()");
  // Non-overlapping Psi of one upper level (columns [offset, offset + size)):
  // updates the level's owner state (owner [N] int64: best group of each
  // class, lowest on ties; numerator [N] float64: Omega[owner, y] + beta_y;
  // kept [size] int64: classes owned per group; nonzero [size, ceil(N/64)]
  // int64: bitmap of Omega[t, y] > 0; bound [N] float64: an upper bound of
  // each class's runner-up value) and psi_t / psi_scale in place after
  // the counts changed at the moves classes[i]: old_groups[i] -> new_groups[i]
  // (level-local; entries with old == new are ignored). full: rebuild all of
  // it from the counts instead.
  m.def(
      "gibbs_update_owners(Tensor(a!) psi_t, Tensor(b!) psi_scale, Tensor(c!) owner, "
      "Tensor(d!) numerator, Tensor(e!) kept, Tensor(f!) nonzero, Tensor(g!) bound, Tensor counts_t, "
      "Tensor group_totals, Tensor beta, float beta0, int offset, int size, Tensor classes, "
      "Tensor old_groups, Tensor new_groups, bool full) -> ()");
  // Class probabilities sum_l theta_l softmax(a^l) Psi^l [B, N] for a tree
  // Psi (at most one non-zero per column and level), given level-major as
  // group_index [L-1, N] (int32 group of each class) and group_value [L-1, N]
  // (Psi^l[group, class]); the upper levels are gathered, never expanded.
  m.def(
      "lmm_predict_proba_tree(Tensor logits, Tensor group_index, "
      "Tensor group_value, Tensor theta, int[] level_sizes) -> Tensor");
  // The same for any Psi, from the class-major psi_t [N, sum(upper sizes)]
  // of the loss: one GEMM for all upper levels, bottom softmax added in place.
  m.def(
      "lmm_predict_proba_dense(Tensor logits, Tensor psi_t, Tensor theta, "
      "int[] level_sizes) -> Tensor");
  // The k most probable classes of every row under a tree Psi, best first:
  // values [B, k] (probabilities, logits' dtype) and indices [B, k] (int64),
  // by partial selection without forming the [B, N] probabilities.
  m.def(
      "lmm_topk_tree(Tensor logits, Tensor group_index, Tensor group_value, "
      "Tensor theta, int[] level_sizes, int k) -> (Tensor values, Tensor indices)");
  // Scores of a few rows of a linear layer per sample, for coarse-to-fine
  // prediction: out[b, j] = x[b] . weight[rows[b, j]] + bias[rows[b, j]]
  // ([B, C]; -inf where rows[b, j] == -1), reading the weight rows in place
  // instead of gathering a [B, C, d] copy.
  m.def("lmm_gather_scores(Tensor x, Tensor weight, Tensor? bias, Tensor rows) -> Tensor");
}
