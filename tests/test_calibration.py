"""Calibration fit on held-out rows (lmm_fast.calibration)."""
import math

import pytest
import torch
import torch.nn.functional as F

import lmm_fast
from lmm_fast.testing import toy_task
from lmm_fast.calibration import apply_temperature, fit_temperature, fit_test_theta
from lmm_fast.predict import mixture_proba


# --------------------------------------------------------------- calibration
def test_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=g) * 3
    target = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    # The model is calibrated at T = 1; hand the fit its probabilities at T = 2.
    blurred = torch.softmax(logits / 2, 1)
    t = fit_temperature(blurred, target)
    assert abs(t - 0.5) < 0.05
    fixed = apply_temperature(blurred, t)
    assert torch.allclose(fixed.sum(1), torch.ones(4000))
    assert F.nll_loss(fixed.log(), target) < F.nll_loss(blurred.log(), target)
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(blurred[:0], target[:0])
    with pytest.raises(ValueError, match="target"):
        fit_temperature(blurred, target[:5])
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(blurred, -1.0)


def test_temperature_is_bounded_on_noise():
    g = torch.Generator().manual_seed(1)
    proba = torch.softmax(torch.randn(200, 5, generator=g) * 4, 1)
    target = torch.randint(0, 5, (200,), generator=g)
    assert fit_temperature(proba, target) <= 100.0 + 1e-6


def test_test_theta_moves_toward_the_informative_level():
    x, y, h = toy_task()
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h, theta=[0.3, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    sizes = loss_fn.level_sizes
    # Bottom logits point at the true class; upper logits are noise.
    upper = torch.randn(y.numel(), sizes[0] + sizes[1], generator=g)
    bottom = F.one_hot(y, sizes[2]).float() * 6
    logits = torch.cat([upper, bottom], 1)
    theta = fit_test_theta(logits, y, loss_fn)
    assert theta.shape == (3,) and math.isclose(float(theta.sum()), 1.0, rel_tol=1e-5)
    assert float(theta[-1]) > 0.9
    assert torch.allclose(loss_fn.theta, torch.tensor([0.3, 0.3, 0.4]))  # untouched
    before = F.nll_loss(loss_fn.predict_proba(logits).log(), y)
    after = F.nll_loss(mixture_proba(logits, loss_fn.effective_psi_t(), theta, sizes).log(), y)
    assert after < before
    with pytest.raises(ValueError):
        fit_test_theta(logits[:, :5], y, loss_fn)
