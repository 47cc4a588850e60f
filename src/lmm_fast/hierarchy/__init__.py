"""Visual hierarchies for the level-wise mixture model (paper Section IV, Eq. 3).

* :mod:`~lmm_fast.hierarchy.tree` — :class:`Hierarchy`, its builders and queries;
* :mod:`~lmm_fast.hierarchy.similarity` — class means, σ and the similarity of Eq. 3;
* :mod:`~lmm_fast.hierarchy.clustering` — balanced k-means and dendrogram cuts;
* :mod:`~lmm_fast.hierarchy.taxonomy` — a user's own tree from its edges (any depth);
* :mod:`~lmm_fast.hierarchy.formats` — Newick and Graphviz DOT, files by extension;
* :mod:`~lmm_fast.hierarchy.io` — the file format and its validation;
* :mod:`~lmm_fast.hierarchy.plot` — pictures of a hierarchy (sizes and similarity; the tree);
* :mod:`~lmm_fast.hierarchy.checks` — input checks.

docs/hierarchy.md describes the methods and the file format.
"""
from __future__ import annotations

from lmm_fast.hierarchy.clustering import MAX_DENDROGRAM_CLASSES, balanced_partition
from lmm_fast.hierarchy.formats import EXPORT_FORMATS, export, to_dot, to_newick
from lmm_fast.hierarchy.io import FORMAT_NAME, FORMAT_VERSION
from lmm_fast.hierarchy.plot import plot_hierarchy, plot_tree
from lmm_fast.hierarchy.similarity import METRICS, class_means, self_tuning_sigma, similarity_matrix
from lmm_fast.hierarchy.taxonomy import read_edges
from lmm_fast.hierarchy.tree import METHODS, Hierarchy

__all__ = [
    "Hierarchy",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METHODS",
    "METRICS",
    "MAX_DENDROGRAM_CLASSES",
    "class_means",
    "self_tuning_sigma",
    "similarity_matrix",
    "balanced_partition",
    "plot_hierarchy",
    "plot_tree",
    "read_edges",
    "to_newick",
    "to_dot",
    "export",
    "EXPORT_FORMATS",
]
