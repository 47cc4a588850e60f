"""Pure-PyTorch oracles of every operator, float64-able, one module per op
family (:mod:`~lmm_fast.reference.loss`, :mod:`~lmm_fast.reference.predict`,
:mod:`~lmm_fast.reference.gibbs`). The tests compare the kernels against
them; the benchmarks time them beside the kernels. The library itself never
calls them."""
from __future__ import annotations

from lmm_fast.reference.loss import lmm_loss_reference, lmm_loss_unfused, predict_proba_reference, split_levels
from lmm_fast.reference.predict import gather_scores_reference, predict_proba_tree_reference, predict_topk_reference

__all__ = [
    "split_levels",
    "lmm_loss_reference",
    "lmm_loss_unfused",
    "predict_proba_reference",
    "predict_proba_tree_reference",
    "predict_topk_reference",
    "gather_scores_reference",
]
