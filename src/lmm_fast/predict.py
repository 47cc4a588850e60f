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

References (pure PyTorch, any dtype): ``lmm_fast.reference.predict_proba_reference``,
:func:`predict_proba_tree_reference`, :func:`predict_topk_reference` and
:func:`gather_scores_reference`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lmm_fast import _ops  # noqa: F401  (loads the library, registering the operators)
from lmm_fast._ops import accumulate_dtype
from lmm_fast.reference import predict_proba_reference, split_levels

__all__ = [
    "TreeIndex",
    "tree_index",
    "tree_index_from_assignments",
    "lmm_predict_proba_tree",
    "lmm_predict_proba_dense",
    "lmm_topk_tree",
    "lmm_gather_scores",
    "mixture_proba",
    "predict_topk",
    "predict_proba_tree_reference",
    "predict_topk_reference",
    "gather_scores_reference",
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
        value: float32 ``[L-1, N]``, ``Ψ^l[index[l, y], y]``.
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
    value = torch.zeros(len(upper), num_classes, dtype=torch.float32, device=psi_t.device)
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
            value[level, start : start + chunk] = block.gather(1, where).squeeze(1).to(torch.float32)
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
        value.append((1.0 / counts)[groups].to(torch.float32))
        sizes.append(size)
    if index:
        idx, val = torch.stack(index), torch.stack(value)
    else:
        idx = torch.zeros(0, num_classes, dtype=torch.int32)
        val = torch.zeros(0, num_classes)
    return TreeIndex(idx.to(device), val.to(device), sizes + [int(num_classes)])


# ---------------------------------------------------------------------------
# Typed wrappers of the operators
# ---------------------------------------------------------------------------


def lmm_predict_proba_tree(
    logits: Tensor, group_index: Tensor, group_value: Tensor, theta: Tensor, level_sizes: Sequence[int]
) -> Tensor:
    """``[B, N]`` probabilities ``Σ_l θ_l softmax(a^l) Ψ^l`` for a tree Ψ.

    Args:
        logits: ``[B, ΣN_l]`` packed, top level first (float32/64, float16, bfloat16).
        group_index: int32 ``[L-1, N]``, group of every class per upper level.
        group_value: ``[L-1, N]`` ``Ψ^l[group_index[l, y], y]``, float64 for
            float64 logits, else float32.
        theta: ``[L]`` level weights, or ``[B, L]`` one θ per row (e.g. from a
            gating network), in the dtype of ``group_value``.
        level_sizes: ``[N_1, …, N_{L-1}, N]``.

    Returns:
        ``[B, N]`` in the logits' dtype; differentiable in ``logits`` and ``theta``.
    """
    return torch.ops.lmm_fast.lmm_predict_proba_tree.default(
        logits, group_index, group_value, theta, list(level_sizes)
    )


def lmm_predict_proba_dense(logits: Tensor, psi_t: Tensor, theta: Tensor, level_sizes: Sequence[int]) -> Tensor:
    """``[B, N]`` probabilities for any Ψ, given class-major ``psi_t`` ``[N, ΣN_upper]``
    (the loss's buffer, in the accumulation dtype); ``theta`` ``[L]`` or
    ``[B, L]``. Differentiable in ``logits`` and ``theta``."""
    return torch.ops.lmm_fast.lmm_predict_proba_dense.default(logits, psi_t, theta, list(level_sizes))


def lmm_topk_tree(
    logits: Tensor, group_index: Tensor, group_value: Tensor, theta: Tensor, level_sizes: Sequence[int], k: int
) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable classes of every row under a tree Ψ.

    Arguments as :func:`lmm_predict_proba_tree`; ``0 <= k <= N``.

    Returns:
        ``(values [B, k], indices [B, k])``, best first: probabilities in the
        logits' dtype and int64 classes. On CPU equal probabilities are ordered
        by class index (NaN ranks first, as in ``torch.topk``); on CUDA ties
        follow ``torch.topk``. ``values`` is differentiable.
    """
    return torch.ops.lmm_fast.lmm_topk_tree.default(logits, group_index, group_value, theta, list(level_sizes), int(k))


def lmm_gather_scores(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """``out[b, j] = x[b] · weight[rows[b, j]] + bias[rows[b, j]]``.

    Args:
        x: ``[B, d]`` features; weight: ``[R, d]`` and bias ``[R]`` (or None) of a
            linear layer, all of one floating dtype.
        rows: int64 ``[B, C]`` weight rows per sample in ``[0, R)``, or -1.

    Returns:
        ``[B, C]`` in ``x``'s dtype, ``-inf`` where ``rows`` is -1. Not
        differentiable (used for prediction).
    """
    return torch.ops.lmm_fast.lmm_gather_scores.default(x, weight, bias, rows)


@torch.library.register_fake("lmm_fast::lmm_gather_scores")
def _gather_scores_fake(x, weight, bias, rows):
    torch._check(x.dim() == 2 and rows.dim() == 2, lambda: "lmm_fast: x and rows must be 2-D")
    return x.new_empty((x.shape[0], rows.shape[1]))


@torch.library.register_fake("lmm_fast::lmm_predict_proba_tree")
def _predict_proba_tree_fake(logits, group_index, group_value, theta, level_sizes):
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(logits.shape[1] == sum(level_sizes), lambda: "lmm_fast: logits width != sum(level_sizes)")
    return logits.new_empty((logits.shape[0], level_sizes[-1]))


@torch.library.register_fake("lmm_fast::lmm_predict_proba_dense")
def _predict_proba_dense_fake(logits, psi_t, theta, level_sizes):
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(logits.shape[1] == sum(level_sizes), lambda: "lmm_fast: logits width != sum(level_sizes)")
    return logits.new_empty((logits.shape[0], level_sizes[-1]))


@torch.library.register_fake("lmm_fast::lmm_topk_tree")
def _topk_tree_fake(logits, group_index, group_value, theta, level_sizes, k):
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(0 <= k <= level_sizes[-1], lambda: "lmm_fast: k must be in [0, N]")
    batch = logits.shape[0]
    return logits.new_empty((batch, k)), logits.new_empty((batch, k), dtype=torch.int64)


# Backward of the mixture, in plain PyTorch (prediction is rarely
# differentiated; this keeps predict_proba usable inside a training graph).
# For G = ∂/∂P: upper level l gets g = θ_l G Ψ^lᵀ through the softmax
# Jacobian, the bottom g = θ_L G; ∂/∂θ_l = Σ G ⊙ (z^l Ψ^l).


def _vote_grad(grad: Tensor, level: int, size: int, offset: int, tree: tuple[Tensor, Tensor] | None, psi_t: Tensor | None) -> Tensor:
    """``G Ψ^lᵀ`` ``[B, N_l]``."""
    if tree is not None:
        index, value = tree
        out = grad.new_zeros(grad.shape[0], size)
        return out.index_add_(1, index[level].long(), grad * value[level].to(grad.dtype))
    return grad @ psi_t[:, offset : offset + size].to(grad.dtype)


def _mixture_backward(grad: Tensor, logits: Tensor, theta: Tensor, level_sizes: Sequence[int], tree, psi_t):
    acc = accumulate_dtype(logits.dtype)
    grad = grad.to(acc)
    theta_acc = theta.to(acc)
    per_row = theta.dim() == 2
    grad_levels, grad_theta = [], []
    offset = 0
    for level, a in enumerate(split_levels(logits, level_sizes)):
        z = torch.softmax(a.to(acc), dim=1)
        if level == len(level_sizes) - 1:
            g = grad
        else:
            g = _vote_grad(grad, level, level_sizes[level], offset, tree, psi_t)
            offset += level_sizes[level]
        grad_theta.append((z * g).sum(dim=1) if per_row else (z * g).sum())
        g = (theta_acc[:, level : level + 1] if per_row else theta_acc[level]) * g
        grad_levels.append(z * (g - (g * z).sum(dim=1, keepdim=True)))
    grad_theta = torch.stack(grad_theta, dim=-1)
    return torch.cat(grad_levels, dim=1).to(logits.dtype), grad_theta.to(theta.dtype)


def _proba_tree_setup(ctx, inputs, output):
    logits, group_index, group_value, theta, level_sizes = inputs
    ctx.save_for_backward(logits, group_index, group_value, theta)
    ctx.level_sizes = list(level_sizes)


def _proba_tree_backward(ctx, grad):
    logits, group_index, group_value, theta = ctx.saved_tensors
    grad_logits, grad_theta = _mixture_backward(
        grad, logits, theta, ctx.level_sizes, (group_index, group_value), None
    )
    return (
        grad_logits if ctx.needs_input_grad[0] else None,
        None,
        None,
        grad_theta if ctx.needs_input_grad[3] else None,
        None,
    )


def _proba_dense_setup(ctx, inputs, output):
    logits, psi_t, theta, level_sizes = inputs
    ctx.save_for_backward(logits, psi_t, theta)
    ctx.level_sizes = list(level_sizes)


def _proba_dense_backward(ctx, grad):
    logits, psi_t, theta = ctx.saved_tensors
    grad_logits, grad_theta = _mixture_backward(grad, logits, theta, ctx.level_sizes, None, psi_t)
    return (
        grad_logits if ctx.needs_input_grad[0] else None,
        None,
        grad_theta if ctx.needs_input_grad[2] else None,
        None,
    )


def _topk_setup(ctx, inputs, output):
    logits, group_index, group_value, theta, level_sizes, k = inputs
    _, indices = output
    ctx.save_for_backward(logits, group_index, group_value, theta, indices)
    ctx.level_sizes = list(level_sizes)
    ctx.mark_non_differentiable(indices)


def _topk_backward(ctx, grad_values, grad_indices):
    logits, group_index, group_value, theta, indices = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None, None, None
    grad = grad_values.new_zeros(logits.shape[0], ctx.level_sizes[-1]).scatter_(1, indices, grad_values)
    grad_logits, grad_theta = _mixture_backward(
        grad, logits, theta, ctx.level_sizes, (group_index, group_value), None
    )
    return (
        grad_logits if ctx.needs_input_grad[0] else None,
        None,
        None,
        grad_theta if ctx.needs_input_grad[3] else None,
        None,
        None,
    )


torch.library.register_autograd(
    "lmm_fast::lmm_predict_proba_tree", _proba_tree_backward, setup_context=_proba_tree_setup
)
torch.library.register_autograd(
    "lmm_fast::lmm_predict_proba_dense", _proba_dense_backward, setup_context=_proba_dense_setup
)
torch.library.register_autograd("lmm_fast::lmm_topk_tree", _topk_backward, setup_context=_topk_setup)


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
    theta = (loss_fn.theta if theta is None else theta).to(device=logits.device, dtype=acc)
    tree = tree_index(loss_fn.effective_psi_t(), loss_fn.level_sizes)
    if tree is not None:
        return lmm_topk_tree(logits, tree.index, tree.value_as(acc), theta, loss_fn.level_sizes, k)
    proba = lmm_predict_proba_dense(logits, loss_fn.effective_psi_t().to(acc), theta, loss_fn.level_sizes)
    return torch.topk(proba, k, dim=1)


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def predict_proba_tree_reference(
    logits: Tensor, group_index: Tensor, group_value: Tensor, theta: Tensor, level_sizes: Sequence[int]
) -> Tensor:
    """Pure-PyTorch oracle of :func:`lmm_predict_proba_tree` (dense Ψ rebuilt)."""
    tree = TreeIndex(group_index, group_value, list(level_sizes))
    return predict_proba_reference(logits, tree.to_psi(logits.dtype), theta)


def predict_topk_reference(
    logits: Tensor | Sequence[Tensor], psi: Sequence[Tensor], theta: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch oracle of the top-k: full probabilities, then a stable
    descending sort, so equal probabilities are ordered by class index."""
    proba = predict_proba_reference(logits, psi, theta)
    values, indices = torch.sort(proba, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def gather_scores_reference(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """Pure-PyTorch oracle of :func:`lmm_gather_scores` (gathers a ``[B, C, d]`` copy)."""
    safe = rows.clamp_min(0)
    out = torch.bmm(weight[safe], x.unsqueeze(2)).squeeze(2)
    if bias is not None:
        out = out + bias[safe]
    return out.masked_fill(rows < 0, float("-inf"))
