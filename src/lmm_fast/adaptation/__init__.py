"""Bayesian adaptation of the group-object matrix Ψ during training (the
collapsed Gibbs sampler of the paper's Eq. 4-6):

* :mod:`~lmm_fast.adaptation.adapter` — :class:`GibbsAdapter`, one step per
  mini-batch, on one process or under ``torch.distributed``;
* :mod:`~lmm_fast.adaptation.guard` — :class:`GuardedGibbsAdapter`, which
  refuses a step that would empty too many groups, and :func:`scaled_beta`.

docs/adaptation.md describes the sampler, its cost and its determinism.
"""
from __future__ import annotations

from lmm_fast.adaptation.adapter import PRIORS, GibbsAdapter
from lmm_fast.adaptation.guard import GuardedGibbsAdapter, empty_groups, scaled_beta

__all__ = ["GibbsAdapter", "GuardedGibbsAdapter", "PRIORS", "empty_groups", "scaled_beta"]
