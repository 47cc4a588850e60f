"""Typed wrappers of the collapsed Gibbs operators (``torch.ops.lmm_fast.gibbs_*``)
and their fake (meta) kernels.

The sampling ops return integer labels and are not differentiable; callers
pass detached logits (:class:`lmm_fast.GibbsAdapter` does).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lmm_fast.ops.library import check_one_device  # (importing it loads the library, registering the ops)

__all__ = ["gibbs_apply_moves", "gibbs_check_batch", "gibbs_sample", "gibbs_sample_exact", "gibbs_refresh_psi", "gibbs_refresh_psi_entries",
           "gibbs_update_owners"]


def gibbs_sample(
    logits: Tensor,
    target: Tensor,
    old_labels: Tensor,
    counts_t: Tensor,
    group_totals: Tensor,
    beta: Tensor,
    beta0: float,
    level_sizes: Sequence[int],
    seed: int,
    step: int,
    image_ids: Tensor,
) -> Tensor:
    """Draw new group labels for a mini-batch at every upper level (Eq. 4).

    Every image is conditioned on the counts minus its own current label only
    (the batch is sampled in parallel, as AD-LDA does); the counts are not
    changed.

    Args:
        logits: ``[B, ΣN_l]`` packed logits, top level first (float32/64,
            float16, bfloat16), or their upper levels only
            ``[B, Σ_upper N_l]``; rows may be strided. Only the upper levels
            are read, as float32. A NaN or -inf logit's group is never drawn;
            a level without any finite logit (or with a +inf one) keeps the
            old label.
        target: ``[B]`` int64 classes.
        old_labels: ``[B, L-1]`` int64 current labels, level-local ids.
        counts_t: ``[N, Σ_upper N_l]`` int32 class-major Ω (row ``y`` holds
            ``Ω^l[:, y]`` of every upper level in level order), contiguous.
        group_totals: ``[Σ_upper N_l]`` int32 ``n_t``, contiguous.
        beta: ``[N]`` float32 Dirichlet prior; ``beta0``: ``β_0 > 0``.
        level_sizes: ``[N_1, …, N_{L-1}, N]``.
        seed, step: key and counter of the Philox stream; with
            ``image_ids`` ``[B]`` int64 (in ``[0, 2^32)``) they fix each draw.

    Returns:
        ``[B, L-1]`` int64 new labels.
    """
    return torch.ops.lmm_fast.gibbs_sample.default(
        logits, target, old_labels, counts_t, group_totals, beta, float(beta0),
        list(level_sizes), int(seed), int(step), image_ids,
    )


def gibbs_sample_exact(
    logits: Tensor,
    target: Tensor,
    old_labels: Tensor,
    counts_t: Tensor,
    group_totals: Tensor,
    beta: Tensor,
    beta0: float,
    level_sizes: Sequence[int],
    seed: int,
    step: int,
    image_ids: Tensor,
) -> Tensor:
    """The exact sequential collapsed Gibbs sampler: images one at a time in
    batch order, each seeing the counts its predecessors left. Updates
    ``counts_t`` and ``group_totals`` in place; arguments and result as
    :func:`gibbs_sample` (a batch of one gives the same label as there)."""
    return torch.ops.lmm_fast.gibbs_sample_exact.default(
        logits, target, old_labels, counts_t, group_totals, beta, float(beta0),
        list(level_sizes), int(seed), int(step), image_ids,
    )


def gibbs_refresh_psi(
    psi_t: Tensor,
    psi_scale: Tensor,
    counts_t: Tensor,
    group_totals: Tensor,
    beta: Tensor,
    beta0: float,
    columns: Tensor,
) -> None:
    """Eq. 6 on some columns (groups) of the class-major Ψ, in the factored form
    the loss reads (``Ψ^l[t, y] = psi_t[y, off_l + t] · psi_scale[off_l + t]``),
    in place: ``psi_t[:, c] = counts_t[:, c] + beta`` and
    ``psi_scale[c] = 1 / (group_totals[c] + beta0)``, each formed in float64
    from the integer counts and rounded once to Ψ's dtype.

    Args:
        psi_t: ``[N, Σ_upper N_l]`` float32/64, contiguous (e.g. a
            :class:`~lmm_fast.FusedLMMLoss`'s ``psi_t`` buffer).
        psi_scale: ``[Σ_upper N_l]``, ``psi_t``'s dtype, contiguous (the
            loss's ``psi_scale`` buffer).
        counts_t: int32, ``psi_t``'s shape; group_totals: ``[Σ_upper N_l]`` int32.
        beta: ``[N]`` float32; beta0: ``β_0 > 0``.
        columns: ``[C]`` int64 column indices (global, across the levels).
    """
    torch.ops.lmm_fast.gibbs_refresh_psi.default(psi_t, psi_scale, counts_t, group_totals, beta,
                                                 float(beta0), columns)
    _written(psi_t, psi_scale)


def gibbs_refresh_psi_entries(
    psi_t: Tensor,
    psi_scale: Tensor,
    counts_t: Tensor,
    group_totals: Tensor,
    beta: Tensor,
    beta0: float,
    rows: Tensor,
    columns: Tensor,
) -> None:
    """:func:`gibbs_refresh_psi` on single entries: for every ``i``,
    ``psi_t[rows[i], columns[i]] = counts_t[rows[i], columns[i]] + beta[rows[i]]``
    and ``psi_scale[columns[i]] = 1 / (group_totals[columns[i]] + beta0)``.
    ``rows`` (classes) and ``columns`` (global group columns) are ``[P]``
    int64; repeated pairs are allowed (they write the same value).

    A step changes Ω only at the (class, group) pairs of its images' old and
    new groups, so these are the only entries of Eq. 6 it changes.
    """
    torch.ops.lmm_fast.gibbs_refresh_psi_entries.default(psi_t, psi_scale, counts_t, group_totals, beta,
                                                         float(beta0), rows, columns)
    _written(psi_t, psi_scale)


def gibbs_update_owners(
    psi_t: Tensor,
    psi_scale: Tensor,
    owner: Tensor,
    numerator: Tensor,
    kept: Tensor,
    nonzero: Tensor,
    bound: Tensor,
    counts_t: Tensor,
    group_totals: Tensor,
    beta: Tensor,
    beta0: float,
    offset: int,
    size: int,
    classes: Tensor,
    old_groups: Tensor,
    new_groups: Tensor,
    full: bool = False,
) -> None:
    """The non-overlapping ("TC") Ψ of one upper level, its columns
    ``[offset, offset + size)``, and the owner state behind it, in place.

    ``psi_t[y, t] = Ω[t, y] + β_y`` where group ``t`` owns class ``y``
    (``owner(y) = argmax_t`` of Eq. 6, the lowest ``t`` on exact ties) or owns
    no class at all (it keeps its Eq. 6 row), else 0; ``psi_scale[t] = 1 /
    Σ_{y owned by t} (Ω[t, y] + β_y)``, or ``1 / (n_t + β_0)`` for a group that
    owns nothing.

    State (all updated in place, on ``psi_t``'s device): ``owner`` ``[N]``
    int64; ``numerator`` ``[N]`` float64 (``Ω[owner(y), y] + β_y``); ``kept``
    ``[size]`` int64 (classes owned per group); ``nonzero``
    ``[size, ceil(N / 64)]`` int64, bit ``y`` of row ``t`` set iff
    ``Ω[t, y] > 0``; ``bound`` ``[N]`` float64, at least the Eq. 6 value of
    every group but the owner (it spares the rescan of a class whose owner
    lost value but still beats it; not a function of the counts alone).

    ``full=True`` rebuilds the state and the level's block of Ψ from the
    counts (the moves are ignored). Otherwise the counts changed exactly by
    the moves ``classes[i]``: ``old_groups[i] → new_groups[i]`` (``[M]`` int64,
    level-local groups, each an image's label change) since the state was last
    updated (entries with ``old_groups[i] == new_groups[i]`` are ignored),
    and only the affected classes and groups are read and written;
    the result equals a full rebuild bit for bit.

    On CUDA it runs as a sequence of parallel kernels with the same results.
    """
    torch.ops.lmm_fast.gibbs_update_owners.default(
        psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t, group_totals, beta, float(beta0),
        int(offset), int(size), classes, old_groups, new_groups, bool(full),
    )
    _written(psi_t, psi_scale)


def gibbs_apply_moves(
    counts_t: Tensor,
    group_totals: Tensor,
    labels: Tensor,
    target: Tensor,
    image_ids: Tensor,
    old_labels: Tensor,
    new_labels: Tensor,
    level_sizes: Sequence[int],
) -> None:
    """Move a batch's images from their old to their new groups, in place.

    For every image ``b`` and upper level ``l``, Ω (``counts_t`` ``[N, Σ_upper
    N_l]`` int32, class-major) and ``n`` (``group_totals`` int32) lose one at
    ``(target[b], old_labels[b, l])`` and gain one at ``(target[b],
    new_labels[b, l])``; then ``labels[image_ids[b]] = new_labels[b]``
    (``labels`` ``[Ξ, L-1]`` int64, contiguous). One op instead of five
    indexing ops. ``image_ids`` must be distinct (the adapter checks it).
    Out-of-range values raise before anything is written, on the CPU and on
    CUDA alike (one host sync there).
    """
    torch.ops.lmm_fast.gibbs_apply_moves.default(
        counts_t, group_totals, labels, target, image_ids, old_labels, new_labels, list(level_sizes)
    )
    _written(counts_t, group_totals, labels)


def gibbs_check_batch(indices: Tensor, target: Tensor, train_targets: Tensor) -> Tensor:
    """Checks a batch of training-image ``indices`` ``[B]`` (with their classes
    ``target`` ``[B]``) against ``train_targets`` ``[Ξ]`` (all int64, one device).

    Returns int64 ``[3]``: the first position ``b`` with ``indices[b]`` outside
    ``[0, Ξ)``, the smallest image id that occurs more than once, and the first
    position with ``train_targets[indices[b]] != target[b]`` (among in-range
    indices); ``-1`` where there is none. One host read answers all three.
    """
    return torch.ops.lmm_fast.gibbs_check_batch.default(indices, target, train_targets)


def _written(*tensors: Tensor) -> None:
    # The C++ ops write through raw pointers, which does not bump the tensors'
    # version counters; the loss's caches (effective Ψ, tree index) are keyed
    # on them, so bump them here.
    for t in tensors:
        torch.autograd.graph.increment_version(t)


@torch.library.register_fake("lmm_fast::gibbs_sample")
def _gibbs_sample_fake(logits, target, old_labels, counts_t, group_totals, beta, beta0, level_sizes,
                       seed, step, image_ids):
    check_one_device("gibbs_sample", logits=logits, target=target, old_labels=old_labels, counts_t=counts_t,
                     group_totals=group_totals, beta=beta, image_ids=image_ids)
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(old_labels.dim() == 2, lambda: "lmm_fast: old_labels must be [B, L-1]")
    return torch.empty(old_labels.shape, dtype=old_labels.dtype, device=old_labels.device)


@torch.library.register_fake("lmm_fast::gibbs_sample_exact")
def _gibbs_sample_exact_fake(logits, target, old_labels, counts_t, group_totals, beta, beta0,
                             level_sizes, seed, step, image_ids):
    check_one_device("gibbs_sample_exact", logits=logits, target=target, old_labels=old_labels, counts_t=counts_t,
                     group_totals=group_totals, beta=beta, image_ids=image_ids)
    torch._check(logits.dim() == 2, lambda: "lmm_fast: logits must be 2-D")
    torch._check(old_labels.dim() == 2, lambda: "lmm_fast: old_labels must be [B, L-1]")
    return torch.empty(old_labels.shape, dtype=old_labels.dtype, device=old_labels.device)


@torch.library.register_fake("lmm_fast::gibbs_refresh_psi")
def _gibbs_refresh_psi_fake(psi_t, psi_scale, counts_t, group_totals, beta, beta0, columns):
    check_one_device("gibbs_refresh_psi", psi_t=psi_t, psi_scale=psi_scale, counts_t=counts_t,
                     group_totals=group_totals, beta=beta, columns=columns)
    return None


@torch.library.register_fake("lmm_fast::gibbs_refresh_psi_entries")
def _gibbs_refresh_psi_entries_fake(psi_t, psi_scale, counts_t, group_totals, beta, beta0, rows, columns):
    check_one_device("gibbs_refresh_psi_entries", psi_t=psi_t, psi_scale=psi_scale, counts_t=counts_t,
                     group_totals=group_totals, beta=beta, rows=rows, columns=columns)
    return None


@torch.library.register_fake("lmm_fast::gibbs_update_owners")
def _gibbs_update_owners_fake(psi_t, psi_scale, owner, numerator, kept, nonzero, bound, counts_t, group_totals,
                              beta, beta0, offset, size, classes, old_groups, new_groups, full):
    check_one_device("gibbs_update_owners", psi_t=psi_t, psi_scale=psi_scale, owner=owner, numerator=numerator,
                     kept=kept, nonzero=nonzero, bound=bound, counts_t=counts_t, group_totals=group_totals,
                     beta=beta, classes=classes, old_groups=old_groups, new_groups=new_groups)
    return None


@torch.library.register_fake("lmm_fast::gibbs_apply_moves")
def _gibbs_apply_moves_fake(counts_t, group_totals, labels, target, image_ids, old_labels, new_labels,
                            level_sizes):
    check_one_device("gibbs_apply_moves", counts_t=counts_t, group_totals=group_totals, labels=labels,
                     target=target, image_ids=image_ids, old_labels=old_labels, new_labels=new_labels)
    return None


@torch.library.register_fake("lmm_fast::gibbs_check_batch")
def _gibbs_check_batch_fake(indices, target, train_targets):
    check_one_device("gibbs_check_batch", indices=indices, target=target, train_targets=train_targets)
    return indices.new_empty(3)
