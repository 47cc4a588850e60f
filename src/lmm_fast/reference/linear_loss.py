"""Pure-PyTorch references of the fused linear + LMM loss (the oracles of its
tests and the baselines of its benchmark). Any dtype, float64 included;
differentiable by autograd where stated.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lmm_fast.reference.loss import lmm_loss_reference

__all__ = ["linear_lmm_loss_reference", "linear_lmm_loss_chunked_torch"]


def linear_lmm_loss_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    psi: Sequence[Tensor],
    theta: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The loss as written: all logits ``x @ weightᵀ + bias`` ``[B, ΣN_l]``,
    then the level-by-level log-space mixture loss. ``psi``: the effective
    ``[N_l, N]`` matrices per upper level; ``theta``: ``[L]``;
    ``class_weight`` and ``label_smoothing`` as ``lmm_loss_reference``'s
    ``weight`` and ``label_smoothing``. Differentiable in every floating
    input."""
    logits = x @ weight.t()
    if bias is not None:
        logits = logits + bias
    return lmm_loss_reference(logits, target, list(psi), theta, ignore_index=ignore_index, reduction=reduction,
                              weight=class_weight, label_smoothing=label_smoothing)


def linear_lmm_loss_chunked_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    psi: Sequence[Tensor],
    theta: Tensor,
    chunk_rows: int,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The same chunking as the fused op, in plain PyTorch: per chunk of rows,
    the logits, the reference loss and its autograd gradient, which the
    chunk's GEMMs turn into its share of the gradients right away (the
    gradient during the forward, as Liger's fused linear cross-entropy).

    Returns ``(loss, grad_x, grad_weight, grad_bias)`` (detached; the loss
    ``"mean"`` or ``"sum"``), gradients of that loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    x, weight = x.detach(), weight.detach()
    bias = None if bias is None else bias.detach()
    valid = target != ignore_index
    scale = 1.0 / valid.sum().to(x.dtype) if reduction == "mean" else torch.ones((), dtype=x.dtype)
    total = torch.zeros((), dtype=x.dtype)
    grad_x = torch.empty_like(x)
    grad_weight = torch.zeros_like(weight)
    grad_bias = None if bias is None else torch.zeros_like(bias)
    for start in range(0, x.shape[0], chunk_rows):
        end = min(start + chunk_rows, x.shape[0])
        logits = x[start:end] @ weight.t()
        if bias is not None:
            logits = logits + bias
        logits.requires_grad_(True)
        with torch.enable_grad():
            loss = lmm_loss_reference(logits, target[start:end], list(psi), theta, ignore_index, "sum")
            (grad_logits,) = torch.autograd.grad(loss * scale, logits)
        total += loss.detach()
        grad_x[start:end] = grad_logits @ weight
        grad_weight.addmm_(grad_logits.t(), x[start:end])
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
    return total * scale, grad_x, grad_weight, grad_bias
