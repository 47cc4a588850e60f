"""lmm_fast: the level-wise mixture model (LMM) tree classifier as fused
PyTorch custom ops.

``FusedLMMLoss`` replaces ``nn.CrossEntropyLoss`` with a mixture of softmax
classifiers over the levels of a class hierarchy.

``import lmm_fast`` imports torch and registers the ``torch.ops.lmm_fast``
operators. The command line (``lmm-fast``, ``python -m lmm_fast``) is the
exception: it parses its arguments, and answers ``--help``, before paying
for torch (about a second); the names below are then imported on first use.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names: name -> (module, attribute; None for the module itself).
# A new public name goes here and in the TYPE_CHECKING block below
# (tests/test_cli_startup.py checks that both agree).
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "FusedLMMLoss": ("lmm_fast.loss", "FusedLMMLoss"),
    "default_theta": ("lmm_fast.loss", "default_theta"),
    "Hierarchy": ("lmm_fast.hierarchy", "Hierarchy"),
    "LMMHead": ("lmm_fast.head", "LMMHead"),
    "FusedLinearLMMLoss": ("lmm_fast.linear_loss", "FusedLinearLMMLoss"),
    "linear_lmm_loss": ("lmm_fast.linear_loss", "linear_lmm_loss"),
    "GibbsAdapter": ("lmm_fast.adaptation", "GibbsAdapter"),
    "GuardedGibbsAdapter": ("lmm_fast.adaptation", "GuardedGibbsAdapter"),
    "predict_topk": ("lmm_fast.predict", "predict_topk"),
    "has_cuda_kernels": ("lmm_fast.ops", "has_cuda_kernels"),
    "ops": ("lmm_fast.ops", None),
    "metrics": ("lmm_fast.metrics", None),
    "predict": ("lmm_fast.predict", None),
    "calibration": ("lmm_fast.calibration", None),
    "theta": ("lmm_fast.theta", None),
    "adaptation": ("lmm_fast.adaptation", None),
    "train": ("lmm_fast.train", None),
    "decide": ("lmm_fast.decide", None),
    "prepare_for_inference": ("lmm_fast.predict", "prepare_for_inference"),
    "save_checkpoint": ("lmm_fast.checkpoint", "save_checkpoint"),
    "load_checkpoint": ("lmm_fast.checkpoint", "load_checkpoint"),
    "Checkpoint": ("lmm_fast.checkpoint", "Checkpoint"),
}

if TYPE_CHECKING:
    from lmm_fast import adaptation, calibration, decide, metrics, ops, predict, theta, train
    from lmm_fast.adaptation import GibbsAdapter, GuardedGibbsAdapter
    from lmm_fast.head import LMMHead
    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.linear_loss import FusedLinearLMMLoss, linear_lmm_loss
    from lmm_fast.loss import FusedLMMLoss, default_theta
    from lmm_fast.ops import has_cuda_kernels
    from lmm_fast.predict import predict_topk, prepare_for_inference
    from lmm_fast.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

__all__ = [*_EXPORTS, "build_info"]


def _resolve(name: str) -> Any:
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def _command_line_is_starting() -> bool:
    """True while the ``lmm-fast`` script or ``python -m lmm_fast[.…]`` imports this package."""
    argv = getattr(sys, "argv", None) or [""]  # an embedding interpreter may set none
    argv0 = argv[0]
    script = os.path.basename(argv0).lower()
    for suffix in (".exe", "-script.pyw", "-script.py"):
        script = script.removesuffix(suffix)
    if script == "lmm-fast":
        return True
    # Under -m, sys.argv[0] is "-m" while the package of the module is found.
    if argv0 != "-m":
        return False
    args = list(getattr(sys, "orig_argv", []))[1:]
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            module = args[i + 1]
        elif arg.startswith("-m") and len(arg) > 2:
            module = arg[2:]
        else:
            continue
        return module == "lmm_fast" or module.startswith("lmm_fast.")
    return False


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return _resolve(name)
    # ``lmm_fast.remedies`` (the remedies' former home) for one release.
    if name == "remedies":
        return importlib.import_module("lmm_fast.remedies")
    raise AttributeError(f"module 'lmm_fast' has no attribute {name!r}")


def build_info() -> dict:
    """What this installation was built with.

    Returns a dict with ``"backends"`` (``"CPU"`` or ``"CPU+CUDA"``: which
    kernels the compiled library holds), ``"cuda_kernels"`` (bool),
    ``"torch"`` (the running torch version), ``"torch_cuda"`` (the CUDA
    version of that torch, or None) and ``"cuda_available"`` (whether a GPU
    can be used now).
    """
    import torch

    from lmm_fast.ops import has_cuda_kernels

    cuda = has_cuda_kernels()
    return {
        "version": __version__,
        "backends": "CPU+CUDA" if cuda else "CPU",
        "cuda_kernels": cuda,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }


if not _command_line_is_starting():
    for _name in _EXPORTS:
        _resolve(_name)
    del _name
