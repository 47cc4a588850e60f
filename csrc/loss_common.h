// Host-side argument checks shared by the CPU and CUDA loss kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace lmm_fast {

// The dtype every statistic, Psi and theta are held in for a given logits
// dtype: float64 logits accumulate in float64, everything else in float32.
inline c10::ScalarType accumulate_type(c10::ScalarType logits_dtype) {
  return logits_dtype == c10::ScalarType::Double ? c10::ScalarType::Double
                                                 : c10::ScalarType::Float;
}

struct LossGeometry {
  int64_t batch = 0;
  int64_t width = 0;          // sum of all level sizes
  int64_t num_classes = 0;    // bottom level size N
  int64_t upper_width = 0;    // sum of the upper level sizes
  std::vector<int64_t> sizes; // per level, top first
  std::vector<int64_t> offsets;  // column offset of each level in the logits
  int64_t theta_row_stride = 0;  // 0: one theta for all rows; L: one per row
  int64_t num_levels() const { return static_cast<int64_t>(sizes.size()); }
};

// Checks every op that takes packed logits shares, in the order the ops
// apply them.
inline void check_logits_matrix(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2,
      "lmm_fast: logits must be 2-D [batch, sum(level_sizes)], got ",
      logits.dim(), "-D with shape ", logits.sizes());
}

inline void check_logits_dtype(const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ||
                  dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16,
      "lmm_fast: logits must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_theta_dtype(const at::Tensor& theta, const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(theta.scalar_type() == accumulate_type(dtype),
      "lmm_fast: theta must be ", accumulate_type(dtype), " for ", dtype, " logits, got ",
      theta.scalar_type());
}

// The level layout of the packed logits; their width must match it.
inline LossGeometry level_geometry(const at::Tensor& logits, c10::IntArrayRef level_sizes) {
  TORCH_CHECK(!level_sizes.empty(), "lmm_fast: level_sizes must not be empty");
  LossGeometry g;
  g.batch = logits.size(0);
  int64_t offset = 0;
  for (size_t l = 0; l < level_sizes.size(); ++l) {
    TORCH_CHECK(level_sizes[l] > 0,
        "lmm_fast: level_sizes[", l, "] must be positive, got ", level_sizes[l]);
    g.sizes.push_back(level_sizes[l]);
    g.offsets.push_back(offset);
    offset += level_sizes[l];
  }
  g.width = offset;
  g.num_classes = level_sizes.back();
  g.upper_width = offset - g.num_classes;
  TORCH_CHECK(logits.size(1) == g.width,
      "lmm_fast: logits has ", logits.size(1),
      " columns but the levels need sum(level_sizes) = ", g.width);
  return g;
}

// theta is shared by all rows ([L]) or given per row ([B, L], e.g. from a
// gating network).
inline void set_theta_layout(LossGeometry& g, const at::Tensor& theta) {
  TORCH_CHECK((theta.dim() == 1 && theta.size(0) == g.num_levels()) ||
                  (theta.dim() == 2 && theta.size(0) == g.batch &&
                   theta.size(1) == g.num_levels()),
      "lmm_fast: theta must have one weight per level, [", g.num_levels(),
      "] or per row [", g.batch, ", ", g.num_levels(), "], got shape ", theta.sizes());
  g.theta_row_stride = theta.dim() == 2 ? g.num_levels() : 0;
}

inline LossGeometry check_loss_inputs(
    const at::Tensor& logits,
    const at::Tensor& target,
    const at::Tensor& psi_t,
    const at::Tensor& theta,
    c10::IntArrayRef level_sizes) {
  check_logits_matrix(logits);
  TORCH_CHECK(target.dim() == 1,
      "lmm_fast: target must be 1-D [batch], got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == c10::ScalarType::Long,
      "lmm_fast: target must be int64 (long) class indices, got ",
      target.scalar_type());
  TORCH_CHECK(target.size(0) == logits.size(0),
      "lmm_fast: target has ", target.size(0), " rows but logits has ",
      logits.size(0));
  check_logits_dtype(logits);
  const auto dtype = logits.scalar_type();
  const auto acc = accumulate_type(dtype);
  TORCH_CHECK(psi_t.scalar_type() == acc,
      "lmm_fast: psi_t must be ", acc, " for ", dtype, " logits, got ",
      psi_t.scalar_type());
  check_theta_dtype(theta, logits);
  for (const auto* t : {&target, &psi_t, &theta}) {
    TORCH_CHECK(t->device() == logits.device(),
        "lmm_fast: all inputs must be on the logits' device ", logits.device(),
        ", got one on ", t->device());
  }
  LossGeometry g = level_geometry(logits, level_sizes);
  TORCH_CHECK(psi_t.dim() == 2 && psi_t.size(0) == g.num_classes &&
                  psi_t.size(1) == g.upper_width,
      "lmm_fast: psi_t must be [N, sum(upper level sizes)] = [", g.num_classes,
      ", ", g.upper_width, "], got ", psi_t.sizes());
  set_theta_layout(g, theta);
  return g;
}

// Validates the optional per-group Psi factors; returns a contiguous tensor
// (undefined when absent).
inline at::Tensor check_psi_scale(const std::optional<at::Tensor>& psi_scale,
                                  const LossGeometry& g, const at::Tensor& logits) {
  if (!psi_scale.has_value() || !psi_scale->defined()) return at::Tensor();
  const at::Tensor& s = *psi_scale;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == g.upper_width,
      "lmm_fast: psi_scale must be [sum(upper level sizes)] = [", g.upper_width,
      "], got shape ", s.sizes());
  TORCH_CHECK(s.scalar_type() == accumulate_type(logits.scalar_type()),
      "lmm_fast: psi_scale must be ", accumulate_type(logits.scalar_type()), ", got ",
      s.scalar_type());
  TORCH_CHECK(s.device() == logits.device(),
      "lmm_fast: psi_scale must be on ", logits.device(), ", got ", s.device());
  return s.contiguous();
}

inline void check_stats(const at::Tensor& stats, const char* name,
                        const LossGeometry& g, const at::Tensor& logits) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == g.batch &&
                  stats.size(1) == g.num_levels(),
      "lmm_fast: ", name, " must be [batch, levels] = [", g.batch, ", ",
      g.num_levels(), "], got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == accumulate_type(logits.scalar_type()),
      "lmm_fast: ", name, " must be ", accumulate_type(logits.scalar_type()),
      ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == logits.device(),
      "lmm_fast: ", name, " must be on ", logits.device(), ", got ", stats.device());
}

// Target values as the CPU kernels check them (target: a CPU tensor):
// class indices in [0, N) or ignore_index; names the first bad row.
inline void check_target_values_host(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t b = 0; b < target.numel(); ++b) {
    TORCH_CHECK(t[b] == ignore_index || (t[b] >= 0 && t[b] < num_classes),
        "lmm_fast: target[", b, "] = ", t[b], " is out of range: class indices must be in [0, ",
        num_classes, ") or equal ignore_index (", ignore_index, ")");
  }
}

// The same check on the target's own device, before a launch: one reduction
// and one read back (a host sync); only a failing batch is copied to the
// host, for the same message as on the CPU.
inline void check_target_values(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  if (target.numel() == 0) return;
  const bool bad = target.ne(ignore_index)
                       .logical_and(target.lt(0).logical_or(target.ge(num_classes)))
                       .any()
                       .item<bool>();
  if (bad) check_target_values_host(target.cpu().contiguous(), num_classes, ignore_index);
}

// Logits only need unit stride along the columns; rows may be strided.
inline at::Tensor rows_contiguous(const at::Tensor& logits) {
  if (logits.size(1) <= 1 || logits.stride(1) == 1) return logits;
  return logits.contiguous();
}

}  // namespace lmm_fast
