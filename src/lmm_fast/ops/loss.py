"""Typed wrappers of the loss operators (``torch.ops.lmm_fast.lmm_loss_forward``
and ``lmm_loss_backward``), with their fake (meta) kernels and autograd formula
registered through ``torch.library``.

Kernels: ``csrc/cpu/loss_cpu.cpp`` and ``csrc/cuda/loss_cuda.cu``; oracles:
:mod:`lmm_fast.reference.loss`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lmm_fast.ops.library import accumulate_dtype

__all__ = ["lmm_loss_forward", "lmm_loss_backward", "lmm_loss", "STAT_ROWS"]

# Rows of the saved statistics ``lse`` [B, STAT_ROWS · L] (STAT_ROWS blocks of L per row): each level's maximum
# logit and log Σ exp(a − max), the same over the target's groups weighted by
# Ψ, and the label-smoothing sum Σ_c w_c m^l_c / z_c (csrc/loss_common.h).
STAT_ROWS = 5
_SMOOTH_ROW = 4


def lmm_loss_forward(
    logits: Tensor,
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    level_sizes: Sequence[int],
    ignore_index: int = -100,
    psi_scale: Tensor | None = None,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused LMM loss, one row at a time.

    Args:
        logits: ``[B, ΣN_l]`` packed logits, top level first (float32/64, and
            float16/bfloat16).
        target: ``[B]`` int64 class indices in ``[0, N)`` or ``ignore_index``.
        psi_t: ``[N, Σ_{upper} N_l]`` class-major Ψ: row ``y`` holds column ``y``
            of every upper level's Ψ, in level order.
        theta: ``[L]`` level weights on the simplex, or ``[B, L]``: one θ per
            row (e.g. from a gating network).
        level_sizes: ``[N_1, …, N_{L-1}, N]``.
        psi_scale: optional ``[Σ_{upper} N_l]`` per-group factors: the
            effective ``Ψ^l[t, y]`` is ``psi_t[y, t] · psi_scale[t]``.
        weight: optional ``[N]`` class weights (``F.cross_entropy``'s), in
            ``psi_t``'s dtype.
        label_smoothing: ``ε ∈ [0, 1]``; the row's loss becomes
            ``(1−ε)·w_y·(−log z_y) + (ε/N)·Σ_c w_c·(−log z_c)`` with
            ``z_c = Σ_l θ_l m^l_c``, computed inside the kernel's pass over the
            row (``O(N·Σ_{upper} N_l)`` per row, no ``[B, N]`` temporary).

    Returns:
        ``(loss [B], lse [B, 5·L], log_m [B, L])``: the per-row loss as
        ``F.cross_entropy(..., reduction="none")`` gives it (zero on ignored
        rows), the statistics the backward reads (per level: the maximum
        logit and ``log Σ exp(a − max)``, both again over the target's
        groups, and the smoothing sum) and the log of each level's vote
        ``m^l_y``. Differentiable in ``logits`` and ``theta``.
    """
    return torch.ops.lmm_fast.lmm_loss_forward.default(
        logits, target, psi_t, theta, list(level_sizes), ignore_index, psi_scale, weight, float(label_smoothing)
    )


def lmm_loss_backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    lse: Tensor,
    log_m: Tensor,
    level_sizes: Sequence[int],
    ignore_index: int = -100,
    psi_scale: Tensor | None = None,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Gradient ``[B, ΣN_l]`` of ``Σ_b grad_loss[b] · loss[b]`` with respect to the logits."""
    return torch.ops.lmm_fast.lmm_loss_backward.default(
        grad_loss, logits, target, psi_t, theta, lse, log_m, list(level_sizes), ignore_index, psi_scale,
        weight, float(label_smoothing),
    )


def lmm_loss(
    logits: Tensor,
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    level_sizes: Sequence[int],
    ignore_index: int = -100,
    psi_scale: Tensor | None = None,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """The reduced loss, with ``F.cross_entropy``'s semantics: ``"mean"``
    divides by ``Σ w_{y_b}`` over the rows not ignored (their count without
    ``weight``), ``"sum"`` adds the rows, ``"none"`` returns them ``[B]``."""
    loss, _, _ = lmm_loss_forward(
        logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale, weight, label_smoothing
    )
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    valid = target != ignore_index
    if weight is None:
        return loss.sum() / valid.sum().to(loss.dtype)
    row_weight = weight[torch.where(valid, target, torch.zeros_like(target))]
    total = torch.where(valid, row_weight, torch.zeros_like(row_weight)).sum()
    return loss.sum() / total.to(loss.dtype)


# The FakeTensor kernels are necessary for torch.compile and torch.export.
@torch.library.register_fake("lmm_fast::lmm_loss_forward")
def _lmm_loss_forward_fake(
    logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale=None, weight=None, label_smoothing=0.0
):
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(logits.shape[1] == sum(level_sizes), lambda: "lmm_fast: logits width != sum(level_sizes)")
    batch = logits.shape[0]
    acc = accumulate_dtype(logits.dtype)
    levels = len(level_sizes)
    return (
        logits.new_empty((batch,)),
        logits.new_empty((batch, STAT_ROWS * levels), dtype=acc),
        logits.new_empty((batch, levels), dtype=acc),
    )


@torch.library.register_fake("lmm_fast::lmm_loss_backward")
def _lmm_loss_backward_fake(
    grad_loss, logits, target, psi_t, theta, lse, log_m, level_sizes, ignore_index, psi_scale=None,
    weight=None, label_smoothing=0.0,
):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale, weight, label_smoothing = inputs
    _, lse, log_m = output
    ctx.save_for_backward(logits, target, psi_t, theta, lse, log_m, psi_scale, weight)
    ctx.level_sizes = list(level_sizes)
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = float(label_smoothing)
    ctx.mark_non_differentiable(lse, log_m)


def _backward(ctx, grad_loss, grad_lse, grad_log_m):
    logits, target, psi_t, theta, lse, log_m, psi_scale, weight = ctx.saved_tensors
    nothing = (None,) * 9
    if grad_loss is None:
        return nothing
    grad_logits = grad_theta = None
    grad_loss = grad_loss.contiguous()
    eps = ctx.label_smoothing
    if ctx.needs_input_grad[0]:
        grad_logits = lmm_loss_backward(
            grad_loss, logits, target, psi_t, theta, lse, log_m, ctx.level_sizes, ctx.ignore_index, psi_scale,
            weight, eps,
        )
    if ctx.needs_input_grad[3]:
        # ∂loss/∂θ_l = −(1−ε)·w_y·m^l_y / z_y − (ε/N)·Σ_c w_c m^l_c / z_c,
        # O(B·L) from the saved statistics: plain torch is fine here.
        valid = (target != ctx.ignore_index).unsqueeze(1)
        log_z = torch.logsumexp(theta.log() + log_m, dim=1, keepdim=True)
        per_row = -torch.exp(log_m - log_z)
        if weight is not None:
            safe = torch.where(valid.squeeze(1), target, torch.zeros_like(target))
            per_row = per_row * weight[safe].unsqueeze(1)
        if eps > 0:
            per_row = (1 - eps) * per_row - (eps / ctx.level_sizes[-1]) * lse.view(-1, STAT_ROWS, len(ctx.level_sizes))[:, _SMOOTH_ROW]
        per_row = per_row * grad_loss.to(log_m.dtype).unsqueeze(1)
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        grad_theta = (per_row if theta.dim() == 2 else per_row.sum(0)).to(theta.dtype)
    return grad_logits, None, None, grad_theta, None, None, None, None, None


torch.library.register_autograd(
    "lmm_fast::lmm_loss_forward", _backward, setup_context=_setup_context
)

# Under torch.autocast the loss runs in float32 and returns float32, as
# F.cross_entropy (on autocast's fp32 list) does: low-precision logits are
# upcast before the kernel, and the gradient flows back through the cast.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("lmm_fast::lmm_loss_forward", _device, torch.float32)
