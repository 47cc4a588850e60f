"""One file for a whole LMM training run: :func:`save_checkpoint` and
:func:`load_checkpoint`.

A run is a hierarchy, an :class:`~lmm_fast.LMMHead`, a
:class:`~lmm_fast.FusedLMMLoss` (Ψ, θ), usually a
:class:`~lmm_fast.GibbsAdapter` and an optimizer. They are saved together,
as one pair of functions, rather than by making the adapter part of a
module's ``state_dict``, because:

* the adapter's state is the training set's, not the model's: a group label
  per training image (``[Ξ, L-1]``) and the class of every image. Inside the
  loss's ``state_dict`` it would travel with every deployed model, and a
  model's ``load_state_dict`` would need the dataset it was trained on;
* the hierarchy is not a tensor (it is saved in its validated JSON format),
  and the adapter has to be restored after the loss, since it rebuilds the
  loss's Ψ from its counts; one function gets the order right;
* the file holds plain tensors, dicts, lists, strings and numbers only, so
  :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``:
  loading a checkpoint runs no pickled code.

Resuming from a checkpoint gives bit-identical next steps (losses, labels,
Ψ) when the data order and any other randomness of the loop are the same:
the adapter's draws are keyed by its seed, its step counter and the image,
all saved. Put the loop's own state (epoch, scheduler, data order, RNG
states) in ``extra``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from lmm_fast.adaptation import GibbsAdapter
from lmm_fast.head import LMMHead
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.loss import FusedLMMLoss

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint"]

FORMAT_NAME = "lmm_fast.checkpoint"
FORMAT_VERSION = 1

# FusedLMMLoss constructor arguments that are not tensors (the tensors are in
# its state_dict).
_LOSS_CONFIG = ("reduction", "ignore_index", "learn_theta", "label_smoothing")


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` restored.

    Attributes:
        hierarchy, head, loss_fn: the objects passed to :func:`load_checkpoint`
            with their state restored, or new ones built from the file.
        adapter: likewise (``None`` when the run had none).
        optimizer: the optimizer passed, with its state restored, or ``None``.
        optimizer_state: the saved ``optimizer.state_dict()`` (``None`` when
            none was saved), for an optimizer built after loading.
        extra: what was passed as ``extra`` to :func:`save_checkpoint`.
    """

    hierarchy: Hierarchy
    head: LMMHead
    loss_fn: FusedLMMLoss
    adapter: GibbsAdapter | None
    optimizer: torch.optim.Optimizer | None
    optimizer_state: dict | None
    extra: Any


def _check_plain(value: Any, where: str) -> None:
    """Refuses what ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, Tensor, torch.dtype, torch.device)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where} has a key of type {type(key).__name__}: keys must be str or numbers")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}: a checkpoint holds only tensors, dicts, lists, tuples, "
        f"strings, numbers, bools and None (so that torch.load(weights_only=True) can read it); "
        f"save its state_dict() or a plain description instead"
    )


def save_checkpoint(
    path: str | os.PathLike,
    *,
    hierarchy: Hierarchy | None = None,
    head: LMMHead,
    loss_fn: FusedLMMLoss,
    adapter: GibbsAdapter | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Any = None,
) -> None:
    """Saves a whole LMM training run to ``path`` (one ``torch.save`` file).

    Args:
        hierarchy: the run's hierarchy (default: ``head.hierarchy``).
        head: the :class:`~lmm_fast.LMMHead` (its parameters; its in_features,
            bias and dtype, to rebuild it).
        loss_fn: the :class:`~lmm_fast.FusedLMMLoss`: Ψ (as the adapter left it),
            θ (fixed or learned), reduction, ignore_index.
        adapter: the :class:`~lmm_fast.GibbsAdapter`, if any: labels, counts,
            β, seed and step counter.
        optimizer: saved as ``optimizer.state_dict()``.
        extra: anything else of the loop (epoch, scheduler state, RNG states),
            made of tensors, dicts, lists, tuples, strings and numbers.

    The file is written next to ``path`` and then renamed, so a crash never
    leaves a truncated checkpoint behind.
    """
    if not isinstance(head, LMMHead):
        raise TypeError(f"head must be an LMMHead, got {type(head).__name__}")
    if not isinstance(loss_fn, FusedLMMLoss):
        raise TypeError(f"loss_fn must be a FusedLMMLoss, got {type(loss_fn).__name__}")
    hierarchy = head.hierarchy if hierarchy is None else hierarchy
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"hierarchy must be a lmm_fast.Hierarchy, got {type(hierarchy).__name__}")
    sizes = list(hierarchy.level_sizes) + [hierarchy.num_classes]
    if head.level_sizes != sizes or list(loss_fn.level_sizes) != sizes:
        raise ValueError(
            f"hierarchy (levels {sizes}), head (levels {head.level_sizes}) and loss_fn (levels "
            f"{list(loss_fn.level_sizes)}) are not of one run"
        )
    if adapter is not None:
        if not isinstance(adapter, GibbsAdapter):
            raise TypeError(f"adapter must be a GibbsAdapter, got {type(adapter).__name__}")
        if adapter.loss_fn is not loss_fn:
            raise ValueError("adapter adapts another loss than loss_fn: save the loss the adapter writes to")
    _check_plain(extra, "extra")
    optimizer_state = None if optimizer is None else optimizer.state_dict()
    _check_plain(optimizer_state, "optimizer.state_dict()")
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "hierarchy": json.dumps(hierarchy.to_dict(), separators=(",", ":"), allow_nan=False),
        "head": {
            "in_features": head.in_features,
            "bias": head.linear.bias is not None,
            "dtype": str(head.linear.weight.dtype).removeprefix("torch."),
            "state": head.state_dict(),
        },
        "loss": {
            "config": {name: getattr(loss_fn, name) for name in _LOSS_CONFIG},
            "level_sizes": list(loss_fn.level_sizes),
            "state": loss_fn.state_dict(),
        },
        "adapter": None if adapter is None else {"class": type(adapter).__name__, "state": adapter.state_dict()},
        "optimizer": optimizer_state,
        "extra": extra,
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str, map_location) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # an unpickling error names what was refused
        raise ValueError(f"checkpoint {path!r}: not readable as a weights-only torch file ({error})") from None
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT_NAME:
        raise ValueError(f"checkpoint {path!r}: not an lmm_fast checkpoint (no format {FORMAT_NAME!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path!r}: format_version {payload.get('format_version')!r}, this version reads {FORMAT_VERSION}"
        )
    missing = {"hierarchy", "head", "loss", "adapter", "optimizer", "extra"} - set(payload)
    if missing:
        raise ValueError(f"checkpoint {path!r}: missing {sorted(missing)}")
    return payload


def _new_head(saved: Mapping[str, Any], hierarchy: Hierarchy) -> LMMHead:
    # Building a head draws its initial weights; they are overwritten at once,
    # and the caller's random stream must not move (it may just have been
    # restored from `extra`).
    with torch.random.fork_rng(devices=[]):
        return LMMHead(int(saved["in_features"]), hierarchy, bias=bool(saved["bias"]),
                       dtype=getattr(torch, saved["dtype"]))


def _new_loss(saved: Mapping[str, Any]) -> FusedLMMLoss:
    sizes = [int(s) for s in saved["level_sizes"]]
    n = sizes[-1]
    # placeholder Ψ of the right shapes; load_state_dict writes the saved one
    psi = [torch.full((k, n), 1.0 / n) for k in sizes[:-1]]
    # a class weight is a buffer only when given: a placeholder makes room for it
    weight = torch.ones(n) if "weight" in saved["state"] else None
    return FusedLMMLoss(psi, None, num_classes=n, weight=weight, **dict(saved["config"]))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    head: LMMHead | None = None,
    loss_fn: FusedLMMLoss | None = None,
    adapter: GibbsAdapter | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device | None = "cpu",
) -> Checkpoint:
    """Restores a run saved by :func:`save_checkpoint`.

    Objects passed in get their state restored in place (the usual way to
    resume: build the run as at the start, then load); the others are built
    from the file (on the CPU; move them with ``.to()``). The adapter is
    restored last, after the loss whose Ψ it owns; when only ``adapter`` is
    given, its loss is ``loss_fn``. A plain :class:`~lmm_fast.GibbsAdapter` is
    rebuilt from the file; another adapter class must be passed in. Build an
    optimizer over the restored parameters afterwards and load
    ``Checkpoint.optimizer_state`` into it, or pass it here.

    Returns:
        a :class:`Checkpoint`.

    Raises:
        ValueError: the file is not an lmm_fast checkpoint, or its parts do
        not fit the objects passed (levels, shapes, the adapter's
        ``non_overlapping`` or training targets).
    """
    path = os.fspath(path)
    payload = _read(path, map_location)
    hierarchy = Hierarchy.from_dict(json.loads(payload["hierarchy"]), source=f"checkpoint {path!r}")
    sizes = list(hierarchy.level_sizes) + [hierarchy.num_classes]
    if adapter is not None:
        if loss_fn is None:
            loss_fn = adapter.loss_fn
        elif adapter.loss_fn is not loss_fn:
            raise ValueError("adapter adapts another loss than loss_fn")
    for name, module in (("head", head), ("loss_fn", loss_fn)):
        if module is not None and list(module.level_sizes) != sizes:
            raise ValueError(f"checkpoint {path!r} is for levels {sizes}, {name} has {list(module.level_sizes)}")

    head = _new_head(payload["head"], hierarchy) if head is None else head
    head.load_state_dict(payload["head"]["state"])
    loss_fn = _new_loss(payload["loss"]) if loss_fn is None else loss_fn
    loss_fn.load_state_dict(payload["loss"]["state"])

    saved_adapter = payload["adapter"]
    if saved_adapter is not None:
        state = saved_adapter["state"]
        if adapter is None:
            if saved_adapter["class"] != GibbsAdapter.__name__:
                raise ValueError(
                    f"checkpoint {path!r} holds a {saved_adapter['class']}'s state: build one as at the start "
                    f"of the run and pass it as adapter=... to restore it"
                )
            adapter = GibbsAdapter(loss_fn, hierarchy, state["train_targets"], non_overlapping=state["non_overlapping"],
                                   seed=state["seed"], prior=state.get("prior", "per_class"))
        adapter.load_state_dict(state)
    elif adapter is not None:
        raise ValueError(f"checkpoint {path!r} was saved without an adapter, but adapter= was passed")

    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"checkpoint {path!r} was saved without an optimizer, but optimizer= was passed")
        optimizer.load_state_dict(payload["optimizer"])
    return Checkpoint(hierarchy, head, loss_fn, adapter, optimizer, payload["optimizer"], payload["extra"])
