"""LMMHead: packed logits, from_flat, full and coarse-to-fine prediction."""
import math

import pytest
import torch
from torch import nn

import lmm_fast
from lmm_fast import FusedLMMLoss, LMMHead
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.reference.predict import predict_topk_reference
from lmm_fast.reference.loss import predict_proba_reference
from lmm_fast.testing import tree_psi


def tree_hierarchy(sizes, seed):
    psi = tree_psi(sizes, torch.Generator().manual_seed(seed))
    return Hierarchy.from_assignments([p.argmax(0) for p in psi])


def randomised(head, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.linear.weight.copy_(scale * torch.randn(head.linear.weight.shape, generator=gen))
        head.linear.bias.copy_(scale * torch.randn(head.linear.bias.shape, generator=gen))
    return head


def planted(num_samples, sizes, dim, seed, noise=3.0):
    """Features of classes whose means share components with their groups'."""
    gen = torch.Generator().manual_seed(seed)
    h = tree_hierarchy(sizes, seed)
    means = torch.zeros(sizes[-1], dim)
    for level, groups in enumerate(h.assignments):
        means += (3.0 / (level + 1)) * torch.randn(sizes[level], dim, generator=gen)[groups]
    means += torch.randn(sizes[-1], dim, generator=gen)
    target = torch.randint(0, sizes[-1], (num_samples,), generator=gen)
    x = means[target] + noise * torch.randn(num_samples, dim, generator=gen)
    flat = nn.Linear(dim, sizes[-1])
    with torch.no_grad():
        flat.weight.copy_(means)
        flat.bias.copy_(-0.5 * means.square().sum(1))  # Bayes classifier of unit-variance classes
    return h, x, target, flat


def test_layout_and_initialisation():
    h = tree_hierarchy([3, 7, 50], 0)
    head = LMMHead(24, h)
    assert head.level_sizes == [3, 7, 50] and head.offsets == [0, 3, 10]
    assert tuple(head.linear.weight.shape) == (60, 24)
    assert set(dict(head.state_dict())) == {"linear.weight", "linear.bias"}
    assert (head.linear.bias == 0).all()
    assert 0.007 < float(head.linear.weight.detach().std()) < 0.013
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(1))
    logits = head(x).detach()
    assert logits.shape == (9, 60)
    torch.testing.assert_close(logits, x @ head.linear.weight.t())
    parts = head.split(logits)
    assert [p.shape[1] for p in parts] == [3, 7, 50]
    # Every level starts near uniform: the mixture and the loss are close to
    # those of all-zero logits (exactly 1/N and log N for a balanced tree).
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    zeros = torch.zeros_like(logits)
    proba = head.predict_proba(x).detach()
    assert ((proba / loss_fn.predict_proba(zeros)) - 1).abs().max() < 0.25
    target = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(2))
    assert abs(float(loss_fn(logits, target)) - float(loss_fn(zeros, target))) < 0.05
    assert head(torch.randn(2, 5, 24)).shape == (2, 5, 60)


def test_predict_proba_with_and_without_loss():
    h = tree_hierarchy([4, 9, 31], 3)
    head = randomised(LMMHead(8, h), 4)
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(5))
    # Without a loss: the hierarchy's initial Ψ and the default θ.
    default = FusedLMMLoss.from_hierarchy(h)
    torch.testing.assert_close(head.predict_proba(x), default.predict_proba(head(x)))
    loss_fn = FusedLMMLoss.from_hierarchy(h, theta=[0.5, 0.3, 0.2])
    ref = predict_proba_reference(head(x).double(), [p.double() for p in h.psi()], loss_fn.theta.double())
    torch.testing.assert_close(head.predict_proba(x, loss_fn).double(), ref, rtol=1e-5, atol=1e-6)
    values, indices = head.predict_topk(x, 4, loss_fn=loss_fn)
    ref_values, ref_indices = predict_topk_reference(head(x).double(), [p.double() for p in h.psi()], loss_fn.theta.double(), 4)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("sizes", [[3, 11, 97], [2, 5, 13, 61], [6, 40]])
def test_beam_covering_all_groups_equals_full_prediction(sizes):
    h = tree_hierarchy(sizes, 6)
    head = randomised(LMMHead(16, h), 7)
    x = torch.randn(21, 16, generator=torch.Generator().manual_seed(8))
    full_values, full_indices = head.predict_topk(x, 7)
    for beam in (max(sizes[:-1]), 10**6):
        values, indices = head.predict_topk(x, 7, beam=beam)
        torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-6)
        assert torch.equal(indices, full_indices)


def test_per_row_theta_full_and_beam():
    sizes = [3, 11, 97]
    h = tree_hierarchy(sizes, 28)
    head = randomised(LMMHead(16, h), 29)
    gen = torch.Generator().manual_seed(30)
    x = torch.randn(9, 16, generator=gen)
    theta = torch.softmax(torch.randn(9, 3, generator=gen), 1)
    proba = head.predict_proba(x, theta=theta)
    levels = [a.double() for a in head.split(head(x).detach())]
    ref = theta[:, 2:].double() * torch.softmax(levels[2], 1)
    for level, p in enumerate(h.psi()):
        ref = ref + theta[:, level : level + 1].double() * (torch.softmax(levels[level], 1) @ p.double())
    torch.testing.assert_close(proba.detach().double(), ref, rtol=1e-5, atol=1e-6)
    full = head.predict_topk(x, 4, theta=theta)
    beam = head.predict_topk(x, 4, beam=11, theta=theta)
    torch.testing.assert_close(beam[0], full[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(beam[1], full[1])
    with pytest.raises(ValueError, match="theta must be \\[3\\] or \\[B, 3\\]"):
        head.predict_topk(x, 4, theta=theta[:, :2])
    with pytest.raises(ValueError, match="theta has 2 rows but x has 9"):
        head.predict_topk(x, 4, beam=2, theta=theta[:2])


def test_beam_with_an_adapted_tree_psi():
    # Ψ after adaptation with the non-overlapping constraint: still one group
    # per class (nested here), but unequal weights within each group.
    sizes = [3, 8, 40]
    h = tree_hierarchy(sizes, 9)
    gen = torch.Generator().manual_seed(10)
    psi = [p * torch.rand(p.shape, generator=gen) for p in h.psi()]
    psi = [p / p.sum(1, keepdim=True) for p in psi]
    loss_fn = FusedLMMLoss(psi, [0.3, 0.3, 0.4])
    head = randomised(LMMHead(12, h), 11)
    x = torch.randn(15, 12, generator=gen)
    full = head.predict_topk(x, 5, loss_fn=loss_fn)
    beam = head.predict_topk(x, 5, beam=8, loss_fn=loss_fn)
    torch.testing.assert_close(beam[0], full[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(beam[1], full[1])
    ref = predict_proba_reference(head(x).double(), [p.double() for p in psi], loss_fn.theta.double())
    torch.testing.assert_close(full[0].double(), torch.topk(ref, 5, 1).values, rtol=1e-5, atol=1e-6)


def test_narrow_beam_searches_inside_the_best_groups():
    sizes = [4, 12, 60]
    h = tree_hierarchy(sizes, 12)
    head = randomised(LMMHead(10, h), 13)
    x = torch.randn(30, 10, generator=torch.Generator().manual_seed(14))
    values, indices = head.predict_topk(x, 3, beam=1)
    top_group = head.split(head(x))[0].argmax(1)
    assert torch.equal(h.assignments[0][indices[:, 0]], top_group)
    # Scored on fewer classes, each below-top softmax is renormalised: values are probabilities.
    assert ((values > 0) & (values <= 1)).all()
    assert (values[:, 1:] <= values[:, :-1]).all()


def test_beam_on_planted_data_keeps_the_accuracy():
    sizes = [5, 20, 200]
    h, x, target, flat = planted(600, sizes, 32, 15)
    head = LMMHead.from_flat(flat, h)
    _, full = head.predict_topk(x, 5)
    full_top1 = float((full[:, 0] == target).float().mean())
    assert 0.5 < full_top1 < 0.9  # neither trivial nor hopeless
    _, beam1 = head.predict_topk(x, 5, beam=1)
    _, beam3 = head.predict_topk(x, 5, beam=3)
    top1_b1 = float((beam1[:, 0] == target).float().mean())
    top1_b3 = float((beam3[:, 0] == target).float().mean())
    assert top1_b3 >= full_top1 - 0.02
    assert top1_b1 <= top1_b3 + 0.02


def test_beam_with_fewer_classes_than_k_pads():
    h = Hierarchy.from_assignments([torch.tensor([0, 0, 1, 1, 1, 1, 1, 1])])
    head = randomised(LMMHead(4, h), 16)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        head.linear.bias[0] = 50.0  # group 0 (two classes) always wins the top level
    values, indices = head.predict_topk(x, 4, beam=1)
    assert (indices[:, 2:] == -1).all() and (values[:, 2:] == 0).all()
    assert set(indices[:, :2].flatten().tolist()) <= {0, 1}


def test_from_flat_reproduces_the_flat_model():
    sizes = [4, 13, 71]
    h = tree_hierarchy(sizes, 18)
    gen = torch.Generator().manual_seed(19)
    flat = nn.Linear(20, 71).double()
    with torch.no_grad():
        flat.weight.copy_(torch.randn(71, 20, generator=gen, dtype=torch.float64))
        flat.bias.copy_(torch.randn(71, generator=gen, dtype=torch.float64))
    head = LMMHead.from_flat(flat, h)
    assert head.linear.weight.dtype == torch.float64
    x = torch.randn(17, 20, generator=gen, dtype=torch.float64)
    logits = head(x)
    torch.testing.assert_close(logits[:, -71:], flat(x))
    loss_fn = FusedLMMLoss.from_hierarchy(h, theta=[0.0, 0.0, 1.0]).to(torch.float64)
    torch.testing.assert_close(head.predict_proba(x, loss_fn), torch.softmax(flat(x), 1))
    values, indices = head.predict_topk(x, 5, loss_fn=loss_fn)
    assert torch.equal(indices, torch.topk(flat(x), 5, 1).indices)
    # Group rows: the members' mean weight, mean bias + log(group size).
    for level, groups in enumerate(h.assignments):
        offset = head.offsets[level]
        for g in (0, sizes[level] - 1):
            members = (groups == g).nonzero().flatten()
            torch.testing.assert_close(head.linear.weight[offset + g], flat.weight[members].mean(0))
            torch.testing.assert_close(head.linear.bias[offset + g], flat.bias[members].mean() + math.log(len(members)))
    target = flat(x).argmax(1)
    ce = nn.functional.cross_entropy(flat(x), target)
    torch.testing.assert_close(loss_fn(logits, target), ce)


def test_from_flat_group_classifiers_find_the_groups():
    sizes = [5, 20, 200]
    h, x, target, flat = planted(600, sizes, 32, 20)
    head = LMMHead.from_flat(flat, h)
    levels = head.split(head(x))
    for level, groups in enumerate(h.assignments):
        accuracy = float((levels[level].argmax(1) == groups[target]).float().mean())
        assert accuracy > 0.8, (level, accuracy)
    flat_top1 = float((flat(x).argmax(1) == target).float().mean())
    lmm_top1 = float((head.predict_topk(x, 1)[1][:, 0] == target).float().mean())
    assert lmm_top1 >= flat_top1 - 0.03


def test_from_flat_without_bias_and_with_a_dense_hierarchy():
    gen = torch.Generator().manual_seed(21)
    confusion = torch.rand(9, 9, generator=gen) + 3 * torch.eye(9)
    h = Hierarchy.from_confusion(confusion)
    flat = nn.Linear(6, 9, bias=False)
    head = LMMHead.from_flat(flat, h)
    psi = h.psi()[0].double()
    entropy = -(psi * psi.log()).sum(1)
    torch.testing.assert_close(head.linear.weight[:9].double(), psi @ flat.weight.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.linear.bias[:9].double(), entropy, rtol=1e-5, atol=1e-6)
    assert (head.linear.bias[9:] == 0).all()
    x = torch.randn(4, 6, generator=gen)
    ref = predict_proba_reference(head(x).double(), [psi], lmm_fast.default_theta(2).double())
    torch.testing.assert_close(head.predict_proba(x).double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs a tree"):
        head.predict_topk(x, 3, beam=2)
    assert head.predict_topk(x, 3)[1].shape == (4, 3)


def test_training_from_scratch_lowers_the_loss():
    sizes = [4, 12, 48]
    h, x, target, _ = planted(256, sizes, 16, 22)
    head = LMMHead(16, h)
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        loss = loss_fn(head(x), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bad_inputs():
    h = tree_hierarchy([3, 9, 30], 23)
    head = LMMHead(8, h)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        LMMHead(0, h)
    with pytest.raises(TypeError, match="hierarchy must be a lmm_fast.Hierarchy"):
        LMMHead(8, [3, 9])
    with pytest.raises(ValueError, match="x must be \\[B, in_features\\] = \\[B, 8\\]"):
        head.predict_topk(torch.randn(4, 7), 3)
    with pytest.raises(ValueError, match="k must be an int in \\[0, N\\] = \\[0, 30\\]"):
        head.predict_topk(x, 31)
    with pytest.raises(ValueError, match="beam must be a positive int"):
        head.predict_topk(x, 3, beam=0)
    with pytest.raises(ValueError, match="level sizes"):
        head.predict_proba(x, FusedLMMLoss.from_hierarchy(tree_hierarchy([2, 9, 30], 24)))
    with pytest.raises(TypeError, match="nn.Linear"):
        LMMHead.from_flat(torch.zeros(30, 8), h)
    with pytest.raises(ValueError, match="linear has 29 outputs but the hierarchy has 30 classes"):
        LMMHead.from_flat(nn.Linear(8, 29), h)
    # A tree Ψ whose second level is not nested in the first: no coarse-to-fine.
    loose = Hierarchy.from_assignments([torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 2])], nested=False)
    loose_head = LMMHead(3, loose)
    with pytest.raises(ValueError, match="needs nested levels"):
        loose_head.predict_topk(torch.randn(2, 3), 2, beam=1)
    assert loose_head.predict_topk(torch.randn(2, 3), 2)[1].shape == (2, 2)


@pytest.mark.cuda
def test_cuda_head_prediction():
    sizes = [3, 11, 97]
    h = tree_hierarchy(sizes, 25)
    head = randomised(LMMHead(16, h), 26).cuda()
    x = torch.randn(21, 16, generator=torch.Generator().manual_seed(27)).cuda()
    loss_fn = FusedLMMLoss.from_hierarchy(h).cuda()
    full = head.predict_topk(x, 5, loss_fn=loss_fn)
    beam = head.predict_topk(x, 5, beam=11, loss_fn=loss_fn)
    torch.testing.assert_close(beam[0], full[0], rtol=1e-4, atol=1e-6)
    ref = head.cpu().predict_topk(x.cpu(), 5)
    torch.testing.assert_close(full[0].cpu(), ref[0], rtol=1e-4, atol=1e-6)
