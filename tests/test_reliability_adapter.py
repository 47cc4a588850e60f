"""GibbsAdapter on hostile states and priors: a refused ``load_state_dict``
changes nothing (the adapter nor the loss's Ψ), every entry of a state is
checked before any is applied, and β that the float32 kernels cannot use is
refused at construction."""
from __future__ import annotations

import pytest
import torch

from lmm_fast import FusedLMMLoss, GibbsAdapter
from lmm_fast.hierarchy import Hierarchy

N, SIZES, IMAGES = 13, (2, 5), 150


def hierarchy():
    finest = torch.arange(N) % SIZES[1]
    return Hierarchy.from_assignments([finest % SIZES[0], finest])


def make(non_overlapping=False, beta=0.5, **kwargs):
    h = hierarchy()
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    targets = torch.randint(0, N, (IMAGES,), generator=torch.Generator().manual_seed(1))
    return loss_fn, GibbsAdapter(loss_fn, h, targets, beta=beta, non_overlapping=non_overlapping, **kwargs)


def steps(adapter, count, seed):
    gen = torch.Generator().manual_seed(seed)
    width = sum(SIZES) + N
    for _ in range(count):
        idx = torch.randperm(IMAGES, generator=gen)[:40]
        adapter.step(3 * torch.randn(40, width, generator=gen), adapter.train_targets[idx], idx)


def snapshot(loss_fn, adapter):
    return dict(adapter.state_dict(), psi_t=loss_fn.psi_t.clone(), psi_scale=loss_fn.psi_scale.clone())


def assert_unchanged(before, loss_fn, adapter):
    now = snapshot(loss_fn, adapter)
    for key, value in before.items():
        same = torch.equal(now[key], value) if isinstance(value, torch.Tensor) else now[key] == value
        assert same, f"a refused state changed {key}"


def assert_rows_sum_to_one(loss_fn):
    rows = torch.cat([p.double().sum(1) for p in loss_fn.psi])
    torch.testing.assert_close(rows, torch.ones_like(rows))


def bad_states(good):
    def with_(**entries):
        return dict(good, **entries)

    beta = good["beta"]
    return [
        (with_(seed="7"), TypeError, "state seed must be an int, got str"),
        (with_(seed=1.5), TypeError, "state seed must be an int, got float"),
        (with_(seed=True), TypeError, "state seed must be an int, got bool"),
        (with_(seed=2**64), ValueError, "state seed = 18446744073709551616 is outside"),
        (with_(step=-1), ValueError, r"state step = -1 is outside \[0, 2\^63\)"),
        (with_(step=None), TypeError, "state step must be an int, got NoneType"),
        (with_(beta0=1e6), ValueError, "state beta0 = 1000000.0 is not the sum of its beta"),
        (with_(beta0=float("nan")), ValueError, "state beta0 must be a positive finite number, got nan"),
        (with_(beta0=-1.0), ValueError, "state beta0 must be a positive finite number"),
        (with_(beta0="6.5"), ValueError, "state beta0 must be a positive finite number"),
        (with_(beta=torch.full_like(beta, float("nan"))), ValueError, r"beta\[0\] = nan"),
        (with_(beta=torch.cat([beta[:-1], torch.zeros(1)])), ValueError, r"beta\[12\] = 0"),
        (with_(beta=torch.full((N,), 1e39, dtype=torch.float64)), ValueError, r"beta\[0\] = inf"),
        (with_(beta=beta[:5]), ValueError, r"state beta must be a floating \[N\] = \[13\] tensor"),
        (with_(beta=beta.tolist()), TypeError, "state beta must be a tensor, got list"),
        (with_(non_overlapping="no"), TypeError, "state non_overlapping must be True or False, got str"),
        (with_(non_overlapping=1), TypeError, "state non_overlapping must be True or False, got int"),
        (with_(psi_synced="yes"), TypeError, "state psi_synced must be True or False"),
        (with_(labels=good["labels"].tolist()), TypeError, "state labels must be a tensor, got list"),
        (with_(labels=good["labels"].double()), TypeError, "state labels must hold integer group ids"),
        (with_(labels=good["labels"] + 5), ValueError, "outside their level"),
        (with_(counts_t=good["counts_t"] + 1), ValueError, "state counts_t is not the histogram"),
        (with_(group_totals=good["group_totals"].float()), ValueError, "state group_totals is not the histogram"),
        (with_(prior="flat"), ValueError, "state prior must be one of"),
        (with_(version=2), ValueError, "version 2 is not 1"),
        (with_(level_sizes=[2, 6]), ValueError, "state is for upper levels"),
        ({k: v for k, v in good.items() if k != "seed"}, KeyError, "missing"),
        (list(good.items()), TypeError, "state must be a dict"),
    ]


@pytest.mark.parametrize("non_overlapping", [False, True])
def test_refused_state_changes_nothing(non_overlapping):
    loss_fn, adapter = make(non_overlapping)
    twin_loss, twin = make(non_overlapping)
    steps(adapter, 3, seed=2)
    steps(twin, 3, seed=2)
    # a later state of another run: its labels differ from the adapter's, so
    # a state applied in part would show
    other_loss, other = make(non_overlapping)
    steps(other, 6, seed=3)
    good = other.state_dict()
    assert not torch.equal(good["labels"], adapter.labels)
    before = snapshot(loss_fn, adapter)
    for state, error, message in bad_states(good):
        with pytest.raises(error, match=message):
            adapter.load_state_dict(state)
        assert_unchanged(before, loss_fn, adapter)
    # and the adapter goes on exactly as one that never saw them
    steps(adapter, 3, seed=4)
    steps(twin, 3, seed=4)
    assert torch.equal(adapter.labels, twin.labels)
    assert torch.equal(loss_fn.psi_t, twin_loss.psi_t) and torch.equal(loss_fn.psi_scale, twin_loss.psi_scale)
    assert_rows_sum_to_one(loss_fn)
    # the good state itself loads, and Ψ follows it
    adapter.load_state_dict(good)
    assert torch.equal(adapter.labels, other.labels)
    assert torch.equal(loss_fn.psi_t, other_loss.psi_t) and torch.equal(loss_fn.psi_scale, other_loss.psi_scale)


def test_numpy_ints_in_a_state_load():
    np = pytest.importorskip("numpy")
    loss_fn, adapter = make()
    steps(adapter, 2, seed=5)
    state = adapter.state_dict()
    _, fresh = make()
    fresh.load_state_dict(dict(state, seed=np.int64(state["seed"]), step=np.int32(state["step"])))
    assert fresh.step_count == state["step"] and fresh.seed == state["seed"]


@pytest.mark.parametrize(
    "beta, prior, error, message",
    [
        (1e-46, "per_class", ValueError, r"beta\[0\] = 1e-46 is 0 as the float32"),
        (torch.full((N,), 1e39, dtype=torch.float64), "per_class", ValueError, r"beta\[0\] = 1e\+39 is inf"),
        (1e-45, "total", ValueError, r"beta\[0\] = 1e-45 is 0 as the float32 the sampler uses \(prior='total'\)"),
        (1e38, "per_class", ValueError, "beta0 = sum of beta = 1.3e\\+39 is beyond float32"),
        ("abc", "per_class", TypeError, "beta must be a positive float or an \\[N\\] tensor, got str 'abc'"),
        (True, "per_class", TypeError, "got bool"),
        (None, "per_class", TypeError, "got NoneType"),
        (torch.ones(N, dtype=torch.bool), "per_class", TypeError, "beta must hold real numbers"),
        (float("inf"), "per_class", ValueError, "beta must be positive and finite, got inf"),
    ],
)
def test_unusable_beta_is_refused_at_construction(beta, prior, error, message):
    with pytest.raises(error, match=message):
        make(beta=beta, prior=prior)


def test_usable_extreme_beta_steps():
    # the smallest and largest β the float32 kernels take still give valid steps
    for beta in (1e-30, 1e30):
        loss_fn, adapter = make(beta=beta)
        steps(adapter, 2, seed=6)
        assert_rows_sum_to_one(loss_fn)
