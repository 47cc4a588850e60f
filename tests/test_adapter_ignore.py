"""GibbsAdapter.step skips the rows whose target is the loss's ignore_index:
they are not sampled, their labels stay, their indices are not read, and the
other rows are sampled exactly as in a batch without them."""
import pytest
import torch

from lmm_fast import FusedLMMLoss, GibbsAdapter, Hierarchy

N, IMAGES = 40, 64


def adapter_pair(ignore_index=-100, non_overlapping=False):
    classes = torch.arange(N)
    h = Hierarchy.from_assignments([classes % 4, classes % 12])
    y = torch.randint(0, N, (IMAGES,), generator=torch.Generator().manual_seed(0))
    out = []
    for _ in range(2):
        loss_fn = FusedLMMLoss.from_hierarchy(h, ignore_index=ignore_index)
        out.append(GibbsAdapter(loss_fn, h, y, non_overlapping=non_overlapping, seed=2))
    return out


def same_state(a, b):
    return (torch.equal(a.labels, b.labels) and torch.equal(a.counts_t, b.counts_t)
            and torch.equal(a.loss_fn.psi_t, b.loss_fn.psi_t) and torch.equal(a.loss_fn.psi_scale, b.loss_fn.psi_scale))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("non_overlapping", [False, True])
def test_ignored_rows_are_skipped(exact, non_overlapping):
    adapter, reference = adapter_pair(non_overlapping=non_overlapping)
    indices = torch.arange(16)
    logits = 3 * torch.randn(16, 4 + 12 + N, generator=torch.Generator().manual_seed(1))
    target = adapter.train_targets[indices].clone()
    ignored = torch.zeros(16, dtype=torch.bool)
    ignored[[1, 5, 6]] = True
    target[ignored] = -100
    batch_indices = indices.clone()
    batch_indices[5] = 10**6          # never read: not a training image
    batch_indices[6] = batch_indices[0]  # nor counted as a repeat
    before = adapter.labels.clone()
    for step in range(2):
        new = adapter.step(logits, target, batch_indices, exact=exact)
        expected = reference.step(logits[~ignored], target[~ignored], batch_indices[~ignored], exact=exact)
        assert (new[ignored] == -1).all()
        assert torch.equal(new[~ignored], expected)
        assert same_state(adapter, reference)
    assert torch.equal(adapter.labels[1], before[1])  # the ignored row's image kept its labels
    kept = indices[~ignored]
    assert not torch.equal(adapter.labels[kept], before[kept])  # the others were sampled (some moved)


def test_an_ignore_index_that_is_a_class_is_skipped_too_and_errors_name_the_batch_row():
    adapter, reference = adapter_pair(ignore_index=5)
    indices = torch.arange(IMAGES)
    target = adapter.train_targets[indices]
    assert (target == 5).any()
    logits = torch.randn(IMAGES, 4 + 12, generator=torch.Generator().manual_seed(3))
    new = adapter.step(logits, target, indices)
    keep = target != 5
    assert (new[~keep] == -1).all()
    assert torch.equal(new[keep], reference.step(logits[keep], target[keep], indices[keep]))
    assert same_state(adapter, reference)

    # a wrong target among ignored rows is still refused, named by its row in the batch
    target = adapter.train_targets[:8].clone()
    target[0] = 5
    target[3] = (target[3] + 1) % N
    if target[3] == 5:
        target[3] = 6
    with pytest.raises(ValueError, match=r"target\[3\] = .* but train_targets\[indices\[3\]\]"):
        adapter.step(logits[:8], target, torch.arange(8))
    everything_ignored = adapter.step(logits[:2], torch.tensor([5, 5]), torch.tensor([-1, -1]))
    assert (everything_ignored == -1).all() and everything_ignored.shape == (2, 2)
