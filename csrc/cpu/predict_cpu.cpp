// CPU kernels of LMM prediction: the class probabilities
//   P(y | x) = sum_l theta_l softmax(a^l) Psi^l          (bottom Psi = I)
// and their top k.
//
// Tree Psi (one non-zero per column and level): a row costs two passes over
// each level's logits (max, then exp-and-store) and one pass over the N
// outputs that scales the bottom softmax and gathers each upper level's
// theta_l z^l_t through the class -> group map. Nothing of size N is formed
// per level, and the N-wide passes run from cache. When every class of a
// group of the last upper level shares that group's ancestors and Psi values
// (a hierarchy's initial Psi), the upper levels are first folded into one
// table over those groups per row, and the N-wide pass makes one gather
// instead of one per level.
//
// Dense Psi: the upper levels' theta_l z^l (B x sum N_l, small) go through one
// GEMM with the class-major psi_t, and the bottom softmax is added in place.
//
// Top k: the tree mixture of a row is formed in a per-thread buffer and its k
// best entries are kept in a heap of size k (once it holds good entries,
// blocks of 16 classes are skipped with two vector compares), so the B x N
// probabilities are never written.
//
// Gathered scores (coarse-to-fine prediction): one dot product per requested
// weight row, read in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/vec_math.h"
#include "predict_common.h"

namespace lmm_fast {
namespace {

// Writes theta_l * softmax(a^l) of every upper level into u[offset_l + t].
template <typename T, typename A>
LMM_FAST_INLINE void upper_softmax_row(const T* row, const A* theta, const LossGeometry& g, A* u) {
  for (int64_t l = 0; l + 1 < g.num_levels(); ++l) {
    const T* x = row + g.offsets[l];
    const int64_t n = g.sizes[l];
    A* dst = u + g.offsets[l];
    const A m = vec::row_max<T, A>(x, n);
    const A scale = theta[l] / vec::exp_store_sum<T, A>(x, n, m, dst);
    for (int64_t t = 0; t < n; ++t) dst[t] *= scale;
  }
}

// dst[y] = scale * dst[y] + sum_l u_l[index_l[y]] * value_l[y]. The first two
// upper levels are fused into the scaling pass (the usual depth), deeper ones
// add a pass each; all passes run over a row that is in cache.
template <typename A>
LMM_FAST_INLINE void add_tree_votes(A* __restrict__ dst, int64_t n, A scale, const A* __restrict__ u,
                                    const int32_t* __restrict__ index, const A* __restrict__ value,
                                    const LossGeometry& g) {
  const int64_t upper = g.num_levels() - 1;
  if (upper == 0) {
    for (int64_t y = 0; y < n; ++y) dst[y] *= scale;
    return;
  }
  const A* __restrict__ u0 = u + g.offsets[0];
  const int32_t* __restrict__ i0 = index;
  const A* __restrict__ v0 = value;
  if (upper == 1) {
    for (int64_t y = 0; y < n; ++y) dst[y] = dst[y] * scale + u0[i0[y]] * v0[y];
    return;
  }
  const A* __restrict__ u1 = u + g.offsets[1];
  const int32_t* __restrict__ i1 = index + n;
  const A* __restrict__ v1 = value + n;
  for (int64_t y = 0; y < n; ++y) dst[y] = dst[y] * scale + u0[i0[y]] * v0[y] + u1[i1[y]] * v1[y];
  for (int64_t l = 2; l < upper; ++l) {
    const A* __restrict__ ul = u + g.offsets[l];
    const int32_t* __restrict__ il = index + l * n;
    const A* __restrict__ vl = value + l * n;
    for (int64_t y = 0; y < n; ++y) dst[y] += ul[il[y]] * vl[y];
  }
}

// dst[y] = scale * dst[y] + table[leaf[y]].
template <typename A>
LMM_FAST_INLINE void add_folded_votes(A* __restrict__ dst, int64_t n, A scale, const A* __restrict__ table,
                                      const int32_t* __restrict__ leaf) {
  for (int64_t y = 0; y < n; ++y) dst[y] = dst[y] * scale + table[leaf[y]];
}

template <typename T, typename A>
struct TreeArgs {
  const T* logits;
  int64_t row_stride;
  const A* theta;
  const int32_t* group_index;  // [L-1, N]
  const A* group_value;        // [L-1, N]
  const LossGeometry* geo;
  // Folded form, or null: per group of the last upper level ("leaf"), its
  // ancestor at every upper level and the Psi value its classes have there,
  // [L-1, leaves] each; the leaf of class y is group_index[L-2, y].
  const int32_t* leaf_ancestor = nullptr;
  const A* leaf_value = nullptr;
};

// The mixture of row b in the accumulation type, into dst[0..N); u is scratch
// of sum(upper level sizes) plus the number of leaves.
template <typename T, typename A>
LMM_FAST_INLINE void tree_mixture_row(const TreeArgs<T, A>& a, int64_t b, A* u, A* dst) {
  const LossGeometry& g = *a.geo;
  const T* row = a.logits + b * a.row_stride;
  const A* theta = a.theta + b * g.theta_row_stride;
  upper_softmax_row<T, A>(row, theta, g, u);
  const int64_t bottom = g.num_levels() - 1;
  const T* x = row + g.offsets[bottom];
  const int64_t n = g.num_classes;
  const A m = vec::row_max<T, A>(x, n);
  const A scale = theta[bottom] / vec::exp_store_sum<T, A>(x, n, m, dst);
  if (a.leaf_ancestor == nullptr) {
    add_tree_votes<A>(dst, n, scale, u, a.group_index, a.group_value, g);
    return;
  }
  const int64_t leaves = g.sizes[bottom - 1];
  A* table = u + g.upper_width;
  for (int64_t t = 0; t < leaves; ++t) table[t] = A(0);
  for (int64_t l = 0; l < bottom; ++l) {
    const A* ul = u + g.offsets[l];
    const int32_t* anc = a.leaf_ancestor + l * leaves;
    const A* w = a.leaf_value + l * leaves;
    for (int64_t t = 0; t < leaves; ++t) table[t] += ul[anc[t]] * w[t];
  }
  add_folded_votes<A>(dst, n, scale, table, a.group_index + (bottom - 1) * n);
}

template <typename A>
size_t scratch_size(const LossGeometry& g) {
  const int64_t leaves = g.num_levels() > 1 ? g.sizes[g.num_levels() - 2] : 0;
  return static_cast<size_t>(std::max<int64_t>(g.upper_width + leaves, 1));
}

template <typename T, typename A>
LMM_FAST_INLINE void tree_rows(const TreeArgs<T, A>& a, int64_t begin, int64_t end, T* out) {
  const LossGeometry& g = *a.geo;
  std::vector<A> u(scratch_size<A>(g));
  // Float and double rows are formed in the output itself; narrower outputs
  // go through a row of the accumulation type.
  constexpr bool in_place = std::is_same_v<T, A>;
  std::vector<A> staging(in_place ? 0 : static_cast<size_t>(g.num_classes));
  for (int64_t b = begin; b < end; ++b) {
    T* out_row = out + b * g.num_classes;
    if constexpr (in_place) {
      tree_mixture_row<T, A>(a, b, u.data(), out_row);
    } else {
      tree_mixture_row<T, A>(a, b, u.data(), staging.data());
      for (int64_t y = 0; y < g.num_classes; ++y) out_row[y] = static_cast<T>(staging[y]);
    }
  }
}

// Strict total order "p is ranked above q": NaN first (as torch.topk), then
// larger value, then smaller class index, so ties are resolved by index.
template <typename A>
LMM_FAST_INLINE bool ranks_above(A p, int64_t ip, A q, int64_t iq) {
  const bool pn = std::isnan(p), qn = std::isnan(q);
  if (pn != qn) return pn;
  if (!pn && p != q) return p > q;
  return ip < iq;
}

// The k best entries of x[0..n), best first, into values/indices. A heap
// ordered by ranks_above keeps the worst kept entry on top; a later entry can
// only displace it by ranking above it, and an equal value never does (its
// index is larger), so one comparison per entry is the common case.
template <typename T, typename A>
LMM_FAST_INLINE void select_topk(const A* x, int64_t n, int64_t k, std::vector<std::pair<A, int64_t>>& heap,
                                 T* values, int64_t* indices) {
  if (k == 0) return;
  const auto cmp = [](const std::pair<A, int64_t>& p, const std::pair<A, int64_t>& q) {
    return ranks_above(p.first, p.second, q.first, q.second);
  };
  heap.clear();
  for (int64_t y = 0; y < k; ++y) heap.emplace_back(x[y], y);
  std::make_heap(heap.begin(), heap.end(), cmp);
  A worst = heap.front().first;
  const auto offer = [&](int64_t y) {
    const A v = x[y];
    if (v <= worst) return;
    if (!ranks_above(v, y, heap.front().first, heap.front().second)) return;
    std::pop_heap(heap.begin(), heap.end(), cmp);
    heap.back() = {v, y};
    std::push_heap(heap.begin(), heap.end(), cmp);
    worst = heap.front().first;
  };
  int64_t y = k;
  if constexpr (std::is_same_v<A, float>) {
    // Once the heap holds good entries almost every block of 16 lies at or
    // below the worst kept value; test a block with two vector compares
    // (NaN fails "<=", so it is offered too) and skip it whole.
    for (; y + 16 <= n; y += 16) {
      const vec::f32x8 w = vec::splat8(worst);
      const auto keep = (vec::load8(x + y) <= w) & (vec::load8(x + y + 8) <= w);
      bool all_below = true;
      for (int j = 0; j < 8; ++j) all_below &= keep[j] != 0;
      if (all_below) continue;
      for (int64_t j = y; j < y + 16; ++j) offer(j);
    }
  }
  for (; y < n; ++y) offer(y);
  std::sort_heap(heap.begin(), heap.end(), cmp);
  for (int64_t j = 0; j < k; ++j) {
    values[j] = static_cast<T>(heap[j].first);
    indices[j] = heap[j].second;
  }
}

template <typename T, typename A>
LMM_FAST_INLINE void topk_rows(const TreeArgs<T, A>& a, int64_t begin, int64_t end, int64_t k, T* values,
                               int64_t* indices) {
  const LossGeometry& g = *a.geo;
  std::vector<A> u(scratch_size<A>(g));
  std::vector<A> mix(static_cast<size_t>(g.num_classes));
  std::vector<std::pair<A, int64_t>> heap;
  heap.reserve(static_cast<size_t>(k));
  for (int64_t b = begin; b < end; ++b) {
    tree_mixture_row<T, A>(a, b, u.data(), mix.data());
    select_topk<T, A>(mix.data(), g.num_classes, k, heap, values + b * k, indices + b * k);
  }
}

template <typename T, typename A>
LMM_FAST_INLINE void upper_rows(const T* logits, int64_t row_stride, const A* theta, const LossGeometry& g,
                                int64_t begin, int64_t end, A* u) {
  for (int64_t b = begin; b < end; ++b) {
    upper_softmax_row<T, A>(logits + b * row_stride, theta + b * g.theta_row_stride, g, u + b * g.upper_width);
  }
}

// out[b, y] = mixed[b, y] + theta_L softmax(a^L)_y, for the dense path.
template <typename T, typename A>
LMM_FAST_INLINE void add_bottom_rows(const T* logits, int64_t row_stride, const A* theta, const LossGeometry& g,
                                     int64_t begin, int64_t end, const A* mixed, T* out) {
  const int64_t bottom = g.num_levels() - 1;
  const int64_t n = g.num_classes;
  std::vector<A> e(static_cast<size_t>(n));
  for (int64_t b = begin; b < end; ++b) {
    const T* x = logits + b * row_stride + g.offsets[bottom];
    const A m = vec::row_max<T, A>(x, n);
    const A scale = theta[b * g.theta_row_stride + bottom] / vec::exp_store_sum<T, A>(x, n, m, e.data());
    const A* mixed_row = mixed + b * n;
    T* out_row = out + b * n;
    for (int64_t y = 0; y < n; ++y) out_row[y] = static_cast<T>(mixed_row[y] + scale * e[y]);
  }
}

template <typename T, typename A>
LMM_FAST_INLINE A dot(const T* a, const T* b, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<A>(a[i]) * static_cast<A>(b[i]);
  return s;
}

template <>
LMM_FAST_INLINE float dot<float, float>(const float* a, const float* b, int64_t n) {
  vec::f32x8 s0 = vec::splat8(0.0f), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 += vec::load8(a + i) * vec::load8(b + i);
    s1 += vec::load8(a + i + 8) * vec::load8(b + i + 8);
  }
  float s = vec::hsum8(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T, typename A>
LMM_FAST_INLINE void gather_score_rows(const T* x, const T* weight, const T* bias, const int64_t* rows,
                                       int64_t width, int64_t dim, int64_t begin, int64_t end, T* out) {
  for (int64_t b = begin; b < end; ++b) {
    const T* xb = x + b * dim;
    for (int64_t j = 0; j < width; ++j) {
      const int64_t r = rows[b * width + j];
      if (r < 0) {
        out[b * width + j] = static_cast<T>(-std::numeric_limits<A>::infinity());
        continue;
      }
      A v = dot<T, A>(xb, weight + r * dim, dim);
      if (bias != nullptr) v += static_cast<A>(bias[r]);
      out[b * width + j] = static_cast<T>(v);
    }
  }
}

// Non-template entry points so that each is compiled in several ISA versions.
#define LMM_FAST_DEFINE_PREDICT_ROWS(T, A, NAME)                                                         \
  LMM_FAST_MULTIVERSION void tree_rows_##NAME(const TreeArgs<T, A>& a, int64_t s, int64_t e, T* out) {   \
    tree_rows<T, A>(a, s, e, out);                                                                       \
  }                                                                                                      \
  LMM_FAST_MULTIVERSION void topk_rows_##NAME(const TreeArgs<T, A>& a, int64_t s, int64_t e, int64_t k,  \
                                              T* values, int64_t* indices) {                             \
    topk_rows<T, A>(a, s, e, k, values, indices);                                                        \
  }                                                                                                      \
  LMM_FAST_MULTIVERSION void upper_rows_##NAME(const T* x, int64_t stride, const A* theta,               \
                                               const LossGeometry& g, int64_t s, int64_t e, A* u) {      \
    upper_rows<T, A>(x, stride, theta, g, s, e, u);                                                      \
  }                                                                                                      \
  LMM_FAST_MULTIVERSION void add_bottom_rows_##NAME(const T* x, int64_t stride, const A* theta,          \
                                                    const LossGeometry& g, int64_t s, int64_t e,         \
                                                    const A* mixed, T* out) {                            \
    add_bottom_rows<T, A>(x, stride, theta, g, s, e, mixed, out);                                        \
  }                                                                                                      \
  LMM_FAST_MULTIVERSION void gather_score_rows_##NAME(const T* x, const T* w, const T* bias, const int64_t* rows, \
                                                      int64_t width, int64_t dim, int64_t s, int64_t e, T* out) {   \
    gather_score_rows<T, A>(x, w, bias, rows, width, dim, s, e, out);                                    \
  }                                                                                                      \
  void gather_score_rows_any(const T* x, const T* w, const T* bias, const int64_t* rows, int64_t width,   \
                             int64_t dim, int64_t s, int64_t e, T* out) {                                \
    gather_score_rows_##NAME(x, w, bias, rows, width, dim, s, e, out);                                   \
  }                                                                                                      \
  void tree_rows_any(const TreeArgs<T, A>& a, int64_t s, int64_t e, T* out) { tree_rows_##NAME(a, s, e, out); } \
  void topk_rows_any(const TreeArgs<T, A>& a, int64_t s, int64_t e, int64_t k, T* v, int64_t* i) {       \
    topk_rows_##NAME(a, s, e, k, v, i);                                                                  \
  }                                                                                                      \
  void upper_rows_any(const T* x, int64_t stride, const A* theta, const LossGeometry& g, int64_t s,      \
                      int64_t e, A* u) {                                                                 \
    upper_rows_##NAME(x, stride, theta, g, s, e, u);                                                     \
  }                                                                                                      \
  void add_bottom_rows_any(const T* x, int64_t stride, const A* theta, const LossGeometry& g, int64_t s, \
                           int64_t e, const A* mixed, T* out) {                                          \
    add_bottom_rows_##NAME(x, stride, theta, g, s, e, mixed, out);                                       \
  }

LMM_FAST_DEFINE_PREDICT_ROWS(float, float, f32)
LMM_FAST_DEFINE_PREDICT_ROWS(double, double, f64)
LMM_FAST_DEFINE_PREDICT_ROWS(c10::Half, float, f16)
LMM_FAST_DEFINE_PREDICT_ROWS(c10::BFloat16, float, bf16)

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// The folded form of a tree index (see TreeArgs), or false when some class
// differs from its leaf's other classes in an ancestor or a Psi value. Costs
// O(N (L-1)), once per call: worth it from a few rows on.
template <typename A>
bool fold_tree(const int32_t* index, const A* value, const LossGeometry& g, std::vector<int32_t>& ancestor,
               std::vector<A>& leaf_value) {
  const int64_t upper = g.num_levels() - 1;
  if (upper < 1) return false;
  const int64_t n = g.num_classes;
  const int64_t leaves = g.sizes[upper - 1];
  const int32_t* leaf = index + (upper - 1) * n;
  ancestor.assign(static_cast<size_t>(upper * leaves), -1);
  leaf_value.assign(static_cast<size_t>(upper * leaves), A(0));
  for (int64_t y = 0; y < n; ++y) {
    const int64_t t = leaf[y];
    for (int64_t l = 0; l < upper; ++l) {
      int32_t& anc = ancestor[l * leaves + t];
      A& w = leaf_value[l * leaves + t];
      if (anc < 0) {
        anc = index[l * n + y];
        w = value[l * n + y];
      } else if (anc != index[l * n + y] || w != value[l * n + y]) {
        return false;
      }
    }
  }
  // A leaf no class maps to is never gathered; give it a valid ancestor.
  for (auto& anc : ancestor) anc = anc < 0 ? 0 : anc;
  return true;
}

constexpr int64_t kFoldMinRows = 8;

at::Tensor lmm_predict_proba_tree_cpu(const at::Tensor& logits_in, const at::Tensor& group_index_in,
                                      const at::Tensor& group_value_in, const at::Tensor& theta_in,
                                      c10::IntArrayRef level_sizes) {
  const LossGeometry g = check_predict_inputs(logits_in, theta_in, level_sizes);
  check_tree_index(group_index_in, group_value_in, g, logits_in);
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor group_index = group_index_in.contiguous();
  const at::Tensor group_value = group_value_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  check_group_index_values_host(group_index, g);
  at::Tensor out = at::empty({g.batch, g.num_classes}, logits.options());
  if (g.batch == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_predict_proba_tree_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TreeArgs<scalar_t, A> args{logits.data_ptr<scalar_t>(), logits.stride(0), theta.data_ptr<A>(),
                               group_index.data_ptr<int32_t>(), group_value.data_ptr<A>(), &g};
    std::vector<int32_t> ancestor;
    std::vector<A> leaf_value;
    if (g.batch >= kFoldMinRows && fold_tree<A>(args.group_index, args.group_value, g, ancestor, leaf_value)) {
      args.leaf_ancestor = ancestor.data();
      args.leaf_value = leaf_value.data();
    }
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.batch, grain_rows(g.width), [&](int64_t begin, int64_t end) {
      tree_rows_any(args, begin, end, out_p);
    });
  });
  return out;
}

at::Tensor lmm_predict_proba_dense_cpu(const at::Tensor& logits_in, const at::Tensor& psi_t_in,
                                       const at::Tensor& theta_in, c10::IntArrayRef level_sizes) {
  const LossGeometry g = check_predict_inputs(logits_in, theta_in, level_sizes);
  check_dense_psi(psi_t_in, g, logits_in);
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor theta = theta_in.contiguous();
  const auto acc = accumulate_type(logits.scalar_type());
  if (g.batch == 0) return at::empty({0, g.num_classes}, logits.options());
  at::Tensor mixed, out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_predict_proba_dense_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const A* theta_p = theta.data_ptr<A>();
    if (g.upper_width > 0) {
      at::Tensor u = at::empty({g.batch, g.upper_width}, logits.options().dtype(acc));
      A* u_p = u.data_ptr<A>();
      at::parallel_for(0, g.batch, grain_rows(g.upper_width), [&](int64_t begin, int64_t end) {
        upper_rows_any(x, stride, theta_p, g, begin, end, u_p);
      });
      // One GEMM for all upper levels: [B, sum N_l] x [sum N_l, N].
      mixed = at::mm(u, psi_t_in.t());
    } else {
      mixed = at::zeros({g.batch, g.num_classes}, logits.options().dtype(acc));
    }
    // Float and double results are finished in the GEMM's output.
    out = std::is_same_v<scalar_t, A> ? mixed : at::empty({g.batch, g.num_classes}, logits.options());
    const A* mixed_p = mixed.data_ptr<A>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.batch, grain_rows(g.num_classes), [&](int64_t begin, int64_t end) {
      add_bottom_rows_any(x, stride, theta_p, g, begin, end, mixed_p, out_p);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lmm_topk_tree_cpu(const at::Tensor& logits_in, const at::Tensor& group_index_in,
                                                     const at::Tensor& group_value_in, const at::Tensor& theta_in,
                                                     c10::IntArrayRef level_sizes, int64_t k) {
  const LossGeometry g = check_predict_inputs(logits_in, theta_in, level_sizes);
  check_tree_index(group_index_in, group_value_in, g, logits_in);
  check_k(k, g);
  const at::Tensor logits = rows_contiguous(logits_in);
  const at::Tensor group_index = group_index_in.contiguous();
  const at::Tensor group_value = group_value_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  check_group_index_values_host(group_index, g);
  at::Tensor values = at::empty({g.batch, k}, logits.options());
  at::Tensor indices = at::empty({g.batch, k}, logits.options().dtype(at::kLong));
  if (g.batch == 0 || k == 0) return {values, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmm_topk_tree_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TreeArgs<scalar_t, A> args{logits.data_ptr<scalar_t>(), logits.stride(0), theta.data_ptr<A>(),
                               group_index.data_ptr<int32_t>(), group_value.data_ptr<A>(), &g};
    std::vector<int32_t> ancestor;
    std::vector<A> leaf_value;
    if (g.batch >= kFoldMinRows && fold_tree<A>(args.group_index, args.group_value, g, ancestor, leaf_value)) {
      args.leaf_ancestor = ancestor.data();
      args.leaf_value = leaf_value.data();
    }
    scalar_t* values_p = values.data_ptr<scalar_t>();
    int64_t* indices_p = indices.data_ptr<int64_t>();
    at::parallel_for(0, g.batch, grain_rows(g.width), [&](int64_t begin, int64_t end) {
      topk_rows_any(args, begin, end, k, values_p, indices_p);
    });
  });
  return {values, indices};
}

at::Tensor lmm_gather_scores_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                 const std::optional<at::Tensor>& bias_in, const at::Tensor& rows_in) {
  check_gather_scores_inputs(x_in, weight_in, bias_in, rows_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t batch = x.size(0), dim = x.size(1), width = rows.size(1);
  at::Tensor out = at::empty({batch, width}, x.options());
  if (out.numel() == 0) return out;
  check_gather_rows_values(rows, weight.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lmm_gather_scores_cpu", [&] {
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    const scalar_t* w_p = weight.data_ptr<scalar_t>();
    const scalar_t* b_p = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const int64_t* r_p = rows.data_ptr<int64_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_rows(width * dim), [&](int64_t begin, int64_t end) {
      gather_score_rows_any(x_p, w_p, b_p, r_p, width, dim, begin, end, out_p);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmm_fast, CPU, m) {
  m.impl("lmm_gather_scores", &lmm_gather_scores_cpu);
  m.impl("lmm_predict_proba_tree", &lmm_predict_proba_tree_cpu);
  m.impl("lmm_predict_proba_dense", &lmm_predict_proba_dense_cpu);
  m.impl("lmm_topk_tree", &lmm_topk_tree_cpu);
}

}  // namespace lmm_fast
