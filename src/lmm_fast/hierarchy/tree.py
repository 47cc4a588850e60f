"""Visual hierarchies for the level-wise mixture model (paper Section IV, Eq. 3).

A :class:`Hierarchy` describes the upper levels of the tree over ``N`` object
classes: level ``l`` (top first) partitions the classes into ``N_l`` groups, and
the bottom level (the classes themselves) is implicit. It is built from

* deep features and labels (:meth:`Hierarchy.from_features`: class means, then
  clustering),
* class representations directly (:meth:`Hierarchy.from_class_means`, e.g. the
  rows of a trained classifier's weight matrix),
* a confusion matrix (:meth:`Hierarchy.from_confusion`: one upper level of
  ``N`` groups with a dense Ψ, the paper's one-level LMM),
* a user's own tree: its levels (:meth:`Hierarchy.from_assignments`, group
  ids or names per class) or its edges (:meth:`Hierarchy.from_parents`, a
  taxonomy of any depth, see :mod:`lmm_fast.hierarchy.taxonomy`).

:meth:`Hierarchy.to_newick`, :meth:`Hierarchy.to_dot` and
:meth:`Hierarchy.export` write a tree for other tools
(:mod:`lmm_fast.hierarchy.formats`).

Clustering methods (keyword ``method=``):

``"balanced"`` (default)
    Top-down recursive balanced k-means in torch, on the device of the input.
    Exactly ``N_l`` non-empty groups per level, nested, and every group of level
    ``l`` has between ``max(1, floor(N / (balance * N_l)))`` and
    ``ceil(balance * N / N_l)`` classes (``balance=2.0`` by default). Memory is
    O(N d); no N x N matrix is formed, so it scales to 10^5 classes and more.
``"ward"``, ``"average"``, ``"complete"``
    One agglomerative linkage (scipy) cut at several heights, so levels nest by
    construction. ``"average"``/``"complete"`` cluster the dissimilarity
    ``1 - S_ij`` of Eq. 3; ``"ward"`` needs Euclidean geometry and clusters the
    class representations directly. O(N^2) memory: limited to
    ``MAX_DENDROGRAM_CLASSES`` classes. Group sizes are whatever the dendrogram
    gives (often one giant group and many singletons).

The similarity of Eq. 3 is ``S_ij = exp(-d(x_i, x_j) / sigma)`` with ``d`` the
Euclidean distance (``metric="euclidean"``) or the cosine distance
``1 - cos(x_i, x_j)`` (``metric="cosine"``). ``sigma`` is chosen by
:func:`self_tuning_sigma`: the median, over classes, of the distance from a
class to its k-th nearest other class (k = 7), a single-scale version of
Zelnik-Manor & Perona's local scaling; see docs/hierarchy.md for why.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lmm_fast.hierarchy.checks import (ArrayLike, as_float_matrix, as_index_vector, check_assignment, check_choice,
                                       check_class_names, check_level_sizes, nesting_violation, to_tensor)
from lmm_fast.hierarchy.clustering import DEFAULT_BALANCE, balanced_partition, canonical_ids, dendrogram_partition
from lmm_fast.hierarchy.io import FORMAT_NAME, FORMAT_VERSION, parse_hierarchy, unique_keys
from lmm_fast.hierarchy.similarity import METRICS, class_means, condition_points, self_tuning_sigma
from lmm_fast.hierarchy.taxonomy import encode_names, taxonomy_levels



METHODS = ("balanced", "ward", "average", "complete")


# ---------------------------------------------------------------------------
# The hierarchy
# ---------------------------------------------------------------------------


class Hierarchy:
    """The upper levels of a visual hierarchy over N classes.

    Build one with :meth:`from_features`, :meth:`from_class_means`,
    :meth:`from_confusion`, :meth:`from_assignments`, :meth:`from_parents` or
    :meth:`load`.

    Levels are ordered top (coarsest) first; the bottom level (N singleton
    groups, Ψ = identity) is implicit. Three kinds exist:

    * a **tree** (``is_tree``): hard partitions that nest, initial Ψ rows
      ``1/C_t``;
    * **non-nested partitions** (``from_assignments(..., nested=False)``): hard
      partitions, Ψ as for a tree, but levels need not nest (``parents`` and
      ``is_tree`` are then unavailable/False);
    * **dense** (``from_confusion``): one upper level with a stored dense Ψ;
      ``assignments`` gives each class's argmax group.
    """

    def __init__(
        self,
        assignments: Sequence[torch.Tensor],
        level_sizes: Sequence[int],
        *,
        nested: bool = True,
        psi: Sequence[torch.Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        sigma: float | None = None,
        info: Mapping[str, Any] | None = None,
        group_names: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """Low-level constructor for already validated parts; prefer the from_* builders."""
        self._assignments = [a.detach().to("cpu", torch.int64).contiguous() for a in assignments]
        self._level_sizes = [int(k) for k in level_sizes]
        self._nested = bool(nested)
        # Ψ of a dense hierarchy: dense [N_l, N] float32 (from_confusion), or a
        # coalesced sparse COO tensor without zero entries (load: the file
        # lists the non-zeros, and N_l x N floats need not be allocated for them).
        self._psi = None if psi is None else [
            p.detach().to("cpu", torch.float32).coalesce() if p.is_sparse
            else p.detach().to("cpu", torch.float32).contiguous()
            for p in psi
        ]
        self._class_names = None if class_names is None else list(class_names)
        if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
            # save() writes strict JSON: a sigma it cannot write is refused here.
            raise ValueError(f"sigma must be None or a finite number > 0, got {sigma!r}")
        self._sigma = None if sigma is None else float(sigma)
        self._info = dict(info or {})
        self._group_names = None if group_names is None else [list(names) for names in group_names]

    # -- builders -----------------------------------------------------------

    @classmethod
    def from_features(
        cls,
        features: ArrayLike,
        labels: ArrayLike,
        level_sizes: Sequence[int],
        *,
        method: str = "balanced",
        metric: str = "euclidean",
        num_classes: int | None = None,
        balance: float = DEFAULT_BALANCE,
        sigma: float | None = None,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        progress: bool = False,
        **options: int,
    ) -> "Hierarchy":
        """Hierarchy from deep features: class means (Section IV), then clustering.

        Args:
            features: float [M, d] tensor or array (the work runs on its device).
            labels: integer [M] class of every row, in ``[0, N)``.
            level_sizes: groups per upper level, top first, strictly increasing,
                each in ``[1, N)``.
            method: ``"balanced"`` (default), ``"ward"``, ``"average"`` or
                ``"complete"`` (see the module docstring).
            metric: ``"euclidean"`` or ``"cosine"``.
            num_classes: N (default ``labels.max() + 1``); every class needs a
                sample.
            balance: size factor of the balanced method (>= 1).
            sigma: the σ of Eq. 3; default :func:`self_tuning_sigma`.
            seed: makes the result reproducible.
            class_names: optional N names, saved with the hierarchy.
            progress: tqdm progress bars.
            **options: ``n_init``, ``max_iter``, ``max_branching``,
                ``num_threads`` of :func:`balanced_partition`.
        """
        means = class_means(features, labels, num_classes)
        return cls.from_class_means(
            means,
            level_sizes,
            method=method,
            metric=metric,
            balance=balance,
            sigma=sigma,
            seed=seed,
            class_names=class_names,
            progress=progress,
            **options,
        )

    @classmethod
    def from_class_means(
        cls,
        means: ArrayLike,
        level_sizes: Sequence[int],
        *,
        method: str = "balanced",
        metric: str = "euclidean",
        balance: float = DEFAULT_BALANCE,
        sigma: float | None = None,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        progress: bool = False,
        **options: int,
    ) -> "Hierarchy":
        """Hierarchy from one representation per class, float [N, d].

        The rows may be class means of deep features or the rows of a trained
        classifier's weight matrix (``metric="cosine"`` often suits those).
        Other arguments as in :meth:`from_features`.
        """
        check_choice(method, "method", METHODS)
        check_choice(metric, "metric", METRICS)
        x = as_float_matrix(means, "means")
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"means needs at least 2 classes, got {n}")
        sizes = check_level_sizes(level_sizes, n)
        names = check_class_names(class_names, n)
        unknown = set(options) - {"n_init", "max_iter", "max_branching", "num_threads"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        if method != "balanced" and options:
            raise TypeError(f"{sorted(options)} apply to method='balanced' only")
        # Distances are formed on rows rescaled (and, far from the origin,
        # centred) into a safe range: d = scale * d(points). See condition_points.
        points, scale = condition_points(x, metric)
        if sigma is None:
            sigma = self_tuning_sigma(points, metric=metric, seed=seed) * scale
            if not math.isfinite(sigma):
                raise ValueError(
                    f"means: the self-tuned sigma overflows ({sigma}); the class representations "
                    f"span too large a range (largest entry {float(x.abs().max()):.3g})"
                )
        elif isinstance(sigma, bool) or not (
            isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0
        ):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if method == "balanced":
            levels = balanced_partition(
                points, sizes, balance=balance, seed=seed, progress=progress, **options
            )
        else:
            levels = dendrogram_partition(points, sizes, method, metric, float(sigma) / scale)
        levels = canonical_ids(levels, sizes)
        info: dict[str, Any] = {"source": "class_means", "method": method, "metric": metric, "seed": int(seed)}
        if method == "balanced":
            info["balance"] = float(balance)
        return cls(levels, sizes, class_names=names, sigma=float(sigma), info=info)

    @classmethod
    def from_confusion(
        cls, confusion: ArrayLike, *, class_names: Sequence[str] | None = None
    ) -> "Hierarchy":
        """One upper level of N groups with Ψ = the row-normalised confusion matrix.

        The paper's one-level LMM (ImageNet10K): group t stands for class t and
        ``Ψ[t, y] = confusion[t, y] / Σ_y' confusion[t, y']``. With the usual
        convention ``confusion[true, predicted]`` row t spreads class t's mass
        over the classes it is taken for; pass the transpose for the other
        reading. A row that sums to zero (a class never seen) becomes the
        identity row, Ψ[t, t] = 1.

        Args:
            confusion: non-negative finite [N, N] counts or rates.

        Returns:
            a hierarchy with ``is_tree == False``, ``level_sizes == [N]``;
            ``assignments[0][y] = argmax_t Ψ[t, y]`` (first maximum).
        """
        c = as_float_matrix(confusion, "confusion").to("cpu", torch.float64)
        n = c.shape[0]
        if c.shape[1] != n:
            raise ValueError(f"confusion must be square [N, N], got shape {tuple(c.shape)}")
        if n < 2:
            raise ValueError(f"confusion needs at least 2 classes, got {n}")
        if bool((c < 0).any()):
            row, col = (c < 0).nonzero()[0].tolist()
            raise ValueError(f"confusion must be non-negative, found {float(c[row, col])} at [{row}, {col}]")
        names = check_class_names(class_names, n)
        row_sum = c.sum(1, keepdim=True)
        empty_rows = row_sum.squeeze(1) == 0
        psi = torch.where(row_sum > 0, c / row_sum.clamp_min(torch.finfo(torch.float64).tiny), c)
        unseen = empty_rows.nonzero().flatten()
        psi[unseen, unseen] = 1.0
        psi = psi.to(torch.float32)
        return cls(
            [psi.argmax(dim=0)],
            [n],
            nested=True,
            psi=[psi],
            class_names=names,
            info={"source": "confusion"},
        )

    @classmethod
    def from_assignments(
        cls,
        assignments: Sequence[ArrayLike],
        *,
        nested: bool = True,
        relabel: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> "Hierarchy":
        """A user's own tree, e.g. a semantic taxonomy.

        Args:
            assignments: one [N] array or list per upper level, top first: the
                group of every class, as integer ids or as names (strings).
                Ids must be ``0..N_l-1``, all used (or any integers with
                ``relabel=True``, renumbered in sorted order); names are
                numbered in sorted order and kept as :attr:`group_names`. The
                number of groups must strictly increase down the levels and
                stay below N.
            nested: by default every group must lie inside one group of the level
                above (a ValueError names the first offending group). Pass
                ``nested=False`` for levels that are independent partitions; Ψ
                is then still defined, but ``parents`` and tree distances
                across non-nested levels are not tree quantities.
            relabel: renumber arbitrary ids to ``0..N_l-1``.
            class_names: optional N names.
        """
        if isinstance(assignments, (torch.Tensor, np.ndarray)):
            raise TypeError(
                "assignments must be a list with one [N] array per upper level, "
                "got a single array (wrap it in a list)"
            )
        named = [encode_names(a, f"assignments[{i}]") for i, a in enumerate(assignments)]
        levels = [
            named[i][0] if named[i] is not None else as_index_vector(a, f"assignments[{i}]").cpu()
            for i, a in enumerate(assignments)
        ]
        if not levels:
            raise ValueError("assignments must contain at least one upper level")
        n = levels[0].numel()
        for i, a in enumerate(levels):
            if a.numel() != n:
                raise ValueError(f"assignments[{i}] has {a.numel()} entries but assignments[0] has {n}")
        if n < 2:
            raise ValueError(f"a hierarchy needs at least 2 classes, got {n}")
        sizes = []
        for i, a in enumerate(levels):
            if relabel:
                _, levels[i] = torch.unique(a, return_inverse=True)
            elif int(a.min()) < 0:
                bad = int((a < 0).nonzero()[0, 0])
                raise ValueError(f"assignments[{i}][{bad}] = {int(a[bad])} is negative (or pass relabel=True)")
            elif int(a.max()) >= n:
                # A level has fewer than N groups; checked before an id sizes a count.
                bad = int((a >= n).nonzero()[0, 0])
                raise ValueError(
                    f"assignments[{i}][{bad}] = {int(a[bad])} is too large: a level of N = {n} classes "
                    f"has fewer than N groups, so ids must be < {n - 1} (or pass relabel=True)"
                )
            k = int(levels[i].max()) + 1
            check_assignment(levels[i], k, f"assignments[{i}]")
            sizes.append(k)
        sizes = check_level_sizes(sizes, n)
        if nested:
            for i in range(1, len(levels)):
                problem = nesting_violation(levels[i - 1], levels[i], sizes[i])
                if problem:
                    raise ValueError(
                        f"assignments[{i}] is not nested in assignments[{i - 1}]: {problem} "
                        f"(pass nested=False to allow non-nested levels)"
                    )
        names = check_class_names(class_names, n)
        group_names = None
        if any(entry is not None for entry in named):
            # Integer levels beside named ones are named by their ids.
            group_names = [entry[1] if entry is not None else [str(g) for g in range(k)] for entry, k in zip(named, sizes)]
        return cls(levels, sizes, nested=nested, class_names=names, info={"source": "assignments"},
                   group_names=group_names)

    @classmethod
    def from_parents(cls, edges: Any, *, classes: Sequence[Any] | None = None) -> "Hierarchy":
        """A taxonomy of any depth from its parent → child edges; the leaves are the classes.

        Upper level k is depth k of the tree (the root's children: level 1). A
        class shallower than the deepest one keeps its parent's group at the
        levels below its own depth (the parent padded with single-child
        nodes); levels that refine nothing are dropped. See
        :mod:`lmm_fast.hierarchy.taxonomy` and docs/hierarchy.md.

        Args:
            edges: a CSV/TSV path (``parent,child`` rows, an optional header),
                a dict ``child -> parent``, or an iterable of ``(parent, child)``
                pairs; ids are strings or integers, ``None``/``""`` as the
                parent marks a top-level node.
            classes: the leaves in class-index order (label ``i`` is
                ``classes[i]``); default: the order of first appearance.

        Returns:
            a tree with ``class_names`` (the leaf ids as text), ``group_names``
            and ``info["depths"]`` (the tree depth of every level).

        Raises:
            ValueError naming the edge or entry: cycles, two parents, repeated
            edges, unknown/repeated/non-leaf classes, missing leaves, ids
            ``1`` and ``"1"`` both used, fewer than 2 classes, no upper level.
        """
        parts = taxonomy_levels(edges, classes)
        return cls(parts.pop("assignments"), parts.pop("level_sizes"), **parts)

    # -- basic properties ---------------------------------------------------

    @property
    def num_classes(self) -> int:
        """N, the number of classes (the bottom level)."""
        return self._assignments[0].numel()

    @property
    def level_sizes(self) -> list[int]:
        """[N_1, ..., N_{L-1}]: groups per upper level, top first."""
        return list(self._level_sizes)

    @property
    def num_levels(self) -> int:
        """L, the number of levels including the bottom one."""
        return len(self._level_sizes) + 1

    @property
    def assignments(self) -> list[torch.Tensor]:
        """Per upper level, int64 [N]: the group of every class (argmax group if dense)."""
        return [a.clone() for a in self._assignments]

    @property
    def is_tree(self) -> bool:
        """True for hard, nested partitions (every Ψ row uniform over its group)."""
        return self._psi is None and self._nested

    @property
    def is_nested(self) -> bool:
        """True if every group lies inside one group of the level above."""
        return self._nested

    @property
    def is_dense(self) -> bool:
        """True if Ψ is stored densely (``from_confusion``)."""
        return self._psi is not None

    @property
    def class_names(self) -> list[str] | None:
        return None if self._class_names is None else list(self._class_names)

    @property
    def group_names(self) -> list[list[str]] | None:
        """Per upper level, the name of every group (from_parents, named from_assignments), or None."""
        return None if self._group_names is None else [list(names) for names in self._group_names]

    @property
    def sigma(self) -> float | None:
        """The σ of Eq. 3 used to build the hierarchy, or None if no clustering ran."""
        return self._sigma

    @property
    def info(self) -> dict[str, Any]:
        """How the hierarchy was built (source, method, metric, seed, balance ...)."""
        return dict(self._info)

    # -- derived quantities -------------------------------------------------

    def psi(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        sparse: bool = False,
    ) -> list[torch.Tensor]:
        """Initial group-object assignment matrices Ψ^l, one per upper level.

        ``Ψ^l[t, y] = 1/C_t`` if class y is in group t (C_t classes), else 0; the
        stored matrix for a dense (confusion) hierarchy. Every row sums to 1.

        Args:
            dtype, device: of the result.
            sparse: return coalesced sparse COO tensors (N nonzeros per level for
                a tree) instead of dense ones, for large N.

        Returns:
            list of [N_l, N] tensors.
        """
        out = []
        if self._psi is not None:
            for p in self._psi:
                if p.is_sparse:
                    p = p.to(dtype=dtype)
                    out.append(p.to(device) if sparse else p.to_dense().to(device))
                else:
                    p = p.to(device=device, dtype=dtype)
                    out.append(p.to_sparse_coo().coalesce() if sparse else p)
            return out
        cols = torch.arange(self.num_classes)
        for groups, k in zip(self._assignments, self._level_sizes):
            sizes = torch.bincount(groups, minlength=k).to(torch.float64)
            values = (1.0 / sizes)[groups].to(dtype)
            if sparse:
                p = torch.sparse_coo_tensor(
                    torch.stack([groups, cols]), values, (k, self.num_classes), check_invariants=True
                )
                out.append(p.coalesce().to(device))
            else:
                p = torch.zeros(k, self.num_classes, dtype=dtype)
                p[groups, cols] = values
                out.append(p.to(device))
        return out

    def group_sizes(self) -> list[torch.Tensor]:
        """Per upper level, int64 [N_l]: classes per group (hard assignments)."""
        return [torch.bincount(a, minlength=k) for a, k in zip(self._assignments, self._level_sizes)]

    @property
    def parents(self) -> list[torch.Tensor]:
        """Parent of every node, one int64 tensor per level below the top.

        ``parents[j]`` has one entry per node of level j+2 (the last entry: per
        class, equal to ``assignments[-1]``) giving its group at level j+1
        (1-based levels, top = 1). E.g. ``level_sizes == [2, 4]``, N = 8:
        ``parents[0]`` is [4] with values in [0, 2), ``parents[1]`` is [8] with
        values in [0, 4). Only for nested hierarchies.
        """
        if not self._nested or self._psi is not None:
            raise ValueError("parents is only defined for a nested hierarchy (is_tree)")
        out = []
        for upper, lower, k in zip(self._assignments[:-1], self._assignments[1:], self._level_sizes[1:]):
            parent = torch.empty(k, dtype=torch.int64)
            parent[lower] = upper
            out.append(parent)
        out.append(self._assignments[-1].clone())
        return out

    def class_order(self) -> torch.Tensor:
        """int64 [N]: the classes sorted by their groups, top level first (tree order)."""
        key = torch.arange(self.num_classes)
        order = key.clone()
        # Stable sorts from the finest key to the coarsest give a lexicographic order.
        for groups in reversed(self._assignments):
            order = order[torch.argsort(groups[order], stable=True)]
        return order

    def lca_height(self, y1: ArrayLike, y2: ArrayLike) -> torch.Tensor:
        """Height of the lowest common ancestor of classes y1 and y2 (broadcast).

        0 if ``y1 == y2``; ``L - l`` if the deepest upper level at which they share
        a group is level l (1-based, top = 1); ``L`` (the root) if they share no
        group. This is the mistake severity of "Making Better Mistakes"
        (Bertinetto et al., 2020). Memory is O(size of the broadcast inputs x
        levels), so it suits large N. Dense hierarchies use their argmax groups.

        Args:
            y1, y2: integer tensors/arrays of class ids, broadcastable.

        Returns:
            int64 tensor of the broadcast shape, on y1's device.
        """
        a = to_tensor(y1, "y1")
        b = to_tensor(y2, "y2")
        for name, t in (("y1", a), ("y2", b)):
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
                raise ValueError(f"{name} has class ids outside [0, {self.num_classes})")
        device = a.device
        a, b = torch.broadcast_tensors(a.to(torch.int64), b.to(device, torch.int64))
        table = torch.stack(self._assignments).to(device)  # [L-1, N]
        deepest = torch.zeros(a.shape, dtype=torch.int64, device=device)
        for level in range(len(self._level_sizes)):
            same = table[level][a] == table[level][b]
            deepest = torch.where(same, torch.full_like(deepest, level + 1), deepest)
        height = self.num_levels - deepest
        return torch.where(a == b, torch.zeros_like(height), height)

    def tree_distance(self, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """[N, N] LCA heights between all pairs of classes (O(N²) memory).

        See :meth:`lca_height`; for large N call that on the pairs you need.
        """
        classes = torch.arange(self.num_classes, device=device)
        return self.lca_height(classes.unsqueeze(1), classes.unsqueeze(0)).to(dtype)

    def summary(self) -> str:
        """A few lines: kind, N, σ, and group sizes (min / median / max) per level."""
        kind = "tree" if self.is_tree else ("dense (confusion)" if self.is_dense else "non-nested partitions")
        sigma = "n/a" if self._sigma is None else f"{self._sigma:.6g}"
        lines = [f"Hierarchy: {kind}, N = {self.num_classes} classes, {len(self._level_sizes)} upper level(s), sigma = {sigma}"]
        for level, (sizes, k) in enumerate(zip(self.group_sizes(), self._level_sizes), start=1):
            s = sizes.to(torch.float64)
            lines.append(
                f"  level {level}: {k:>7} groups, sizes min {int(sizes.min())} / median "
                f"{float(s.median()):g} / max {int(sizes.max())} (N/N_l = {self.num_classes / k:.3g})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        kind = "tree" if self.is_tree else ("dense" if self.is_dense else "partitions")
        return f"Hierarchy(num_classes={self.num_classes}, level_sizes={self._level_sizes}, kind={kind!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hierarchy):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable contents, value equality

    # -- serialisation ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (the file format, see docs/hierarchy.md)."""
        data: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "level_sizes": list(self._level_sizes),
            "nested": self._nested,
            "assignments": [a.tolist() for a in self._assignments],
            "class_names": self.class_names,
            "sigma": self._sigma,
            "info": dict(self._info),
            "psi": None,
        }
        if self._group_names is not None:
            data["group_names"] = [list(names) for names in self._group_names]
        if self._psi is not None:
            entries = []
            for p in self._psi:
                # Row-major order either way (coalesced indices are sorted).
                if p.is_sparse:
                    rows, cols = p.indices()
                    values = p.values()
                else:
                    rows, cols = p.nonzero().t()
                    values = p[rows, cols]
                # float32 -> Python float is exact, and so is the way back.
                entries.append(
                    {
                        "shape": list(p.shape),
                        "rows": rows.tolist(),
                        "cols": cols.tolist(),
                        "values": values.double().tolist(),
                    }
                )
            data["psi"] = entries
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "hierarchy dict") -> "Hierarchy":
        """Rebuilds a hierarchy from :meth:`to_dict` output, validating everything.

        Raises:
            ValueError naming ``source`` and the problem (format, version, missing
            keys, wrong lengths, ids out of range, empty groups, not nested,
            invalid Ψ).
        """
        return cls(**parse_hierarchy(data, source))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the hierarchy as JSON (gzip-compressed if the name ends in .gz).

        The file is written next to ``path`` first and then renamed, so a crash
        never leaves a truncated file behind.
        """
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(tmp, "wt", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, separators=(",", ":"), allow_nan=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def to_newick(self, *, collapse: bool = True, branch_lengths: bool = True) -> str:
        """The tree as a Newick string (:func:`lmm_fast.hierarchy.formats.to_newick`)."""
        from lmm_fast.hierarchy.formats import to_newick

        return to_newick(self, collapse=collapse, branch_lengths=branch_lengths)

    def to_dot(self, *, collapse: bool = True, rankdir: str = "TB") -> str:
        """The tree as Graphviz DOT (:func:`lmm_fast.hierarchy.formats.to_dot`)."""
        from lmm_fast.hierarchy.formats import to_dot

        return to_dot(self, collapse=collapse, rankdir=rankdir)

    def export(self, path: str | os.PathLike, **options: Any) -> str:
        """Writes JSON, Newick or DOT by the extension of ``path`` (ValueError for
        another); returns the format. See :func:`lmm_fast.hierarchy.formats.export`."""
        from lmm_fast.hierarchy.formats import export

        return export(self, path, **options)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Hierarchy":
        """Reads a file written by :meth:`save`, validating it (ValueError on any problem)."""
        path = os.fspath(path)
        opener = gzip.open if path.endswith(".gz") else open
        source = f"hierarchy file {path!r}"
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f, object_pairs_hook=partial(unique_keys, source=source))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
            raise ValueError(f"{source}: unreadable ({exc})") from None
        except RecursionError:
            raise ValueError(f"{source}: JSON nested too deeply to be a hierarchy file") from None
        return cls(**parse_hierarchy(data, source))
