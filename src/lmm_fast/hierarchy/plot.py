"""A picture of a hierarchy (matplotlib, imported when drawing)."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

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
