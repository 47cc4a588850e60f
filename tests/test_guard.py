"""The guarded adapter and scaled β (lmm_fast.adaptation.guard)."""
import math

import pytest
import torch

import lmm_fast
from lmm_fast.testing import toy_task
from lmm_fast.adaptation.guard import GuardedGibbsAdapter, empty_groups, scaled_beta


# --------------------------------------------------------------- adaptation
def test_scaled_beta_rule():
    x, y, h = toy_task()
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
    x, y, h = toy_task(n_classes=16, per_class=10)
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
    x, y, h = toy_task()
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)
    adapter = GuardedGibbsAdapter(loss_fn, h, y)
    assert torch.allclose(adapter.beta_vector, scaled_beta(y, h))
    assert empty_groups(adapter) == [0, 0]
    with pytest.raises(ValueError, match="beta"):
        GuardedGibbsAdapter(loss_fn, h, y, beta="big")
    with pytest.raises(ValueError, match="max_empty_share"):
        GuardedGibbsAdapter(loss_fn, h, y, max_empty_share=2.0)


@pytest.mark.parametrize("non_overlapping", [False, True])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("refused_first", [False, True])
def test_guard_undoes_a_refused_step_exactly(non_overlapping, exact, refused_first):
    # The undo moves the step's own images back (O(B)); labels, Ω and Ψ must
    # come back bit for bit, also for the first step (which replaced the
    # hierarchy's Ψ: the only case that restores a copy).
    x, y, h = toy_task(n_classes=16, per_class=10)
    sizes = list(h.level_sizes) + [h.num_classes]
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)
    # share 0: the first step that empties a group is refused
    adapter = GuardedGibbsAdapter(loss_fn, h, y, beta=0.01 if refused_first else 1000.0,
                                  non_overlapping=non_overlapping, seed=0,
                                  max_empty_share=0.0 if refused_first else 0.25)
    g = torch.Generator().manual_seed(3)
    batch = 160 if refused_first else 120
    logits = torch.zeros(batch, sum(sizes))
    logits[:, 0] = 30.0           # every image pulled to group 0 of both upper levels
    logits[:, sizes[0]] = 30.0
    for _ in range(6):
        before = (adapter.labels.clone(), adapter.counts_t.clone(), adapter.group_totals.clone(),
                  loss_fn.psi_t.clone(), loss_fn.psi_scale.clone())
        idx = torch.randperm(y.numel(), generator=g)[:batch]
        step = adapter.step_count
        new = adapter.step(logits, y[idx], idx, exact=exact)
        assert adapter.step_count == step + 1
        if adapter.refused_steps:
            break
    assert adapter.refused_steps == 1, "the scenario did not trigger the guard"
    assert (adapter.step_count == 1) == refused_first
    assert torch.equal(new, before[0][idx])
    after = (adapter.labels, adapter.counts_t, adapter.group_totals, loss_fn.psi_t, loss_fn.psi_scale)
    for name, a, b in zip(("labels", "counts_t", "group_totals", "psi_t", "psi_scale"), before, after):
        assert torch.equal(a, b), f"{name} was not restored"
    # and the adapter goes on stepping from the restored state
    idx = torch.randperm(y.numel(), generator=g)[:20]
    adapter.step(0.1 * torch.randn(20, sum(sizes), generator=g), y[idx], idx, exact=exact)
    loss_fn.validate()
