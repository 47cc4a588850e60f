"""Numerics and autograd of the loss and prediction beyond the usual inputs:
double backward (gradgradcheck, a gradient penalty through the head), float64
kept float64 end to end, θ checked wherever it is given, the CPU gradient
storage owned (and released) by the loss module."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import lmm_fast
from lmm_fast import FusedLMMLoss, GibbsAdapter, LMMHead
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.ops.loss import lmm_loss_forward
from lmm_fast.ops.predict import lmm_predict_proba_dense, lmm_predict_proba_tree, lmm_topk_tree
from lmm_fast.predict import predict_topk, tree_index
from lmm_fast.reference.loss import lmm_loss_reference, predict_proba_reference
from lmm_fast.testing import dense_psi, tree_psi

SIZES = [3, 7, 20]


def child_env(**extra: str) -> dict:
    """The environment of a child interpreter: it imports the lmm_fast this
    test imported (installed, or an in-place build)."""
    import os

    parent = os.path.dirname(os.path.dirname(os.path.abspath(lmm_fast.__file__)))
    path = os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def wide_psi(kind: str, seed: int = 0) -> list[torch.Tensor]:
    """float64 Ψ with values float32 cannot hold (1/3, 1/7, random)."""
    gen = torch.Generator().manual_seed(seed)
    psi = (tree_psi if kind == "tree" else dense_psi)(SIZES, gen)
    psi = [p.double() * (1 + torch.rand(p.shape, generator=gen, dtype=torch.float64)) for p in psi]
    return [p / p.sum(1, keepdim=True) for p in psi]


WIDE_THETA = torch.tensor([1 / 3, 1 / 7, 1 - 1 / 3 - 1 / 7], dtype=torch.float64)


# ------------------------------------------------------------ double backward
@pytest.mark.parametrize("kind", ["tree", "dense"])
@pytest.mark.parametrize("per_row", [False, True])
def test_loss_gradgradcheck(kind, per_row):
    gen = torch.Generator().manual_seed(1)
    loss_fn = FusedLMMLoss(wide_psi(kind), WIDE_THETA)
    scale = 0.5 + torch.rand(loss_fn.psi_t.shape[1], generator=gen, dtype=torch.float64)
    psi_t = loss_fn.psi_t / scale  # with the per-group factors, as the adapter keeps Ψ
    logits = torch.randn(5, sum(SIZES), generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 19, 11])
    theta = (torch.softmax(torch.randn(5, 3, generator=gen, dtype=torch.float64), 1) if per_row
             else WIDE_THETA.clone()).requires_grad_()

    def loss(a, t):
        return lmm_loss_forward(a, target, psi_t, t, SIZES, -100, scale)[0]

    assert torch.autograd.gradcheck(loss, (logits, theta), fast_mode=True)
    assert torch.autograd.gradgradcheck(loss, (logits, theta), fast_mode=True)


def test_gradient_penalty_through_the_head_matches_the_reference():
    # Before: the weight gradient of a penalty on ∂loss/∂x was 49-76 % off.
    gen = torch.Generator().manual_seed(2)
    h = Hierarchy.from_assignments([torch.arange(20) % 7 % 3, torch.arange(20) % 7])
    head = LMMHead(6, h).double()
    loss_fn = FusedLMMLoss.from_hierarchy(h).double()
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 20, (9,), generator=gen)

    def penalty_grad(compute):
        grad_x, = torch.autograd.grad(compute(head(x)), x, create_graph=True)
        return torch.autograd.grad((grad_x ** 2).sum(), head.linear.weight)[0]

    fused = penalty_grad(lambda a: loss_fn(a, target))
    reference = penalty_grad(lambda a: lmm_loss_reference(a, target, loss_fn.psi, loss_fn.theta, reduction="mean"))
    torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-12)


def test_learned_theta_double_backward():
    loss_fn = FusedLMMLoss(wide_psi("tree"), WIDE_THETA, learn_theta=True)
    logits = torch.randn(4, sum(SIZES), dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 2, 3, 4])
    grad, = torch.autograd.grad(loss_fn(logits, target), logits, create_graph=True)
    got = torch.autograd.grad(grad.square().sum(), loss_fn.theta_logits)[0]
    logits_ref = logits.detach().requires_grad_()
    ref_loss = lmm_loss_reference(logits_ref, target, loss_fn.psi, loss_fn.theta, reduction="mean")
    grad_ref, = torch.autograd.grad(ref_loss, logits_ref, create_graph=True)
    want = torch.autograd.grad(grad_ref.square().sum(), loss_fn.theta_logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("op", ["tree", "dense", "topk"])
def test_prediction_gradgradcheck(op):
    gen = torch.Generator().manual_seed(3)
    psi = wide_psi("tree")
    psi_t = FusedLMMLoss(psi, WIDE_THETA).psi_t
    tree = tree_index(psi_t, SIZES)
    logits = torch.randn(3, sum(SIZES), generator=gen, dtype=torch.float64, requires_grad=True)
    theta = WIDE_THETA.clone().requires_grad_()
    fn = {
        "tree": lambda a, t: lmm_predict_proba_tree(a, tree.index, tree.value, t, SIZES),
        "dense": lambda a, t: lmm_predict_proba_dense(a, psi_t, t, SIZES),
        "topk": lambda a, t: lmm_topk_tree(a, tree.index, tree.value, t, SIZES, 4)[0],
    }[op]
    assert torch.autograd.gradgradcheck(fn, (logits, theta), fast_mode=True)


# -------------------------------------------------------------------- float64
@pytest.mark.parametrize("kind", ["tree", "dense"])
def test_float64_is_float64(kind):
    # Before: psi_t, psi_scale and θ were float32, a float64 loss 5.7e-9 off
    # the float64 reference and predict_proba 2.6e-8.
    psi = wide_psi(kind)
    loss_fn = FusedLMMLoss(psi, WIDE_THETA, reduction="none")
    assert loss_fn.psi_t.dtype == loss_fn.psi_scale.dtype == loss_fn.theta.dtype == torch.float64
    gen = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(64, sum(SIZES), generator=gen, dtype=torch.float64)
    target = torch.randint(0, 20, (64,), generator=gen)
    want = lmm_loss_reference(logits, target, psi, WIDE_THETA)
    torch.testing.assert_close(loss_fn(logits, target), want, rtol=1e-10, atol=0)
    proba = predict_proba_reference(logits, psi, WIDE_THETA)
    torch.testing.assert_close(loss_fn.predict_proba(logits), proba, rtol=0, atol=1e-10)
    values, indices = predict_topk(logits, loss_fn, 5)
    want_values = proba.gather(1, indices)
    torch.testing.assert_close(values, want_values, rtol=0, atol=1e-12)
    # a head reading this loss predicts in float64 as well
    h = Hierarchy.from_assignments([torch.arange(20) % 7 % 3, torch.arange(20) % 7])
    head = LMMHead(5, h).double()
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(head.predict_proba(x, loss_fn), predict_proba_reference(head(x), psi, WIDE_THETA),
                               rtol=0, atol=1e-10)
    # .double() keeps it, the state dict round-trips it
    assert loss_fn.double().psi_t.dtype == torch.float64
    fresh = FusedLMMLoss(psi, WIDE_THETA)
    fresh.load_state_dict(loss_fn.state_dict())
    assert torch.equal(fresh.psi_t, loss_fn.psi_t) and torch.equal(fresh.theta, loss_fn.theta)


def test_float64_theta_alone_and_double_afterwards():
    psi32 = [p.float() for p in wide_psi("dense")]
    assert FusedLMMLoss(psi32, WIDE_THETA).psi_t.dtype == torch.float64
    loss32 = FusedLMMLoss(psi32, [0.25, 0.25, 0.5])
    assert loss32.psi_t.dtype == loss32.psi_scale.dtype == loss32.theta.dtype == torch.float32  # unchanged
    dyadic = Hierarchy.from_assignments([torch.arange(16) % 2, torch.arange(16) % 4]).psi(dtype=torch.float16)
    half = FusedLMMLoss(dyadic, [0.25, 0.25, 0.5])
    assert half.psi_t.dtype == half.theta.dtype == torch.float32
    loss64 = loss32.double()
    assert loss64.psi_t.dtype == loss64.theta.dtype == torch.float64
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(16, sum(SIZES), generator=gen, dtype=torch.float64)
    target = torch.randint(0, 20, (16,), generator=gen)
    want = lmm_loss_reference(logits, target, [p.double() for p in psi32], loss64.theta, reduction="mean")
    torch.testing.assert_close(loss64(logits, target), want, rtol=1e-10, atol=0)


def test_float64_loss_under_adaptation():
    h = Hierarchy.from_assignments([torch.arange(20) % 7 % 3, torch.arange(20) % 7])
    loss_fn = FusedLMMLoss(h.psi(dtype=torch.float64), WIDE_THETA)
    targets = torch.randint(0, 20, (200,), generator=torch.Generator().manual_seed(6))
    adapter = GibbsAdapter(loss_fn, h, targets, beta=0.3)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        idx = torch.randperm(200, generator=gen)[:50]
        adapter.step(torch.randn(50, sum(SIZES), generator=gen, dtype=torch.float64), targets[idx], idx)
    assert loss_fn.psi_t.dtype == torch.float64
    rows = torch.cat([p.sum(1) for p in loss_fn.psi])
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- theta
def small_setup():
    h = Hierarchy.from_assignments([torch.arange(12) % 3, torch.arange(12) % 6])
    return h, LMMHead(5, h), FusedLMMLoss.from_hierarchy(h)


def test_theta_is_checked_wherever_it_is_given():
    h, head, loss_fn = small_setup()
    logits, target, x = torch.randn(4, 21), torch.tensor([0, 1, 2, 3]), torch.randn(4, 5)
    nan_row = torch.tensor([[0.2, 0.3, 0.5]] * 3 + [[float("nan"), 0.5, 0.5]])
    with pytest.raises(ValueError, match=r"theta must lie on the simplex .*\[nan, 0.5, 0.5\] \(row 3 of 4\)"):
        loss_fn(logits, target, theta=nan_row)
    for bad in ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.5, 0.6, -0.1], [float("inf"), 0.0, 0.0]):
        with pytest.raises(ValueError, match="theta must lie on the simplex"):
            head.predict_proba(x, theta=bad)
        with pytest.raises(ValueError, match="theta must lie on the simplex"):
            head.predict_topk(x, 3, theta=torch.tensor(bad))
        with pytest.raises(ValueError, match="theta must lie on the simplex"):
            head.predict_topk(x, 3, beam=2, theta=torch.tensor(bad))
        with pytest.raises(ValueError, match="theta must lie on the simplex"):
            predict_topk(logits, loss_fn, 3, theta=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"theta must be \[3\] or \[B, 3\]"):
        head.predict_proba(x, theta=[0.5, 0.5])
    good = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(head.predict_proba(x, theta=good).sum(1), torch.ones(4))


def test_theta_on_meta_is_a_clear_error():
    h, head, loss_fn = small_setup()
    logits, target = torch.randn(4, 21), torch.tensor([0, 1, 2, 3])
    meta = torch.full((4, 3), 1 / 3, device="meta")
    with pytest.raises(ValueError, match="theta is on the meta device .* but the logits are on cpu"):
        loss_fn(logits, target, theta=meta)
    with pytest.raises(ValueError, match="theta is on the meta device .* but the features are on cpu"):
        head.predict_proba(torch.randn(4, 5), theta=meta)
    # all on meta: nothing to check, shapes propagate
    out = loss_fn.to("meta")(logits.to("meta"), target.to("meta"), theta=meta)
    assert out.device.type == "meta" and out.shape == ()


def test_predict_topk_of_no_rows():
    # Before: a reshape error with a beam.
    _, head, loss_fn = small_setup()
    for beam in (None, 2):
        values, indices = head.predict_topk(torch.randn(0, 5), 3, beam=beam)
        assert values.shape == indices.shape == (0, 3) and indices.dtype == torch.int64
    values, indices = head.predict_topk(torch.randn(0, 5, dtype=torch.float64), 3, beam=2, loss_fn=loss_fn.double())
    assert values.dtype == torch.float64 and values.shape == (0, 3)


# -------------------------------------------------------------- grad storage
def test_grad_cache_is_a_setting_of_the_module():
    sizes = [4, 16, 9000]  # > 4 MiB of gradient
    psi = tree_psi(sizes, torch.Generator().manual_seed(8))
    gen = torch.Generator().manual_seed(9)
    target = torch.randint(0, 9000, (128,), generator=gen)
    cached, fresh = FusedLMMLoss(psi), FusedLMMLoss(psi, grad_cache=False)
    assert cached.grad_cache and not fresh.grad_cache
    pointers = {"cached": [], "fresh": []}
    for _ in range(3):
        for name, loss_fn in (("cached", cached), ("fresh", fresh)):
            logits = torch.randn(128, sum(sizes), generator=gen, requires_grad=True)
            loss_fn(logits, target).backward()
            pointers[name].append(logits.grad.data_ptr())
            del logits
    width = sum(sizes)
    assert cached.grad_cache_nbytes == 128 * width * 4 and fresh.grad_cache_nbytes == 0
    assert len(set(pointers["cached"][1:])) == 1  # reused once the first gradient was freed
    cached.grad_cache = False
    assert cached.grad_cache_nbytes == 0
    with pytest.raises(TypeError, match="grad_cache must be True or False"):
        FusedLMMLoss(psi, grad_cache="yes")


def test_grad_cache_is_released_with_the_module():
    # Before: the process-global cache held the last gradient after every
    # tensor and the loss were gone (81 MiB against 3 MiB without it).
    code = textwrap.dedent("""
        import gc, os, torch, lmm_fast
        from lmm_fast.testing import tree_psi
        def rss_mib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        sizes = [4, 16, 40000]
        loss_fn = lmm_fast.FusedLMMLoss(tree_psi(sizes, torch.Generator().manual_seed(0)))
        target = torch.randint(0, 40000, (512,))
        gc.collect()
        before = rss_mib()
        for _ in range(2):
            logits = torch.randn(512, sum(sizes), requires_grad=True)
            loss_fn(logits, target).backward()
            del logits
        gc.collect()
        held = rss_mib() - before
        del loss_fn, target
        gc.collect()
        print(held, rss_mib() - before)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=child_env())
    assert result.returncode == 0, result.stderr[-2000:]
    held, after = map(float, result.stdout.split())
    gradient_mib = 512 * (4 + 16 + 40000) * 4 / 2**20  # 78 MiB
    assert held > 0.8 * gradient_mib, result.stdout  # kept while the module lives
    assert after < 0.25 * gradient_mib, result.stdout  # and freed with it
