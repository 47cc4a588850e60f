"""Calibration fit on held-out rows (a slice of the training split, never
the test set): a temperature for any model's probabilities
(:func:`fit_temperature`, :func:`apply_temperature`) and a test-time θ for the
LMM mixture with Ψ fixed (:func:`fit_test_theta`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fit_temperature", "apply_temperature", "fit_test_theta"]


def _held_out(proba_or_logits: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(proba_or_logits, Tensor) or proba_or_logits.dim() != 2 or not proba_or_logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point [M, C] tensor")
    if not isinstance(target, Tensor) or target.dim() != 1 or target.shape[0] != proba_or_logits.shape[0]:
        raise ValueError(f"target must be [M] = [{proba_or_logits.shape[0]}] class indices")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.numel() == 0:
        raise ValueError("the held-out set is empty: fit on at least one row")
    return proba_or_logits, target.long().to(proba_or_logits.device)


def _log_proba(proba: Tensor) -> Tensor:
    if bool((proba < 0).any()):
        raise ValueError("proba must be non-negative probabilities (pass the model's predicted [M, N] distribution)")
    return proba.double().clamp_min(1e-12).log()


_LOG_T_BOUND = math.log(100.0)


def fit_temperature(proba: Tensor, target: Tensor, *, steps: int = 50) -> float:
    """Temperature ``T > 0`` minimising the held-out NLL of ``softmax(log p / T)``.

    Args:
        proba: ``[M, N]`` predicted distributions on held-out rows (a slice of
            the training split, never the test set).
        target: ``[M]`` their classes.

    Works for any model: for a softmax, ``softmax(log p / T) = softmax(a / T)``.
    ``T < 1`` sharpens (the LMM's mixture is under-confident), ``T > 1``
    softens. LBFGS on ``log T``, kept in ``[0.01, 100]`` (where the held-out
    rows carry no signal, e.g. random predictions, the NLL keeps falling
    as ``T → ∞`` and the bound stops it).
    """
    proba, target = _held_out(proba, target, "proba")
    log_p = _log_proba(proba)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(log_p / log_t.clamp(-_LOG_T_BOUND, _LOG_T_BOUND).exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    value = float(log_t.detach().clamp(-_LOG_T_BOUND, _LOG_T_BOUND).exp())
    if not math.isfinite(value) or value <= 0:
        raise FloatingPointError(f"temperature fit diverged (T = {value})")
    return value


def apply_temperature(proba: Tensor, temperature: float) -> Tensor:
    """``[M, N]`` ``softmax(log p / T)``, rows on the simplex (float32)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not isinstance(proba, Tensor) or proba.dim() != 2:
        raise ValueError("proba must be an [M, N] tensor")
    return torch.softmax(_log_proba(proba) / temperature, dim=1).to(torch.float32)


def fit_test_theta(logits: Tensor, target: Tensor, loss_fn, *, steps: int = 50) -> Tensor:
    """θ ``[L]`` minimising the held-out NLL of the LMM mixture (Ψ fixed).

    Args:
        logits: ``[M, ΣN_l]`` packed logits of held-out rows (a slice of the
            training split, never the test set).
        target: ``[M]`` their classes.
        loss_fn: the trained :class:`~lmm_fast.FusedLMMLoss` (its Ψ is used,
            its θ is not changed).

    Returns the fitted θ on the simplex (parametrised as a softmax, fit by
    LBFGS from the loss's θ); pass it as ``theta=`` to
    :func:`~lmm_fast.predict.mixture_proba` or :func:`~lmm_fast.predict_topk`.
    """
    logits = loss_fn.pack(logits)
    logits, target = _held_out(logits, target, "logits")
    logits = logits.detach().float()
    init = loss_fn.theta.detach().double().clamp_min(1e-6)
    phi = (init / init.sum()).log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([phi], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        theta = torch.softmax(phi, 0).float()
        losses = loss_fn(logits, target, theta=theta)
        loss = losses.mean() if losses.dim() else losses
        loss.backward()
        return loss

    opt.step(closure)
    theta = torch.softmax(phi.detach(), 0)
    if not bool(torch.isfinite(theta).all()):
        raise FloatingPointError("test-time θ fit diverged")
    return theta.to(torch.float32)
