"""Loads the compiled operator library (``lmm_fast._C``), which registers the
``torch.ops.lmm_fast`` operators, and says what it was built with."""
from __future__ import annotations

import torch

try:
    from lmm_fast import _C  # noqa: F401  (loads the library, registering the operators)
except ImportError as error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "lmm_fast's compiled operator library (lmm_fast._C) could not be loaded from "
        f"{__file__.rsplit('/', 2)[0]}: {error}. Install the package with "
        "`pip install --no-build-isolation .`; in a source checkout, `pip install -e .` "
        "or `python setup.py build_ext --inplace` builds it into src/lmm_fast."
    ) from error

__all__ = ["accumulate_dtype", "has_cuda_kernels", "check_one_device"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of Ψ, θ and the saved statistics for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_cuda_kernels() -> bool:
    """True when the library was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("lmm_fast::lmm_loss_forward", "CUDA")


def check_one_device(op: str, **tensors) -> None:
    """All tensor arguments of ``op`` on one device (``None`` entries skipped).

    The fake kernels call it: a meta tensor among CPU tensors dispatches the
    whole call to the fake kernel, which would otherwise return uninitialised
    tensors on the CPU. The C++ kernels check the same before reading any
    pointer.
    """
    first_name, first_device = None, None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if first_name is None:
            first_name, first_device = name, tensor.device
        elif tensor.device != first_device:
            raise RuntimeError(
                f"lmm_fast::{op}: {name} is on {tensor.device} but {first_name} is on {first_device}; "
                f"all tensor arguments must be on one device"
            )
