// The owner update of the non-overlapping Psi (gibbs::update_owners_host) as a
// parallel algorithm: a fixed sequence of phases, each a function of one index
// (one move, one class, one group, one bitmap word, one Psi entry) that does
// the work of one device thread. The CUDA op launches every phase as a
// grid-stride kernel (csrc/cuda/gibbs_owners_launch.h); the tests run the
// same kernels and launches on the emulated device (csrc/emulation), so the
// device algorithm is tested wherever the tests run.
//
// Results (psi_t, psi_scale, owner, numerator, kept, nonzero) are bit-identical
// to the sequential algorithm because no result depends on the order in which
// the threads of a phase run:
//   * every value is the same float64 expression as there (dadd_rn, ddiv_rn);
//   * threads combine only through integer atomics (counts, flags, bitmap
//     words: all moves of one (group, class) compute the same bit) and maxima
//     and minima (max of doubles, min of group indices), which commute;
//   * the argmax of a class over its candidates is the largest value, then the
//     lowest group among those holding it: two passes (max of the value, then
//     min of the group), a third raises the bound with the losers;
//   * a normaliser is summed by one thread, sequentially, over its group's
//     classes in increasing class order (a stable sort of the classes by
//     owner), exactly the sequential fold of the host code;
//   * lists built with atomic slots (the groups whose n_t fell, the groups
//     that start or stop owning classes) are only ever used as sets.
// Only the bound may differ from the host code's (it is an upper bound of
// the runner-up whose tightness depends on the candidates compared; it only
// decides which classes are rescanned).
//
// Incremental update (the moves classes[i]: old_groups[i] -> new_groups[i]):
//   check     per max(M, N): out-of-range classes, groups and owners
//             (first offending index by atomic max), whether any entry moves;
//             the host reads the 4 numbers once and refuses before any write
//   moves     per move: changed groups, delta n_t, touched classes, bitmap
//             bits of (old, class) and (new, class) from the current counts
//   groups    per group: list D of changed groups whose n_t fell, `fewest`
//             of D and of all groups (min of a packed (total, group) key)
//   classes   per class: the owner test of the host code; a class whose
//             owner's value fell below its bound is rescanned over all groups
//             (done), else it starts from its owner and `fewest`
//   challenge 3 passes over the candidates (both groups of every move of the
//             class, the classes with images in the bitmap words of D):
//             max value, min group at that value, bound raised by the losers
//   finish    per class (between passes 2 and 3): the winner, owner and
//             numerator, kept deltas, groups whose normaliser is affected
//   segments  stable sort of the classes by owner (host-side call); per
//             sorted position, the start and end of each group's segment
//   scale     per group: normaliser of an affected group summed in class
//             order; groups whose kept becomes or stops being zero listed
//   psi       the entries of the moves, of the switched classes (previous and
//             new owner) and whole columns of the listed groups
//   kept      per group: kept = new kept
// Full rebuild (full=True, or beta0 >= 2^40 as on the host): bitmap words per
// (word, group), fewest of all groups, per-class rescan (owner, numerator,
// bound, kept histogram by atomic add), segments, every normaliser, every
// Psi entry of the level.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "gibbs_common.h"

namespace lmm_fast {
namespace gibbs {
namespace owners {

// ------------------------------------------------------------ atomics
// The CUDA atomics on the device and on the emulated device of the tests;
// plain operations in host code. Only order-independent combinations are
// used.
LMM_FAST_HOST_DEVICE void atomic_add(int64_t* p, int64_t v) {
#if LMM_FAST_DEVICE_PATH
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  *p += v;
#endif
}
// Returns the value before the addition (a slot in a list).
LMM_FAST_HOST_DEVICE int64_t fetch_add(int64_t* p, int64_t v) {
#if LMM_FAST_DEVICE_PATH
  return static_cast<int64_t>(
      atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v)));
#else
  const int64_t old = *p;
  *p += v;
  return old;
#endif
}
LMM_FAST_HOST_DEVICE void atomic_max(int64_t* p, int64_t v) {
#if LMM_FAST_DEVICE_PATH
  atomicMax(reinterpret_cast<long long*>(p), static_cast<long long>(v));
#else
  if (*p < v) *p = v;
#endif
}
LMM_FAST_HOST_DEVICE void atomic_min(int64_t* p, int64_t v) {
#if LMM_FAST_DEVICE_PATH
  atomicMin(reinterpret_cast<long long*>(p), static_cast<long long>(v));
#else
  if (v < *p) *p = v;
#endif
}
LMM_FAST_HOST_DEVICE void atomic_max_u64(uint64_t* p, uint64_t v) {
#if LMM_FAST_DEVICE_PATH
  atomicMax(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  if (*p < v) *p = v;
#endif
}
LMM_FAST_HOST_DEVICE void atomic_or(uint64_t* p, uint64_t v) {
#if LMM_FAST_DEVICE_PATH
  atomicOr(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  *p |= v;
#endif
}
LMM_FAST_HOST_DEVICE void atomic_and(uint64_t* p, uint64_t v) {
#if LMM_FAST_DEVICE_PATH
  atomicAnd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  *p &= v;
#endif
}
// *p = max(*p, v) with std::max's semantics (a NaN in *p stays), by
// compare-and-swap on the double's bits on the device.
LMM_FAST_HOST_DEVICE void atomic_max(double* p, double v) {
#if LMM_FAST_DEVICE_PATH
  unsigned long long* a = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *a;
  while (__longlong_as_double(static_cast<long long>(old)) < v) {
    const unsigned long long assumed = old;
    old = atomicCAS(a, assumed, static_cast<unsigned long long>(__double_as_longlong(v)));
    if (old == assumed) break;
  }
#else
  if (*p < v) *p = v;
#endif
}

LMM_FAST_HOST_DEVICE double dmax(double a, double b) { return a < b ? b : a; }

// A group ordered by (total, index) as a key whose unsigned maximum, stored
// complemented, is the group with the fewest images, lowest index on ties
// (0: none).
LMM_FAST_HOST_DEVICE uint64_t fewest_key(int32_t total, int64_t t) {
  const uint64_t biased = static_cast<uint64_t>(static_cast<uint32_t>(total) ^ 0x80000000u);
  return ~((biased << 31) | static_cast<uint64_t>(t));
}
LMM_FAST_HOST_DEVICE int64_t fewest_group(uint64_t stored) {
  return stored == 0 ? -1 : static_cast<int64_t>((~stored) & 0x7fffffffu);
}

constexpr double kSparseLimit = 1099511627776.0;  // 2^40, as update_owners_host
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

// slots of Args::err and Args::counters
enum { kBadClass = 0, kBadGroup = 1, kBadOwner = 2, kAnyMove = 3 };
enum { kNumD = 0, kNumFlipped = 1, kFewest = 2, kFewestAll = 3 };

// Everything a phase reads or writes: the op's tensors and the scratch.
template <typename scalar_t>
struct Args {
  scalar_t* psi;
  scalar_t* scale;
  int64_t* owner;
  double* numerator;
  int64_t* kept;
  uint64_t* bits;
  double* bound;
  const int32_t* counts;
  const int32_t* totals;
  const float* beta;
  double beta0;
  int64_t n, width, offset, size, words;
  const int64_t* cls;
  const int64_t* olds;
  const int64_t* news;
  int64_t m;
  bool full;
  // scratch, zeroed: [4] each
  int64_t* err;
  int64_t* counters;
  // zeroed, [size] each
  int64_t* delta;       // change of n_t
  int64_t* in_changed;  // 1: a group of a move
  int64_t* affected;    // 1: normaliser (or n_t) may have changed
  int64_t* new_kept;
  int64_t* seg_start;   // the group's classes in `order`
  int64_t* seg_end;
  int64_t* d_list;      // [counters[kNumD]] groups of the moves whose n_t fell
  int64_t* flipped;     // [counters[kNumFlipped]] groups that start or stop owning
  // [n] each
  int64_t* touched;     // zeroed: 1 if the class moved
  int64_t* mode;        // 1: rescanned (its owner is final), 0: challenged
  int64_t* prev;        // owner before the update
  int64_t* c1_group;    // best of the owner and `fewest`
  int64_t* win;         // min group holding the best value
  double* c1_value;
  double* best_value;   // max value over the candidates
  const int64_t* order;         // classes stably sorted by owner
  const int64_t* sorted_owner;  // their owners

  LMM_FAST_HOST_DEVICE int32_t count(int64_t y, int64_t t) const { return counts[y * width + offset + t]; }
  LMM_FAST_HOST_DEVICE double den(int64_t t) const {
    return dadd_rn(static_cast<double>(totals[offset + t]), beta0);
  }
  LMM_FAST_HOST_DEVICE double value(int64_t y, int64_t t) const {
    return ddiv_rn(psi_numerator(count(y, t), beta[y]), den(t));
  }
  LMM_FAST_HOST_DEVICE bool has_images(int64_t t, int64_t y) const {
    return (bits[t * words + (y >> 6)] >> (y & 63)) & 1u;
  }
  LMM_FAST_HOST_DEVICE void entry(int64_t y, int64_t t) const {
    psi[y * width + offset + t] = (owner[y] == t || new_kept[t] == 0)
                                      ? static_cast<scalar_t>(psi_numerator(count(y, t), beta[y]))
                                      : scalar_t(0);
  }
  // argmax of class y over all groups, first maximum (update_owners_host's
  // rescan, same comparisons in the same order); second: the runner-up bound.
  LMM_FAST_HOST_DEVICE int64_t rescan(int64_t y, bool sparse, int64_t fewest_all, double& best,
                                      double& second) const {
    const int64_t first = sparse ? fewest_all : 0;
    int64_t arg = first;
    best = value(y, arg);
    second = sparse ? ddiv_rn(psi_numerator(0, beta[y]), den(fewest_all)) : -static_cast<double>(INFINITY);
    const int32_t* row = counts + y * width + offset;
    for (int64_t t = 0; t < size; ++t) {
      if ((sparse && row[t] == 0) || t == first) continue;
      const double v = ddiv_rn(psi_numerator(row[t], beta[y]), den(t));
      if (v > best || (v == best && t < arg)) {
        second = dmax(second, best);
        best = v;
        arg = t;
      } else {
        second = dmax(second, v);
      }
    }
    return arg;
  }
};

// ------------------------------------------------------------ phases
// Each: one index, the work of one thread; kName names its launches.

// per i in [0, max(m, n)): value checks (first offending index, as m - i or
// n - i so that the maximum is the first), and whether any entry moves.
template <typename scalar_t>
struct CheckPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<CheckPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t i) const {
    if (i < a.m) {
      const int64_t c = a.cls[i], o = a.olds[i], w = a.news[i];
      if (c < 0 || c >= a.n) atomic_max(a.err + kBadClass, a.m - i);
      if (o < 0 || o >= a.size || w < 0 || w >= a.size) atomic_max(a.err + kBadGroup, a.m - i);
      if (o != w) a.err[kAnyMove] = 1;
    }
    if (i < a.n) {
      const int64_t o = a.owner[i];
      if (o < 0 || o >= a.size) atomic_max(a.err + kBadOwner, a.n - i);
    }
  }
};

// per move: changed groups, delta n_t, touched classes, the two bitmap bits
template <typename scalar_t>
struct MovePhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<MovePhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t o = a.olds[i], w = a.news[i];
    if (o == w) return;
    const int64_t y = a.cls[i];
    a.in_changed[o] = 1;
    a.in_changed[w] = 1;
    atomic_add(a.delta + o, -1);
    atomic_add(a.delta + w, 1);
    a.touched[y] = 1;
    const uint64_t mask = uint64_t(1) << (y & 63);
    for (int k = 0; k < 2; ++k) {
      const int64_t t = k == 0 ? o : w;
      uint64_t* word = a.bits + t * a.words + (y >> 6);
      if (a.count(y, t) != 0) {
        atomic_or(word, mask);
      } else {
        atomic_and(word, ~mask);
      }
    }
  }
};

// per group: D (changed, n_t fell), fewest of D and of all groups, new kept
template <typename scalar_t>
struct GroupPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<GroupPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t t) const {
    uint64_t* counters = reinterpret_cast<uint64_t*>(a.counters);
    const uint64_t key = fewest_key(a.totals[a.offset + t], t);
    atomic_max_u64(counters + kFewestAll, key);
    a.new_kept[t] = a.kept[t];
    if (!a.in_changed[t]) return;
    a.affected[t] = 1;
    if (a.delta[t] < 0) {
      a.d_list[fetch_add(a.counters + kNumD, 1)] = t;
      atomic_max_u64(counters + kFewest, key);
    }
  }
};

// per class: the owner test of update_owners_host, then the rescan or the
// starting best (owner, then `fewest`)
template <typename scalar_t>
struct ClassPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<ClassPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t y) const {
    const int64_t fewest = fewest_group(static_cast<uint64_t>(a.counters[kFewest]));
    const int64_t o = a.owner[y];
    a.prev[y] = o;
    double own;
    if (a.in_changed[o]) {
      const double now = a.touched[y] ? psi_numerator(a.count(y, o), a.beta[y]) : a.numerator[y];
      own = ddiv_rn(now, a.den(o));
      const double before = ddiv_rn(
          a.numerator[y], dadd_rn(static_cast<double>(a.totals[a.offset + o] - a.delta[o]), a.beta0));
      if (own < before && !(own > a.bound[y])) {
        const int64_t fewest_all = fewest_group(static_cast<uint64_t>(a.counters[kFewestAll]));
        double best, second;
        const int64_t arg = a.rescan(y, true, fewest_all, best, second);
        a.bound[y] = second;
        a.mode[y] = 1;
        a.c1_group[y] = arg;
        a.c1_value[y] = best;
        a.best_value[y] = best;
        a.win[y] = arg;
        return;
      }
    } else {
      own = ddiv_rn(a.numerator[y], a.den(o));
    }
    double best = own;
    int64_t group = o;
    double bound = a.bound[y];
    if (fewest >= 0) {
      if (fewest != group) {
        const int32_t c = a.has_images(fewest, y) ? a.count(y, fewest) : 0;
        const double v = ddiv_rn(psi_numerator(c, a.beta[y]), a.den(fewest));
        if (v > best || (v == best && fewest < group)) {
          bound = dmax(bound, best);
          best = v;
          group = fewest;
        } else {
          bound = dmax(bound, v);
        }
      }
      // the groups of D where the class has no image lose to `fewest`
      bound = dmax(bound, ddiv_rn(psi_numerator(0, a.beta[y]), a.den(fewest)));
    }
    a.bound[y] = bound;
    a.mode[y] = 0;
    a.c1_group[y] = group;
    a.c1_value[y] = best;
    a.best_value[y] = best;
    a.win[y] = kNone;
  }
};

// per i in [0, m + |D| * words): move i's two groups, or the classes with
// images in one bitmap word of a group of D. Pass 1: max value; 2: min group
// at that value; 3: bound raised by every candidate but the winner.
template <typename scalar_t, int kPass>
struct ChallengePhase {
  Args<scalar_t> a;
  static constexpr const char* kName = kPass == 1   ? "owners_phase_kernel<ChallengePhase<1>>"
                                       : kPass == 2 ? "owners_phase_kernel<ChallengePhase<2>>"
                                                    : "owners_phase_kernel<ChallengePhase<3>>";
  LMM_FAST_HOST_DEVICE void challenge(int64_t y, int64_t t) const {
    if (a.mode[y] != 0) return;
    const double v = a.value(y, t);
    if (kPass == 1) {
      atomic_max(a.best_value + y, v);
    } else if (kPass == 2) {
      if (v == a.best_value[y]) atomic_min(a.win + y, t);
    } else {
      if (t != a.win[y]) atomic_max(a.bound + y, v);
    }
  }
  LMM_FAST_HOST_DEVICE void operator()(int64_t i) const {
    if (i < a.m) {
      const int64_t o = a.olds[i], w = a.news[i];
      if (o == w) return;
      challenge(a.cls[i], o);
      challenge(a.cls[i], w);
      return;
    }
    const int64_t j = (i - a.m) / a.words;
    const int64_t w = (i - a.m) - j * a.words;
    const int64_t t = a.d_list[j];
    uint64_t word = a.bits[t * a.words + w];
    // The bitmap is the caller's state: bits past the last class (padding of
    // the last word) must not become class indices.
    const int64_t valid = a.n - w * 64;
    if (valid < 64) word &= (uint64_t(1) << valid) - 1u;
    while (word) {
#if LMM_FAST_DEVICE_PATH
      const int64_t bit = __ffsll(static_cast<long long>(word)) - 1;
#else
      const int64_t bit = __builtin_ctzll(word);
#endif
      word &= word - 1;
      challenge(w * 64 + bit, t);
    }
  }
};

// per class, between passes 2 and 3: the winner; owner, numerator, kept
// deltas and affected groups as update_owners_host
template <typename scalar_t>
struct FinishPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<FinishPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t y) const {
    int64_t g = a.win[y];
    if (a.mode[y] == 0) {
      if (a.c1_value[y] == a.best_value[y] && a.c1_group[y] < g) g = a.c1_group[y];
      // No candidate holds the maximum only when a value is NaN (a NaN
      // numerator or beta in the caller's state): keep the starting best, a
      // valid group, rather than the kNone sentinel as an index.
      if (g == kNone) g = a.c1_group[y];
      if (a.c1_group[y] != g) a.bound[y] = dmax(a.bound[y], a.c1_value[y]);
      a.win[y] = g;
    }
    const int64_t o = a.prev[y];
    if (g != o) {
      a.owner[y] = g;
      a.numerator[y] = psi_numerator(a.count(y, g), a.beta[y]);
      atomic_add(a.new_kept + o, -1);
      atomic_add(a.new_kept + g, 1);
      a.affected[o] = 1;
      a.affected[g] = 1;
    } else if (a.touched[y]) {
      a.numerator[y] = psi_numerator(a.count(y, g), a.beta[y]);
    }
    if (a.touched[y]) a.affected[g] = 1;
  }
};

// per position k of the classes sorted by owner: segment bounds
template <typename scalar_t>
struct SegmentPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<SegmentPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t k) const {
    const int64_t g = a.sorted_owner[k];
    if (g < 0 || g >= a.size) return;
    if (k == 0 || a.sorted_owner[k - 1] != g) a.seg_start[g] = k;
    if (k == a.n - 1 || a.sorted_owner[k + 1] != g) a.seg_end[g] = k + 1;
  }
};

// per group: the normaliser, summed sequentially in class order, and the
// factor; lists the groups that start or stop owning classes
template <typename scalar_t>
struct ScalePhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<ScalePhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t t) const {
    if (a.full || a.affected[t]) {
      double normaliser = 0.0;
      for (int64_t k = a.seg_start[t]; k < a.seg_end[t]; ++k) {
        normaliser = dadd_rn(normaliser, a.numerator[a.order[k]]);
      }
      a.scale[a.offset + t] = static_cast<scalar_t>(
          a.new_kept[t] != 0 ? ddiv_rn(1.0, normaliser) : psi_group_scale(a.totals[a.offset + t], a.beta0));
    }
    if (!a.full && (a.kept[t] == 0) != (a.new_kept[t] == 0)) {
      a.flipped[fetch_add(a.counters + kNumFlipped, 1)] = t;
    }
  }
};

// per move: its two entries (repeated entries write the same value)
template <typename scalar_t>
struct MoveEntryPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<MoveEntryPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t o = a.olds[i], w = a.news[i];
    if (o == w) return;
    a.entry(a.cls[i], o);
    a.entry(a.cls[i], w);
  }
};

// per class that switched owner: previous and new owner's entries
template <typename scalar_t>
struct SwitchEntryPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<SwitchEntryPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t y) const {
    if (a.prev[y] == a.owner[y]) return;
    a.entry(y, a.prev[y]);
    a.entry(y, a.owner[y]);
  }
};

// per (flipped group j, class y): the whole column of the group
template <typename scalar_t>
struct ColumnEntryPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<ColumnEntryPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t j = i / a.n;
    a.entry(i - j * a.n, a.flipped[j]);
  }
};

// per group
template <typename scalar_t>
struct KeptPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<KeptPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t t) const { a.kept[t] = a.new_kept[t]; }
};

// full rebuild: per (word, group) the bitmap word from the counts; i = w *
// size + t, so that neighbouring threads read neighbouring counts
template <typename scalar_t>
struct RebuildBitsPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<RebuildBitsPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t w = i / a.size;
    const int64_t t = i - w * a.size;
    const int64_t first = w * 64;
    const int64_t last = first + 64 < a.n ? first + 64 : a.n;
    uint64_t word = 0;
    for (int64_t y = first; y < last; ++y) {
      if (a.count(y, t) != 0) word |= uint64_t(1) << (y - first);
    }
    a.bits[t * a.words + w] = word;
  }
};

// full rebuild: per group, fewest of all groups
template <typename scalar_t>
struct RebuildGroupPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<RebuildGroupPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t t) const {
    atomic_max_u64(reinterpret_cast<uint64_t*>(a.counters) + kFewestAll,
                   fewest_key(a.totals[a.offset + t], t));
  }
};

// full rebuild: per class, rescan; kept histogram
template <typename scalar_t>
struct RebuildClassPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<RebuildClassPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t y) const {
    const bool sparse = a.beta0 < kSparseLimit;
    const int64_t fewest_all = fewest_group(static_cast<uint64_t>(a.counters[kFewestAll]));
    double best, second;
    const int64_t arg = a.rescan(y, sparse, fewest_all, best, second);
    a.owner[y] = arg;
    a.numerator[y] = psi_numerator(a.count(y, arg), a.beta[y]);
    a.bound[y] = second;
    atomic_add(a.new_kept + arg, 1);
  }
};

// full rebuild: per (class, group), every entry of the level
template <typename scalar_t>
struct RebuildEntryPhase {
  Args<scalar_t> a;
  static constexpr const char* kName = "owners_phase_kernel<RebuildEntryPhase>";
  LMM_FAST_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t y = i / a.size;
    a.entry(y, i - y * a.size);
  }
};

// ------------------------------------------------------------ driver
// Runs the phases through `run`, which provides
//   run(phase, count)                       phase(i) for i in [0, count)
//   run(phase, base, dynamic, per, most)    i in [0, base + *dynamic * per),
//                                           *dynamic read where the phase runs
//                                           (device memory on CUDA); at most `most`
// and stream ordering between calls. Tensors checked with
// check_update_owners_inputs. One device-to-host copy of 4 numbers for the
// value checks of an incremental call; none for a rebuild.
template <typename scalar_t, typename Runner>
void run_phases(Runner& run, at::Tensor& psi_t, at::Tensor& psi_scale, at::Tensor& owner,
                at::Tensor& numerator, at::Tensor& kept, at::Tensor& nonzero, at::Tensor& bound,
                const at::Tensor& counts_t, const at::Tensor& group_totals, const at::Tensor& beta,
                double beta0, int64_t offset, int64_t size, const at::Tensor& classes,
                const at::Tensor& olds, const at::Tensor& news, bool full) {
  const int64_t n = psi_t.size(0);
  const int64_t words = (n + 63) / 64;
  const int64_t m = full ? 0 : classes.numel();
  // integer scratch, zeroed once: err, counters, 8 per group, 5 per class
  at::Tensor ints = at::zeros({8 + 8 * size + 5 * n}, owner.options());
  at::Tensor doubles = at::empty({2 * n}, numerator.options());
  Args<scalar_t> a;
  a.psi = psi_t.data_ptr<scalar_t>();
  a.scale = psi_scale.data_ptr<scalar_t>();
  a.owner = owner.data_ptr<int64_t>();
  a.numerator = numerator.data_ptr<double>();
  a.kept = kept.data_ptr<int64_t>();
  a.bits = reinterpret_cast<uint64_t*>(nonzero.data_ptr<int64_t>());
  a.bound = bound.data_ptr<double>();
  a.counts = counts_t.data_ptr<int32_t>();
  a.totals = group_totals.data_ptr<int32_t>();
  a.beta = beta.data_ptr<float>();
  a.beta0 = beta0;
  a.n = n;
  a.width = psi_t.size(1);
  a.offset = offset;
  a.size = size;
  a.words = words;
  a.cls = classes.data_ptr<int64_t>();
  a.olds = olds.data_ptr<int64_t>();
  a.news = news.data_ptr<int64_t>();
  a.m = m;
  a.full = full;
  int64_t* p = ints.data_ptr<int64_t>();
  a.err = p;
  a.counters = p + 4;
  p += 8;
  int64_t** per_group[] = {&a.delta, &a.in_changed, &a.affected, &a.new_kept,
                           &a.seg_start, &a.seg_end, &a.d_list, &a.flipped};
  for (int64_t** q : per_group) {
    *q = p;
    p += size;
  }
  int64_t** per_class[] = {&a.touched, &a.mode, &a.prev, &a.c1_group, &a.win};
  for (int64_t** q : per_class) {
    *q = p;
    p += n;
  }
  a.c1_value = doubles.data_ptr<double>();
  a.best_value = a.c1_value + n;
  a.order = nullptr;
  a.sorted_owner = nullptr;

  if (!full) {
    run(CheckPhase<scalar_t>{a}, std::max(m, n));
    const at::Tensor err = ints.narrow(0, 0, 4).to(at::kCPU);  // the one host sync
    const int64_t* e = err.data_ptr<int64_t>();
    if (e[kBadClass] != 0 || e[kBadGroup] != 0) {
      // the first offending entry, as the host code reports it
      const int64_t bad_class = e[kBadClass] != 0 ? m - e[kBadClass] : kNone;
      const int64_t bad_group = e[kBadGroup] != 0 ? m - e[kBadGroup] : kNone;
      if (bad_class <= bad_group) {
        TORCH_CHECK(false, "lmm_fast: classes[", bad_class, "] = ", classes[bad_class].item<int64_t>(),
                    " is out of range [0, ", n, ")");
      }
      TORCH_CHECK(false, "lmm_fast: old_groups[", bad_group, "] = ", olds[bad_group].item<int64_t>(),
                  " or new_groups[", bad_group, "] = ", news[bad_group].item<int64_t>(),
                  " is out of range [0, ", size, ")");
    }
    if (e[kAnyMove] == 0) return;  // no entry moves: nothing changed
    if (e[kBadOwner] != 0) {
      const int64_t y = n - e[kBadOwner];
      TORCH_CHECK(false, "lmm_fast: owner[", y, "] = ", owner[y].item<int64_t>(), " is out of range [0, ",
                  size, "): the state was never built (full=True)");
    }
  }
  // see update_owners_host: distinct totals must give distinct values
  const bool rebuild = full || beta0 >= kSparseLimit;
  if (rebuild) {
    a.full = true;
    run(RebuildBitsPhase<scalar_t>{a}, size * words);
    run(RebuildGroupPhase<scalar_t>{a}, size);
    run(RebuildClassPhase<scalar_t>{a}, n);
  } else {
    run(MovePhase<scalar_t>{a}, m);
    run(GroupPhase<scalar_t>{a}, size);
    run(ClassPhase<scalar_t>{a}, n);
    const int64_t* num_d = a.counters + kNumD;
    const int64_t most = m + size * words;
    run(ChallengePhase<scalar_t, 1>{a}, m, num_d, words, most);
    run(ChallengePhase<scalar_t, 2>{a}, m, num_d, words, most);
    run(FinishPhase<scalar_t>{a}, n);
    run(ChallengePhase<scalar_t, 3>{a}, m, num_d, words, most);
  }
  // classes in increasing order within each group (stable sort by owner)
  at::Tensor sorted_owner, order;
  std::tie(sorted_owner, order) = at::sort(owner, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  a.sorted_owner = sorted_owner.data_ptr<int64_t>();
  a.order = order.data_ptr<int64_t>();
  run(SegmentPhase<scalar_t>{a}, n);
  run(ScalePhase<scalar_t>{a}, size);
  if (rebuild) {
    run(RebuildEntryPhase<scalar_t>{a}, n * size);
  } else {
    run(MoveEntryPhase<scalar_t>{a}, m);
    run(SwitchEntryPhase<scalar_t>{a}, n);
    run(ColumnEntryPhase<scalar_t>{a}, 0, a.counters + kNumFlipped, n, size * n);
  }
  run(KeptPhase<scalar_t>{a}, size);
}

// The update on tensors checked with check_update_owners_inputs (by the op
// that calls it; the values are checked on the device in run_phases); `run`
// as in run_phases.
template <typename Runner>
void update_owners_parallel(Runner& run, at::Tensor& psi_t, at::Tensor& psi_scale, at::Tensor& owner,
                            at::Tensor& numerator, at::Tensor& kept, at::Tensor& nonzero,
                            at::Tensor& bound, const at::Tensor& counts_t,
                            const at::Tensor& group_totals, const at::Tensor& beta_in, double beta0,
                            int64_t offset, int64_t size, const at::Tensor& classes_in,
                            const at::Tensor& old_in, const at::Tensor& new_in, bool full) {
  if (!full && classes_in.numel() == 0) return;
  const at::Tensor beta = beta_in.contiguous();
  const at::Tensor classes = classes_in.contiguous();
  const at::Tensor olds = old_in.contiguous();
  const at::Tensor news = new_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(psi_t.scalar_type(), "gibbs_update_owners_parallel", [&] {
    run_phases<scalar_t>(run, psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t,
                         group_totals, beta, beta0, offset, size, classes, olds, news, full);
  });
}

}  // namespace owners
}  // namespace gibbs
}  // namespace lmm_fast
