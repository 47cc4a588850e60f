"""Pictures of a hierarchy (matplotlib, imported when drawing): group sizes
and the similarity ordered by the tree (:func:`plot_hierarchy`), and the
tree itself, drawn as a dendrogram of its levels (:func:`plot_tree`)."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmm_fast.hierarchy.checks import ArrayLike, as_float_matrix
from lmm_fast.hierarchy.similarity import similarity_matrix

if TYPE_CHECKING:
    from lmm_fast.hierarchy.tree import Hierarchy




# ---------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------


def plot_hierarchy(
    hierarchy: Hierarchy,
    path: str | os.PathLike,
    means: ArrayLike | None = None,
    *,
    metric: str = "euclidean",
    max_classes: int = 1000,
) -> None:
    """Writes a PNG: group sizes per level, and S (Eq. 3) ordered by the tree.

    Args:
        hierarchy: the hierarchy to draw.
        path: output file (any matplotlib format, by extension).
        means: float [N, d] class representations; without them only the sizes
            panel is drawn.
        metric: of the similarity.
        max_classes: the similarity panel shows at most this many classes,
            taken evenly along the tree order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if means is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    ax = axes[0, 0]
    for level, sizes in enumerate(hierarchy.group_sizes(), start=1):
        ranked = sizes.sort(descending=True).values.numpy()
        ax.plot(np.arange(1, ranked.size + 1), ranked, marker="." if ranked.size < 200 else None,
                label=f"level {level}: {ranked.size} groups")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("group rank")
    ax.set_ylabel("classes in group")
    ax.set_title("group sizes per level")
    ax.legend(fontsize="small")
    if means is not None:
        x = as_float_matrix(means, "means").cpu()
        if x.shape[0] != hierarchy.num_classes:
            raise ValueError(f"means has {x.shape[0]} rows, the hierarchy {hierarchy.num_classes} classes")
        order = hierarchy.class_order()
        step = max(1, math.ceil(order.numel() / max_classes))
        shown = order[::step]
        sim = similarity_matrix(x[shown], sigma=hierarchy.sigma, metric=metric).numpy()
        ax = axes[0, 1]
        image = ax.imshow(sim, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        top = hierarchy.assignments[0][shown].numpy()
        for edge in np.nonzero(np.diff(top))[0]:
            ax.axhline(edge + 0.5, color="white", linewidth=0.4)
            ax.axvline(edge + 0.5, color="white", linewidth=0.4)
        ax.set_title(f"S = exp(-d/sigma), tree order ({shown.numel()} of {order.numel()} classes)")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------


def tree_layout(hierarchy: Hierarchy) -> dict[str, Any]:
    """Coordinates of the dendrogram drawn by :func:`plot_tree`.

    Class ``y`` sits at height 0 and ``x`` = its rank in
    :meth:`~lmm_fast.Hierarchy.class_order`; a group of level ``l`` (1-based)
    at height ``L - l``, ``x`` midway between its leftmost and rightmost
    child; the root at height ``L``. Each child has a vertical segment up to
    its parent's height, each parent a horizontal one across its children.

    Returns:
        ``{"class_x": float64 [N], "group_x": [float64 [N_l] per level],
        "root_x": float, "heights": [L-1, …, 1] per level, "segments":
        float64 [S, 2, 2]}`` (segments as ``((x0, y0), (x1, y1))``).

    Raises:
        ValueError if the hierarchy is not a tree.
    """
    parents = hierarchy.parents  # raises for a non-tree
    n = hierarchy.num_classes
    levels = hierarchy.num_levels
    class_x = torch.empty(n, dtype=torch.float64)
    class_x[hierarchy.class_order()] = torch.arange(n, dtype=torch.float64)
    group_x: list[torch.Tensor] = [torch.empty(0)] * len(hierarchy.level_sizes)
    segments = []
    child_x, child_y = class_x, 0.0
    for level in reversed(range(len(hierarchy.level_sizes))):
        size = hierarchy.level_sizes[level]
        height = float(levels - level - 1)
        parent = parents[level]
        lo = torch.full((size,), math.inf, dtype=torch.float64).scatter_reduce(0, parent, child_x, "amin")
        hi = torch.full((size,), -math.inf, dtype=torch.float64).scatter_reduce(0, parent, child_x, "amax")
        x = (lo + hi) / 2
        group_x[level] = x
        segments += [((cx, child_y), (cx, height)) for cx in child_x.tolist()]
        segments += [((a, height), (b, height)) for a, b in zip(lo.tolist(), hi.tolist())]
        child_x, child_y = x, height
    lo, hi = float(child_x.min()), float(child_x.max())
    root_x = (lo + hi) / 2
    segments += [((cx, child_y), (cx, float(levels))) for cx in child_x.tolist()]
    segments.append(((lo, float(levels)), (hi, float(levels))))
    return {
        "class_x": class_x.numpy(),
        "group_x": [x.numpy() for x in group_x],
        "root_x": root_x,
        "heights": [float(levels - level - 1) for level in range(len(hierarchy.level_sizes))],
        "segments": np.asarray(segments, dtype=np.float64).reshape(-1, 2, 2),
    }


def plot_tree(
    hierarchy: Hierarchy,
    path: str | os.PathLike,
    *,
    max_class_labels: int = 80,
    max_group_labels: int = 40,
    title: str | None = None,
) -> None:
    """Writes a picture of the tree: a dendrogram with one height per level.

    The root on top, the groups of every upper level below it, the classes at
    the bottom in tree order. Classes are labelled when there are at most
    ``max_class_labels`` of them, the groups of a level when it has at most
    ``max_group_labels`` (names from ``group_names``/``class_names``, else
    ``L<level>.G<group>`` and the class index).

    Args:
        hierarchy: a tree (``is_tree``); others raise ValueError.
        path: output file (any matplotlib format, by extension).
        title: of the figure (default: N and the level sizes).
    """
    layout = tree_layout(hierarchy)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    n = hierarchy.num_classes
    levels = hierarchy.num_levels
    label_classes = n <= max_class_labels
    width = min(40.0, max(6.0, 0.22 * n if label_classes else 10.0))
    fig, ax = plt.subplots(figsize=(width, 1.2 * levels + (2.5 if label_classes else 1.0)))
    ax.add_collection(LineCollection(layout["segments"], colors="0.25", linewidths=0.6 if n > 500 else 1.0))
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(-0.2, levels + 0.3)
    group_names = hierarchy.group_names
    for level, (xs, height) in enumerate(zip(layout["group_x"], layout["heights"])):
        if xs.size > max_group_labels:
            continue
        names = group_names[level] if group_names is not None else [f"L{level + 1}.G{g}" for g in range(xs.size)]
        ax.plot(xs, np.full(xs.size, height), "o", color="tab:blue", markersize=3)
        for x, name in zip(xs, names):
            ax.annotate(name, (x, height), textcoords="offset points", xytext=(2, 3), fontsize=7, color="tab:blue")
    ax.plot([layout["root_x"]], [float(levels)], "o", color="tab:blue", markersize=3)
    ax.annotate(str(hierarchy.info.get("root", "root")), (layout["root_x"], float(levels)), textcoords="offset points",
                xytext=(2, 3), fontsize=7, color="tab:blue")
    class_names = hierarchy.class_names
    if label_classes:
        order = np.argsort(layout["class_x"])
        ax.set_xticks(layout["class_x"][order])
        ax.set_xticklabels([class_names[y] if class_names is not None else str(y) for y in order],
                           rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{n} classes in tree order")
    ax.set_yticks([0.0, *layout["heights"], float(levels)])
    ax.set_yticklabels(
        [f"classes ({n})"]
        + [f"level {level + 1} ({k})" for level, k in enumerate(hierarchy.level_sizes)]
        + ["root"],
        fontsize=8,
    )
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"hierarchy: {n} classes, upper levels {hierarchy.level_sizes}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)
