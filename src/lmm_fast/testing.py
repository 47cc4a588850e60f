"""Shared pieces of the test suite and the benchmarks: devices, dtypes and
random problem generators (Ψ matrices and logits of a given level layout)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["devices", "cuda_available", "tree_psi", "dense_psi", "random_problem", "tolerances", "toy_task",
           "toy_loader"]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when a GPU is present."""
    return ["cpu"] + (["cuda"] if cuda_available() else [])


def tree_psi(level_sizes: Sequence[int], generator: torch.Generator | None = None) -> list[Tensor]:
    """One-hot (tree) Ψ for the upper levels of ``level_sizes`` (bottom last):
    nested random groups, none empty; ``Ψ[t, y] = 1 / C_t`` for the members."""
    num_classes = level_sizes[-1]
    psi, assignment = [], None
    # Build bottom-up so that every upper group is a union of lower groups.
    previous = torch.arange(num_classes)
    assignments = []
    for size in reversed(list(level_sizes[:-1])):
        lower = int(previous.max()) + 1
        parent = torch.cat([torch.arange(size), torch.randint(0, size, (lower - size,), generator=generator)])
        parent = parent[torch.randperm(lower, generator=generator)]
        assignment = parent[previous]
        assignments.append(assignment)
        previous = assignment
    for assignment in reversed(assignments):
        size = int(assignment.max()) + 1
        p = torch.zeros(size, num_classes)
        p[assignment, torch.arange(num_classes)] = 1.0
        psi.append(p / p.sum(dim=1, keepdim=True))
    return psi


def dense_psi(level_sizes: Sequence[int], generator: torch.Generator | None = None) -> list[Tensor]:
    """Dense Ψ (every entry positive, rows on the simplex), as after adaptation."""
    num_classes = level_sizes[-1]
    return [
        torch.softmax(2 * torch.randn(size, num_classes, generator=generator, dtype=torch.float64), dim=1).float()
        for size in level_sizes[:-1]
    ]


def random_problem(
    batch: int,
    level_sizes: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    dense: bool = False,
    scale: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(logits [B, ΣN_l], target [B], psi)`` with requires_grad logits."""
    psi = (dense_psi if dense else tree_psi)(level_sizes, generator)
    logits = scale * torch.randn(batch, sum(level_sizes), generator=generator, dtype=torch.float64)
    target = torch.randint(0, level_sizes[-1], (batch,), generator=generator)
    return logits.to(device=device, dtype=dtype).requires_grad_(), target.to(device), [p.to(device) for p in psi]


def tolerances(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing a kernel in ``dtype`` with a float64 reference."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


def toy_task(n_classes: int = 12, per_class: int = 20, dim: int = 6, seed: int = 0):
    """``(x [M, dim], y [M], hierarchy)``: Gaussian clusters, ``per_class`` rows
    per class, and a two-level hierarchy ``[2, 4]`` from their class means."""
    from lmm_fast.hierarchy import Hierarchy

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 3
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = centers[y] + torch.randn(y.numel(), dim, generator=g)
    return x, y, Hierarchy.from_features(x, y, [2, 4], seed=0)


def toy_loader(x: Tensor, y: Tensor, size: int = 32, seed: int = 0):
    """A re-iterable loader of shuffled ``(x, y, indices)`` mini-batches, as
    :func:`lmm_fast.train.fit_lmm` takes them."""
    g = torch.Generator().manual_seed(seed)

    class Loader:
        def __iter__(self):
            order = torch.randperm(y.numel(), generator=g)
            for s in range(0, y.numel(), size):
                i = order[s : s + size]
                yield x[i], y[i], i

    return Loader()
