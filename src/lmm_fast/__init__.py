"""lmm_fast: the level-wise mixture model (LMM) tree classifier as fused
PyTorch custom ops.

``FusedLMMLoss`` replaces ``nn.CrossEntropyLoss`` with a mixture of softmax
classifiers over the levels of a class hierarchy.
"""
from __future__ import annotations

import torch

from lmm_fast import ops
from lmm_fast.ops import has_cuda_kernels
from lmm_fast.loss import FusedLMMLoss, default_theta
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.head import LMMHead
from lmm_fast import metrics, predict
from lmm_fast.predict import predict_topk, prepare_for_inference
from lmm_fast import calibration, theta
from lmm_fast.adaptation import GibbsAdapter, GuardedGibbsAdapter
from lmm_fast import adaptation, train
from lmm_fast.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``lmm_fast.remedies`` (the remedies' former home) for one release.
    if name == "remedies":
        import importlib

        return importlib.import_module("lmm_fast.remedies")
    raise AttributeError(f"module 'lmm_fast' has no attribute {name!r}")

__all__ = [
    "FusedLMMLoss",
    "Hierarchy",
    "GibbsAdapter",
    "train",
    "LMMHead",
    "metrics",
    "predict",
    "predict_topk",
    "prepare_for_inference",
    "save_checkpoint",
    "load_checkpoint",
    "Checkpoint",
    "GuardedGibbsAdapter",
    "adaptation",
    "calibration",
    "theta",
    "ops",
    "build_info",
    "default_theta",
    "has_cuda_kernels",
]


def build_info() -> dict:
    """What this installation was built with.

    Returns a dict with ``"backends"`` (``"CPU"`` or ``"CPU+CUDA"``: which
    kernels the compiled library holds), ``"cuda_kernels"`` (bool),
    ``"torch"`` (the running torch version), ``"torch_cuda"`` (the CUDA
    version of that torch, or None) and ``"cuda_available"`` (whether a GPU
    can be used now).
    """
    cuda = has_cuda_kernels()
    return {
        "version": __version__,
        "backends": "CPU+CUDA" if cuda else "CPU",
        "cuda_kernels": cuda,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
