"""Algorithm 1 (lmm_fast.train.fit_lmm) under the four settings of Table I on a
tiny synthetic problem."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lmm_fast import FusedLMMLoss, GibbsAdapter
from lmm_fast.reference import gibbs as ref
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.train import SETTINGS, IndexedDataset, fit_lmm

CLASSES, DIM, PER_CLASS = 12, 10, 25


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    fine = torch.arange(CLASSES) % 6
    h = Hierarchy.from_assignments([fine % 3, fine])
    # classes of a group share a direction, so the tree is meaningful
    group_means = 2.0 * torch.randn(6, DIM, generator=gen)
    class_means = group_means[fine] + 0.8 * torch.randn(CLASSES, DIM, generator=gen)
    y = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    x = class_means[y] + torch.randn(y.numel(), DIM, generator=gen)
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return h, y, loader


def model_for(h, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, sum(h.level_sizes) + h.num_classes))


@pytest.mark.parametrize("setting", SETTINGS)
def test_fit_lmm_settings(setting):
    h, y, loader = problem()
    model = model_for(h)
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    initial_psi = loss_fn.psi_t.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    calls = []
    history = fit_lmm(model, loader, optimizer=optimizer, epochs=4, warmup_epochs=1, setting=setting,
                      loss_fn=loss_fn, hierarchy=h, train_targets=y, beta=0.5, on_step=calls.append)
    batches = len(loader)
    assert len(history.epoch_losses) == 4 and len(history.step_losses) == 4 * batches == len(calls)
    assert history.epoch_losses[-1] < 0.6 * history.epoch_losses[0], history.epoch_losses
    if setting in ("lmm_p", "lmm_p_tc"):
        adapter = history.adapter
        assert isinstance(adapter, GibbsAdapter)
        assert adapter.non_overlapping == (setting == "lmm_p_tc")
        assert history.adapted_steps == adapter.step_count == 3 * batches
        assert [c["adapted"] for c in calls] == [False] * batches + [True] * 3 * batches
        assert not torch.equal(loss_fn.psi_t, initial_psi)
        counts = ref.counts_from_labels(adapter.labels, y, h.level_sizes + [CLASSES])
        assert all(torch.equal(a.long(), b) for a, b in zip(adapter.counts, counts))
        want = ref.psi_from_counts_reference(counts, adapter.beta, adapter.beta0, adapter.non_overlapping)
        for got, expected in zip(loss_fn.psi, want):
            torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-7)
    else:
        assert history.adapter is None and history.adapted_steps == 0
        assert torch.equal(loss_fn.psi_t, initial_psi)


def test_fit_lmm_with_a_given_adapter_resumes():
    h, y, loader = problem(1)
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    adapter = GibbsAdapter(loss_fn, h, y, beta=0.5, non_overlapping=True, seed=3)
    model = model_for(h, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    fit_lmm(model, loader, optimizer=optimizer, epochs=2, warmup_epochs=0, setting="lmm_p_tc",
            loss_fn=loss_fn, adapter=adapter)
    assert adapter.step_count == 2 * len(loader)


def test_fit_lmm_errors():
    h, y, loader = problem()
    model = model_for(h)
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="setting must be one of"):
        fit_lmm(model, loader, optimizer=optimizer, epochs=1, setting="lmm_tc", loss_fn=loss_fn)
    with pytest.raises(ValueError, match="needs an adapter, or hierarchy and train_targets"):
        fit_lmm(model, loader, optimizer=optimizer, epochs=1, setting="lmm_p", loss_fn=loss_fn)
    adapter = GibbsAdapter(loss_fn, h, y, non_overlapping=False)
    with pytest.raises(ValueError, match="non_overlapping=True"):
        fit_lmm(model, loader, optimizer=optimizer, epochs=1, setting="lmm_p_tc", loss_fn=loss_fn, adapter=adapter)
    with pytest.raises(ValueError, match="needs loss_fn"):
        fit_lmm(model, loader, optimizer=optimizer, epochs=1, setting="lmm")
    pairs = DataLoader(TensorDataset(torch.randn(8, DIM), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="IndexedDataset"):
        fit_lmm(model, pairs, optimizer=optimizer, epochs=1, setting="lmm", loss_fn=loss_fn)
