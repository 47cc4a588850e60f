"""Pure numpy/PyTorch references of the collapsed Gibbs sampler (paper Eq. 4-6).

Two kinds of reference live here:

* **bit-exact replicas** of the C++/CUDA kernels (:func:`gibbs_sample_reference`,
  :func:`gibbs_sample_exact_reference`): the same Philox4x32-10 stream, the same
  float32 operations in the same order and the same fixed-point inverse CDF
  (see ``csrc/gibbs_common.h``), so they return the very labels the kernels
  return; slow, for tests.
* **the mathematics** in float64: :func:`conditional_probabilities` (Eq. 4),
  :func:`psi_from_counts_reference` (Eq. 6 and the non-overlapping
  constraint), :func:`psi_factors_reference` (the same, factored as the
  adapter stores it in the loss) and :func:`joint_posterior` (the exact joint posterior of a tiny
  problem, the oracle of the exact sampler).
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "philox4x32_10",
    "label_draw",
    "exp_negated",
    "candidate_weights",
    "sample_level_reference",
    "gibbs_sample_reference",
    "gibbs_sample_exact_reference",
    "gibbs_sample_torch",
    "conditional_probabilities",
    "counts_from_labels",
    "psi_from_counts_reference",
    "psi_factors_reference",
    "joint_posterior",
]

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_FIXED_BITS = 40


def philox4x32_10(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of ``counters`` ``[M, 4]`` (uint32 words) under the 64-bit
    ``key`` ``(k0, k1)``; returns ``[M, 4]`` uint32 (Random123's convention)."""
    c = [np.asarray(counters, dtype=np.uint64)[:, i].copy() for i in range(4)]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
            p0 & _MASK32,
        ]
    return np.stack(c, axis=1).astype(np.uint32)


def label_draw(seed: int, step: int, image_ids: np.ndarray, level: int) -> np.ndarray:
    """The 64 random bits of each image's draw at ``level`` in ``step``: key =
    seed, counter = (step low, step high, image, level); uint64 ``[len(image_ids)]``."""
    ids = np.asarray(image_ids, dtype=np.int64).astype(np.uint64)
    seed &= (1 << 64) - 1
    step &= (1 << 64) - 1
    counters = np.zeros((ids.size, 4), dtype=np.uint64)
    counters[:, 0] = step & 0xFFFFFFFF
    counters[:, 1] = step >> 32
    counters[:, 2] = ids & _MASK32
    counters[:, 3] = level
    out = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)).astype(np.uint64)
    return (out[:, 1] << np.uint64(32)) | out[:, 0]


def _f32(x: float) -> np.float32:
    return np.float32(x)


def exp_negated(y: np.ndarray) -> np.ndarray:
    """float32 ``exp(-y)`` exactly as the kernels compute it (0 for y above
    about 87.7, +inf, NaN or negative y)."""
    bits = (np.asarray(y, dtype=np.float32) + np.float32(0.0)).view(np.uint32)  # -0 -> +0
    bits = np.minimum(bits, np.uint32(0x42B00000))
    x = (bits | np.uint32(0x80000000)).view(np.float32)
    v = x * _f32(1.44269504088896341)
    n = (v + _f32(12582912.0)) - _f32(12582912.0)
    r = (x - n * _f32(0.693359375)) + n * _f32(2.12194440e-4)
    r2 = r * r
    p = np.full_like(r, _f32(1.9875691500e-4))
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + _f32(c)
    p = (p * r2 + r) + _f32(1.0)
    biased = (n.astype(np.int32) + np.int32(127)).astype(np.uint32)
    return p * (biased << np.uint32(23)).view(np.float32)


def candidate_weights(
    logits: np.ndarray, max_logit: np.float32, counts: np.ndarray, totals: np.ndarray,
    beta_y: np.float32, beta0: np.float32,
) -> np.ndarray:
    """float32 unnormalised Eq. 4 weights of one level's candidates, as the
    kernels compute them (counts/totals already exclude the image)."""
    e = exp_negated(np.float32(max_logit) - np.asarray(logits, dtype=np.float32))
    numerator = np.asarray(counts).astype(np.float32) + np.float32(beta_y)
    reciprocal = np.float32(1.0) / (np.asarray(totals).astype(np.float32) + np.float32(beta0))
    w = e * (numerator * reciprocal)
    bits = w.view(np.uint32)
    valid = (bits - np.uint32(1)) < np.uint32(0x7F7FFFFF)
    return np.where(valid, w, np.float32(0.0)).astype(np.float32)


def sample_level_reference(
    logits: np.ndarray, counts: np.ndarray, totals: np.ndarray, beta_y: float, beta0: float,
    old: int, random: int,
) -> int:
    """One draw, bit-exact with the kernels: ``counts``/``totals`` ``[N_l]`` are
    the image's class row of Ω and n at this level, not yet excluding ``old``."""
    x = np.asarray(logits).astype(np.float32)
    finite = x[~np.isnan(x)]
    max_logit = np.float32(finite.max()) if finite.size else np.float32(-np.inf)
    counts = np.asarray(counts, dtype=np.int64).copy()
    totals = np.asarray(totals, dtype=np.int64).copy()
    counts[old] -= 1
    totals[old] -= 1
    w = candidate_weights(x, max_logit, counts.astype(np.int32), totals.astype(np.int32),
                          np.float32(beta_y), np.float32(beta0))
    max_weight = w.max()
    if not max_weight > 0:
        return int(old)
    exponent = max(int((np.array([max_weight], dtype=np.float32).view(np.uint32)[0] >> 23) & 0xFF) - 127, -126)
    scale = math.ldexp(1.0, _FIXED_BITS - 1 - exponent)
    shifted = w.astype(np.float64) * np.float64(scale) + np.float64(2.0**52)
    q = (shifted.view(np.int64) - np.int64(0x4330000000000000)).astype(np.uint64)
    total = int(q.sum(dtype=np.uint64))
    target = (int(random) * total) >> 64
    prefix = np.cumsum(q, dtype=np.uint64)
    return int(np.searchsorted(prefix, np.uint64(target), side="right"))


def _as_np(t: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, Tensor):
        t = t.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()  # exact, as the kernels' conversion
        return t.numpy()
    return np.asarray(t)


def _level_offsets(level_sizes: Sequence[int]) -> list[int]:
    return [0] + list(itertools.accumulate(level_sizes[:-2]))


def gibbs_sample_reference(
    logits, target, old_labels, counts_t, group_totals, beta, beta0: float,
    level_sizes: Sequence[int], seed: int, step: int, image_ids,
) -> Tensor:
    """Bit-exact replica of :func:`lmm_fast.ops.gibbs.gibbs_sample` (batched:
    every image excludes only itself from the unchanged counts). Same
    arguments; returns ``[B, L-1]`` int64 on the CPU."""
    x, y = _as_np(logits), _as_np(target)
    old, counts, totals = _as_np(old_labels), _as_np(counts_t), _as_np(group_totals)
    b_np, ids = _as_np(beta).astype(np.float32), _as_np(image_ids)
    offsets = _level_offsets(level_sizes)
    out = np.empty(old.shape, dtype=np.int64)
    for level, (offset, size) in enumerate(zip(offsets, level_sizes[:-1])):
        random = label_draw(seed, step, ids, level)
        for b in range(x.shape[0]):
            cols = slice(offset, offset + size)
            out[b, level] = sample_level_reference(
                x[b, cols], counts[y[b], cols], totals[cols], b_np[y[b]], np.float32(beta0),
                int(old[b, level]), int(random[b]),
            )
    return torch.from_numpy(out)


def gibbs_sample_exact_reference(
    logits, target, old_labels, counts_t, group_totals, beta, beta0: float,
    level_sizes: Sequence[int], seed: int, step: int, image_ids,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bit-exact replica of the exact sequential sampler. Returns
    ``(labels [B, L-1], counts_t, group_totals)``, the counts as updated copies."""
    x, y = _as_np(logits), _as_np(target)
    old = _as_np(old_labels)
    counts, totals = _as_np(counts_t).copy(), _as_np(group_totals).copy()
    b_np, ids = _as_np(beta).astype(np.float32), _as_np(image_ids)
    offsets = _level_offsets(level_sizes)
    randoms = [label_draw(seed, step, ids, level) for level in range(len(level_sizes) - 1)]
    out = np.empty(old.shape, dtype=np.int64)
    for b in range(x.shape[0]):
        for level, (offset, size) in enumerate(zip(offsets, level_sizes[:-1])):
            cols = slice(offset, offset + size)
            s = int(old[b, level])
            t = sample_level_reference(x[b, cols], counts[y[b], cols], totals[cols], b_np[y[b]],
                                       np.float32(beta0), s, int(randoms[level][b]))
            out[b, level] = t
            counts[y[b], offset + s] -= 1
            totals[offset + s] -= 1
            counts[y[b], offset + t] += 1
            totals[offset + t] += 1
    return torch.from_numpy(out), torch.from_numpy(counts), torch.from_numpy(totals)


def gibbs_sample_torch(
    logits: Tensor, target: Tensor, old_labels: Tensor, counts_t: Tensor, group_totals: Tensor,
    beta: Tensor, beta0: float, level_sizes: Sequence[int], generator: torch.Generator | None = None,
) -> Tensor:
    """The batched sampler as one would write it in PyTorch (softmax, gathered
    counts, ``torch.multinomial``), on any device: the kernels' distribution,
    not their draws (torch's generator instead of the keyed Philox stream).
    The speed baseline of the benchmarks. Arguments as
    :func:`lmm_fast.ops.gibbs.gibbs_sample`; returns ``[B, L-1]`` int64."""
    out = []
    offsets = _level_offsets(level_sizes)
    for level, (offset, size) in enumerate(zip(offsets, level_sizes[:-1])):
        z = torch.softmax(logits[:, offset : offset + size].float(), dim=1)
        own = torch.nn.functional.one_hot(old_labels[:, level], size).to(z.dtype)
        counts = counts_t[target, offset : offset + size].to(z.dtype) - own
        totals = group_totals[offset : offset + size].to(z.dtype) - own
        w = z * (counts + beta[target, None].to(z.dtype)) / (totals + beta0)
        out.append(torch.multinomial(w, 1, generator=generator).squeeze(1))
    return torch.stack(out, dim=1)


def conditional_probabilities(
    logits: Tensor, counts: Tensor, totals: Tensor, beta_y: float, beta0: float, old: int,
) -> Tensor:
    """Eq. 4 in float64 for one image at one level: ``P(t_i = t | rest)`` ``[N_l]``.

    ``logits``: ``[N_l]``; ``counts``: ``[N_l]`` the image's class column of Ω
    and ``totals`` ``[N_l]`` the group sizes, both still counting the image
    under its label ``old``."""
    counts = counts.to(torch.float64).clone()
    totals = totals.to(torch.float64).clone()
    counts[old] -= 1
    totals[old] -= 1
    log_w = torch.log_softmax(logits.to(torch.float64), 0) + torch.log(counts + beta_y) - torch.log(totals + beta0)
    return torch.softmax(log_w, 0)


def counts_from_labels(labels: Tensor, targets: Tensor, level_sizes: Sequence[int]) -> list[Tensor]:
    """Ω^l ``[N_l, N]`` (int64) of every upper level from the labels
    ``[Ξ, L-1]`` and the classes ``[Ξ]`` of all images (Eq. 5)."""
    n = level_sizes[-1]
    out = []
    for level, size in enumerate(level_sizes[:-1]):
        flat = labels[:, level].long() * n + targets.long()
        out.append(torch.bincount(flat.cpu(), minlength=size * n).reshape(size, n))
    return out


def psi_from_counts_reference(
    counts: Sequence[Tensor], beta: Tensor | float, beta0: float | None = None,
    non_overlapping: bool = False,
) -> list[Tensor]:
    """Ψ per upper level from the counts, in float64.

    Eq. 6: ``Ψ[t, y] = (Ω[t, y] + β_y) / (n_t + β_0)``. With the
    non-overlapping constraint each class keeps only its best group
    ``argmax_t Ψ[t, y]`` (lowest t on ties) and every group's row is
    renormalised over the classes it keeps; a group that keeps no class keeps
    its unconstrained Eq. 6 row (so every row stays a distribution).

    Args:
        counts: ``[N_l, N]`` integer Ω^l per upper level.
        beta: float or ``[N]``; beta0: ``β_0`` (default ``Σ_y β_y``).
    """
    out = []
    for omega in counts:
        omega = omega.to(torch.float64).cpu()
        n = omega.shape[1]
        b = torch.as_tensor(beta, dtype=torch.float64).expand(n)
        b0 = float(b.sum()) if beta0 is None else float(beta0)
        num = omega + b[None, :]
        dense = num / (omega.sum(1, keepdim=True) + b0)
        if not non_overlapping:
            out.append(dense)
            continue
        owner = dense.argmax(0)
        keep = torch.zeros_like(dense, dtype=torch.bool)
        keep[owner, torch.arange(n)] = True
        kept = torch.where(keep, num, torch.zeros_like(num))
        z = kept.sum(1, keepdim=True)
        empty = keep.sum(1) == 0
        psi = torch.where(empty[:, None], dense, kept / torch.where(z > 0, z, torch.ones_like(z)))
        out.append(psi)
    return out


def psi_factors_reference(
    counts: Sequence[Tensor], beta: Tensor | float, beta0: float | None = None,
    non_overlapping: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`psi_from_counts_reference` in the factored form the adapter keeps
    in the loss (``Ψ[t, y] = numerator[t, y] · scale[t]``), float64.

    Without the constraint ``numerator = Ω + β`` and ``scale = 1 / (n_t + β_0)``.
    With it, ``numerator[t, y] = Ω[t, y] + β_y`` if ``t`` owns ``y`` (its
    argmax group of Eq. 6, lowest t on ties) else 0, and
    ``scale[t] = 1 / Σ_{y owned by t} (Ω[t, y] + β_y)``; a group that owns no
    class keeps its unconstrained pair.

    Returns: one ``(numerator [N_l, N], scale [N_l])`` pair per upper level.
    """
    out = []
    for omega in counts:
        omega = omega.to(torch.float64).cpu()
        n = omega.shape[1]
        b = torch.as_tensor(beta, dtype=torch.float64).expand(n)
        b0 = float(b.sum()) if beta0 is None else float(beta0)
        num = omega + b[None, :]
        eq6_scale = 1.0 / (omega.sum(1) + b0)
        if not non_overlapping:
            out.append((num, eq6_scale))
            continue
        owner = (num * eq6_scale[:, None]).argmax(0)
        keep = torch.zeros_like(num, dtype=torch.bool)
        keep[owner, torch.arange(n)] = True
        empty = keep.sum(1) == 0
        kept = torch.where(keep | empty[:, None], num, torch.zeros_like(num))
        z = torch.where(keep, num, torch.zeros_like(num)).sum(1)
        scale = torch.where(empty, eq6_scale, 1.0 / torch.where(empty, torch.ones_like(z), z))
        out.append((kept, scale))
    return out


def joint_posterior(
    probabilities: Tensor, classes: Sequence[int], num_classes: int, beta: float | Tensor,
) -> dict[tuple[int, ...], float]:
    """Exact joint posterior of the group labels of a tiny problem (one level).

    ``P(t_1..t_I) ∝ Π_i z_i(t_i) · Π_t DM(Ω[t, :] | β)``, with ``z_i``
    ``probabilities[i]`` (``[I, K]``, fixed) and the Dirichlet-multinomial
    marginal ``DM(ω | β) = Γ(β_0)/Γ(n + β_0) Π_y Γ(ω_y + β_y)/Γ(β_y)`` of each
    group's class counts. Enumerates all ``K^I`` configurations; returns
    {configuration: probability}.
    """
    z = probabilities.to(torch.float64)
    images, groups = z.shape
    b = torch.as_tensor(beta, dtype=torch.float64).expand(num_classes)
    b0 = float(b.sum())
    log_gamma_b = torch.lgamma(b)
    logs = {}
    for config in itertools.product(range(groups), repeat=images):
        omega = torch.zeros(groups, num_classes, dtype=torch.float64)
        for i, t in enumerate(config):
            omega[t, classes[i]] += 1
        log_p = sum(math.log(float(z[i, t])) for i, t in enumerate(config))
        for t in range(groups):
            log_p += math.lgamma(b0) - math.lgamma(float(omega[t].sum()) + b0)
            log_p += float((torch.lgamma(omega[t] + b) - log_gamma_b).sum())
        logs[config] = log_p
    top = max(logs.values())
    total = sum(math.exp(v - top) for v in logs.values())
    return {k: math.exp(v - top) / total for k, v in logs.items()}
