"""Adaptation that cannot wreck the tree: β per class from the class counts
(:func:`scaled_beta`) and :class:`GuardedGibbsAdapter`, which refuses a Gibbs
step that would leave more than a set share of a level's groups empty and
undoes it from the log of the step's own moves."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from lmm_fast.adaptation.adapter import GibbsAdapter, run_eagerly

if TYPE_CHECKING:
    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.loss import FusedLMMLoss

__all__ = ["scaled_beta", "empty_groups", "GuardedGibbsAdapter"]


def scaled_beta(train_targets: Tensor, h: Hierarchy, strength: float = 0.1) -> Tensor:
    """β per class from the class counts: ``β_y = strength · Ξ_y / G``.

    ``Ξ_y`` is the number of training images of class ``y`` and ``G`` the
    number of groups of the finest upper level, so ``β_0 = Σ_y β_y =
    strength · Ξ / G``: ``strength`` times the mean image count of a group
    of that level (the smallest groups, the ones a large prior swamps). The
    prior spreads its mass like the data (a rare class gets a small β_y, so it
    is not outweighed in its own group), whatever N is, where the paper's
    constant β gives ``β_0 = N β``. ``strength = 0.1`` (the default): the
    prior is a tenth of a typical group's evidence. A class with no image
    gets the smallest positive β of the others (β must be positive).

    Returns a float32 ``[N]`` tensor for ``GibbsAdapter(beta=...)``
    (``prior="per_class"``).
    """
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive finite number, got {strength!r}")
    if not getattr(h, "level_sizes", None):
        raise ValueError("h must be a hierarchy with at least one upper level (level_sizes)")
    if not isinstance(train_targets, Tensor) or train_targets.dim() != 1 or train_targets.is_floating_point():
        raise TypeError("train_targets must be a 1-D integer tensor [Ξ]")
    n = int(h.num_classes)
    if train_targets.numel() == 0:
        raise ValueError("train_targets is empty")
    if int(train_targets.min()) < 0 or int(train_targets.max()) >= n:
        raise ValueError(f"train_targets must hold classes in [0, {n})")
    counts = torch.bincount(train_targets.long().cpu(), minlength=n).double()
    groups = int(h.level_sizes[-1])
    beta = strength * counts / groups
    if bool((beta == 0).any()):
        beta[beta == 0] = beta[beta > 0].min()
    return beta.to(torch.float32)


def empty_groups(adapter: GibbsAdapter) -> list[int]:
    """Per upper level, the number of groups that are *empty*: no image
    carries their label, or no class has them as its best group
    (``argmax_t Ψ^l[t, y]``), so that under the non-overlapping constraint
    they own no class."""
    out = []
    psi = adapter.loss_fn.psi
    for counts, p in zip(adapter.counts, psi):
        no_images = counts.sum(dim=1) == 0
        owned = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        owned[p.argmax(dim=0)] = True
        out.append(int((no_images.to(owned.device) | ~owned).sum()))
    return out


class GuardedGibbsAdapter(GibbsAdapter):
    """:class:`~lmm_fast.GibbsAdapter` with a guard against groups emptying
    en masse, and ``beta="scaled"``.

    Args (besides :class:`~lmm_fast.GibbsAdapter`'s):
        beta: as :class:`~lmm_fast.GibbsAdapter`, or ``"scaled"`` (the
            default): :func:`scaled_beta` with ``beta_strength``.
        beta_strength: ``strength`` of :func:`scaled_beta`.
        max_empty_share: a step is refused (undone: labels, Ω and Ψ restored,
            the step counter still advanced so the next draw differs) when
            after it some level has more than this share of its groups
            empty (:func:`empty_groups`) *and* more empty groups than before
            the step. Empties already there are tolerated; the guard only
            stops them from growing past the threshold. ``1.0`` disables it.

    Attributes: ``refused_steps`` (int), ``last_empty`` (empty groups per
    level after the last accepted step).

    Cost: the step logs its own moves (``O(B)`` labels) and a refused step is
    undone by moving the same images back, which restores the labels, Ω and
    Ψ exactly (Ψ is a function of the counts; only the first step, which
    replaces the hierarchy's Ψ by the adapted one, keeps a copy of the loss's
    Ψ to put back). The emptiness check reads Ψ once per step
    (:func:`empty_groups`, ``O(N · ΣN_l)``, like one prediction pass).
    """

    def __init__(self, loss_fn: FusedLMMLoss, h: Hierarchy, train_targets: Tensor, beta: float | Tensor | str = "scaled",
                 non_overlapping: bool = False, seed: int = 0, *, beta_strength: float = 0.1,
                 max_empty_share: float = 0.25, **kwargs: Any) -> None:
        if isinstance(beta, str):
            if beta != "scaled":
                raise ValueError(f"beta must be a positive float, an [N] tensor or 'scaled', got {beta!r}")
            beta = scaled_beta(torch.as_tensor(train_targets), h, beta_strength)
        if not (isinstance(max_empty_share, (int, float)) and 0 <= max_empty_share <= 1):
            raise ValueError(f"max_empty_share must be in [0, 1], got {max_empty_share!r}")
        super().__init__(loss_fn, h, train_targets, beta=beta, non_overlapping=non_overlapping, seed=seed, **kwargs)
        self.max_empty_share = float(max_empty_share)
        self._moves: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        self.refused_steps = 0
        self.last_empty = empty_groups(self)

    def _after_moves(self, indices: Tensor, target: Tensor, old: Tensor, new: Tensor) -> None:
        if self._moves is not None:
            self._moves.append((indices.clone(), target.clone(), old.clone(), new.clone()))
        super()._after_moves(indices, target, old, new)

    @run_eagerly  # as GibbsAdapter.step: one graph break under torch.compile
    @torch.no_grad()
    def step(self, logits: Tensor | Sequence[Tensor], target: Tensor, indices: Tensor, exact: bool = False) -> Tensor:
        if self.max_empty_share >= 1.0:
            return super().step(logits, target, indices, exact=exact)
        # The first step (or one after something else wrote the loss's Ψ)
        # rebuilds Ψ from the counts: only then is there a Ψ to put back that
        # the counts do not determine.
        rebuilds = not self._psi_synced or self._psi_key != self._current_psi_key()
        saved_psi = (self.loss_fn.psi_t.clone(), self.loss_fn.psi_scale.clone()) if rebuilds else None
        empty_before = empty_groups(self)
        self._moves = []
        try:
            new = super().step(logits, target, indices, exact=exact)
        finally:
            moves, self._moves = self._moves, None
        empty_after = empty_groups(self)
        too_many = any(after > self.max_empty_share * size and after > prev
                       for after, prev, size in zip(empty_after, empty_before, self.level_sizes))
        if not too_many:
            self.last_empty = empty_after
            return new
        for image, klass, old, moved in reversed(moves):
            self._apply(klass, image, moved, old)
            super()._after_moves(image, klass, moved, old)
        if saved_psi is not None:
            self.loss_fn.psi_t.copy_(saved_psi[0])
            self.loss_fn.psi_scale.copy_(saved_psi[1])
            self._psi_synced = False
            self._owner = self._numerator = self._kept = self._nonzero = self._bound = None
        self.refused_steps += 1
        # the batch's restored labels; -1 stays on the rows the step skipped
        restored = new.clone()
        sampled = (new >= 0).all(dim=1)
        restored[sampled] = self.labels[torch.as_tensor(indices, device=self.device).long()[sampled]]
        return restored
