"""lmm_fast.metrics against direct computations, scikit-learn where installed,
and hand-worked edge cases."""
import math

import numpy as np
import pytest
import torch

import lmm_fast
from lmm_fast import FusedLMMLoss, metrics
from lmm_fast.hierarchy import Hierarchy


def random_scores(rows, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, classes, generator=gen)
    target = torch.randint(0, classes, (rows,), generator=gen)
    # Make the target likely to rank high, so the errors are not all near 1.
    scores[torch.arange(rows), target] += 1.5
    return scores, target


def direct_topk_error(scores, target, k):
    top = [set(row) for row in torch.topk(scores, min(k, scores.shape[1]), 1).indices.tolist()]
    return sum(int(t) not in s for t, s in zip(target.tolist(), top)) / len(top)


@pytest.mark.parametrize("rows,classes", [(1, 3), (57, 11), (301, 1000)])
def test_topk_error_matches_direct_computation(rows, classes):
    scores, target = random_scores(rows, classes, rows + classes)
    errors = metrics.topk_error(scores, target)
    assert set(errors) == {1, 2, 5, 10}
    for k, value in errors.items():
        assert value == pytest.approx(direct_topk_error(scores, target, k), abs=1e-12)
    proba = torch.softmax(scores, 1)
    assert metrics.topk_error(proba, target, ks=3) == pytest.approx({3: direct_topk_error(scores, target, 3)})


def test_topk_error_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    scores, target = random_scores(400, 37, 1)
    errors = metrics.topk_error(scores, target, ks=(1, 2, 5, 10))
    for k, value in errors.items():
        accuracy = sklearn_metrics.top_k_accuracy_score(target.numpy(), scores.numpy(), k=k, labels=np.arange(37))
        assert value == pytest.approx(1 - accuracy, abs=1e-12)


def test_topk_error_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([2, 2, 0])
    # Row 0: three-way tie at the top; row 1: one above, tied with one; row 2: all tied.
    average = metrics.topk_error(scores, target, ks=(1, 2, 4))
    assert average[1] == pytest.approx(1 - (1 / 3 + 0 + 1 / 4) / 3)
    assert average[2] == pytest.approx(1 - (2 / 3 + 1 / 2 + 2 / 4) / 3)
    assert average[4] == 0.0
    pessimistic = metrics.topk_error(scores, target, ks=(1, 2, 3), ties="pessimistic")
    assert pessimistic == pytest.approx({1: 1.0, 2: 1.0, 3: 1 / 3})
    optimistic = metrics.topk_error(scores, target, ks=(1, 2), ties="optimistic")
    assert optimistic == pytest.approx({1: 1 / 3, 2: 0.0})
    correct = metrics.topk_correct(scores, target, 2)
    torch.testing.assert_close(correct, torch.tensor([2 / 3, 1 / 2, 2 / 4], dtype=torch.float64))


def test_topk_error_edge_cases_and_errors():
    scores, target = random_scores(20, 6, 2)
    assert metrics.topk_error(scores, target, ks=(6, 50)) == {6: 0.0, 50: 0.0}
    target_ignored = target.clone()
    target_ignored[:5] = -100
    kept = metrics.topk_error(scores[5:], target[5:], ks=2)
    assert metrics.topk_error(scores, target_ignored, ks=2, ignore_index=-100) == kept
    assert metrics.topk_error(scores.numpy(), target.numpy(), ks=1) == metrics.topk_error(scores, target, ks=1)
    with pytest.raises(ValueError, match="no samples"):
        metrics.topk_error(scores[:0], target[:0])
    with pytest.raises(ValueError, match="no samples"):
        metrics.topk_error(scores, torch.full((20,), -1), ignore_index=-1)
    bad = scores.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="contains NaN \\(first in row 3\\)"):
        metrics.topk_error(bad, target)
    with pytest.raises(ValueError, match="target\\[0\\] = 6 is out of range"):
        metrics.topk_error(scores, torch.full((20,), 6))
    with pytest.raises(ValueError, match="target must be \\[M\\] = \\[20\\]"):
        metrics.topk_error(scores, target[:-1])
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        metrics.topk_error(scores, target.float())
    with pytest.raises(ValueError, match="must be 2-D \\[M, N\\]"):
        metrics.topk_error(scores[0], target[:1])
    with pytest.raises(ValueError, match="every k must be a positive int, got 0"):
        metrics.topk_error(scores, target, ks=(1, 0))
    with pytest.raises(ValueError, match="ties must be one of"):
        metrics.topk_error(scores, target, ties="random")


def test_per_class_accuracy_and_absent_classes():
    scores, target = random_scores(300, 9, 3)
    target[target == 4] = 5  # class 4 absent from the test set
    accuracy, counts = metrics.per_class_accuracy(scores, target, return_counts=True)
    assert counts[4] == 0 and math.isnan(accuracy[4])
    pred = scores.argmax(1)
    for c in (0, 5, 8):
        members = target == c
        assert counts[c] == int(members.sum())
        assert float(accuracy[c]) == pytest.approx(float((pred[members] == c).double().mean()))
    top3 = metrics.per_class_accuracy(scores, target, k=3)
    assert (top3[~torch.isnan(top3)] >= accuracy[~torch.isnan(accuracy)]).all()
    from_labels = metrics.per_class_accuracy(pred, target, num_classes=9)
    torch.testing.assert_close(from_labels, accuracy, equal_nan=True)
    with pytest.raises(ValueError, match="num_classes is required"):
        metrics.per_class_accuracy(pred, target)
    with pytest.raises(ValueError, match="top-1 accuracy only"):
        metrics.per_class_accuracy(pred, target, num_classes=9, k=2)
    assert torch.isnan(metrics.per_class_accuracy(scores[:0], target[:0])).all()


def test_compare_per_class_shares_and_boundaries():
    baseline = torch.tensor([0.50, 0.50, 0.50, 0.50, 0.50, float("nan"), 0.20])
    new = torch.tensor([0.51, 0.52, 0.49, 0.48, 0.50, 0.90, float("nan")])
    result = metrics.compare_per_class(baseline, new)
    # +1 pt exactly and -1 pt exactly are "unchanged"; NaN classes are skipped.
    assert result.num_compared == 5 and result.num_skipped == 2
    assert result.improved_classes.tolist() == [1]
    assert result.worse_classes.tolist() == [3]
    assert result.unchanged_classes.tolist() == [0, 2, 4]
    assert (result.improved, result.unchanged, result.worse) == pytest.approx((0.2, 0.6, 0.2))
    assert "improved 20.0%" in str(result) and "2 without samples skipped" in str(result)
    assert math.isnan(metrics.compare_per_class(torch.full((3,), float("nan")), torch.zeros(3)).improved)
    with pytest.raises(ValueError, match="equal length"):
        metrics.compare_per_class(baseline, new[:3])


def test_compare_models_counts_classes_like_fig5():
    gen = torch.Generator().manual_seed(4)
    target = torch.arange(40).repeat(50)
    baseline = torch.randn(2000, 40, generator=gen)
    baseline[torch.arange(2000), target] += 2.0  # about 40% accuracy for every class
    better = baseline.clone()
    better[torch.arange(2000), target] += 3.0 * (target < 10)  # classes 0..9 get much easier
    better[torch.arange(2000), target] -= 3.0 * (target >= 30)  # classes 30..39 much harder
    result = metrics.compare_models(baseline, better, target)
    assert set(result.improved_classes.tolist()) == set(range(10))
    assert set(result.worse_classes.tolist()) == set(range(30, 40))
    assert result.unchanged == pytest.approx(0.5)
    direct = metrics.per_class_accuracy(better, target) - metrics.per_class_accuracy(baseline, target)
    torch.testing.assert_close(result.delta, direct)


def test_confidence_and_calibration():
    proba = torch.tensor([[0.9, 0.1, 0.0], [0.65, 0.35, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]], dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(metrics.confidence(proba), torch.tensor([0.9, 0.65, 0.5, 0.5], dtype=torch.float64))
    summary = metrics.confidence_summary(proba, target)
    # Row 3 ties: the predicted class is the first maximum (class 0), a mistake.
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["mean_correct"] == pytest.approx(0.7)
    assert summary["mean_wrong"] == pytest.approx(0.575)
    assert summary["mean_true_class"] == pytest.approx((0.9 + 0.35 + 0.5 + 0.5) / 4)
    assert math.isnan(metrics.confidence_summary(proba[:1], target[:1])["mean_wrong"])
    bins = metrics.calibration_bins(proba, target, n_bins=10)
    # 0.9 -> bin 8, (0.8, 0.9]; 0.65 -> bin 6; 0.5 -> bin 4, (0.4, 0.5], twice.
    assert bins["count"].tolist() == [0, 0, 0, 0, 2, 0, 1, 0, 1, 0]
    assert bins["accuracy"][4] == 0.5 and bins["accuracy"][6] == 0.0 and bins["accuracy"][8] == 1.0
    assert torch.isnan(bins["accuracy"][0]) and torch.isnan(bins["confidence"][9])
    ece = metrics.expected_calibration_error(proba, target, n_bins=10)
    assert ece == pytest.approx((2 * 0.0 + 1 * 0.65 + 1 * 0.1) / 4)
    assert metrics.expected_calibration_error(proba, target, n_bins=10, norm="max") == pytest.approx(0.65)
    assert metrics.expected_calibration_error(proba, target, n_bins=10, norm="l2") == pytest.approx(
        math.sqrt((0.65**2 + 0.1**2) / 4)
    )
    zero = torch.tensor([[0.0, 0.0]])
    assert metrics.calibration_bins(zero, torch.tensor([0]), n_bins=4)["count"].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        metrics.expected_calibration_error(proba * 3, target)
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        metrics.calibration_bins(proba, target, n_bins=0)


def test_ece_of_calibrated_predictions_is_small():
    gen = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(20000, 10, generator=gen)
    proba = torch.softmax(logits, 1)
    target = torch.multinomial(proba, 1, generator=gen).squeeze(1)  # labels drawn from the model
    assert metrics.expected_calibration_error(proba, target) < 0.02
    sharpened = torch.softmax(3 * logits, 1)  # overconfident
    assert metrics.expected_calibration_error(sharpened, target) > 0.1


def small_tree():
    # 8 classes, level 1: {0..3}, {4..7}; level 2: {0,1}, {2,3}, {4,5}, {6,7}.
    return Hierarchy.from_assignments([torch.arange(8) // 4, torch.arange(8) // 2])


def lca_matrix():
    """Stand-in tree distance of small_tree(), written out by hand."""
    d = torch.full((8, 8), 3)
    for a in range(8):
        for b in range(8):
            if a // 4 == b // 4:
                d[a, b] = 2
            if a // 2 == b // 2:
                d[a, b] = 1
            if a == b:
                d[a, b] = 0
    return d


def test_mistake_severity_and_topk_distance():
    h = small_tree()
    matrix = lca_matrix()
    assert torch.equal(h.tree_distance(), matrix)
    scores = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 3, 2],  # target 0: correct
            [0.0, 9, 8, 0, 0, 0, 0, 7],  # target 0: top-1 = 1 (sibling, 1)
            [0.0, 0, 0, 0, 0, 0, 0, 9],  # target 2: top-1 = 7 (other half, 3); rest tied
            [1.0, 1, 1, 1, 1, 1, 1, 1],  # target 6: all tied, top-1 = 0 (3)
        ]
    )
    target = torch.tensor([0, 0, 2, 6])
    for distance in (h, matrix, lambda a, b: matrix[a, b], matrix.numpy()):
        assert metrics.mistake_severity(scores, target, distance) == pytest.approx((1 + 3 + 3) / 3)
        result = metrics.hierarchical_distance_topk(scores, target, distance, ks=(1, 2, 3))
        top = metrics.ranked_topk(scores, 3)
        assert top.tolist() == [[0, 1, 2], [1, 2, 7], [7, 0, 1], [0, 1, 2]]
        direct = matrix[top, target.unsqueeze(1)].double()
        assert result == pytest.approx({k: float(direct[:, :k].mean()) for k in (1, 2, 3)})
    assert math.isnan(metrics.mistake_severity(scores[:1], target[:1], h))
    with pytest.raises(ValueError, match="distance must be \\[N, N\\] = \\[8, 8\\]"):
        metrics.mistake_severity(scores, target, matrix[:4])
    with pytest.raises(TypeError, match="distance must be a Hierarchy"):
        metrics.mistake_severity(scores, target, "lca")
    with pytest.raises(ValueError, match="k = 9 exceeds the number of classes N = 8"):
        metrics.hierarchical_distance_topk(scores, target, h, ks=9)
    with pytest.raises(ValueError, match="the hierarchy has 8 classes but scores has 7 columns"):
        metrics.mistake_severity(scores[:, :7], target.clamp_max(6), h)


def test_ranked_topk_matches_a_stable_sort():
    gen = torch.Generator().manual_seed(6)
    scores = torch.randint(0, 4, (200, 23), generator=gen).float()  # many ties
    ranked = metrics.ranked_topk(scores, 7)
    stable = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(ranked, stable)


def test_reassignment_report_like_table2():
    h = small_tree()
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    with torch.no_grad():
        # Class 3 moves from group 0 to group 1 at level 1, class 5 from group 2 to 3 at level 2,
        # and class 6 loses its level-2 group altogether (its column becomes zero).
        top, second = loss_fn.psi
        top[:, 3] = torch.tensor([0.1, 0.9])
        second[:, 5] = torch.tensor([0.0, 0.0, 0.2, 0.8])
        second[:, 6] = 0.0
    names = [f"class{y}" for y in range(8)]
    report = metrics.reassignment_report(h, loss_fn, class_names=names)
    assert [entry.moved.tolist() for entry in report.levels] == [[3], [5, 6]]
    assert report.shares == [1 / 8, 2 / 8]
    assert report.levels[1].adapted[6] == -1
    assert report.levels[0].group(1) == {"stayed": [4, 5, 6, 7], "joined": [3], "left": []}
    assert report.levels[1].group(2) == {"stayed": [4], "joined": [], "left": [5]}
    assert report.levels[1].group(3) == {"stayed": [7], "joined": [5], "left": [6]}
    assert report.levels[1].changes_per_group().tolist() == [0, 0, 1, 2]
    text = report.to_text()
    assert "level 1: 1 of 8 classes moved (12.5%)" in text and "joined (1): class3" in text
    same = metrics.reassignment_report(h.assignments, h.psi())
    assert same.shares == [0.0, 0.0]
    with pytest.raises(ValueError, match="initial has 2 upper levels but adapted has 1"):
        metrics.reassignment_report(h, h.psi()[:1])
    with pytest.raises(ValueError, match="class_names has 3 names for 8 classes"):
        metrics.reassignment_report(h, h, class_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="initial must be a Hierarchy"):
        metrics.reassignment_report(torch.zeros(8), h)


def test_metrics_is_a_public_module():
    assert lmm_fast.metrics is metrics
    assert "topk_error" in metrics.__all__
