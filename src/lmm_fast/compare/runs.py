"""The building blocks of one run of ``lmm-fast compare``: mini-batches,
the model, one training run under a setting (:func:`fit_run`), and the
metrics of its test predictions (:func:`evaluate`, :func:`evaluate_proba`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lmm_fast.compare.protocol import Protocol

TAIL_SHARE = 0.2
TOPK = (1, 2, 5, 10)


class Batches:
    """Shuffled mini-batches ``(x, y, index)`` of a feature table, re-iterable;
    the order comes from the seeded generator, advancing each epoch."""

    def __init__(self, features: Tensor, labels: Tensor, batch_size: int, seed: int) -> None:
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (self.labels.numel() + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.labels.numel(), generator=self.generator).to(self.labels.device)
        for start in range(0, order.numel(), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.features[index], self.labels[index], index


def build_model(dim: int, hidden: int, hierarchy, seed: int, device: str) -> torch.nn.Sequential:
    from lmm_fast.head import LMMHead

    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU())
    return torch.nn.Sequential(backbone, LMMHead(hidden, hierarchy)).to(device)


@torch.no_grad()
def _predict(model: torch.nn.Sequential, loss_fn, flat: bool, features: Tensor, chunk: int = 8192) -> Tensor:
    """``[M, N]`` float32 class probabilities."""
    backbone, head = model[0], model[1]
    out = []
    for start in range(0, features.shape[0], chunk):
        hidden = backbone(features[start : start + chunk])
        if flat:
            out.append(torch.softmax(head(hidden)[:, -head.num_classes :], dim=1))
        else:
            out.append(head.predict_proba(hidden, loss_fn))
    return torch.cat(out).float()


def fit_run(
    setting: str,
    hierarchy,
    task,
    protocol: Protocol,
    seed: int,
    device: str,
    curve_index: Tensor,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """One training run; returns the model, loss, history and the test-error curve."""
    from lmm_fast.loss import FusedLMMLoss
    from lmm_fast.train import fit_lmm

    x_train = task.features[task.train_index].to(device)
    y_train = task.labels[task.train_index].to(device)
    x_curve = task.features[curve_index].to(device)
    y_curve = task.labels[curve_index].to(device)
    model = build_model(task.dim, protocol.hidden, hierarchy, seed, device)
    loss_fn = FusedLMMLoss.from_hierarchy(hierarchy).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=protocol.lr)
    loader = Batches(x_train, y_train, protocol.batch_size, seed)
    steps_per_epoch = len(loader)
    fit_setting = setting if setting in ("flat", "lmm", "lmm_p", "lmm_p_tc") else "lmm"
    curve: list[float] = []

    def on_step(info: dict[str, Any]) -> None:
        if info["step"] % steps_per_epoch:
            return
        proba = _predict(model, loss_fn, fit_setting == "flat", x_curve)
        curve.append(float((proba.argmax(1) != y_curve).float().mean()))
        if on_epoch is not None:
            on_epoch(info["epoch"], info["loss"])

    start = time.perf_counter()
    history = fit_lmm(
        model,
        loader,
        optimizer=optimizer,
        epochs=protocol.epochs,
        setting=fit_setting,
        loss_fn=loss_fn,
        warmup_epochs=protocol.warmup_epochs,
        hierarchy=hierarchy,
        train_targets=y_train,
        beta=protocol.beta,
        seed=seed,
        on_step=on_step,
    )
    return {
        "model": model,
        "loss_fn": loss_fn,
        "history": history,
        "curve": curve,
        "seconds": time.perf_counter() - start,
        "flat": fit_setting == "flat",
    }


def confusion_hierarchy(task, protocol: Protocol, hierarchy, device: str, on_epoch=None):
    """The one-level LMM's hierarchy: Ψ = the flat model's confusion matrix,
    counted on out-of-fold predictions of the training set (two folds, so
    that no prediction is of an image the model was trained on)."""
    from lmm_fast.compare.datasets import split_per_class
    from lmm_fast.hierarchy import Hierarchy

    n = task.num_classes
    labels = task.labels[task.train_index]
    folds = split_per_class(labels.numpy(), 0.5, seed=0)
    confusion = torch.zeros(n, n, dtype=torch.float64)
    for fit_rows, held_rows in (folds, folds[::-1]):
        sub = SubTask(task, task.train_index[torch.from_numpy(fit_rows)])
        run = fit_run("flat", hierarchy, sub, protocol, 0, device, task.train_index[:1], on_epoch)
        held = task.train_index[torch.from_numpy(held_rows)]
        proba = _predict(run["model"], run["loss_fn"], True, task.features[held].to(device)).cpu()
        predicted = proba.argmax(1)
        confusion.index_put_((task.labels[held], predicted), torch.ones(held.numel(), dtype=torch.float64), accumulate=True)
    return Hierarchy.from_confusion(confusion, class_names=task.class_names), confusion


@dataclass
class SubTask:
    """A task restricted to some training rows (the folds of the confusion)."""

    task: Any
    train_index: Tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def test_proba(run: dict[str, Any], task, device: str) -> Tensor:
    """``[M, N]`` float32 class probabilities of the test rows under a run of :func:`fit_run`."""
    return _predict(run["model"], run["loss_fn"], run["flat"], task.features[task.test_index].to(device))


def evaluate(run: dict[str, Any], task, setting: str, hierarchy, semantic, device: str) -> dict[str, Any]:
    """The test metrics of one run of :func:`fit_run`."""
    from lmm_fast import metrics

    test_x = task.features[task.test_index].to(device)
    test_y = task.labels[task.test_index].to(device)
    proba = _predict(run["model"], run["loss_fn"], run["flat"], test_x)
    # Where a hierarchy should help, if anywhere: macro top-1, the error on
    # the 20 % of classes with the fewest training rows, and the tree
    # distance of the top-1 / top-5 over all rows (docs/remedies.md).
    tail = tail_classes(task.labels[task.train_index], task.num_classes)
    result = evaluate_proba(proba, test_y, semantic, tail, TOPK)
    result.update(curve=run["curve"], epoch_loss=list(run["history"].epoch_losses), seconds=run["seconds"])
    if setting in ("lmm_p", "lmm_p_tc"):
        report = metrics.reassignment_report(hierarchy, run["loss_fn"])
        result["reassigned"] = [int(level.moved.numel()) for level in report.levels]
        # A class counts as reassigned when it left its group at any level.
        moved = torch.zeros(task.num_classes, dtype=torch.bool)
        for level in report.levels:
            moved[level.moved] = True
        result["reassigned_classes"] = int(moved.sum())
    return result


def tail_classes(train_labels: Tensor, num_classes: int, share: float = TAIL_SHARE) -> Tensor:
    """bool ``[N]``: the ``ceil(share · N)`` classes with the fewest training
    rows (ties broken by class index, so the set is fixed by the split)."""
    counts = torch.bincount(train_labels.long().cpu(), minlength=num_classes)
    order = torch.sort(counts, stable=True).indices
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[order[: max(1, math.ceil(share * num_classes))]] = True
    return mask


def class_views(per_class_accuracy: Tensor, tail: Tensor) -> dict[str, float]:
    """Macro top-1 error (mean over classes of the per-class error, classes
    with no test row left out) and tail-class error (the same over the
    ``tail`` classes)."""
    acc = per_class_accuracy.double()
    valid = ~torch.isnan(acc)
    macro = 1.0 - float(acc[valid].mean())
    tail_valid = valid & tail.to(valid.device)
    tail_error = 1.0 - float(acc[tail_valid].mean()) if bool(tail_valid.any()) else math.nan
    return {"macro_error": macro, "tail_error": tail_error}


def distance_views(proba: Tensor, test_y: Tensor, semantic) -> dict[str, float]:
    """Average hierarchical distance of the top-1 and of the top-5 over *all*
    test rows (a correct class counts 0; "Making Better Mistakes"), in the
    tree ``semantic``. Unlike the mistake severity (the mean over the
    mistakes only) it does not improve by making more, milder mistakes."""
    from lmm_fast import metrics

    if semantic is None:
        return {"hdist1": math.nan, "hdist5": math.nan}
    dist = metrics.hierarchical_distance_topk(proba, test_y, semantic, ks=(1, min(5, proba.shape[1])))
    return {"hdist1": dist[1], "hdist5": dist[min(5, proba.shape[1])]}


def evaluate_proba(proba: Tensor, test_y: Tensor, semantic, tail: Tensor, topk: Sequence[int]) -> dict[str, Any]:
    """The metrics of :func:`lmm_fast.compare.evaluate` from test probabilities ``[M, N]``."""
    from lmm_fast import metrics

    summary = metrics.confidence_summary(proba, test_y)
    per_class = metrics.per_class_accuracy(proba, test_y).cpu()
    result = {
        "topk_error": {str(k): v for k, v in metrics.topk_error(proba, test_y, tuple(topk)).items()},
        "per_class_accuracy": per_class,
        "confidence": summary["mean"],
        "confidence_correct": summary["mean_correct"],
        "confidence_wrong": summary["mean_wrong"],
        "ece": metrics.expected_calibration_error(proba, test_y),
        "severity": metrics.mistake_severity(proba, test_y, semantic) if semantic is not None else math.nan,
        "curve": [],
        "epoch_loss": [],
        "seconds": 0.0,
    }
    result.update(class_views(per_class, tail))
    result.update(distance_views(proba, test_y, semantic))
    return result


def spread_note(seeds: int) -> str:
    """How the cells read: ``mean ± std over S seeds``, or single values for one seed."""
    if seeds < 2:
        return "1 seed: single values, no spread (mean ± std and the verdicts need --seeds 2 or more)"
    return f"mean ± std over {seeds} seeds"
