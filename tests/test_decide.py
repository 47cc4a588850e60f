"""lmm_fast.decide: conditional risk minimisation and hedging, against explicit
N x N / per-row references, and the hedging guarantee on a known posterior."""
from __future__ import annotations

import math

import pytest
import torch

from lmm_fast import decide, metrics
from lmm_fast.decide import HedgePolicy, conformal_rank, crm, expected_distance, hedge_curve, node_probabilities
from lmm_fast.reference.decide import crm_reference, expected_distance_reference, hedge_reference
from lmm_fast.hierarchy import Hierarchy


# ---------------------------------------------------------------------------
# Hierarchies and posteriors
# ---------------------------------------------------------------------------


def _nested(num_classes: int, sizes: list[int], gen: torch.Generator) -> Hierarchy:
    """Random nested levels (no empty group), top first."""
    levels = []
    below = torch.arange(num_classes)
    lower = num_classes
    for size in reversed(sizes):
        parent = torch.cat([torch.arange(size), torch.randint(0, size, (lower - size,), generator=gen)])
        parent = parent[torch.randperm(lower, generator=gen)]
        below = parent[below]
        levels.insert(0, below)
        lower = size
    return Hierarchy.from_assignments(levels)


def _unbalanced() -> Hierarchy:
    """11 classes: a chain of singletons beside one big group, groups of 1 to 7."""
    top = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2])
    mid = torch.tensor([0, 1, 2, 2, 2, 2, 2, 2, 2, 3, 4])
    return Hierarchy.from_assignments([top, mid])


def _non_nested(levels: int = 2) -> Hierarchy:
    gen = torch.Generator().manual_seed(5)
    n = 13
    out = []
    for size in range(2, 2 + levels):
        a = torch.cat([torch.arange(size), torch.randint(0, size, (n - size,), generator=gen)])
        out.append(a[torch.randperm(n, generator=gen)])
    return Hierarchy.from_assignments(out, nested=False)


def _hierarchies() -> dict[str, Hierarchy]:
    gen = torch.Generator().manual_seed(0)
    confusion = torch.rand(9, 9, generator=gen) + 4 * torch.eye(9)
    return {
        "tree-3-levels": _nested(40, [3, 9], gen),
        "tree-4-levels": _nested(57, [2, 5, 17], gen),
        "unbalanced": _unbalanced(),
        "one-level": Hierarchy.from_assignments([torch.tensor([0, 0, 1, 1, 1, 2, 2])]),
        "two-classes": Hierarchy.from_assignments([torch.tensor([0, 0])]),
        "non-nested-2": _non_nested(2),
        "non-nested-3": _non_nested(3),
        "dense-confusion": Hierarchy.from_confusion(confusion),
    }


HIERARCHIES = _hierarchies()


def _proba(rows: int, n: int, gen: torch.Generator, dtype=torch.float64, scale: float = 3.0) -> torch.Tensor:
    return torch.softmax(scale * torch.randn(rows, n, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def _dyadic(rows: int, n: int, gen: torch.Generator, total: int = 16) -> torch.Tensor:
    """Probabilities that are multiples of 1/total: sums are exact, so ties are real ties."""
    counts = torch.zeros(rows, n, dtype=torch.float64)
    picks = torch.randint(0, n, (rows, total), generator=gen)
    counts.scatter_add_(1, picks, torch.ones(rows, total, dtype=torch.float64))
    return counts / total


def _hierarchical_posterior(rows: int, h: Hierarchy, gen: torch.Generator, concentration: float = 0.4) -> torch.Tensor:
    """A posterior that is sure of a subtree more often than of a class:
    Dirichlet weights at every level, multiplied down the tree."""
    n = h.num_classes
    groups = h.assignments + [torch.arange(n)]
    sizes = h.level_sizes + [n]
    gamma = torch.distributions.Gamma(torch.tensor(concentration, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    p = torch.ones(rows, n, dtype=torch.float64)
    parent = torch.zeros(n, dtype=torch.int64)
    parent_size = 1
    for level, (g, k) in enumerate(zip(groups, sizes)):
        w = gamma.sample((rows, k))
        # normalise the weights within each parent node
        node_parent = torch.zeros(k, dtype=torch.int64).scatter_(0, g, parent)
        norm = torch.zeros(rows, parent_size, dtype=torch.float64).index_add_(1, node_parent, w)
        w = w / norm[:, node_parent]
        p = p * w[:, g]
        parent, parent_size = g, k
    return p / p.sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------------
# Expected distance and CRM against the N x N reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HIERARCHIES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expected_distance_matches_reference(name, dtype):
    h = HIERARCHIES[name]
    gen = torch.Generator().manual_seed(1)
    proba = _proba(23, h.num_classes, gen, dtype)
    got = expected_distance(proba, h)
    want = expected_distance_reference(proba, h)
    assert got.dtype == dtype and got.shape == proba.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got.double(), want, **tol)


def test_expected_distance_identity_by_hand():
    # L = 3: classes {0, 1} | {2} under top node 0, {3} under top node 1.
    h = Hierarchy.from_assignments([torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 2])])
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)
    # d(0, .) = (0, 1, 2, 3) -> 0.25 + 0.25 + 0.375; d(3, .) = 3 for all others.
    want = torch.tensor([[0.875, 1.125, 1.875, 2.625]], dtype=torch.float64)
    torch.testing.assert_close(expected_distance(p, h), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(HIERARCHIES))
@pytest.mark.parametrize("k", [1, 3, "N"])
def test_crm_matches_reference_with_exact_ties(name, k):
    h = HIERARCHIES[name]
    n = h.num_classes
    k = n if k == "N" else min(k, n)
    gen = torch.Generator().manual_seed(2)
    proba = _dyadic(64, n, gen)
    assert torch.equal(crm(proba, h, k), crm_reference(proba, h, k))


@pytest.mark.parametrize("name", ["tree-4-levels", "unbalanced", "non-nested-3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_crm_picks_the_smallest_risks(name, dtype):
    h = HIERARCHIES[name]
    gen = torch.Generator().manual_seed(3)
    proba = _proba(50, h.num_classes, gen, dtype)
    k = 5
    got = crm(proba, h, k)
    risk = expected_distance_reference(proba, h)
    torch.testing.assert_close(risk.gather(1, got), torch.sort(risk, dim=1).values[:, :k], rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        assert torch.equal(got, crm_reference(proba, h, k))


def test_crm_by_hand_prefers_the_crowded_subtree():
    # The most probable class (3) sits alone; classes 0 and 1 share a group
    # holding 70 % of the mass, so answering them risks less.
    h = Hierarchy.from_assignments([torch.tensor([0, 0, 0, 1])])
    p = torch.tensor([[0.25, 0.25, 0.2, 0.3]], dtype=torch.float64)
    # R(0) = R(1) = 0.25 + 0.2 + 2 * 0.3 = 1.05 (a tie: lower index first), R(2) = 1.1, R(3) = 1.4.
    assert crm(p, h, 4).tolist() == [[0, 1, 2, 3]]
    assert int(p.argmax()) == 3


def test_crm_ties_go_to_probability():
    # 0 and 2 have equal risk (1.5) but 2 is more probable; within a group the
    # more probable class always has the smaller risk, so the tie is across groups.
    h = Hierarchy.from_assignments([torch.tensor([0, 0, 1, 1])])
    p = torch.tensor([[0.25, 0.25, 0.5, 0.0]], dtype=torch.float64)
    # R(0) = 0.25 + 2 * 0.5 = 1.25, R(1) = 1.25, R(2) = 2 * 0.5 = 1.0, R(3) = 0.5 + 1.0 = 1.5
    assert crm(p, h, 4).tolist() == [[2, 0, 1, 3]]
    q = torch.tensor([[0.375, 0.125, 0.5, 0.0]], dtype=torch.float64)
    # R(0) = 0.125 + 1 = 1.125, R(1) = 0.375 + 1 = 1.375, R(2) = 1.0, R(3) = 1.5
    assert crm(q, h, 2).tolist() == [[2, 0]]
    # A three-way tie at the cut: classes 1, 2, 3 all risk 1.5; probability picks.
    h2 = Hierarchy.from_assignments([torch.tensor([0, 1, 2, 3, 3])])
    r = torch.tensor([[0.5, 0.125, 0.125, 0.25, 0.0]], dtype=torch.float64)
    # R(0) = 2 * 0.5 = 1.0, R(1) = R(2) = 2 * 0.875 = 1.75, R(3) = 2 * 0.75 = 1.5, R(4) = 0.25 + 1.5 = 1.75
    assert crm(r, h2, 3).tolist() == [[0, 3, 1]]
    assert torch.equal(crm(r, h2, 5), crm_reference(r, h2, 5))


def test_crm_large_n_against_reference_on_a_few_rows():
    gen = torch.Generator().manual_seed(4)
    h = _nested(1031, [7, 60], gen)
    proba = _proba(7, 1031, gen, torch.float64, scale=2.0)
    assert torch.equal(crm(proba, h, 10), crm_reference(proba, h, 10))


def test_chunked_rows_agree_and_report_global_rows(monkeypatch):
    h = HIERARCHIES["tree-3-levels"]
    gen = torch.Generator().manual_seed(6)
    proba = _proba(97, h.num_classes, gen, torch.float32)
    whole_crm, whole_risk = crm(proba, h, 4), expected_distance(proba, h)
    whole_answer = HedgePolicy(h, 0.6)(proba)
    monkeypatch.setattr(decide.risk, "_CHUNK_BYTES", 7 * h.num_classes * 4)  # 7 rows a chunk
    monkeypatch.setattr(decide.risk, "_CHUNK_BYTES_PARALLEL", 7 * h.num_classes * 4)
    assert len(decide.risk.row_chunks(proba)) == 14
    assert torch.equal(crm(proba, h, 4), whole_crm)
    torch.testing.assert_close(expected_distance(proba, h), whole_risk, rtol=0, atol=0)
    for got, want in zip(HedgePolicy(h, 0.6)(proba), whole_answer):
        assert torch.equal(got, want)
    ties = _dyadic(97, h.num_classes, gen)  # cut ties in rows of every chunk
    assert torch.equal(crm(ties, h, 4), crm_reference(ties, h, 4))
    bad = proba.clone()
    bad[37, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN .*row 37"):
        crm(bad, h, 4)
    bad = proba.clone()
    bad[61, 0] = float("inf")
    with pytest.raises(ValueError, match="inf .*row 61"):
        HedgePolicy(h, 0.6)(bad)


def test_non_contiguous_empty_and_half():
    h = HIERARCHIES["tree-4-levels"]
    gen = torch.Generator().manual_seed(7)
    proba = _proba(12, h.num_classes, gen, torch.float32)
    transposed = proba.T.contiguous().T
    assert not transposed.is_contiguous()
    assert torch.equal(crm(transposed, h, 3), crm(proba, h, 3))
    assert crm(proba[:0], h, 3).shape == (0, 3)
    assert expected_distance(proba[:0], h).shape == (0, h.num_classes)
    answer = HedgePolicy(h, 0.5)(proba[:0])
    assert answer.level.shape == (0,)
    half = proba.half()
    torch.testing.assert_close(expected_distance(half, h), expected_distance(half.float(), h))


def test_node_probabilities_are_group_sums():
    h = HIERARCHIES["tree-4-levels"]
    gen = torch.Generator().manual_seed(8)
    proba = _proba(9, h.num_classes, gen)
    nodes = node_probabilities(proba, h)
    assert [t.shape[1] for t in nodes] == h.level_sizes
    for groups, size, got in zip(h.assignments, h.level_sizes, nodes):
        member = torch.nn.functional.one_hot(groups, size).double()
        torch.testing.assert_close(got, proba @ member)


def test_decision_index_detects_nesting_and_caches():
    tree = HIERARCHIES["tree-3-levels"]
    assert decide.decision_index(tree).nested
    assert decide.decision_index(tree) is decide.decision_index(tree)
    assert not decide.decision_index(HIERARCHIES["non-nested-3"]).nested
    # non-nested: one term per non-empty subset of upper levels
    assert len(decide.decision_index(HIERARCHIES["non-nested-3"]).terms) == 7
    # a non-nested flag on levels that do nest is treated as the tree it is
    nested_anyway = Hierarchy.from_assignments(tree.assignments, nested=False)
    assert decide.decision_index(nested_anyway).nested


def test_too_many_non_nested_levels(monkeypatch):
    monkeypatch.setattr(decide.risk, "MAX_NON_NESTED_LEVELS", 2)
    h = _non_nested(3)
    with pytest.raises(ValueError, match="non-nested hierarchy with 3 upper levels"):
        crm(torch.full((1, h.num_classes), 1.0 / h.num_classes), h, 1)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p, "k = 9 exceeds the number of classes N = 7"),
        (lambda p: p.clone().index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"), dtype=p.dtype)), "NaN .*row 2"),
        (lambda p: p.clone().index_put_((torch.tensor([1]), torch.tensor([0])), torch.tensor(float("inf"), dtype=p.dtype)), "inf .*row 1"),
        (lambda p: p - 0.01, "non-negative"),
        (lambda p: p * 1.01, "sum to 1 .*row 0"),
        (lambda p: p[:, :6], r"\[B, N\] = \[B, 7\]"),
        (lambda p: p[0], r"\[B, N\]"),
        (lambda p: (p * 100).long(), "floating-point"),
        (lambda p: p.numpy(), "torch.Tensor"),
    ],
)
def test_crm_errors(make, match):
    h = HIERARCHIES["one-level"]
    proba = _proba(4, 7, torch.Generator().manual_seed(9))
    bad = make(proba)
    k = 9 if "exceeds" in match else 2
    with pytest.raises((ValueError, TypeError), match=match):
        crm(bad, h, k)


def test_crm_bad_k_and_hierarchy():
    h = HIERARCHIES["one-level"]
    proba = _proba(2, 7, torch.Generator().manual_seed(9))
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            crm(proba, h, k)
    with pytest.raises(TypeError, match="Hierarchy"):
        crm(proba, "tree", 2)


# ---------------------------------------------------------------------------
# Hedging: the rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tree-4-levels", "unbalanced", "one-level", "non-nested-3"])
@pytest.mark.parametrize("rule", decide.RULES)
@pytest.mark.parametrize("threshold", [-math.inf, 0.2, 0.5, 0.85, 1.0, math.inf])
def test_hedge_matches_reference(name, rule, threshold):
    h = HIERARCHIES[name]
    gen = torch.Generator().manual_seed(10)
    proba = _proba(40, h.num_classes, gen, scale=2.5)
    got = HedgePolicy(h, threshold, rule=rule)(proba)
    want = hedge_reference(proba, h, threshold, rule)
    assert torch.equal(got.level, want.level)
    assert torch.equal(got.node, want.node)
    torch.testing.assert_close(got.probability, want.probability)


def test_hedge_answer_semantics():
    h = Hierarchy.from_assignments([torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 2])])
    p = torch.tensor(
        [
            [0.9, 0.05, 0.05, 0.0],  # sure of class 0
            [0.45, 0.45, 0.05, 0.05],  # sure of group (level 2) 0 only
            [0.3, 0.3, 0.3, 0.1],  # sure of top node 0 only
            [0.3, 0.2, 0.2, 0.3],  # sure of nothing below the root
        ],
        dtype=torch.float64,
    )
    answer = HedgePolicy(h, 0.8)(p)
    assert answer.level.tolist() == [3, 2, 1, 0]
    assert answer.node.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(answer.probability, torch.tensor([0.9, 0.9, 0.9, 1.0], dtype=torch.float64))
    policy = HedgePolicy(h, 0.8)
    assert policy.correct(answer, torch.tensor([1, 1, 2, 3])).tolist() == [False, True, True, True]
    top = HedgePolicy(h, 0.8, rule="top_class")(p)
    assert top.level.tolist() == [3, 0, 0, 0]
    coarse = HedgePolicy(h, 0.8, rule="top_class_coarse")(p)
    assert coarse.level.tolist() == [3, 2, 2, 2]


def _brute_wrong_scores(proba, h, rule, target):
    """sup{τ : the answer at some τ' >= τ is wrong}, by evaluating the reference
    rule just below each of the row's node probabilities (the right ends of
    the intervals on which its answer is constant) and at a huge threshold."""
    levels = [proba @ torch.nn.functional.one_hot(g, k).double() for g, k in zip(h.assignments, h.level_sizes)]
    probs = torch.stack([torch.ones(proba.shape[0], dtype=torch.float64)] + [p.amax(1) for p in levels] + [proba.amax(1)], 1)
    policy = HedgePolicy(h, 0.0, rule=rule)
    scores = []
    for i in range(proba.shape[0]):
        candidates = [(math.nextafter(v, -math.inf), v) for v in probs[i].tolist()] + [(1e300, math.inf)]
        score = -math.inf
        for tau, value in candidates:
            if not bool(policy.correct(hedge_reference(proba[i : i + 1], h, tau, rule), target[i : i + 1])):
                score = max(score, value)
        scores.append(score)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("name", ["tree-4-levels", "non-nested-2", "unbalanced"])
@pytest.mark.parametrize("rule", decide.RULES)
def test_wrong_scores_against_brute_force(name, rule):
    h = HIERARCHIES[name]
    gen = torch.Generator().manual_seed(11)
    proba = _proba(30, h.num_classes, gen, scale=2.0)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    index = decide.decision_index(h)
    probs, nodes = decide.hedge.node_levels(proba, index, 1e-3)
    got = decide.hedge.wrong_scores(decide.hedge.gate_values(probs, rule), decide.hedge.correct_nodes(nodes, target, index))
    want = _brute_wrong_scores(proba, h, rule, target)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got > 0, want > 0)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=0)
    assert bool((got > -math.inf).any()) and bool(torch.isneginf(got).any())  # both kinds of rows occur


def test_conformal_rank():
    assert conformal_rank(99, 0.9) == 9  # (n + 1)(1 − 0.9) = 10 exactly, not 9.999…
    assert conformal_rank(19, 0.95) == 0
    assert conformal_rank(18, 0.95) == -1  # too few rows: always the root
    assert conformal_rank(1000, 0.99) == 9
    assert conformal_rank(0, 0.5) == -1
    for bad in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="accuracy must be"):
            conformal_rank(10, bad)
    with pytest.raises(ValueError, match="delta"):
        conformal_rank(10, 0.9, delta=1.0)


def test_conformal_rank_pac_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for n, accuracy, delta in [(100, 0.9, 0.1), (500, 0.95, 0.05), (2000, 0.99, 0.01), (30, 0.9, 0.2)]:
        r = conformal_rank(n, accuracy, delta)
        alpha = 1 - accuracy
        assert stats.binom.cdf(r, n, alpha) <= delta + 1e-12
        assert stats.binom.cdf(r + 1, n, alpha) > delta
        assert r <= conformal_rank(n, accuracy)


def test_fit_threshold_is_the_order_statistic():
    h = HIERARCHIES["tree-4-levels"]
    gen = torch.Generator().manual_seed(12)
    proba = _hierarchical_posterior(199, h, gen)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    policy = HedgePolicy.fit(proba, target, h, accuracy=0.9)
    assert policy.rank == 19 and policy.num_calibration == 199
    index = decide.decision_index(h)
    probs, nodes = decide.hedge.node_levels(proba, index, 1e-3)
    scores = decide.hedge.wrong_scores(decide.hedge.gate_values(probs, "hedge"), decide.hedge.correct_nodes(nodes, target, index))
    assert policy.threshold == float(torch.sort(scores, descending=True).values[19])
    # at the threshold at most r calibration rows are (or could become) wrong ...
    assert int((scores > policy.threshold).sum()) <= 19
    # ... and just below it more than r are: no smaller threshold is allowed.
    assert int((scores > math.nextafter(policy.threshold, -math.inf)).sum()) > 19
    assert policy.calibration_accuracy >= 0.9
    assert policy.guaranteed_accuracy == pytest.approx(1 - 20 / 200)


def test_fit_with_too_few_rows_answers_the_root():
    h = HIERARCHIES["tree-3-levels"]
    gen = torch.Generator().manual_seed(13)
    proba = _proba(10, h.num_classes, gen)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    policy = HedgePolicy.fit(proba, target, h, accuracy=0.95)
    assert policy.threshold == math.inf and policy.guaranteed_accuracy == 1.0
    assert policy(proba).level.eq(0).all()
    assert policy.evaluate(proba, target)["accuracy"] == 1.0


def test_fit_errors():
    h = HIERARCHIES["tree-3-levels"]
    gen = torch.Generator().manual_seed(14)
    proba = _proba(10, h.num_classes, gen)
    target = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"y_val must be \[B\] = \[10\]"):
        HedgePolicy.fit(proba, target[:9], h)
    with pytest.raises(ValueError, match="out of range"):
        HedgePolicy.fit(proba, target + 40, h)
    with pytest.raises(TypeError, match="integer"):
        HedgePolicy.fit(proba, target.double(), h)
    with pytest.raises(ValueError, match="rule must be"):
        HedgePolicy.fit(proba, target, h, rule="deepest")
    with pytest.raises(ValueError, match="accuracy must be"):
        HedgePolicy.fit(proba, target, h, accuracy=95)
    with pytest.raises(ValueError, match="NaN"):
        HedgePolicy.fit(torch.full_like(proba, float("nan")), target, h)


# ---------------------------------------------------------------------------
# Hedging: the guarantee on a known posterior
# ---------------------------------------------------------------------------

GUARANTEE_TREE = _nested(24, [3, 8], torch.Generator().manual_seed(15))


@pytest.fixture
def one_thread():
    """Hundreds of fits on tiny tensors: thread wake-ups would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _draws(num_rows: int, seed: int, temperature: float):
    """Rows of a known posterior: the model's probabilities and classes drawn
    from the true posterior. The model reports the truth sharpened
    (temperature < 1) or flattened (> 1): the guarantee must not care."""
    gen = torch.Generator().manual_seed(seed)
    true = _hierarchical_posterior(num_rows, GUARANTEE_TREE, gen)
    y = torch.multinomial(true, 1, generator=gen).squeeze(1)
    model = torch.softmax(torch.log(true.clamp_min(1e-300)) / temperature, dim=1)
    return model, y


def _fitted_accuracies(temperature: float, num_draws: int, n: int, accuracy: float, delta=None, seed: int = 0):
    """Fit one policy per draw of n calibration rows; return each policy's
    accuracy on a common pool of 100 000 rows (its conditional accuracy, up
    to ±0.001) and the thresholds."""
    model, y = _draws(num_draws * n + 100_000, seed, temperature)
    thresholds = []
    for d in range(num_draws):
        rows = slice(d * n, (d + 1) * n)
        thresholds.append(HedgePolicy.fit(model[rows], y[rows], GUARANTEE_TREE, accuracy, delta=delta).threshold)
    pool = slice(num_draws * n, None)
    curve = hedge_curve(model[pool], y[pool], GUARANTEE_TREE, thresholds=thresholds)
    where = torch.searchsorted(curve.threshold, torch.tensor(thresholds, dtype=torch.float64))
    return curve.accuracy[where], torch.tensor(thresholds, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_hedging_meets_the_target_marginally(temperature, one_thread):
    """Over many calibration draws the mean accuracy is >= 1 − (r+1)/(n+1) for a
    calibrated, an over-confident and an under-confident posterior alike, and
    (when the threshold exceeds 1/2 on a tree, no ties) not above it."""
    num_draws, n, accuracy = 300, 100, 0.9
    acc, thresholds = _fitted_accuracies(temperature, num_draws, n, accuracy, seed=16 + int(10 * temperature))
    bound = 1 - math.floor((1 - accuracy) * (n + 1) + 1e-9) / (n + 1)  # 1 − 10/101
    se = float(acc.std()) / math.sqrt(num_draws)
    assert float(acc.mean()) >= bound - 3.5 * se, (float(acc.mean()), bound, se)
    if float(thresholds.min()) > 0.5:
        assert float(acc.mean()) <= bound + 3.5 * se, (float(acc.mean()), bound, se)
    # Individual draws scatter as the Beta(r+1, n−r) error rate predicts.
    assert float(acc.std()) == pytest.approx(math.sqrt(10 * 91 / (101**2 * 102)), rel=0.3)


def test_hedging_pac_guarantee(one_thread):
    """With delta, the share of calibration draws whose policy reaches the
    target is >= 1 − delta, and (no ties, threshold > 1/2) equals the exact
    1 − P(Binomial(n, α) <= r)."""
    num_draws, n, accuracy, delta = 300, 200, 0.9, 0.1
    acc, thresholds = _fitted_accuracies(1.0, num_draws, n, accuracy, delta=delta, seed=40)
    share = float((acc >= accuracy).double().mean())
    r = 14  # the largest r with P(Binomial(200, 0.1) <= r) <= 0.1 (scipy: 0.0929; r = 15: 0.1431)
    exact = 1 - float(decide.hedge.binomial_cdf(n, 0.1)[r])
    sd = math.sqrt(exact * (1 - exact) / num_draws)
    assert exact >= 1 - delta
    assert share >= 1 - delta - 3 * math.sqrt(delta * (1 - delta) / num_draws), share
    assert float(thresholds.min()) > 0.5
    assert abs(share - exact) <= 3.5 * sd + 0.01, (share, exact)
    assert conformal_rank(n, accuracy, delta) == r


def test_hedging_against_the_top_class_baselines_at_equal_target():
    """On a calibrated posterior, at the same target: 'top class or root' answers
    at least as many rows at the class level as hedging (it is the optimal rule
    for that share: a non-class answer can always be the root, which is never
    wrong), while hedging abstains entirely (answers the root) far less often.
    'Top class or its coarse node' meets the target too, by abstaining when its
    fixed fallback is wrong too often."""
    model, y = _draws(9000, seed=41, temperature=1.0)
    val, test = slice(0, 3000), slice(3000, None)
    for accuracy in (0.9, 0.95):
        reports = {
            rule: HedgePolicy.fit(model[val], y[val], GUARANTEE_TREE, accuracy, rule=rule).evaluate(model[test], y[test])
            for rule in decide.RULES
        }
        for report in reports.values():
            assert report["accuracy"] >= accuracy - 0.02
        assert abs(reports["hedge"]["accuracy"] - accuracy) < 0.02
        assert reports["top_class"]["class_share"] >= reports["hedge"]["class_share"] - 0.01
        assert reports["hedge"]["root_share"] < reports["top_class"]["root_share"] - 0.1


# ---------------------------------------------------------------------------
# Curves and the comparison job's rows
# ---------------------------------------------------------------------------


def test_curve_agrees_with_the_policy():
    h = HIERARCHIES["tree-4-levels"]
    gen = torch.Generator().manual_seed(17)
    proba = _hierarchical_posterior(300, h, gen)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    thresholds = [-math.inf, 0.3, 0.6, 0.9, math.inf]
    for rule in decide.RULES:
        curve = hedge_curve(proba, target, h, rule=rule, thresholds=thresholds)
        for i, tau in enumerate(thresholds):
            report = HedgePolicy(h, tau, rule=rule).evaluate(proba, target)
            assert float(curve.accuracy[i]) == pytest.approx(report["accuracy"])
            assert float(curve.class_share[i]) == pytest.approx(report["class_share"])
            assert float(curve.mean_depth[i]) == pytest.approx(report["mean_depth"])
        assert float(curve.accuracy[0]) == pytest.approx(float((proba.argmax(1) == target).double().mean()))
        assert float(curve.accuracy[-1]) == 1.0 and float(curve.mean_depth[-1]) == 0.0
    default = HedgePolicy(h, 0.5).curve(proba, target)
    assert default.threshold.numel() > 50
    assert bool((default.threshold[1:] > default.threshold[:-1]).all())
    point = default.at_accuracy(0.9)
    assert point["accuracy"] >= 0.9
    feasible = default.accuracy >= 0.9
    assert point["mean_depth"] == pytest.approx(float(default.mean_depth[feasible].max()))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    h = HIERARCHIES["tree-4-levels"]
    gen = torch.Generator().manual_seed(18)
    proba = _hierarchical_posterior(200, h, gen)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    curves = {rule: hedge_curve(proba, target, h, rule=rule) for rule in decide.RULES}
    path = decide.plot_accuracy_specificity(
        curves, tmp_path / "curve.png", points={"hedge at 90 %": (2.1, 0.9)}, targets=(0.9, 0.95)
    )
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="specificity"):
        decide.plot_accuracy_specificity(curves, tmp_path / "x.png", specificity="depth")


def test_crm_report_matches_metrics():
    h = HIERARCHIES["tree-4-levels"]
    gen = torch.Generator().manual_seed(19)
    proba = _proba(300, h.num_classes, gen, torch.float64, scale=1.5)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    report = decide.crm_report(proba, target, h, chunk_rows=64)
    arg = report["argmax"]
    assert arg["top1_error"] == pytest.approx(metrics.topk_error(proba, target, 1)[1])
    assert arg["severity"] == pytest.approx(metrics.mistake_severity(proba, target, h))
    dist = metrics.hierarchical_distance_topk(proba, target, h, ks=(1, 5))
    assert arg["hdist1"] == pytest.approx(dist[1]) and arg["hdist5"] == pytest.approx(dist[5])
    ranking = crm(proba, h, 5)
    assert report["crm"] == decide.ranking_report(ranking, target, h)
    # Expected distance is what CRM minimises: its top-1 has the lower mean distance.
    assert report["crm"]["hdist1"] <= report["argmax"]["hdist1"] + 0.02


def test_hedge_report_rows():
    h = HIERARCHIES["tree-4-levels"]
    gen = torch.Generator().manual_seed(20)
    proba = _hierarchical_posterior(600, h, gen)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    cal, ev = decide.calibration_split(600, 0.5, seed=1)
    assert cal.numel() == 300 and ev.numel() == 300
    assert torch.equal(torch.sort(torch.cat([cal, ev])).values, torch.arange(600))
    rows = decide.hedge_report(proba[cal], target[cal], proba[ev], target[ev], h, accuracies=(0.9, 0.95))
    assert [(r["rule"], r["target"]) for r in rows] == [(rule, a) for rule in decide.RULES for a in (0.9, 0.95)]
    for row in rows:
        policy = HedgePolicy.fit(proba[cal], target[cal], h, row["target"], rule=row["rule"])
        assert row["threshold"] == policy.threshold
        assert row["accuracy"] == policy.evaluate(proba[ev], target[ev])["accuracy"]
        assert 0 <= row["class_share"] <= 1 and 0 <= row["mean_depth"] <= h.num_levels


# ---------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["tree-4-levels", "non-nested-3", "unbalanced"])
def test_cuda_matches_cpu(name):
    h = HIERARCHIES[name]
    gen = torch.Generator().manual_seed(21)
    proba = _dyadic(200, h.num_classes, gen)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)
    gpu = proba.cuda()
    assert torch.equal(crm(gpu, h, 4).cpu(), crm(proba, h, 4))
    torch.testing.assert_close(expected_distance(gpu, h).cpu(), expected_distance(proba, h))
    policy = HedgePolicy.fit(proba, target, h, 0.9)
    gpu_policy = HedgePolicy.fit(gpu, target.cuda(), h, 0.9)
    assert gpu_policy.threshold == policy.threshold
    for got, want in zip(gpu_policy(gpu), policy(proba)):
        assert torch.equal(got.cpu(), want)
    curve = hedge_curve(gpu, target.cuda(), h, thresholds=[0.5, 0.9])
    torch.testing.assert_close(curve.accuracy, hedge_curve(proba, target, h, thresholds=[0.5, 0.9]).accuracy)
    with pytest.raises(ValueError, match="on cpu but proba is on cuda"):
        HedgePolicy.fit(gpu, target, h, 0.9)
