"""θ over training (lmm_fast.theta): the coarse-to-fine schedule, the gate,
and the fit loop that takes them (lmm_fast.train.fit_lmm)."""
import pytest
import torch

import lmm_fast
from lmm_fast.testing import toy_loader, toy_task
from lmm_fast.theta import ThetaGate, ThetaSchedule, coarse_to_fine_theta
from lmm_fast.train import fit_lmm


# ------------------------------------------------------------------ θ schedule
def test_coarse_to_fine_endpoints_and_simplex():
    thetas = [coarse_to_fine_theta(e, 5, 3) for e in range(5)]
    assert torch.allclose(thetas[0], torch.full((3,), 1 / 3))
    assert torch.allclose(thetas[-1], torch.tensor([0.0, 0.0, 1.0]))
    for t in thetas:
        assert torch.isclose(t.sum(), torch.tensor(1.0)) and bool((t >= 0).all())
    bottoms = [float(t[-1]) for t in thetas]
    assert bottoms == sorted(bottoms)  # moves toward the bottom level
    custom = coarse_to_fine_theta(0, 3, 2, start=[0.5, 0.5], end=[0.1, 0.9])
    assert torch.allclose(custom, torch.tensor([0.5, 0.5]))
    assert torch.allclose(coarse_to_fine_theta(0, 1, 2), torch.tensor([0.0, 1.0]))


def test_schedule_keeps_last_theta_and_rejects_bad_input():
    s = ThetaSchedule(3, 4)
    assert torch.allclose(s(10), s(3))
    with pytest.raises(ValueError, match="epoch"):
        coarse_to_fine_theta(4, 4, 3)
    with pytest.raises(ValueError, match="start"):
        ThetaSchedule(3, 4, start=[0.5, 0.6, 0.1])
    with pytest.raises(ValueError, match="epochs"):
        ThetaSchedule(3, 0)
    with pytest.raises(ValueError, match="epoch"):
        s(-1)


# ---------------------------------------------------------------------- gate
def test_gate_starts_at_init_theta_and_gets_gradient():
    gate = ThetaGate(5, 3, init_theta=[0.2, 0.3, 0.5])
    x = torch.randn(7, 5)
    theta = gate(x)
    assert theta.shape == (7, 3)
    assert torch.allclose(theta, torch.tensor([0.2, 0.3, 0.5]).expand(7, 3), atol=1e-5)
    x2, y, h = toy_task()
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)
    logits = torch.randn(7, sum(loss_fn.level_sizes))
    loss_fn(logits, y[:7], theta=gate(x)).backward()
    assert gate.linear.weight.grad is not None and bool(gate.linear.weight.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="in_features"):
        gate(torch.randn(7, 4))
    with pytest.raises(ValueError, match="num_levels"):
        ThetaGate(5, 0)


@pytest.mark.parametrize("mode", ["schedule", "gate", "learned"])
def test_fit_with_theta_options_learns(mode):
    x, y, h = toy_task()
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU())
    head = lmm_fast.LMMHead(16, h)
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h, learn_theta=(mode == "learned"))
    gate = ThetaGate(16, 3) if mode == "gate" else None
    params = list(backbone.parameters()) + list(head.parameters()) + list(loss_fn.parameters())
    if gate is not None:
        params += list(gate.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    schedule = ThetaSchedule(3, 6) if mode == "schedule" else None
    hist = fit_lmm(backbone, toy_loader(x, y), head=head, optimizer=opt, epochs=6, setting="lmm", loss_fn=loss_fn,
                   schedule=schedule, gate=gate)
    assert len(hist.epoch_losses) == 6 and hist.epoch_losses[-1] < hist.epoch_losses[0]
    if mode == "schedule":
        assert torch.allclose(loss_fn.theta, torch.tensor([0.0, 0.0, 1.0]))
    if mode == "learned":
        assert not torch.allclose(loss_fn.theta.detach(), lmm_fast.default_theta(3))


def test_fit_rejects_schedule_with_gate():
    x, y, h = toy_task()
    head = lmm_fast.LMMHead(6, h)
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="schedule"):
        fit_lmm(torch.nn.Identity(), toy_loader(x, y), head=head, optimizer=opt, epochs=1, setting="lmm",
                loss_fn=loss_fn, schedule=ThetaSchedule(3, 1), gate=ThetaGate(6, 3))
    with pytest.raises(ValueError, match="levels"):
        fit_lmm(torch.nn.Identity(), toy_loader(x, y), head=head, optimizer=opt, epochs=1, setting="lmm",
                loss_fn=loss_fn, gate=ThetaGate(6, 2))
    with pytest.raises(ValueError, match="backbone"):
        fit_lmm(head, toy_loader(x, y), optimizer=opt, epochs=1, setting="lmm", loss_fn=loss_fn, gate=ThetaGate(6, 3))
