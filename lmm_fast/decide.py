"""Hierarchy-aware decisions for any posterior ``P(y | x)`` (flat or LMM).

Two decision rules that use a class hierarchy at prediction time, at no
training cost:

* :func:`crm` — **conditional risk minimisation** (Karthik et al., ICLR 2021):
  rank the classes by their expected tree distance
  ``R(y | x) = Σ_y' p(y' | x) d(y, y')`` instead of by probability, where
  ``d`` is the height of the lowest common ancestor
  (:meth:`~lmm_fast.Hierarchy.lca_height`, the distance of
  :func:`lmm_fast.metrics.mistake_severity`).
* :class:`HedgePolicy` — **hedging** (Deng et al., CVPR 2012): answer with the
  deepest node of the hierarchy whose probability clears a threshold, the
  threshold chosen on held-out rows so that the accuracy meets a target,
  with a finite-sample, distribution-free guarantee (split conformal risk
  control; see :meth:`HedgePolicy.fit`).

Both need only the probability of every node, i.e. sums of class
probabilities over a group's members, one scatter-add through the class →
cell map and a few small ones after it. Nothing of size ``N × N`` is built:
for a tree (nested levels) the identity

    d(y, y') = Σ_{l=1..L} [y and y' in different nodes of level l]

(level L being the classes, the root shared by all) gives

    R(y | x) = L − p(y) − Σ_{l<L} P_l(group_l(y) | x).

Non-nested levels (``from_assignments(..., nested=False)``), where
``lca_height`` is ``L − (deepest level sharing a group)``, are handled exactly
by inclusion–exclusion over the subsets of upper levels (at most
:data:`MAX_NON_NESTED_LEVELS` upper levels).

Levels of an answer: 0 is the root, ``1..L−1`` the upper levels (top = 1, as
in :meth:`~lmm_fast.Hierarchy.lca_height`), ``L`` the classes.

For the comparison job: :func:`crm_report` (top-1 error, severity, hdist@1,
hdist@5 of the probability and the CRM rankings), :func:`hedge_report`
(accuracy, share at the class level and mean depth of the hedged answers and
of the top-class baselines at several targets), :func:`hedge_curve` and
:func:`plot_accuracy_specificity` (the accuracy–specificity PNG).

References (pure PyTorch, float64, ``N × N``): :func:`expected_distance_reference`,
:func:`crm_reference`, :func:`hedge_reference`.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "MAX_NON_NESTED_LEVELS",
    "RULES",
    "DecisionIndex",
    "decision_index",
    "node_probabilities",
    "expected_distance",
    "crm",
    "HedgeAnswer",
    "HedgeCurve",
    "HedgePolicy",
    "conformal_rank",
    "hedge_curve",
    "ranking_report",
    "crm_report",
    "calibration_split",
    "hedge_report",
    "plot_accuracy_specificity",
    "expected_distance_reference",
    "crm_reference",
    "hedge_reference",
]

MAX_NON_NESTED_LEVELS = 10
RULES = ("hedge", "top_class", "top_class_coarse")
_INF = math.inf
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


def _row_chunks(proba: Tensor) -> list[tuple[int, Tensor]]:
    """``(offset, rows)`` blocks of about :data:`_CHUNK_BYTES` (one thread) or
    :data:`_CHUNK_BYTES_PARALLEL` bytes; the whole batch on a GPU."""
    if proba.device.type != "cpu":
        return [(0, proba)]
    budget = _CHUNK_BYTES if torch.get_num_threads() == 1 else _CHUNK_BYTES_PARALLEL
    step = max(1, budget // max(1, proba.shape[1] * proba.element_size()))
    return [(start, proba[start : start + step]) for start in range(0, proba.shape[0], step)]


def _check_target(target: Any, proba: Tensor, name: str = "target") -> Tensor:
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


def _check_k(k: Any, n: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of classes N = {n}")
    return k


def _check_index(hierarchy: Any, proba: Any, name: str = "proba") -> tuple[DecisionIndex, Tensor]:
    index = decision_index(hierarchy)
    proba = _check_proba(proba, index.num_classes, name)
    return index.to(proba.device), proba


# ---------------------------------------------------------------------------
# Node probabilities and expected tree distance
# ---------------------------------------------------------------------------


def _cell_proba(block: Tensor, index: DecisionIndex, atol: float, offset: int = 0) -> Tensor:
    """``[R, C]`` probability of every finest cell, the values of ``block`` checked."""
    _check_values(block, offset)
    cells = block.new_zeros(block.shape[0], index.num_cells).index_add_(1, index.cell, block)
    _check_sums(cells.sum(dim=1), block, atol, offset)
    return cells


def _group_proba(cell_proba: Tensor, mapping: Tensor, size: int) -> Tensor:
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
    index, proba = _check_index(hierarchy, proba)
    cells = _cell_proba(proba, index, atol)
    return [_group_proba(cells, m, k) for m, k in zip(index.level_of_cell, index.level_sizes)]


def _cell_support(cells: Tensor, index: DecisionIndex) -> Tensor:
    """``[R, C]`` ``Σ_terms coef · P_term`` per finest cell: L − R(y) − p(y) for its classes."""
    if not index.nested:
        per_cell = torch.zeros_like(cells)
        for mapping, size, coef in index.terms:
            per_cell.add_(_group_proba(cells, mapping, size).index_select(1, mapping), alpha=coef)
        return per_cell
    # A tree: Σ_l P_l(ancestor at l); the deepest upper level's groups are the cells.
    per_cell = cells.clone()
    for mapping, size, _ in index.terms[:-1]:
        per_cell += _group_proba(cells, mapping, size).index_select(1, mapping)
    return per_cell


def _support_into(out: Tensor, block: Tensor, index: DecisionIndex, atol: float, offset: int) -> Tensor:
    """``out[:] = p(y) + Σ_terms coef · P_term(y)`` = L − R(y | x); larger is better."""
    per_cell = _cell_support(_cell_proba(block, index, atol, offset), index)
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
    index, proba = _check_index(hierarchy, proba)
    out = torch.empty_like(proba, memory_format=torch.contiguous_format)
    for offset, block in _row_chunks(proba):
        _support_into(out[offset : offset + block.shape[0]], block, index, atol, offset)
    return out.neg_().add_(float(index.num_levels))


def _lexsort_rows(classes: Tensor, keys: Sequence[tuple[Tensor, bool]]) -> Tensor:
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
    index, proba = _check_index(hierarchy, proba)
    k = _check_k(k, index.num_classes)
    rows, n = proba.shape
    classes = torch.empty(rows, k, dtype=torch.int64, device=proba.device)
    support_of = torch.empty(rows, k, dtype=proba.dtype, device=proba.device)
    chunks = _row_chunks(proba)
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
    return _lexsort_rows(classes, [(support_of, True), (proba.gather(1, classes), True)])


def _resolve_ties(support: Tensor, proba: Tensor, cut: Tensor, k: int) -> Tensor:
    from lmm_fast.metrics import ranked_topk

    cut = cut.unsqueeze(1)
    above = support > cut
    room = k - above.sum(dim=1, keepdim=True)
    tied_best = ranked_topk(torch.where(support == cut, proba, torch.full_like(proba, -1.0)), k)
    top = torch.topk(torch.where(above, support, torch.full_like(support, -_INF)), k, dim=1).indices
    candidates = torch.cat([top, tied_best], dim=1)
    chosen = torch.cat([above.gather(1, top), torch.arange(k, device=proba.device).unsqueeze(0) < room], dim=1)
    return candidates.gather(1, torch.argsort(chosen.to(torch.int8), dim=1, descending=True, stable=True)[:, :k])


# ---------------------------------------------------------------------------
# Hedging
# ---------------------------------------------------------------------------


class HedgeAnswer(NamedTuple):
    """One answer per row: ``level`` (int64 [B]; 0 root, 1..L−1 upper levels,
    L the classes), ``node`` (int64 [B]; the group id at that level, the class
    id at level L, 0 at the root) and ``probability`` ([B], of that node)."""

    level: Tensor
    node: Tensor
    probability: Tensor


@dataclass
class HedgeCurve:
    """The accuracy–specificity trade-off of one rule over thresholds.

    ``threshold`` [T] ascending; per threshold the ``accuracy`` (share of rows
    whose answer contains the true class), ``class_share`` (answered at the
    class level), ``mean_depth`` (mean answer level, 0 root .. L classes) and
    ``root_share`` (rows answered with the root, i.e. abstained).
    """

    rule: str
    num_levels: int
    threshold: Tensor
    accuracy: Tensor
    class_share: Tensor
    mean_depth: Tensor
    root_share: Tensor

    def at_accuracy(self, accuracy: float) -> dict[str, float]:
        """The most specific point (largest mean depth) whose accuracy is at
        least ``accuracy``, on the rows the curve was computed on."""
        ok = self.accuracy >= accuracy
        if not bool(ok.any()):
            return {"threshold": math.nan, "accuracy": math.nan, "class_share": math.nan, "mean_depth": math.nan}
        best = int(torch.where(ok, self.mean_depth, torch.full_like(self.mean_depth, -1.0)).argmax())
        return {
            "threshold": float(self.threshold[best]),
            "accuracy": float(self.accuracy[best]),
            "class_share": float(self.class_share[best]),
            "mean_depth": float(self.mean_depth[best]),
        }


def _levels(proba: Tensor, index: DecisionIndex, atol: float) -> tuple[Tensor, Tensor]:
    """Per row and level 0..L: the most probable node's probability and id (root: 1, 0)."""
    probs, nodes = [], []
    for offset, block in _row_chunks(proba):
        cells = _cell_proba(block, index, atol, offset)
        rows = block.shape[0]
        level_probs = [block.new_ones(rows)]
        level_nodes = [torch.zeros(rows, dtype=torch.int64, device=block.device)]
        for mapping, size in zip(index.level_of_cell, index.level_sizes):
            value, node = _group_proba(cells, mapping, size).max(dim=1)
            level_probs.append(value)
            level_nodes.append(node)
        value, node = block.max(dim=1)
        level_probs.append(value)
        level_nodes.append(node)
        probs.append(torch.stack(level_probs, dim=1))
        nodes.append(torch.stack(level_nodes, dim=1))
    if not probs:
        width = index.num_levels + 1
        return proba.new_empty(0, width), torch.empty(0, width, dtype=torch.int64, device=proba.device)
    return torch.cat(probs), torch.cat(nodes)


def _gates(probs: Tensor, rule: str) -> Tensor:
    """``[B, L+1]`` float64: a level is eligible at threshold τ when its gate exceeds τ."""
    gates = probs.to(torch.float64, copy=True)
    levels = gates.shape[1] - 1
    gates[:, 0] = _INF  # the root is always a valid answer
    if rule == "top_class":
        gates[:, 1:levels] = -_INF
    elif rule == "top_class_coarse":
        gates[:, 1 : levels - 1] = -_INF
        gates[:, levels - 1] = _INF
    return gates


def _correct(nodes: Tensor, target: Tensor, index: DecisionIndex) -> Tensor:
    """``[B, L+1]`` bool: the most probable node of each level contains the true class."""
    truth = [torch.zeros_like(target)]
    truth += [m[index.cell[target]] for m in index.level_of_cell]
    truth.append(target)
    return nodes == torch.stack(truth, dim=1)


def _answer_levels(gates: Tensor, threshold: float | Tensor) -> Tensor:
    """Deepest eligible level per row; the root (0) when none is, e.g. at τ = +inf."""
    depth = torch.arange(gates.shape[-1], device=gates.device)
    if isinstance(threshold, Tensor):
        eligible = gates.unsqueeze(0) > threshold.view(-1, 1, 1)
    else:
        eligible = gates > threshold
    return torch.where(eligible, depth, torch.zeros_like(depth)).amax(dim=-1)


def _wrong_scores(gates: Tensor, correct: Tensor) -> Tensor:
    """Per row, ``t = sup{τ : the answer at some τ' >= τ is wrong}`` (−inf if never).

    ``1[τ < t]`` is the smallest non-increasing bound on the row's 0/1 error
    as a function of the threshold; it equals the error itself unless a
    deeper answer is right while a coarser one is wrong (impossible on a tree
    once the threshold exceeds 1/2).
    """
    suffix = gates.flip(1).cummax(dim=1).values.flip(1)
    deeper = torch.cat([suffix[:, 1:], torch.full_like(suffix[:, :1], -_INF)], dim=1)
    reachable = gates > deeper
    return torch.where(reachable & ~correct, gates, torch.full_like(gates, -_INF)).amax(dim=1)


def _alpha(accuracy: Any) -> Fraction:
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float, Fraction)) or not 0 < accuracy < 1:
        raise ValueError(f"accuracy must be a number in (0, 1), got {accuracy!r}")
    # The decimal the user wrote: 0.9 means 9/10, so (n + 1)·α is not rounded down by float error.
    return 1 - (Fraction(accuracy) if isinstance(accuracy, Fraction) else Fraction(repr(float(accuracy))))


def _binomial_cdf(n: int, p: float) -> Tensor:
    """float64 [n + 1]: P(Binomial(n, p) <= j) for j = 0..n."""
    j = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1) + j * math.log(p) + (n - j) * math.log1p(-p)
    )
    return torch.exp(log_pmf).cumsum(0)


def conformal_rank(n: int, accuracy: float, delta: float | None = None) -> int:
    """How many of the ``n`` calibration scores may exceed the threshold.

    With ``t_(1) >= … >= t_(n)`` the calibration scores and ``r`` the result,
    the threshold is ``t_(r + 1)`` (−inf if ``r >= n``, +inf if ``r < 0``).

    * ``delta=None`` (marginal): ``r = floor(α (n + 1)) − 1`` with ``α = 1 − accuracy``,
      the split-conformal / conformal-risk-control choice: a new exchangeable
      row's score exceeds the threshold with probability at most
      ``(r + 1)/(n + 1) <= α``.
    * ``delta`` given (PAC): the largest ``r`` with ``P(Binomial(n, α) <= r) <= delta``,
      so that with probability ``>= 1 − delta`` over the calibration set the
      conditional error rate is at most ``α`` (the error rate given the
      calibration set is Beta(r + 1, n − r)-distributed when scores have no ties).
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    alpha = _alpha(accuracy)
    if delta is None:
        return math.floor(alpha * (n + 1)) - 1
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1) or None, got {delta!r}")
    if n == 0:
        return -1
    cdf = _binomial_cdf(n, float(alpha))
    return int((cdf <= delta).sum()) - 1


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule


@dataclass
class HedgePolicy:
    """Answer with the deepest node whose probability exceeds a threshold.

    Rule ``"hedge"`` (Deng et al., 2012): for each level from the classes up,
    take its most probable node; answer the deepest one whose probability
    exceeds ``threshold``; the root (probability 1, always right) is the last
    resort. Baselines on the same footing: ``"top_class"`` answers the top
    class if its probability exceeds the threshold, else the root;
    ``"top_class_coarse"`` answers the top class, else the most probable node
    of the deepest upper level. A threshold of +inf answers the root under
    every rule (a policy that cannot certify anything abstains).

    Build one with :meth:`fit`. Attributes: ``threshold`` (float, ±inf
    allowed), ``accuracy`` (the target), ``rule``, ``delta`` (None: marginal
    guarantee), ``num_calibration`` (n), ``rank`` (calibration rows allowed
    above the threshold, :func:`conformal_rank`) and ``calibration_accuracy``
    (accuracy on the calibration rows).
    """

    hierarchy: Any
    threshold: float
    accuracy: float | None = None
    rule: str = "hedge"
    delta: float | None = None
    num_calibration: int = 0
    rank: int = 0
    calibration_accuracy: float = math.nan
    atol: float = 1e-3

    @classmethod
    def fit(
        cls,
        proba_val: Tensor,
        y_val: Tensor,
        hierarchy: Any,
        accuracy: float = 0.95,
        *,
        rule: str = "hedge",
        delta: float | None = None,
        atol: float = 1e-3,
    ) -> "HedgePolicy":
        """Choose the threshold on held-out rows so that accuracy meets ``accuracy``.

        The guarantee (split conformal risk control; Angelopoulos et al., 2022):
        let every row get the score ``t`` = the largest threshold at which the
        rule's answer, or a coarser one the rule would give at a larger
        threshold, misses the true class. The threshold is the
        ``(r+1)``-th largest calibration score, ``r = floor((1 − accuracy)(n + 1)) − 1``.
        If the ``n`` calibration rows and a test row are exchangeable (e.g.
        i.i.d.), then for ANY posterior, calibrated or not,

            P(the test row's answer contains its class) >= 1 − (r + 1)/(n + 1) >= accuracy,

        the probability taken over the calibration rows and the test row. If
        the scores have no ties and, at the chosen threshold, a right answer
        implies right coarser answers (always so on a tree once the threshold
        exceeds 1/2), the first inequality is an equality, hence

            accuracy <= P(right) < accuracy + 1/(n + 1).

        With ``delta``: the PAC version of :func:`conformal_rank`; then with
        probability ``>= 1 − delta`` over the calibration set the accuracy on
        future rows is ``>= accuracy``. With fewer than
        ``1/(1 − accuracy) − 1`` rows no threshold can be certified and the
        policy always answers the root.

        Args:
            proba_val: ``[n, N]`` held-out class probabilities (not the training rows).
            y_val: ``[n]`` their classes.
            hierarchy: the tree the answers are nodes of.
            accuracy: the target, in (0, 1).
            rule: ``"hedge"``, ``"top_class"`` or ``"top_class_coarse"``.
            delta: None (marginal guarantee) or the PAC failure probability.
            atol: tolerance on the row sums.
        """
        index, proba = _check_index(hierarchy, proba_val, "proba_val")
        target = _check_target(y_val, proba, "y_val")
        _check_rule(rule)
        n = proba.shape[0]
        rank = conformal_rank(n, accuracy, delta)
        probs, nodes = _levels(proba, index, atol)
        gates = _gates(probs, rule)
        correct = _correct(nodes, target, index)
        scores = torch.sort(_wrong_scores(gates, correct), descending=True).values
        if rank < 0:
            threshold = _INF
        elif rank >= n:
            threshold = -_INF
        else:
            threshold = float(scores[rank])
        policy = cls(hierarchy, threshold, float(accuracy), rule, delta, n, rank, math.nan, atol)
        if n:
            level = _answer_levels(gates, threshold)
            policy.calibration_accuracy = float(correct.gather(1, level.unsqueeze(1)).to(torch.float64).mean())
        return policy

    @property
    def guaranteed_accuracy(self) -> float:
        """``1 − (r + 1)/(n + 1)``: the marginal accuracy bound (>= the target; 1 if the
        policy always answers the root)."""
        if self.rank < 0:
            return 1.0
        return 1.0 - min(self.rank + 1, self.num_calibration + 1) / (self.num_calibration + 1)

    def __call__(self, proba: Tensor) -> HedgeAnswer:
        """Each row's answer as ``(level, node, probability)``, see :class:`HedgeAnswer`."""
        index, proba = _check_index(self.hierarchy, proba)
        probs, nodes = _levels(proba, index, self.atol)
        level = _answer_levels(_gates(probs, self.rule), self.threshold).unsqueeze(1)
        return HedgeAnswer(level.squeeze(1), nodes.gather(1, level).squeeze(1), probs.gather(1, level).squeeze(1))

    def correct(self, answer: HedgeAnswer, target: Tensor) -> Tensor:
        """bool ``[B]``: the answered node contains the true class."""
        index = decision_index(self.hierarchy, answer.level.device)
        target = target.to(torch.int64)
        if target.shape != answer.level.shape:
            raise ValueError(f"target must be [B] = {tuple(answer.level.shape)}, got {tuple(target.shape)}")
        if target.device != answer.level.device:
            raise ValueError(f"target is on {target.device} but the answer is on {answer.level.device}")
        truth = torch.zeros_like(target)
        bottom = index.num_levels
        truth = torch.where(answer.level == bottom, target, truth)
        cells = index.cell[target]
        for level, mapping in enumerate(index.level_of_cell, start=1):
            truth = torch.where(answer.level == level, mapping[cells], truth)
        return answer.node == truth

    def evaluate(self, proba: Tensor, target: Tensor) -> dict[str, float]:
        """``accuracy``, ``class_share``, ``mean_depth`` and ``root_share`` on labelled rows."""
        answer = self(proba)
        target = _check_target(target, proba.detach(), "target")
        if not target.numel():
            raise ValueError("evaluate: no rows; the accuracy is undefined")
        bottom = decision_index(self.hierarchy).num_levels
        return {
            "accuracy": float(self.correct(answer, target).to(torch.float64).mean()),
            "class_share": float((answer.level == bottom).to(torch.float64).mean()),
            "mean_depth": float(answer.level.to(torch.float64).mean()),
            "root_share": float((answer.level == 0).to(torch.float64).mean()),
        }

    def curve(self, proba: Tensor, target: Tensor, thresholds: Tensor | Sequence[float] | None = None) -> HedgeCurve:
        """:func:`hedge_curve` of this policy's rule and hierarchy."""
        return hedge_curve(proba, target, self.hierarchy, rule=self.rule, thresholds=thresholds, atol=self.atol)


def hedge_curve(
    proba: Tensor,
    target: Tensor,
    hierarchy: Any,
    *,
    rule: str = "hedge",
    thresholds: Tensor | Sequence[float] | None = None,
    atol: float = 1e-3,
) -> HedgeCurve:
    """Accuracy, share at the class level and mean depth of ``rule``'s answers
    at every threshold (default: −inf, 255 quantiles of the rows' node
    probabilities, +inf), computed exactly on the given rows."""
    index, proba = _check_index(hierarchy, proba)
    target = _check_target(target, proba)
    _check_rule(rule)
    if not target.numel():
        raise ValueError("hedge_curve: no rows")
    probs, nodes = _levels(proba, index, atol)
    gates = _gates(probs, rule)
    correct = _correct(nodes, target, index).to(torch.float64)
    if thresholds is None:
        finite = gates[:, 1:][torch.isfinite(gates[:, 1:])]
        grid = torch.quantile(finite[:1 << 24], torch.linspace(0, 1, 255, dtype=torch.float64, device=finite.device))
        inf = torch.tensor([-_INF, _INF], dtype=torch.float64, device=gates.device)
        thresholds = torch.unique(torch.cat([inf, grid]))
    else:
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=gates.device).flatten()
        thresholds = torch.sort(thresholds).values
    bottom = index.num_levels
    out = {key: [] for key in ("accuracy", "class_share", "mean_depth", "root_share")}
    step = max(1, (1 << 24) // max(1, gates.numel()))
    for start in range(0, thresholds.numel(), step):
        level = _answer_levels(gates, thresholds[start : start + step])  # [T, B]
        hit = correct.unsqueeze(0).expand(level.shape[0], -1, -1).gather(2, level.unsqueeze(2)).squeeze(2)
        out["accuracy"].append(hit.mean(dim=1))
        out["class_share"].append((level == bottom).to(torch.float64).mean(dim=1))
        out["mean_depth"].append(level.to(torch.float64).mean(dim=1))
        out["root_share"].append((level == 0).to(torch.float64).mean(dim=1))
    return HedgeCurve(rule, bottom, thresholds.cpu(), *(torch.cat(out[key]).cpu() for key in out))


# ---------------------------------------------------------------------------
# Rows of the comparison job
# ---------------------------------------------------------------------------


def ranking_report(ranking: Tensor, target: Tensor, hierarchy: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Metrics of a class ranking ``[M, k]`` (best first) in ``hierarchy``'s tree:
    ``top1_error``, ``severity`` (mean LCA height of the wrong top-1 answers,
    NaN if none) and ``hdist{k}`` for each k (mean over rows of the mean LCA
    height between the true class and the first k classes), as
    :func:`lmm_fast.metrics.mistake_severity` and
    :func:`~lmm_fast.metrics.hierarchical_distance_topk`."""
    if ranking.dim() != 2 or ranking.shape[0] != target.shape[0]:
        raise ValueError(f"ranking must be [M, k] with M = {target.shape[0]}, got {tuple(ranking.shape)}")
    if not target.numel():
        raise ValueError("ranking_report: no rows")
    for k in ks:
        _check_k(k, ranking.shape[1])
    target = target.to(ranking.device, torch.int64)
    top1 = ranking[:, 0]
    wrong = top1 != target
    report = {"top1_error": float(wrong.to(torch.float64).mean())}
    report["severity"] = float(hierarchy.lca_height(top1[wrong], target[wrong]).to(torch.float64).mean()) if bool(wrong.any()) else math.nan
    dist = hierarchy.lca_height(ranking[:, : max(ks)], target.unsqueeze(1)).to(torch.float64)
    for k in ks:
        report[f"hdist{k}"] = float(dist[:, :k].mean())
    return report


def crm_report(
    proba: Tensor, target: Tensor, hierarchy: Any, *, ks: Sequence[int] = (1, 5), chunk_rows: int | None = None
) -> dict[str, dict[str, float]]:
    """``{"argmax": …, "crm": …}``: :func:`ranking_report` of the ranking by
    probability (ties by class index, :func:`lmm_fast.metrics.ranked_topk`) and
    of the :func:`crm` ranking, on the same rows. For the rows "flat + CRM" and
    "LMM + CRM" of the comparison job. Rows are processed in chunks
    (``chunk_rows``, default about 2^24 / N rows) so memory stays bounded."""
    from lmm_fast.metrics import ranked_topk

    index, proba = _check_index(hierarchy, proba)
    target = _check_target(target, proba)
    k = max(ks)
    _check_k(k, index.num_classes)
    step = chunk_rows or max(1, (1 << 24) // index.num_classes)
    by_proba, by_risk = [], []
    for start in range(0, proba.shape[0], step):
        block = proba[start : start + step]
        by_proba.append(ranked_topk(block, k))
        by_risk.append(crm(block, hierarchy, k))
    by_proba = torch.cat(by_proba) if by_proba else torch.empty(0, k, dtype=torch.int64)
    by_risk = torch.cat(by_risk) if by_risk else torch.empty(0, k, dtype=torch.int64)
    return {
        "argmax": ranking_report(by_proba, target, hierarchy, ks),
        "crm": ranking_report(by_risk, target, hierarchy, ks),
    }


def calibration_split(num_rows: int, fraction: float = 0.5, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random disjoint ``(calibration, evaluation)`` row indices, ``fraction``
    of the rows for calibration: the held-out rows :meth:`HedgePolicy.fit`
    needs when only one test set exists."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    cut = int(round(fraction * num_rows))
    return order[:cut], order[cut:]


def hedge_report(
    proba_val: Tensor,
    y_val: Tensor,
    proba_test: Tensor,
    y_test: Tensor,
    hierarchy: Any,
    *,
    accuracies: Sequence[float] = (0.90, 0.95, 0.99),
    rules: Sequence[str] = RULES,
    delta: float | None = None,
) -> list[dict[str, Any]]:
    """One row per (rule, target): the policy fitted on the validation rows,
    evaluated on the test rows. Keys: ``rule``, ``target``, ``threshold``,
    ``guaranteed`` (:attr:`HedgePolicy.guaranteed_accuracy`), ``num_calibration``,
    ``accuracy``, ``class_share``, ``mean_depth``, ``root_share``."""
    rows = []
    for rule in rules:
        for accuracy in accuracies:
            policy = HedgePolicy.fit(proba_val, y_val, hierarchy, accuracy, rule=rule, delta=delta)
            rows.append(
                {
                    "rule": rule,
                    "target": float(accuracy),
                    "threshold": policy.threshold,
                    "guaranteed": policy.guaranteed_accuracy,
                    "num_calibration": policy.num_calibration,
                    **policy.evaluate(proba_test, y_test),
                }
            )
    return rows


def plot_accuracy_specificity(
    curves: Mapping[str, HedgeCurve],
    path: str | os.PathLike,
    *,
    specificity: str = "mean_depth",
    points: Mapping[str, tuple[float, float]] | None = None,
    targets: Sequence[float] = (),
    title: str | None = None,
) -> str:
    """Draw accuracy against specificity, one line per curve, and write a PNG.

    Args:
        curves: label -> :class:`HedgeCurve` (e.g. "flat, hedge", "LMM, hedge",
            "flat, top class").
        path: the PNG to write.
        specificity: x axis, ``"mean_depth"`` or ``"class_share"``.
        points: label -> (specificity, accuracy) markers, e.g. the fitted policies on test.
        targets: horizontal dotted lines at these accuracies.

    Returns:
        the path written. matplotlib is imported here only (no pyplot, no global state).
    """
    if specificity not in ("mean_depth", "class_share"):
        raise ValueError(f"specificity must be 'mean_depth' or 'class_share', got {specificity!r}")
    if not curves:
        raise ValueError("curves is empty: nothing to draw")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_accuracy_specificity needs matplotlib (pip install matplotlib)") from exc
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        axes.plot(getattr(curve, specificity).numpy(), (100 * curve.accuracy).numpy(), label=label, linewidth=1.5)
    for label, (x, y) in (points or {}).items():
        axes.plot([x], [100 * y], marker="o", linestyle="none", label=label)
    for accuracy in targets:
        axes.axhline(100 * accuracy, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("mean depth of the answer (0 = root)" if specificity == "mean_depth" else "share of rows answered at the class level")
    axes.set_ylabel("accuracy (%): the answer contains the true class")
    axes.set_title(title or "Accuracy-specificity trade-off")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    return os.fspath(path)


# ---------------------------------------------------------------------------
# References (explicit N x N, float64; for tests and benchmarks)
# ---------------------------------------------------------------------------


def expected_distance_reference(proba: Tensor, hierarchy: Any) -> Tensor:
    """``proba @ D`` with ``D = hierarchy.tree_distance()`` ``[N, N]``, in float64."""
    distance = hierarchy.tree_distance(device=proba.device, dtype=torch.float64)
    return proba.to(torch.float64) @ distance


def crm_reference(proba: Tensor, hierarchy: Any, k: int) -> Tensor:
    """``[B, k]``: classes sorted by (reference risk ascending, probability
    descending, class index ascending) — a full sort per row."""
    risk = expected_distance_reference(proba, hierarchy)
    classes = torch.arange(proba.shape[1], device=proba.device).expand(proba.shape[0], -1)
    return _lexsort_rows(classes, [(risk, False), (proba.to(torch.float64), True)])[:, :k]


def hedge_reference(proba: Tensor, hierarchy: Any, threshold: float, rule: str = "hedge") -> HedgeAnswer:
    """The rule written plainly: node probabilities from explicit membership
    matrices, then for each row the deepest eligible level."""
    p = proba.to(torch.float64)
    rows, n = p.shape
    level_probs = []
    for groups, size in zip(hierarchy.assignments, hierarchy.level_sizes):
        member = torch.zeros(n, size, dtype=torch.float64, device=p.device)
        member[torch.arange(n), groups.to(p.device)] = 1.0
        level_probs.append(p @ member)
    level_probs.append(p)
    bottom = len(level_probs)
    levels, nodes, values = [], [], []
    for i in range(rows):
        answer = (0, 0, 1.0)
        for depth in range(bottom, 0, -1):
            value, node = level_probs[depth - 1][i].max(dim=0)
            if rule == "hedge":
                eligible = float(value) > threshold
            elif rule == "top_class":
                eligible = depth == bottom and float(value) > threshold
            else:
                # the fallback is always eligible, except that +inf means the root for every rule
                eligible = (depth == bottom - 1 and threshold < _INF) or (depth == bottom and float(value) > threshold)
            if eligible:
                answer = (depth, int(node), float(value))
                break
        levels.append(answer[0])
        nodes.append(answer[1])
        values.append(answer[2])
    return HedgeAnswer(
        torch.tensor(levels, dtype=torch.int64),
        torch.tensor(nodes, dtype=torch.int64),
        torch.tensor(values, dtype=torch.float64),
    )
