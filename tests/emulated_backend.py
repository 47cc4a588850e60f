"""The emulated CUDA backend of the tests: the CUDA kernels of csrc/cuda,
compiled as host C++ against the emulated device of csrc/emulation and run on
the CPU, with the same host launchers as the CUDA ops.

It is a test-only library, built here from the checkout's sources (ninja,
cached in build/emulated, or in $LMM_FAST_EMULATED_BUILD_DIR) and loaded with
torch.ops.load_library. Its operators live in their own namespace,
``torch.ops.lmm_fast_emulated``, never in ``torch.ops.lmm_fast``; they take CPU
tensors. The package itself ships none of it.
"""
from __future__ import annotations

import contextlib
import glob
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "lmm_fast_emulated"

# The package's ops that have an emulated twin in torch.ops.lmm_fast_emulated.
OPS = (
    "lmm_loss_forward", "lmm_loss_backward",
    "lmm_predict_proba_tree", "lmm_predict_proba_dense", "lmm_topk_tree", "lmm_gather_scores",
    "gibbs_sample", "gibbs_sample_exact", "gibbs_refresh_psi", "gibbs_refresh_psi_entries",
    "gibbs_apply_moves", "gibbs_check_batch", "gibbs_update_owners",
)

_loaded = False


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "emulation", "*.cpp"))) + sorted(
        glob.glob(os.path.join(ROOT, "tests", "emulated", "*.cpp"))
    )


def load():
    """Builds (if needed) and loads the library; returns torch.ops.lmm_fast_emulated."""
    global _loaded
    if not _loaded:
        from torch.utils import cpp_extension

        import lmm_fast  # noqa: F401  (the emulated ops copy the schemas of its ops)

        build = os.environ.get("LMM_FAST_EMULATED_BUILD_DIR", os.path.join(ROOT, "build", "emulated"))
        os.makedirs(build, exist_ok=True)
        cpp_extension.load(
            name=NAME,
            sources=sources(),
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            # The kernels' float math must round like the device's (no
            # contraction into fused multiply-adds); -O1 keeps the build short.
            extra_cflags=["-O1", "-DLMM_FAST_CUDA_EMULATION", "-ffp-contract=off"],
            build_directory=build,
            is_python_module=False,
            verbose=False,
        )
        _register_fakes()
        _register_loss_autograd()
        _loaded = True
    return torch.ops.lmm_fast_emulated


def _register_fakes():
    # The emulated ops return what the package's ops return: their fake
    # kernels are the package's (so opcheck and torch.compile work on them).
    for name in OPS:
        op = getattr(torch.ops.lmm_fast, name).default

        def fake(*args, _op=op, **kwargs):
            return _op(*args, **kwargs)

        torch.library.register_fake(f"{NAME}::{name}", fake)


def _register_loss_autograd():
    # The gradient of the emulated loss forward with respect to the logits is
    # the emulated backward op, so that FusedLMMLoss runs forward and
    # backward on the emulated device under package_ops_emulated (the
    # package's own formula would call torch.ops.lmm_fast).
    def setup_context(ctx, inputs, output):
        logits, target, psi_t, theta, level_sizes, ignore_index, psi_scale, weight, label_smoothing = inputs
        _, lse, log_m = output
        ctx.save_for_backward(logits, target, psi_t, theta, lse, log_m, psi_scale, weight)
        ctx.args = (list(level_sizes), ignore_index, float(label_smoothing))
        ctx.mark_non_differentiable(lse, log_m)

    def backward(ctx, grad_loss, grad_lse, grad_log_m):
        logits, target, psi_t, theta, lse, log_m, psi_scale, weight = ctx.saved_tensors
        level_sizes, ignore_index, eps = ctx.args
        if any(ctx.needs_input_grad[1:]):
            raise NotImplementedError("the emulated loss op differentiates the logits only")
        grad = None
        if grad_loss is not None and ctx.needs_input_grad[0]:
            grad = torch.ops.lmm_fast_emulated.lmm_loss_backward(
                grad_loss.contiguous(), logits, target, psi_t, theta, lse, log_m, level_sizes, ignore_index,
                psi_scale, weight, eps,
            )
        return (grad,) + (None,) * 8

    torch.library.register_autograd(f"{NAME}::lmm_loss_forward", backward, setup_context=setup_context)
    # and, as the package's, it runs in float32 under autocast
    torch.library.register_autocast(f"{NAME}::lmm_loss_forward", "cpu", torch.float32)


@contextlib.contextmanager
def package_ops_emulated(*names: str):
    """Within the block, ``torch.ops.lmm_fast.<name>`` is the emulated op, so
    that the package's Python code (modules, the adapter) runs the emulated
    kernels on CPU tensors."""
    emulated = load()
    namespace = torch.ops.lmm_fast
    saved = {}
    for name in names or OPS:
        saved[name] = getattr(namespace, name)
        setattr(namespace, name, getattr(emulated, name))
    try:
        yield emulated
    finally:
        for name, packet in saved.items():
            setattr(namespace, name, packet)
