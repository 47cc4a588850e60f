"""Visual hierarchies for the level-wise mixture model (paper Section IV, Eq. 3).

A :class:`Hierarchy` describes the upper levels of the tree over ``N`` object
classes: level ``l`` (top first) partitions the classes into ``N_l`` groups, and
the bottom level (the classes themselves) is implicit. It is built from

* deep features and labels (:meth:`Hierarchy.from_features`: class means, then
  clustering),
* class representations directly (:meth:`Hierarchy.from_class_means`, e.g. the
  rows of a trained classifier's weight matrix),
* a confusion matrix (:meth:`Hierarchy.from_confusion`: one upper level of
  ``N`` groups with a dense Ψ, the paper's one-level LMM),
* a user's own tree (:meth:`Hierarchy.from_assignments`).

Clustering methods (keyword ``method=``):

``"balanced"`` (default)
    Top-down recursive balanced k-means in torch, on the device of the input.
    Exactly ``N_l`` non-empty groups per level, nested, and every group of level
    ``l`` has between ``max(1, floor(N / (balance * N_l)))`` and
    ``ceil(balance * N / N_l)`` classes (``balance=2.0`` by default). Memory is
    O(N d); no N x N matrix is formed, so it scales to 10^5 classes and more.
``"ward"``, ``"average"``, ``"complete"``
    One agglomerative linkage (scipy) cut at several heights, so levels nest by
    construction. ``"average"``/``"complete"`` cluster the dissimilarity
    ``1 - S_ij`` of Eq. 3; ``"ward"`` needs Euclidean geometry and clusters the
    class representations directly. O(N^2) memory: limited to
    ``MAX_DENDROGRAM_CLASSES`` classes. Group sizes are whatever the dendrogram
    gives (often one giant group and many singletons).

The similarity of Eq. 3 is ``S_ij = exp(-d(x_i, x_j) / sigma)`` with ``d`` the
Euclidean distance (``metric="euclidean"``) or the cosine distance
``1 - cos(x_i, x_j)`` (``metric="cosine"``). ``sigma`` is chosen by
:func:`self_tuning_sigma`: the median, over classes, of the distance from a
class to its k-th nearest other class (k = 7), a single-scale version of
Zelnik-Manor & Perona's local scaling; see docs/hierarchy.md for why.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import operator
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "Hierarchy",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METHODS",
    "MAX_DENDROGRAM_CLASSES",
    "class_means",
    "self_tuning_sigma",
    "similarity_matrix",
    "balanced_partition",
    "plot_hierarchy",
]

FORMAT_NAME = "lmm_fast.hierarchy"
FORMAT_VERSION = 1
METHODS = ("balanced", "ward", "average", "complete")
METRICS = ("euclidean", "cosine")
# The condensed distance matrix alone is N^2/2 float64: 1.6 GB at 20 000 classes.
MAX_DENDROGRAM_CLASSES = 20_000

_DEFAULT_BALANCE = 2.0
_SIGMA_NEIGHBOR = 7
_SIGMA_MAX_QUERIES = 2048
# Query rows per distance block: bounds the [rows, N] block at ~128 MB.
_DISTANCE_BLOCK_ELEMS = 1 << 25
_REFINE_ITER = 8

ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences


# ---------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------


def _to_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got a numpy object array")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} could not be converted to a tensor: {exc}") from None
    raise TypeError(
        f"{name} must be a torch.Tensor, numpy array or sequence, got {type(value).__name__}"
    )


def _as_float_matrix(value: ArrayLike, name: str) -> torch.Tensor:
    """A finite real [rows, cols] tensor in float32 (float64 kept), same device."""
    x = _to_tensor(value, name)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}")
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_row = int((~finite).any(dim=1).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(x[bad_row]).any()) else "inf"
        raise ValueError(f"{name} contains {kind} values (first in row {bad_row})")
    return x


def _as_index_vector(value: ArrayLike, name: str) -> torch.Tensor:
    """A 1-D int64 tensor; floating or boolean input is rejected, not rounded."""
    x = _to_tensor(value, name)
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor/array, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x.to(torch.int64)


def _check_level_sizes(level_sizes: Any, num_classes: int, allow_full: bool = False) -> list[int]:
    if isinstance(level_sizes, (str, bytes)) or not isinstance(level_sizes, Iterable):
        raise TypeError(
            f"level_sizes must be a sequence of ints (top level first), got {level_sizes!r}"
        )
    sizes = []
    for i, size in enumerate(level_sizes):
        if isinstance(size, bool):
            raise TypeError(f"level_sizes[{i}] must be an int, got bool")
        try:
            sizes.append(operator.index(size))
        except TypeError:
            if isinstance(size, torch.Tensor) and size.numel() == 1 and not size.is_floating_point():
                sizes.append(int(size))
            else:
                raise TypeError(
                    f"level_sizes[{i}] must be an int, got {type(size).__name__} {size!r}"
                ) from None
    if not sizes:
        raise ValueError("level_sizes must name at least one upper level, got []")
    for i, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"level_sizes[{i}] = {size} must be >= 1")
        limit_ok = size <= num_classes if allow_full else size < num_classes
        if not limit_ok:
            bound = "<=" if allow_full else "<"
            raise ValueError(
                f"level_sizes[{i}] = {size} must be {bound} the number of classes "
                f"N = {num_classes} (the bottom level, the classes themselves, is implicit)"
            )
    for i in range(1, len(sizes)):
        if sizes[i] <= sizes[i - 1]:
            raise ValueError(
                f"level_sizes must be strictly increasing (top level first), got {sizes}"
            )
    return sizes


def _check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_class_names(class_names: Any, num_classes: int) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)):
        raise TypeError("class_names must be a sequence of strings, got a single string")
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} entries but there are {num_classes} classes"
        )
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class_names[{i}] must be a str, got {type(name).__name__}")
    return names


def _nesting_violation(coarse: torch.Tensor, fine: torch.Tensor, num_fine: int) -> str | None:
    """Describes the first fine group whose classes span several coarse groups."""
    lo = torch.full((num_fine,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    hi = torch.full((num_fine,), -1, dtype=torch.int64)
    lo = lo.scatter_reduce(0, fine, coarse, reduce="amin")
    hi = hi.scatter_reduce(0, fine, coarse, reduce="amax")
    bad = (lo != hi).nonzero()
    if bad.numel() == 0:
        return None
    group = int(bad[0, 0])
    members = (fine == group).nonzero().flatten()
    first = int(members[0])
    other = int(members[(coarse[members] != coarse[first]).nonzero()[0, 0]])
    return (
        f"group {group} contains classes {first} and {other}, which lie in different "
        f"groups ({int(coarse[first])} and {int(coarse[other])}) of the level above"
    )


def _check_assignment(groups: torch.Tensor, num_groups: int, name: str) -> None:
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        bad = int(((groups < 0) | (groups >= num_groups)).nonzero()[0, 0])
        raise ValueError(
            f"{name}[{bad}] = {int(groups[bad])} is out of range [0, {num_groups})"
        )
    counts = torch.bincount(groups, minlength=num_groups)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} leaves {int((counts == 0).sum())} of its {num_groups} groups empty "
            f"(e.g. groups {empty}); group ids must be 0..{num_groups - 1}, all used"
        )


# ---------------------------------------------------------------------------
# Class representations, sigma and similarity
# ---------------------------------------------------------------------------


def class_means(
    features: ArrayLike, labels: ArrayLike, num_classes: int | None = None
) -> torch.Tensor:
    """Mean feature of every class.

    Args:
        features: float [M, d], one deep feature per image (any device).
        labels: integer [M], the class of every image, in ``[0, num_classes)``.
        num_classes: N; default ``labels.max() + 1``. Every class needs at least
            one sample.

    Returns:
        float [N, d] on the features' device (float64 if the features are, else
        float32).
    """
    x = _as_float_matrix(features, "features")
    y = _as_index_vector(labels, "labels")
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels has {y.shape[0]} entries but features has {x.shape[0]} rows"
        )
    if y.numel() == 0:
        raise ValueError("features and labels are empty")
    y = y.to(x.device)
    lowest = int(y.min())
    if lowest < 0:
        raise ValueError(f"labels must be >= 0, found {lowest}")
    highest = int(y.max())
    if num_classes is None:
        num_classes = highest + 1
    else:
        num_classes = operator.index(num_classes)
        if highest >= num_classes:
            raise ValueError(f"labels must be < num_classes = {num_classes}, found {highest}")
    counts = torch.bincount(y, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten()
    if missing.numel():
        shown = missing[:10].tolist()
        raise ValueError(
            f"{missing.numel()} of {num_classes} classes have no samples in labels "
            f"(e.g. classes {shown}); every class needs at least one feature"
        )
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, y, x)
    return sums / counts.to(x.dtype).unsqueeze(1)


def _prepare_points(means: torch.Tensor, metric: str) -> torch.Tensor:
    """Rows in the geometry the metric lives in (unit sphere for cosine)."""
    if metric == "cosine":
        norms = means.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            row = int((norms.flatten() == 0).nonzero()[0, 0])
            raise ValueError(
                f"class representation {row} is all zeros: the cosine metric is undefined"
            )
        return means / norms
    return means


def _pairwise_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """[n, m] distances between rows of a and b (rows already prepared)."""
    if metric == "cosine":
        return (1.0 - a @ b.T).clamp_min_(0.0)
    sq = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1).unsqueeze(0)
    return sq.clamp_min_(0.0).sqrt_()


def self_tuning_sigma(
    means: ArrayLike,
    *,
    metric: str = "euclidean",
    k: int = _SIGMA_NEIGHBOR,
    max_queries: int = _SIGMA_MAX_QUERIES,
    seed: int = 0,
) -> float:
    """The σ of Eq. 3: median over classes of the distance to the k-th nearest class.

    With ``S = exp(-d / σ)`` this puts a class's k-th neighbour at similarity
    about ``1/e`` in a typical class, whatever the scale and dimension of the
    features. For more than ``max_queries`` classes the median is estimated on a
    random sample of classes (exact neighbours among all N), so the cost is
    O(max_queries · N · d) instead of O(N² d).

    Args:
        means: float [N, d] class representations.
        metric: ``"euclidean"`` or ``"cosine"``.
        k: neighbour rank (clipped to N - 1).
        max_queries: number of classes on which the median is estimated.
        seed: seed of that sample.

    Returns:
        σ > 0 as a Python float.
    """
    _check_choice(metric, "metric", METRICS)
    x = _prepare_points(_as_float_matrix(means, "means"), metric)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"means needs at least 2 classes to define a distance, got {n}")
    k = max(1, min(int(k), n - 1))
    if n > max_queries:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        queries = torch.randperm(n, generator=gen)[:max_queries].to(x.device)
    else:
        queries = torch.arange(n, device=x.device)
    block = max(1, _DISTANCE_BLOCK_ELEMS // n)
    kth = []
    for start in range(0, queries.numel(), block):
        rows = queries[start : start + block]
        dist = _pairwise_distance(x[rows], x, metric)
        # A class is not its own neighbour; mask it out rather than trusting d(x, x) = 0.
        dist[torch.arange(rows.numel(), device=x.device), rows] = float("inf")
        # topk with a small k is several times faster than kthvalue on CPU.
        kth.append(dist.topk(k, dim=1, largest=False).values[:, -1])
    kth_dist = torch.cat(kth).double()
    sigma = float(kth_dist.median())
    if not sigma > 0.0:
        # Many duplicated classes: fall back to the typical non-zero neighbour distance.
        positive = kth_dist[kth_dist > 0]
        sigma = float(positive.median()) if positive.numel() else 1.0
    return sigma


def similarity_matrix(
    means: ArrayLike, *, sigma: float | None = None, metric: str = "euclidean"
) -> torch.Tensor:
    """Eq. 3: ``S_ij = exp(-d(x_i, x_j) / σ)``, float [N, N] (O(N²) memory).

    Args:
        means: float [N, d] class representations.
        sigma: scale; default :func:`self_tuning_sigma`.
        metric: ``"euclidean"`` or ``"cosine"``.
    """
    _check_choice(metric, "metric", METRICS)
    x = _prepare_points(_as_float_matrix(means, "means"), metric)
    if sigma is None:
        sigma = self_tuning_sigma(x, metric=metric)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    s = _pairwise_distance(x, x, metric).div_(-sigma).exp_()
    s.fill_diagonal_(1.0)
    return s


# ---------------------------------------------------------------------------
# Balanced clustering
# ---------------------------------------------------------------------------


def _capacitated_assign(cost: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Assigns n points to b parts with lo <= part size <= hi, greedily on cost.

    Needs ``lo <= hi`` and ``sum(lo) <= n <= sum(hi)``. Points that would lose
    most by not getting their best open part (largest regret) are served first,
    in rounds: each round every unassigned point proposes to its best open
    part, every part keeps the proposers it has room for, and a part that turned
    someone away is full. At most b rounds. Then parts below ``lo`` take the
    points that are cheapest to move from parts above their own ``lo``.

    Args:
        cost: float [n, b]; only differences within a row matter.
        lo, hi: int64 [b].

    Returns:
        int64 [n] part of each point.
    """
    n, b = cost.shape
    device = cost.device
    labels = torch.full((n,), -1, dtype=torch.int64, device=device)
    counts = torch.zeros(b, dtype=torch.int64, device=device)
    is_open = torch.ones(b, dtype=torch.bool, device=device)
    pending = torch.arange(n, device=device)
    inf = torch.tensor(float("inf"), dtype=cost.dtype, device=device)
    while pending.numel():
        c = torch.where(is_open.unsqueeze(0), cost[pending], inf)
        if int(is_open.sum()) >= 2:
            best2, idx2 = c.topk(2, dim=1, largest=False)
            choice = idx2[:, 0]
            regret = best2[:, 1] - best2[:, 0]
        else:
            choice = c.argmin(dim=1)
            regret = torch.zeros(pending.numel(), dtype=cost.dtype, device=device)
        order = torch.argsort(regret, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        chosen = choice[order]
        proposals = torch.bincount(chosen, minlength=b)
        starts = torch.cumsum(proposals, 0) - proposals
        rank = torch.arange(chosen.numel(), device=device) - starts[chosen]
        accept = rank < (hi - counts)[chosen]
        labels[pending[order[accept]]] = chosen[accept]
        counts += torch.bincount(chosen[accept], minlength=b)
        is_open = counts < hi
        pending = pending[order[~accept]]

    deficit = (lo - counts).clamp_min(0)
    for part in deficit.nonzero().flatten().tolist():
        need = int(lo[part] - counts[part])
        if need <= 0:
            continue
        surplus = counts - lo
        movable = ((surplus[labels] > 0) & (labels != part)).nonzero().flatten()
        donor = labels[movable]
        delta = cost[movable, part] - cost[movable, donor]
        order = torch.argsort(delta, stable=True)
        order = order[torch.argsort(donor[order], stable=True)]
        donor_sorted = donor[order]
        offered = torch.bincount(donor_sorted, minlength=b)
        starts = torch.cumsum(offered, 0) - offered
        rank = torch.arange(donor_sorted.numel(), device=device) - starts[donor_sorted]
        eligible = order[rank < surplus[donor_sorted]]
        take = eligible[torch.argsort(delta[eligible], stable=True)[:need]]
        moved = movable[take]
        counts -= torch.bincount(labels[moved], minlength=b)
        counts[part] += moved.numel()
        labels[moved] = part
    return labels


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + log k candidates per centre): [k, d] centres."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    sq_norm = (x * x).sum(1)

    def sq_dist(centres: torch.Tensor) -> torch.Tensor:
        return (sq_norm.unsqueeze(1) - 2.0 * x @ centres.T + (centres * centres).sum(1)).clamp_min_(0)

    first = torch.randint(n, (1,), generator=gen, device=x.device)
    centres = [x[first]]
    closest = sq_dist(centres[0]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if not bool(total > 0):
            # Fewer distinct points than centres: any point will do.
            pick = torch.randint(n, (1,), generator=gen, device=x.device)
            centres.append(x[pick])
            continue
        candidates = torch.multinomial(closest, trials, replacement=True, generator=gen)
        candidate_dist = torch.minimum(closest.unsqueeze(1), sq_dist(x[candidates]))
        best = int(candidate_dist.sum(0).argmin())
        centres.append(x[candidates[best : best + 1]])
        closest = candidate_dist[:, best]
    return torch.cat(centres, 0)


def _lloyd(
    x: torch.Tensor,
    centres: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd iterations with size-constrained assignments: (labels, centres, inertia)."""
    n, b = x.shape[0], centres.shape[0]
    # Capacity constraints make a few boundary points flip back and forth for
    # many iterations without changing the partition materially: stop when
    # fewer than 0.1% of the points move.
    tolerance = n // 1000
    labels = None
    for _ in range(max_iter):
        # The ||x||^2 term is constant per row and so irrelevant to the assignment.
        cost = (centres * centres).sum(1).unsqueeze(0) - 2.0 * x @ centres.T
        new_labels = _capacitated_assign(cost, lo, hi)
        moved = n if labels is None else int((new_labels != labels).sum())
        labels = new_labels
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        sizes = torch.bincount(labels, minlength=b).clamp_min(1).to(x.dtype)
        centres = sums / sizes.unsqueeze(1)
        if moved <= tolerance:
            break
    inertia = float(((x - centres[labels]) ** 2).sum())
    return labels, centres, inertia


def _balanced_kmeans(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    gen: torch.Generator,
    n_init: int,
    max_iter: int,
    sample_size: int = 16384,
) -> torch.Tensor:
    """Size-constrained k-means into lo.numel() parts: int64 [n] labels.

    The n_init restarts (k-means++ seeding and Lloyd) run on at most
    ``sample_size`` random points, with the size bounds scaled down; the best
    centres by inertia are then refined on all points. On large nodes the
    seeding and the restarts would otherwise dominate the run time, and a
    sample of that size pins the centres of up to ``max_branching`` parts down
    well.
    """
    n = x.shape[0]
    sample = x
    lo_s, hi_s = lo, hi
    if n > sample_size:
        pick = torch.randperm(n, generator=gen, device=gen.device)[:sample_size].to(x.device)
        sample = x[pick]
        lo_s = torch.floor(lo.double() * (sample_size / n)).to(torch.int64)
        hi_s = torch.ceil(hi.double() * (sample_size / n)).to(torch.int64).clamp_max(sample_size)
    best_labels, best_centres, best_inertia = None, None, float("inf")
    for _ in range(n_init):
        labels, centres, inertia = _lloyd(sample, _kmeanspp(sample, lo.numel(), gen), lo_s, hi_s, max_iter)
        if inertia < best_inertia:
            best_labels, best_centres, best_inertia = labels, centres, inertia
    if sample is x:
        return best_labels
    # Centres fitted on the sample are close already: a few full passes settle
    # the assignment of the remaining points.
    return _lloyd(x, best_centres, lo, hi, min(max_iter, _REFINE_ITER))[0]


def _split(
    x: torch.Tensor,
    k: int,
    min_size: int,
    max_size: int,
    gen: torch.Generator,
    options: Mapping[str, int],
) -> torch.Tensor:
    """Partitions the rows of x into exactly k groups, sizes in [min_size, max_size].

    For k above ``max_branching`` the rows are first split into ``max_branching``
    parts, part i getting ``k_i`` of the k groups and between ``k_i * min_size``
    and ``k_i * max_size`` rows, so that the bound can still be met inside every
    part: the slack never compounds with depth.
    """
    n = x.shape[0]
    if k == 1:
        return torch.zeros(n, dtype=torch.int64, device=x.device)
    if k == n:
        return torch.arange(n, device=x.device)
    min_size = min(min_size, n // k)
    max_size = max(max_size, -(-n // k))
    b = min(k, options["max_branching"])
    per_part = torch.full((b,), k // b, dtype=torch.int64)
    per_part[: k % b] += 1
    lo = (per_part * min_size).to(x.device)
    hi = (per_part * max_size).clamp_max(n).to(x.device)
    labels = _balanced_kmeans(x, lo, hi, gen, options["n_init"], options["max_iter"])
    if b == k:
        return labels
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    offset = 0
    for part in range(b):
        members = (labels == part).nonzero().flatten()
        kp = int(per_part[part])
        out[members] = _split(x[members], kp, min_size, max_size, gen, options) + offset
        offset += kp
    return out


def _size_bounds(num_classes: int, num_groups: int, balance: float) -> tuple[int, int]:
    """[min, max] group size at a level with num_groups groups."""
    max_size = max(-(-num_classes // num_groups), math.ceil(balance * num_classes / num_groups - 1e-9))
    min_size = max(1, min(num_classes // num_groups, math.floor(num_classes / (balance * num_groups) + 1e-9)))
    return min_size, max_size


def _level_bands(
    num_classes: int, level_sizes: Sequence[int], balance: float
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per level, the documented size band and a tighter one to cluster with.

    A group of level l that holds more than ``max_j * floor(N_j / N_l)``
    classes needs more than its share of the groups of a deeper level j, and
    enough such groups make level j infeasible (e.g. N_l = 28, N_j = 29);
    likewise for the lower end. Clustering level l within the tighter band
    avoids that wherever the band is not empty.
    """
    final = [_size_bounds(num_classes, k, balance) for k in level_sizes]
    tight = []
    for level, k in enumerate(level_sizes):
        low, high = final[level]
        for deeper in range(level + 1, len(level_sizes)):
            k_deep = level_sizes[deeper]
            low_deep, high_deep = final[deeper]
            high = min(high, high_deep * (k_deep // k))
            low = max(low, low_deep * -(-k_deep // k))
        tight.append((min(low, num_classes // k), max(high, -(-num_classes // k))))
    return final, tight


def _allocate_children(sizes: np.ndarray, total: int, min_size: int, max_size: int) -> tuple[np.ndarray, bool]:
    """Splits ``total`` child groups among parents of the given sizes.

    Proportional to size, with each parent's children able to respect the size
    bounds. Returns the counts and whether the bounds could be respected.
    """
    sizes = sizes.astype(np.int64)
    lo = np.maximum(1, -(-sizes // max_size))
    hi = np.minimum(sizes, sizes // min_size)
    feasible = bool((lo <= hi).all() and lo.sum() <= total <= hi.sum())
    if not feasible:
        lo, hi = np.ones_like(sizes), sizes.copy()
    ideal = sizes * (total / sizes.sum())
    counts = np.clip(np.floor(ideal), lo, hi).astype(np.int64)
    while (diff := total - int(counts.sum())) != 0:
        if diff > 0:
            room = counts < hi
            score = np.where(room, ideal - counts, -np.inf)
            pick = np.argsort(-score, kind="stable")[: min(diff, int(room.sum()))]
            counts[pick] += 1
        else:
            room = counts > lo
            score = np.where(room, ideal - counts, np.inf)
            pick = np.argsort(score, kind="stable")[: min(-diff, int(room.sum()))]
            counts[pick] -= 1
    return counts, feasible


def balanced_partition(
    points: torch.Tensor,
    level_sizes: Sequence[int],
    *,
    balance: float = _DEFAULT_BALANCE,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 30,
    max_branching: int = 32,
    num_threads: int | None = 1,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Nested balanced partitions by top-down recursive balanced k-means.

    Level l+1 is made by splitting every group of level l into a number of
    children proportional to its size, each split a size-constrained k-means
    (recursive beyond ``max_branching`` children). Runs on the points' device;
    memory is O(N d).

    Args:
        points: float [N, d] (already in the metric's geometry).
        level_sizes: groups per level, top first, strictly increasing, < N.
        balance: every group of level l gets between
            ``max(1, floor(N / (balance * N_l)))`` and ``ceil(balance * N / N_l)``
            classes. Always met at the top level; met below it whenever the
            level above leaves room (a warning says when it does not).
        seed: seeds the k-means++ draws.
        n_init, max_iter: k-means restarts per split and Lloyd iterations.
        max_branching: largest number of centres in one k-means.
        num_threads: intra-op CPU threads for the clustering (restored
            afterwards); None keeps torch's setting. One thread is the fastest
            here: the work is many small ops (see :func:`_limited_threads`).
        progress: show a tqdm bar per level.

    Returns:
        list of int64 [N] group ids per level (on the points' device), ids in
        ``[0, N_l)``, every group non-empty, nested.
    """
    if not (isinstance(balance, (int, float)) and balance >= 1.0 and math.isfinite(balance)):
        raise ValueError(f"balance must be a finite number >= 1, got {balance!r}")
    for name, value, least in (("n_init", n_init, 1), ("max_iter", max_iter, 1), ("max_branching", max_branching, 2)):
        if operator.index(value) < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if num_threads is not None and operator.index(num_threads) < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    n = points.shape[0]
    level_sizes = _check_level_sizes(level_sizes, n)
    device = points.device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    options = {"n_init": int(n_init), "max_iter": int(max_iter), "max_branching": int(max_branching)}
    bar_cls = _tqdm_class()
    parent = torch.zeros(n, dtype=torch.int64, device=device)
    num_parents = 1
    levels = []
    final_bands, tight_bands = _level_bands(n, level_sizes, balance)
    for level, num_groups in enumerate(level_sizes, start=1):
        parent_sizes = torch.bincount(parent, minlength=num_parents).cpu().numpy()
        # The tighter band keeps the levels below feasible; the documented band
        # is the fallback, and only if both fail is the bound given up.
        for min_size, max_size in (tight_bands[level - 1], final_bands[level - 1]):
            children, feasible = _allocate_children(parent_sizes, num_groups, min_size, max_size)
            if feasible:
                break
        else:
            warnings.warn(
                f"level {level} ({num_groups} groups): the groups of the level above do not "
                f"allow sizes in [{min_size}, {max_size}]; children are allocated in "
                f"proportion to group size instead",
                RuntimeWarning,
                stacklevel=3,
            )
        groups = torch.empty(n, dtype=torch.int64, device=device)
        order = torch.argsort(parent, stable=True)
        bounds = np.concatenate([[0], np.cumsum(parent_sizes)])
        offsets = np.concatenate([[0], np.cumsum(children)])
        bar = bar_cls(
            total=num_parents,
            desc=f"level {level}/{len(level_sizes)} ({num_groups} groups)",
            disable=not progress,
            leave=False,
        )
        with _limited_threads(num_threads if device.type == "cpu" else None):
            for p in range(num_parents):
                members = order[bounds[p] : bounds[p + 1]]
                sub = _split(points[members], int(children[p]), min_size, max_size, gen, options)
                groups[members] = sub + int(offsets[p])
                bar.update(1)
        bar.close()
        levels.append(groups)
        parent, num_parents = groups, num_groups
    return levels


@contextlib.contextmanager
def _limited_threads(num_threads: int | None):
    """Runs the block with at most num_threads intra-op CPU threads, then restores.

    The balanced k-means is thousands of small ops (sorts, gathers, bincounts
    on a few thousand rows); their OpenMP fork/join costs more than the
    parallel work saves, and when other processes share the cores every
    parallel region waits for a descheduled thread. Measured on the 2-core
    machine of docs/hierarchy.md: 1 thread 3.4 s, 2 threads 16 s (N = 10 000).
    """
    threads = torch.get_num_threads()
    if num_threads is None or num_threads >= threads:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tqdm_class():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for library use; progress is then silent.
        class tqdm:  # type: ignore[no-redef]
            def __init__(self, *args, **kwargs):
                pass

            def update(self, *args):
                pass

            def close(self):
                pass

    return tqdm


# ---------------------------------------------------------------------------
# Dendrogram cuts
# ---------------------------------------------------------------------------


def _cut_linkage(linkage: np.ndarray, num_classes: int, level_sizes: Sequence[int]) -> list[np.ndarray]:
    """Partitions with exactly K groups for each K, from one scipy linkage.

    The partition with K groups is the state after the first N - K merges, so
    cutting one merge sequence at several points nests by construction. (Same
    result as ``scipy.cluster.hierarchy.cut_tree(Z, n_clusters=...)``, in
    O(N log N) rather than O(N^2).)
    """
    parent = np.arange(2 * num_classes - 1)

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    wanted = sorted(set(level_sizes), reverse=True)
    cuts: dict[int, np.ndarray] = {}
    merges_done = 0
    for k in wanted:
        while merges_done < num_classes - k:
            a, b = int(linkage[merges_done, 0]), int(linkage[merges_done, 1])
            new = num_classes + merges_done
            parent[find(a)] = new
            parent[find(b)] = new
            merges_done += 1
        roots = np.fromiter((find(i) for i in range(num_classes)), dtype=np.int64, count=num_classes)
        _, labels = np.unique(roots, return_inverse=True)
        cuts[k] = labels.astype(np.int64)
    return [cuts[k] for k in level_sizes]


def _dendrogram_partition(
    points: torch.Tensor, level_sizes: Sequence[int], method: str, metric: str, sigma: float
) -> list[torch.Tensor]:
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    n = points.shape[0]
    if n > MAX_DENDROGRAM_CLASSES:
        raise ValueError(
            f"method={method!r} needs an N x N distance matrix; N = {n} is above "
            f"{MAX_DENDROGRAM_CLASSES}: use method='balanced'"
        )
    x = points.detach().to("cpu", torch.float64).numpy()
    if method == "ward":
        # Ward's criterion is a variance decomposition: it is defined for Euclidean
        # geometry only (cosine: the rows are already on the unit sphere).
        z = linkage(x, method="ward")
    else:
        dist = pdist(x, metric="euclidean")
        if metric == "cosine":
            dist = np.clip(dist * dist / 2.0, 0.0, None)  # ||a-b||^2 / 2 = 1 - cos on the sphere
        z = linkage(1.0 - np.exp(-dist / sigma), method=method)
    return [torch.from_numpy(g).to(points.device) for g in _cut_linkage(z, n, level_sizes)]


def _canonical_ids(levels: Sequence[torch.Tensor], level_sizes: Sequence[int]) -> list[torch.Tensor]:
    """Renumbers nested groups: by parent, then by smallest member class.

    Makes the ids independent of the order in which the clustering found the
    groups, and makes the children of a group a contiguous id range.
    """
    n = levels[0].numel()
    device = levels[0].device
    arange = torch.arange(n, device=device)
    out = []
    parent_new = torch.zeros(n, dtype=torch.int64, device=device)
    for groups, k in zip(levels, level_sizes):
        first = torch.full((k,), n, dtype=torch.int64, device=device).scatter_reduce(
            0, groups, arange, reduce="amin"
        )
        parent_of_group = torch.zeros(k, dtype=torch.int64, device=device)
        parent_of_group[groups] = parent_new
        key = parent_of_group * n + first
        rank = torch.empty(k, dtype=torch.int64, device=device)
        rank[torch.argsort(key)] = torch.arange(k, device=device)
        parent_new = rank[groups]
        out.append(parent_new)
    return out


# ---------------------------------------------------------------------------
# The hierarchy
# ---------------------------------------------------------------------------


class Hierarchy:
    """The upper levels of a visual hierarchy over N classes.

    Build one with :meth:`from_features`, :meth:`from_class_means`,
    :meth:`from_confusion`, :meth:`from_assignments` or :meth:`load`.

    Levels are ordered top (coarsest) first; the bottom level (N singleton
    groups, Ψ = identity) is implicit. Three kinds exist:

    * a **tree** (``is_tree``): hard partitions that nest, initial Ψ rows
      ``1/C_t``;
    * **non-nested partitions** (``from_assignments(..., nested=False)``): hard
      partitions, Ψ as for a tree, but levels need not nest (``parents`` and
      ``is_tree`` are then unavailable/False);
    * **dense** (``from_confusion``): one upper level with a stored dense Ψ;
      ``assignments`` gives each class's argmax group.
    """

    def __init__(
        self,
        assignments: Sequence[torch.Tensor],
        level_sizes: Sequence[int],
        *,
        nested: bool = True,
        psi: Sequence[torch.Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        sigma: float | None = None,
        info: Mapping[str, Any] | None = None,
    ):
        """Low-level constructor for already validated parts; prefer the from_* builders."""
        self._assignments = [a.detach().to("cpu", torch.int64).contiguous() for a in assignments]
        self._level_sizes = [int(k) for k in level_sizes]
        self._nested = bool(nested)
        self._psi = None if psi is None else [p.detach().to("cpu", torch.float32).contiguous() for p in psi]
        self._class_names = None if class_names is None else list(class_names)
        self._sigma = None if sigma is None else float(sigma)
        self._info = dict(info or {})

    # -- builders -----------------------------------------------------------

    @classmethod
    def from_features(
        cls,
        features: ArrayLike,
        labels: ArrayLike,
        level_sizes: Sequence[int],
        *,
        method: str = "balanced",
        metric: str = "euclidean",
        num_classes: int | None = None,
        balance: float = _DEFAULT_BALANCE,
        sigma: float | None = None,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        progress: bool = False,
        **options: int,
    ) -> "Hierarchy":
        """Hierarchy from deep features: class means (Section IV), then clustering.

        Args:
            features: float [M, d] tensor or array (the work runs on its device).
            labels: integer [M] class of every row, in ``[0, N)``.
            level_sizes: groups per upper level, top first, strictly increasing,
                each in ``[1, N)``.
            method: ``"balanced"`` (default), ``"ward"``, ``"average"`` or
                ``"complete"`` (see the module docstring).
            metric: ``"euclidean"`` or ``"cosine"``.
            num_classes: N (default ``labels.max() + 1``); every class needs a
                sample.
            balance: size factor of the balanced method (>= 1).
            sigma: the σ of Eq. 3; default :func:`self_tuning_sigma`.
            seed: makes the result reproducible.
            class_names: optional N names, saved with the hierarchy.
            progress: tqdm progress bars.
            **options: ``n_init``, ``max_iter``, ``max_branching``,
                ``num_threads`` of :func:`balanced_partition`.
        """
        means = class_means(features, labels, num_classes)
        return cls.from_class_means(
            means,
            level_sizes,
            method=method,
            metric=metric,
            balance=balance,
            sigma=sigma,
            seed=seed,
            class_names=class_names,
            progress=progress,
            **options,
        )

    @classmethod
    def from_class_means(
        cls,
        means: ArrayLike,
        level_sizes: Sequence[int],
        *,
        method: str = "balanced",
        metric: str = "euclidean",
        balance: float = _DEFAULT_BALANCE,
        sigma: float | None = None,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        progress: bool = False,
        **options: int,
    ) -> "Hierarchy":
        """Hierarchy from one representation per class, float [N, d].

        The rows may be class means of deep features or the rows of a trained
        classifier's weight matrix (``metric="cosine"`` often suits those).
        Other arguments as in :meth:`from_features`.
        """
        _check_choice(method, "method", METHODS)
        _check_choice(metric, "metric", METRICS)
        x = _as_float_matrix(means, "means")
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"means needs at least 2 classes, got {n}")
        sizes = _check_level_sizes(level_sizes, n)
        names = _check_class_names(class_names, n)
        unknown = set(options) - {"n_init", "max_iter", "max_branching", "num_threads"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        if method != "balanced" and options:
            raise TypeError(f"{sorted(options)} apply to method='balanced' only")
        points = _prepare_points(x, metric)
        if sigma is None:
            sigma = self_tuning_sigma(points, metric=metric, seed=seed)
        elif not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if method == "balanced":
            levels = balanced_partition(
                points, sizes, balance=balance, seed=seed, progress=progress, **options
            )
        else:
            levels = _dendrogram_partition(points, sizes, method, metric, float(sigma))
        levels = _canonical_ids(levels, sizes)
        info: dict[str, Any] = {"source": "class_means", "method": method, "metric": metric, "seed": int(seed)}
        if method == "balanced":
            info["balance"] = float(balance)
        return cls(levels, sizes, class_names=names, sigma=float(sigma), info=info)

    @classmethod
    def from_confusion(
        cls, confusion: ArrayLike, *, class_names: Sequence[str] | None = None
    ) -> "Hierarchy":
        """One upper level of N groups with Ψ = the row-normalised confusion matrix.

        The paper's one-level LMM (ImageNet10K): group t stands for class t and
        ``Ψ[t, y] = confusion[t, y] / Σ_y' confusion[t, y']``. With the usual
        convention ``confusion[true, predicted]`` row t spreads class t's mass
        over the classes it is taken for; pass the transpose for the other
        reading. A row that sums to zero (a class never seen) becomes the
        identity row, Ψ[t, t] = 1.

        Args:
            confusion: non-negative finite [N, N] counts or rates.

        Returns:
            a hierarchy with ``is_tree == False``, ``level_sizes == [N]``;
            ``assignments[0][y] = argmax_t Ψ[t, y]`` (first maximum).
        """
        c = _as_float_matrix(confusion, "confusion").to("cpu", torch.float64)
        n = c.shape[0]
        if c.shape[1] != n:
            raise ValueError(f"confusion must be square [N, N], got shape {tuple(c.shape)}")
        if n < 2:
            raise ValueError(f"confusion needs at least 2 classes, got {n}")
        if bool((c < 0).any()):
            row, col = (c < 0).nonzero()[0].tolist()
            raise ValueError(f"confusion must be non-negative, found {float(c[row, col])} at [{row}, {col}]")
        names = _check_class_names(class_names, n)
        row_sum = c.sum(1, keepdim=True)
        empty_rows = row_sum.squeeze(1) == 0
        psi = torch.where(row_sum > 0, c / row_sum.clamp_min(torch.finfo(torch.float64).tiny), c)
        unseen = empty_rows.nonzero().flatten()
        psi[unseen, unseen] = 1.0
        psi = psi.to(torch.float32)
        return cls(
            [psi.argmax(dim=0)],
            [n],
            nested=True,
            psi=[psi],
            class_names=names,
            info={"source": "confusion"},
        )

    @classmethod
    def from_assignments(
        cls,
        assignments: Sequence[ArrayLike],
        *,
        nested: bool = True,
        relabel: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> "Hierarchy":
        """A user's own tree, e.g. a semantic taxonomy.

        Args:
            assignments: one integer [N] array per upper level, top first: the
                group id of every class. Ids must be ``0..N_l-1``, all used
                (or any integers with ``relabel=True``, renumbered in sorted
                order). The number of groups must strictly increase down the
                levels and stay below N.
            nested: by default every group must lie inside one group of the level
                above (a ValueError names the first offending group). Pass
                ``nested=False`` for levels that are independent partitions; Ψ
                is then still defined, but ``parents`` and tree distances
                across non-nested levels are not tree quantities.
            relabel: renumber arbitrary ids to ``0..N_l-1``.
            class_names: optional N names.
        """
        if isinstance(assignments, (torch.Tensor, np.ndarray)):
            raise TypeError(
                "assignments must be a list with one [N] array per upper level, "
                "got a single array (wrap it in a list)"
            )
        levels = [_as_index_vector(a, f"assignments[{i}]").cpu() for i, a in enumerate(assignments)]
        if not levels:
            raise ValueError("assignments must contain at least one upper level")
        n = levels[0].numel()
        for i, a in enumerate(levels):
            if a.numel() != n:
                raise ValueError(f"assignments[{i}] has {a.numel()} entries but assignments[0] has {n}")
        if n < 2:
            raise ValueError(f"a hierarchy needs at least 2 classes, got {n}")
        sizes = []
        for i, a in enumerate(levels):
            if relabel:
                _, levels[i] = torch.unique(a, return_inverse=True)
            elif int(a.min()) < 0:
                bad = int((a < 0).nonzero()[0, 0])
                raise ValueError(f"assignments[{i}][{bad}] = {int(a[bad])} is negative (or pass relabel=True)")
            k = int(levels[i].max()) + 1
            _check_assignment(levels[i], k, f"assignments[{i}]")
            sizes.append(k)
        sizes = _check_level_sizes(sizes, n)
        if nested:
            for i in range(1, len(levels)):
                problem = _nesting_violation(levels[i - 1], levels[i], sizes[i])
                if problem:
                    raise ValueError(
                        f"assignments[{i}] is not nested in assignments[{i - 1}]: {problem} "
                        f"(pass nested=False to allow non-nested levels)"
                    )
        names = _check_class_names(class_names, n)
        return cls(levels, sizes, nested=nested, class_names=names, info={"source": "assignments"})

    # -- basic properties ---------------------------------------------------

    @property
    def num_classes(self) -> int:
        """N, the number of classes (the bottom level)."""
        return self._assignments[0].numel()

    @property
    def level_sizes(self) -> list[int]:
        """[N_1, ..., N_{L-1}]: groups per upper level, top first."""
        return list(self._level_sizes)

    @property
    def num_levels(self) -> int:
        """L, the number of levels including the bottom one."""
        return len(self._level_sizes) + 1

    @property
    def assignments(self) -> list[torch.Tensor]:
        """Per upper level, int64 [N]: the group of every class (argmax group if dense)."""
        return [a.clone() for a in self._assignments]

    @property
    def is_tree(self) -> bool:
        """True for hard, nested partitions (every Ψ row uniform over its group)."""
        return self._psi is None and self._nested

    @property
    def is_nested(self) -> bool:
        """True if every group lies inside one group of the level above."""
        return self._nested

    @property
    def is_dense(self) -> bool:
        """True if Ψ is stored densely (``from_confusion``)."""
        return self._psi is not None

    @property
    def class_names(self) -> list[str] | None:
        return None if self._class_names is None else list(self._class_names)

    @property
    def sigma(self) -> float | None:
        """The σ of Eq. 3 used to build the hierarchy, or None if no clustering ran."""
        return self._sigma

    @property
    def info(self) -> dict[str, Any]:
        """How the hierarchy was built (source, method, metric, seed, balance ...)."""
        return dict(self._info)

    # -- derived quantities -------------------------------------------------

    def psi(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        sparse: bool = False,
    ) -> list[torch.Tensor]:
        """Initial group-object assignment matrices Ψ^l, one per upper level.

        ``Ψ^l[t, y] = 1/C_t`` if class y is in group t (C_t classes), else 0; the
        stored matrix for a dense (confusion) hierarchy. Every row sums to 1.

        Args:
            dtype, device: of the result.
            sparse: return coalesced sparse COO tensors (N nonzeros per level for
                a tree) instead of dense ones, for large N.

        Returns:
            list of [N_l, N] tensors.
        """
        out = []
        if self._psi is not None:
            for p in self._psi:
                p = p.to(device=device, dtype=dtype)
                out.append(p.to_sparse_coo().coalesce() if sparse else p)
            return out
        cols = torch.arange(self.num_classes)
        for groups, k in zip(self._assignments, self._level_sizes):
            sizes = torch.bincount(groups, minlength=k).to(torch.float64)
            values = (1.0 / sizes)[groups].to(dtype)
            if sparse:
                p = torch.sparse_coo_tensor(
                    torch.stack([groups, cols]), values, (k, self.num_classes), check_invariants=True
                )
                out.append(p.coalesce().to(device))
            else:
                p = torch.zeros(k, self.num_classes, dtype=dtype)
                p[groups, cols] = values
                out.append(p.to(device))
        return out

    def group_sizes(self) -> list[torch.Tensor]:
        """Per upper level, int64 [N_l]: classes per group (hard assignments)."""
        return [torch.bincount(a, minlength=k) for a, k in zip(self._assignments, self._level_sizes)]

    @property
    def parents(self) -> list[torch.Tensor]:
        """Parent of every node, one int64 tensor per level below the top.

        ``parents[j]`` has one entry per node of level j+2 (the last entry: per
        class, equal to ``assignments[-1]``) giving its group at level j+1
        (1-based levels, top = 1). E.g. ``level_sizes == [2, 4]``, N = 8:
        ``parents[0]`` is [4] with values in [0, 2), ``parents[1]`` is [8] with
        values in [0, 4). Only for nested hierarchies.
        """
        if not self._nested or self._psi is not None:
            raise ValueError("parents is only defined for a nested hierarchy (is_tree)")
        out = []
        for upper, lower, k in zip(self._assignments[:-1], self._assignments[1:], self._level_sizes[1:]):
            parent = torch.empty(k, dtype=torch.int64)
            parent[lower] = upper
            out.append(parent)
        out.append(self._assignments[-1].clone())
        return out

    def class_order(self) -> torch.Tensor:
        """int64 [N]: the classes sorted by their groups, top level first (tree order)."""
        key = torch.arange(self.num_classes)
        order = key.clone()
        # Stable sorts from the finest key to the coarsest give a lexicographic order.
        for groups in reversed(self._assignments):
            order = order[torch.argsort(groups[order], stable=True)]
        return order

    def lca_height(self, y1: ArrayLike, y2: ArrayLike) -> torch.Tensor:
        """Height of the lowest common ancestor of classes y1 and y2 (broadcast).

        0 if ``y1 == y2``; ``L - l`` if the deepest upper level at which they share
        a group is level l (1-based, top = 1); ``L`` (the root) if they share no
        group. This is the mistake severity of "Making Better Mistakes"
        (Bertinetto et al., 2020). Memory is O(size of the broadcast inputs x
        levels), so it suits large N. Dense hierarchies use their argmax groups.

        Args:
            y1, y2: integer tensors/arrays of class ids, broadcastable.

        Returns:
            int64 tensor of the broadcast shape, on y1's device.
        """
        a = _to_tensor(y1, "y1")
        b = _to_tensor(y2, "y2")
        for name, t in (("y1", a), ("y2", b)):
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
                raise ValueError(f"{name} has class ids outside [0, {self.num_classes})")
        device = a.device
        a, b = torch.broadcast_tensors(a.to(torch.int64), b.to(device, torch.int64))
        table = torch.stack(self._assignments).to(device)  # [L-1, N]
        deepest = torch.zeros(a.shape, dtype=torch.int64, device=device)
        for level in range(len(self._level_sizes)):
            same = table[level][a] == table[level][b]
            deepest = torch.where(same, torch.full_like(deepest, level + 1), deepest)
        height = self.num_levels - deepest
        return torch.where(a == b, torch.zeros_like(height), height)

    def tree_distance(self, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """[N, N] LCA heights between all pairs of classes (O(N²) memory).

        See :meth:`lca_height`; for large N call that on the pairs you need.
        """
        classes = torch.arange(self.num_classes, device=device)
        return self.lca_height(classes.unsqueeze(1), classes.unsqueeze(0)).to(dtype)

    def summary(self) -> str:
        """A few lines: kind, N, σ, and group sizes (min / median / max) per level."""
        kind = "tree" if self.is_tree else ("dense (confusion)" if self.is_dense else "non-nested partitions")
        sigma = "n/a" if self._sigma is None else f"{self._sigma:.6g}"
        lines = [f"Hierarchy: {kind}, N = {self.num_classes} classes, {len(self._level_sizes)} upper level(s), sigma = {sigma}"]
        for level, (sizes, k) in enumerate(zip(self.group_sizes(), self._level_sizes), start=1):
            s = sizes.to(torch.float64)
            lines.append(
                f"  level {level}: {k:>7} groups, sizes min {int(sizes.min())} / median "
                f"{float(s.median()):g} / max {int(sizes.max())} (N/N_l = {self.num_classes / k:.3g})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        kind = "tree" if self.is_tree else ("dense" if self.is_dense else "partitions")
        return f"Hierarchy(num_classes={self.num_classes}, level_sizes={self._level_sizes}, kind={kind!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hierarchy):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable contents, value equality

    # -- serialisation ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (the file format, see docs/hierarchy.md)."""
        data: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "level_sizes": list(self._level_sizes),
            "nested": self._nested,
            "assignments": [a.tolist() for a in self._assignments],
            "class_names": self.class_names,
            "sigma": self._sigma,
            "info": dict(self._info),
            "psi": None,
        }
        if self._psi is not None:
            entries = []
            for p in self._psi:
                idx = p.nonzero()
                # float32 -> Python float is exact, and so is the way back.
                entries.append(
                    {
                        "shape": list(p.shape),
                        "rows": idx[:, 0].tolist(),
                        "cols": idx[:, 1].tolist(),
                        "values": p[idx[:, 0], idx[:, 1]].double().tolist(),
                    }
                )
            data["psi"] = entries
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "hierarchy dict") -> "Hierarchy":
        """Rebuilds a hierarchy from :meth:`to_dict` output, validating everything.

        Raises:
            ValueError naming ``source`` and the problem (format, version, missing
            keys, wrong lengths, ids out of range, empty groups, not nested,
            invalid Ψ).
        """
        return _parse_hierarchy(data, source)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the hierarchy as JSON (gzip-compressed if the name ends in .gz).

        The file is written next to ``path`` first and then renamed, so a crash
        never leaves a truncated file behind.
        """
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(tmp, "wt", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, separators=(",", ":"), allow_nan=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Hierarchy":
        """Reads a file written by :meth:`save`, validating it (ValueError on any problem)."""
        path = os.fspath(path)
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"hierarchy file {path!r}: not valid JSON ({exc})") from None
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
            raise ValueError(f"hierarchy file {path!r}: unreadable ({exc})") from None
        return _parse_hierarchy(data, f"hierarchy file {path!r}")


# ---------------------------------------------------------------------------
# Validation of the serialised form
# ---------------------------------------------------------------------------

_REQUIRED_KEYS = ("format", "format_version", "num_classes", "level_sizes", "nested", "assignments")


def _parse_hierarchy(data: Any, source: str) -> Hierarchy:
    def fail(message: str) -> ValueError:
        return ValueError(f"{source}: {message}")

    if not isinstance(data, Mapping):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
        raise fail(f"'format' must be {FORMAT_NAME!r}, got {data.get('format')!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise fail(f"unsupported format_version {version!r} (this version reads {FORMAT_VERSION})")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise fail(f"missing keys {missing}")

    n = data["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise fail(f"num_classes must be an int >= 2, got {n!r}")
    nested = data["nested"]
    if not isinstance(nested, bool):
        raise fail(f"nested must be true or false, got {nested!r}")
    psi_data = data.get("psi")
    dense = psi_data is not None
    raw_sizes = data["level_sizes"]
    if not isinstance(raw_sizes, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in raw_sizes):
        raise fail(f"level_sizes must be a list of ints, got {raw_sizes!r}")
    try:
        sizes = _check_level_sizes(raw_sizes, n, allow_full=dense)
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from None

    raw_levels = data["assignments"]
    if not isinstance(raw_levels, list) or len(raw_levels) != len(sizes):
        got = len(raw_levels) if isinstance(raw_levels, list) else type(raw_levels).__name__
        raise fail(f"assignments must be a list of {len(sizes)} lists (one per level size), got {got}")
    levels = []
    for i, (raw, k) in enumerate(zip(raw_levels, sizes)):
        if not isinstance(raw, list) or len(raw) != n:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise fail(f"assignments[{i}] must be a list of num_classes = {n} ints, got {got}")
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in raw):
            raise fail(f"assignments[{i}] must contain only ints")
        groups = torch.tensor(raw, dtype=torch.int64)
        try:
            if dense:
                if int(groups.min()) < 0 or int(groups.max()) >= k:
                    _check_assignment(groups, k, f"assignments[{i}]")
            else:
                _check_assignment(groups, k, f"assignments[{i}]")
        except ValueError as exc:
            raise fail(str(exc)) from None
        levels.append(groups)

    psi = None
    if dense:
        psi = _parse_psi(psi_data, sizes, n, fail)
        for i, (p, groups) in enumerate(zip(psi, levels)):
            if not torch.equal(p.argmax(dim=0), groups):
                raise fail(f"assignments[{i}] is not the argmax group of every class under psi[{i}]")
    elif nested:
        for i in range(1, len(levels)):
            problem = _nesting_violation(levels[i - 1], levels[i], sizes[i])
            if problem:
                raise fail(f"nested is true but assignments[{i}] is not nested in assignments[{i - 1}]: {problem}")

    try:
        names = _check_class_names(data.get("class_names"), n)
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from None
    sigma = data.get("sigma")
    if sigma is not None and (
        not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0
    ):
        raise fail(f"sigma must be null or a finite number > 0, got {sigma!r}")
    info = data.get("info") or {}
    if not isinstance(info, Mapping):
        raise fail(f"info must be an object, got {type(info).__name__}")
    return Hierarchy(levels, sizes, nested=nested, psi=psi, class_names=names, sigma=sigma, info=info)


def _parse_psi(psi_data: Any, sizes: Sequence[int], n: int, fail) -> list[torch.Tensor]:
    if not isinstance(psi_data, list) or len(psi_data) != len(sizes):
        raise fail(f"psi must be null or a list of {len(sizes)} sparse matrices")
    out = []
    for i, (entry, k) in enumerate(zip(psi_data, sizes)):
        if not isinstance(entry, Mapping) or not all(key in entry for key in ("shape", "rows", "cols", "values")):
            raise fail(f"psi[{i}] must be an object with keys shape, rows, cols, values")
        if entry["shape"] != [k, n]:
            raise fail(f"psi[{i}] shape must be [{k}, {n}], got {entry['shape']!r}")
        rows, cols, values = entry["rows"], entry["cols"], entry["values"]
        if not all(isinstance(v, list) for v in (rows, cols, values)) or not len(rows) == len(cols) == len(values):
            raise fail(f"psi[{i}] rows, cols and values must be lists of equal length")
        try:
            r = torch.tensor(rows, dtype=torch.int64)
            c = torch.tensor(cols, dtype=torch.int64)
            v = torch.tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise fail(f"psi[{i}] has non-numeric entries ({exc})") from None
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= k or int(c.min()) < 0 or int(c.max()) >= n):
            raise fail(f"psi[{i}] has indices outside [0, {k}) x [0, {n})")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise fail(f"psi[{i}] values must be finite and non-negative")
        p = torch.zeros(k, n, dtype=torch.float32)
        p[r, c] = v.to(torch.float32)
        row_sums = p.double().sum(1)
        bad = ((row_sums - 1.0).abs() > 1e-4).nonzero().flatten()
        if bad.numel():
            t = int(bad[0])
            raise fail(f"psi[{i}] row {t} sums to {float(row_sums[t]):.6g}, not 1")
        out.append(p)
    return out


# ---------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------


def plot_hierarchy(
    hierarchy: Hierarchy,
    path: str | os.PathLike,
    means: ArrayLike | None = None,
    *,
    metric: str = "euclidean",
    max_classes: int = 1000,
) -> None:
    """Writes a PNG: group sizes per level, and S (Eq. 3) ordered by the tree.

    Args:
        hierarchy: the hierarchy to draw.
        path: output file (any matplotlib format, by extension).
        means: float [N, d] class representations; without them only the sizes
            panel is drawn.
        metric: of the similarity.
        max_classes: the similarity panel shows at most this many classes,
            taken evenly along the tree order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if means is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    ax = axes[0, 0]
    for level, sizes in enumerate(hierarchy.group_sizes(), start=1):
        ranked = sizes.sort(descending=True).values.numpy()
        ax.plot(np.arange(1, ranked.size + 1), ranked, marker="." if ranked.size < 200 else None,
                label=f"level {level}: {ranked.size} groups")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("group rank")
    ax.set_ylabel("classes in group")
    ax.set_title("group sizes per level")
    ax.legend(fontsize="small")
    if means is not None:
        x = _as_float_matrix(means, "means").cpu()
        if x.shape[0] != hierarchy.num_classes:
            raise ValueError(f"means has {x.shape[0]} rows, the hierarchy {hierarchy.num_classes} classes")
        order = hierarchy.class_order()
        step = max(1, math.ceil(order.numel() / max_classes))
        shown = order[::step]
        sim = similarity_matrix(x[shown], sigma=hierarchy.sigma, metric=metric).numpy()
        ax = axes[0, 1]
        image = ax.imshow(sim, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        top = hierarchy.assignments[0][shown].numpy()
        for edge in np.nonzero(np.diff(top))[0]:
            ax.axhline(edge + 0.5, color="white", linewidth=0.4)
            ax.axvline(edge + 0.5, color="white", linewidth=0.4)
        ax.set_title(f"S = exp(-d/sigma), tree order ({shown.numel()} of {order.numel()} classes)")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)
