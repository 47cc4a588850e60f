"""Class representations (class means), the scale σ and the similarity of Eq. 3."""
from __future__ import annotations

import math
import operator

import torch

from lmm_fast.hierarchy.checks import ArrayLike, as_float_matrix, as_index_vector, check_choice



METRICS = ("euclidean", "cosine")
_SIGMA_NEIGHBOR = 7
_SIGMA_MAX_QUERIES = 2048
# Query rows per distance block: bounds the [rows, N] block at ~128 MB.
_DISTANCE_BLOCK_ELEMS = 1 << 25


# ---------------------------------------------------------------------------
# Class representations, sigma and similarity
# ---------------------------------------------------------------------------


def class_means(
    features: ArrayLike, labels: ArrayLike, num_classes: int | None = None
) -> torch.Tensor:
    """Mean feature of every class.

    Args:
        features: float [M, d], one deep feature per image (any device).
        labels: integer [M], the class of every image, in ``[0, num_classes)``.
        num_classes: N; default ``labels.max() + 1``. Every class needs at least
            one sample.

    Returns:
        float [N, d] on the features' device (float64 if the features are, else
        float32).
    """
    x = as_float_matrix(features, "features")
    y = as_index_vector(labels, "labels")
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels has {y.shape[0]} entries but features has {x.shape[0]} rows"
        )
    if y.numel() == 0:
        raise ValueError("features and labels are empty")
    y = y.to(x.device)
    lowest = int(y.min())
    if lowest < 0:
        raise ValueError(f"labels must be >= 0, found {lowest}")
    highest = int(y.max())
    if num_classes is None:
        num_classes = highest + 1
    else:
        num_classes = operator.index(num_classes)
        if highest >= num_classes:
            raise ValueError(f"labels must be < num_classes = {num_classes}, found {highest}")
    counts = torch.bincount(y, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten()
    if missing.numel():
        shown = missing[:10].tolist()
        raise ValueError(
            f"{missing.numel()} of {num_classes} classes have no samples in labels "
            f"(e.g. classes {shown}); every class needs at least one feature"
        )
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, y, x)
    return sums / counts.to(x.dtype).unsqueeze(1)


def prepare_points(means: torch.Tensor, metric: str) -> torch.Tensor:
    """Rows in the geometry the metric lives in (unit sphere for cosine)."""
    if metric == "cosine":
        norms = means.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            row = int((norms.flatten() == 0).nonzero()[0, 0])
            raise ValueError(
                f"class representation {row} is all zeros: the cosine metric is undefined"
            )
        return means / norms
    return means


def _pairwise_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """[n, m] distances between rows of a and b (rows already prepared)."""
    if metric == "cosine":
        return (1.0 - a @ b.T).clamp_min_(0.0)
    sq = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1).unsqueeze(0)
    return sq.clamp_min_(0.0).sqrt_()


def self_tuning_sigma(
    means: ArrayLike,
    *,
    metric: str = "euclidean",
    k: int = _SIGMA_NEIGHBOR,
    max_queries: int = _SIGMA_MAX_QUERIES,
    seed: int = 0,
) -> float:
    """The σ of Eq. 3: median over classes of the distance to the k-th nearest class.

    With ``S = exp(-d / σ)`` this puts a class's k-th neighbour at similarity
    about ``1/e`` in a typical class, whatever the scale and dimension of the
    features. For more than ``max_queries`` classes the median is estimated on a
    random sample of classes (exact neighbours among all N), so the cost is
    O(max_queries · N · d) instead of O(N² d).

    Args:
        means: float [N, d] class representations.
        metric: ``"euclidean"`` or ``"cosine"``.
        k: neighbour rank (clipped to N - 1).
        max_queries: number of classes on which the median is estimated.
        seed: seed of that sample.

    Returns:
        σ > 0 as a Python float.
    """
    check_choice(metric, "metric", METRICS)
    x = prepare_points(as_float_matrix(means, "means"), metric)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"means needs at least 2 classes to define a distance, got {n}")
    k = max(1, min(int(k), n - 1))
    if n > max_queries:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        queries = torch.randperm(n, generator=gen)[:max_queries].to(x.device)
    else:
        queries = torch.arange(n, device=x.device)
    block = max(1, _DISTANCE_BLOCK_ELEMS // n)
    kth = []
    for start in range(0, queries.numel(), block):
        rows = queries[start : start + block]
        dist = _pairwise_distance(x[rows], x, metric)
        # A class is not its own neighbour; mask it out rather than trusting d(x, x) = 0.
        dist[torch.arange(rows.numel(), device=x.device), rows] = float("inf")
        # topk with a small k is several times faster than kthvalue on CPU.
        kth.append(dist.topk(k, dim=1, largest=False).values[:, -1])
    kth_dist = torch.cat(kth).double()
    sigma = float(kth_dist.median())
    if not sigma > 0.0:
        # Many duplicated classes: fall back to the typical non-zero neighbour distance.
        positive = kth_dist[kth_dist > 0]
        sigma = float(positive.median()) if positive.numel() else 1.0
    return sigma


def similarity_matrix(
    means: ArrayLike, *, sigma: float | None = None, metric: str = "euclidean"
) -> torch.Tensor:
    """Eq. 3: ``S_ij = exp(-d(x_i, x_j) / σ)``, float [N, N] (O(N²) memory).

    Args:
        means: float [N, d] class representations.
        sigma: scale; default :func:`self_tuning_sigma`.
        metric: ``"euclidean"`` or ``"cosine"``.
    """
    check_choice(metric, "metric", METRICS)
    x = prepare_points(as_float_matrix(means, "means"), metric)
    if sigma is None:
        sigma = self_tuning_sigma(x, metric=metric)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    s = _pairwise_distance(x, x, metric).div_(-sigma).exp_()
    s.fill_diagonal_(1.0)
    return s
