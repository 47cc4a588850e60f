"""A whole training run in one checkpoint (lmm_fast.save_checkpoint /
load_checkpoint): resuming gives bit-identical next steps; the file loads
with weights_only=True; GibbsAdapter.load_state_dict refuses a state of the
other non_overlapping setting."""
import pytest
import torch

import lmm_fast
from lmm_fast import FusedLMMLoss, GibbsAdapter, Hierarchy, LMMHead

N, D, IMAGES, BATCH = 40, 6, 96, 16


def hierarchy():
    classes = torch.arange(N)
    return Hierarchy.from_assignments([classes % 4, classes % 12])


def data():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, N, (IMAGES,), generator=gen)
    x = torch.randn(IMAGES, D, generator=gen) + torch.randn(N, D, generator=gen)[y]
    order = torch.randperm(IMAGES, generator=gen)
    batches = [order[i : i + BATCH] for i in range(0, IMAGES, BATCH)]
    return x, y, batches


def new_run(non_overlapping, init_seed):
    """The run as built at the start of training (init_seed: the head's draw)."""
    h = hierarchy()
    torch.manual_seed(init_seed)
    head = LMMHead(D, h, init_std=0.1)
    loss_fn = FusedLMMLoss.from_hierarchy(h, learn_theta=True)
    _, y, _ = data()
    adapter = GibbsAdapter(loss_fn, h, y, beta=0.5, non_overlapping=non_overlapping, seed=3)
    optimizer = torch.optim.Adam(list(head.parameters()) + list(loss_fn.parameters()), lr=0.05)
    return h, head, loss_fn, adapter, optimizer


def train(head, loss_fn, adapter, optimizer, batches):
    x, y, _ = data()
    record = []
    for indices in batches:
        logits = head(x[indices])
        loss = loss_fn(logits, y[indices])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        labels = adapter.step(logits, y[indices], indices)
        record += [loss.detach().clone(), labels.clone(), loss_fn.psi_t.clone(), loss_fn.psi_scale.clone()]
    record += [adapter.labels.clone(), adapter.counts_t.clone(), loss_fn.theta.detach().clone(),
               head.linear.weight.detach().clone(), loss_fn.predict_proba(head(x)).detach()]
    return record


def assert_bit_identical(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"entry {i} differs"


@pytest.mark.parametrize("non_overlapping", [False, True])
@pytest.mark.parametrize("before", [0, 3])  # 0: saved during the warm-up, before any adaptation
def test_resuming_gives_bit_identical_next_steps(non_overlapping, before, tmp_path):
    _, _, batches = data()
    path = tmp_path / "run.pt"
    h, head, loss_fn, adapter, optimizer = new_run(non_overlapping, init_seed=1)
    train(head, loss_fn, adapter, optimizer, batches[:before])
    rng = torch.get_rng_state()
    lmm_fast.save_checkpoint(path, hierarchy=h, head=head, loss_fn=loss_fn, adapter=adapter,
                             optimizer=optimizer, extra={"epoch": 0, "batch": before, "rng": rng})
    expected = train(head, loss_fn, adapter, optimizer, batches[before:])

    # into fresh objects, built as at the start (another initial draw)
    _, head2, loss2, adapter2, optimizer2 = new_run(non_overlapping, init_seed=2)
    restored = lmm_fast.load_checkpoint(path, head=head2, loss_fn=loss2, adapter=adapter2, optimizer=optimizer2)
    assert restored.head is head2 and restored.adapter is adapter2 and restored.optimizer is optimizer2
    assert restored.extra["batch"] == before and torch.equal(restored.extra["rng"], rng)
    assert restored.hierarchy == h
    assert_bit_identical(train(head2, loss2, adapter2, optimizer2, batches[before:]), expected)

    # or everything built from the file alone
    rebuilt = lmm_fast.load_checkpoint(path)
    assert rebuilt.adapter.non_overlapping == non_overlapping and rebuilt.optimizer is None
    optimizer3 = torch.optim.Adam(list(rebuilt.head.parameters()) + list(rebuilt.loss_fn.parameters()), lr=0.05)
    optimizer3.load_state_dict(rebuilt.optimizer_state)
    assert_bit_identical(train(rebuilt.head, rebuilt.loss_fn, rebuilt.adapter, optimizer3, batches[before:]), expected)


def test_a_run_without_adapter_or_optimizer_and_the_file_is_weights_only(tmp_path):
    h = hierarchy()
    head = LMMHead(D, h)
    loss_fn = FusedLMMLoss.from_hierarchy(h, theta=[0.1, 0.2, 0.7], reduction="sum", ignore_index=7)
    path = tmp_path / "model.pt"
    lmm_fast.save_checkpoint(path, head=head, loss_fn=loss_fn)  # the hierarchy defaults to the head's
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "lmm_fast.checkpoint" and payload["adapter"] is None
    back = lmm_fast.load_checkpoint(path)
    assert back.adapter is None and back.optimizer_state is None and back.extra is None
    assert (back.loss_fn.reduction, back.loss_fn.ignore_index, back.loss_fn.learn_theta) == ("sum", 7, False)
    assert torch.equal(back.loss_fn.theta, loss_fn.theta) and torch.equal(back.loss_fn.psi_t, loss_fn.psi_t)
    assert torch.equal(back.head.linear.weight, head.linear.weight)
    x = torch.randn(3, D)
    assert torch.equal(back.head.predict_proba(x, back.loss_fn), head.predict_proba(x, loss_fn))


def test_the_loss_options_of_cross_entropy_survive_a_checkpoint(tmp_path):
    h = hierarchy()
    head = LMMHead(D, h)
    weight = torch.rand(N) + 0.5
    loss_fn = FusedLMMLoss.from_hierarchy(h, weight=weight, label_smoothing=0.1)
    lmm_fast.save_checkpoint(tmp_path / "model.pt", head=head, loss_fn=loss_fn)
    back = lmm_fast.load_checkpoint(tmp_path / "model.pt")
    assert back.loss_fn.label_smoothing == 0.1 and torch.equal(back.loss_fn.weight, loss_fn.weight)
    x, y = torch.randn(5, D), torch.randint(0, N, (5,))
    assert torch.equal(back.loss_fn(back.head(x), y), loss_fn(head(x), y))


def test_bad_content_and_bad_files_are_refused(tmp_path):
    h = hierarchy()
    head, loss_fn = LMMHead(D, h), FusedLMMLoss.from_hierarchy(h)
    with pytest.raises(TypeError, match=r"extra\['schedule'\] is a function"):
        lmm_fast.save_checkpoint(tmp_path / "a.pt", head=head, loss_fn=loss_fn, extra={"schedule": lambda e: e})
    assert not list(tmp_path.iterdir())
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an lmm_fast checkpoint"):
        lmm_fast.load_checkpoint(tmp_path / "other.pt")
    other = Hierarchy.from_assignments([torch.arange(N) % 5, torch.arange(N) % 10])
    lmm_fast.save_checkpoint(tmp_path / "b.pt", head=head, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="levels"):
        lmm_fast.load_checkpoint(tmp_path / "b.pt", head=LMMHead(D, other))


def test_adapter_load_refuses_the_other_non_overlapping_setting(tmp_path):
    h, head, loss_fn, adapter, optimizer = new_run(True, init_seed=1)
    _, _, batches = data()
    train(head, loss_fn, adapter, optimizer, batches[:2])
    state = adapter.state_dict()
    _, _, loss2, adapter2, _ = new_run(False, init_seed=1)
    labels, psi = adapter2.labels.clone(), loss2.psi_t.clone()
    with pytest.raises(ValueError, match=r"non_overlapping=True but this adapter has non_overlapping=False"):
        adapter2.load_state_dict(state)
    assert torch.equal(adapter2.labels, labels) and torch.equal(loss2.psi_t, psi) and not adapter2.non_overlapping
    lmm_fast.save_checkpoint(tmp_path / "run.pt", head=head, loss_fn=loss_fn, adapter=adapter)
    with pytest.raises(ValueError, match="non_overlapping"):
        lmm_fast.load_checkpoint(tmp_path / "run.pt", adapter=adapter2)
