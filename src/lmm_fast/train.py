"""Algorithm 1 of the paper as a loop: joint learning of the network, the tree
classifier and the hierarchy's group-object matrix Ψ.

    for epoch in warm-up epochs:              # Ψ fixed (pre-trained hierarchy)
        for each mini-batch: SGD step on the LMM loss
    for each later epoch:
        for each mini-batch:
            logits = model(x)
            adapter.step(logits, y, indices)  # sample group labels (Eq. 4), update Ω and Ψ (Eq. 5, 6)
            SGD step on loss_fn(logits, y)    # the loss already sees the new Ψ

:func:`fit_lmm` runs it under the four settings of the paper's Table I:

``"flat"``      the flat N-way softmax (cross-entropy on the class logits);
``"lmm"``       the LMM loss with the pre-trained hierarchy's Ψ, never adapted;
``"lmm_p"``     the LMM loss with Ψ adapted after the warm-up ("w/P");
``"lmm_p_tc"``  the same under the non-overlapping constraint ("w/P,TC").

The same loop takes the options of the level weights θ over training
(:mod:`lmm_fast.theta`): a per-epoch ``schedule`` or a ``gate`` giving each
example its own θ(x), and any adapter, e.g. a
:class:`~lmm_fast.adaptation.GuardedGibbsAdapter`.

The loader must yield ``(inputs, targets, indices)``, ``indices`` being the
dataset positions of the batch's images (the adapter keeps one label per
image); :class:`IndexedDataset` adds them to any map-style dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lmm_fast.adaptation.adapter import GibbsAdapter

if TYPE_CHECKING:
    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.loss import FusedLMMLoss

__all__ = ["SETTINGS", "FitHistory", "IndexedDataset", "fit_lmm"]

SETTINGS = ("flat", "lmm", "lmm_p", "lmm_p_tc")


class IndexedDataset(Dataset):
    """Wraps a map-style dataset yielding ``(x, y)`` so that it yields
    ``(x, y, index)``, as :func:`fit_lmm` needs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        return x, y, index


@dataclass
class FitHistory:
    """What :func:`fit_lmm` did: the mean training loss of every epoch and
    every step, and the adapter (``None`` for the settings without one)."""

    setting: str
    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    adapted_steps: int = 0
    adapter: GibbsAdapter | None = None


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> float:
    """One SGD step on ``loss``; returns its value, refusing a non-finite one
    (a diverged run should stop where it diverged, not train on NaN)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"the training loss became {value} at epoch {epoch}, step {step}")
    return value


def fit_lmm(
    model: nn.Module,
    loader: Iterable,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    setting: str = "lmm_p_tc",
    loss_fn: FusedLMMLoss | None = None,
    warmup_epochs: int = 1,
    hierarchy: Hierarchy | None = None,
    train_targets: Tensor | None = None,
    adapter: GibbsAdapter | None = None,
    beta: float | Tensor = 1.0,
    seed: int = 0,
    exact: bool = False,
    device: torch.device | str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    head: nn.Module | None = None,
    schedule: Callable[[int], Tensor] | None = None,
    gate: nn.Module | None = None,
) -> FitHistory:
    """Train ``model`` by Algorithm 1 under one of the Table I settings.

    Args:
        model: maps a batch of inputs to packed logits ``[B, ΣN_l]`` (e.g. a
            backbone followed by :class:`~lmm_fast.LMMHead`), or to features
            when ``head`` is given.
        loader: re-iterable; yields ``(inputs, targets [B], indices [B])``.
        optimizer: over the model's parameters (and the loss's θ if learned);
            its weight decay is the paper's ``α/2 ‖W‖²`` (Eq. 21).
        epochs: total number of epochs, the warm-up included.
        setting: one of :data:`SETTINGS`.
        loss_fn: the :class:`~lmm_fast.FusedLMMLoss` (optional for
            ``"flat"``, which only needs its number of classes, or the
            hierarchy's).
        warmup_epochs: epochs with Ψ fixed before the adaptation starts
            (``"lmm_p"``, ``"lmm_p_tc"``).
        hierarchy, train_targets, beta, seed: build the
            :class:`~lmm_fast.GibbsAdapter` when ``adapter`` is not given
            (``train_targets``: the class of every dataset index).
        adapter: an existing adapter of ``loss_fn`` (e.g. restored from a
            checkpoint); its ``non_overlapping`` must match ``setting``.
        exact: sample each batch's labels one image at a time.
        device: where batches go (default: the model's parameters' device).
        on_step: called after every step with a dict (``epoch``, ``step``,
            ``loss``, ``adapted``, ``theta``: the θ in use, the batch mean of a
            gate's).
        head: features → packed logits; with it ``model`` is the backbone
            (needed by ``gate``, which reads the backbone's features).
        schedule: ``epoch -> θ [L]`` (e.g. :class:`~lmm_fast.theta.ThetaSchedule`),
            written into the loss (``set_theta``) at the start of every
            epoch; not with a gate or a learned θ.
        gate: a :class:`~lmm_fast.theta.ThetaGate` over the backbone's
            features: each row's loss uses its own θ(x) (the gate receives the
            gradient; put its parameters in ``optimizer``).

    Returns:
        a :class:`FitHistory`.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if schedule is not None and (gate is not None or getattr(loss_fn, "learn_theta", False)):
        raise ValueError("schedule sets θ per epoch; it cannot be combined with a gate or a learned θ")
    if (schedule is not None or gate is not None) and setting == "flat":
        raise ValueError("setting 'flat' has no level weights θ: schedule and gate need an LMM setting")
    if gate is not None and head is None:
        raise ValueError("gate reads the backbone's features: pass the backbone as model and the head as head")
    if gate is not None and gate.num_levels != loss_fn.num_levels:
        raise ValueError(f"gate gives {gate.num_levels} level weights, the loss has {loss_fn.num_levels} levels")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be a non-negative int, got {warmup_epochs!r}")
    adapts = setting in ("lmm_p", "lmm_p_tc")
    if setting == "flat":
        source = loss_fn if loss_fn is not None else hierarchy
        if source is None:
            raise ValueError("setting 'flat' needs loss_fn or hierarchy (for the number of classes)")
        num_classes = int(source.num_classes)
    elif loss_fn is None:
        raise ValueError(f"setting {setting!r} needs loss_fn (a FusedLMMLoss)")
    if adapts:
        non_overlapping = setting == "lmm_p_tc"
        if adapter is None:
            if hierarchy is None or train_targets is None:
                raise ValueError(f"setting {setting!r} needs an adapter, or hierarchy and train_targets to build one")
            adapter = GibbsAdapter(loss_fn, hierarchy, train_targets, beta=beta,
                                   non_overlapping=non_overlapping, seed=seed)
        if adapter.loss_fn is not loss_fn:
            raise ValueError("adapter adapts a different loss than loss_fn")
        if adapter.non_overlapping != non_overlapping:
            raise ValueError(
                f"setting {setting!r} needs an adapter with non_overlapping={non_overlapping}, "
                f"got one with non_overlapping={adapter.non_overlapping}"
            )
    else:
        adapter = None
    device = torch.device(device) if device is not None else _device_of(head if head is not None else model)
    history = FitHistory(setting=setting, adapter=adapter)
    step = 0
    for module in (model, head, gate):
        if module is not None:
            module.train()
    for epoch in range(epochs):
        if schedule is not None:
            loss_fn.set_theta(schedule(epoch))
        adapting = adapts and epoch >= warmup_epochs
        total, count = 0.0, 0
        for batch in loader:
            if not isinstance(batch, (list, tuple)) or len(batch) != 3:
                raise ValueError("the loader must yield (inputs, targets, indices); wrap the dataset in IndexedDataset")
            inputs, targets, indices = batch
            inputs = inputs.to(device, non_blocking=True)
            targets = torch.as_tensor(targets).to(device, non_blocking=True).long()
            indices = torch.as_tensor(indices).to(device, non_blocking=True).long()
            features = model(inputs)
            logits = head(features) if head is not None else features
            theta = gate(features) if gate is not None else None
            if adapting:
                adapter.step(logits.detach(), targets, indices, exact=exact)
                history.adapted_steps += 1
            if setting == "flat":
                loss = F.cross_entropy(logits[:, -num_classes:], targets)
            else:
                loss = loss_fn(logits, targets, theta=theta)
            value = optimizer_step(loss, optimizer, epoch, step)
            history.step_losses.append(value)
            total += value * targets.numel()
            count += targets.numel()
            step += 1
            if on_step is not None:
                if setting == "flat":
                    used = None
                else:
                    used = theta.detach().mean(0) if theta is not None else loss_fn.theta.detach()
                on_step({"epoch": epoch, "step": step, "loss": value, "adapted": adapting, "theta": used})
        history.epoch_losses.append(total / max(count, 1))
    return history
