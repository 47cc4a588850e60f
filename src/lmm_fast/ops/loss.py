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

__all__ = ["lmm_loss_forward", "lmm_loss_backward", "lmm_loss", "STAT_ROWS", "GradientStorage"]

# Rows of the saved statistics ``lse`` [B, STAT_ROWS · L] (STAT_ROWS blocks of L per row): each level's maximum
# logit and log Σ exp(a − max), the same over the target's groups weighted by
# Ψ, and the label-smoothing sum Σ_c w_c m^l_c / z_c (csrc/loss_common.h).
STAT_ROWS = 5
_SMOOTH_ROW = 4

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
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
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

    ``grad_storage``: where the CPU backward of this call may keep and reuse
    its gradient's storage (see :class:`GradientStorage`); ``None``: a fresh
    allocation.
    """
    op = torch.ops.lmm_fast.lmm_loss_forward.default
    args = (logits, target, psi_t, theta, list(level_sizes), ignore_index, psi_scale, weight, float(label_smoothing))
    if grad_storage is None or torch.compiler.is_compiling() or logits.device.type != "cpu":
        return op(*args)
    _PENDING_STORAGE[logits] = grad_storage
    try:
        return op(*args)
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
    *,
    grad_storage: GradientStorage | None = None,
) -> Tensor:
    """The reduced loss, with ``F.cross_entropy``'s semantics: ``"mean"``
    divides by ``Σ w_{y_b}`` over the rows not ignored (their count without
    ``weight``), ``"sum"`` adds the rows, ``"none"`` returns them ``[B]``.
    ``grad_storage`` as in :func:`lmm_loss_forward`."""
    loss, _, _ = lmm_loss_forward(
        logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale, weight, label_smoothing,
        grad_storage=grad_storage,
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
    check_one_device("lmm_loss_forward", logits=logits, target=target, psi_t=psi_t, theta=theta, psi_scale=psi_scale,
                     weight=weight)
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
    check_one_device("lmm_loss_backward", grad_loss=grad_loss, logits=logits, target=target, psi_t=psi_t,
                     theta=theta, lse=lse, log_m=log_m, psi_scale=psi_scale)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale, weight, label_smoothing = inputs
    _, lse, log_m = output
    ctx.save_for_backward(logits, target, psi_t, theta, lse, log_m, psi_scale, weight)
    ctx.level_sizes = list(level_sizes)
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = float(label_smoothing)
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
    logits, target, psi_t, theta, lse, log_m, psi_scale, weight = ctx.saved_tensors
    nothing = (None,) * 9
    if grad_loss is None:
        return nothing
    grad_logits = grad_theta = None
    eps = ctx.label_smoothing
    if torch.is_grad_enabled():
        # backward(create_graph=True): the gradient must itself be differentiable
        if weight is not None or eps > 0:
            raise NotImplementedError(
                "lmm_fast: double backward (backward(create_graph=True), e.g. a gradient penalty) through the "
                "loss supports neither weight nor label_smoothing yet; use FusedLMMLoss without them")
        grad_logits, grad_theta = _differentiable_gradient(
            grad_loss, logits, target, psi_t, theta, ctx.level_sizes, ctx.ignore_index, psi_scale
        )
        return (
            grad_logits if ctx.needs_input_grad[0] else None, None, None,
            grad_theta if ctx.needs_input_grad[3] else None, None, None, None, None, None,
        )
    grad_loss = grad_loss.contiguous()
    if ctx.needs_input_grad[0]:
        storage = ctx.grad_storage
        if storage is not None:
            storage.offer()
        try:
            grad_logits = lmm_loss_backward(
                grad_loss, logits, target, psi_t, theta, lse, log_m, ctx.level_sizes, ctx.ignore_index, psi_scale,
                weight, eps,
            )
        finally:
            if storage is not None:
                torch.ops.lmm_fast._offer_grad_storage.default(None)  # an unused offer must not linger
        if storage is not None:
            storage.adopt(grad_logits)
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
