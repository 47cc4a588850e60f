"""Tests of the remedies: θ schedules and gates (lmm_fast.theta), calibration
(lmm_fast.calibration), path-score prediction, scaled β and the guarded
adapter (lmm_fast.adaptation.guard), and the fit loop that takes them."""
import math

import pytest
import torch
import torch.nn.functional as F

import lmm_fast
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.predict import mixture_proba
from lmm_fast.adaptation.guard import GuardedGibbsAdapter, empty_groups, scaled_beta
from lmm_fast.calibration import apply_temperature, fit_temperature, fit_test_theta
from lmm_fast.predict import path_score_proba
from lmm_fast.theta import ThetaGate, ThetaSchedule, coarse_to_fine_theta
from lmm_fast.train import fit_lmm


def _task(n_classes=12, per_class=20, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 3
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = centers[y] + torch.randn(y.numel(), dim, generator=g)
    h = Hierarchy.from_features(x, y, [2, 4], seed=0)
    return x, y, h


def _batches(x, y, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)

    class Loader:
        def __iter__(self):
            order = torch.randperm(y.numel(), generator=g)
            for s in range(0, y.numel(), size):
                i = order[s : s + size]
                yield x[i], y[i], i

    return Loader()


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
    x2, y, h = _task()
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
    x, y, h = _task()
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
    hist = fit_lmm(backbone, _batches(x, y), head=head, optimizer=opt, epochs=6, setting="lmm", loss_fn=loss_fn,
                   schedule=schedule, gate=gate)
    assert len(hist.epoch_losses) == 6 and hist.epoch_losses[-1] < hist.epoch_losses[0]
    if mode == "schedule":
        assert torch.allclose(loss_fn.theta, torch.tensor([0.0, 0.0, 1.0]))
    if mode == "learned":
        assert not torch.allclose(loss_fn.theta.detach(), lmm_fast.default_theta(3))


def test_fit_rejects_schedule_with_gate():
    x, y, h = _task()
    head = lmm_fast.LMMHead(6, h)
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="schedule"):
        fit_lmm(torch.nn.Identity(), _batches(x, y), head=head, optimizer=opt, epochs=1, setting="lmm",
                loss_fn=loss_fn, schedule=ThetaSchedule(3, 1), gate=ThetaGate(6, 3))
    with pytest.raises(ValueError, match="levels"):
        fit_lmm(torch.nn.Identity(), _batches(x, y), head=head, optimizer=opt, epochs=1, setting="lmm",
                loss_fn=loss_fn, gate=ThetaGate(6, 2))
    with pytest.raises(ValueError, match="backbone"):
        fit_lmm(head, _batches(x, y), optimizer=opt, epochs=1, setting="lmm", loss_fn=loss_fn, gate=ThetaGate(6, 3))


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
    x, y, h = _task()
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


# ---------------------------------------------------------------- path score
def test_path_score_matches_a_bruteforce_product():
    x, y, h = _task()
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


# --------------------------------------------------------------- adaptation
def test_scaled_beta_rule():
    x, y, h = _task()
    y = torch.cat([y, torch.zeros(40, dtype=torch.long)])  # class 0 is frequent
    beta = scaled_beta(y, h, strength=0.5)
    counts = torch.bincount(y, minlength=h.num_classes).float()
    assert torch.allclose(beta, 0.5 * counts / h.level_sizes[-1])
    assert math.isclose(float(beta.sum()), 0.5 * y.numel() / h.level_sizes[-1], rel_tol=1e-5)
    with pytest.raises(ValueError, match="strength"):
        scaled_beta(y, h, strength=0)
    with pytest.raises(ValueError, match="classes"):
        scaled_beta(torch.tensor([99]), h)
    with pytest.raises(TypeError):
        scaled_beta(y.float(), h)


def test_guard_refuses_steps_that_empty_groups():
    x, y, h = _task(n_classes=16, per_class=10)
    sizes = list(h.level_sizes) + [h.num_classes]

    def run(max_share):
        g = torch.Generator().manual_seed(0)  # the same batches for both runs
        loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)
        # A huge constant β (the paper's prior) with logits that favour group 0
        # of every level pulls every image into one group.
        adapter = GuardedGibbsAdapter(loss_fn, h, y, beta=1000.0, non_overlapping=True, seed=0,
                                      max_empty_share=max_share)
        for _ in range(4):
            idx = torch.randperm(y.numel(), generator=g)[:80]
            logits = torch.zeros(80, sum(sizes))
            logits[:, 0] = 8.0
            logits[:, sizes[0]] = 8.0
            adapter.step(logits, y[idx], idx)
        loss_fn.validate()
        return adapter, loss_fn

    free, _ = run(1.0)
    guarded, loss_fn = run(0.25)
    assert max(e / s for e, s in zip(empty_groups(free), h.level_sizes)) > 0.25
    assert guarded.refused_steps > 0 and guarded.step_count == 4
    assert all(e <= 0.25 * s for e, s in zip(empty_groups(guarded), h.level_sizes))
    # The refused steps left Ω the histogram of the labels (Eq. 5).
    for level, counts in enumerate(guarded.counts):
        want = torch.zeros_like(counts)
        want.index_put_((guarded.labels[:, level], guarded.train_targets),
                        torch.ones(y.numel(), dtype=counts.dtype), accumulate=True)
        assert torch.equal(counts, want)


def test_guarded_adapter_defaults_to_scaled_beta():
    x, y, h = _task()
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)
    adapter = GuardedGibbsAdapter(loss_fn, h, y)
    assert torch.allclose(adapter.beta_vector, scaled_beta(y, h))
    assert empty_groups(adapter) == [0, 0]
    with pytest.raises(ValueError, match="beta"):
        GuardedGibbsAdapter(loss_fn, h, y, beta="big")
    with pytest.raises(ValueError, match="max_empty_share"):
        GuardedGibbsAdapter(loss_fn, h, y, max_empty_share=2.0)
