"""Tests of lmm_fast.hierarchy: construction, clustering quality, Ψ, tree distances, files."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.special import comb

from lmm_fast.hierarchy import FORMAT_VERSION, Hierarchy, class_means, self_tuning_sigma, similarity_matrix
from lmm_fast.hierarchy.clustering import cut_linkage

DENDROGRAM_METHODS = ["ward", "average", "complete"]
ALL_METHODS = ["balanced", *DENDROGRAM_METHODS]


def adjusted_rand_index(a, b) -> float:
    """Hubert & Arabie's ARI from the contingency table."""
    a = np.asarray(a)
    b = np.asarray(b)
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs_both = comb(table, 2).sum()
    pairs_a = comb(table.sum(1), 2).sum()
    pairs_b = comb(table.sum(0), 2).sum()
    expected = pairs_a * pairs_b / comb(a.size, 2)
    best = (pairs_a + pairs_b) / 2
    if best == expected:
        return 1.0
    return float((pairs_both - expected) / (best - expected))


def test_adjusted_rand_index_reference_values():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3]) == pytest.approx(1.0)
    # Value from Hubert & Arabie's formula worked by hand: table [[2,0],[1,1]].
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.0)
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]) < 0


def planted(super_sizes, sub_size, dim=24, seed=0):
    """Class means with a planted two-level nested structure, in shuffled order.

    Returns (means [N, d], top truth [N], bottom truth [N]).
    """
    g = torch.Generator().manual_seed(seed)
    tops, subs, rows = [], [], []
    sub_id = 0
    for top, num_sub in enumerate(super_sizes):
        centre = torch.randn(dim, generator=g) * 12
        for _ in range(num_sub):
            sub_centre = centre + torch.randn(dim, generator=g) * 3
            rows.append(sub_centre + torch.randn(sub_size, dim, generator=g) * 0.4)
            tops += [top] * sub_size
            subs += [sub_id] * sub_size
            sub_id += 1
    means = torch.cat(rows)
    perm = torch.randperm(means.shape[0], generator=g)
    return means[perm], torch.tensor(tops)[perm], torch.tensor(subs)[perm]


def assert_valid_tree(h: Hierarchy, level_sizes):
    assert h.level_sizes == list(level_sizes)
    assert h.is_tree
    for groups, k in zip(h.assignments, level_sizes):
        assert groups.dtype == torch.int64 and groups.shape == (h.num_classes,)
        counts = torch.bincount(groups, minlength=k)
        assert counts.numel() == k and bool((counts > 0).all()), "a group is empty or ids overflow"
    for upper, lower, k in zip(h.assignments[:-1], h.assignments[1:], level_sizes[1:]):
        for g in range(k):
            assert upper[lower == g].unique().numel() == 1, f"group {g} straddles two parents"


def balance_bounds(n, k, balance=2.0):
    return max(1, min(n // k, math.floor(n / (balance * k) + 1e-9))), max(-(-n // k), math.ceil(balance * n / k - 1e-9))


# ---------------------------------------------------------------------------
# Planted structure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_planted_two_level_structure_is_recovered(method):
    means, top, sub = planted([5, 5, 5, 5], sub_size=6)
    h = Hierarchy.from_class_means(means, [4, 20], method=method, seed=0)
    assert_valid_tree(h, [4, 20])
    assert adjusted_rand_index(h.assignments[0], top) >= 0.95
    assert adjusted_rand_index(h.assignments[1], sub) >= 0.95


def test_planted_unequal_groups_recovered_within_balance_slack():
    # Top groups of 18, 30, 42 and 30 classes: a perfectly balanced split would
    # have to cut them, the default slack (factor 2) must not.
    means, top, sub = planted([3, 5, 7, 5], sub_size=6, seed=3)
    h = Hierarchy.from_class_means(means, [4, 20], seed=0)
    assert adjusted_rand_index(h.assignments[0], top) >= 0.95
    assert adjusted_rand_index(h.assignments[1], sub) >= 0.95
    forced = Hierarchy.from_class_means(means, [4, 20], balance=1.0, seed=0)
    assert torch.bincount(forced.assignments[0]).tolist() == [30, 30, 30, 30]
    assert adjusted_rand_index(forced.assignments[0], top) < 0.95


def test_planted_structure_from_features_and_numpy_input():
    means, top, sub = planted([4, 4, 4], sub_size=5, dim=16, seed=1)
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(means.shape[0]).repeat_interleave(7)
    features = means[labels] + 0.3 * torch.randn(labels.numel(), means.shape[1], generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    features, labels = features[perm], labels[perm]
    h = Hierarchy.from_features(features, labels, level_sizes=[3, 12])
    assert adjusted_rand_index(h.assignments[0], top) >= 0.95
    assert adjusted_rand_index(h.assignments[1], sub) >= 0.95
    h_np = Hierarchy.from_features(features.numpy(), labels.numpy(), level_sizes=[3, 12])
    assert h_np == h


def test_cosine_metric_ignores_row_scale():
    means, top, _ = planted([6, 6], sub_size=5, seed=2)
    means = means + 40.0  # keep directions distinct after normalisation
    scales = torch.linspace(0.5, 4.0, means.shape[0]).unsqueeze(1)
    h = Hierarchy.from_class_means(means, [2, 6], metric="cosine")
    h_scaled = Hierarchy.from_class_means(means * scales, [2, 6], metric="cosine")
    assert adjusted_rand_index(h.assignments[1], h_scaled.assignments[1]) >= 0.95
    assert h.sigma == pytest.approx(h_scaled.sigma, rel=1e-4)


# ---------------------------------------------------------------------------
# Exact sizes, nesting, balance on random inputs
# ---------------------------------------------------------------------------


@st.composite
def shapes(draw, max_classes=260):
    n = draw(st.integers(2, max_classes))
    num_levels = draw(st.integers(1, min(3, n - 1)))
    sizes = sorted(draw(st.sets(st.integers(1, n - 1), min_size=num_levels, max_size=num_levels)))
    dim = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    return n, sizes, dim, seed


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shapes())
def test_balanced_exact_sizes_nesting_and_size_bound(shape):
    n, sizes, dim, seed = shape
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed points, so that unconstrained clustering would be unbalanced.
    means = torch.randn(n, dim, generator=g) * torch.rand(n, 1, generator=g).pow(4) * 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = Hierarchy.from_class_means(means, sizes, seed=seed)
    assert_valid_tree(h, sizes)
    for k, counts in zip(sizes, h.group_sizes()):
        low, high = balance_bounds(n, k)
        assert int(counts.min()) >= low and int(counts.max()) <= high, (k, counts.tolist())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shapes(max_classes=120), st.sampled_from(DENDROGRAM_METHODS))
def test_dendrogram_exact_sizes_and_nesting(shape, method):
    n, sizes, dim, seed = shape
    means = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    h = Hierarchy.from_class_means(means, sizes, method=method)
    assert_valid_tree(h, sizes)


@pytest.mark.parametrize("method", ["ward", "average"])
def test_cut_linkage_matches_scipy_cut_tree(method):
    x = np.random.default_rng(0).normal(size=(70, 5))
    z = linkage(x, method=method)
    sizes = [3, 9, 40]
    ours = cut_linkage(z, 70, sizes)
    theirs = cut_tree(z, n_clusters=sizes)
    for level in range(3):
        assert adjusted_rand_index(ours[level], theirs[:, level]) == pytest.approx(1.0)


def test_dendrogram_cut_is_unbalanced_where_balanced_is_not():
    # One tight blob and scattered outliers: average linkage isolates outliers as
    # singletons and leaves one giant group; the balanced method must not.
    g = torch.Generator().manual_seed(0)
    blob = torch.randn(150, 8, generator=g) * 0.1
    outliers = torch.randn(10, 8, generator=g) * 20
    means = torch.cat([blob, outliers])
    avg = Hierarchy.from_class_means(means, [8], method="average")
    low, high = balance_bounds(160, 8)
    assert int(avg.group_sizes()[0].max()) > high
    bal = Hierarchy.from_class_means(means, [8])
    sizes = bal.group_sizes()[0]
    assert int(sizes.max()) <= high and int(sizes.min()) >= low


def test_smallest_cases():
    h = Hierarchy.from_class_means(torch.tensor([[0.0], [1.0]]), [1])
    assert h.assignments[0].tolist() == [0, 0]
    assert h.psi()[0].tolist() == [[0.5, 0.5]]
    h = Hierarchy.from_class_means(torch.randn(3, 2), [1, 2])
    assert_valid_tree(h, [1, 2])


def test_duplicate_class_means_still_give_exact_sizes():
    means = torch.zeros(40, 4)
    means[20:] = 1.0
    h = Hierarchy.from_class_means(means, [2, 10])
    assert_valid_tree(h, [2, 10])
    assert h.sigma > 0


def test_float64_and_float16_inputs():
    means, _, sub = planted([3, 3], sub_size=5, dim=8)
    ref = Hierarchy.from_class_means(means, [2, 6])
    assert adjusted_rand_index(Hierarchy.from_class_means(means.double(), [2, 6]).assignments[1], sub) >= 0.95
    assert adjusted_rand_index(Hierarchy.from_class_means(means.half(), [2, 6]).assignments[1], sub) >= 0.95
    assert adjusted_rand_index(ref.assignments[1], sub) >= 0.95


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


def test_same_seed_same_tree_other_seed_other_tree():
    means = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    a = Hierarchy.from_class_means(means, [5, 30], seed=7)
    b = Hierarchy.from_class_means(means.clone(), [5, 30], seed=7)
    assert a == b
    assert all(torch.equal(x, y) for x, y in zip(a.assignments, b.assignments))
    c = Hierarchy.from_class_means(means, [5, 30], seed=8)
    # Unstructured points have many equally good partitions; the seed picks one.
    assert not all(torch.equal(x, y) for x, y in zip(a.assignments, c.assignments))


def test_canonical_group_ids_children_contiguous():
    h = Hierarchy.from_class_means(torch.randn(200, 6, generator=torch.Generator().manual_seed(1)), [4, 16, 50])
    for parent in h.parents[:-1]:
        assert bool((parent[1:] >= parent[:-1]).all()), "children of a group must be a contiguous id range"
    assert int(h.assignments[0][0]) == 0


# ---------------------------------------------------------------------------
# sigma, similarity, class means
# ---------------------------------------------------------------------------


def brute_force_sigma(x, k=7):
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    return float(d.sort(dim=1).values[:, k - 1].median())


def test_sigma_is_median_kth_neighbour_distance():
    x = torch.randn(150, 10, generator=torch.Generator().manual_seed(0))
    assert self_tuning_sigma(x) == pytest.approx(brute_force_sigma(x), rel=1e-4)
    assert self_tuning_sigma(x, k=3) == pytest.approx(brute_force_sigma(x, k=3), rel=1e-4)


def test_sigma_sampled_estimate_is_close_and_scale_equivariant():
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0))
    exact = brute_force_sigma(x)
    assert self_tuning_sigma(x, max_queries=500) == pytest.approx(exact, rel=0.05)
    assert self_tuning_sigma(4.0 * x) == pytest.approx(4.0 * self_tuning_sigma(x), rel=1e-5)


def test_clustering_is_invariant_to_feature_scale():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(4))
    a = Hierarchy.from_class_means(x, [4, 20])
    b = Hierarchy.from_class_means(x * 8.0, [4, 20])
    assert all(torch.equal(p, q) for p, q in zip(a.assignments, b.assignments))
    assert b.sigma == pytest.approx(8.0 * a.sigma, rel=1e-5)


def test_similarity_matrix_is_eq3():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    s = similarity_matrix(x, sigma=2.0)
    expected = torch.exp(-torch.cdist(x.double(), x.double()) / 2.0)
    torch.testing.assert_close(s.double(), expected, atol=1e-5, rtol=1e-5)


def test_class_means_matches_loop():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=g)
    labels = torch.randint(0, 9, (200,), generator=g)
    labels[:9] = torch.arange(9)
    means = class_means(features, labels)
    for c in range(9):
        torch.testing.assert_close(means[c], features[labels == c].mean(0))


# ---------------------------------------------------------------------------
# Ψ, tree distance, parents
# ---------------------------------------------------------------------------


@pytest.fixture
def small_tree():
    #   level 1: {0,1,2,3} {4,5}
    #   level 2: {0,1} {2,3} {4} {5}
    return Hierarchy.from_assignments([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 3]], class_names=list("abcdef"))


def test_psi_rows_are_uniform_over_groups(small_tree):
    psi = small_tree.psi()
    assert [p.shape for p in psi] == [(2, 6), (4, 6)]
    assert psi[0].dtype == torch.float32
    torch.testing.assert_close(psi[0], torch.tensor([[0.25] * 4 + [0, 0], [0] * 4 + [0.5, 0.5]]))
    torch.testing.assert_close(psi[1][1], torch.tensor([0, 0, 0.5, 0.5, 0, 0]))
    for p in psi:
        torch.testing.assert_close(p.sum(1), torch.ones(p.shape[0]))
    for dense, sparse in zip(psi, small_tree.psi(sparse=True, dtype=torch.float64)):
        assert sparse.is_sparse
        torch.testing.assert_close(sparse.to_dense(), dense.double())


def test_lca_height_and_tree_distance(small_tree):
    d = small_tree.tree_distance()
    assert d[0, 0] == 0
    assert d[0, 1] == 1  # same level-2 group
    assert d[0, 2] == 2  # same level-1 group only
    assert d[0, 4] == 3  # only the root
    assert d[4, 5] == 2
    assert torch.equal(d, d.T)
    pairs = small_tree.lca_height(torch.tensor([[0], [4]]), torch.tensor([1, 2, 5]))
    assert pairs.tolist() == [[1, 2, 3], [3, 3, 2]]


def test_lca_height_matches_brute_force_on_random_tree():
    h = Hierarchy.from_class_means(torch.randn(60, 3, generator=torch.Generator().manual_seed(0)), [3, 10, 25])
    table = torch.stack(h.assignments)
    d = h.tree_distance()
    for i in range(0, 60, 7):
        for j in range(60):
            shared = [lvl + 1 for lvl in range(3) if table[lvl, i] == table[lvl, j]]
            expected = 0 if i == j else 4 - max(shared, default=0)
            assert d[i, j] == expected


def test_lca_height_rejects_bad_ids(small_tree):
    with pytest.raises(ValueError, match="outside"):
        small_tree.lca_height(torch.tensor([6]), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer"):
        small_tree.lca_height(torch.tensor([0.0]), torch.tensor([0]))


def test_parents_group_sizes_and_order(small_tree):
    parents = small_tree.parents
    assert parents[0].tolist() == [0, 0, 1, 1]
    assert parents[1].tolist() == [0, 0, 1, 1, 2, 3]
    assert [s.tolist() for s in small_tree.group_sizes()] == [[4, 2], [2, 2, 1, 1]]
    h = Hierarchy.from_assignments([[1, 0, 1, 0, 1], [2, 0, 3, 1, 2]])
    assert h.class_order().tolist() == [1, 3, 0, 4, 2]
    assert "level 2" in h.summary() and small_tree.num_levels == 3


# ---------------------------------------------------------------------------
# from_assignments, from_confusion
# ---------------------------------------------------------------------------


def test_from_assignments_rejects_non_nested_unless_allowed():
    levels = [[0, 0, 1, 1], [0, 1, 1, 2]]
    with pytest.raises(ValueError, match="not nested.*group 1"):
        Hierarchy.from_assignments(levels)
    h = Hierarchy.from_assignments(levels, nested=False)
    assert not h.is_tree and not h.is_nested
    torch.testing.assert_close(h.psi()[1].sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="nested"):
        h.parents


def test_from_assignments_ids_must_be_dense_unless_relabel():
    with pytest.raises(ValueError, match="empty"):
        Hierarchy.from_assignments([np.array([0, 0, 2, 2])])
    h = Hierarchy.from_assignments([np.array([7, 7, 2, 2, 9])], relabel=True)
    assert h.assignments[0].tolist() == [1, 1, 0, 0, 2]
    with pytest.raises(ValueError, match="negative"):
        Hierarchy.from_assignments([[0, -1, 1]])
    with pytest.raises(ValueError, match="strictly increasing"):
        Hierarchy.from_assignments([[0, 0, 1, 2], [0, 0, 1, 1]], nested=False)
    with pytest.raises(ValueError, match="must be <"):
        Hierarchy.from_assignments([[0, 1, 2]])
    with pytest.raises(ValueError, match="entries"):
        Hierarchy.from_assignments([[0, 0, 1], [0, 1]])
    with pytest.raises(TypeError, match="integer"):
        Hierarchy.from_assignments([[0.0, 1.0, 1.0]])
    with pytest.raises(TypeError, match="list"):
        Hierarchy.from_assignments(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="class_names"):
        Hierarchy.from_assignments([[0, 0, 1]], class_names=["a", "b"])


def test_from_confusion_row_normalised_dense_psi():
    confusion = torch.tensor([[8.0, 2.0, 0.0], [6.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    h = Hierarchy.from_confusion(confusion)
    assert not h.is_tree and h.is_dense and h.level_sizes == [3] and h.sigma is None
    psi = h.psi()[0]
    torch.testing.assert_close(psi, torch.tensor([[0.8, 0.2, 0.0], [0.75, 0.125, 0.125], [0.0, 0.0, 1.0]]))
    # Class 1's largest share is in group 0 (0.2 > 0.125): argmax over groups, per class.
    assert h.assignments[0].tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="square"):
        Hierarchy.from_confusion(torch.ones(3, 4))
    with pytest.raises(ValueError, match="non-negative"):
        Hierarchy.from_confusion(-torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        Hierarchy.from_confusion(torch.full((3, 3), float("nan")))


# ---------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_roundtrip_tree(tmp_path, suffix):
    h = Hierarchy.from_class_means(
        torch.randn(50, 4, generator=torch.Generator().manual_seed(0)),
        [3, 12],
        class_names=[f"class {i} ü" for i in range(50)],
    )
    path = tmp_path / f"tree{suffix}"
    h.save(path)
    loaded = Hierarchy.load(path)
    assert loaded == h
    assert loaded.to_dict() == h.to_dict()
    assert loaded.class_names == h.class_names and loaded.sigma == h.sigma
    assert all(torch.equal(a, b) for a, b in zip(loaded.psi(), h.psi()))
    assert not list(tmp_path.glob("*.tmp*"))


def test_roundtrip_dense_and_non_nested(tmp_path):
    confusion = torch.rand(20, 20, generator=torch.Generator().manual_seed(0)) ** 3
    confusion[confusion < 0.2] = 0
    h = Hierarchy.from_confusion(confusion)
    h.save(tmp_path / "c.json")
    loaded = Hierarchy.load(tmp_path / "c.json")
    assert torch.equal(loaded.psi()[0], h.psi()[0])
    assert loaded == h and not loaded.is_tree
    partitions = Hierarchy.from_assignments([[0, 0, 1, 1], [0, 1, 1, 2]], nested=False)
    partitions.save(tmp_path / "p.json")
    assert Hierarchy.load(tmp_path / "p.json") == partitions


def _tree_dict():
    return Hierarchy.from_assignments([[0, 0, 1, 1, 1], [0, 1, 2, 2, 3]]).to_dict()


def _set(path, value):
    def edit(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return d

    return edit


def _drop(key):
    def edit(d):
        del d[key]
        return d

    return edit


CORRUPTIONS = {
    "wrong format": (_set(["format"], "something else"), "'format' must be"),
    "future version": (_set(["format_version"], FORMAT_VERSION + 1), "unsupported format_version"),
    "missing assignments": (_drop("assignments"), r"missing keys \['assignments'\]"),
    "num_classes not int": (_set(["num_classes"], "5"), "num_classes must be an int"),
    "num_classes mismatch": (_set(["num_classes"], 6), "must be a list of num_classes = 6"),
    "id out of range": (_set(["assignments", 1, 4], 4), r"assignments\[1\]\[4\] = 4 is out of range \[0, 4\)"),
    "negative id": (_set(["assignments", 0, 0], -1), "out of range"),
    "group left empty": (_set(["assignments", 1, 1], 0), "leaves 1 of its 4 groups empty"),
    "not nested": (_set(["assignments", 0, 2], 0), "not nested"),
    "too few levels": (_set(["assignments"], [[0, 0, 1, 1, 1]]), "list of 2 lists"),
    "sizes not increasing": (_set(["level_sizes"], [4, 2]), "strictly increasing"),
    "size equals N": (_set(["level_sizes"], [2, 5]), "must be < the number of classes"),
    "size zero": (_set(["level_sizes"], [0, 4]), ">= 1"),
    "float id": (_set(["assignments", 0, 0], 0.5), "only ints"),
    "names wrong length": (_set(["class_names"], ["a"]), "class_names has 1 entries"),
    "negative sigma": (_set(["sigma"], -1.0), "sigma must be"),
    "nested not bool": (_set(["nested"], "yes"), "nested must be"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_load_rejects_inconsistent_files(tmp_path, name):
    edit, message = CORRUPTIONS[name]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(edit(_tree_dict())))
    with pytest.raises(ValueError, match=message) as info:
        Hierarchy.load(path)
    assert "bad.json" in str(info.value)


def test_load_rejects_corrupt_files(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_tree_dict())[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        Hierarchy.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        Hierarchy.load(path)
    gz = tmp_path / "t.json.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="unreadable"):
        Hierarchy.load(gz)
    with pytest.raises(FileNotFoundError):
        Hierarchy.load(tmp_path / "missing.json")


def test_load_rejects_bad_dense_psi(tmp_path):
    data = Hierarchy.from_confusion(torch.eye(3) + 0.1).to_dict()
    data["psi"][0]["values"][0] *= 2
    with pytest.raises(ValueError, match="row 0 sums to"):
        Hierarchy.from_dict(data)
    data = Hierarchy.from_confusion(torch.eye(3) + 0.1).to_dict()
    data["psi"][0]["cols"][0] = 3
    with pytest.raises(ValueError, match="indices outside"):
        Hierarchy.from_dict(data)
    data = Hierarchy.from_confusion(torch.eye(3) + 0.1).to_dict()
    data["assignments"][0] = [1, 1, 2]
    with pytest.raises(ValueError, match="argmax"):
        Hierarchy.from_dict(data)


# ---------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------


def _features(n_classes=10, per_class=3, dim=4):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n_classes).repeat(per_class)
    return torch.randn(labels.numel(), dim, generator=g), labels


@pytest.mark.parametrize(
    "mutate, level_sizes, error, message",
    [
        (lambda f, y: (f.index_fill(0, torch.tensor([4]), float("nan")), y), [2, 5], ValueError, r"NaN.*row 4"),
        (lambda f, y: (f.index_fill(0, torch.tensor([7]), float("inf")), y), [2, 5], ValueError, r"inf.*row 7"),
        (lambda f, y: (f, y.index_fill(0, torch.tensor([0]), -1)), [2, 5], ValueError, "labels must be >= 0"),
        (lambda f, y: (f, y.float()), [2, 5], TypeError, "labels must be an integer"),
        (lambda f, y: (f, y[:-1]), [2, 5], ValueError, "entries but features has"),
        (lambda f, y: (f, torch.where(y == 3, 4, y)), [2, 5], ValueError, r"no samples.*\[3\]"),
        (lambda f, y: (f[0], y), [2, 5], ValueError, "features must be 2-D"),
        (lambda f, y: (f, y), [5, 2], ValueError, "strictly increasing"),
        (lambda f, y: (f, y), [5, 5], ValueError, "strictly increasing"),
        (lambda f, y: (f, y), [2, 10], ValueError, r"level_sizes\[1\] = 10 must be <"),
        (lambda f, y: (f, y), [0, 5], ValueError, r"level_sizes\[0\] = 0 must be >= 1"),
        (lambda f, y: (f, y), [], ValueError, "at least one upper level"),
        (lambda f, y: (f, y), [2.0, 5], TypeError, "must be an int"),
        (lambda f, y: (f, y), "2,5", TypeError, "sequence of ints"),
    ],
)
def test_from_features_rejects_bad_input(mutate, level_sizes, error, message):
    features, labels = mutate(*_features())
    with pytest.raises(error, match=message):
        Hierarchy.from_features(features, labels, level_sizes=level_sizes)


def test_from_features_rejects_labels_beyond_num_classes_and_bad_options():
    features, labels = _features()
    with pytest.raises(ValueError, match="labels must be < num_classes = 8"):
        Hierarchy.from_features(features, labels, [2, 5], num_classes=8)
    with pytest.raises(ValueError, match="no samples"):
        Hierarchy.from_features(features, labels, [2, 5], num_classes=12)
    with pytest.raises(ValueError, match="method must be one of"):
        Hierarchy.from_features(features, labels, [2, 5], method="kmeans")
    with pytest.raises(ValueError, match="metric must be one of"):
        Hierarchy.from_features(features, labels, [2, 5], metric="manhattan")
    with pytest.raises(ValueError, match="balance must be"):
        Hierarchy.from_features(features, labels, [2, 5], balance=0.5)
    with pytest.raises(ValueError, match="sigma must be"):
        Hierarchy.from_features(features, labels, [2, 5], sigma=0.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        Hierarchy.from_features(features, labels, [2, 5], n_clusters=3)
    with pytest.raises(ValueError, match="all zeros"):
        Hierarchy.from_class_means(torch.zeros(4, 3), [2], metric="cosine")
