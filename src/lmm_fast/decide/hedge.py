"""Hedging: the deepest node whose probability clears a threshold, the
threshold fit on held-out rows with a finite-sample guarantee."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from lmm_fast.decide.risk import (DecisionIndex, cell_proba, check_index, check_target, decision_index, group_proba,
                                 row_chunks)

RULES = ("hedge", "top_class", "top_class_coarse")


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


def node_levels(proba: Tensor, index: DecisionIndex, atol: float) -> tuple[Tensor, Tensor]:
    """Per row and level 0..L: the most probable node's probability and id (root: 1, 0)."""
    probs, nodes = [], []
    for offset, block in row_chunks(proba):
        cells = cell_proba(block, index, atol, offset)
        rows = block.shape[0]
        level_probs = [block.new_ones(rows)]
        level_nodes = [torch.zeros(rows, dtype=torch.int64, device=block.device)]
        for mapping, size in zip(index.level_of_cell, index.level_sizes):
            value, node = group_proba(cells, mapping, size).max(dim=1)
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


def gate_values(probs: Tensor, rule: str) -> Tensor:
    """``[B, L+1]`` float64: a level is eligible at threshold τ when its gate exceeds τ."""
    level_gates = probs.to(torch.float64, copy=True)
    levels = level_gates.shape[1] - 1
    level_gates[:, 0] = math.inf  # the root is always a valid answer
    if rule == "top_class":
        level_gates[:, 1:levels] = -math.inf
    elif rule == "top_class_coarse":
        level_gates[:, 1 : levels - 1] = -math.inf
        level_gates[:, levels - 1] = math.inf
    return level_gates


def correct_nodes(nodes: Tensor, target: Tensor, index: DecisionIndex) -> Tensor:
    """``[B, L+1]`` bool: the most probable node of each level contains the true class."""
    truth = [torch.zeros_like(target)]
    truth += [m[index.cell[target]] for m in index.level_of_cell]
    truth.append(target)
    return nodes == torch.stack(truth, dim=1)


def _answer_levels(level_gates: Tensor, threshold: float | Tensor) -> Tensor:
    """Deepest eligible level per row; the root (0) when none is, e.g. at τ = +inf."""
    depth = torch.arange(level_gates.shape[-1], device=level_gates.device)
    if isinstance(threshold, Tensor):
        eligible = level_gates.unsqueeze(0) > threshold.view(-1, 1, 1)
    else:
        eligible = level_gates > threshold
    return torch.where(eligible, depth, torch.zeros_like(depth)).amax(dim=-1)


def wrong_scores(level_gates: Tensor, correct: Tensor) -> Tensor:
    """Per row, ``t = sup{τ : the answer at some τ' >= τ is wrong}`` (−inf if never).

    ``1[τ < t]`` is the smallest non-increasing bound on the row's 0/1 error
    as a function of the threshold; it equals the error itself unless a
    deeper answer is right while a coarser one is wrong (impossible on a tree
    once the threshold exceeds 1/2).
    """
    suffix = level_gates.flip(1).cummax(dim=1).values.flip(1)
    deeper = torch.cat([suffix[:, 1:], torch.full_like(suffix[:, :1], -math.inf)], dim=1)
    reachable = level_gates > deeper
    return torch.where(reachable & ~correct, level_gates, torch.full_like(level_gates, -math.inf)).amax(dim=1)


def _alpha(accuracy: Any) -> Fraction:
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float, Fraction)) or not 0 < accuracy < 1:
        raise ValueError(f"accuracy must be a number in (0, 1), got {accuracy!r}")
    # The decimal the user wrote: 0.9 means 9/10, so (n + 1)·α is not rounded down by float error.
    return 1 - (Fraction(accuracy) if isinstance(accuracy, Fraction) else Fraction(repr(float(accuracy))))


def binomial_cdf(n: int, p: float) -> Tensor:
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
    cdf = binomial_cdf(n, float(alpha))
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
        index, proba = check_index(hierarchy, proba_val, "proba_val")
        target = check_target(y_val, proba, "y_val")
        _check_rule(rule)
        n = proba.shape[0]
        rank = conformal_rank(n, accuracy, delta)
        probs, nodes = node_levels(proba, index, atol)
        level_gates = gate_values(probs, rule)
        correct = correct_nodes(nodes, target, index)
        scores = torch.sort(wrong_scores(level_gates, correct), descending=True).values
        if rank < 0:
            threshold = math.inf
        elif rank >= n:
            threshold = -math.inf
        else:
            threshold = float(scores[rank])
        policy = cls(hierarchy, threshold, float(accuracy), rule, delta, n, rank, math.nan, atol)
        if n:
            level = _answer_levels(level_gates, threshold)
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
        index, proba = check_index(self.hierarchy, proba)
        probs, nodes = node_levels(proba, index, self.atol)
        level = _answer_levels(gate_values(probs, self.rule), self.threshold).unsqueeze(1)
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
        target = check_target(target, proba.detach(), "target")
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
    index, proba = check_index(hierarchy, proba)
    target = check_target(target, proba)
    _check_rule(rule)
    if not target.numel():
        raise ValueError("hedge_curve: no rows")
    probs, nodes = node_levels(proba, index, atol)
    level_gates = gate_values(probs, rule)
    correct = correct_nodes(nodes, target, index).to(torch.float64)
    if thresholds is None:
        finite = level_gates[:, 1:][torch.isfinite(level_gates[:, 1:])]
        grid = torch.quantile(finite[:1 << 24], torch.linspace(0, 1, 255, dtype=torch.float64, device=finite.device))
        inf = torch.tensor([-math.inf, math.inf], dtype=torch.float64, device=level_gates.device)
        thresholds = torch.unique(torch.cat([inf, grid]))
    else:
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=level_gates.device).flatten()
        thresholds = torch.sort(thresholds).values
    bottom = index.num_levels
    out = {key: [] for key in ("accuracy", "class_share", "mean_depth", "root_share")}
    step = max(1, (1 << 24) // max(1, level_gates.numel()))
    for start in range(0, thresholds.numel(), step):
        level = _answer_levels(level_gates, thresholds[start : start + step])  # [T, B]
        hit = correct.unsqueeze(0).expand(level.shape[0], -1, -1).gather(2, level.unsqueeze(2)).squeeze(2)
        out["accuracy"].append(hit.mean(dim=1))
        out["class_share"].append((level == bottom).to(torch.float64).mean(dim=1))
        out["mean_depth"].append(level.to(torch.float64).mean(dim=1))
        out["root_share"].append((level == 0).to(torch.float64).mean(dim=1))
    return HedgeCurve(rule, bottom, thresholds.cpu(), *(torch.cat(out[key]).cpu() for key in out))


# ---------------------------------------------------------------------------
