"""FusedLinearLMMLoss, linear_lmm_loss and their custom ops against LMMHead +
FusedLMMLoss and the float64 references."""
import pytest
import torch
import torch.nn.functional as F

from lmm_fast import FusedLinearLMMLoss, FusedLMMLoss, GibbsAdapter, Hierarchy, LMMHead, linear_lmm_loss
from lmm_fast.linear_loss import DEFAULT_MEMORY_BUDGET, chunk_rows_for_budget
from lmm_fast.ops import linear_loss as linear_ops
from lmm_fast.ops import loss as loss_ops
from lmm_fast.profiling import peak_extra_bytes
from lmm_fast.reference.linear_loss import linear_lmm_loss_chunked_torch, linear_lmm_loss_reference
from lmm_fast.testing import dense_psi, tolerances, tree_psi

# (batch, level sizes bottom last, d)
SHAPES = [
    (1, [2, 5], 3),
    (7, [3, 5, 11], 5),
    (33, [4, 40, 1001], 17),
    (9, [13], 4),  # a single level: the flat softmax
    (16, [3, 9, 27, 81], 8),
]


def psi_t_of(psi, num_classes):
    if not psi:
        return torch.zeros(num_classes, 0)
    return torch.cat([p.t() for p in psi], 1).contiguous()


def problem(batch, sizes, d, *, dense=False, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    psi = (dense_psi if dense else tree_psi)(sizes, gen)
    x = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    weight = scale * torch.randn(sum(sizes), d, generator=gen, dtype=torch.float64)
    bias = 0.5 * torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    target = torch.randint(0, sizes[-1], (batch,), generator=gen)
    theta = torch.rand(len(sizes), generator=gen, dtype=torch.float64) + 0.05
    theta = theta / theta.sum()
    cast = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(weight), cast(bias), target, psi, theta.to(dtype)


def hierarchy_of(psi, num_classes, nested=True):
    """A hierarchy with the levels of ``psi`` (its groups: each class's argmax;
    set a dense Ψ on the loss afterwards)."""
    if not psi:
        # A single level (flat softmax): a hierarchy needs an upper level, so
        # callers use the functional form.
        raise ValueError("no upper level")
    return Hierarchy.from_assignments([p.argmax(0) for p in psi], nested=nested, relabel=not nested)


def reference_grads(x, weight, bias, target, psi, theta, reduction, ignore_index=-100, weights=None):
    """Loss and gradients of the float64 reference."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, theta)]
    loss = linear_lmm_loss_reference(
        leaves[0], leaves[1], leaves[2], target, [p.double() for p in psi], leaves[3], ignore_index, reduction
    )
    out = loss.sum() if weights is None else (loss * weights.double()).sum()
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return loss.detach(), grads


def close(actual, expected, dtype=torch.float32, factor=1.0):
    tol = tolerances(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"] * factor, atol=tol["atol"] * factor)


# --------------------------------------------------------------------- values
@pytest.mark.parametrize("batch,sizes,d", SHAPES)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_functional_matches_float64_reference(batch, sizes, d, dense, reduction, chunk_rows):
    x, weight, bias, target, psi, theta = problem(batch, sizes, d, dense=dense, seed=batch * 7 + d)
    theta.requires_grad_()
    psi_t = psi_t_of(psi, sizes[-1])
    loss = linear_lmm_loss(
        x, weight, bias, target, psi_t, theta, sizes, reduction=reduction, chunk_rows=chunk_rows
    )
    weights = torch.rand(batch, generator=torch.Generator().manual_seed(3)) if reduction == "none" else None
    ref_loss, ref_grads = reference_grads(x, weight, bias, target, psi, theta, reduction, weights=weights)
    close(loss.detach(), ref_loss)
    out = loss if weights is None else (loss * weights).sum()
    grads = torch.autograd.grad(out, [x, weight, bias, theta])
    for name, grad, ref in zip(("x", "weight", "bias", "theta"), grads, ref_grads):
        assert grad.shape == ref.shape, name
        close(grad, ref, factor=4)


@pytest.mark.parametrize("batch,sizes,d", SHAPES[:3] + SHAPES[4:])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_matches_head_and_fused_loss(batch, sizes, d, dense, reduction):
    """The same parameters through LMMHead + FusedLMMLoss give the same loss and gradients."""
    x, _, _, target, psi, theta = problem(batch, sizes, d, dense=dense, seed=batch + 100 * d)
    h = hierarchy_of(psi, sizes[-1], nested=not dense)
    fused = FusedLinearLMMLoss(d, h, theta, reduction=reduction, chunk_rows=max(1, batch // 3), init_std=0.5)
    if dense:
        fused.lmm_loss.set_psi(psi)
    unfused = FusedLMMLoss(fused.lmm_loss.psi, theta, reduction=reduction, num_classes=sizes[-1])
    loss = fused(x, target)
    ref = unfused(fused.head(x), target)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    weights = torch.rand(batch) if reduction == "none" else torch.ones(())
    params = [x, fused.weight, fused.bias]
    grads = torch.autograd.grad((loss * weights).sum(), params)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    for grad, expected in zip(grads, ref_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_matches_the_same_chunking_in_plain_pytorch():
    x, weight, bias, target, psi, theta = problem(29, [4, 12, 50], 9, seed=4)
    for reduction in ("mean", "sum"):
        loss, gx, gw, gb = linear_lmm_loss_chunked_torch(x, weight, bias, target, psi, theta, 5, reduction=reduction)
        ours = linear_lmm_loss(x, weight, bias, target, psi_t_of(psi, 50), theta, [4, 12, 50],
                               reduction=reduction, chunk_rows=5)
        grads = torch.autograd.grad(ours, [x, weight, bias])
        close(ours.detach(), loss)
        for grad, expected in zip(grads, (gx, gw, gb)):
            close(grad, expected, factor=4)


def test_large_logits_stay_finite():
    """Logits far outside the exp range (weights x 50) still give the reference's loss."""
    x, weight, bias, target, psi, theta = problem(12, [3, 10, 40], 6, seed=5, scale=50.0)
    loss = linear_lmm_loss(x, weight, bias, target, psi_t_of(psi, 40), theta, [3, 10, 40], chunk_rows=5)
    ref, ref_grads = reference_grads(x, weight, bias, target, psi, theta, "mean")
    assert torch.isfinite(loss)
    close(loss.detach(), ref, factor=10)
    grads = torch.autograd.grad(loss, [x, weight, bias])
    for grad, expected in zip(grads, ref_grads[:3]):
        # float32 GEMMs of entries ~50: errors scale with the largest entry
        scale = float(expected.abs().max())
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------ ignored rows, chunks
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ignored_rows(reduction):
    x, weight, bias, target, psi, theta = problem(10, [3, 7, 30], 5, seed=6)
    target[[0, 4, 9]] = -1
    psi_t = psi_t_of(psi, 30)
    loss = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [3, 7, 30], ignore_index=-1,
                           reduction=reduction, chunk_rows=4)
    ref, ref_grads = reference_grads(x, weight, bias, target, psi, theta, reduction, ignore_index=-1)
    close(loss.detach(), ref)
    (grad_x, grad_w) = torch.autograd.grad(loss.sum(), [x, weight])
    assert (grad_x[[0, 4, 9]] == 0).all(), "ignored rows get no gradient"
    assert (grad_x[1].abs() > 0).any()
    close(grad_w, ref_grads[1], factor=4)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_rows_ignored_like_fused_loss(reduction):
    """mean over no valid row is NaN with zero gradients, as FusedLMMLoss and nn.CrossEntropyLoss."""
    x, _, _, target, psi, theta = problem(6, [3, 7, 30], 5, seed=7)
    target[:] = -100
    h = hierarchy_of(psi, 30)
    fused = FusedLinearLMMLoss(5, h, theta, reduction=reduction, chunk_rows=4)
    loss = fused(x, target)
    ref = fused.lmm_loss(fused.head(x), target)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    if reduction == "mean":
        assert torch.isnan(loss)
    grads = torch.autograd.grad(loss.sum(), [x, fused.weight, fused.bias])
    for grad in grads:
        assert (grad == 0).all()


def test_chunk_ranges_are_even_and_cover_the_batch():
    assert linear_ops._chunks(0, 4) == []
    assert linear_ops._chunks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert linear_ops._chunks(9, 4) == [(0, 3), (3, 6), (6, 9)]  # not 4 + 4 + 1
    assert linear_ops._chunks(5, 100) == [(0, 5)]
    for batch in range(1, 40):
        for rows in range(1, 12):
            ranges = linear_ops._chunks(batch, rows)
            assert ranges[0][0] == 0 and ranges[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) <= rows and max(sizes) - min(sizes) <= 1 + (sizes[-1] < sizes[0]) * rows


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 6, 7, 100])
def test_chunk_size_does_not_change_the_result(chunk_rows):
    x, weight, bias, target, psi, theta = problem(7, [3, 8, 21], 6, seed=8)
    psi_t = psi_t_of(psi, 21)
    whole = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [3, 8, 21], chunk_rows=7)
    whole_grads = torch.autograd.grad(whole, [x, weight, bias])
    loss = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [3, 8, 21], chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss, [x, weight, bias])
    torch.testing.assert_close(loss, whole)
    for grad, expected in zip(grads, whole_grads):
        torch.testing.assert_close(grad, expected)


def test_memory_budget():
    # 32 logits per row: 128 bytes in float32, and as many for their gradient
    # (the two chunk buffers)
    sizes = [3, 8, 21]
    assert chunk_rows_for_budget(256, 32, torch.float32, "cpu") == 1
    assert chunk_rows_for_budget(1000, 32, torch.float32, "cpu") == 3
    assert chunk_rows_for_budget(1024, 32, torch.float32, "cpu") == 4
    assert chunk_rows_for_budget(1000, 32, torch.float64, "cpu") == 1
    assert chunk_rows_for_budget(None, 32, torch.float32, "cpu") == DEFAULT_MEMORY_BUDGET["cpu"] // 256
    x, weight, bias, target, psi, theta = problem(5, sizes, 4, seed=9)
    psi_t = psi_t_of(psi, 21)
    message = r"memory_budget=255 bytes is smaller than one row of logits and its gradient.*256 bytes"
    with pytest.raises(ValueError, match=message):
        linear_lmm_loss(x, weight, bias, target, psi_t, theta, sizes, memory_budget=255)
    with pytest.raises(ValueError, match="smaller than one row"):
        FusedLinearLMMLoss(4, hierarchy_of(psi, 21), memory_budget=200)(x, target)
    one_row = linear_lmm_loss(x, weight, bias, target, psi_t, theta, sizes, memory_budget=256)
    torch.testing.assert_close(one_row, linear_lmm_loss(x, weight, bias, target, psi_t, theta, sizes, chunk_rows=1))
    with pytest.raises(ValueError, match="not both"):
        linear_lmm_loss(x, weight, bias, target, psi_t, theta, sizes, memory_budget=1000, chunk_rows=2)
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        linear_lmm_loss(x, weight, bias, target, psi_t, theta, sizes, chunk_rows=0)
    with pytest.raises(ValueError, match="memory_budget must be a positive int"):
        FusedLinearLMMLoss(4, hierarchy_of(psi, 21), memory_budget=-5)


def test_empty_batch():
    x, weight, bias, target, psi, theta = problem(0, [3, 8, 21], 4, seed=10)
    psi_t = psi_t_of(psi, 21)
    rows = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [3, 8, 21], reduction="none")
    assert rows.shape == (0,)
    total = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [3, 8, 21], reduction="sum")
    grads = torch.autograd.grad(total, [x, weight, bias])
    assert float(total.detach()) == 0 and grads[0].shape == (0, 4) and (grads[1] == 0).all()


# -------------------------------------------------------------- bad inputs
def _error_of(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value).split("\n")[0]


def test_bad_inputs_raise_the_errors_of_fused_loss():
    x, _, _, target, psi, theta = problem(6, [3, 7, 30], 5, seed=11)
    fused = FusedLinearLMMLoss(5, hierarchy_of(psi, 30), theta, chunk_rows=4)
    lmm = fused.lmm_loss
    logits = fused.head(x)
    out_of_range = target.clone()
    out_of_range[5] = 30
    negative = target.clone()
    negative[4] = -3
    cases = {
        "target out of range": dict(target=out_of_range),
        "negative target": dict(target=negative),
        "float target": dict(target=target.float()),
        "bool target": dict(target=target > 3),
        "target of the wrong length": dict(target=target[:4]),
        "2-D target": dict(target=target[:, None]),
        "list target": dict(target=target.tolist()),
        "theta off the simplex": dict(theta=torch.tensor([0.5, 0.5, 0.5])),
        "theta of the wrong size": dict(theta=torch.tensor([0.5, 0.5])),
        "per-row theta of the wrong rows": dict(theta=torch.full((4, 3), 1 / 3)),
        "integer theta": dict(theta=torch.tensor([0, 0, 1])),
    }
    for name, change in cases.items():
        args = dict(target=target, theta=None)
        args.update(change)
        expected = _error_of(lambda: lmm(logits, args["target"], theta=args["theta"]))
        actual = _error_of(lambda: fused(x, args["target"], theta=args["theta"]))
        assert actual == expected, name
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        FusedLinearLMMLoss(5, hierarchy_of(psi, 30), reduction="avg")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        linear_lmm_loss(x, fused.weight, fused.bias, target, lmm.psi_t, lmm.theta, [3, 7, 30], reduction="avg")


def test_bad_features_and_weights():
    x, weight, bias, target, psi, theta = problem(6, [3, 7, 30], 5, seed=12)
    fused = FusedLinearLMMLoss(5, hierarchy_of(psi, 30), theta)
    psi_t, sizes = psi_t_of(psi, 30), [3, 7, 30]
    with pytest.raises(ValueError, match=r"x must be \[B, in_features\] = \[B, 5\], got shape \(6, 4\)"):
        fused(x[:, :4], target)
    with pytest.raises(TypeError, match="x must be floating point"):
        fused(torch.ones(6, 5, dtype=torch.long), target)
    with pytest.raises(TypeError, match="weight is torch.float32 but x is torch.float64"):
        fused(x.double(), target)
    with pytest.raises(ValueError, match=r"weight must be \[sum\(level_sizes\), d\] = \[40, 5\]"):
        linear_lmm_loss(x, weight[:39], bias, target, psi_t, theta, sizes)
    with pytest.raises(ValueError, match=r"bias must be \[sum\(level_sizes\)\] = \[40\]"):
        linear_lmm_loss(x, weight, bias[:39], target, psi_t, theta, sizes)
    with pytest.raises(ValueError, match=r"theta must be \[3\] or \[B, 3\]"):
        linear_lmm_loss(x, weight, bias, target, psi_t, theta[:2], sizes)
    with pytest.raises(RuntimeError, match=r"psi_t must be \[N, sum\(upper level sizes\)\] = \[30, 10\]"):
        linear_lmm_loss(x, weight, bias, target, psi_t[:, :9], theta, sizes)
    with pytest.raises(RuntimeError, match=r"target\[2\] = 30 is out of range"):
        bad = target.clone()
        bad[2] = 30
        linear_lmm_loss(x, weight, bias, bad, psi_t, theta, sizes, chunk_rows=2)


# ------------------------------------------------------------------ autograd
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("per_row_theta", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(reduction, per_row_theta, with_bias):
    gen = torch.Generator().manual_seed(13)
    sizes, batch, d = [2, 4, 9], 5, 3
    psi = dense_psi(sizes, gen)
    psi_t = psi_t_of(psi, 9).double()
    x = torch.randn(batch, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(sizes), d, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(sum(sizes), generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    target = torch.randint(0, 9, (batch,), generator=gen)
    target[1] = -100
    theta_shape = (batch, 3) if per_row_theta else (3,)
    theta = torch.softmax(torch.randn(theta_shape, generator=gen, dtype=torch.float64), -1).requires_grad_()

    def fn(x, weight, bias, theta):
        return linear_lmm_loss(x, weight, bias, target, psi_t, theta, sizes, reduction=reduction, chunk_rows=2)

    inputs = (x, weight, bias, theta)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_learned_theta_matches_fused_loss():
    x, _, _, target, psi, _ = problem(11, [3, 7, 30], 5, seed=14)
    fused = FusedLinearLMMLoss(5, hierarchy_of(psi, 30), [0.2, 0.3, 0.5], learn_theta=True, chunk_rows=4,
                               init_std=0.5)
    loss = fused(x, target)
    (grad,) = torch.autograd.grad(loss, fused.lmm_loss.theta_logits)
    ref = fused.lmm_loss(fused.head(x), target)
    (ref_grad,) = torch.autograd.grad(ref, fused.lmm_loss.theta_logits)
    assert ref_grad.abs().max() > 1e-4
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    names = {name for name, _ in fused.named_parameters()}
    assert names == {"head.linear.weight", "head.linear.bias", "lmm_loss.theta_logits"}


def test_per_row_theta_matches_fused_loss():
    x, _, _, target, psi, _ = problem(9, [3, 7, 30], 5, seed=15)
    fused = FusedLinearLMMLoss(5, hierarchy_of(psi, 30), chunk_rows=2, init_std=0.5)
    gate = torch.softmax(torch.randn(9, 3), -1).requires_grad_()
    loss = fused(x, target, theta=gate)
    ref = fused.lmm_loss(fused.head(x), target, theta=gate)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, gate)[0], torch.autograd.grad(ref, gate)[0])


CE_OPTIONS = [(True, 0.0), (False, 0.15), (True, 0.15)]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("class_weight,label_smoothing", CE_OPTIONS)
def test_class_weight_and_label_smoothing_match_fused_loss(reduction, class_weight, label_smoothing):
    """nn.CrossEntropyLoss's weight and label_smoothing, through the module
    (held by its FusedLMMLoss), give FusedLMMLoss's loss and gradients,
    those of a learned θ included."""
    x, _, _, target, psi, _ = problem(13, [3, 7, 30], 5, seed=31)
    target[[2, 7]] = -100
    weights = torch.rand(30, generator=torch.Generator().manual_seed(5)) + 0.25 if class_weight else None
    fused = FusedLinearLMMLoss(5, hierarchy_of(psi, 30), [0.2, 0.3, 0.5], reduction=reduction, learn_theta=True,
                               class_weight=weights, label_smoothing=label_smoothing, chunk_rows=4, init_std=0.5)
    assert fused.label_smoothing == label_smoothing and (fused.class_weight is None) == (weights is None)
    loss = fused(x, target)
    ref = fused.lmm_loss(fused.head(x), target)
    torch.testing.assert_close(loss, ref)
    scale = torch.rand(13) if reduction == "none" else torch.ones(())
    params = [x, fused.weight, fused.bias, fused.lmm_loss.theta_logits]
    grads = torch.autograd.grad((loss * scale).sum(), params)
    ref_grads = torch.autograd.grad((ref * scale).sum(), params)
    assert ref_grads[3].abs().max() > 1e-4
    for grad, expected in zip(grads, ref_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("class_weight,label_smoothing", CE_OPTIONS)
def test_class_weight_and_label_smoothing_match_float64_reference(reduction, class_weight, label_smoothing):
    x, weight, bias, target, psi, theta = problem(10, [3, 7, 30], 5, seed=32)
    target[4] = -100
    theta.requires_grad_()
    weights = torch.rand(30, generator=torch.Generator().manual_seed(6)) + 0.25 if class_weight else None
    loss = linear_lmm_loss(x, weight, bias, target, psi_t_of(psi, 30), theta, [3, 7, 30], reduction=reduction,
                           class_weight=weights, label_smoothing=label_smoothing, chunk_rows=3)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, theta)]
    ref = linear_lmm_loss_reference(*leaves[:3], target, [p.double() for p in psi], leaves[3], -100, reduction,
                                    None if weights is None else weights.double(), label_smoothing)
    close(loss.detach(), ref.detach())
    grads = torch.autograd.grad(loss.sum(), [x, weight, bias, theta])
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    for grad, expected in zip(grads, ref_grads):
        close(grad, expected, factor=4)


def test_gradcheck_float64_class_weight_and_label_smoothing():
    gen = torch.Generator().manual_seed(33)
    sizes, batch, d = [2, 4, 9], 5, 3
    psi_t = psi_t_of(dense_psi(sizes, gen), 9).double()
    x = torch.randn(batch, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(sizes), d, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(sum(sizes), generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (batch,), generator=gen)
    target[1] = -100
    theta = torch.softmax(torch.randn(batch, 3, generator=gen, dtype=torch.float64), -1).requires_grad_()
    weights = torch.rand(9, generator=gen, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean"):
        def fn(x, weight, bias, theta):
            return linear_lmm_loss(x, weight, bias, target, psi_t, theta, sizes, reduction=reduction,
                                   class_weight=weights, label_smoothing=0.2, chunk_rows=2)

        assert torch.autograd.gradcheck(fn, (x, weight, bias, theta), eps=1e-6, atol=1e-6)


def test_backward_scales_and_accumulates():
    """A scaled loss scales every gradient; retain_graph + two backwards add up."""
    x, weight, bias, target, psi, theta = problem(8, [3, 7, 30], 5, seed=16)
    psi_t = psi_t_of(psi, 30)
    loss = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [3, 7, 30], chunk_rows=3)
    base = torch.autograd.grad(loss, [x, weight, bias], retain_graph=True)
    tripled = torch.autograd.grad(3 * loss, [x, weight, bias], retain_graph=True)
    for a, b in zip(base, tripled):
        torch.testing.assert_close(3 * a, b)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(weight.grad, 2 * base[1])
    torch.testing.assert_close(x.grad, 2 * base[0])


def test_only_the_needed_gradients():
    """Frozen weights: the op forms only grad_x, and the no-grad path gives the same loss."""
    x, weight, bias, target, psi, theta = problem(8, [3, 7, 30], 5, seed=17)
    psi_t = psi_t_of(psi, 30)
    w, b = weight.detach(), bias.detach()
    loss = linear_lmm_loss(x, w, b, target, psi_t, theta, [3, 7, 30], chunk_rows=3)
    (grad_x,) = torch.autograd.grad(loss, [x])
    ref, ref_grads = reference_grads(x, weight, bias, target, psi, theta, "mean")
    close(grad_x, ref_grads[0], factor=4)
    with torch.no_grad():
        plain = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [3, 7, 30], chunk_rows=3)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, loss.detach())
    *_, gw, gb, gt = linear_ops.linear_lmm_loss_reduced(
        x.detach(), w, b, target, psi_t, theta, None, None, 0.0, [3, 7, 30], -100, 3, "mean",
        [True, False, False, False],
    )
    assert gw.numel() == 0 and gb.numel() == 0 and gt.numel() == 0


# ------------------------------------------------------- opcheck and compile
def _op_args(seed=18, dtype=torch.float32, per_row_theta=False, with_bias=True, with_scale=True,
             class_weight=False, label_smoothing=0.0):
    x, weight, bias, target, psi, theta = problem(7, [3, 6, 20], 4, dense=True, seed=seed, dtype=dtype)
    target[2] = -100
    psi_t = psi_t_of(psi, 20).to(dtype)
    if per_row_theta:
        theta = torch.softmax(torch.randn(7, 3, dtype=dtype), -1)
    theta = theta.detach().requires_grad_()
    scale = (torch.rand(9, dtype=dtype) + 0.5) if with_scale else None
    weights = (torch.rand(20, dtype=dtype) + 0.5) if class_weight else None
    return (x, weight, bias if with_bias else None, target, psi_t, theta, scale, weights, label_smoothing,
            [3, 6, 20], -100, 3)


@pytest.mark.parametrize("per_row_theta", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("class_weight,label_smoothing", [(False, 0.0), (True, 0.2)])
def test_opcheck(per_row_theta, with_bias, class_weight, label_smoothing):
    args = _op_args(per_row_theta=per_row_theta, with_bias=with_bias, class_weight=class_weight,
                    label_smoothing=label_smoothing)
    torch.library.opcheck(torch.ops.lmm_fast.linear_lmm_loss.default, args)
    mask = [True, True, with_bias, True]
    for reduction in ("mean", "sum"):
        torch.library.opcheck(torch.ops.lmm_fast.linear_lmm_loss_reduced.default, args + (reduction, mask))
    x, weight, bias, target, psi_t, theta, scale, weights, eps, sizes, ignore, rows = args
    _, lse, log_m = linear_ops.linear_lmm_loss_rows(*args)
    grad_loss = torch.rand(7)
    bargs = (grad_loss, x.detach(), weight.detach(), None if bias is None else bias.detach(), target, psi_t,
             theta.detach(), scale, weights, eps, lse, log_m, sizes, ignore, rows, [True, True, with_bias])
    torch.library.opcheck(torch.ops.lmm_fast.linear_lmm_loss_backward.default, bargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_op_returns_the_loss_kernels_outputs(dtype):
    """Per-row loss and statistics of the chunked op are those of
    lmm_loss_forward on the whole logits, and its backward op's gradients
    those of lmm_loss_backward taken through the linear layer."""
    args = _op_args(seed=19, dtype=dtype, class_weight=True, label_smoothing=0.1)
    x, weight, bias, target, psi_t, theta, scale, weights, eps, sizes, ignore, rows = args
    x, weight, bias, theta = x.detach(), weight.detach(), bias.detach(), theta.detach()
    logits = torch.addmm(bias, x, weight.t())
    expected = loss_ops.lmm_loss_forward(logits, target, psi_t, theta, sizes, ignore, scale, weights, eps)
    got = linear_ops.linear_lmm_loss_rows(x, weight, bias, target, psi_t, theta, scale, weights, eps, sizes,
                                          ignore, rows)
    assert got[1].shape == (7, loss_ops.STAT_ROWS * 3) and got[2].shape == (7, 3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    grad_loss = torch.rand(7, dtype=dtype)
    grad_logits = loss_ops.lmm_loss_backward(grad_loss, logits, target, psi_t, theta, *expected[1:], sizes, ignore,
                                             scale, weights, eps)
    grads = linear_ops.linear_lmm_loss_rows_backward(grad_loss, x, weight, bias, target, psi_t, theta, scale,
                                                     weights, eps, *got[1:], sizes, ignore, rows, [True, True, True])
    for a, b in zip(grads, (grad_logits @ weight, grad_logits.t() @ x, grad_logits.sum(0))):
        torch.testing.assert_close(a, b)
    only_x = linear_ops.linear_lmm_loss_rows_backward(grad_loss, x, weight, bias, target, psi_t, theta, scale,
                                                      weights, eps, *got[1:], sizes, ignore, rows,
                                                      [True, False, False])
    assert only_x[1].numel() == 0 and only_x[2].numel() == 0


def test_torch_compile_fullgraph():
    x, _, _, target, psi, theta = problem(13, [4, 12, 97], 6, seed=20)
    fused = FusedLinearLMMLoss(6, hierarchy_of(psi, 97), theta, learn_theta=True, chunk_rows=5, init_std=0.5)
    params = [x, fused.weight, fused.bias, fused.lmm_loss.theta_logits]

    def rows(x, target):
        return linear_lmm_loss(x, fused.weight, fused.bias, target, fused.lmm_loss.psi_t, fused.theta,
                               fused.level_sizes, reduction="none", chunk_rows=5)

    weights = torch.rand(13)
    for fn in (fused, rows):
        eager = fn(x, target)
        eager_grads = torch.autograd.grad((eager * weights).sum() if eager.dim() else eager, params)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        loss = compiled(x, target)
        grads = torch.autograd.grad((loss * weights).sum() if loss.dim() else loss, params)
        torch.testing.assert_close(loss, eager)
        for grad, expected in zip(grads, eager_grads):
            torch.testing.assert_close(grad, expected)


def test_torch_compile_module_training_step():
    x, _, _, target, psi, theta = problem(13, [4, 12, 97], 6, seed=21)
    fused = FusedLinearLMMLoss(6, hierarchy_of(psi, 97), theta, chunk_rows=4, init_std=0.5)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    loss = compiled(x, target)
    loss.backward()
    got = [fused.weight.grad.clone(), fused.bias.grad.clone(), x.grad.clone()]
    fused.zero_grad()
    x.grad = None
    fused.lmm_loss(fused.head(x), target).backward()
    for grad, expected in zip(got, [fused.weight.grad, fused.bias.grad, x.grad]):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- head and Ψ
def test_head_shares_the_parameters_and_predicts():
    x, _, _, target, psi, theta = problem(10, [3, 9, 40], 6, seed=22)
    h = hierarchy_of(psi, 40)
    fused = FusedLinearLMMLoss(6, h, theta, init_std=0.5)
    assert fused.head.linear.weight is fused.weight
    with torch.no_grad():
        fused.weight.mul_(2)  # an update through the module is the head's
    assert torch.equal(fused.head(x), torch.addmm(fused.bias, x, fused.weight.t()))
    full = fused.head.predict_topk(x, 5, loss_fn=fused.lmm_loss)
    beam = fused.predict_topk(x, 5, beam=9)  # a beam that covers every group equals the full prediction
    torch.testing.assert_close(beam[0], full[0])
    assert torch.equal(beam[1], full[1])
    proba = fused.predict_proba(x)
    torch.testing.assert_close(proba, fused.lmm_loss.predict_proba(fused.head(x)))
    state = fused.state_dict()
    assert set(state) == {"head.linear.weight", "head.linear.bias", "lmm_loss.psi_t", "lmm_loss.psi_scale",
                          "lmm_loss.theta_fixed"}
    other = FusedLinearLMMLoss(6, h, theta)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x, target), fused(x, target))
    head = LMMHead(6, h)
    head.load_state_dict(fused.head.state_dict())
    assert torch.equal(head(x), fused.head(x))


def test_from_flat_starts_at_the_flat_model():
    gen = torch.Generator().manual_seed(23)
    psi = tree_psi([3, 9, 40], gen)
    linear = torch.nn.Linear(6, 40)
    x = torch.randn(12, 6, generator=gen)
    target = torch.randint(0, 40, (12,), generator=gen)
    fused = FusedLinearLMMLoss.from_flat(linear, hierarchy_of(psi, 40), theta=[0.0, 0.0, 1.0], chunk_rows=5)
    torch.testing.assert_close(fused(x, target), F.cross_entropy(linear(x), target))
    assert fused.head.linear.weight.data_ptr() != linear.weight.data_ptr()
    shared = FusedLinearLMMLoss.from_head(fused.head)
    assert shared.weight is fused.weight
    with pytest.raises(TypeError, match="head must be an LMMHead"):
        FusedLinearLMMLoss.from_head(linear)


def test_upper_logits_drive_the_gibbs_adapter():
    """The adapter reads only the upper levels: stepping with upper_logits(x)
    equals stepping with the full logits, and the loss follows the adapted Ψ
    (psi_scale no longer one)."""
    gen = torch.Generator().manual_seed(24)
    psi = tree_psi([3, 9, 40], gen)
    h = hierarchy_of(psi, 40)
    train_targets = torch.randint(0, 40, (64,), generator=gen)
    x = torch.randn(16, 6, generator=gen)
    indices = torch.randperm(64, generator=gen)[:16]
    target = train_targets[indices]
    results = []
    for upper_only in (True, False):
        torch.manual_seed(0)
        fused = FusedLinearLMMLoss(6, h, init_std=1.0, chunk_rows=5)
        adapter = GibbsAdapter(fused.lmm_loss, h, train_targets, beta=0.5, seed=3)
        logits = fused.upper_logits(x) if upper_only else fused.head(x)
        if upper_only:
            assert logits.shape == (16, 12) and not logits.requires_grad
            torch.testing.assert_close(logits, fused.head(x)[:, :12].detach())
        adapter.step(logits, target, indices)
        results.append((adapter.labels.clone(), fused))
    assert torch.equal(results[0][0], results[1][0])
    fused = results[0][1]
    assert not bool((fused.lmm_loss.psi_scale == 1).all()), "the adapter keeps Ψ factored"
    loss = fused(x, target)
    ref = fused.lmm_loss(fused.head(x), target)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, [fused.weight, fused.bias])
    ref_grads = torch.autograd.grad(ref, [fused.weight, fused.bias])
    for grad, expected in zip(grads, ref_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_dense_confusion_hierarchy():
    gen = torch.Generator().manual_seed(25)
    confusion = torch.rand(30, 30, generator=gen) + torch.eye(30) * 5
    h = Hierarchy.from_confusion(confusion)
    fused = FusedLinearLMMLoss(5, h, chunk_rows=4, init_std=0.5)
    x = torch.randn(10, 5, generator=gen)
    target = torch.randint(0, 30, (10,), generator=gen)
    loss = fused(x, target)
    ref = fused.lmm_loss(fused.head(x), target)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, [fused.weight])
    torch.testing.assert_close(grads[0], torch.autograd.grad(ref, [fused.weight])[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ memory
def _peak_extra_bytes(fn):
    return peak_extra_bytes(fn, "cpu")  # the profiler replay the benchmarks use


def test_never_holds_the_logits():
    """Peak extra memory of a training step stays near two chunk buffers (the
    chunk's logits and their gradient), far below the unfused head's logits
    and their gradient."""
    gen = torch.Generator().manual_seed(26)
    sizes, batch, d, rows = [8, 64, 4000], 256, 32, 16
    psi = tree_psi(sizes, gen)
    fused = FusedLinearLMMLoss(d, hierarchy_of(psi, sizes[-1]), chunk_rows=rows)
    x = torch.randn(batch, d, generator=gen).requires_grad_()
    target = torch.randint(0, sizes[-1], (batch,), generator=gen)

    def fused_step():
        fused.zero_grad(set_to_none=False)
        x.grad = None
        fused(x, target).backward()

    def unfused_step():
        fused.zero_grad(set_to_none=False)
        x.grad = None
        fused.lmm_loss(fused.head(x), target).backward()

    fused_step()
    unfused_step()
    logits_bytes = batch * sum(sizes) * 4
    weight_bytes = fused.weight.numel() * 4
    grad_x_bytes = x.numel() * 4
    fused_peak = _peak_extra_bytes(fused_step) - grad_x_bytes
    unfused_peak = _peak_extra_bytes(unfused_step) - grad_x_bytes
    chunk_bytes = rows * sum(sizes) * 4
    # The unfused gradient's storage is kept across calls by the CPU kernel's
    # cache, so only the logits show up as new memory of a warm call.
    assert unfused_peak >= logits_bytes
    # two chunk buffers, the float32 grad_W accumulator the op hands back, B x 7L statistics
    assert fused_peak <= 2 * chunk_bytes + weight_bytes + 128 * batch + 2**16, (fused_peak, chunk_bytes, weight_bytes)
    assert fused_peak >= 2 * chunk_bytes, "the gradient is a second chunk-sized buffer"
    assert fused_peak < 0.2 * unfused_peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_plain_pytorch(dtype, monkeypatch):
    """float16/bfloat16 (the CUDA case; the CPU runs the same composition):
    float32 accumulation of grad_W and grad_b across chunks (in blocks of
    weight rows, a few here to cover the blocking), and an error against
    float64 at most twice that of linear + reference loss in the same dtype."""
    monkeypatch.setattr(linear_ops, "_LOW_PRECISION_BLOCK_ROWS", 50)
    x, weight, bias, target, psi, theta = problem(48, [6, 40, 300], 24, seed=30)
    psi_t = psi_t_of(psi, 300)
    ref_loss, ref_grads = reference_grads(x, weight, bias, target, psi, theta, "mean")
    low = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias)]
    ours = linear_lmm_loss(*low, target, psi_t, theta, [6, 40, 300], chunk_rows=7)
    our_grads = torch.autograd.grad(ours, low)
    plain = linear_lmm_loss_reference(*low, target, [p.to(dtype) for p in psi], theta.to(dtype), reduction="mean")
    plain_grads = torch.autograd.grad(plain, low)

    def err(a, b):
        return float((a.detach().double() - b.double()).abs().max())

    assert ours.dtype == dtype
    assert err(ours, ref_loss) <= 2 * err(plain, ref_loss) + 1e-3
    for mine, theirs, exact in zip(our_grads, plain_grads, ref_grads):
        assert mine.dtype == dtype
        assert err(mine, exact) <= 2 * err(theirs, exact) + 1e-5


# -------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cuda_float32_matches_cpu(reduction):
    x, weight, bias, target, psi, theta = problem(37, [4, 30, 500], 16, dense=True, seed=27)
    target[3] = -100
    psi_t = psi_t_of(psi, 500)
    args = dict(reduction=reduction, chunk_rows=8)
    loss = linear_lmm_loss(x, weight, bias, target, psi_t, theta, [4, 30, 500], **args)
    grads = torch.autograd.grad(loss.sum(), [x, weight, bias])
    leaves = [t.detach().cuda().requires_grad_() for t in (x, weight, bias)]
    cuda_loss = linear_lmm_loss(*leaves, target.cuda(), psi_t.cuda(), theta.cuda(), [4, 30, 500], **args)
    cuda_grads = torch.autograd.grad(cuda_loss.sum(), leaves)
    torch.testing.assert_close(cuda_loss.cpu(), loss, rtol=1e-4, atol=1e-5)
    for grad, expected in zip(cuda_grads, grads):
        torch.testing.assert_close(grad.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_error_at_most_twice_plain_pytorch(dtype):
    """bf16/fp16 with float32 accumulation: error against float64 at most twice
    that of the plain PyTorch model (linear + reference loss) in the same dtype."""
    x, weight, bias, target, psi, theta = problem(64, [8, 64, 3000], 64, dense=False, seed=28)
    psi_t = psi_t_of(psi, 3000)
    ref_loss, ref_grads = reference_grads(x, weight, bias, target, psi, theta, "mean")
    low = [t.detach().cuda().to(dtype).requires_grad_() for t in (x, weight, bias)]
    ours = linear_lmm_loss(*low, target.cuda(), psi_t.cuda(), theta.cuda(), [8, 64, 3000], chunk_rows=16)
    our_grads = torch.autograd.grad(ours, low)
    plain = linear_lmm_loss_reference(*low, target.cuda(), [p.cuda().to(dtype) for p in psi],
                                      theta.cuda().to(dtype), reduction="mean")
    plain_grads = torch.autograd.grad(plain, low)

    def err(a, b):
        return float((a.detach().double().cpu() - b.double()).abs().max())

    assert err(ours, ref_loss) <= 2 * err(plain, ref_loss) + 1e-3
    for mine, theirs, exact in zip(our_grads, plain_grads, ref_grads):
        assert mine.dtype == dtype
        assert err(mine, exact) <= 2 * err(theirs, exact) + 1e-4


@pytest.mark.cuda
def test_cuda_module_and_compile():
    x, _, _, target, psi, theta = problem(40, [4, 30, 500], 16, seed=29)
    fused = FusedLinearLMMLoss(16, hierarchy_of(psi, 500), theta, init_std=0.5, device="cuda")
    x, target = x.detach().cuda().requires_grad_(), target.cuda()
    loss = fused(x, target)
    ref = fused.lmm_loss(fused.head(x), target)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(fused, fullgraph=True)
    torch.testing.assert_close(compiled(x, target), ref, rtol=1e-5, atol=1e-6)
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_args(class_weight=True,
                                                                                         label_smoothing=0.1))
    torch.library.opcheck(torch.ops.lmm_fast.linear_lmm_loss.default, cuda_args)
    torch.library.opcheck(torch.ops.lmm_fast.linear_lmm_loss_reduced.default,
                          cuda_args + ("mean", [True, True, True, True]))


# ----------------------------------------------------------- speed table
def test_the_speed_table_has_the_linear_loss_row():
    from lmm_fast.compare.speed import format_speed_table, speed_benchmark

    rows = speed_benchmark(devices=["cpu"], class_counts=(20,), batch=4, repeats=1, progress=False)
    linear = [r for r in rows if r["op"].startswith("linear+loss")]
    assert {r["impl"] for r in linear} == {"ours", "flat", "unfused"}
    assert all(r["median_ms"] > 0 for r in linear)
    assert "linear+loss" in format_speed_table(rows)
