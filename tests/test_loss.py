"""FusedLMMLoss and the lmm_loss_forward/backward ops against the pure-PyTorch
reference."""
import os
import shutil
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lmm_fast
from lmm_fast import FusedLMMLoss
from lmm_fast.ops import accumulate_dtype
from lmm_fast.ops import loss as loss_ops
from lmm_fast.reference.loss import lmm_loss_reference, lmm_loss_unfused, predict_proba_reference
import lmm_fast.testing
from lmm_fast.testing import dense_psi, random_problem, tolerances, tree_psi

SHAPES = [
    (1, [2, 5]),
    (7, [3, 5, 11]),
    (33, [4, 40, 1001]),
    (5, [1, 7]),
    (16, [3, 9, 27, 81]),
    (9, [13]),  # a single level: the flat softmax
]


def make_loss(psi, theta, num_classes, **kw):
    return FusedLMMLoss(psi, theta, num_classes=num_classes, **kw)


def reference(logits, target, psi, theta, **kw):
    return lmm_loss_reference(
        logits.detach().double().requires_grad_(), target, [p.double() for p in psi], theta.double(), **kw
    )


def random_theta(levels, gen, zeros=False):
    theta = torch.rand(levels, generator=gen, dtype=torch.float64) + 0.05
    if zeros and levels > 1:
        theta[0] = 0.0
    return theta / theta.sum()


@pytest.mark.parametrize("batch,sizes", SHAPES)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("zeros", [False, True])
def test_matches_reference(batch, sizes, dense, zeros):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((batch, tuple(sizes), dense, zeros)).encode()))
    logits, target, psi = random_problem(batch, sizes, dense=dense, generator=gen)
    theta = random_theta(len(sizes), gen, zeros)
    loss_fn = make_loss(psi, theta, sizes[-1], reduction="none")
    loss = loss_fn(logits, target)
    ref_logits = logits.detach().double().requires_grad_()
    ref = lmm_loss_reference(ref_logits, target, [p.double() for p in psi], theta)
    torch.testing.assert_close(loss.double(), ref.detach(), **tolerances(torch.float32))
    weights = torch.rand(batch, generator=gen)
    (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), ref_logits)
    torch.testing.assert_close(grad.double(), ref_grad, **tolerances(torch.float32))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions_and_ignore_index(reduction):
    gen = torch.Generator().manual_seed(1)
    sizes = [4, 10, 50]
    logits, target, psi = random_problem(20, sizes, generator=gen)
    target[::3] = -1
    theta = torch.tensor([0.2, 0.3, 0.5])
    loss_fn = make_loss(psi, theta, 50, reduction=reduction, ignore_index=-1)
    loss = loss_fn(logits, target)
    ref = reference(logits, target, psi, theta, ignore_index=-1, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref.detach(), **tolerances(torch.float32))
    loss.sum().backward()
    assert (logits.grad[::3] == 0).all(), "ignored rows must get no gradient"
    assert logits.grad[1].abs().sum() > 0


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bottom_only_theta_is_cross_entropy(reduction, dtype):
    gen = torch.Generator().manual_seed(2)
    sizes = [5, 17, 301]
    logits, target, psi = random_problem(64, sizes, dtype=dtype, generator=gen)
    target[5] = -100
    loss_fn = make_loss(psi, [0.0, 0.0, 1.0], 301, reduction=reduction)
    loss = loss_fn(logits, target)
    bottom = logits.detach()[:, -301:].clone().requires_grad_()
    ce = F.cross_entropy(bottom, target, reduction=reduction)
    torch.testing.assert_close(loss, ce, **tolerances(dtype))
    loss.sum().backward()
    ce.sum().backward()
    torch.testing.assert_close(logits.grad[:, -301:], bottom.grad, **tolerances(dtype))
    assert (logits.grad[:, :-301] == 0).all()


def test_learned_theta_gradient():
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 8, 40]
    logits, target, psi = random_problem(25, sizes, dense=True, generator=gen)
    loss_fn = make_loss(psi, [0.2, 0.3, 0.5], 40, learn_theta=True)
    torch.testing.assert_close(loss_fn.theta, torch.tensor([0.2, 0.3, 0.5]))
    loss_fn(logits, target).backward()
    theta_logits = loss_fn.theta_logits.detach().double().requires_grad_()
    ref = lmm_loss_reference(
        logits.detach().double(), target, [p.double() for p in psi], torch.softmax(theta_logits, 0), reduction="mean"
    )
    ref.backward()
    torch.testing.assert_close(loss_fn.theta_logits.grad.double(), theta_logits.grad, rtol=1e-5, atol=1e-7)
    # θ stays on the simplex after an optimiser step.
    torch.optim.SGD(loss_fn.parameters(), lr=10.0).step()
    theta = loss_fn.theta.detach()
    assert abs(float(theta.sum()) - 1) < 1e-6 and (theta >= 0).all()


@pytest.mark.parametrize("dense", [False, True])
def test_gradcheck_float64(dense):
    gen = torch.Generator().manual_seed(4)
    sizes = [3, 6, 11]
    logits, target, psi = random_problem(6, sizes, dtype=torch.float64, dense=dense, generator=gen)
    target[2] = -100
    psi_t = torch.cat([p.double().t() for p in psi], 1).contiguous()
    theta = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64, requires_grad=True)

    def f(x, th):
        return loss_ops.lmm_loss_forward(x, target, psi_t, th, sizes, -100)[0]

    assert torch.autograd.gradcheck(f, (logits, theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 7, 19]
    logits, target, psi = random_problem(9, sizes, dtype=dtype, dense=True, generator=gen)
    acc = accumulate_dtype(dtype)
    psi_t = torch.cat([p.t() for p in psi], 1).to(acc).contiguous()
    theta = torch.tensor([0.2, 0.3, 0.5], dtype=acc, requires_grad=True)
    args = (logits, target, psi_t, theta, sizes, -100)
    torch.library.opcheck(torch.ops.lmm_fast.lmm_loss_forward.default, args)
    loss, lse, log_m = loss_ops.lmm_loss_forward(*args)
    grad_loss = torch.rand(9, dtype=dtype)
    bargs = (grad_loss, logits.detach(), target, psi_t, theta.detach(), lse, log_m, sizes, -100)
    torch.library.opcheck(torch.ops.lmm_fast.lmm_loss_backward.default, bargs)


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(6)
    sizes = [4, 12, 97]
    logits, target, psi = random_problem(31, sizes, generator=gen)
    loss_fn = make_loss(psi, [0.1, 0.2, 0.7], 97)
    eager = loss_fn(logits, target)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    compiled = torch.compile(loss_fn, fullgraph=True)
    out = compiled(logits, target)
    (grad,) = torch.autograd.grad(out, logits)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_extreme_logits_stay_finite():
    gen = torch.Generator().manual_seed(7)
    sizes = [3, 9, 50]
    for dense in (False, True):
        logits, target, psi = random_problem(40, sizes, dense=dense, generator=gen)
        with torch.no_grad():
            logits.copy_(torch.where(torch.rand(logits.shape, generator=gen) < 0.5, -1e4, 1e4))
            logits[:, 3:5] = 0.0
        theta = torch.tensor([0.3, 0.3, 0.4])
        loss = make_loss(psi, theta, 50, reduction="none")(logits, target)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref = reference(logits, target, psi, theta)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-2)


def test_non_contiguous_logits():
    gen = torch.Generator().manual_seed(8)
    sizes = [3, 8, 29]
    width = sum(sizes)
    _, target, psi = random_problem(12, sizes, generator=gen)
    theta = torch.tensor([0.2, 0.2, 0.6])
    loss_fn = make_loss(psi, theta, 29, reduction="none")
    wide = torch.randn(12, width + 5, generator=gen)[:, 2 : 2 + width]  # strided rows
    transposed = torch.randn(width, 12, generator=gen).t()  # column stride != 1
    for logits in (wide, transposed):
        assert not logits.is_contiguous()
        logits = logits.requires_grad_()
        loss = loss_fn(logits, target)
        ref = reference(logits, target, psi, theta)
        torch.testing.assert_close(loss.double(), ref.detach(), **tolerances(torch.float32))
        loss.sum().backward()
        assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch_behaves_like_cross_entropy(reduction):
    psi = tree_psi([3, 10])
    loss_fn = make_loss(psi, [0.5, 0.5], 10, reduction=reduction)
    logits = torch.zeros(0, 13, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    loss = loss_fn(logits, target)
    ce = F.cross_entropy(torch.zeros(0, 10), target, reduction=reduction)
    assert loss.shape == ce.shape
    torch.testing.assert_close(loss, ce, equal_nan=True)
    if reduction != "mean":
        loss.sum().backward()
        assert logits.grad.shape == (0, 13)


def test_list_logits_equal_packed():
    gen = torch.Generator().manual_seed(9)
    sizes = [4, 9, 31]
    logits, target, psi = random_problem(10, sizes, generator=gen)
    loss_fn = make_loss(psi, [0.1, 0.3, 0.6], 31)
    parts = [p.detach().clone().requires_grad_() for p in torch.split(logits.detach(), sizes, 1)]
    torch.testing.assert_close(loss_fn(parts, target), loss_fn(logits, target))


def test_low_precision_on_cpu():
    gen = torch.Generator().manual_seed(10)
    sizes = [4, 16, 200]
    logits, target, psi = random_problem(32, sizes, generator=gen)
    theta = torch.tensor([0.2, 0.3, 0.5])
    ref = reference(logits, target, psi, theta)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.detach().to(dtype).requires_grad_()
        loss = make_loss(psi, theta, 200, reduction="none")(low, target)
        assert loss.dtype == dtype
        # Pass when within twice the error of PyTorch's own op in that dtype.
        ours = (loss.double() - ref.detach()).abs().max()
        low_ref = lmm_loss_reference(low.detach().float(), target, psi, theta).to(dtype)
        theirs = (low_ref.double() - ref.detach()).abs().max()
        assert ours <= 2 * theirs + 1e-6, (dtype, ours, theirs)
        loss.sum().backward()
        assert torch.isfinite(low.grad.float()).all()


def test_predict_proba_rows_sum_to_one():
    gen = torch.Generator().manual_seed(11)
    sizes = [3, 10, 40]
    logits, _, psi = random_problem(8, sizes, dense=True, generator=gen)
    theta = torch.tensor([0.2, 0.3, 0.5])
    loss_fn = make_loss(psi, theta, 40)
    proba = loss_fn.predict_proba(logits)
    torch.testing.assert_close(proba.sum(1), torch.ones(8))
    torch.testing.assert_close(proba, predict_proba_reference(logits, psi, theta))


def test_module_state_follows_to_and_state_dict():
    psi = dense_psi([3, 8, 20], torch.Generator().manual_seed(12))
    loss_fn = make_loss(psi, [0.2, 0.3, 0.5], 20)
    assert [tuple(p.shape) for p in loss_fn.psi] == [(3, 20), (8, 20)]
    torch.testing.assert_close(loss_fn.psi[1], psi[1])
    names = dict(loss_fn.named_buffers())
    assert set(names) == {"psi_t", "psi_scale", "theta_fixed"}
    double = make_loss(psi, [0.2, 0.3, 0.5], 20).to(torch.float64)
    assert double.psi_t.dtype == torch.float64
    other = make_loss(dense_psi([3, 8, 20], torch.Generator().manual_seed(13)), [0.1, 0.1, 0.8], 20)
    other.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(other.psi[0], psi[0])
    torch.testing.assert_close(other.theta, loss_fn.theta)
    new = dense_psi([3, 8, 20], torch.Generator().manual_seed(14))
    other.set_psi(new)
    torch.testing.assert_close(other.psi_t[:, :3].t(), new[0])
    torch.testing.assert_close(other.psi[1], new[1])


def test_from_hierarchy_uses_the_tree():
    hierarchy_mod = pytest.importorskip("lmm_fast.hierarchy")
    g1 = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    g2 = torch.tensor([0, 1, 2, 3, 3, 4, 5])
    h = hierarchy_mod.Hierarchy.from_assignments([g1, g2])
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    assert loss_fn.level_sizes == [3, 6, 7]
    torch.testing.assert_close(loss_fn.theta.sum(), torch.tensor(1.0))
    torch.testing.assert_close(loss_fn.psi[0][1], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0]))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 9),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(lambda s: sorted(s) + [max(s) + 7]),
    seed=st.integers(0, 2**16),
    dense=st.booleans(),
)
def test_property_matches_reference(batch, sizes, seed, dense):
    gen = torch.Generator().manual_seed(seed)
    logits, target, psi = random_problem(batch, sizes, dtype=torch.float64, dense=dense, generator=gen)
    theta = random_theta(len(sizes), gen)
    loss = make_loss(psi, theta, sizes[-1], reduction="sum")(logits, target)
    ref = lmm_loss_reference(logits, target, [p.double() for p in psi], theta, reduction="sum")
    torch.testing.assert_close(loss, ref)


# ---------------------------------------------------------------- bad input
def _setup():
    psi = tree_psi([3, 8, 20], torch.Generator().manual_seed(15))
    return make_loss(psi, [0.2, 0.3, 0.5], 20), torch.randn(4, 31), torch.tensor([0, 5, 19, 3])


@pytest.mark.parametrize(
    "bad_target,error,match",
    [
        (torch.tensor([0, 5, 20, 3]), RuntimeError, r"target\[2\] = 20 is out of range"),
        (torch.tensor([0, -3, 1, 3]), RuntimeError, r"target\[1\] = -3 is out of range"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "target must hold integer class indices"),
        (torch.tensor([0, 1, 2]), ValueError, r"target must be \[B\] = \[4\]"),
    ],
)
def test_bad_target(bad_target, error, match):
    loss_fn, logits, _ = _setup()
    with pytest.raises(error, match=match):
        loss_fn(logits, bad_target)


def test_bad_logits():
    loss_fn, logits, target = _setup()
    with pytest.raises(ValueError, match=r"logits must be \[B, 31\]"):
        loss_fn(torch.randn(4, 30), target)
    with pytest.raises(ValueError, match=r"logits\[1\] must be \[B, 8\]"):
        loss_fn([torch.randn(4, 3), torch.randn(4, 7), torch.randn(4, 20)], target)
    with pytest.raises(TypeError, match="logits must be floating point"):
        loss_fn(torch.ones(4, 31, dtype=torch.long), target)
    with pytest.raises(ValueError, match="logits are on meta but the loss's Ψ is on cpu"):
        loss_fn(torch.randn(4, 31, device="meta"), target)


def test_bad_psi():
    good = tree_psi([3, 8, 20])
    with pytest.raises(ValueError, match=r"psi\[1\] row 2 sums to"):
        bad = [p.clone() for p in good]
        bad[1][2] *= 1.5
        FusedLMMLoss(bad, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"psi\[1\] has 19 columns but there are 20 classes"):
        FusedLMMLoss([good[0], good[1][:, :19]], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"psi\[0\] has negative entries"):
        bad = [p.clone() for p in good]
        bad[0][0, :2] = torch.tensor([-0.5, 0.5 + float(bad[0][0, :2].sum())])
        FusedLMMLoss(bad, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"psi\[0\] must be 2-D"):
        FusedLMMLoss([torch.ones(20) / 20], [0.5, 0.5])


def test_bad_theta_and_options():
    psi = tree_psi([3, 8, 20])
    with pytest.raises(ValueError, match="theta must lie on the simplex"):
        FusedLMMLoss(psi, [0.2, 0.3, 0.6])
    with pytest.raises(ValueError, match=r"theta must have one weight per level \(3"):
        FusedLMMLoss(psi, [0.5, 0.5])
    with pytest.raises(ValueError, match="theta must be finite and non-negative"):
        FusedLMMLoss(psi, [-0.2, 0.6, 0.6])
    with pytest.raises(ValueError, match="reduction must be one of"):
        FusedLMMLoss(psi, [0.2, 0.3, 0.5], reduction="avg")


def test_op_level_checks_name_the_argument():
    sizes = [3, 8]
    logits = torch.randn(4, 11)
    target = torch.tensor([0, 1, 2, 3])
    psi_t = torch.cat([p.t() for p in tree_psi(sizes)], 1).contiguous()
    theta = torch.tensor([0.5, 0.5])
    with pytest.raises(RuntimeError, match="psi_t must be Double for Double logits, got Float"):
        loss_ops.lmm_loss_forward(logits.double(), target, psi_t, theta.double(), sizes)
    with pytest.raises(RuntimeError, match="psi_t must be"):
        loss_ops.lmm_loss_forward(logits, target, psi_t[:, :2].contiguous(), theta, sizes)
    with pytest.raises(RuntimeError, match="theta must have one weight per level"):
        loss_ops.lmm_loss_forward(logits, target, psi_t, torch.ones(3) / 3, sizes)
    with pytest.raises(RuntimeError, match="logits has 11 columns but the levels need"):
        loss_ops.lmm_loss_forward(logits, target, psi_t, theta, [3, 9])
    with pytest.raises(RuntimeError, match="target must be int64"):
        loss_ops.lmm_loss_forward(logits, target.int(), psi_t, theta, sizes)


# ---------------------------------------------------------------- build
def test_cuda_kernels_were_compiled_when_possible():
    """A .cu that stops compiling must fail the suite, GPU or not."""
    wants_cuda = (
        torch.version.cuda is not None
        and os.environ.get("FORCE_CUDA") != "0"
        and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))
    )
    info = lmm_fast.build_info()
    assert info["cuda_kernels"] == lmm_fast.has_cuda_kernels()
    assert info["backends"] == ("CPU+CUDA" if info["cuda_kernels"] else "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lmm_fast::lmm_loss_forward", "CPU")
    if wants_cuda:
        assert info["cuda_kernels"], "torch has CUDA and nvcc exists, but the CUDA kernels were not built"


# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("batch,sizes", [(1, [2, 5]), (37, [3, 10, 1001]), (64, [10, 100, 10000])])
def test_cuda_matches_cpu_reference(dtype, dense, batch, sizes):
    gen = torch.Generator().manual_seed(16)
    logits, target, psi = random_problem(batch, sizes, dense=dense, generator=gen)
    target[0] = -100
    theta = torch.tensor(random_theta(len(sizes), gen).tolist())
    ref_logits = logits.detach().double().requires_grad_()
    ref = lmm_loss_reference(ref_logits, target, [p.double() for p in psi], theta.double(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    cuda_loss = make_loss(psi, theta, sizes[-1], reduction="sum").cuda()
    x = logits.detach().to("cuda", dtype).requires_grad_()
    out = cuda_loss(x, target.cuda())
    (grad,) = torch.autograd.grad(out, x)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-6)
    else:
        low = lmm_loss_unfused(logits.detach().to(dtype).cuda().float(), target.cuda(), [p.cuda() for p in psi], theta.cuda(), reduction="sum")
        ours = (out.double().cpu() - ref.detach()).abs()
        theirs = (low.double().cpu() - ref.detach()).abs()
        assert ours <= 2 * theirs + 1e-2 * ref.abs(), (ours, theirs)
        rel = (grad.double().cpu() - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)  # B = 1: the one row is ignored
        assert rel < 1e-2


@pytest.mark.cuda
def test_cuda_compile_and_bad_target():
    gen = torch.Generator().manual_seed(17)
    sizes = [4, 12, 97]
    logits, target, psi = random_problem(31, sizes, generator=gen)
    loss_fn = make_loss(psi, [0.1, 0.2, 0.7], 97).cuda()
    x = logits.detach().cuda().requires_grad_()
    compiled = torch.compile(loss_fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, target.cuda()), loss_fn(x, target.cuda()))
    torch.library.opcheck(
        torch.ops.lmm_fast.lmm_loss_forward.default,
        (x, target.cuda(), loss_fn.psi_t, loss_fn.theta, sizes, -100),
    )
    # a bad target raises the CPU op's error, checked before the launch (no
    # device assert, so the CUDA context stays usable)
    cpu_loss = make_loss(psi, [0.1, 0.2, 0.7], 97)
    for bad in (97, -1):
        target_bad = target.clone()
        target_bad[3] = bad
        message = f"target\\[3\\] = {bad} is out of range: class indices must be in \\[0, 97\\)"
        with pytest.raises(RuntimeError, match=message):
            cpu_loss(logits.detach(), target_bad)
        with pytest.raises(RuntimeError, match=message):
            loss_fn(x, target_bad.cuda())
    torch.testing.assert_close(loss_fn(x, target.cuda()).detach().cpu(), cpu_loss(logits.detach(), target),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", lmm_fast.testing.devices())
def test_masked_logits_minus_inf(device):
    gen = torch.Generator().manual_seed(18)
    sizes = [3, 9, 50]
    logits, target, psi = random_problem(16, sizes, dense=True, generator=gen)
    theta = torch.tensor([0.3, 0.3, 0.4])
    masked = logits.detach().clone()
    target = torch.arange(16) % 10  # targets in 0..9; classes 40..49 are masked
    masked[:, -10:] = float("-inf")
    masked[:, 0] = float("-inf")  # one group of the top level masked too
    x = masked.to(device).requires_grad_()
    loss = make_loss(psi, theta, 50, reduction="none").to(device)(x, target.to(device))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, -10:] == 0).all() and (grad[:, 0] == 0).all()
    ref = reference(masked, target, psi, theta)
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), **tolerances(torch.float32))


def test_per_row_theta_matches_reference_and_gets_gradient():
    gen = torch.Generator().manual_seed(19)
    sizes = [3, 8, 30]
    logits, target, psi = random_problem(12, sizes, dense=True, generator=gen)
    gate = torch.randn(12, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    theta = torch.softmax(gate, 1)
    loss_fn = make_loss(psi, [0.2, 0.3, 0.5], 30, reduction="none")
    loss = loss_fn(logits, target, theta=theta.float())
    (grad_gate,) = torch.autograd.grad(loss.sum(), gate)
    ref = torch.stack(
        [
            lmm_loss_reference(
                logits[i : i + 1].detach().double(), target[i : i + 1], [p.double() for p in psi], torch.softmax(gate, 1)[i]
            )
            for i in range(12)
        ]
    ).squeeze(1)
    torch.testing.assert_close(loss.double(), ref.detach(), **tolerances(torch.float32))
    (ref_grad,) = torch.autograd.grad(ref.sum(), gate)
    torch.testing.assert_close(grad_gate, ref_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"theta must be \[3\] or \[B, 3\]"):
        loss_fn(logits, target, theta=torch.ones(5, 3) / 3)
    with pytest.raises(ValueError, match="theta must lie on the simplex"):
        loss_fn(logits, target, theta=torch.ones(12, 3))


def test_gradcheck_per_row_theta():
    gen = torch.Generator().manual_seed(20)
    sizes = [2, 5, 9]
    logits, target, psi = random_problem(4, sizes, dtype=torch.float64, dense=True, generator=gen)
    psi_t = torch.cat([p.double().t() for p in psi], 1).contiguous()
    theta = torch.softmax(torch.randn(4, 3, generator=gen, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, th: loss_ops.lmm_loss_forward(x, target, psi_t, th, sizes, -100)[0], (logits, theta)
    )
    torch.library.opcheck(torch.ops.lmm_fast.lmm_loss_forward.default, (logits, target, psi_t, theta, sizes, -100))


@pytest.mark.parametrize("device", lmm_fast.testing.devices())
def test_psi_scale_factors_match_the_normalised_psi(device):
    """psi_t holding unnormalised counts and psi_scale the per-group 1/total
    gives the loss, gradients and predictions of the normalised Ψ."""
    gen = torch.Generator().manual_seed(21)
    sizes = [3, 7, 40]
    logits, target, psi = random_problem(17, sizes, dense=True, generator=gen)
    counts = [torch.randint(0, 9, (s, 40), generator=gen).float() + 0.5 for s in sizes[:-1]]
    normalised = [c / c.sum(1, keepdim=True) for c in counts]
    theta = [0.2, 0.3, 0.5]
    plain = make_loss(normalised, theta, 40, reduction="none").to(device)
    scaled = make_loss(normalised, theta, 40, reduction="none").to(device)
    with torch.no_grad():
        scaled.psi_t.copy_(torch.cat([c.t() for c in counts], 1))
        scaled.psi_scale.copy_(torch.cat([1 / c.sum(1) for c in counts]))
    x = logits.detach().to(device).requires_grad_()
    y = target.to(device)
    a, b = plain(x, y), scaled(x, y)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(torch.autograd.grad(b.sum(), x)[0], torch.autograd.grad(a.sum(), x)[0])
    torch.testing.assert_close(scaled.predict_proba(x.detach()), plain.predict_proba(x.detach()))
    for got, want in zip(scaled.psi, normalised):
        torch.testing.assert_close(got.cpu(), want)
    psi_t = scaled.psi_t
    torch.library.opcheck(
        torch.ops.lmm_fast.lmm_loss_forward.default, (x, y, psi_t, scaled.theta, sizes, -100, scaled.psi_scale)
    )
    with pytest.raises(RuntimeError, match=r"psi_scale must be \[sum\(upper level sizes\)\] = \[10\]"):
        loss_ops.lmm_loss_forward(x, y, psi_t, scaled.theta, sizes, -100, scaled.psi_scale[:5])


def test_reused_gradient_storage_is_never_shared():
    """The CPU backward recycles the storage of a consumed gradient; one that
    is still referenced must never be written again."""
    gen = torch.Generator().manual_seed(22)
    sizes = [4, 16, 9000]  # > 4 MB of gradient: the recycled path
    loss_fn = make_loss(tree_psi(sizes, gen), [0.1, 0.1, 0.8], 9000)
    grads, copies = [], []
    for _ in range(3):
        logits, target, _ = random_problem(128, sizes, generator=gen)
        loss_fn(logits, target).backward()
        grads.append(logits.grad)
        copies.append(logits.grad.clone())
    assert len({g.data_ptr() for g in grads}) == 3
    for g, c in zip(grads, copies):
        torch.testing.assert_close(g, c, rtol=0, atol=0)
    del grads, copies, g, c
    # Once released, later gradients are still right.
    for _ in range(2):
        logits, target, _ = random_problem(128, sizes, generator=gen)
        loss_fn(logits, target).backward()
        ref_logits = logits.detach().double().requires_grad_()
        lmm_loss_reference(ref_logits, target, [p.double() for p in loss_fn.psi], loss_fn.theta.double(), reduction="mean").backward()
        torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-8)
