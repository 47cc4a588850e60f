"""Prediction with a level-wise mixture: class probabilities and top-k classes.

``P(y | x) = Σ_l θ_l softmax(a^l) Ψ^l`` (the bottom Ψ is the identity) needs
the whole ``[B, N]`` row, unlike the loss. Two fused kernels compute it
without forming a ``[B, N]`` tensor per level:

* **tree Ψ** (every column of every upper Ψ^l has at most one non-zero: a
  hierarchy's initial Ψ, or Ψ after adaptation with the non-overlapping
  constraint): the upper levels' ``θ_l z^l`` are gathered through the
  class → group map (:func:`lmm_predict_proba_tree`, :func:`lmm_topk_tree`);
* **dense Ψ**: one GEMM for all upper levels (:func:`lmm_predict_proba_dense`).

:func:`lmm_gather_scores` scores a few weight rows per sample in place, for the
coarse-to-fine search of :meth:`lmm_fast.LMMHead.predict_topk`.

:func:`tree_index` detects the tree structure of the loss's class-major
``psi_t`` once and caches it until ``psi_t`` is written to (``psi_t._version``)
or replaced. :func:`mixture_proba` and :func:`predict_topk` pick the kernel.

The operators' wrappers live in :mod:`lmm_fast.ops.predict`; their
pure-PyTorch oracles (any dtype) in :mod:`lmm_fast.reference.predict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lmm_fast.ops import accumulate_dtype
from lmm_fast.ops.predict import lmm_predict_proba_dense, lmm_predict_proba_tree, lmm_topk_tree

__all__ = [
    "TreeIndex",
    "tree_index",
    "tree_index_from_assignments",
    "mixture_proba",
    "predict_topk",
    "path_score_proba",
]


# ---------------------------------------------------------------------------
# Tree form of Ψ
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class TreeIndex:
    """Ψ with at most one non-zero per column and upper level, level-major.

    Attributes:
        index: int32 ``[L-1, N]``, the group of every class per upper level
            (0 for a class in no group of that level; its value is then 0).
        value: ``[L-1, N]``, ``Ψ^l[index[l, y], y]``: float64 when Ψ is held
            in float64 (or built from assignments, exact to float64), else
            float32; :meth:`value_as` gives it in the dtype a kernel needs.
        level_sizes: ``[N_1, …, N_{L-1}, N]``.
    """

    index: Tensor
    value: Tensor
    level_sizes: list[int]
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return self.level_sizes[-1]

    def value_as(self, dtype: torch.dtype) -> Tensor:
        """``value`` in ``dtype`` (kept, as prediction asks for it per call)."""
        if dtype == self.value.dtype:
            return self.value
        key = ("value", dtype)
        if key not in self._cache:
            self._cache[key] = self.value.to(dtype)
        return self._cache[key]

    def to_psi(self, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """The dense ``[N_l, N]`` matrices this index stands for."""
        classes = torch.arange(self.num_classes, device=self.index.device)
        out = []
        for level, size in enumerate(self.level_sizes[:-1]):
            p = torch.zeros(size, self.num_classes, dtype=dtype, device=self.index.device)
            p[self.index[level].long(), classes] = self.value[level].to(dtype)
            out.append(p)
        return out


_TREE_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _detect_tree(psi_t: Tensor, level_sizes: Sequence[int], chunk: int = 8192) -> TreeIndex | None:
    num_classes = psi_t.shape[0]
    upper = list(level_sizes[:-1])
    index = torch.zeros(len(upper), num_classes, dtype=torch.int32, device=psi_t.device)
    # float64 Ψ keeps its values (a float64 prediction must not round Ψ to float32)
    dtype = torch.float64 if psi_t.dtype == torch.float64 else torch.float32
    value = torch.zeros(len(upper), num_classes, dtype=dtype, device=psi_t.device)
    offset = 0
    for level, size in enumerate(upper):
        # Chunks of classes bound the boolean temporary for large N.
        for start in range(0, num_classes, chunk):
            block = psi_t[start : start + chunk, offset : offset + size]
            nonzero = block != 0
            if bool((nonzero.sum(dim=1) > 1).any()):
                return None
            where = nonzero.to(torch.uint8).argmax(dim=1, keepdim=True)
            index[level, start : start + chunk] = where.squeeze(1).to(torch.int32)
            value[level, start : start + chunk] = block.gather(1, where).squeeze(1).to(dtype)
        offset += size
    return TreeIndex(index, value, [int(s) for s in level_sizes])


def tree_index(psi_t: Tensor, level_sizes: Sequence[int]) -> TreeIndex | None:
    """The tree form of a class-major ``psi_t`` ``[N, ΣN_upper]``, or ``None``
    when some column of some Ψ^l has more than one non-zero (dense Ψ).

    Cached per ``psi_t`` tensor; an in-place write (``psi_t._version``), a new
    storage or a new device makes it recompute. ``level_sizes`` lists all
    levels, bottom (N) last.
    """
    sizes = [int(s) for s in level_sizes]
    key = (psi_t._version, psi_t.data_ptr(), psi_t.device, psi_t.dtype, tuple(psi_t.shape), tuple(sizes))
    hit = _TREE_CACHE.get(psi_t)
    if hit is not None and hit[0] == key:
        return hit[1]
    found = _detect_tree(psi_t.detach(), sizes)
    _TREE_CACHE[psi_t] = (key, found)
    return found


def tree_index_from_assignments(
    assignments: Sequence[Tensor], num_classes: int, device: torch.device | str | None = None
) -> TreeIndex:
    """The tree index of a hierarchy's initial Ψ (``Ψ[t, y] = 1/C_t``) straight
    from its assignments (one long ``[N]`` per upper level), without forming Ψ."""
    index, value, sizes = [], [], []
    for groups in assignments:
        groups = torch.as_tensor(groups).to(torch.int64).cpu()
        size = int(groups.max()) + 1 if groups.numel() else 0
        counts = torch.bincount(groups, minlength=size).to(torch.float64)
        index.append(groups.to(torch.int32))
        value.append((1.0 / counts)[groups])  # float64: value_as rounds it once per dtype
        sizes.append(size)
    if index:
        idx, val = torch.stack(index), torch.stack(value)
    else:
        idx = torch.zeros(0, num_classes, dtype=torch.int32)
        val = torch.zeros(0, num_classes, dtype=torch.float64)
    return TreeIndex(idx.to(device), val.to(device), sizes + [int(num_classes)])


# ---------------------------------------------------------------------------
# Dispatch from the loss's state
# ---------------------------------------------------------------------------


def _check_logits(logits: Tensor, psi_t: Tensor) -> torch.dtype:
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.device != psi_t.device:
        raise ValueError(
            f"logits are on {logits.device} but Ψ is on {psi_t.device}; "
            f"move the loss (or head) with .to({str(logits.device)!r})"
        )
    return accumulate_dtype(logits.dtype)


def mixture_proba(logits: Tensor, psi_t: Tensor, theta: Tensor, level_sizes: Sequence[int]) -> Tensor:
    """``[B, N]`` class probabilities from packed ``logits`` ``[B, ΣN_l]``, the
    loss's class-major ``psi_t`` ``[N, ΣN_upper]`` and θ ``[L]`` or ``[B, L]``:
    the gather kernel when Ψ is a tree (detected once, cached), else the GEMM
    kernel."""
    acc = _check_logits(logits, psi_t)
    theta = theta.to(acc)
    tree = tree_index(psi_t, level_sizes)
    if tree is not None:
        return lmm_predict_proba_tree(logits, tree.index, tree.value_as(acc), theta, level_sizes)
    return lmm_predict_proba_dense(logits, psi_t.to(acc), theta, level_sizes)


def predict_topk(
    logits: Tensor | Sequence[Tensor], loss_fn: Any, k: int = 5, *, theta: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable classes under a loss's mixture (its Ψ and θ).

    Args:
        logits: ``[B, ΣN_l]`` packed or a list of ``[B, N_l]``.
        loss_fn: a :class:`~lmm_fast.FusedLMMLoss` (Ψ and θ are read from it).
        k: ``0 <= k <= N``.
        theta: overrides the loss's θ: ``[L]``, or ``[B, L]`` one per row
            (e.g. from a gating network).

    Returns:
        ``(values [B, k], indices [B, k])``, best first. A tree Ψ uses the
        partial-selection kernel; a dense Ψ the GEMM kernel and ``torch.topk``.
    """
    logits = loss_fn.pack(logits)
    n = loss_fn.level_sizes[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, N] = [0, {n}], got {k!r}")
    acc = _check_logits(logits, loss_fn.psi_t)
    if theta is not None:  # checked as the loss checks its own override (lmm_fast.loss.check_row_theta)
        theta = loss_fn._row_theta(theta, logits.device, logits.shape[0])
    theta = (loss_fn.theta if theta is None else theta).to(device=logits.device, dtype=acc)
    tree = tree_index(loss_fn.effective_psi_t(), loss_fn.level_sizes)
    if tree is not None:
        return lmm_topk_tree(logits, tree.index, tree.value_as(acc), theta, loss_fn.level_sizes, k)
    proba = lmm_predict_proba_dense(logits, loss_fn.effective_psi_t().to(acc), theta, loss_fn.level_sizes)
    return torch.topk(proba, k, dim=1)


def path_score_proba(
    logits: Tensor | Sequence[Tensor],
    assignments: Sequence[Tensor],
    level_sizes: Sequence[int] | None = None,
) -> Tensor:
    """Product-of-levels scorer: ``P(y | x) ∝ Π_l softmax(a^l)[g_l(y)]``.

    Args:
        logits: packed ``[B, N_1 + … + N_{L-1} + N]`` or a per-level list.
        assignments: one long ``[N]`` tensor per upper level, the group
            ``g_l(y)`` of every class (``Hierarchy.assignments``: a tree).
        level_sizes: ``[N_1, …, N_{L-1}, N]`` (needed for packed logits;
            default: from the assignments, ``max + 1`` per level).

    Returns ``[B, N]`` float32, rows on the simplex (normalised over classes,
    in log space). Unlike the mixture it is not capped: a class can reach
    probability 1 when every level agrees; its argmax is the class whose
    whole path scores best.
    """
    if isinstance(assignments, Tensor) or len(assignments) == 0:
        raise ValueError("assignments must be a non-empty list of [N] group ids, one per upper level")
    groups = [torch.as_tensor(a).long() for a in assignments]
    n = groups[0].numel()
    for l, g in enumerate(groups):
        if g.dim() != 1 or g.numel() != n:
            raise ValueError(f"assignments[{l}] must be [N] = [{n}], got shape {tuple(g.shape)}")
        if int(g.min()) < 0:
            raise ValueError(f"assignments[{l}] has a negative group id: path scores need a tree (every class in one group)")
    if level_sizes is None:
        level_sizes = [int(g.max()) + 1 for g in groups] + [n]
    level_sizes = [int(s) for s in level_sizes]
    if len(level_sizes) != len(groups) + 1 or level_sizes[-1] != n:
        raise ValueError(f"level_sizes must list the {len(groups)} upper levels and N = {n} last, got {level_sizes}")
    if isinstance(logits, (list, tuple)):
        parts = list(logits)
    else:
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != sum(level_sizes):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be [B, {sum(level_sizes)}] (levels {level_sizes} packed), got {shape}")
        parts = list(torch.split(logits, level_sizes, dim=1))
    if len(parts) != len(level_sizes) or any(p.shape[1] != s for p, s in zip(parts, level_sizes)):
        raise ValueError(f"logits must hold levels of sizes {level_sizes}")
    for l, (g, s) in enumerate(zip(groups, level_sizes)):
        if int(g.max()) >= s:
            raise ValueError(f"assignments[{l}] has group {int(g.max())} but level {l} has {s} groups")
    score = F.log_softmax(parts[-1].float(), dim=1)
    for part, g in zip(parts[:-1], groups):
        score = score + F.log_softmax(part.float(), dim=1)[:, g.to(part.device)]
    return torch.softmax(score, dim=1)
