"""Typed wrappers of the prediction operators (``torch.ops.lmm_fast.lmm_predict_proba_tree``,
``lmm_predict_proba_dense``, ``lmm_topk_tree``, ``lmm_gather_scores``), with their
fake kernels (needed by ``torch.compile`` and ``torch.export``) and their
autograd formulas registered through ``torch.library``.

Kernels: ``csrc/cpu/predict_cpu.cpp`` and ``csrc/cuda/predict_cuda.cu``;
oracles: :mod:`lmm_fast.reference.predict`.

At export (``torch.export``, ``torch.onnx.export``) each wrapper writes its
operator as standard ATen ops instead (the ``*_decomposed`` functions below,
selected by :func:`exporting`), so that an exported program or ONNX graph
runs in any runtime without this library; ``torch.compile`` keeps the fused
kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lmm_fast.ops.library import accumulate_dtype, check_one_device

__all__ = [
    "lmm_predict_proba_tree",
    "lmm_predict_proba_dense",
    "lmm_topk_tree",
    "lmm_gather_scores",
    "exporting",
    "predict_proba_tree_decomposed",
    "predict_proba_dense_decomposed",
    "topk_tree_decomposed",
    "gather_scores_decomposed",
]


def exporting() -> bool:
    """True while ``torch.export`` or ONNX export traces the caller: the
    prediction wrappers then emit standard ops (runtimes without this
    library cannot run ``lmm_fast::`` operators)."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


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
    if exporting():
        return predict_proba_tree_decomposed(logits, group_index, group_value, theta, level_sizes)
    return torch.ops.lmm_fast.lmm_predict_proba_tree.default(
        logits, group_index, group_value, theta, list(level_sizes)
    )


def lmm_predict_proba_dense(logits: Tensor, psi_t: Tensor, theta: Tensor, level_sizes: Sequence[int]) -> Tensor:
    """``[B, N]`` probabilities for any Ψ, given class-major ``psi_t`` ``[N, ΣN_upper]``
    (the loss's buffer, in the accumulation dtype); ``theta`` ``[L]`` or
    ``[B, L]``. Differentiable in ``logits`` and ``theta``."""
    if exporting():
        return predict_proba_dense_decomposed(logits, psi_t, theta, level_sizes)
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
    if exporting():
        return topk_tree_decomposed(logits, group_index, group_value, theta, level_sizes, k)
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
    if exporting():
        return gather_scores_decomposed(x, weight, bias, rows)
    return torch.ops.lmm_fast.lmm_gather_scores.default(x, weight, bias, rows)


# ---------------------------------------------------------------------------
# The operators in standard ops, used at export
# ---------------------------------------------------------------------------
# The same mixture as the kernels, in the accumulation dtype, as ops every
# exporter and runtime knows: softmax, index_select (ONNX Gather), matmul,
# topk. They build no [N_l, N] Ψ for a tree.


def _level_weights(theta: Tensor, levels: int) -> list[Tensor]:
    """θ_l as a scalar tensor, or ``[B, 1]`` for a per-row θ."""
    if theta.dim() == 2:
        return [theta[:, level : level + 1] for level in range(levels)]
    return [theta[level] for level in range(levels)]


def predict_proba_tree_decomposed(
    logits: Tensor, group_index: Tensor, group_value: Tensor, theta: Tensor, level_sizes: Sequence[int]
) -> Tensor:
    """:func:`lmm_predict_proba_tree` in standard ops (same arguments and result)."""
    acc = accumulate_dtype(logits.dtype)
    parts = torch.split(logits, list(level_sizes), dim=1)
    weights = _level_weights(theta.to(acc), len(level_sizes))
    out = weights[-1] * torch.softmax(parts[-1].to(acc), dim=1)
    for level, part in enumerate(parts[:-1]):
        z = torch.softmax(part.to(acc), dim=1)
        vote = torch.index_select(z, 1, group_index[level].to(torch.int64)) * group_value[level].to(acc)
        out = out + weights[level] * vote
    return out.to(logits.dtype)


def predict_proba_dense_decomposed(
    logits: Tensor, psi_t: Tensor, theta: Tensor, level_sizes: Sequence[int]
) -> Tensor:
    """:func:`lmm_predict_proba_dense` in standard ops (same arguments and result)."""
    acc = accumulate_dtype(logits.dtype)
    parts = torch.split(logits, list(level_sizes), dim=1)
    weights = _level_weights(theta.to(acc), len(level_sizes))
    psi_t = psi_t.to(acc)
    out = weights[-1] * torch.softmax(parts[-1].to(acc), dim=1)
    offset = 0
    for level, part in enumerate(parts[:-1]):
        size = level_sizes[level]
        z = torch.softmax(part.to(acc), dim=1)
        out = out + weights[level] * (z @ psi_t[:, offset : offset + size].t())
        offset += size
    return out.to(logits.dtype)


def topk_tree_decomposed(
    logits: Tensor, group_index: Tensor, group_value: Tensor, theta: Tensor, level_sizes: Sequence[int], k: int
) -> tuple[Tensor, Tensor]:
    """:func:`lmm_topk_tree` in standard ops (the full ``[B, N]`` mixture, then
    ``torch.topk``)."""
    proba = predict_proba_tree_decomposed(logits, group_index, group_value, theta, level_sizes)
    # a plain tuple, as the op returns (torch.export.save cannot serialise
    # torch.return_types.topk outputs)
    values, indices = torch.topk(proba, int(k), dim=1)
    return values, indices


def gather_scores_decomposed(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """:func:`lmm_gather_scores` in standard ops (gathers a ``[B, C, d]`` copy of
    the rows)."""
    safe = rows.clamp_min(0)
    out = torch.matmul(weight[safe], x.unsqueeze(2)).squeeze(2)
    if bias is not None:
        out = out + bias[safe]
    return out.masked_fill(rows < 0, float("-inf"))


@torch.library.register_fake("lmm_fast::lmm_gather_scores")
def _gather_scores_fake(x, weight, bias, rows):
    check_one_device("lmm_gather_scores", x=x, weight=weight, bias=bias, rows=rows)
    torch._check(x.dim() == 2 and rows.dim() == 2, lambda: "lmm_fast: x and rows must be 2-D")
    return x.new_empty((x.shape[0], rows.shape[1]))


@torch.library.register_fake("lmm_fast::lmm_predict_proba_tree")
def _predict_proba_tree_fake(logits, group_index, group_value, theta, level_sizes):
    check_one_device("lmm_predict_proba_tree", logits=logits, group_index=group_index, group_value=group_value,
                     theta=theta)
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(logits.shape[1] == sum(level_sizes), lambda: "lmm_fast: logits width != sum(level_sizes)")
    return logits.new_empty((logits.shape[0], level_sizes[-1]))


@torch.library.register_fake("lmm_fast::lmm_predict_proba_dense")
def _predict_proba_dense_fake(logits, psi_t, theta, level_sizes):
    check_one_device("lmm_predict_proba_dense", logits=logits, psi_t=psi_t, theta=theta)
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(logits.shape[1] == sum(level_sizes), lambda: "lmm_fast: logits width != sum(level_sizes)")
    return logits.new_empty((logits.shape[0], level_sizes[-1]))


@torch.library.register_fake("lmm_fast::lmm_topk_tree")
def _topk_tree_fake(logits, group_index, group_value, theta, level_sizes, k):
    check_one_device("lmm_topk_tree", logits=logits, group_index=group_index, group_value=group_value, theta=theta)
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
    for level, a in enumerate(torch.split(logits, list(level_sizes), dim=1)):
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
