"""The CUDA loss kernels and their host code, run on the emulated device
(torch.ops.lmm_fast_emulated, CPU tensors): the twins of the CUDA tests of
test_loss.py, with their tolerances, plus the odd sizes and the errors."""
import pytest
import torch

from lmm_fast import FusedLMMLoss
from lmm_fast.ops import accumulate_dtype
from lmm_fast.reference.loss import lmm_loss_reference, lmm_loss_unfused
from lmm_fast.testing import random_problem, tolerances

import emulated_backend
from test_loss import make_loss, random_theta

pytestmark = pytest.mark.cuda_emulated


def emulated_loss(ops, loss_fn, logits, target, theta=None, psi_scale=True, weight=None, label_smoothing=0.0,
                  grad_loss=None):
    """Per-row loss and the gradient of its sum (or of sum(grad_loss * loss)),
    from the emulated forward and backward ops, with the operands
    FusedLMMLoss passes."""
    acc = accumulate_dtype(logits.dtype)
    psi_t = loss_fn.psi_t.to(acc)
    theta = loss_fn.theta.to(acc) if theta is None else theta.to(acc)
    scale = loss_fn.psi_scale.to(acc) if psi_scale else None
    weight = None if weight is None else weight.to(acc)
    sizes = loss_fn.level_sizes
    eps = float(label_smoothing)
    loss, lse, log_m = ops.lmm_loss_forward(logits, target, psi_t, theta, sizes, loss_fn.ignore_index, scale,
                                            weight, eps)
    assert lse.shape == (logits.shape[0], 5 * len(sizes))
    upstream = torch.ones_like(loss) if grad_loss is None else grad_loss.to(loss.dtype)
    grad = ops.lmm_loss_backward(upstream, logits, target, psi_t, theta, lse, log_m, sizes, loss_fn.ignore_index,
                                 scale, weight, eps)
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


# ------------------------------------------------------------ weight, label_smoothing, precision
# Twins of the CUDA tests of test_loss_ce_options.py and test_loss_precision.py:
# the package's FusedLMMLoss on CPU tensors, its loss ops replaced by the
# emulated ones (package_ops_emulated), so that forward and backward run the
# CUDA kernels and host code on the emulated device.
LOSS_OPS = ("lmm_loss_forward", "lmm_loss_backward")
# The launcher's limit for the smoothing pass's per-group buffers in dynamic
# shared memory (kMaxSmoothingSharedBytes of loss_launch.h); above it they
# live in a global [B, k * upper_width] buffer.
SMOOTHING_SHARED_BYTES = 40 * 1024


def smoothing_in_shared(upper_width, dtype, buffers):
    """Whether the smoothing pass of a kernel keeps its `buffers` per-group
    buffers (1 for the forward, 2 for the backward) in shared memory."""
    return buffers * upper_width * accumulate_dtype(dtype).itemsize <= SMOOTHING_SHARED_BYTES


# twin of test_loss_ce_options.py::test_weight_and_smoothing_match_reference[cuda-...]
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps,weighted", [(0.0, True), (0.1, False), (0.3, True), (1.0, True)])
def test_emulated_weight_and_smoothing_match_reference(emulated, dense, reduction, eps, weighted):
    import test_loss_ce_options

    with emulated_backend.package_ops_emulated(*LOSS_OPS):
        before = emulated.control_launch_count("lmm_loss_backward_kernel")
        test_loss_ce_options.test_weight_and_smoothing_match_reference("cpu", dense, reduction, eps, weighted)
        assert emulated.control_launch_count("lmm_loss_backward_kernel") > before, "the emulated kernels ran"


# twin of test_loss_ce_options.py::test_cuda_autocast_returns_float32: CPU
# autocast (bfloat16) in front of the emulated op
def test_emulated_autocast_returns_float32(emulated):
    gen = torch.Generator().manual_seed(42)
    sizes = [4, 12, 50]
    _, target, psi = random_problem(16, sizes, generator=gen)
    linear = torch.nn.Linear(8, sum(sizes))
    x = torch.randn(16, 8, generator=gen)
    weight = torch.rand(50, generator=gen) * 2 + 0.1
    loss_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5], weight=weight, label_smoothing=0.1)
    want_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5], weight=weight, label_smoothing=0.1)
    with emulated_backend.package_ops_emulated(*LOSS_OPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = linear(x)
            assert logits.dtype == torch.bfloat16
            loss = loss_fn(logits, target)
        assert loss.dtype == torch.float32
        loss.backward()
    assert torch.isfinite(linear.weight.grad).all()
    torch.testing.assert_close(loss, want_fn(logits.detach().float(), target), rtol=1e-5, atol=1e-5)


# twin of test_loss_ce_options.py::test_cuda_weight_and_smoothing_match_cpu:
# the smoothing pass's per-group buffers in shared memory, in global scratch
# for the backward only, and in global scratch for both passes (few classes
# and wide upper levels, to keep the emulated run short)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["shared", "global_backward", "global_both"])
def test_emulated_weight_and_smoothing_match_cpu(emulated, dtype, layout):
    upper = {
        "shared": {torch.float32: [3, 10], torch.float64: [3, 10]},
        "global_backward": {torch.float32: [1000, 5000], torch.float64: [600, 2000]},
        "global_both": {torch.float32: [5000, 5300], torch.float64: [2600, 2600]},
    }[layout][dtype]
    sizes = upper + [23]
    width = sum(upper)
    forward_shared, backward_shared = smoothing_in_shared(width, dtype, 1), smoothing_in_shared(width, dtype, 2)
    assert (forward_shared, backward_shared) == {"shared": (True, True), "global_backward": (True, False),
                                                 "global_both": (False, False)}[layout]
    gen = torch.Generator().manual_seed(43)
    logits, target, psi = random_problem(4, sizes, dtype=dtype, dense=True, generator=gen)
    target[1] = -100
    weight = torch.rand(sizes[-1], generator=gen) * 2 + 0.1
    theta = torch.tensor([0.2, 0.3, 0.5])
    cpu = FusedLMMLoss(psi, theta, weight=weight, label_smoothing=0.2, reduction="none").to(dtype)
    upstream = torch.rand(4, generator=gen, dtype=torch.float64).to(dtype)
    x = logits.detach().requires_grad_()
    want = cpu(x, target)
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    loss, grad = emulated_loss(emulated, cpu, logits.detach(), target, weight=cpu.weight, label_smoothing=0.2,
                               grad_loss=upstream)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, want.detach(), **tol)
    torch.testing.assert_close(grad, want_grad, **tol)
    assert loss[1] == 0 and bool((grad[1] == 0).all())  # the ignored row
    # and against the float64 reference
    ref_logits = logits.detach().double().requires_grad_()
    ref = lmm_loss_reference(ref_logits, target, [p.double() for p in psi], theta.double(), reduction="none",
                             weight=weight.double(), label_smoothing=0.2)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, upstream.double())
    ref_tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref.detach(), **ref_tol)
    torch.testing.assert_close(grad.double(), ref_grad, **ref_tol)


def test_emulated_smoothing_per_row_theta_and_masked_logits(emulated):
    """Label smoothing with one theta per row, masked (-inf) logits and a
    class weight of 0, against the CPU op."""
    gen = torch.Generator().manual_seed(44)
    sizes = [3, 9, 50]
    logits, target, psi = random_problem(9, sizes, dense=True, generator=gen)
    target = torch.arange(9) % 10
    x = logits.detach().clone()
    x[:, -10:] = float("-inf")
    weight = torch.rand(50, generator=gen) + 0.1
    weight[3] = 0.0
    theta = torch.softmax(torch.randn(9, 3, generator=gen), 1)
    cpu = FusedLMMLoss(psi, [0.2, 0.3, 0.5], weight=weight, label_smoothing=0.3, reduction="none")
    xr = x.clone().requires_grad_()
    want = cpu(xr, target, theta)
    (want_grad,) = torch.autograd.grad(want.sum(), xr)
    loss, grad = emulated_loss(emulated, cpu, x, target, theta, weight=weight, label_smoothing=0.3)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_emulated_bad_options_name_the_argument(emulated):
    gen = torch.Generator().manual_seed(45)
    sizes = [3, 7, 20]
    logits, target, psi = random_problem(4, sizes, generator=gen)
    loss_fn = make_loss(psi, random_theta(3, gen).float(), 20, reduction="none")  # float32, as the logits
    x = logits.detach()
    with pytest.raises(RuntimeError, match=r"weight must be \[N\] = \[20\]"):
        emulated_loss(emulated, loss_fn, x, target, weight=torch.ones(19))
    with pytest.raises(RuntimeError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        emulated_loss(emulated, loss_fn, x, target, label_smoothing=1.5)
    loss, lse, log_m = emulated.lmm_loss_forward(x, target, loss_fn.psi_t, loss_fn.theta, sizes, -100, None)
    with pytest.raises(RuntimeError, match=r"lse must be \[batch, 5 \* levels\] = \[4, 15\]"):
        emulated.lmm_loss_backward(torch.ones(4), x, target, loss_fn.psi_t, loss_fn.theta, lse[:, :3], log_m,
                                   sizes, -100, None)


# twin of test_loss_precision.py::test_loss_and_gradient_within_twice_plain_float32[cuda-...]
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4, 1e6, 1e8, 1e12, 1e20, 1e30])
def test_emulated_loss_and_gradient_within_twice_plain_float32(emulated, dense, scale):
    import test_loss_precision

    with emulated_backend.package_ops_emulated(*LOSS_OPS):
        test_loss_precision.test_loss_and_gradient_within_twice_plain_float32("cpu", dense, scale)


# twin of test_loss_precision.py::test_predict_proba_within_twice_plain_float32[cuda-...]
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e8, 1e30])
def test_emulated_predict_proba_within_twice_plain_float32(emulated, dense, scale):
    import test_loss_precision

    with emulated_backend.package_ops_emulated():
        test_loss_precision.test_predict_proba_within_twice_plain_float32("cpu", dense, scale)
