"""float32 accuracy of the fused loss and of prediction at any logit scale.

The yardstick is plain PyTorch in float32 (the reference composed of
log_softmax and logsumexp, run in float32); the truth is the same reference
in float64 on the same float32 logits. The kernels pass when their error is
at most twice plain PyTorch's, plus one float32 ulp of the quantity's
magnitude: at large scales plain PyTorch's gradient is exactly one-hot
(error 0), where one rounding of ours is still an honest result.
"""
import pytest
import torch

import lmm_fast
import lmm_fast.testing
from lmm_fast import FusedLMMLoss
from lmm_fast.reference.loss import lmm_loss_reference, predict_proba_reference
from lmm_fast.testing import dense_psi, tree_psi

SCALES = [1.0, 1e2, 1e4, 1e6, 1e8, 1e12, 1e20, 1e30]
ULP = torch.finfo(torch.float32).eps


def _problem(dense, seed=0, batch=48, sizes=(4, 16, 64)):
    gen = torch.Generator().manual_seed(seed)
    psi = (dense_psi if dense else tree_psi)(list(sizes), gen)
    base = torch.randn(batch, sum(sizes), generator=gen, dtype=torch.float64)
    target = torch.randint(0, sizes[-1], (batch,), generator=gen)
    return base, target, psi, torch.tensor([0.2, 0.3, 0.5])


def _errors(x32, target, psi, theta, device):
    """(ours, plain float32, truth) loss [B] and gradient [B, W], on the CPU."""
    x64 = x32.double().requires_grad_()
    truth = lmm_loss_reference(x64, target, [p.double() for p in psi], theta.double())
    (truth_grad,) = torch.autograd.grad(truth.sum(), x64)
    xp = x32.clone().requires_grad_()
    plain = lmm_loss_reference(xp, target, psi, theta)
    (plain_grad,) = torch.autograd.grad(plain.sum(), xp)
    loss_fn = FusedLMMLoss(psi, theta, reduction="none").to(device)
    xo = x32.to(device).requires_grad_()
    ours = loss_fn(xo, target.to(device))
    (ours_grad,) = torch.autograd.grad(ours.sum(), xo)

    def err(a, b):
        return (a.detach().double().cpu() - b.detach()).abs().max().item()

    magnitude = max(1.0, truth.detach().abs().max().item())
    return (
        (err(ours, truth), err(plain, truth), magnitude),
        (err(ours_grad, truth_grad), err(plain_grad, truth_grad)),
    )


@pytest.mark.parametrize("device", lmm_fast.testing.devices())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_loss_and_gradient_within_twice_plain_float32(device, dense, scale):
    base, target, psi, theta = _problem(dense)
    x32 = (scale * base).float()
    (ours, plain, magnitude), (ours_g, plain_g) = _errors(x32, target, psi, theta, device)
    assert ours <= 2 * plain + ULP * magnitude, f"loss error {ours:.3g}, plain float32 {plain:.3g}"
    # The true gradient has |g| <= 1 per entry (unit upstream gradient).
    assert ours_g <= 2 * plain_g + ULP, f"gradient error {ours_g:.3g}, plain float32 {plain_g:.3g}"


@pytest.mark.parametrize("dense", [False, True])
def test_tied_huge_logits(dense):
    """Exact ties at 1e30: the softmax splits the mass; a stored max + log(k)
    (even in float64) would round the log(k) away."""
    base, target, psi, theta = _problem(dense, seed=1, batch=16)
    x32 = (1e30 * torch.sign(base)).float()
    x32[:, :2] = 0.0
    (ours, plain, magnitude), (ours_g, plain_g) = _errors(x32, target, psi, theta, "cpu")
    assert ours <= 2 * plain + ULP * magnitude, (ours, plain)
    assert ours_g <= 2 * plain_g + ULP, (ours_g, plain_g)


@pytest.mark.parametrize("device", lmm_fast.testing.devices())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e8, 1e30])
def test_predict_proba_within_twice_plain_float32(device, dense, scale):
    base, _, psi, theta = _problem(dense, seed=2)
    x32 = (scale * base).float()
    truth = predict_proba_reference(x32.double(), [p.double() for p in psi], theta.double())
    plain = predict_proba_reference(x32, psi, theta)
    loss_fn = FusedLMMLoss(psi, theta).to(device)
    ours = loss_fn.predict_proba(x32.to(device)).double().cpu()
    theirs = (plain.double() - truth).abs().max().item()
    assert (ours - truth).abs().max().item() <= 2 * theirs + ULP
    values, classes = lmm_fast.predict_topk(x32.to(device), loss_fn, k=5)
    want = truth.gather(1, classes.cpu())
    assert (values.double().cpu() - want).abs().max().item() <= 2 * theirs + ULP
    assert (want[:, :-1] >= want[:, 1:] - 2 * theirs - ULP).all(), "top-k must come best first"
