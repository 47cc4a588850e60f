"""Pure-PyTorch oracles of the prediction operators (any dtype, float64
included), used by the tests and the benchmarks."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lmm_fast.reference.loss import predict_proba_reference

__all__ = ["predict_proba_tree_reference", "predict_topk_reference", "gather_scores_reference"]




def predict_proba_tree_reference(
    logits: Tensor, group_index: Tensor, group_value: Tensor, theta: Tensor, level_sizes: Sequence[int]
) -> Tensor:
    """Pure-PyTorch oracle of :func:`lmm_fast.ops.predict.lmm_predict_proba_tree`
    (the dense Ψ rebuilt from the class → group map)."""
    n = level_sizes[-1]
    psi = []
    for level, size in enumerate(level_sizes[:-1]):
        p = torch.zeros(size, n, dtype=logits.dtype, device=logits.device)
        p[group_index[level].long(), torch.arange(n, device=logits.device)] = group_value[level].to(logits.dtype)
        psi.append(p)
    return predict_proba_reference(logits, psi, theta)


def predict_topk_reference(
    logits: Tensor | Sequence[Tensor], psi: Sequence[Tensor], theta: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch oracle of the top-k: full probabilities, then a stable
    descending sort, so equal probabilities are ordered by class index."""
    proba = predict_proba_reference(logits, psi, theta)
    values, indices = torch.sort(proba, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def gather_scores_reference(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """Pure-PyTorch oracle of :func:`lmm_gather_scores` (gathers a ``[B, C, d]`` copy)."""
    safe = rows.clamp_min(0)
    out = torch.bmm(weight[safe], x.unsqueeze(2)).squeeze(2)
    if bias is not None:
        out = out + bias[safe]
    return out.masked_fill(rows < 0, float("-inf"))
