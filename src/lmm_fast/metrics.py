"""Evaluation metrics of the paper, and a few beyond it.

* :func:`topk_error` — top-k error for k = 1, 2, 5, 10 (the paper's tables).
* :func:`per_class_accuracy`, :func:`compare_per_class`, :func:`compare_models`
  — per-class accuracy and the share of classes improved / unchanged (within
  1 point) / worse by more than 1 point (the paper's Fig. 5 and 11).
* :func:`confidence`, :func:`confidence_summary`,
  :func:`expected_calibration_error`, :func:`calibration_bins` — prediction
  confidence (Fig. 6–8) and calibration.
* :func:`mistake_severity`, :func:`hierarchical_distance_topk` — how bad the
  mistakes are in a tree distance (Bertinetto et al., "Making Better
  Mistakes", 2020), from a :class:`~lmm_fast.Hierarchy`, an ``[N, N]``
  distance matrix or a callable.
* :func:`reassignment_report` — which classes the adaptation of Ψ moved
  between groups, per level (the paper's Table II).

Conventions: ``scores`` is ``[M, N]`` (probabilities, logits or any score
where larger is better; only the order matters unless the function says it
needs probabilities), ``target`` ``[M]`` integer classes in ``[0, N)``. With
``ignore_index`` set, rows whose target equals it are dropped first. NaN
scores raise ``ValueError``. Aggregates over samples raise ``ValueError`` on
an empty input; per-class results are NaN for classes with no sample.
Everything is computed in float64 and in row chunks, so ``M × N`` may exceed
memory for one temporary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "topk_correct",
    "topk_error",
    "per_class_accuracy",
    "ClassComparison",
    "compare_per_class",
    "compare_models",
    "confidence",
    "confidence_summary",
    "calibration_bins",
    "expected_calibration_error",
    "ranked_topk",
    "mistake_severity",
    "hierarchical_distance_topk",
    "LevelReassignment",
    "ReassignmentReport",
    "reassignment_report",
]

_TIES = ("average", "pessimistic", "optimistic")
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__} ({exc})") from None


def _check_target(target: Any, rows: int, name: str = "target") -> Tensor:
    target = _as_tensor(target, name)
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{name} must hold integer class indices, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != rows:
        raise ValueError(f"{name} must be [M] = [{rows}] (one class per row of scores), got shape {tuple(target.shape)}")
    return target.to(torch.int64)


def _check_scores(scores: Any, name: str = "scores") -> Tensor:
    scores = _as_tensor(scores, name)
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"{name} must be a real [M, N] tensor, got dtype {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, N] (one row of class scores per sample), got shape {tuple(scores.shape)}")
    if scores.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(scores.shape)}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        row = int(torch.isnan(scores).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} contains NaN (first in row {row}); rankings of NaN scores are undefined")
    return scores


def _scores_and_target(scores: Any, target: Any, ignore_index: int | None, name: str = "scores") -> tuple[Tensor, Tensor]:
    scores = _check_scores(scores, name)
    target = _check_target(target, scores.shape[0]).to(scores.device)
    if ignore_index is not None:
        keep = target != ignore_index
        scores, target = scores[keep], target[keep]
    n = scores.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n):
        bad = int(((target < 0) | (target >= n)).nonzero()[0])
        raise ValueError(
            f"target[{bad}] = {int(target[bad])} is out of range: classes must be in [0, {n}) "
            f"(scores has {n} columns)" + ("" if ignore_index is None else f" or equal ignore_index ({ignore_index})")
        )
    return scores, target


def _check_ks(ks: int | Iterable[int]) -> list[int]:
    values = [ks] if isinstance(ks, int) else list(ks)
    if not values:
        raise ValueError("ks must name at least one k")
    for k in values:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r}")
    return values


def _check_ties(ties: str) -> str:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    return ties


def _chunks(rows: int, width: int) -> Iterable[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _nonempty(count: int, what: str) -> None:
    if count == 0:
        raise ValueError(f"{what}: no samples (after dropping ignore_index rows); the metric is undefined")


# ---------------------------------------------------------------------------
# Top-k error
# ---------------------------------------------------------------------------


def _rank_counts(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: classes scored strictly above the target, and classes tied with it (itself included)."""
    greater = torch.empty(target.shape[0], dtype=torch.int64, device=scores.device)
    equal = torch.empty_like(greater)
    for rows in _chunks(scores.shape[0], scores.shape[1]):
        block = scores[rows]
        own = block.gather(1, target[rows].unsqueeze(1))
        greater[rows] = (block > own).sum(dim=1)
        equal[rows] = (block == own).sum(dim=1)
    return greater, equal


def _correct_from_counts(greater: Tensor, equal: Tensor, k: int, ties: str) -> Tensor:
    if ties == "pessimistic":
        return (greater + equal <= k).to(torch.float64)
    if ties == "optimistic":
        return (greater < k).to(torch.float64)
    return ((k - greater).to(torch.float64) / equal.to(torch.float64)).clamp(0.0, 1.0)


def topk_correct(scores: Any, target: Any, k: int = 1, *, ties: str = "average") -> Tensor:
    """float64 ``[M]``: 1 where the target is among the ``k`` best-scored classes, else 0.

    Ties with the target's score: ``"average"`` (default) gives the probability
    that a uniformly random order of the tied classes puts the target in the
    top k (so a fraction); ``"pessimistic"`` ranks the target after all classes
    tied with it, ``"optimistic"`` before them. ``k >= N`` is always correct.
    """
    _check_ties(ties)
    (k,) = _check_ks(k)
    scores, target = _scores_and_target(scores, target, None)
    greater, equal = _rank_counts(scores, target)
    return _correct_from_counts(greater, equal, k, ties)


def topk_error(
    proba_or_scores: Any,
    target: Any,
    ks: int | Iterable[int] = (1, 2, 5, 10),
    *,
    ties: str = "average",
    ignore_index: int | None = None,
) -> dict[int, float]:
    """Top-k error: the share of samples whose class is not among the ``k``
    best-scored classes, for each ``k`` in ``ks``.

    Args:
        proba_or_scores: ``[M, N]`` probabilities or any scores (larger is better).
        target: ``[M]`` classes in ``[0, N)``.
        ks: one k or several (each ``>= 1``; ``k >= N`` gives error 0).
        ties: how a tie with the target's score counts, see :func:`topk_correct`.
        ignore_index: drop rows whose target equals it.

    Returns:
        ``{k: error in [0, 1]}``.
    """
    ks = _check_ks(ks)
    _check_ties(ties)
    scores, target = _scores_and_target(proba_or_scores, target, ignore_index, "proba_or_scores")
    _nonempty(target.numel(), "topk_error")
    greater, equal = _rank_counts(scores, target)
    return {k: 1.0 - float(_correct_from_counts(greater, equal, k, ties).mean()) for k in ks}


# ---------------------------------------------------------------------------
# Per-class accuracy and the comparison of two models
# ---------------------------------------------------------------------------


def per_class_accuracy(
    scores: Any,
    target: Any,
    *,
    k: int = 1,
    num_classes: int | None = None,
    ties: str = "average",
    ignore_index: int | None = None,
    return_counts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Top-``k`` accuracy of every class over its own samples.

    Args:
        scores: ``[M, N]`` scores, or ``[M]`` integer predicted classes (then
            ``k`` must be 1 and ``num_classes`` is needed).
        target: ``[M]`` classes.
        k, ties: as :func:`topk_correct`.
        num_classes: N (default ``scores.shape[1]``).
        ignore_index: drop rows whose target equals it.
        return_counts: also return the samples per class.

    Returns:
        float64 ``[N]``, NaN for a class with no sample (absent from the test
        set); with ``return_counts``, also int64 ``[N]`` counts.
    """
    _check_ties(ties)
    (k,) = _check_ks(k)
    scores_t = _as_tensor(scores, "scores")
    if scores_t.dim() == 1:
        if scores_t.is_floating_point() or scores_t.dtype == torch.bool:
            raise TypeError(f"1-D scores must be integer predicted classes, got dtype {scores_t.dtype}")
        if k != 1:
            raise ValueError(f"predicted classes give top-1 accuracy only, got k={k}")
        if num_classes is None:
            raise ValueError("num_classes is required when scores are predicted classes")
        target = _check_target(target, scores_t.shape[0]).to(scores_t.device)
        pred = scores_t.to(torch.int64)
        if ignore_index is not None:
            keep = target != ignore_index
            pred, target = pred[keep], target[keep]
        n = int(num_classes)
        for name, t in (("target", target), ("scores", pred)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise ValueError(f"{name} has classes outside [0, {n})")
        correct = (pred == target).to(torch.float64)
    else:
        scores_t, target = _scores_and_target(scores_t, target, ignore_index)
        n = scores_t.shape[1] if num_classes is None else int(num_classes)
        if n != scores_t.shape[1]:
            raise ValueError(f"num_classes is {n} but scores has {scores_t.shape[1]} columns")
        greater, equal = _rank_counts(scores_t, target)
        correct = _correct_from_counts(greater, equal, k, ties)
    counts = torch.bincount(target, minlength=n)
    hits = torch.zeros(n, dtype=torch.float64, device=target.device).index_add_(0, target, correct)
    accuracy = torch.where(counts > 0, hits / counts.clamp_min(1).to(torch.float64), torch.full_like(hits, math.nan))
    return (accuracy, counts) if return_counts else accuracy


@dataclass
class ClassComparison:
    """Per-class comparison of a new model against a baseline.

    Shares are fractions of the ``num_compared`` classes that have samples
    (non-NaN accuracy) in both; ``delta`` is ``new − baseline`` per class (NaN
    where either is NaN).
    """

    improved: float
    unchanged: float
    worse: float
    num_compared: int
    num_skipped: int
    threshold: float
    delta: Tensor
    improved_classes: Tensor
    unchanged_classes: Tensor
    worse_classes: Tensor

    def as_dict(self) -> dict[str, float]:
        return {"improved": self.improved, "unchanged": self.unchanged, "worse": self.worse}

    def __str__(self) -> str:
        pts = 100 * self.threshold
        return (
            f"improved {100 * self.improved:.1f}% | unchanged (within {pts:g} pt) {100 * self.unchanged:.1f}% | "
            f"worse by more than {pts:g} pt {100 * self.worse:.1f}% (of {self.num_compared} classes"
            + (f"; {self.num_skipped} without samples skipped)" if self.num_skipped else ")")
        )


def compare_per_class(acc_baseline: Any, acc_new: Any, *, threshold: float = 0.01) -> ClassComparison:
    """Share of classes whose accuracy improved by more than ``threshold``, stayed
    within ``threshold`` (inclusive), or fell by more than ``threshold``.

    The paper's Fig. 5 / 11 use ``threshold = 0.01`` (one point): 56 / 19 / 25 %
    on ImageNet1K. Classes with a NaN accuracy in either model (no samples) are
    skipped. A difference of exactly ``threshold`` counts as unchanged (up to
    1e-9, so that e.g. 0.51 − 0.50 is not called an improvement by rounding).
    """
    a = _as_tensor(acc_baseline, "acc_baseline").to(torch.float64)
    b = _as_tensor(acc_new, "acc_new").to(torch.float64)
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"acc_baseline and acc_new must be [N] of equal length, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    delta = b - a.to(b.device)
    valid = ~torch.isnan(delta)
    slack = 1e-9
    improved = valid & (delta > threshold + slack)
    worse = valid & (delta < -threshold - slack)
    unchanged = valid & ~improved & ~worse
    count = int(valid.sum())

    def share(mask: Tensor) -> float:
        return float(mask.sum()) / count if count else math.nan

    return ClassComparison(
        improved=share(improved),
        unchanged=share(unchanged),
        worse=share(worse),
        num_compared=count,
        num_skipped=int(delta.numel() - count),
        threshold=float(threshold),
        delta=delta,
        improved_classes=improved.nonzero().flatten(),
        unchanged_classes=unchanged.nonzero().flatten(),
        worse_classes=worse.nonzero().flatten(),
    )


def compare_models(
    scores_baseline: Any,
    scores_new: Any,
    target: Any,
    *,
    k: int = 1,
    threshold: float = 0.01,
    ties: str = "average",
    ignore_index: int | None = None,
) -> ClassComparison:
    """:func:`compare_per_class` of the per-class top-``k`` accuracies of two
    models' ``[M, N]`` scores on the same samples."""
    a = per_class_accuracy(scores_baseline, target, k=k, ties=ties, ignore_index=ignore_index)
    b = per_class_accuracy(scores_new, target, k=k, ties=ties, ignore_index=ignore_index)
    return compare_per_class(a, b, threshold=threshold)


# ---------------------------------------------------------------------------
# Confidence and calibration
# ---------------------------------------------------------------------------


def _check_proba(proba: Any, name: str = "proba", atol: float = 1e-5) -> Tensor:
    proba = _check_scores(proba, name)
    if not proba.is_floating_point():
        raise TypeError(f"{name} must be floating-point probabilities, got {proba.dtype}")
    if proba.numel() and (float(proba.min()) < -atol or float(proba.max()) > 1 + atol):
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in [{float(proba.min()):.4g}, "
            f"{float(proba.max()):.4g}] (apply softmax, or use loss_fn.predict_proba)"
        )
    return proba


def confidence(proba: Any) -> Tensor:
    """float64 ``[M]``: the probability of each row's predicted (top-1) class."""
    proba = _check_proba(proba)
    return proba.max(dim=1).values.to(torch.float64)


def confidence_summary(proba: Any, target: Any | None = None, *, ignore_index: int | None = None) -> dict[str, float]:
    """Mean confidence (the paper's Fig. 6–8 claim the LMM is more confident).

    Returns ``{"mean", "median"}`` of the top-1 probability, and with
    ``target`` also ``"accuracy"``, ``"mean_correct"`` / ``"mean_wrong"`` (NaN
    when no prediction is correct / wrong) and ``"mean_true_class"`` (the mean
    probability given to the true class). The predicted class of a row with
    tied maxima is the first (lowest index), as ``torch.argmax``.
    """
    proba = _check_proba(proba)
    if target is not None:
        proba, target = _scores_and_target(proba, target, ignore_index, "proba")
    _nonempty(proba.shape[0], "confidence_summary")
    top = proba.to(torch.float64).max(dim=1).values
    pred = proba.argmax(dim=1)
    out = {"mean": float(top.mean()), "median": float(top.median())}
    if target is not None:
        correct = pred == target
        out["accuracy"] = float(correct.to(torch.float64).mean())
        out["mean_correct"] = float(top[correct].mean()) if bool(correct.any()) else math.nan
        out["mean_wrong"] = float(top[~correct].mean()) if bool((~correct).any()) else math.nan
        out["mean_true_class"] = float(proba.gather(1, target.unsqueeze(1)).to(torch.float64).mean())
    return out


def calibration_bins(
    proba: Any, target: Any, n_bins: int = 15, *, ignore_index: int | None = None
) -> dict[str, Tensor]:
    """Reliability diagram data: top-1 predictions binned by confidence.

    Bins are equal-width on ``[0, 1]``: bin ``m`` (0-based) holds confidences in
    ``(m/n_bins, (m+1)/n_bins]``, and a confidence of exactly 0 goes to bin 0.

    Returns:
        ``{"edges": [n_bins + 1], "count": int64 [n_bins], "accuracy": [n_bins],
        "confidence": [n_bins]}``, accuracy and mean confidence NaN in an empty bin.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    proba = _check_proba(proba)
    proba, target = _scores_and_target(proba, target, ignore_index, "proba")
    conf = proba.max(dim=1).values.to(torch.float64).clamp(0.0, 1.0)
    correct = (proba.argmax(dim=1) == target).to(torch.float64)
    index = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).to(torch.int64)
    count = torch.bincount(index, minlength=n_bins)
    hits = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, index, correct)
    total = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, index, conf)
    denom = count.clamp_min(1).to(torch.float64)
    empty = count == 0
    nan = torch.full_like(hits, math.nan)
    return {
        "edges": torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64),
        "count": count,
        "accuracy": torch.where(empty, nan, hits / denom),
        "confidence": torch.where(empty, nan, total / denom),
    }


def expected_calibration_error(
    proba: Any, target: Any, n_bins: int = 15, *, norm: str = "l1", ignore_index: int | None = None
) -> float:
    """Expected calibration error of the top-1 prediction.

    ``norm="l1"`` (ECE): ``Σ_m (n_m / M) |acc_m − conf_m|``; ``"l2"``: the root
    of ``Σ_m (n_m / M) (acc_m − conf_m)²``; ``"max"`` (MCE): the largest gap
    over non-empty bins. Bins as :func:`calibration_bins`; empty bins add 0.
    """
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"norm must be 'l1', 'l2' or 'max', got {norm!r}")
    bins = calibration_bins(proba, target, n_bins, ignore_index=ignore_index)
    count = bins["count"]
    total = int(count.sum())
    _nonempty(total, "expected_calibration_error")
    full = count > 0
    gap = (bins["accuracy"][full] - bins["confidence"][full]).abs()
    weight = count[full].to(torch.float64) / total
    if norm == "l1":
        return float((weight * gap).sum())
    if norm == "l2":
        return float((weight * gap.square()).sum().sqrt())
    return float(gap.max())


# ---------------------------------------------------------------------------
# Hierarchical mistakes
# ---------------------------------------------------------------------------


def ranked_topk(scores: Any, k: int) -> Tensor:
    """int64 ``[M, k]``: the ``k`` best classes of each row, best first, equal
    scores ordered by class index (deterministic, unlike ``torch.topk``)."""
    scores = _check_scores(scores)
    (k,) = _check_ks(k)
    rows, n = scores.shape
    if k > n:
        raise ValueError(f"k = {k} exceeds the number of classes N = {n}")
    out = torch.empty(rows, k, dtype=torch.int64, device=scores.device)
    for chunk in _chunks(rows, n):
        block = scores[chunk]
        threshold = torch.topk(block, k, dim=1).values[:, -1:]
        above = block > threshold
        tied = block == threshold
        room = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (tied.cumsum(dim=1) <= room))
        index = take.nonzero()[:, 1].view(-1, k)  # ascending class order per row
        order = torch.sort(block.gather(1, index), dim=1, descending=True, stable=True).indices
        out[chunk] = index.gather(1, order)
    return out


Distance = Any  # a Hierarchy, an [N, N] tensor, or a callable (y1, y2) -> distances


def _distance_fn(distance: Distance, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    if hasattr(distance, "lca_height"):
        hierarchy = distance
        if int(hierarchy.num_classes) != num_classes:
            raise ValueError(f"the hierarchy has {hierarchy.num_classes} classes but scores has {num_classes} columns")
        return lambda a, b: hierarchy.lca_height(a, b)
    if isinstance(distance, Tensor) or hasattr(distance, "__array__"):
        matrix = _as_tensor(distance, "distance")
        if matrix.dim() != 2 or tuple(matrix.shape) != (num_classes, num_classes):
            raise ValueError(f"distance must be [N, N] = [{num_classes}, {num_classes}], got shape {tuple(matrix.shape)}")
        if matrix.is_floating_point() and bool(torch.isnan(matrix).any()):
            raise ValueError("distance contains NaN")
        if bool((matrix < 0).any()):
            raise ValueError("distance must be non-negative")
        return lambda a, b: matrix.to(a.device)[a, b]
    if callable(distance):
        return distance
    raise TypeError(
        f"distance must be a Hierarchy (tree distance = LCA height), an [N, N] tensor or a callable "
        f"(y1, y2) -> distances, got {type(distance).__name__}"
    )


def _pair_distance(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    d = _as_tensor(fn(a, b), "distance(y1, y2)")
    if tuple(d.shape) != tuple(torch.broadcast_shapes(a.shape, b.shape)):
        raise ValueError(f"distance(y1, y2) returned shape {tuple(d.shape)}, expected {tuple(a.shape)}")
    return d.to(device=a.device, dtype=torch.float64)


def mistake_severity(scores: Any, target: Any, distance: Distance, *, ignore_index: int | None = None) -> float:
    """Mean tree distance between the top-1 prediction and the true class, over
    the misclassified samples only ("mistake severity").

    ``distance``: a :class:`~lmm_fast.Hierarchy` (the height of the lowest
    common ancestor, :meth:`~lmm_fast.Hierarchy.lca_height`, for the model's own
    or a semantic tree), an ``[N, N]`` matrix, or a callable
    ``(y1, y2) -> distances`` on broadcast class tensors. The top-1 class of a
    row with tied maxima is the lowest index. NaN when there is no mistake.
    """
    scores, target = _scores_and_target(scores, target, ignore_index)
    _nonempty(target.numel(), "mistake_severity")
    fn = _distance_fn(distance, scores.shape[1])
    pred = scores.argmax(dim=1)
    wrong = pred != target
    if not bool(wrong.any()):
        return math.nan
    return float(_pair_distance(fn, pred[wrong], target[wrong]).mean())


def hierarchical_distance_topk(
    scores: Any,
    target: Any,
    distance: Distance,
    ks: int | Iterable[int] = (1, 5, 20),
    *,
    ignore_index: int | None = None,
) -> dict[int, float]:
    """Average hierarchical distance of the top-k: the mean over samples of the
    mean distance between the true class and each of the ``k`` best-scored
    classes (correct ones count 0), as in "Making Better Mistakes".

    ``distance`` as :func:`mistake_severity`; each ``k <= N``; equal scores are
    ranked by class index (:func:`ranked_topk`).
    """
    ks = _check_ks(ks)
    scores, target = _scores_and_target(scores, target, ignore_index)
    _nonempty(target.numel(), "hierarchical_distance_topk")
    n = scores.shape[1]
    for k in ks:
        if k > n:
            raise ValueError(f"k = {k} exceeds the number of classes N = {n}")
    fn = _distance_fn(distance, n)
    top = ranked_topk(scores, max(ks))
    d = _pair_distance(fn, top, target.unsqueeze(1))  # [M, max k]
    return {k: float(d[:, :k].mean()) for k in ks}


# ---------------------------------------------------------------------------
# Reassignment of classes by the adaptation of Ψ (Table II)
# ---------------------------------------------------------------------------


@dataclass
class LevelReassignment:
    """The moves of one upper level (1-based ``level``, top = 1).

    ``initial`` / ``adapted`` are int64 ``[N]`` group ids (-1: the class has no
    group in the adapted Ψ, its column is zero); ``moved`` the classes whose
    group changed, ``share`` their fraction of the N classes.
    """

    level: int
    num_groups: int
    initial: Tensor
    adapted: Tensor
    moved: Tensor = field(init=False)
    share: float = field(init=False)

    def __post_init__(self) -> None:
        self.moved = (self.initial != self.adapted).nonzero().flatten()
        n = self.initial.numel()
        self.share = self.moved.numel() / n if n else math.nan

    def group(self, group: int) -> dict[str, list[int]]:
        """Table II for one group: ``stayed`` (initially there and still there),
        ``joined`` (moved in by the adaptation) and ``left`` (moved out)."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group must be in [0, {self.num_groups}) at level {self.level}, got {group}")
        was, now = self.initial == group, self.adapted == group
        return {
            "stayed": (was & now).nonzero().flatten().tolist(),
            "joined": (~was & now).nonzero().flatten().tolist(),
            "left": (was & ~now).nonzero().flatten().tolist(),
        }

    def changes_per_group(self) -> Tensor:
        """int64 ``[num_groups]``: classes that joined or left each group."""
        moved_from = self.initial[self.moved]
        moved_to = self.adapted[self.moved]
        out = torch.bincount(moved_from[moved_from >= 0], minlength=self.num_groups)
        joined = moved_to[moved_to >= 0]
        return out + torch.bincount(joined, minlength=self.num_groups)


@dataclass
class ReassignmentReport:
    """Per upper level, which classes the adaptation moved (see :func:`reassignment_report`)."""

    levels: list[LevelReassignment]
    class_names: list[str] | None = None

    @property
    def shares(self) -> list[float]:
        """Fraction of the classes moved, per upper level (the paper: about 20%)."""
        return [level.share for level in self.levels]

    def _name(self, y: int) -> str:
        return self.class_names[y] if self.class_names else str(y)

    def format_group(self, level: int, group: int) -> str:
        """Table II for one group of a level (1-based level)."""
        entry = self.levels[level - 1].group(group)
        lines = [f"level {level}, group {group}:"]
        for key in ("stayed", "joined", "left"):
            names = ", ".join(self._name(y) for y in entry[key]) or "-"
            lines.append(f"  {key:>6} ({len(entry[key])}): {names}")
        return "\n".join(lines)

    def to_text(self, max_groups: int = 5) -> str:
        """A summary: classes moved per level, and the ``max_groups`` groups
        with the most changes of each level in Table II form."""
        lines = []
        for entry in self.levels:
            n = entry.initial.numel()
            lines.append(
                f"level {entry.level}: {entry.moved.numel()} of {n} classes moved "
                f"({100 * entry.share:.1f}%) among {entry.num_groups} groups"
            )
            changes = entry.changes_per_group()
            busiest = torch.argsort(changes, descending=True, stable=True)[:max_groups]
            for group in busiest.tolist():
                if int(changes[group]) == 0:
                    break
                lines.append("  " + self.format_group(entry.level, group).replace("\n", "\n  "))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _groups_of(value: Any, num_classes: int | None, name: str) -> tuple[Tensor, int]:
    """Group id per class (and the number of groups) from an assignment or a Ψ."""
    t = _as_tensor(value, name)
    if t.dim() == 1:
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"{name} as an assignment must hold integer group ids, got {t.dtype}")
        t = t.to(torch.int64).cpu()
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name} has negative group ids")
        return t, (int(t.max()) + 1 if t.numel() else 0)
    if t.dim() == 2:
        if not t.is_floating_point():
            t = t.to(torch.float64)
        t = t.detach().cpu()
        if bool(torch.isnan(t).any()) or bool((t < 0).any()):
            raise ValueError(f"{name} as Ψ [N_l, N] must be non-negative and free of NaN")
        groups = t.argmax(dim=0)
        groups = torch.where(t.amax(dim=0) > 0, groups, torch.full_like(groups, -1))
        return groups, t.shape[0]
    raise ValueError(f"{name} must be an [N] assignment or an [N_l, N] Ψ, got shape {tuple(t.shape)}")


def _levels_of(value: Any, name: str) -> list[Any]:
    if hasattr(value, "psi") and hasattr(value, "psi_t"):  # a FusedLMMLoss
        return list(value.psi)
    if hasattr(value, "assignments") and hasattr(value, "level_sizes"):  # a Hierarchy
        if getattr(value, "is_dense", False):
            return list(value.psi())
        return list(value.assignments)
    if isinstance(value, (Tensor,)) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be a Hierarchy, a FusedLMMLoss, or a list (one per upper level) of [N] "
            f"assignments or [N_l, N] Ψ matrices, got {type(value).__name__}"
        )
    return list(value)


def reassignment_report(
    initial: Any, adapted: Any, *, class_names: Sequence[str] | None = None
) -> ReassignmentReport:
    """Which classes moved between groups, per upper level (the paper's Table II).

    Args:
        initial: the pre-trained hierarchy: a :class:`~lmm_fast.Hierarchy`, or a
            list of ``[N]`` assignments or ``[N_l, N]`` Ψ, one per upper level.
        adapted: the same after adaptation, e.g. the :class:`~lmm_fast.FusedLMMLoss`
            whose Ψ was adapted (its ``psi``), or a list as above.
        class_names: optional N names for the text output (default: the
            initial hierarchy's names, if any).

    A class's group under a Ψ is its best one, ``argmax_t Ψ[t, y]`` (the group
    the non-overlapping constraint keeps; the lowest index on ties), and -1 when
    its column is zero. Group ids must mean the same groups in both (the
    adaptation keeps them).
    """
    first = _levels_of(initial, "initial")
    second = _levels_of(adapted, "adapted")
    if len(first) != len(second):
        raise ValueError(f"initial has {len(first)} upper levels but adapted has {len(second)}")
    if class_names is None and hasattr(initial, "class_names"):
        class_names = initial.class_names
    levels = []
    n = None
    for index, (a, b) in enumerate(zip(first, second)):
        before, k1 = _groups_of(a, n, f"initial[{index}]")
        after, k2 = _groups_of(b, n, f"adapted[{index}]")
        if n is None:
            n = before.numel()
        if before.numel() != n or after.numel() != n:
            raise ValueError(
                f"level {index + 1}: initial covers {before.numel()} classes and adapted {after.numel()}, expected {n}"
            )
        levels.append(LevelReassignment(index + 1, max(k1, k2), before, after))
    if class_names is not None and n is not None and len(class_names) != n:
        raise ValueError(f"class_names has {len(class_names)} names for {n} classes")
    return ReassignmentReport(levels, None if class_names is None else list(class_names))
