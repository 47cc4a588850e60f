"""Visual hierarchies for the level-wise mixture model (paper Section IV, Eq. 3).

* :mod:`~lmm_fast.hierarchy.tree` — :class:`Hierarchy`, its builders and queries;
* :mod:`~lmm_fast.hierarchy.similarity` — class means, σ and the similarity of Eq. 3;
* :mod:`~lmm_fast.hierarchy.clustering` — balanced k-means and dendrogram cuts;
* :mod:`~lmm_fast.hierarchy.io` — the file format and its validation;
* :mod:`~lmm_fast.hierarchy.plot` — a picture of a hierarchy;
* :mod:`~lmm_fast.hierarchy.checks` — input checks.

docs/hierarchy.md describes the methods and the file format.
"""
from __future__ import annotations

from lmm_fast.hierarchy.clustering import MAX_DENDROGRAM_CLASSES, balanced_partition
from lmm_fast.hierarchy.io import FORMAT_NAME, FORMAT_VERSION
from lmm_fast.hierarchy.plot import plot_hierarchy
from lmm_fast.hierarchy.similarity import METRICS, class_means, self_tuning_sigma, similarity_matrix
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
]
