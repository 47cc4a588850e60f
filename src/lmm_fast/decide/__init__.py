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

Modules: :mod:`~lmm_fast.decide.risk` (the decision index, node
probabilities, expected distance, CRM), :mod:`~lmm_fast.decide.hedge`
(hedging), :mod:`~lmm_fast.decide.report` (rows and plot for the comparison
job). References (pure PyTorch, float64, ``N × N``):
:mod:`lmm_fast.reference.decide`.
"""
from __future__ import annotations

from lmm_fast.decide.risk import (MAX_NON_NESTED_LEVELS, DecisionIndex, crm, decision_index, expected_distance,
                                 node_probabilities)
from lmm_fast.decide.hedge import RULES, HedgeAnswer, HedgeCurve, HedgePolicy, conformal_rank, hedge_curve
from lmm_fast.decide.report import (calibration_split, crm_report, hedge_report, plot_accuracy_specificity,
                                    ranking_report)

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
]
