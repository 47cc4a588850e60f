// CPU kernels of the collapsed Gibbs sampler of group labels (paper Eq. 4) and
// of the Psi-from-counts update (Eq. 6, factored as psi_t * psi_scale).
//
// Per image and upper level the sampler makes three passes over the level's
// N_l candidates, all but the first in L1: the largest logit; the weights and
// their maximum (vectorised: a polynomial exp, an int-to-float conversion and
// two products; the groups' 1 / (n_t + beta0) are formed once per call); the fixed-point values with their block sums and total.
// The inverse-CDF scan then walks the N_l / 32 block sums and one block. The
// next image's logits and counts rows are prefetched meanwhile.
// The arithmetic is the one in gibbs_common.h, so labels are bit-identical to
// the CUDA kernels' and to lmm_fast.reference_gibbs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// A fused multiply-add rounds once where the device and the reference round
// twice, which would change labels near a CDF boundary: keep every product
// and sum separately rounded in this file.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "gibbs_common.h"
#include "vec_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// An AVX2 clone and a baseline clone of each hot loop. No "fma" target: the
// weights must not be contracted (see above).
#define LMM_FAST_GIBBS_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define LMM_FAST_GIBBS_MULTIVERSION
#endif

namespace lmm_fast {
namespace {

using gibbs::Geometry;

constexpr int kLanes = 16;

// Largest logit, NaN ignored (-inf if there is none): the loss's row maximum
// (vec_math.h, vector extensions), in this file's AVX2 and baseline clones.
LMM_FAST_GIBBS_MULTIVERSION float max_logit_of(const float* x, int64_t n) {
  return vec::row_max<float, float>(x, n);
}

// Weights of candidates [begin, end) and their largest value (0 if none is
// positive). A weight is a positive finite float or 0, so a plain max works.
LMM_FAST_GIBBS_MULTIVERSION float level_weights(const float* x, int64_t begin, int64_t end,
                                                float max_logit, const int32_t* counts,
                                                const float* reciprocals, float beta_y,
                                                float* w) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = 0.0f;
  int64_t t = begin;
  for (; t + kLanes <= end; t += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = gibbs::candidate_weight(x[t + j], max_logit, counts[t + j],
                                              reciprocals[t + j], beta_y);
      w[t + j] = v;
      acc[j] = v > acc[j] ? v : acc[j];
    }
  }
  float m = 0.0f;
  for (; t < end; ++t) {
    w[t] = gibbs::candidate_weight(x[t], max_logit, counts[t], reciprocals[t], beta_y);
    m = w[t] > m ? w[t] : m;
  }
  for (int j = 0; j < kLanes; ++j) m = acc[j] > m ? acc[j] : m;
  return m;
}

// Candidates per block of the inverse-CDF scan: the quantisation pass keeps
// each block's sum, so the scan walks N_l / kBlock block sums and then one
// block instead of all N_l prefix sums (the same integers, so the same label).
constexpr int64_t kBlock = 32;

LMM_FAST_GIBBS_MULTIVERSION uint64_t quantize_all(const float* w, int64_t n, double scale,
                                                  uint64_t* q, uint64_t* block_sums) {
  uint64_t total = 0;
  int64_t t = 0;
  for (int64_t b = 0; t < n; ++b) {
    const int64_t end = t + kBlock < n ? t + kBlock : n;
    uint64_t sum = 0;
    for (; t < end; ++t) {
      q[t] = gibbs::quantize(w[t], scale);
      sum += q[t];
    }
    block_sums[b] = sum;
    total += sum;
  }
  return total;
}

// Asks for `bytes` from `p` on to be brought into the cache. An image's logits
// row and its class row of counts_t are read whole (4 passes each) but sit at
// unrelated addresses, so the hardware prefetcher only starts on them at the
// first miss; issuing the next image's lines while the current one is sampled
// hides that wait (in a training step the counts rows are cold: counts_t is
// N x sum(N_l) int32, 44 MB for levels (10, 100, 1000, 10 000)).
inline void prefetch_range(const void* p, size_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

struct Workspace {
  std::vector<float> x, w;
  std::vector<uint64_t> q, block_sums;
  explicit Workspace(int64_t n) : x(n), w(n), q(n), block_sums((n + kBlock - 1) / kBlock) {}
};

// One draw of the label of one image at one level. `counts`, `totals` and
// `reciprocals` point at the level's part of the image's class row of
// counts_t, of group_totals and of their group_reciprocal; `old` is the
// image's current label, which the weights exclude.
template <typename T>
int64_t sample_level(const T* logits, int64_t n, const int32_t* counts, const int32_t* totals,
                     const float* reciprocals,
                     float beta_y, float beta0, int64_t old, uint64_t random, Workspace& ws) {
  const float* x;
  if constexpr (std::is_same_v<T, float>) {
    x = logits;
  } else {
    for (int64_t t = 0; t < n; ++t) ws.x[t] = static_cast<float>(logits[t]);
    x = ws.x.data();
  }
  const float max_logit = max_logit_of(x, n);
  float* w = ws.w.data();
  // The image's own label is weighed without the image (counts - 1): the
  // candidates before and after it in two vectorised runs.
  float max_weight = level_weights(x, 0, old, max_logit, counts, reciprocals, beta_y, w);
  const float after = level_weights(x, old + 1, n, max_logit, counts, reciprocals, beta_y, w);
  w[old] = gibbs::candidate_weight(x[old], max_logit, counts[old] - 1,
                                   gibbs::group_reciprocal(totals[old] - 1, beta0), beta_y);
  max_weight = after > max_weight ? after : max_weight;
  max_weight = w[old] > max_weight ? w[old] : max_weight;
  if (!(max_weight > 0.0f)) return old;  // no finite logit: nothing to sample from
  uint64_t* q = ws.q.data();
  uint64_t* block_sums = ws.block_sums.data();
  const uint64_t total = quantize_all(w, n, gibbs::fixed_point_scale(max_weight), q, block_sums);
  const uint64_t target = gibbs::scale_draw(random, total);
  // First t whose inclusive prefix sum exceeds the target: find its block by
  // the block sums, then walk the block.
  uint64_t prefix = 0;
  int64_t block = 0;
  while (prefix + block_sums[block] <= target) prefix += block_sums[block++];
  const int64_t end = (block + 1) * kBlock < n ? (block + 1) * kBlock : n;
  for (int64_t t = block * kBlock; t < end; ++t) {
    prefix += q[t];
    if (prefix > target) return t;
  }
  return old;  // unreachable: prefix ends at total > target
}

template <typename T>
struct SampleArgs {
  const T* logits;
  int64_t row_stride;
  const int64_t* target;
  const int64_t* old_labels;
  const int64_t* image_ids;
  const float* beta;
  float beta0;
  uint64_t seed;
  uint64_t step;
  const Geometry* geo;
};

template <typename T>
int64_t sample_image_level(const SampleArgs<T>& a, const int32_t* counts_t,
                           const int32_t* totals, const float* reciprocals, int64_t b, int64_t l,
                           Workspace& ws) {
  const Geometry& g = *a.geo;
  const int64_t y = a.target[b];
  const int64_t offset = g.offsets[l];
  const uint64_t random = gibbs::label_draw(a.seed, a.step, static_cast<uint64_t>(a.image_ids[b]),
                                            static_cast<uint32_t>(l));
  return sample_level<T>(a.logits + b * a.row_stride + offset, g.sizes[l],
                         counts_t + y * g.upper_width + offset, totals + offset,
                         reciprocals + offset, a.beta[y],
                         a.beta0, a.old_labels[b * g.num_upper() + l], random, ws);
}

using Prepared = gibbs::PreparedSample;

// group_reciprocal of every upper-level group, formed once per call.
std::vector<float> group_reciprocals(const int32_t* totals, int64_t width, double beta0) {
  std::vector<float> r(width);
  for (int64_t t = 0; t < width; ++t) r[t] = gibbs::group_reciprocal(totals[t], static_cast<float>(beta0));
  return r;
}

// The CPU kernels also check the values (ranges, repeats) before sampling.
Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& old_labels,
                 const at::Tensor& counts_t, const at::Tensor& group_totals,
                 const at::Tensor& beta, double beta0, c10::IntArrayRef level_sizes,
                 const at::Tensor& image_ids) {
  Prepared p = gibbs::prepare_sample_inputs(logits, target, old_labels, counts_t, group_totals,
                                            beta, beta0, level_sizes, image_ids);
  gibbs::check_sample_values_host(p.geo, p.target, p.old_labels, p.image_ids);
  return p;
}

at::Tensor gibbs_sample_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                            const at::Tensor& old_labels_in, const at::Tensor& counts_t,
                            const at::Tensor& group_totals, const at::Tensor& beta_in,
                            double beta0, c10::IntArrayRef level_sizes, int64_t seed, int64_t step,
                            const at::Tensor& image_ids_in) {
  const Prepared p = prepare(logits_in, target_in, old_labels_in, counts_t, group_totals, beta_in,
                             beta0, level_sizes, image_ids_in);
  const Geometry& g = p.geo;
  at::Tensor out = at::empty({g.batch, g.num_upper()}, p.old_labels.options());
  if (g.batch == 0) return out;
  // A chunk is at least ~2^20 candidates (about 2 ms on one core): below that,
  // waking a second thread costs more than it saves, and on a busy machine
  // it can wait a whole scheduler time slice for a core.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(g.upper_width, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "gibbs_sample_cpu", [&] {
    const SampleArgs<scalar_t> args{p.logits.data_ptr<scalar_t>(), p.logits.stride(0),
                                    p.target.data_ptr<int64_t>(), p.old_labels.data_ptr<int64_t>(),
                                    p.image_ids.data_ptr<int64_t>(), p.beta.data_ptr<float>(),
                                    static_cast<float>(beta0), static_cast<uint64_t>(seed),
                                    static_cast<uint64_t>(step), &g};
    const int32_t* counts = counts_t.data_ptr<int32_t>();
    const int32_t* totals = group_totals.data_ptr<int32_t>();
    const std::vector<float> reciprocals = group_reciprocals(totals, g.upper_width, beta0);
    int64_t* labels = out.data_ptr<int64_t>();
    at::parallel_for(0, g.batch, grain, [&](int64_t begin, int64_t end) {
      Workspace ws(g.max_size());
      for (int64_t b = begin; b < end; ++b) {
        if (b + 1 < end) {
          prefetch_range(args.logits + (b + 1) * args.row_stride, g.upper_width * sizeof(scalar_t));
          prefetch_range(counts + args.target[b + 1] * g.upper_width, g.upper_width * sizeof(int32_t));
        }
        for (int64_t l = 0; l < g.num_upper(); ++l) {
          labels[b * g.num_upper() + l] =
              sample_image_level(args, counts, totals, reciprocals.data(), b, l, ws);
        }
      }
    });
  });
  return out;
}

at::Tensor gibbs_sample_exact_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                  const at::Tensor& old_labels_in, at::Tensor& counts_t,
                                  at::Tensor& group_totals, const at::Tensor& beta_in,
                                  double beta0, c10::IntArrayRef level_sizes, int64_t seed,
                                  int64_t step, const at::Tensor& image_ids_in) {
  const Prepared p = prepare(logits_in, target_in, old_labels_in, counts_t, group_totals, beta_in,
                             beta0, level_sizes, image_ids_in);
  const Geometry& g = p.geo;
  at::Tensor out = at::empty({g.batch, g.num_upper()}, p.old_labels.options());
  if (g.batch == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "gibbs_sample_exact_cpu", [&] {
    const SampleArgs<scalar_t> args{p.logits.data_ptr<scalar_t>(), p.logits.stride(0),
                                    p.target.data_ptr<int64_t>(), p.old_labels.data_ptr<int64_t>(),
                                    p.image_ids.data_ptr<int64_t>(), p.beta.data_ptr<float>(),
                                    static_cast<float>(beta0), static_cast<uint64_t>(seed),
                                    static_cast<uint64_t>(step), &g};
    int32_t* counts = counts_t.data_ptr<int32_t>();
    int32_t* totals = group_totals.data_ptr<int32_t>();
    std::vector<float> reciprocals = group_reciprocals(totals, g.upper_width, beta0);
    int64_t* labels = out.data_ptr<int64_t>();
    Workspace ws(g.max_size());
    // Sequential by definition: each image sees the counts its predecessors left.
    for (int64_t b = 0; b < g.batch; ++b) {
      const int64_t y = args.target[b];
      for (int64_t l = 0; l < g.num_upper(); ++l) {
        const int64_t old = args.old_labels[b * g.num_upper() + l];
        const int64_t label =
            sample_image_level(args, counts, totals, reciprocals.data(), b, l, ws);
        labels[b * g.num_upper() + l] = label;
        if (label != old) {
          int32_t* row = counts + y * g.upper_width + g.offsets[l];
          row[old] -= 1;
          row[label] += 1;
          totals[g.offsets[l] + old] -= 1;
          totals[g.offsets[l] + label] += 1;
          for (const int64_t t : {g.offsets[l] + old, g.offsets[l] + label}) {
            reciprocals[t] = gibbs::group_reciprocal(totals[t], args.beta0);
          }
        }
      }
    }
  });
  return out;
}

// One pass over the batch and a sort of a copy of its indices.
at::Tensor gibbs_check_batch_cpu(const at::Tensor& indices_in, const at::Tensor& target_in,
                                 const at::Tensor& train_targets_in) {
  gibbs::check_batch_inputs(indices_in, target_in, train_targets_in);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor train_targets = train_targets_in.contiguous();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t* y = target.data_ptr<int64_t>();
  const int64_t* train = train_targets.data_ptr<int64_t>();
  const int64_t batch = indices.numel();
  const int64_t images = train_targets.numel();
  int64_t bad_index = -1, repeated = -1, bad_target = -1;
  for (int64_t b = 0; b < batch; ++b) {
    if (idx[b] < 0 || idx[b] >= images) {
      if (bad_index < 0) bad_index = b;
    } else if (bad_target < 0 && train[idx[b]] != y[b]) {
      bad_target = b;
    }
  }
  std::vector<int64_t> sorted(idx, idx + batch);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t b = 1; b < batch && repeated < 0; ++b) {
    if (sorted[b] == sorted[b - 1]) repeated = sorted[b];
  }
  at::Tensor out = at::empty({3}, indices.options());
  int64_t* o = out.data_ptr<int64_t>();
  o[0] = bad_index;
  o[1] = repeated;
  o[2] = bad_target;
  return out;
}

// The batch's label changes applied to the counts and the labels; every value
// is checked before anything is written.
void gibbs_apply_moves_cpu(at::Tensor& counts_t, at::Tensor& group_totals, at::Tensor& labels,
                           const at::Tensor& target_in, const at::Tensor& image_ids_in,
                           const at::Tensor& old_in, const at::Tensor& new_in,
                           c10::IntArrayRef level_sizes) {
  const Geometry g = gibbs::check_apply_moves_inputs(counts_t, group_totals, labels, target_in,
                                                     image_ids_in, old_in, new_in, level_sizes);
  const at::Tensor target = target_in.contiguous();
  const at::Tensor ids = image_ids_in.contiguous();
  const at::Tensor olds = old_in.contiguous();
  const at::Tensor news = new_in.contiguous();
  const int64_t* y = target.data_ptr<int64_t>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* o = olds.data_ptr<int64_t>();
  const int64_t* w = news.data_ptr<int64_t>();
  const int64_t levels = g.num_upper();
  gibbs::check_moves_values_host(g, target, ids, olds, news, labels.size(0));
  int32_t* counts = counts_t.data_ptr<int32_t>();
  int32_t* totals = group_totals.data_ptr<int32_t>();
  int64_t* out = labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < g.batch; ++b) {
    int32_t* row = counts + y[b] * g.upper_width;
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t k = b * levels + l;
      const int64_t from = g.offsets[l] + o[k];
      const int64_t to = g.offsets[l] + w[k];
      row[from] -= 1;
      row[to] += 1;
      totals[from] -= 1;
      totals[to] += 1;
      out[id[b] * levels + l] = w[k];
    }
  }
}

// Whole columns (groups) of the factored Eq. 6: psi_t[:, c] = Omega[c, :] + beta,
// psi_scale[c] = 1 / (n_c + beta0). O(N) strided writes per column: used to
// build Psi and for the rare full-column changes of the constraint.
void gibbs_refresh_psi_cpu(at::Tensor& psi_t, at::Tensor& psi_scale, const at::Tensor& counts_t,
                           const at::Tensor& group_totals, const at::Tensor& beta_in,
                           double beta0, const at::Tensor& columns_in) {
  gibbs::check_refresh_inputs(psi_t, psi_scale, counts_t, group_totals, beta_in, beta0);
  gibbs::check_index_vector(psi_t, columns_in, "columns");
  const at::Tensor columns = columns_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const int64_t rows = psi_t.size(0);
  const int64_t width = psi_t.size(1);
  const int64_t ncols = columns.numel();
  if (ncols == 0) return;
  const int64_t* cols = columns.data_ptr<int64_t>();
  gibbs::check_index_values_host(columns, width, "columns");
  const int32_t* totals = group_totals.data_ptr<int32_t>();
  const int32_t* counts = counts_t.data_ptr<int32_t>();
  const float* b = beta.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / ncols);
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_refresh_psi_cpu", [&] {
    scalar_t* scale = psi_scale.data_ptr<scalar_t>();
    for (int64_t j = 0; j < ncols; ++j) {
      scale[cols[j]] = static_cast<scalar_t>(gibbs::psi_group_scale(totals[cols[j]], beta0));
    }
    scalar_t* psi = psi_t.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t y = begin; y < end; ++y) {
        const int32_t* count_row = counts + y * width;
        scalar_t* psi_row = psi + y * width;
        for (int64_t j = 0; j < ncols; ++j) {
          const int64_t c = cols[j];
          psi_row[c] = static_cast<scalar_t>(gibbs::psi_numerator(count_row[c], b[y]));
        }
      }
    });
  });
}

// Single entries of the factored Eq. 6: psi_t[rows[i], columns[i]] =
// Omega + beta and psi_scale[columns[i]] = 1 / (n + beta0). A step changes the
// counts only at the (class, group) pairs of its images' old and new groups,
// so this is all an unconstrained step writes: O(B (L-1)), no whole column.
// Repeated pairs write the same value.
void gibbs_refresh_psi_entries_cpu(at::Tensor& psi_t, at::Tensor& psi_scale,
                                   const at::Tensor& counts_t, const at::Tensor& group_totals,
                                   const at::Tensor& beta_in, double beta0,
                                   const at::Tensor& rows_in, const at::Tensor& columns_in) {
  gibbs::check_refresh_inputs(psi_t, psi_scale, counts_t, group_totals, beta_in, beta0);
  gibbs::check_index_vector(psi_t, rows_in, "rows");
  gibbs::check_index_vector(psi_t, columns_in, "columns");
  TORCH_CHECK(rows_in.numel() == columns_in.numel(), "lmm_fast: rows and columns must have the same "
              "length, got ", rows_in.numel(), " and ", columns_in.numel());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor columns = columns_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  const int64_t n = psi_t.size(0);
  const int64_t width = psi_t.size(1);
  const int64_t count = rows.numel();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = columns.data_ptr<int64_t>();
  // Validate everything before writing anything: a refused call changes nothing.
  gibbs::check_entry_values_host(rows, columns, n, width);
  const int32_t* totals = group_totals.data_ptr<int32_t>();
  const int32_t* counts = counts_t.data_ptr<int32_t>();
  const float* b = beta.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_refresh_psi_entries_cpu", [&] {
    scalar_t* psi = psi_t.data_ptr<scalar_t>();
    scalar_t* scale = psi_scale.data_ptr<scalar_t>();
    for (int64_t i = 0; i < count; ++i) {
      const int64_t at = r[i] * width + c[i];
      psi[at] = static_cast<scalar_t>(gibbs::psi_numerator(counts[at], b[r[i]]));
      scale[c[i]] = static_cast<scalar_t>(gibbs::psi_group_scale(totals[c[i]], beta0));
    }
  });
}

// Owner update of one level under the non-overlapping constraint: one pass
// over the classes and the moves, see gibbs::update_owners_host.
void gibbs_update_owners_cpu(at::Tensor& psi_t, at::Tensor& psi_scale, at::Tensor& owner,
                             at::Tensor& numerator, at::Tensor& kept, at::Tensor& nonzero,
                             at::Tensor& bound, const at::Tensor& counts_t, const at::Tensor& group_totals,
                             const at::Tensor& beta, double beta0, int64_t offset, int64_t size,
                             const at::Tensor& classes, const at::Tensor& old_groups,
                             const at::Tensor& new_groups, bool full) {
  gibbs::check_update_owners_inputs(psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t,
                                    group_totals, beta, beta0, offset, size, classes, old_groups,
                                    new_groups);
  gibbs::update_owners_on_host(psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t,
                               group_totals, beta, beta0, offset, size, classes, old_groups,
                               new_groups, full);
}

}  // namespace

TORCH_LIBRARY_IMPL(lmm_fast, CPU, m) {
  m.impl("gibbs_sample", &gibbs_sample_cpu);
  m.impl("gibbs_sample_exact", &gibbs_sample_exact_cpu);
  m.impl("gibbs_refresh_psi", &gibbs_refresh_psi_cpu);
  m.impl("gibbs_refresh_psi_entries", &gibbs_refresh_psi_entries_cpu);
  m.impl("gibbs_update_owners", &gibbs_update_owners_cpu);
  m.impl("gibbs_apply_moves", &gibbs_apply_moves_cpu);
  m.impl("gibbs_check_batch", &gibbs_check_batch_cpu);
}

}  // namespace lmm_fast
