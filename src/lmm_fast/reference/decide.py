"""Pure-PyTorch oracles of the decision rules (explicit N × N, float64),
for the tests and the benchmarks."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lmm_fast.decide.risk import lexsort_rows
from lmm_fast.decide.hedge import HedgeAnswer


def expected_distance_reference(proba: Tensor, hierarchy: Any) -> Tensor:
    """``proba @ D`` with ``D = hierarchy.tree_distance()`` ``[N, N]``, in float64."""
    distance = hierarchy.tree_distance(device=proba.device, dtype=torch.float64)
    return proba.to(torch.float64) @ distance


def crm_reference(proba: Tensor, hierarchy: Any, k: int) -> Tensor:
    """``[B, k]``: classes sorted by (reference risk ascending, probability
    descending, class index ascending) — a full sort per row."""
    risk = expected_distance_reference(proba, hierarchy)
    classes = torch.arange(proba.shape[1], device=proba.device).expand(proba.shape[0], -1)
    return lexsort_rows(classes, [(risk, False), (proba.to(torch.float64), True)])[:, :k]


def hedge_reference(proba: Tensor, hierarchy: Any, threshold: float, rule: str = "hedge") -> HedgeAnswer:
    """The rule written plainly: node probabilities from explicit membership
    matrices, then for each row the deepest eligible level."""
    p = proba.to(torch.float64)
    rows, n = p.shape
    level_probs = []
    for groups, size in zip(hierarchy.assignments, hierarchy.level_sizes):
        member = torch.zeros(n, size, dtype=torch.float64, device=p.device)
        member[torch.arange(n), groups.to(p.device)] = 1.0
        level_probs.append(p @ member)
    level_probs.append(p)
    bottom = len(level_probs)
    levels, nodes, values = [], [], []
    for i in range(rows):
        answer = (0, 0, 1.0)
        for depth in range(bottom, 0, -1):
            value, node = level_probs[depth - 1][i].max(dim=0)
            if rule == "hedge":
                eligible = float(value) > threshold
            elif rule == "top_class":
                eligible = depth == bottom and float(value) > threshold
            else:
                # the fallback is always eligible, except that +inf means the root for every rule
                eligible = (depth == bottom - 1 and threshold < math.inf) or (depth == bottom and float(value) > threshold)
            if eligible:
                answer = (depth, int(node), float(value))
                break
        levels.append(answer[0])
        nodes.append(answer[1])
        values.append(answer[2])
    return HedgeAnswer(
        torch.tensor(levels, dtype=torch.int64),
        torch.tensor(nodes, dtype=torch.int64),
        torch.tensor(values, dtype=torch.float64),
    )
