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
from torch.utils.weak import WeakIdKeyDictionary

from lmm_fast.ops.library import accumulate_dtype, check_one_device

__all__ = ["lmm_loss_forward", "lmm_loss_backward", "GradientStorage"]


class GradientStorage:
    """The storage of the last CPU gradient of the logits, kept for the next
    backward (a :class:`~lmm_fast.FusedLMMLoss` owns one when
    ``grad_cache=True``).

    A fresh CPU allocation as large as the logits is served by ``mmap``, and
    first-touching its pages costs more than the fused backward itself (55 ms
    for the 158 MiB gradient of B = 4096, ΣN_l = 10 110 in float32). The
    backward writes into the kept storage only when nothing else references
    it (the previous gradient has been consumed and freed), else it allocates.
    Memory held: one gradient, ``B × ΣN_l`` elements of the logits' dtype, from
    the first backward until :meth:`release` or until the owner is deleted.
    Gradients below 4 MiB are not kept (they come from malloc's free lists).
    """

    min_bytes = 1 << 22

    def __init__(self) -> None:
        self.holder: Tensor | None = None

    # Sizes come from numel: a Python storage object (untyped_storage()) would
    # itself reference the storage and so block its reuse.
    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return 0 if self.holder is None else self.holder.numel() * self.holder.element_size()

    def release(self) -> None:
        """Drop the kept storage (it is freed once no gradient shares it)."""
        self.holder = None

    def offer(self) -> None:
        torch.ops.lmm_fast._offer_grad_storage.default(self.holder)

    def adopt(self, grad: Tensor) -> None:
        # a second tensor on the gradient's storage: its use count tells the
        # next backward whether the gradient is still alive
        self.holder = grad.detach() if grad.numel() * grad.element_size() >= self.min_bytes else None

    def __deepcopy__(self, memo) -> "GradientStorage":
        return GradientStorage()  # a copied module starts with nothing held

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.holder = None


# forward's logits -> the GradientStorage of the module computing that loss,
# read once by setup_context (the op itself knows no module)
_PENDING_STORAGE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def lmm_loss_forward(
    logits: Tensor,
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    level_sizes: Sequence[int],
    ignore_index: int = -100,
    psi_scale: Tensor | None = None,
    *,
    grad_storage: GradientStorage | None = None,
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

    Returns:
        ``(loss [B], lse [B, L], log_m [B, L])``: the per-row loss ``−log z_y``
        (zero on ignored rows), each level's log-sum-exp and the log of each
        level's vote ``m^l_y``. Differentiable in ``logits`` and ``theta``.

    ``grad_storage``: where the CPU backward of this call may keep and reuse
    its gradient's storage (see :class:`GradientStorage`); ``None``: a fresh
    allocation.
    """
    op = torch.ops.lmm_fast.lmm_loss_forward.default
    if grad_storage is None or torch.compiler.is_compiling() or logits.device.type != "cpu":
        return op(logits, target, psi_t, theta, list(level_sizes), ignore_index, psi_scale)
    _PENDING_STORAGE[logits] = grad_storage
    try:
        return op(logits, target, psi_t, theta, list(level_sizes), ignore_index, psi_scale)
    finally:
        _PENDING_STORAGE.pop(logits, None)


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
) -> Tensor:
    """Gradient ``[B, ΣN_l]`` of ``Σ_b grad_loss[b] · loss[b]`` with respect to the logits."""
    return torch.ops.lmm_fast.lmm_loss_backward.default(
        grad_loss, logits, target, psi_t, theta, lse, log_m, list(level_sizes), ignore_index, psi_scale
    )


@torch.library.register_fake("lmm_fast::lmm_loss_forward")
def _lmm_loss_forward_fake(logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale=None):
    check_one_device("lmm_loss_forward", logits=logits, target=target, psi_t=psi_t, theta=theta, psi_scale=psi_scale)
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(logits.shape[1] == sum(level_sizes), lambda: "lmm_fast: logits width != sum(level_sizes)")
    batch = logits.shape[0]
    acc = accumulate_dtype(logits.dtype)
    levels = len(level_sizes)
    return (
        logits.new_empty((batch,)),
        logits.new_empty((batch, levels), dtype=acc),
        logits.new_empty((batch, levels), dtype=acc),
    )


@torch.library.register_fake("lmm_fast::lmm_loss_backward")
def _lmm_loss_backward_fake(
    grad_loss, logits, target, psi_t, theta, lse, log_m, level_sizes, ignore_index, psi_scale=None
):
    check_one_device("lmm_loss_backward", grad_loss=grad_loss, logits=logits, target=target, psi_t=psi_t,
                     theta=theta, lse=lse, log_m=log_m, psi_scale=psi_scale)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale = inputs
    _, lse, log_m = output
    ctx.save_for_backward(logits, target, psi_t, theta, lse, log_m, psi_scale)
    ctx.level_sizes = list(level_sizes)
    ctx.ignore_index = ignore_index
    ctx.grad_storage = _PENDING_STORAGE.get(logits)
    ctx.mark_non_differentiable(lse, log_m)


def _differentiable_gradient(grad_loss, logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale):
    """``∂(Σ_b grad_loss[b] · loss[b]) / ∂(logits, θ)`` in plain PyTorch, for
    ``backward(create_graph=True)``: the fused backward kernel is not itself
    differentiable, so a double backward (a gradient penalty, a Hessian-vector
    product) differentiates this formula instead.

    With ``p^l = softmax(a^l)``, ``c^l_t = Ψ^l[t, y]`` (one-hot at the bottom),
    ``m^l = Σ_t p^l_t c^l_t`` and ``z = Σ_l θ_l m^l``:
    ``∂loss/∂a^l = −(θ_l / z) p^l ⊙ (c^l − m^l)`` and ``∂loss/∂θ_l = −m^l / z``.
    It forms ``[B, ΣN_l]`` temporaries, and in probability space a row whose
    target probability underflows (``z = 0``) gets a non-finite gradient.
    """
    acc = theta.dtype
    batch, levels = logits.shape[0], len(level_sizes)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    psi = psi_t if psi_scale is None else psi_t * psi_scale
    columns = psi.to(acc)[safe]  # [B, Σ_upper N_l]: Ψ^l[:, y_b] of every upper level
    theta_rows = theta if theta.dim() == 2 else theta.unsqueeze(0).expand(batch, levels)
    probs, votes, offset = [], [], 0
    for level, a in enumerate(torch.split(logits, list(level_sizes), dim=1)):
        p = torch.softmax(a.to(acc), dim=1)
        if level == levels - 1:
            c = torch.nn.functional.one_hot(safe, level_sizes[-1]).to(acc)
        else:
            c = columns[:, offset : offset + level_sizes[level]]
            offset += level_sizes[level]
        probs.append((p, c))
        votes.append((p * c).sum(dim=1))
    m = torch.stack(votes, dim=1)  # [B, L]
    z = (theta_rows * m).sum(dim=1)
    coef = torch.where(valid, -grad_loss.to(acc) / torch.where(valid, z, torch.ones_like(z)), torch.zeros_like(z))
    grad_levels = [
        (coef * theta_rows[:, level]).unsqueeze(1) * p * (c - m[:, level : level + 1])
        for level, (p, c) in enumerate(probs)
    ]
    grad_logits = torch.cat(grad_levels, dim=1).to(logits.dtype)
    grad_theta = coef.unsqueeze(1) * m
    return grad_logits, (grad_theta if theta.dim() == 2 else grad_theta.sum(0)).to(theta.dtype)


def _backward(ctx, grad_loss, grad_lse, grad_log_m):
    logits, target, psi_t, theta, lse, log_m, psi_scale = ctx.saved_tensors
    grad_logits = grad_theta = None
    if grad_loss is None:
        return None, None, None, None, None, None, None
    if torch.is_grad_enabled():
        # backward(create_graph=True): the gradient must itself be differentiable
        grad_logits, grad_theta = _differentiable_gradient(
            grad_loss, logits, target, psi_t, theta, ctx.level_sizes, ctx.ignore_index, psi_scale
        )
        return (
            grad_logits if ctx.needs_input_grad[0] else None, None, None,
            grad_theta if ctx.needs_input_grad[3] else None, None, None, None,
        )
    grad_loss = grad_loss.contiguous()
    if ctx.needs_input_grad[0]:
        storage = ctx.grad_storage
        if storage is not None:
            storage.offer()
        try:
            grad_logits = lmm_loss_backward(
                grad_loss, logits, target, psi_t, theta, lse, log_m, ctx.level_sizes, ctx.ignore_index, psi_scale
            )
        finally:
            if storage is not None:
                torch.ops.lmm_fast._offer_grad_storage.default(None)  # an unused offer must not linger
        if storage is not None:
            storage.adopt(grad_logits)
    if ctx.needs_input_grad[3]:
        # ∂loss/∂θ_l = −m^l_y / z_y, O(B·L): plain torch is fine here.
        log_z = torch.logsumexp(theta.log() + log_m, dim=1, keepdim=True)
        valid = (target != ctx.ignore_index).unsqueeze(1)
        per_row = -torch.exp(log_m - log_z) * grad_loss.to(log_m.dtype).unsqueeze(1)
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        grad_theta = (per_row if theta.dim() == 2 else per_row.sum(0)).to(theta.dtype)
    return grad_logits, None, None, grad_theta, None, None, None


torch.library.register_autograd(
    "lmm_fast::lmm_loss_forward", _backward, setup_context=_setup_context
)

