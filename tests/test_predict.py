"""Prediction ops (lmm_predict_proba_tree / _dense, lmm_topk_tree) and
FusedLMMLoss.predict_proba against the pure-PyTorch references."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lmm_fast
import lmm_fast.testing
from lmm_fast import FusedLMMLoss, predict
from lmm_fast.ops import accumulate_dtype
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.ops import predict as predict_ops
from lmm_fast.ops.predict import lmm_predict_proba_dense, lmm_predict_proba_tree, lmm_topk_tree
from lmm_fast.predict import path_score_proba, tree_index
from lmm_fast.reference.loss import predict_proba_reference
from lmm_fast.reference.predict import gather_scores_reference, predict_proba_tree_reference, predict_topk_reference
from lmm_fast.testing import dense_psi, random_problem, tolerances, toy_task, tree_psi

SHAPES = [
    (1, [2, 5]),
    (7, [3, 5, 11]),
    (33, [4, 40, 1001]),
    (5, [1, 7]),
    (16, [3, 9, 27, 81]),
    (9, [13]),  # a single level: the flat softmax
]


def random_theta(levels, gen):
    theta = torch.rand(levels, generator=gen, dtype=torch.float64) + 0.05
    return theta / theta.sum()


def operands(psi, theta, sizes, dtype):
    """(group_index, group_value, psi_t, theta) in the accumulation dtype of ``dtype``."""
    acc = accumulate_dtype(dtype)
    n = sizes[-1]
    psi_t = torch.cat([p.t() for p in psi], 1).to(acc).contiguous() if psi else torch.zeros(n, 0, dtype=acc)
    tree = tree_index(psi_t, sizes)
    return tree, psi_t, theta.to(acc)


def reference(logits, psi, theta):
    return predict_proba_reference(logits.detach().double(), [p.double() for p in psi], theta.double())


@pytest.mark.parametrize("batch,sizes", SHAPES)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_proba_matches_reference(batch, sizes, dense, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((batch, tuple(sizes), dense, str(dtype))).encode()))
    logits, _, psi = random_problem(batch, sizes, dtype=dtype, dense=dense, generator=gen)
    loss_fn = FusedLMMLoss(psi, random_theta(len(sizes), gen), num_classes=sizes[-1])
    theta = loss_fn.theta  # as the loss holds it (float32)
    ref = reference(logits, psi, theta)
    proba = loss_fn.predict_proba(logits.detach())
    assert proba.dtype == dtype and proba.shape == (batch, sizes[-1])
    torch.testing.assert_close(proba.double(), ref, **tolerances(dtype))
    # Rows sum to 1 up to the float32 rounding of the stored θ and Ψ.
    torch.testing.assert_close(proba.sum(1).double(), torch.ones(batch, dtype=torch.float64), **tolerances(torch.float32))
    tree, psi_t, th = operands(psi, theta, sizes, dtype)
    # Both kernels agree with the reference on a tree Ψ; only the GEMM one takes a dense Ψ.
    torch.testing.assert_close(lmm_predict_proba_dense(logits.detach(), psi_t, th, sizes).double(), ref, **tolerances(dtype))
    # Dense Ψ is a tree only where an upper level has a single group.
    assert (tree is not None) == (not dense or all(s == 1 for s in sizes[:-1]))
    if tree is not None:
        out = lmm_predict_proba_tree(logits.detach(), tree.index, tree.value_as(th.dtype), th, sizes)
        torch.testing.assert_close(out.double(), ref, **tolerances(dtype))
        oracle = predict_proba_tree_reference(logits.detach().double(), tree.index, tree.value.double(), th.double(), sizes)
        torch.testing.assert_close(oracle, ref)


@pytest.mark.parametrize("batch,sizes", SHAPES)
@pytest.mark.parametrize("k", [1, 3, "N"])
def test_topk_agrees_with_torch_topk(batch, sizes, k):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((batch, tuple(sizes), k)).encode()))
    k = sizes[-1] if k == "N" else min(k, sizes[-1])
    logits, _, psi = random_problem(batch, sizes, generator=gen)
    theta = random_theta(len(sizes), gen)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=sizes[-1])
    values, indices = lmm_fast.predict_topk(logits.detach(), loss_fn, k)
    ref = reference(logits, psi, theta)
    ref_values, _ = torch.topk(ref, k, dim=1)
    assert values.shape == (batch, k) and indices.dtype == torch.int64
    torch.testing.assert_close(values.double(), ref_values, **tolerances(torch.float32))
    # The returned classes carry the returned probabilities, best first.
    torch.testing.assert_close(ref.gather(1, indices), values.double(), **tolerances(torch.float32))
    assert (values[:, 1:] <= values[:, :-1]).all()
    assert all(len(set(row)) == k for row in indices.tolist())


def test_topk_float64_equals_the_stable_reference():
    gen = torch.Generator().manual_seed(1)
    sizes = [4, 16, 301]
    logits, _, psi = random_problem(40, sizes, dtype=torch.float64, generator=gen)
    theta = random_theta(3, gen)
    loss_fn = FusedLMMLoss(psi, theta).to(torch.float64)
    values, indices = lmm_fast.predict_topk(logits.detach(), loss_fn, 10)
    ref_values, ref_indices = predict_topk_reference(logits.detach(), [p.double() for p in psi], theta, 10)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)


def test_topk_ties_are_ordered_by_class_index():
    # A balanced tree and equal logits: every class gets exactly 1/N.
    assignments = [torch.arange(16) // 8, torch.arange(16) // 4]
    h = Hierarchy.from_assignments(assignments)
    loss_fn = FusedLMMLoss.from_hierarchy(h, theta=[0.2, 0.3, 0.5])
    logits = torch.zeros(3, 2 + 4 + 16)
    logits[1, 2 + 1] = 1.0  # row 1: group 1 (classes 4..7) of level 2 favoured,
    logits[1, 2 + 4 + 5] = 1.0  # and class 5: then the tie of its group, then the rest
    values, indices = lmm_fast.predict_topk(logits, loss_fn, 6)
    assert indices[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert indices[1].tolist() == [5, 4, 6, 7, 0, 1]
    torch.testing.assert_close(values[0], torch.full((6,), 1 / 16))


def test_topk_nan_rows_rank_nan_first_as_torch():
    sizes = [3, 12]
    psi = tree_psi(sizes, torch.Generator().manual_seed(2))
    loss_fn = FusedLMMLoss(psi, [0.3, 0.7])
    logits = torch.randn(2, 15, generator=torch.Generator().manual_seed(3))
    logits[0, 3 + 4] = float("nan")
    values, indices = lmm_fast.predict_topk(logits, loss_fn, 3)
    assert torch.isnan(values[0]).all()
    assert torch.isfinite(values[1]).all()
    proba = loss_fn.predict_proba(logits)
    assert torch.isnan(proba[0]).all() and not torch.isnan(proba[1]).any()


@pytest.mark.parametrize("dense", [False, True])
def test_gradcheck_float64(dense):
    gen = torch.Generator().manual_seed(4)
    sizes = [3, 6, 11]
    logits, _, psi = random_problem(5, sizes, dtype=torch.float64, dense=dense, generator=gen)
    tree, psi_t, _ = operands(psi, torch.ones(3), sizes, torch.float64)
    theta = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64, requires_grad=True)
    weights = torch.rand(5, 11, generator=gen, dtype=torch.float64)
    if dense:
        def f(x, th):
            return lmm_predict_proba_dense(x, psi_t, th, sizes) * weights
    else:
        def f(x, th):
            return lmm_predict_proba_tree(x, tree.index, tree.value_as(torch.float64), th, sizes) * weights
    assert torch.autograd.gradcheck(f, (logits, theta))
    if not dense:
        def g(x, th):
            return lmm_topk_tree(x, tree.index, tree.value_as(torch.float64), th, sizes, 4)[0]
        assert torch.autograd.gradcheck(g, (logits, theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 7, 19]
    logits, _, psi = random_problem(9, sizes, dtype=dtype, generator=gen)
    tree, psi_t, _ = operands(psi, torch.ones(3), sizes, dtype)
    acc = accumulate_dtype(dtype)
    theta = torch.tensor([0.2, 0.3, 0.5], dtype=acc, requires_grad=True)
    value = tree.value_as(acc)
    torch.library.opcheck(torch.ops.lmm_fast.lmm_predict_proba_tree.default, (logits, tree.index, value, theta, sizes))
    torch.library.opcheck(torch.ops.lmm_fast.lmm_predict_proba_dense.default, (logits, psi_t, theta, sizes))
    torch.library.opcheck(torch.ops.lmm_fast.lmm_topk_tree.default, (logits, tree.index, value, theta, sizes, 5))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(6)
    sizes = [4, 12, 97]
    logits, _, psi = random_problem(31, sizes, generator=gen)
    tree, psi_t, theta = operands(psi, torch.tensor([0.1, 0.2, 0.7]), sizes, torch.float32)

    def f(x):
        proba = lmm_predict_proba_tree(x, tree.index, tree.value, theta, sizes)
        values, indices = lmm_topk_tree(x, tree.index, tree.value, theta, sizes, 3)
        return proba + lmm_predict_proba_dense(x, psi_t, theta, sizes), values, indices

    eager = f(logits.detach())
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(logits.detach())
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_tree_detection_is_cached_and_follows_writes():
    gen = torch.Generator().manual_seed(7)
    sizes = [3, 9, 40]
    psi = tree_psi(sizes, gen)
    loss_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5])
    logits = torch.randn(6, 52, generator=gen)
    first = tree_index(loss_fn.psi_t, loss_fn.level_sizes)
    assert first is not None and tree_index(loss_fn.psi_t, loss_fn.level_sizes) is first
    torch.testing.assert_close(first.to_psi()[1], psi[1])
    # An in-place write (as the Gibbs adapter makes) that spreads a class over two groups.
    with torch.no_grad():
        loss_fn.psi[0][:, 0] = torch.tensor([0.5, 0.5, 0.0]) if psi[0][0, 0] == 0 else torch.tensor([0.5, 0.0, 0.5])
    assert tree_index(loss_fn.psi_t, loss_fn.level_sizes) is None
    torch.testing.assert_close(
        loss_fn.predict_proba(logits), predict_proba_reference(logits, [p.clone() for p in loss_fn.psi], loss_fn.theta)
    )
    loss_fn.set_psi(psi)
    again = tree_index(loss_fn.psi_t, loss_fn.level_sizes)
    assert again is not None and torch.equal(again.index, first.index)
    moved = loss_fn.to(torch.float64)
    assert tree_index(moved.psi_t, moved.level_sizes) is not None
    torch.testing.assert_close(
        moved.predict_proba(logits.double()), predict_proba_reference(logits.double(), [p.double() for p in psi], moved.theta)
    )


def per_row_reference(logits, psi, theta_rows):
    """Σ_l θ[b, l] softmax(a^l) Ψ^l in float64, one θ per row."""
    sizes = [p.shape[0] for p in psi] + [logits.shape[1] - sum(p.shape[0] for p in psi)]
    levels = torch.split(logits.detach().double(), sizes, dim=1)
    theta_rows = theta_rows.double()
    out = theta_rows[:, -1:] * torch.softmax(levels[-1], 1)
    for level, p in enumerate(psi):
        out = out + theta_rows[:, level : level + 1] * (torch.softmax(levels[level], 1) @ p.double())
    return out


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("batch", [3, 40])
def test_per_row_theta(dense, batch):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dense, batch)).encode()))
    sizes = [3, 10, 57]
    logits, _, psi = random_problem(batch, sizes, dense=dense, generator=gen)
    theta_rows = torch.softmax(torch.randn(batch, 3, generator=gen), 1)
    theta_rows[0] = torch.tensor([0.0, 0.0, 1.0])  # the flat softmax in one row
    loss_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5])
    ref = per_row_reference(logits, psi, theta_rows)
    proba = predict.mixture_proba(logits.detach(), loss_fn.psi_t, theta_rows, loss_fn.level_sizes)
    torch.testing.assert_close(proba.double(), ref, **tolerances(torch.float32))
    torch.testing.assert_close(proba[0], torch.softmax(logits.detach()[0, -57:], 0))
    values, indices = lmm_fast.predict_topk(logits.detach(), loss_fn, 4, theta=theta_rows)
    torch.testing.assert_close(values.double(), torch.topk(ref, 4, 1).values, **tolerances(torch.float32))
    # gradcheck and opcheck on three rows, in float64.
    tree, psi_t, _ = operands(psi, torch.ones(3), sizes, torch.float64)
    xs = logits.detach()[:3].double().requires_grad_()
    ts = theta_rows[:3].double().requires_grad_()
    ws = torch.rand(3, 57, generator=gen, dtype=torch.float64)

    def g(a, t):
        if dense:
            return lmm_predict_proba_dense(a, psi_t, t, sizes) * ws
        return lmm_predict_proba_tree(a, tree.index, tree.value_as(torch.float64), t, sizes) * ws

    assert torch.autograd.gradcheck(g, (xs, ts), fast_mode=True)
    op = torch.ops.lmm_fast.lmm_predict_proba_dense.default if dense else torch.ops.lmm_fast.lmm_predict_proba_tree.default
    args = (xs, psi_t, ts, sizes) if dense else (xs, tree.index, tree.value_as(torch.float64), ts, sizes)
    torch.library.opcheck(op, args)
    with pytest.raises(RuntimeError, match="theta must have one weight per level, \\[3\\] or per row \\[3, 3\\]"):
        op(*[a if a is not ts else ts[:2] for a in args])


@pytest.mark.parametrize("kind", ["initial", "unequal_values", "not_nested"])
@pytest.mark.parametrize("batch", [3, 40])
def test_tree_kernel_paths(kind, batch):
    # The CPU kernel folds the upper levels into one table when every class of
    # a last-level group shares its ancestors and values (from 8 rows on), and
    # gathers level by level otherwise; both must agree with the reference.
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, batch)).encode()))
    sizes = [4, 15, 203]
    psi = tree_psi(sizes, gen)
    if kind == "unequal_values":
        psi = [p * torch.rand(p.shape, generator=gen) for p in psi]
        psi = [p / p.sum(1, keepdim=True) for p in psi]
    elif kind == "not_nested":
        groups = torch.randint(0, 4, (203,), generator=gen)
        groups[:4] = torch.arange(4)
        top = torch.zeros(4, 203)
        top[groups, torch.arange(203)] = 1.0
        psi[0] = top / top.sum(1, keepdim=True)
    loss_fn = FusedLMMLoss(psi, [0.3, 0.3, 0.4])
    assert tree_index(loss_fn.psi_t, loss_fn.level_sizes) is not None
    logits = 3 * torch.randn(batch, sum(sizes), generator=gen)
    ref = predict_proba_reference(logits.double(), [p.double() for p in psi], loss_fn.theta.double())
    torch.testing.assert_close(loss_fn.predict_proba(logits).double(), ref, **tolerances(torch.float32))
    values, indices = lmm_fast.predict_topk(logits, loss_fn, 5)
    torch.testing.assert_close(values.double(), torch.topk(ref, 5, 1).values, **tolerances(torch.float32))


def test_tree_with_a_class_in_no_group():
    # β = 0 adaptation can leave a column of Ψ^l zero: that level then gives the class nothing.
    sizes = [2, 6]
    psi = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.25, 0.25, 0.25, 0.25]])
    psi[:, 1] = 0.0
    psi[0, 0] = 1.0
    loss_fn = FusedLMMLoss([psi], [0.4, 0.6])
    tree = tree_index(loss_fn.psi_t, loss_fn.level_sizes)
    assert tree is not None and tree.value[0, 1] == 0
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(loss_fn.predict_proba(logits), predict_proba_reference(logits, [psi], loss_fn.theta))


def test_non_contiguous_list_and_empty_inputs():
    gen = torch.Generator().manual_seed(9)
    sizes = [3, 8, 29]
    width = sum(sizes)
    for dense in (False, True):
        psi = (dense_psi if dense else tree_psi)(sizes, gen)
        loss_fn = FusedLMMLoss(psi, [0.2, 0.2, 0.6])
        wide = torch.randn(12, width + 5, generator=gen)[:, 2 : 2 + width]
        transposed = torch.randn(width, 12, generator=gen).t()
        for logits in (wide, transposed):
            assert not logits.is_contiguous()
            ref = predict_proba_reference(logits, psi, loss_fn.theta)
            torch.testing.assert_close(loss_fn.predict_proba(logits), ref)
            parts = list(torch.split(logits, sizes, 1))
            torch.testing.assert_close(loss_fn.predict_proba(parts), ref)
            values, _ = lmm_fast.predict_topk(logits, loss_fn, 4)
            torch.testing.assert_close(values, torch.topk(ref, 4, 1).values)
        empty = torch.zeros(0, width)
        assert loss_fn.predict_proba(empty).shape == (0, 29)
        values, indices = lmm_fast.predict_topk(empty, loss_fn, 3)
        assert values.shape == indices.shape == (0, 3)
        values, indices = lmm_fast.predict_topk(wide, loss_fn, 0)
        assert values.shape == indices.shape == (12, 0)


@pytest.mark.parametrize("dense", [False, True])
def test_low_precision_within_twice_torch_error(dense):
    gen = torch.Generator().manual_seed(10)
    sizes = [4, 16, 200]
    logits, _, psi = random_problem(32, sizes, dense=dense, generator=gen)
    theta = torch.tensor([0.2, 0.3, 0.5])
    ref = reference(logits, psi, theta)
    loss_fn = FusedLMMLoss(psi, theta)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.detach().to(dtype)
        proba = loss_fn.predict_proba(low)
        assert proba.dtype == dtype
        ours = (proba.double() - ref).abs().max()
        torch_low = predict_proba_reference(low, [p.to(dtype) for p in psi], theta.to(dtype))
        theirs = (torch_low.double() - ref).abs().max()
        assert ours <= 2 * theirs + 1e-6, (dtype, ours, theirs)
        if not dense:
            values, indices = lmm_fast.predict_topk(low, loss_fn, 5)
            assert values.dtype == dtype
            torch.testing.assert_close(values, proba.gather(1, indices))


@pytest.mark.parametrize("device", lmm_fast.testing.devices())
def test_masked_and_extreme_logits(device):
    gen = torch.Generator().manual_seed(11)
    sizes = [3, 9, 50]
    for dense in (False, True):
        logits, _, psi = random_problem(16, sizes, dense=dense, generator=gen)
        masked = logits.detach().clone()
        masked[:, -10:] = float("-inf")
        masked[:, 0] = float("-inf")
        masked[:4] = torch.where(torch.rand(4, 62, generator=gen) < 0.5, -1e4, 1e4)
        theta = torch.tensor([0.3, 0.3, 0.4])
        loss_fn = FusedLMMLoss(psi, theta).to(device)
        proba = loss_fn.predict_proba(masked.to(device)).cpu()
        assert torch.isfinite(proba).all()
        ref = reference(masked, psi, theta)
        torch.testing.assert_close(proba.double(), ref, **tolerances(torch.float32))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 9),
    sizes=st.lists(st.integers(1, 12), min_size=0, max_size=3).map(lambda s: sorted(set(s))),
    extra=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    dense=st.booleans(),
)
def test_property_matches_reference(batch, sizes, extra, seed, dense):
    sizes = sizes + [(sizes[-1] if sizes else 1) + extra]
    gen = torch.Generator().manual_seed(seed)
    logits, _, psi = random_problem(batch, sizes, dense=dense, generator=gen)
    theta = random_theta(len(sizes), gen)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=sizes[-1])
    ref = reference(logits, psi, theta)
    torch.testing.assert_close(loss_fn.predict_proba(logits.detach()).double(), ref, **tolerances(torch.float32))
    k = min(3, sizes[-1])
    values, indices = lmm_fast.predict_topk(logits.detach(), loss_fn, k)
    torch.testing.assert_close(ref.gather(1, indices), values.double(), **tolerances(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch,width,dim", [(1, 1, 1), (7, 5, 3), (33, 41, 64), (4, 9, 100), (0, 3, 8), (5, 0, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gather_scores_matches_reference(dtype, batch, width, dim, with_bias):
    # a seed that is the same in every process (str hashes are salted per process)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((str(dtype), batch, width, dim, with_bias)).encode()))
    x = torch.randn(batch, dim, generator=gen).to(dtype)
    weight = torch.randn(37, dim, generator=gen).to(dtype)
    bias = torch.randn(37, generator=gen).to(dtype) if with_bias else None
    rows = torch.randint(-1, 37, (batch, width), generator=gen)
    out = predict_ops.lmm_gather_scores(x, weight, bias, rows)
    ref = gather_scores_reference(x.double(), weight.double(), None if bias is None else bias.double(), rows)
    assert out.dtype == dtype and out.shape == (batch, width)
    if dtype == torch.float32:
        # a float32 dot product of length d is exact to d·ε·Σ|x_i w_i|
        magnitude = gather_scores_reference(x.double().abs(), weight.double().abs(),
                                            None if bias is None else bias.double().abs(), rows)
        finite = rows >= 0
        bound = (dim + 1) * torch.finfo(torch.float32).eps * magnitude[finite]
        assert bool(((out.double() - ref)[finite].abs() <= bound).all())
    else:
        tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else tolerances(dtype)
        torch.testing.assert_close(out.double(), ref, **tol)
    assert torch.isinf(out[rows < 0]).all()


def test_gather_scores_opcheck_and_errors():
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(6, 10, generator=gen)
    weight = torch.randn(20, 10, generator=gen)
    bias = torch.randn(20, generator=gen)
    rows = torch.randint(-1, 20, (6, 4), generator=gen)
    torch.library.opcheck(torch.ops.lmm_fast.lmm_gather_scores.default, (x, weight, bias, rows))
    torch.library.opcheck(torch.ops.lmm_fast.lmm_gather_scores.default, (x[:, ::2], weight[:, ::2], None, rows))
    with pytest.raises(RuntimeError, match="rows must hold weight rows in \\[0, 20\\) or -1, got values in \\[-1, 20\\]"):
        predict_ops.lmm_gather_scores(x, weight, bias, rows.clamp_max(19).index_fill(1, torch.tensor([0]), 20))
    with pytest.raises(RuntimeError, match="weight must be \\[rows, d\\] = \\[\\*, 10\\]"):
        predict_ops.lmm_gather_scores(x, weight[:, :9], bias, rows)
    with pytest.raises(RuntimeError, match="bias must be \\[rows\\] = \\[20\\]"):
        predict_ops.lmm_gather_scores(x, weight, bias[:3], rows)
    with pytest.raises(RuntimeError, match="rows must be int64"):
        predict_ops.lmm_gather_scores(x, weight, bias, rows.int())
    with pytest.raises(RuntimeError, match="weight must have x's dtype Float"):
        predict_ops.lmm_gather_scores(x, weight.double(), bias, rows)
    with pytest.raises(RuntimeError, match="rows must be \\[B, C\\] with B = 6"):
        predict_ops.lmm_gather_scores(x, weight, bias, rows[:2])


# ---------------------------------------------------------------- bad inputs
def _good(dtype=torch.float32):
    sizes = [3, 7, 19]
    logits, _, psi = random_problem(4, sizes, dtype=dtype, generator=torch.Generator().manual_seed(12))
    tree, psi_t, theta = operands(psi, torch.tensor([0.2, 0.3, 0.5]), sizes, dtype)
    return logits.detach(), tree.index, tree.value_as(theta.dtype), psi_t, theta, sizes


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "logits": a["logits"][0]}, "logits must be 2-D"),
        (lambda a: {**a, "logits": a["logits"].long()}, "logits must be float32, float64"),
        (lambda a: {**a, "logits": a["logits"][:, :-1]}, "sum\\(level_sizes\\) = 29"),
        (lambda a: {**a, "index": a["index"].long()}, "group_index must be int32"),
        (lambda a: {**a, "index": a["index"][:1]}, "group_index must be \\[upper levels, N\\] = \\[2, 19\\]"),
        (lambda a: {**a, "value": a["value"].double()}, "group_value must be Float"),
        (lambda a: {**a, "value": a["value"][:, :5]}, "group_value must have group_index's shape"),
        (lambda a: {**a, "theta": a["theta"].double()}, "theta must be Float"),
        (lambda a: {**a, "theta": a["theta"][:2]}, "theta must have one weight per level, \\[3\\] or per row \\[4, 3\\]"),
        (lambda a: {**a, "sizes": [3, 7, 0]}, "level_sizes\\[2\\] must be positive"),
        (lambda a: {**a, "index": a["index"].clone().index_fill_(1, torch.tensor([4]), 7)}, "group_index\\[0, 4\\] = 7 is out of range"),
        (lambda a: {**a, "index": a["index"] - 1}, "group_index\\[.*\\] = -1 is out of range"),
    ],
)
def test_tree_ops_name_the_bad_argument(change, match):
    logits, index, value, _, theta, sizes = _good()
    a = change(dict(logits=logits, index=index, value=value, theta=theta, sizes=sizes))
    with pytest.raises(RuntimeError, match=match):
        lmm_predict_proba_tree(a["logits"], a["index"], a["value"], a["theta"], a["sizes"])
    with pytest.raises(RuntimeError, match=match):
        lmm_topk_tree(a["logits"], a["index"], a["value"], a["theta"], a["sizes"], 2)


def test_dense_and_topk_checks():
    logits, index, value, psi_t, theta, sizes = _good()
    with pytest.raises(RuntimeError, match="psi_t must be \\[N, sum\\(upper level sizes\\)\\] = \\[19, 10\\]"):
        lmm_predict_proba_dense(logits, psi_t[:, :4], theta, sizes)
    with pytest.raises(RuntimeError, match="psi_t must be Float"):
        lmm_predict_proba_dense(logits, psi_t.double(), theta, sizes)
    for k in (-1, 20):
        with pytest.raises(RuntimeError, match="k must be in \\[0, N\\] = \\[0, 19\\]"):
            lmm_topk_tree(logits, index, value, theta, sizes, k)
    loss_fn = FusedLMMLoss(tree_psi(sizes), [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="k must be an int in \\[0, N\\] = \\[0, 19\\]"):
        lmm_fast.predict_topk(logits, loss_fn, 20)
    with pytest.raises(ValueError, match="logits must be \\[B, 29\\]"):
        loss_fn.predict_proba(logits[:, 1:])
    with pytest.raises(TypeError, match="logits must be floating point"):
        loss_fn.predict_proba(logits.long())


# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("batch,sizes", [(1, [2, 5]), (37, [3, 10, 1001]), (64, [10, 100, 10000]), (5, [13])])
def test_cuda_matches_reference(dtype, dense, batch, sizes):
    gen = torch.Generator().manual_seed(13)
    logits, _, psi = random_problem(batch, sizes, dense=dense, generator=gen)
    theta = random_theta(len(sizes), gen).float()
    ref = reference(logits, psi, theta)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=sizes[-1]).cuda()
    if dtype == torch.float64:
        loss_fn = loss_fn.to(torch.float64)
    x = logits.detach().to("cuda", dtype)
    proba = loss_fn.predict_proba(x)
    assert proba.dtype == dtype and proba.device.type == "cuda"
    values, indices = lmm_fast.predict_topk(x, loss_fn, min(5, sizes[-1]))
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(proba.double().cpu(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(values.double().cpu(), torch.topk(ref, values.shape[1], 1).values, rtol=1e-4, atol=1e-6)
    else:
        torch_low = predict_proba_reference(x.float(), [p.cuda() for p in psi], theta.cuda()).to(dtype)
        ours = (proba.double().cpu() - ref).abs().max()
        theirs = (torch_low.double().cpu() - ref).abs().max()
        assert ours <= 2 * theirs + 1e-6, (ours, theirs)
    torch.testing.assert_close(proba.gather(1, indices), values)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    gen = torch.Generator().manual_seed(14)
    sizes = [4, 12, 97]
    logits, _, psi = random_problem(31, sizes, generator=gen)
    tree, psi_t, theta = operands(psi, torch.tensor([0.1, 0.2, 0.7]), sizes, torch.float32)
    x = logits.detach().cuda()
    index, value, psi_t, theta = tree.index.cuda(), tree.value.cuda(), psi_t.cuda(), theta.cuda()
    torch.library.opcheck(torch.ops.lmm_fast.lmm_predict_proba_tree.default, (x, index, value, theta, sizes))
    torch.library.opcheck(torch.ops.lmm_fast.lmm_predict_proba_dense.default, (x, psi_t, theta, sizes))
    torch.library.opcheck(torch.ops.lmm_fast.lmm_topk_tree.default, (x, index, value, theta, sizes, 5))
    f = torch.compile(lambda a: lmm_predict_proba_tree(a, index, value, theta, sizes), fullgraph=True)
    torch.testing.assert_close(f(x), lmm_predict_proba_tree(x, index, value, theta, sizes))
    rows = torch.softmax(torch.randn(31, 3, generator=gen), 1)
    ref = per_row_reference(logits, psi, rows)
    for out in (lmm_predict_proba_tree(x, index, value, rows.cuda(), sizes), lmm_predict_proba_dense(x, psi_t, rows.cuda(), sizes)):
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_gather_scores(dtype):
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(33, 70, generator=gen).to(dtype)
    weight = torch.randn(300, 70, generator=gen).to(dtype)
    bias = torch.randn(300, generator=gen).to(dtype)
    rows = torch.randint(-1, 300, (33, 45), generator=gen)
    out = predict_ops.lmm_gather_scores(x.cuda(), weight.cuda(), bias.cuda(), rows.cuda())
    ref = gather_scores_reference(x.double(), weight.double(), bias.double(), rows)
    tol = dict(rtol=1e-2, atol=5e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    torch.library.opcheck(torch.ops.lmm_fast.lmm_gather_scores.default, (x.cuda(), weight.cuda(), None, rows.cuda()))


# ---------------------------------------------------------------- path score
def test_path_score_matches_a_bruteforce_product():
    x, y, h = toy_task()
    sizes = list(h.level_sizes) + [h.num_classes]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, sum(sizes), generator=g)
    proba = path_score_proba(logits, h.assignments, sizes)
    parts = torch.split(logits, sizes, 1)
    want = torch.softmax(parts[-1], 1).clone()
    for part, a in zip(parts[:-1], h.assignments):
        want = want * torch.softmax(part, 1)[:, a]
    want = want / want.sum(1, keepdim=True)
    assert torch.allclose(proba, want, atol=1e-6)
    assert torch.allclose(path_score_proba(list(parts), h.assignments), proba, atol=1e-6)
    # Not capped: when every level is sure, the class gets (almost) all of the mass.
    sure = torch.cat([F.one_hot(a[3:4], s).float() * 30 for a, s in zip(h.assignments, sizes)]
                     + [F.one_hot(torch.tensor([3]), sizes[-1]).float() * 30], 1)
    assert float(path_score_proba(sure, h.assignments, sizes)[0, 3]) > 0.999
    with pytest.raises(ValueError, match="logits"):
        path_score_proba(logits[:, :-1], h.assignments, sizes)
    with pytest.raises(ValueError, match="assignments"):
        path_score_proba(logits, [], sizes)
    with pytest.raises(ValueError, match="negative"):
        path_score_proba(logits, [torch.full((h.num_classes,), -1)] * 2, sizes)
