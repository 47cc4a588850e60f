"""Conditional risk minimisation and what it rests on: the decision index of a
hierarchy (the class → node maps), input checks, node probabilities and the
expected tree distance of every class."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


MAX_NON_NESTED_LEVELS = 10
# Row blocks: passes over one block reuse its (cache-resident) temporaries.
# With several threads every op is a parallel region, and on a loaded machine
# each waits for its slowest thread, so fewer, larger blocks pay off there
# (measured, docs/decide.md).
_CHUNK_BYTES = 8 << 20
_CHUNK_BYTES_PARALLEL = 64 << 20


# ---------------------------------------------------------------------------
# The hierarchy as class -> cell -> group maps
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class DecisionIndex:
    """The maps the decision rules need, on one device.

    Attributes:
        num_classes: N.
        level_sizes: groups per upper level, top first.
        nested: every group lies inside one group of the level above (checked
            on the assignments, not taken from a flag).
        cell: int64 ``[N]``, each class's finest cell (the deepest level's
            group for a tree; the tuple of its groups over all levels else).
        num_cells: C.
        level_of_cell: per upper level, int64 ``[C]``, the group of each cell.
        terms: ``(map [C], size, coefficient)`` with
            ``R(y) = L − p(y) − Σ coef · P_term[map[cell(y)]]``; one per level
            with coefficient 1 for a tree, one per non-empty subset S of upper
            levels with ``(−1)^{|S|+1} · min(S)`` otherwise.
    """

    num_classes: int
    level_sizes: list[int]
    nested: bool
    cell: Tensor
    num_cells: int
    level_of_cell: list[Tensor]
    terms: list[tuple[Tensor, int, float]]
    _devices: dict[Any, "DecisionIndex"] = field(default_factory=dict, repr=False)

    @property
    def num_levels(self) -> int:
        """L, the bottom (class) level included."""
        return len(self.level_sizes) + 1

    def to(self, device: torch.device | str) -> "DecisionIndex":
        device = torch.device(device)
        if self.cell.device == device:
            return self
        key = str(device)
        if key not in self._devices:
            self._devices[key] = DecisionIndex(
                self.num_classes,
                self.level_sizes,
                self.nested,
                self.cell.to(device),
                self.num_cells,
                [m.to(device) for m in self.level_of_cell],
                [(m.to(device), size, coef) for m, size, coef in self.terms],
            )
        return self._devices[key]


_INDEX_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cell_map(columns: Tensor) -> tuple[Tensor, int]:
    """Compact ids of the distinct rows of ``columns`` [C, s] (one id per row)."""
    if columns.shape[1] == 1:
        ids = columns[:, 0]
        _, inverse = torch.unique(ids, return_inverse=True)
    else:
        _, inverse = torch.unique(columns, dim=0, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.numel() else 0


def _build_index(hierarchy: Any) -> DecisionIndex:
    assignments = [a.to("cpu", torch.int64) for a in hierarchy.assignments]
    if not assignments:
        raise ValueError("the hierarchy has no upper level")
    sizes = [int(k) for k in hierarchy.level_sizes]
    n = int(hierarchy.num_classes)
    table = torch.stack(assignments)  # [L-1, N]
    deepest = table[-1]
    # A tree if every deepest group sits in one group of each level above;
    # checked here because decisions must agree with lca_height exactly.
    first = torch.full((sizes[-1],), -1, dtype=torch.int64)
    first.scatter_reduce_(0, deepest, torch.arange(n), reduce="amin", include_self=False)
    representative = first.clamp_min(0)[deepest]
    nested = bool((table[:, representative] == table).all())
    if nested:
        cell, num_cells = deepest, sizes[-1]
    else:
        if len(sizes) > MAX_NON_NESTED_LEVELS:
            raise ValueError(
                f"a non-nested hierarchy with {len(sizes)} upper levels: expected distances need "
                f"2^{len(sizes)} - 1 inclusion-exclusion terms; at most {MAX_NON_NESTED_LEVELS} upper levels "
                f"are supported"
            )
        cell, num_cells = _cell_map(table.T)
    level_of_cell = [torch.zeros(num_cells, dtype=torch.int64).scatter_(0, cell, a) for a in assignments]
    terms: list[tuple[Tensor, int, float]] = []
    if nested:
        terms = [(m, k, 1.0) for m, k in zip(level_of_cell, sizes)]
    else:
        # Σ_y' p(y') · deepest(y, y') with deepest = max{l : same group at l}
        # = Σ_{S ≠ ∅} (−1)^{|S|+1} min(S) · P(y' shares y's groups at every l in S).
        stacked = torch.stack(level_of_cell, dim=1)  # [C, L-1]
        for size in range(1, len(sizes) + 1):
            for subset in itertools.combinations(range(len(sizes)), size):
                if size == 1:
                    m, k = level_of_cell[subset[0]], sizes[subset[0]]
                else:
                    m, k = _cell_map(stacked[:, list(subset)])
                terms.append((m, k, float((-1) ** (size + 1) * (subset[0] + 1))))
    return DecisionIndex(n, sizes, nested, cell.contiguous(), num_cells, level_of_cell, terms)


def decision_index(hierarchy: Any, device: torch.device | str = "cpu") -> DecisionIndex:
    """The :class:`DecisionIndex` of ``hierarchy`` on ``device`` (built once per
    hierarchy object and cached; hierarchies are immutable)."""
    if isinstance(hierarchy, DecisionIndex):
        return hierarchy.to(device)
    if not (hasattr(hierarchy, "assignments") and hasattr(hierarchy, "level_sizes") and hasattr(hierarchy, "num_classes")):
        raise TypeError(f"hierarchy must be a lmm_fast.Hierarchy, got {type(hierarchy).__name__}")
    index = _INDEX_CACHE.get(hierarchy)
    if index is None:
        index = _build_index(hierarchy)
        _INDEX_CACHE[hierarchy] = index
    return index.to(device)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _check_proba(proba: Any, num_classes: int, name: str = "proba") -> Tensor:
    """Type, shape and dtype; the values are checked chunk by chunk (:func:`_check_values`)."""
    if not isinstance(proba, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, N], got {type(proba).__name__}")
    if not proba.is_floating_point():
        raise TypeError(f"{name} must hold floating-point probabilities, got dtype {proba.dtype}")
    if proba.dim() != 2 or proba.shape[1] != num_classes:
        raise ValueError(
            f"{name} must be [B, N] = [B, {num_classes}] (one probability per class of the hierarchy), "
            f"got shape {tuple(proba.shape)}"
        )
    proba = proba.detach()
    if proba.dtype in (torch.float16, torch.bfloat16):
        proba = proba.float()  # sums over thousands of classes need more than 8-11 bits
    return proba


def _check_values(block: Tensor, offset: int, name: str = "proba") -> None:
    """NaN and negative entries of the rows ``offset …`` in ``block`` (inf shows in the row sums)."""
    if not block.numel():
        return
    low = block.amin()
    if bool(torch.isnan(low)):
        row = int(torch.isnan(block).any(dim=1).nonzero()[0]) + offset
        raise ValueError(f"{name} contains NaN (first in row {row}); decisions on NaN probabilities are undefined")
    if float(low) < 0:
        row, col = (block < 0).nonzero()[0].tolist()
        raise ValueError(
            f"{name} must be non-negative probabilities, found {float(block[row, col]):.6g} at [{row + offset}, {col}]"
        )


def _check_sums(sums: Tensor, block: Tensor, atol: float, offset: int = 0, name: str = "proba") -> None:
    """Row sums (from the cell probabilities) catch inf and rows off the simplex."""
    if not sums.numel():
        return
    bad = ~torch.isfinite(sums) | ((sums - 1).abs() > atol)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        if not bool(torch.isfinite(block[row]).all()):
            raise ValueError(f"{name} contains inf (first in row {row + offset}); decisions need finite probabilities")
        raise ValueError(
            f"{name} rows must sum to 1 (within atol={atol:g}); row {row + offset} sums to {float(sums[row]):.6g} "
            f"(pass probabilities, e.g. softmax of logits or FusedLMMLoss.predict_proba, not scores)"
        )


def row_chunks(proba: Tensor) -> list[tuple[int, Tensor]]:
    """``(offset, rows)`` blocks of about :data:`_CHUNK_BYTES` (one thread) or
    :data:`_CHUNK_BYTES_PARALLEL` bytes; the whole batch on a GPU."""
    if proba.device.type != "cpu":
        return [(0, proba)]
    budget = _CHUNK_BYTES if torch.get_num_threads() == 1 else _CHUNK_BYTES_PARALLEL
    step = max(1, budget // max(1, proba.shape[1] * proba.element_size()))
    return [(start, proba[start : start + step]) for start in range(0, proba.shape[0], step)]


def check_target(target: Any, proba: Tensor, name: str = "target") -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B] of class ids, got {type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != proba.shape[0]:
        raise ValueError(f"{name} must be [B] = [{proba.shape[0]}] (one class per row of proba), got shape {tuple(target.shape)}")
    if target.device != proba.device:
        raise ValueError(f"{name} is on {target.device} but proba is on {proba.device}; put both on one device")
    n = proba.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n):
        bad = int(((target < 0) | (target >= n)).nonzero()[0])
        raise ValueError(f"{name}[{bad}] = {int(target[bad])} is out of range: classes must be in [0, {n})")
    return target.to(torch.int64)


def check_k(k: Any, n: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of classes N = {n}")
    return k


def check_index(hierarchy: Any, proba: Any, name: str = "proba") -> tuple[DecisionIndex, Tensor]:
    index = decision_index(hierarchy)
    proba = _check_proba(proba, index.num_classes, name)
    return index.to(proba.device), proba


# ---------------------------------------------------------------------------
# Node probabilities and expected tree distance
# ---------------------------------------------------------------------------


def cell_proba(block: Tensor, index: DecisionIndex, atol: float, offset: int = 0) -> Tensor:
    """``[R, C]`` probability of every finest cell, the values of ``block`` checked."""
    _check_values(block, offset)
    cells = block.new_zeros(block.shape[0], index.num_cells).index_add_(1, index.cell, block)
    _check_sums(cells.sum(dim=1), block, atol, offset)
    return cells


def group_proba(cell_proba: Tensor, mapping: Tensor, size: int) -> Tensor:
    return cell_proba.new_zeros(cell_proba.shape[0], size).index_add_(1, mapping, cell_proba)


def node_probabilities(proba: Tensor, hierarchy: Any, *, atol: float = 1e-3) -> list[Tensor]:
    """Probability of every node of every upper level: ``P_l(t | x) = Σ_{y ∈ t} p(y | x)``.

    Args:
        proba: ``[B, N]`` class probabilities (rows on the simplex within ``atol``).
        hierarchy: a :class:`~lmm_fast.Hierarchy` (dense ones use their argmax groups,
            as :meth:`~lmm_fast.Hierarchy.lca_height` does).

    Returns:
        list, top level first, of ``[B, N_l]`` tensors in proba's dtype (float32 for
        half types).
    """
    index, proba = check_index(hierarchy, proba)
    cells = cell_proba(proba, index, atol)
    return [group_proba(cells, m, k) for m, k in zip(index.level_of_cell, index.level_sizes)]


def _cell_support(cells: Tensor, index: DecisionIndex) -> Tensor:
    """``[R, C]`` ``Σ_terms coef · P_term`` per finest cell: L − R(y) − p(y) for its classes."""
    if not index.nested:
        per_cell = torch.zeros_like(cells)
        for mapping, size, coef in index.terms:
            per_cell.add_(group_proba(cells, mapping, size).index_select(1, mapping), alpha=coef)
        return per_cell
    # A tree: Σ_l P_l(ancestor at l); the deepest upper level's groups are the cells.
    per_cell = cells.clone()
    for mapping, size, _ in index.terms[:-1]:
        per_cell += group_proba(cells, mapping, size).index_select(1, mapping)
    return per_cell


def _support_into(out: Tensor, block: Tensor, index: DecisionIndex, atol: float, offset: int) -> Tensor:
    """``out[:] = p(y) + Σ_terms coef · P_term(y)`` = L − R(y | x); larger is better."""
    per_cell = _cell_support(cell_proba(block, index, atol, offset), index)
    torch.index_select(per_cell, 1, index.cell, out=out)
    return out.add_(block)


def expected_distance(proba: Tensor, hierarchy: Any, *, atol: float = 1e-3) -> Tensor:
    """``[B, N]`` expected tree distance of answering each class,
    ``R(y | x) = Σ_y' p(y' | x) · lca_height(y, y')``, without any ``N × N`` matrix.

    Args:
        proba: ``[B, N]`` class probabilities, rows summing to 1 within ``atol``
            (NaN, inf, negative entries or another width raise ``ValueError``).
        hierarchy: a :class:`~lmm_fast.Hierarchy` over the N classes.

    Returns:
        ``[B, N]`` in proba's dtype (float32 for half types), on its device.
    """
    index, proba = check_index(hierarchy, proba)
    out = torch.empty_like(proba, memory_format=torch.contiguous_format)
    for offset, block in row_chunks(proba):
        _support_into(out[offset : offset + block.shape[0]], block, index, atol, offset)
    return out.neg_().add_(float(index.num_levels))


def lexsort_rows(classes: Tensor, keys: Sequence[tuple[Tensor, bool]]) -> Tensor:
    """Reorder ``classes`` [R, m] by ``keys`` (most significant first; bool = descending), then class id."""
    order = torch.argsort(classes, dim=1, stable=True)
    for key, descending in reversed(keys):
        order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, descending=descending, stable=True))
    return classes.gather(1, order)


def crm(proba: Tensor, hierarchy: Any, k: int = 5, *, atol: float = 1e-3) -> Tensor:
    """Conditional risk minimisation: the ``k`` classes with the smallest expected
    tree distance ``R(y | x) = Σ_y' p(y' | x) d(y, y')`` (d = LCA height), best first.

    Equal computed risks are ordered by probability (larger first), then by
    class index, so the result is deterministic. Cost: one scatter-add of the
    ``[B, N]`` probabilities into the finest cells, one gather back, one top-k;
    memory one ``[B, N]`` temporary.

    Args:
        proba: ``[B, N]`` class probabilities of any model (flat softmax or LMM).
        hierarchy: a :class:`~lmm_fast.Hierarchy`: visual, semantic
            (``from_assignments``), unbalanced or non-nested.
        k: classes to return, ``1 <= k <= N``.
        atol: tolerance on the row sums.

    Returns:
        int64 ``[B, k]`` class ids on proba's device.
    """
    index, proba = check_index(hierarchy, proba)
    k = check_k(k, index.num_classes)
    rows, n = proba.shape
    classes = torch.empty(rows, k, dtype=torch.int64, device=proba.device)
    support_of = torch.empty(rows, k, dtype=proba.dtype, device=proba.device)
    chunks = row_chunks(proba)
    buffer = torch.empty(chunks[0][1].shape[0] if chunks else 0, n, dtype=proba.dtype, device=proba.device)
    width = min(k + 1, n)
    for offset, block in chunks:
        support = _support_into(buffer[: block.shape[0]], block, index, atol, offset)
        values, top = torch.topk(support, width, dim=1)
        here = slice(offset, offset + block.shape[0])
        classes[here], support_of[here] = top[:, :k], values[:, :k]
        if width > k:
            # Rows where classes tied with the k-th risk fall on both sides of
            # the cut: the tied ones are chosen by probability, then class index.
            straddle = (values[:, k - 1] == values[:, k]).nonzero().flatten()
            if straddle.numel():
                picked = _resolve_ties(support[straddle], block[straddle], values[straddle, k - 1], k)
                classes[here][straddle] = picked
                support_of[here][straddle] = support[straddle].gather(1, picked)
    return lexsort_rows(classes, [(support_of, True), (proba.gather(1, classes), True)])


def _resolve_ties(support: Tensor, proba: Tensor, cut: Tensor, k: int) -> Tensor:
    from lmm_fast.metrics import ranked_topk

    cut = cut.unsqueeze(1)
    above = support > cut
    room = k - above.sum(dim=1, keepdim=True)
    tied_best = ranked_topk(torch.where(support == cut, proba, torch.full_like(proba, -1.0)), k)
    top = torch.topk(torch.where(above, support, torch.full_like(support, -math.inf)), k, dim=1).indices
    candidates = torch.cat([top, tied_best], dim=1)
    chosen = torch.cat([above.gather(1, top), torch.arange(k, device=proba.device).unsqueeze(0) < room], dim=1)
    return candidates.gather(1, torch.argsort(chosen.to(torch.int8), dim=1, descending=True, stable=True)[:, :k])


# ---------------------------------------------------------------------------
