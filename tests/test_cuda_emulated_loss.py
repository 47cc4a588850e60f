"""The CUDA loss kernels and their host code, run on the emulated device
(torch.ops.lmm_fast_emulated, CPU tensors): the twins of the CUDA tests of
test_loss.py, with their tolerances, plus the odd sizes and the errors."""
import pytest
import torch

from lmm_fast import _ops
from lmm_fast.reference import lmm_loss_reference, lmm_loss_unfused
from lmm_fast.testing import random_problem, tolerances

from test_loss import make_loss, random_theta

pytestmark = pytest.mark.cuda_emulated


def emulated_loss(ops, loss_fn, logits, target, theta=None, psi_scale=True):
    """Per-row loss and the gradient of its sum, from the emulated forward
    and backward ops, with the operands FusedLMMLoss passes."""
    acc = _ops.accumulate_dtype(logits.dtype)
    psi_t = loss_fn.psi_t.to(acc)
    theta = loss_fn.theta.to(acc) if theta is None else theta.to(acc)
    scale = loss_fn.psi_scale.to(acc) if psi_scale else None
    sizes = loss_fn.level_sizes
    loss, lse, log_m = ops.lmm_loss_forward(logits, target, psi_t, theta, sizes, loss_fn.ignore_index, scale)
    ones = torch.ones_like(loss)
    grad = ops.lmm_loss_backward(ones, logits, target, psi_t, theta, lse, log_m, sizes, loss_fn.ignore_index, scale)
    return loss, grad


# twin of test_loss.py::test_cuda_matches_cpu_reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("batch,sizes", [(1, [2, 5]), (37, [3, 10, 1001]), (64, [10, 100, 10000])])
def test_emulated_matches_cpu_reference(emulated, dtype, dense, batch, sizes):
    gen = torch.Generator().manual_seed(16)
    logits, target, psi = random_problem(batch, sizes, dense=dense, generator=gen)
    target[0] = -100
    theta = torch.tensor(random_theta(len(sizes), gen).tolist())
    ref_logits = logits.detach().double().requires_grad_()
    ref = lmm_loss_reference(ref_logits, target, [p.double() for p in psi], theta.double(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    loss_fn = make_loss(psi, theta, sizes[-1], reduction="sum")
    x = logits.detach().to(dtype)
    rows, grad = emulated_loss(emulated, loss_fn, x, target)
    out = rows.sum()
    assert rows[0] == 0 and bool((grad[0] == 0).all())  # the ignored row
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
        # and the CPU op, row by row
        cpu = make_loss(psi, theta, sizes[-1], reduction="none")(x, target)
        torch.testing.assert_close(rows, cpu, rtol=1e-5, atol=1e-5)
    else:
        low = lmm_loss_unfused(x.float(), target, psi, theta, reduction="sum")
        ours = (out.double() - ref.detach()).abs()
        theirs = (low.double() - ref.detach()).abs()
        assert ours <= 2 * theirs + 1e-2 * ref.abs(), (ours, theirs)
        rel = (grad.double() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)  # B = 1: the one row is ignored
        assert rel < 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["max_levels", "wide_bottom", "per_row_theta", "no_psi_scale", "strided"])
def test_emulated_equals_cpu_op(emulated, dtype, case):
    gen = torch.Generator().manual_seed(21)
    sizes = {"max_levels": [2, 3, 4, 5, 6, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41],
             "wide_bottom": [33, 257, 1025]}.get(case, [5, 40, 300])
    batch = 3 if case == "max_levels" else 9
    logits, target, psi = random_problem(batch, sizes, dense=True, generator=gen)
    target[batch // 2] = -100
    loss_fn = make_loss(psi, random_theta(len(sizes), gen), sizes[-1], reduction="none").to(dtype)
    x = logits.detach().to(dtype)
    if case == "strided":  # rows with a stride larger than their width
        x = torch.cat([x, x], 1)[:, : sum(sizes)]
    theta = torch.softmax(torch.randn(batch, len(sizes), generator=gen), 1) if case == "per_row_theta" else None
    loss, grad = emulated_loss(emulated, loss_fn, x, target, theta, psi_scale=case != "no_psi_scale")
    xr = x.detach().clone().requires_grad_()
    want = loss_fn(xr, target, theta)
    (want_grad,) = torch.autograd.grad(want.sum(), xr)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, want.detach(), **tol)
    torch.testing.assert_close(grad, want_grad, **tol)


def test_emulated_limits_and_empty_batch(emulated):
    gen = torch.Generator().manual_seed(22)
    sizes = list(range(2, 19))  # 17 levels: one more than the CUDA kernels take
    logits, target, psi = random_problem(2, sizes, dense=True, generator=gen)
    loss_fn = make_loss(psi, random_theta(len(sizes), gen), sizes[-1], reduction="none")
    with pytest.raises(RuntimeError, match="the CUDA loss supports at most 16 levels, got 17"):
        emulated_loss(emulated, loss_fn, logits.detach(), target)
    sizes = [3, 7, 20]
    logits, target, psi = random_problem(0, sizes, generator=gen)
    loss_fn = make_loss(psi, random_theta(3, gen), 20, reduction="none")
    loss, grad = emulated_loss(emulated, loss_fn, logits.detach(), target)
    assert loss.shape == (0,) and grad.shape == (0, 30)
    logits, target, psi = random_problem(4, sizes, generator=gen)
    loss, grad = emulated_loss(emulated, loss_fn, logits.detach(), torch.full((4,), -100))
    assert bool((loss == 0).all()) and bool((grad == 0).all())


# twin of test_loss.py::test_cuda_compile_and_bad_target
def test_emulated_compile_and_bad_target(emulated):
    gen = torch.Generator().manual_seed(17)
    sizes = [4, 12, 97]
    logits, target, psi = random_problem(31, sizes, generator=gen)
    loss_fn = make_loss(psi, [0.1, 0.2, 0.7], 97)
    x = logits.detach()
    args = (loss_fn.psi_t, loss_fn.theta, sizes, -100, loss_fn.psi_scale)
    f = torch.compile(lambda a, t: emulated.lmm_loss_forward(a, t, *args)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, target), emulated.lmm_loss_forward(x, target, *args)[0])
    torch.library.opcheck(emulated.lmm_loss_forward.default, (x, target, *args))
    for bad in (97, -1, -101):
        target_bad = target.clone()
        target_bad[5] = bad
        message = f"target\\[5\\] = {bad} is out of range: class indices must be in \\[0, 97\\)"
        with pytest.raises(RuntimeError, match=message):
            torch.ops.lmm_fast.lmm_loss_forward(x, target_bad, *args)
        with pytest.raises(RuntimeError, match=message):
            emulated.lmm_loss_forward(x, target_bad, *args)
        _, lse, log_m = emulated.lmm_loss_forward(x, target, *args)
        with pytest.raises(RuntimeError, match=message):
            emulated.lmm_loss_backward(torch.ones(31), x, target_bad, loss_fn.psi_t, loss_fn.theta, lse, log_m,
                                       sizes, -100, loss_fn.psi_scale)


# twin of test_loss.py::test_masked_logits_minus_inf[cuda]
def test_emulated_masked_logits_minus_inf(emulated):
    gen = torch.Generator().manual_seed(18)
    sizes = [3, 9, 50]
    logits, target, psi = random_problem(16, sizes, dense=True, generator=gen)
    theta = torch.tensor([0.3, 0.3, 0.4])
    masked = logits.detach().clone()
    target = torch.arange(16) % 10  # targets in 0..9; classes 40..49 are masked
    masked[:, -10:] = float("-inf")
    masked[:, 0] = float("-inf")  # one group of the top level masked too
    loss, grad = emulated_loss(emulated, make_loss(psi, theta, 50, reduction="none"), masked, target)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, -10:] == 0).all() and (grad[:, 0] == 0).all()
    ref = lmm_loss_reference(masked.double(), target, [p.double() for p in psi], theta.double())
    torch.testing.assert_close(loss.double(), ref, **tolerances(torch.float32))


# twin of test_loss.py::test_psi_scale_factors_match_the_normalised_psi[cuda]
def test_emulated_psi_scale_factors_match_the_normalised_psi(emulated):
    gen = torch.Generator().manual_seed(21)
    sizes = [3, 7, 40]
    logits, target, psi = random_problem(17, sizes, dense=True, generator=gen)
    counts = [torch.randint(0, 9, (s, 40), generator=gen).float() + 0.5 for s in sizes[:-1]]
    normalised = [c / c.sum(1, keepdim=True) for c in counts]
    theta = [0.2, 0.3, 0.5]
    plain = make_loss(normalised, theta, 40, reduction="none")
    scaled = make_loss(normalised, theta, 40, reduction="none")
    with torch.no_grad():
        scaled.psi_t.copy_(torch.cat([c.t() for c in counts], 1))
        scaled.psi_scale.copy_(torch.cat([1 / c.sum(1) for c in counts]))
    x = logits.detach()
    a, grad_a = emulated_loss(emulated, plain, x, target)
    b, grad_b = emulated_loss(emulated, scaled, x, target)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(grad_b, grad_a)
    torch.testing.assert_close(a, plain(x, target))
    torch.library.opcheck(emulated.lmm_loss_forward.default,
                          (x, target, scaled.psi_t, scaled.theta, sizes, -100, scaled.psi_scale))
