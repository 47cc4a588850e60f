"""What the comparison job reports of the decision rules: CRM and hedging
rows, and the accuracy–specificity plot."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from lmm_fast.decide.risk import check_index, check_k, check_target, crm
from lmm_fast.decide.hedge import RULES, HedgeCurve, HedgePolicy


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
        check_k(k, ranking.shape[1])
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

    index, proba = check_index(hierarchy, proba)
    target = check_target(target, proba)
    k = max(ks)
    check_k(k, index.num_classes)
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
