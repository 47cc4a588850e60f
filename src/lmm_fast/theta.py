"""Level weights θ over training: a coarse-to-fine schedule
(:func:`coarse_to_fine_theta`, :class:`ThetaSchedule`) and a gating network
giving each example its own θ(x) (:class:`ThetaGate`). Both plug into
:func:`lmm_fast.train.fit` (``schedule=``, ``gate=``); a learned global θ is
``FusedLMMLoss(learn_theta=True)``. Measured in ``lmm-fast compare --remedies``
(docs/remedies.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lmm_fast.loss import check_theta, default_theta

__all__ = ["coarse_to_fine_theta", "ThetaSchedule", "ThetaGate"]


def _simplex(theta: Tensor | Sequence[float], num_levels: int, name: str) -> Tensor:
    try:
        return check_theta(theta, num_levels).to(torch.float32)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def coarse_to_fine_theta(
    epoch: int,
    epochs: int,
    num_levels: int,
    start: Tensor | Sequence[float] | None = None,
    end: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """θ ``[L]`` for ``epoch`` (0-based) of ``epochs``: a straight line on the
    simplex from ``start`` (default: uniform, every level ``1/L``) at epoch 0 to
    ``end`` (default: ``(0, …, 0, 1)``, the flat softmax) at the last epoch.

    Why this default: the upper levels get most of the weight while the bottom
    classifier is still poor (they have many examples per node), and by the end
    all of the weight is on the bottom level, whose gradient is then the plain
    cross-entropy's (no longer scaled by ``θ_L z^L_y / z_y``) and whose
    prediction is not capped by the mixture. A convex combination of two
    points of the simplex stays on it.
    """
    if not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be a positive int, got {num_levels!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(epoch, int) or not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be an int in [0, {epochs}), got {epoch!r}")
    first = torch.full((num_levels,), 1.0 / num_levels) if start is None else _simplex(start, num_levels, "start")
    if end is None:
        last = torch.zeros(num_levels)
        last[-1] = 1.0
    else:
        last = _simplex(end, num_levels, "end")
    w = epoch / (epochs - 1) if epochs > 1 else 1.0
    return ((1 - w) * first + w * last).to(torch.float32)


class ThetaSchedule:
    """θ per epoch, for :func:`lmm_fast.train.fit` (``schedule(epoch) -> [L]``).

    Args:
        num_levels: ``L``.
        epochs: length of the schedule; epochs past it keep the last θ.
        start, end: θ at the first and last epoch (see :func:`coarse_to_fine_theta`).
    """

    def __init__(
        self,
        num_levels: int,
        epochs: int,
        start: Tensor | Sequence[float] | None = None,
        end: Tensor | Sequence[float] | None = None,
    ) -> None:
        # Validate once here, so a bad schedule fails before training starts.
        coarse_to_fine_theta(0, epochs, num_levels, start, end)
        self.num_levels, self.epochs, self.start, self.end = num_levels, epochs, start, end

    def __call__(self, epoch: int) -> Tensor:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        return coarse_to_fine_theta(min(epoch, self.epochs - 1), self.epochs, self.num_levels, self.start, self.end)

    def __repr__(self) -> str:
        return f"ThetaSchedule(L={self.num_levels}, epochs={self.epochs}, start={self(0).tolist()}, end={self(self.epochs - 1).tolist()})"


class ThetaGate(nn.Module):
    """Per-example level weights θ(x) = softmax(G x + c), a gating network.

    Starts at a fixed θ for every input (``G = 0``, ``c = log θ_init``), so
    training begins exactly at the paper's model and the gate learns from
    the loss's gradient where to move.

    Args:
        in_features: ``d`` of the features it reads (e.g. the backbone output).
        num_levels: ``L``.
        init_theta: ``[L]`` on the simplex (default :func:`~lmm_fast.default_theta`);
            zero weights start at 1e-6.

    Shapes: ``x [B, d]`` → θ ``[B, L]``, every row on the simplex.
    """

    def __init__(self, in_features: int, num_levels: int, init_theta: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
            raise ValueError(f"num_levels must be a positive int, got {num_levels!r}")
        theta = default_theta(num_levels) if init_theta is None else _simplex(init_theta, num_levels, "init_theta")
        self.in_features, self.num_levels = in_features, num_levels
        self.linear = nn.Linear(in_features, num_levels)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(theta.to(torch.float32).clamp_min(1e-6).log())

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, in_features] = [B, {self.in_features}], got {shape}")
        return torch.softmax(self.linear(x), dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_levels={self.num_levels}"
