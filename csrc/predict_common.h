// Host-side argument checks shared by the CPU and CUDA prediction kernels.
//
// The tree form of Psi: every column of every upper level's Psi has at most
// one non-zero, so level l is given by group_index[l, y] (int32, the group of
// class y) and group_value[l, y] (Psi^l[group, y]; 0 for a class in no group).
// Both are level-major [L-1, N] so that the kernels stream each level's row.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "loss_common.h"

namespace lmm_fast {

inline LossGeometry check_predict_inputs(const at::Tensor& logits, const at::Tensor& theta,
                                         c10::IntArrayRef level_sizes) {
  check_logits_matrix(logits);
  check_logits_dtype(logits);
  check_theta_dtype(theta, logits);
  TORCH_CHECK(theta.device() == logits.device(),
      "lmm_fast: theta must be on the logits' device ", logits.device(), ", got ", theta.device());
  LossGeometry g = level_geometry(logits, level_sizes);
  set_theta_layout(g, theta);
  // Group ids travel as int32 (the kernels gather through them).
  TORCH_CHECK(g.num_classes < (int64_t{1} << 31),
      "lmm_fast: at most 2^31 - 1 classes are supported, got ", g.num_classes);
  return g;
}

inline void check_tree_index(const at::Tensor& group_index, const at::Tensor& group_value,
                             const LossGeometry& g, const at::Tensor& logits) {
  const int64_t upper = g.num_levels() - 1;
  TORCH_CHECK(group_index.scalar_type() == c10::ScalarType::Int,
      "lmm_fast: group_index must be int32, got ", group_index.scalar_type());
  TORCH_CHECK(group_index.dim() == 2 && group_index.size(0) == upper &&
                  group_index.size(1) == g.num_classes,
      "lmm_fast: group_index must be [upper levels, N] = [", upper, ", ", g.num_classes,
      "], got ", group_index.sizes());
  const auto acc = accumulate_type(logits.scalar_type());
  TORCH_CHECK(group_value.scalar_type() == acc,
      "lmm_fast: group_value must be ", acc, " for ", logits.scalar_type(), " logits, got ",
      group_value.scalar_type());
  TORCH_CHECK(group_value.sizes() == group_index.sizes(),
      "lmm_fast: group_value must have group_index's shape ", group_index.sizes(), ", got ",
      group_value.sizes());
  for (const auto& [t, name] : {std::pair{&group_index, "group_index"}, std::pair{&group_value, "group_value"}}) {
    TORCH_CHECK(t->device() == logits.device(),
        "lmm_fast: ", name, " must be on the logits' device ", logits.device(), ", got ", t->device());
  }
}

inline void check_dense_psi(const at::Tensor& psi_t, const LossGeometry& g,
                            const at::Tensor& logits) {
  const auto acc = accumulate_type(logits.scalar_type());
  TORCH_CHECK(psi_t.scalar_type() == acc,
      "lmm_fast: psi_t must be ", acc, " for ", logits.scalar_type(), " logits, got ",
      psi_t.scalar_type());
  TORCH_CHECK(psi_t.dim() == 2 && psi_t.size(0) == g.num_classes &&
                  psi_t.size(1) == g.upper_width,
      "lmm_fast: psi_t must be [N, sum(upper level sizes)] = [", g.num_classes, ", ",
      g.upper_width, "], got ", psi_t.sizes());
  TORCH_CHECK(psi_t.device() == logits.device(),
      "lmm_fast: psi_t must be on the logits' device ", logits.device(), ", got ",
      psi_t.device());
}

inline void check_gather_scores_inputs(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& rows) {
  TORCH_CHECK(x.dim() == 2, "lmm_fast: x must be 2-D [B, d], got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ||
                  dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16,
      "lmm_fast: x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
      "lmm_fast: weight must be [rows, d] = [*, ", x.size(1), "], got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype,
      "lmm_fast: weight must have x's dtype ", dtype, ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(),
      "lmm_fast: weight must be on x's device ", x.device(), ", got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
        "lmm_fast: bias must be [rows] = [", weight.size(0), "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype,
        "lmm_fast: bias must have x's dtype ", dtype, ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(),
        "lmm_fast: bias must be on x's device ", x.device(), ", got ", bias->device());
  }
  TORCH_CHECK(rows.scalar_type() == c10::ScalarType::Long,
      "lmm_fast: rows must be int64, got ", rows.scalar_type());
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == x.size(0),
      "lmm_fast: rows must be [B, C] with B = ", x.size(0), ", got shape ", rows.sizes());
  TORCH_CHECK(rows.device() == x.device(),
      "lmm_fast: rows must be on x's device ", x.device(), ", got ", rows.device());
}

// Group indices as the CPU kernels check them (group_index: a CPU tensor):
// each level's in [0, N_l); names the first bad entry.
inline void check_group_index_values_host(const at::Tensor& group_index, const LossGeometry& g) {
  const int32_t* idx = group_index.data_ptr<int32_t>();
  for (int64_t l = 0; l + 1 < g.num_levels(); ++l) {
    const int32_t* row = idx + l * g.num_classes;
    int32_t lo = 0, hi = 0;
    for (int64_t y = 0; y < g.num_classes; ++y) {
      lo = std::min(lo, row[y]);
      hi = std::max(hi, row[y]);
    }
    if (lo >= 0 && hi < g.sizes[l]) continue;
    for (int64_t y = 0; y < g.num_classes; ++y) {
      TORCH_CHECK(row[y] >= 0 && row[y] < g.sizes[l],
          "lmm_fast: group_index[", l, ", ", y, "] = ", row[y], " is out of range: level ", l,
          " has ", g.sizes[l], " groups");
    }
  }
}

// The same check on group_index's own device, before a launch: a few
// elementwise ops and one read back (a host sync); only a failing index is
// copied to the host, for the same message as on the CPU.
inline void check_group_index_values(const at::Tensor& group_index, const LossGeometry& g) {
  if (g.num_levels() < 2 || g.num_classes == 0) return;
  at::Tensor bad;
  for (int64_t l = 0; l + 1 < g.num_levels(); ++l) {
    const at::Tensor row = group_index.select(0, l);
    const at::Tensor level_bad = row.lt(0).logical_or(row.ge(g.sizes[l])).any();
    bad = l == 0 ? level_bad : bad.logical_or(level_bad);
  }
  if (bad.item<bool>()) check_group_index_values_host(group_index.cpu().contiguous(), g);
}

// Weight rows of lmm_gather_scores: in [0, rows of the weight) or -1 (none),
// on any device with one read back (a host sync).
inline void check_gather_rows_values(const at::Tensor& rows, int64_t weight_rows) {
  if (rows.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(rows);
  const at::Tensor both = at::stack({lo, hi}).cpu();
  const int64_t low = both[0].item<int64_t>();
  const int64_t high = both[1].item<int64_t>();
  TORCH_CHECK(low >= -1 && high < weight_rows,
      "lmm_fast: rows must hold weight rows in [0, ", weight_rows, ") or -1, got values in [",
      low, ", ", high, "]");
}

inline void check_k(int64_t k, const LossGeometry& g) {
  TORCH_CHECK(k >= 0 && k <= g.num_classes,
      "lmm_fast: k must be in [0, N] = [0, ", g.num_classes, "], got ", k);
}

}  // namespace lmm_fast
