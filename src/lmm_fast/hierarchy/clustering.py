"""Clustering of class representations into nested levels: top-down balanced
k-means (any N, O(N d) memory) and cuts of one agglomerative dendrogram
(scipy, O(N^2) memory)."""
from __future__ import annotations

import contextlib
import math
import operator
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from lmm_fast.hierarchy.checks import check_level_sizes



# The condensed distance matrix alone is N^2/2 float64: 1.6 GB at 20 000 classes.
MAX_DENDROGRAM_CLASSES = 20_000
DEFAULT_BALANCE = 2.0
_REFINE_ITER = 8


# ---------------------------------------------------------------------------
# Balanced clustering
# ---------------------------------------------------------------------------


def _capacitated_assign(cost: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Assigns n points to b parts with lo <= part size <= hi, greedily on cost.

    Needs ``lo <= hi`` and ``sum(lo) <= n <= sum(hi)``. Points that would lose
    most by not getting their best open part (largest regret) are served first,
    in rounds: each round every unassigned point proposes to its best open
    part, every part keeps the proposers it has room for, and a part that turned
    someone away is full. At most b rounds (non-finite costs count as the
    largest finite one, so this holds for any input). Then parts below ``lo`` take the
    points that are cheapest to move from parts above their own ``lo``.

    Args:
        cost: float [n, b]; only differences within a row matter.
        lo, hi: int64 [b].

    Returns:
        int64 [n] part of each point.
    """
    n, b = cost.shape
    device = cost.device
    if int(hi.sum()) < n or int(lo.sum()) > n or bool((lo > hi).any()):
        raise ValueError(
            f"part sizes cannot be met: {n} points, lower bounds {lo.tolist()}, upper bounds {hi.tolist()}"
        )
    # A non-finite cost (an overflow upstream) would tie an open part with a
    # closed one (+inf below), and a point could propose to a full part
    # forever. With every cost finite an open part is always preferred, so
    # each round either places every pending point or turns someone away
    # from a part that is then full: at most b rounds, for any input.
    big = torch.finfo(cost.dtype).max
    cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=-big)
    labels = torch.full((n,), -1, dtype=torch.int64, device=device)
    counts = torch.zeros(b, dtype=torch.int64, device=device)
    is_open = torch.ones(b, dtype=torch.bool, device=device)
    pending = torch.arange(n, device=device)
    inf = torch.tensor(float("inf"), dtype=cost.dtype, device=device)
    for _ in range(b):
        if not pending.numel():
            break
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
    if pending.numel():  # pragma: no cover - excluded by the argument above
        raise RuntimeError(f"capacitated assignment: {pending.numel()} points left after {b} rounds")

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
        # The first restart is kept whatever its inertia (it may be inf or NaN
        # for points near the float limit); a later one only when it is better.
        if best_labels is None or inertia < best_inertia:
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
    if not int(lo.sum()) <= total <= int(hi.sum()):
        raise ValueError(f"{total} child groups cannot be split among parents of sizes {sizes.tolist()}")
    # Each round moves |diff| closer to 0 by at least one (there is room on
    # the side it moves to, as lo.sum() <= total <= hi.sum()): at most
    # |diff| rounds.
    for _ in range(abs(total - int(counts.sum()))):
        diff = total - int(counts.sum())
        if diff == 0:
            break
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
    if int(counts.sum()) != total:  # pragma: no cover - excluded by the argument above
        raise RuntimeError(f"child allocation: {int(counts.sum())} groups instead of {total}")
    return counts, feasible


def balanced_partition(
    points: torch.Tensor,
    level_sizes: Sequence[int],
    *,
    balance: float = DEFAULT_BALANCE,
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
    level_sizes = check_level_sizes(level_sizes, n)
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

    import functools

    from lmm_fast._progress import bar_size

    return functools.partial(tqdm, **bar_size())  # bars also on a terminal that reports no size


# ---------------------------------------------------------------------------
# Dendrogram cuts
# ---------------------------------------------------------------------------


def cut_linkage(linkage: np.ndarray, num_classes: int, level_sizes: Sequence[int]) -> list[np.ndarray]:
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


def dendrogram_partition(
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
    return [torch.from_numpy(g).to(points.device) for g in cut_linkage(z, n, level_sizes)]


def canonical_ids(levels: Sequence[torch.Tensor], level_sizes: Sequence[int]) -> list[torch.Tensor]:
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
