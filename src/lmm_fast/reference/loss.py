"""Pure-PyTorch reference implementations (the oracles of the tests and the
baselines of the benchmarks). They favour clarity and numerical safety over
speed, work in any dtype (float64 included) and are differentiable by autograd.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "split_levels",
    "lmm_loss_reference",
    "lmm_loss_unfused",
    "lmm_log_proba_reference",
    "predict_proba_reference",
]


def split_levels(logits: Tensor | Sequence[Tensor], level_sizes: Sequence[int]) -> list[Tensor]:
    """Packed ``[B, ΣN_l]`` logits (or a list) → list of ``[B, N_l]`` views."""
    if isinstance(logits, (list, tuple)):
        return list(logits)
    return list(torch.split(logits, list(level_sizes), dim=1))


def lmm_loss_reference(
    logits: Tensor | Sequence[Tensor],
    target: Tensor,
    psi: Sequence[Tensor],
    theta: Tensor,
    ignore_index: int = -100,
    reduction: str = "none",
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``−log Σ_l θ_l m^l_y`` computed level by level in log space.

    ``psi``: list of ``[N_l, N]`` for the upper levels; ``theta``: ``[L]``.
    Ignored rows contribute 0 (``reduction="none"``) and are left out of the
    mean, as in ``nn.CrossEntropyLoss``. ``weight`` ``[N]`` and
    ``label_smoothing`` ε follow ``F.cross_entropy``: the row's loss is
    ``(1−ε)·w_y·(−log z_y) + (ε/N)·Σ_c w_c·(−log z_c)`` (``z_c`` from
    :func:`lmm_log_proba_reference`), and ``"mean"`` divides by ``Σ w_{y_b}``
    over the rows not ignored.
    """
    n = psi[0].shape[1] if len(psi) else None
    sizes = [p.shape[0] for p in psi]
    if isinstance(logits, Tensor):
        n = n if n is not None else logits.shape[1]
        sizes = sizes + [logits.shape[1] - sum(sizes)]
    levels = split_levels(logits, sizes)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_votes = []
    for level, a in enumerate(levels):
        log_z = torch.log_softmax(a, dim=1)
        if level == len(levels) - 1:
            log_votes.append(log_z.gather(1, safe_target[:, None]).squeeze(1))
        else:
            columns = psi[level].to(a.dtype)[:, safe_target].t()  # [B, N_l]
            log_votes.append(torch.logsumexp(log_z + columns.log(), dim=1))
    log_m = torch.stack(log_votes, dim=1)
    loss = -torch.logsumexp(theta.to(log_m.dtype).log() + log_m, dim=1)
    row_weight = None
    if weight is not None:
        row_weight = weight.to(loss.dtype)[safe_target]
        loss = loss * row_weight
    if label_smoothing:
        log_proba = lmm_log_proba_reference(levels, psi, theta)
        class_weight = torch.ones_like(log_proba[0]) if weight is None else weight.to(log_proba.dtype)
        smooth = -(log_proba * class_weight).sum(dim=1) / log_proba.shape[1]
        loss = (1 - label_smoothing) * loss + label_smoothing * smooth
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, valid, reduction, row_weight)


def lmm_log_proba_reference(
    logits: Tensor | Sequence[Tensor], psi: Sequence[Tensor], theta: Tensor
) -> Tensor:
    """``[B, N]`` log class probabilities ``log Σ_l θ_l m^l_c``, in log space
    throughout (exact for extreme logits; ``[B, N_l, N]`` per level, an
    oracle only). ``theta``: ``[L]`` or ``[B, L]``."""
    sizes = [p.shape[0] for p in psi]
    if isinstance(logits, Tensor):
        sizes = sizes + [logits.shape[1] - sum(sizes)]
    levels = split_levels(logits, sizes)
    log_m = []
    for level, a in enumerate(levels):
        log_z = torch.log_softmax(a, dim=1)
        if level == len(levels) - 1:
            log_m.append(log_z)
        else:
            log_psi = psi[level].to(a.dtype).log()  # [N_l, N]
            log_m.append(torch.logsumexp(log_z[:, :, None] + log_psi[None], dim=1))
    log_m = torch.stack(log_m, dim=1)  # [B, L, N]
    log_theta = theta.to(log_m.dtype).log()[..., None]
    return torch.logsumexp(log_theta + log_m, dim=1)


def predict_proba_reference(
    logits: Tensor | Sequence[Tensor], psi: Sequence[Tensor], theta: Tensor
) -> Tensor:
    """``[B, N]`` class probabilities ``Σ_l θ_l softmax(a^l) Ψ^l`` (bottom Ψ = I)."""
    sizes = [p.shape[0] for p in psi]
    if isinstance(logits, Tensor):
        sizes = sizes + [logits.shape[1] - sum(sizes)]
    levels = split_levels(logits, sizes)
    theta = theta.to(levels[0].dtype)
    proba = theta[-1] * torch.softmax(levels[-1], dim=1)
    for level, a in enumerate(levels[:-1]):
        proba = proba + theta[level] * (torch.softmax(a, dim=1) @ psi[level].to(a.dtype))
    return proba


def lmm_loss_unfused(
    logits: Tensor | Sequence[Tensor],
    target: Tensor,
    psi: Sequence[Tensor],
    theta: Tensor,
    ignore_index: int = -100,
    reduction: str = "none",
) -> Tensor:
    """The model as written: the full ``[B, N]`` mixture, then ``−log`` of the
    target's entry. What a user would write in plain PyTorch; the speed and
    memory baseline of the benchmarks (it underflows for extreme logits)."""
    proba = predict_proba_reference(logits, psi, theta)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    loss = -proba.gather(1, safe_target[:, None]).squeeze(1).log()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, valid, reduction)


def _reduce(loss: Tensor, valid: Tensor, reduction: str, row_weight: Tensor | None = None) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if row_weight is None:
            return loss.sum() / valid.sum().to(loss.dtype)
        return loss.sum() / torch.where(valid, row_weight, torch.zeros_like(row_weight)).sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
