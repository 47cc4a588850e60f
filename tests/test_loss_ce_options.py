"""The arguments of nn.CrossEntropyLoss on the fused loss (weight,
label_smoothing, probability targets) and its behaviour under autocast."""
import pytest
import torch
import torch.nn.functional as F

import lmm_fast.testing
from lmm_fast import FusedLMMLoss
from lmm_fast.ops import accumulate_dtype
from lmm_fast.ops import loss as loss_ops
from lmm_fast.reference.loss import lmm_loss_reference
from lmm_fast.testing import random_problem, tolerances

REDUCTIONS = ["none", "mean", "sum"]


def _weight(n, gen, dtype=torch.float32):
    return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.1).to(dtype)


def _reference(logits, target, psi, theta, **kw):
    weight = kw.pop("weight", None)
    return lmm_loss_reference(
        logits, target, [p.double() for p in psi], theta.double(),
        weight=None if weight is None else weight.double(), **kw,
    )


@pytest.mark.parametrize("device", lmm_fast.testing.devices())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps,weighted", [(0.0, True), (0.1, False), (0.3, True), (1.0, True)])
def test_weight_and_smoothing_match_reference(device, dense, reduction, eps, weighted):
    gen = torch.Generator().manual_seed(hash((dense, reduction, eps, weighted)) % 2**31)
    sizes = [3, 10, 57]
    logits, target, psi = random_problem(23, sizes, dense=dense, generator=gen)
    target[::5] = -1
    theta = torch.tensor([0.15, 0.25, 0.6])
    weight = _weight(57, gen) if weighted else None
    loss_fn = FusedLMMLoss(psi, theta, reduction=reduction, ignore_index=-1, weight=weight,
                           label_smoothing=eps).to(device)
    x = logits.detach().to(device).requires_grad_()
    loss = loss_fn(x, target.to(device))
    ref_logits = logits.detach().double().requires_grad_()
    ref = _reference(ref_logits, target, psi, theta, ignore_index=-1, reduction=reduction, weight=weight,
                     label_smoothing=eps)
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), **tolerances(torch.float32))
    upstream = torch.rand(ref.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(device, loss.dtype))
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, upstream)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, **tolerances(torch.float32))
    assert (grad[::5] == 0).all(), "ignored rows get no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("weighted", [False, True])
def test_bottom_only_theta_is_cross_entropy_with_options(dtype, reduction, eps, weighted):
    gen = torch.Generator().manual_seed(31)
    sizes = [5, 17, 301]
    logits, target, psi = random_problem(64, sizes, dtype=dtype, generator=gen)
    target[5] = -100
    weight = _weight(301, gen, dtype) if weighted else None
    loss_fn = FusedLMMLoss(psi, [0.0, 0.0, 1.0], reduction=reduction, weight=weight, label_smoothing=eps)
    loss = loss_fn(logits, target)
    bottom = logits.detach()[:, -301:].clone().requires_grad_()
    ce = F.cross_entropy(bottom, target, weight=weight, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(loss, ce, **tolerances(dtype))
    loss.sum().backward()
    ce.sum().backward()
    torch.testing.assert_close(logits.grad[:, -301:], bottom.grad, **tolerances(dtype))
    assert (logits.grad[:, :-301] == 0).all()


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_smoothing_is_cross_entropy_for_confident_logits(eps):
    """Logit gaps far beyond exp's range: the smoothing term keeps the bottom
    level in log space, so it still equals F.cross_entropy."""
    gen = torch.Generator().manual_seed(32)
    sizes = [4, 12, 80]
    logits, target, psi = random_problem(16, sizes, scale=60.0, generator=gen)
    loss_fn = FusedLMMLoss(psi, [0.0, 0.0, 1.0], reduction="sum", label_smoothing=eps)
    loss = loss_fn(logits, target)
    bottom = logits.detach()[:, -80:].clone().requires_grad_()
    ce = F.cross_entropy(bottom, target, reduction="sum", label_smoothing=eps)
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=1e-3)
    loss.backward()
    ce.backward()
    torch.testing.assert_close(logits.grad[:, -80:], bottom.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("per_row_theta", [False, True])
def test_gradcheck_weight_and_smoothing(dense, per_row_theta):
    gen = torch.Generator().manual_seed(33)
    sizes = [3, 6, 11]
    logits, target, psi = random_problem(6, sizes, dtype=torch.float64, dense=dense, generator=gen)
    target[2] = -100
    psi_t = torch.cat([p.double().t() for p in psi], 1).contiguous()
    if per_row_theta:
        theta = torch.softmax(torch.randn(6, 3, generator=gen, dtype=torch.float64), 1)
    else:
        theta = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    theta.requires_grad_()
    weight = _weight(11, gen, torch.float64)

    def f(x, th):
        return loss_ops.lmm_loss_forward(x, target, psi_t, th, sizes, -100, None, weight, 0.2)[0]

    assert torch.autograd.gradcheck(f, (logits, theta))
    if not per_row_theta:
        # The θ-gradient of the smoothing term is the reference's autograd one.
        th = theta.detach().clone().requires_grad_()
        ref = _reference(logits.detach(), target, psi, th, weight=weight, label_smoothing=0.2, reduction="sum")
        (ref_grad,) = torch.autograd.grad(ref, th)
        (grad,) = torch.autograd.grad(f(logits.detach(), th).sum(), th)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_weight_and_smoothing(dtype):
    gen = torch.Generator().manual_seed(34)
    sizes = [3, 7, 19]
    logits, target, psi = random_problem(9, sizes, dtype=dtype, dense=True, generator=gen)
    acc = accumulate_dtype(dtype)
    psi_t = torch.cat([p.t() for p in psi], 1).to(acc).contiguous()
    theta = torch.tensor([0.2, 0.3, 0.5], dtype=acc, requires_grad=True)
    weight = _weight(19, gen, acc)
    args = (logits, target, psi_t, theta, sizes, -100, None, weight, 0.15)
    torch.library.opcheck(torch.ops.lmm_fast.lmm_loss_forward.default, args)
    loss, lse, log_m = loss_ops.lmm_loss_forward(*args)
    bargs = (torch.rand(9, dtype=dtype), logits.detach(), target, psi_t, theta.detach(), lse, log_m, sizes, -100,
             None, weight, 0.15)
    torch.library.opcheck(torch.ops.lmm_fast.lmm_loss_backward.default, bargs)


def test_torch_compile_fullgraph_with_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(35)
    sizes = [4, 12, 97]
    logits, target, psi = random_problem(31, sizes, generator=gen)
    target[3] = -100
    loss_fn = FusedLMMLoss(psi, [0.1, 0.2, 0.7], weight=_weight(97, gen), label_smoothing=0.1)
    eager = loss_fn(logits, target)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    compiled = torch.compile(loss_fn, fullgraph=True)
    out = compiled(logits, target)
    (grad,) = torch.autograd.grad(out, logits)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_defaults_give_the_old_results():
    """weight=None and label_smoothing=0 take the old path bit for bit, and a
    unit weight changes nothing."""
    gen = torch.Generator().manual_seed(36)
    sizes = [4, 9, 40]
    logits, target, psi = random_problem(20, sizes, dense=True, generator=gen)
    target[1] = -100
    psi_t = torch.cat([p.t() for p in psi], 1).contiguous()
    theta = torch.tensor([0.2, 0.3, 0.5])
    old = torch.ops.lmm_fast.lmm_loss_forward(logits.detach(), target, psi_t, theta, sizes, -100)
    new = torch.ops.lmm_fast.lmm_loss_forward(logits.detach(), target, psi_t, theta, sizes, -100, None, None, 0.0)
    for a, b in zip(old, new):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for reduction in REDUCTIONS:
        plain = FusedLMMLoss(psi, theta, reduction=reduction)(logits, target)
        unit = FusedLMMLoss(psi, theta, reduction=reduction, weight=torch.ones(40))(logits, target)
        torch.testing.assert_close(unit, plain, rtol=0, atol=0)


def test_weight_is_a_buffer_that_follows_the_module():
    gen = torch.Generator().manual_seed(37)
    sizes = [3, 8, 20]
    logits, target, psi = random_problem(6, sizes, dtype=torch.float64, generator=gen)
    weight = _weight(20, gen)
    loss_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5], weight=weight, label_smoothing=0.1)
    assert "weight" in loss_fn.state_dict() and "label_smoothing=0.1" in repr(loss_fn)
    assert "weight" not in FusedLMMLoss(psi, [0.2, 0.3, 0.5]).state_dict()
    double = loss_fn.to(torch.float64)
    assert double.weight.dtype == torch.float64
    ref = _reference(logits.detach(), target, psi, torch.tensor([0.2, 0.3, 0.5]), weight=weight,
                     label_smoothing=0.1, reduction="mean")
    torch.testing.assert_close(double(logits, target), ref, **tolerances(torch.float32))


def test_probability_targets_are_refused_with_the_alternative():
    gen = torch.Generator().manual_seed(38)
    logits, _, psi = random_problem(4, [3, 10], generator=gen)
    loss_fn = FusedLMMLoss(psi, [0.3, 0.7])
    soft = torch.softmax(torch.randn(4, 10, generator=gen), 1)
    with pytest.raises(ValueError, match="probability targets.*label_smoothing"):
        loss_fn(logits, soft)


def test_bad_options_name_the_argument():
    gen = torch.Generator().manual_seed(39)
    sizes = [3, 10]
    logits, target, psi = random_problem(4, sizes, generator=gen)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        FusedLMMLoss(psi, [0.3, 0.7], label_smoothing=1.5)
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        FusedLMMLoss(psi, [0.3, 0.7], label_smoothing="0.1")
    with pytest.raises(ValueError, match=r"weight must be \[N\] = \[10\]"):
        FusedLMMLoss(psi, [0.3, 0.7], weight=torch.ones(9))
    with pytest.raises(ValueError, match="weight contains NaN"):
        FusedLMMLoss(psi, [0.3, 0.7], weight=torch.full((10,), float("nan")))
    psi_t = psi[0].t().contiguous()
    theta = torch.tensor([0.3, 0.7])
    x = logits.detach()
    with pytest.raises(RuntimeError, match=r"weight must be \[N\] = \[10\]"):
        loss_ops.lmm_loss_forward(x, target, psi_t, theta, sizes, -100, None, torch.ones(3))
    with pytest.raises(RuntimeError, match="weight must be Float for Float logits, got Double"):
        loss_ops.lmm_loss_forward(x, target, psi_t, theta, sizes, -100, None, torch.ones(10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"label_smoothing must be in \[0, 1\], got -0.1"):
        loss_ops.lmm_loss_forward(x, target, psi_t, theta, sizes, -100, None, None, -0.1)
    _, lse, log_m = loss_ops.lmm_loss_forward(x, target, psi_t, theta, sizes, -100)
    with pytest.raises(RuntimeError, match=r"lse must be \[batch, 5 \* levels\] = \[4, 10\]"):
        loss_ops.lmm_loss_backward(torch.ones(4), x, target, psi_t, theta, log_m, log_m, sizes)


# ---------------------------------------------------------------- autocast
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_autocast_returns_float32_like_cross_entropy(reduction):
    gen = torch.Generator().manual_seed(40)
    sizes = [4, 12, 50]
    _, target, psi = random_problem(16, sizes, generator=gen)
    linear = torch.nn.Linear(8, sum(sizes))
    x = torch.randn(16, 8, generator=gen)
    loss_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5], reduction=reduction, label_smoothing=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = linear(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, target)
        ce = F.cross_entropy(logits[:, -50:], target, reduction=reduction)
    assert ce.dtype == torch.float32
    assert loss.dtype == torch.float32
    # The same as the float32 loss of the bfloat16 logits, outside autocast.
    torch.testing.assert_close(loss, loss_fn(logits.detach().float(), target))
    loss.sum().backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


def test_cpu_autocast_under_torch_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(41)
    sizes = [4, 12, 50]
    _, target, psi = random_problem(16, sizes, generator=gen)
    logits = torch.randn(16, sum(sizes), generator=gen).bfloat16().requires_grad_()
    loss_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5])

    def step(a, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(a, y)

    eager = step(logits, target)
    compiled = torch.compile(step, fullgraph=True)(logits, target)
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)


@pytest.mark.cuda
def test_cuda_autocast_returns_float32():
    gen = torch.Generator().manual_seed(42)
    sizes = [4, 12, 50]
    _, target, psi = random_problem(16, sizes, generator=gen)
    linear = torch.nn.Linear(8, sum(sizes)).cuda()
    x = torch.randn(16, 8, generator=gen).cuda()
    loss_fn = FusedLMMLoss(psi, [0.2, 0.3, 0.5], weight=_weight(50, gen), label_smoothing=0.1).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        logits = linear(x)
        assert logits.dtype == torch.float16
        loss = loss_fn(logits, target.cuda())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(logits.detach().float(), target.cuda()))
    loss.backward()
    assert torch.isfinite(linear.weight.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[3, 10, 57], [2000, 3200, 6400], [5200, 5300, 6400]])
def test_cuda_weight_and_smoothing_match_cpu(dtype, sizes):
    """Per-group buffers of the smoothing pass in shared memory (first
    layout), in global scratch for the backward only (second, float32) and
    for both passes (third)."""
    gen = torch.Generator().manual_seed(43)
    logits, target, psi = random_problem(5, sizes, dtype=dtype, dense=True, generator=gen)
    target[1] = -100
    weight = _weight(sizes[-1], gen)
    theta = torch.tensor([0.2, 0.3, 0.5])
    cpu = FusedLMMLoss(psi, theta, weight=weight, label_smoothing=0.2, reduction="sum").to(dtype)
    cuda = FusedLMMLoss(psi, theta, weight=weight, label_smoothing=0.2, reduction="sum").to("cuda", dtype)
    x = logits.detach().requires_grad_()
    xc = logits.detach().cuda().requires_grad_()
    a, b = cpu(x, target), cuda(xc, target.cuda())
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    a.backward()
    b.backward()
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("option", ["weight", "label_smoothing"])
def test_double_backward_with_the_ce_options_is_refused_clearly(option):
    h = lmm_fast.Hierarchy.from_assignments([torch.arange(12) // 6, torch.arange(12) // 3])
    kwargs = {"weight": torch.rand(12) + 0.5} if option == "weight" else {"label_smoothing": 0.1}
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h, **kwargs)
    logits = torch.randn(4, 2 + 4 + 12, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_fn(logits, torch.tensor([0, 3, 7, 11])), logits, create_graph=False)
    assert torch.isfinite(grad).all()  # a plain backward works
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss_fn(logits, torch.tensor([0, 3, 7, 11])), logits, create_graph=True)
