"""Visual hierarchy construction, small sizes (seconds in all).

* **clustering**: the balanced method (recursive balanced k-means, torch)
  beside scipy's agglomerative linkages cut at the same level sizes (the
  dendrogram baseline), N = 2000 classes, d = 128, levels (10, 100).
* **sigma**: the self-tuned σ of Eq. 3 (k-th neighbour distances) at N = 2000
  and with the sampled estimate at N = 20 000.
* **save/load**: a JSON round trip of a 3-level tree over 20 000 classes,
  validation included.
* **tree distance**: ``lca_height`` on 10^6 class pairs against indexing the
  dense [N, N] ``tree_distance`` matrix (which must be built first).

Each benchmark records the peak extra memory of one call in ``extra_info``:

    pytest benchmarks/bench_hierarchy.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

The timings at scale (N = 10 000 and 100 000) are in ``benchmarks/hierarchy_scale.py``.
"""

from __future__ import annotations

import pytest
import torch

from lmm_fast.profiling import peak_extra_bytes
from lmm_fast.hierarchy import Hierarchy, self_tuning_sigma

CLUSTER_N, CLUSTER_D, CLUSTER_LEVELS = 2000, 128, [10, 100]


def _means(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, n // 50), d, generator=g) * 3
    return centres[torch.randint(centres.shape[0], (n,), generator=g)] + torch.randn(n, d, generator=g)


def _record(benchmark, fn) -> None:
    peak = peak_extra_bytes(fn, "cpu")
    benchmark.extra_info["peak_extra_MB"] = round(peak / 2**20, 2)


@pytest.mark.benchmark(group="clustering N=2000 d=128 levels 10,100")
@pytest.mark.parametrize("method", ["balanced", "ward", "average"])
def test_clustering(benchmark, method):
    means = _means(CLUSTER_N, CLUSTER_D)

    def build():
        return Hierarchy.from_class_means(means, CLUSTER_LEVELS, method=method)

    h = benchmark.pedantic(build, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["max_group_over_mean"] = [
        round(int(s.max()) / (CLUSTER_N / k), 2) for s, k in zip(h.group_sizes(), CLUSTER_LEVELS)
    ]
    _record(benchmark, build)


@pytest.mark.benchmark(group="sigma")
@pytest.mark.parametrize("num_classes", [2000, 20_000])
def test_sigma(benchmark, num_classes):
    means = _means(num_classes, 128)
    benchmark.pedantic(lambda: self_tuning_sigma(means), rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, lambda: self_tuning_sigma(means))


@pytest.mark.benchmark(group="save/load N=20000")
def test_save_load(benchmark, tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 20_000
    bottom = torch.randperm(n, generator=g) % 2000
    h = Hierarchy.from_assignments([bottom // 100, bottom // 10, bottom])
    path = tmp_path / "tree.json"

    def round_trip():
        h.save(path)
        return Hierarchy.load(path)

    assert benchmark.pedantic(round_trip, rounds=3, iterations=1) == h
    benchmark.extra_info["file_MB"] = round(path.stat().st_size / 2**20, 2)


@pytest.mark.benchmark(group="tree distance, 10^6 pairs, N=5000")
@pytest.mark.parametrize("how", ["lca_height", "dense_matrix"])
def test_tree_distance(benchmark, how):
    n = 5000
    g = torch.Generator().manual_seed(0)
    h = Hierarchy.from_assignments([torch.arange(n) // 500, torch.arange(n) // 50, torch.arange(n) // 5])
    a = torch.randint(n, (1_000_000,), generator=g)
    b = torch.randint(n, (1_000_000,), generator=g)
    if how == "lca_height":
        fn = lambda: h.lca_height(a, b)  # noqa: E731
    else:
        fn = lambda: h.tree_distance()[a, b]  # noqa: E731
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, fn)
