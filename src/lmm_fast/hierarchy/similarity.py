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
        if highest >= y.numel():
            # every class in [0, highest] needs a sample: refused before the
            # id sizes a count
            raise ValueError(
                f"labels holds class id {highest} but there are only {y.numel()} samples: every class "
                f"0..{highest} would need one (class ids must be 0..N-1)"
            )
        num_classes = highest + 1
    else:
        num_classes = operator.index(num_classes)
        if highest >= num_classes:
            raise ValueError(f"labels must be < num_classes = {num_classes}, found {highest}")
        if num_classes > y.numel():
            raise ValueError(
                f"num_classes = {num_classes} but there are only {y.numel()} samples: every class needs one"
            )
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
    means = sums / counts.to(x.dtype).unsqueeze(1)
    if x.dtype != torch.float64 and not bool(torch.isfinite(means).all()):
        # The float32 sums overflowed (features near the float32 limit); the
        # means of finite features are finite, so sum in float64.
        sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
        sums.index_add_(0, y, x.double())
        means = (sums / counts.to(torch.float64).unsqueeze(1)).to(x.dtype)
    return means


# Rows whose largest entry lies outside [2^-32, 2^32] are rescaled by a power
# of two before any distance is formed: squared distances of float32 rows
# overflow from about 1e19 on (and of float64 rows from 1e154), and an
# overflow makes every later comparison NaN. A power-of-two factor is exact,
# so the distances only change by that factor and the clustering not at all.
_SAFE_EXPONENT = 32
# Rows far from the origin compared with their spread (all near 1e18, say)
# lose their differences in ||a||^2 - 2 a.b + ||b||^2; below this ratio of
# spread to magnitude they are centred first, in float64 (Euclidean only:
# a translation leaves Euclidean distances unchanged, not cosine ones).
_CENTRE_RATIO = 2.0**-10


def condition_points(means: torch.Tensor, metric: str) -> tuple[torch.Tensor, float]:
    """Rows in the metric's geometry, in a range where distances are safe to form.

    Returns ``(points, scale)``: the rows to compute with and the factor of
    their distances, ``d(means_i, means_j) = scale * d(points_i, points_j)``
    (1.0 for the cosine metric, which ignores the scale). Rows of ordinary
    magnitude are returned as :func:`prepare_points` gives them (``scale`` 1);
    rows that had to be rescaled or centred come back in float64, whose range
    keeps the small differences of rows that span many orders of magnitude.
    """
    x = means
    scale = 1.0
    if x.numel():
        wide = x.detach().double()
        largest = float(wide.abs().max())
        if metric == "euclidean" and largest > 0:
            spread = float((wide - wide.mean(0)).abs().max())
            if spread < largest * _CENTRE_RATIO:
                wide = wide - wide.mean(0)
                x = wide
                largest = spread
        if largest > 0:
            exponent = math.frexp(largest)[1]
            if metric == "euclidean" and exponent > 1000:
                # d = scale * d(points) would not be a float64 any more
                raise ValueError(
                    f"means: entries up to {largest:.3g} are too large, their distances overflow "
                    f"float64; rescale the class representations"
                )
            if abs(exponent) > _SAFE_EXPONENT:
                x = wide * 2.0**-exponent
                if metric == "euclidean":
                    scale = 2.0**exponent
    return prepare_points(x, metric), scale


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
    x, scale = condition_points(as_float_matrix(means, "means"), metric)
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
    sigma *= scale
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"means: the distances between class representations are not finite (sigma = {sigma}); "
            f"their largest entry is {float(as_float_matrix(means, 'means').abs().max()):.3g}"
        )
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
    means = as_float_matrix(means, "means")
    if sigma is None:
        sigma = self_tuning_sigma(means, metric=metric)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    x, scale = condition_points(means, metric)
    s = _pairwise_distance(x, x, metric).div_(-(sigma / scale)).exp_()
    s.fill_diagonal_(1.0)
    return s
