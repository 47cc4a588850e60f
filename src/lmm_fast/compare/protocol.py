"""``lmm-fast compare``: the LMM against the flat softmax, on speed and on real data.

Part 1, speed and memory: the fused loss (forward + backward), prediction
(top-5) and the adaptation step against PyTorch's own ops on the flat N-way
problem and against the unfused PyTorch reference of the mixture, for
N = 1 000, 10 000 and 100 000 classes; medians and ratios from one run, on
the CPU and on CUDA when present.

Part 2, accuracy: an MLP over fixed features trained with the flat softmax
and with the LMM variants of the paper's Table I (fixed hierarchy, with Ψ
adaptation, with adaptation and the non-overlapping constraint) and Table IV
(one-level LMM whose Ψ is the flat model's confusion matrix, two-level LMM),
over several seeds; top-k errors, per-class changes (Fig. 5), confidence,
calibration, mistake severity and the adaptation's reassignments. The
default data is ICD-10-CM (:mod:`lmm_fast.datasets`); ``--features`` and
``--labels`` take a user's own.

Everything printed is also written to ``--out`` (JSON, CSV, PNG).
docs/compare.md describes the protocol.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SPEED_CLASSES",
    "SETTINGS",
    "SETTING_LABELS",
    "Protocol",
    "QUICK",
    "FULL",
    "measure_time",
    "peak_extra_bytes",
    "speed_benchmark",
    "format_speed_table",
    "accuracy_benchmark",
    "summarize",
    "format_accuracy_tables",
    "write_outputs",
    "machine_description",
    "add_arguments",
    "run",
    "main",
]

SPEED_CLASSES = (1_000, 10_000, 100_000)
SPEED_UPPER_LEVELS = (10, 100)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(fn: Callable[[], Any], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls,
    synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak memory allocated by one call of ``fn`` above what was allocated
    before it (tensors it frees again included, its inputs not).

    CUDA reads the caching allocator's peak counter; the CPU has none, so the
    allocations and frees recorded by ``torch.profiler`` are replayed in order.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side logs its start and stop (and a failed GPU probe)
    # straight to file descriptor 2, which would garble the tables.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------
# Part 1: speed and memory
# ---------------------------------------------------------------------------


@dataclass
class SpeedCase:
    """One op at one size: our implementation and the baselines, as closures."""

    op: str
    impls: dict[str, Callable[[], Any]]


def _loss_case(batch: int, level_sizes: Sequence[int], device: str, gen: torch.Generator) -> SpeedCase:
    from lmm_fast.loss import FusedLMMLoss, default_theta
    from lmm_fast.reference import lmm_loss_unfused
    from lmm_fast.testing import tree_psi

    n = level_sizes[-1]
    psi = [p.to(device) for p in tree_psi(level_sizes, gen)]
    theta = default_theta(len(level_sizes)).to(device)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=n).to(device)
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device).requires_grad_()
    flat_logits = logits.detach()[:, -n:].clone().requires_grad_()
    target = torch.randint(0, n, (batch,), generator=gen).to(device)

    def fused():
        logits.grad = None
        loss_fn(logits, target).backward()

    def flat():
        flat_logits.grad = None
        F.cross_entropy(flat_logits, target).backward()

    def unfused():
        logits.grad = None
        lmm_loss_unfused(logits, target, psi, theta, reduction="mean").backward()

    return SpeedCase("loss fwd+bwd", {"ours": fused, "flat": flat, "unfused": unfused})


def _predict_case(batch: int, level_sizes: Sequence[int], device: str, gen: torch.Generator, k: int = 5) -> SpeedCase:
    from lmm_fast.loss import FusedLMMLoss, default_theta
    from lmm_fast.predict import predict_topk
    from lmm_fast.reference import predict_proba_reference
    from lmm_fast.testing import tree_psi

    n = level_sizes[-1]
    psi = [p.to(device) for p in tree_psi(level_sizes, gen)]
    theta = default_theta(len(level_sizes)).to(device)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=n).to(device)
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device)
    flat_logits = logits[:, -n:].contiguous()

    @torch.no_grad()
    def ours():
        predict_topk(logits, loss_fn, k)

    @torch.no_grad()
    def flat():
        torch.softmax(flat_logits, dim=1).topk(k, dim=1)

    @torch.no_grad()
    def unfused():
        predict_proba_reference(logits, psi, theta).topk(k, dim=1)

    return SpeedCase(f"predict top-{k}", {"ours": ours, "flat": flat, "unfused": unfused})


def _adapt_case(batch: int, level_sizes: Sequence[int], device: str, gen: torch.Generator) -> SpeedCase:
    from lmm_fast.adaptation import GibbsAdapter
    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.loss import FusedLMMLoss
    from lmm_fast.testing import tree_psi

    n = level_sizes[-1]
    upper = list(level_sizes[:-1])
    hierarchy = Hierarchy.from_assignments([p.argmax(0) for p in tree_psi(level_sizes, gen)])
    loss_fn = FusedLMMLoss.from_hierarchy(hierarchy).to(device)
    reference_loss = FusedLMMLoss.from_hierarchy(hierarchy).to(device)
    # A training set of 4 images per class; one batch of it is re-sampled.
    train_targets = torch.arange(n).repeat(4).to(device)
    adapter = GibbsAdapter(loss_fn, hierarchy, train_targets, seed=0)
    indices = torch.randperm(train_targets.numel(), generator=gen)[:batch].to(device)
    target = train_targets[indices]
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device)
    beta, beta0 = 1.0, float(n)
    labels = torch.stack([a.to(device) for a in hierarchy.assignments], dim=1)[train_targets]
    counts = [
        torch.bincount(labels[:, level] * n + train_targets, minlength=size * n).reshape(size, n)
        for level, size in enumerate(upper)
    ]
    rows = torch.arange(batch, device=device)
    torch_gen = torch.Generator(device=device).manual_seed(0)

    def ours():
        adapter.step(logits, target, indices)

    def unfused():
        # Eq. 4-6 as plain PyTorch: the batch's conditionals from dense counts,
        # then the counts and the whole of every Ψ^l recomputed.
        offset = 0
        for level, size in enumerate(upper):
            omega = counts[level]
            old = labels[indices, level]
            column = omega[:, target].t().double()
            totals = omega.sum(1).double().expand(batch, -1).clone()
            column[rows, old] -= 1
            totals[rows, old] -= 1
            log_w = torch.log_softmax(logits[:, offset : offset + size].double(), 1)
            log_w = log_w + (column + beta).log() - (totals + beta0).log()
            new = torch.multinomial(torch.softmax(log_w, 1), 1, generator=torch_gen).squeeze(1)
            omega.index_put_((old, target), torch.full_like(old, -1), accumulate=True)
            omega.index_put_((new, target), torch.ones_like(new), accumulate=True)
            labels[indices, level] = new
            psi = (omega + beta) / (omega.sum(1, keepdim=True) + beta0)
            reference_loss.psi[level].copy_(psi)
            offset += size

    return SpeedCase("adapt step (Gibbs)", {"ours": ours, "unfused": unfused})


def speed_benchmark(
    devices: Sequence[str] | None = None,
    class_counts: Sequence[int] = SPEED_CLASSES,
    batch: int | dict[str, int] = 1024,
    repeats: int = 5,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Median time and peak extra memory of every op, implementation and size.

    Args:
        devices: default ``["cpu"]`` plus ``"cuda"`` when available.
        class_counts: the N of the bottom level; the upper levels are
            ``SPEED_UPPER_LEVELS`` (10 and 100 groups).
        batch: rows per call, or a dict device type → rows.
        repeats: timed calls per measurement (after one warm-up call).
        progress: tqdm bar.

    Returns:
        one dict per (device, N, op, implementation) with ``median_ms``,
        ``times_ms``, ``peak_mib`` and ``ratio_to_ours`` (its median over ours).
    """
    from tqdm.auto import tqdm

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    builders: tuple[Callable[..., SpeedCase], ...] = (_loss_case, _predict_case, _adapt_case)
    rows: list[dict[str, Any]] = []
    jobs = [(d, n, b) for d in devices for n in class_counts for b in builders]
    with tqdm(jobs, desc="speed and memory", unit="case", disable=not progress, leave=False) as bar:
        for device, n, build in bar:
            rows_per_call = batch[torch.device(device).type] if isinstance(batch, dict) else batch
            sizes = [s for s in SPEED_UPPER_LEVELS if s < n] + [n]
            gen = torch.Generator().manual_seed(n)
            case = build(rows_per_call, sizes, device, gen)
            bar.set_postfix_str(f"{device} N={n} {case.op}")
            medians = {}
            for impl, fn in case.impls.items():
                peak = peak_extra_bytes(fn, device)
                times = measure_time(fn, device, repeats=repeats)
                medians[impl] = statistics.median(times)
                rows.append(
                    {
                        "device": device,
                        "op": case.op,
                        "impl": impl,
                        "num_classes": n,
                        "level_sizes": sizes,
                        "batch": rows_per_call,
                        "median_ms": 1e3 * medians[impl],
                        "times_ms": [1e3 * t for t in times],
                        "peak_mib": peak / 2**20,
                    }
                )
            for row in rows[-len(case.impls) :]:
                row["ratio_to_ours"] = medians[row["impl"]] / medians["ours"]
            del case
    return rows


def format_speed_table(rows: Sequence[dict[str, Any]]) -> str:
    """The speed rows as a fixed-width table, one line per (device, op, N)."""
    head = (
        f"{'device':<6} {'op':<19} {'N':>7} {'B':>5} | {'lmm_fast':>9} {'torch flat':>10} {'torch LMM':>10} "
        f"| {'flat/ours':>9} {'LMM/ours':>9} | {'MiB ours':>9} {'flat':>8} {'LMM':>8}"
    )
    lines = [head, "-" * len(head)]
    keys = []
    for row in rows:
        key = (row["device"], row["op"], row["num_classes"])
        if key not in keys:
            keys.append(key)
    for device, op, n in keys:
        group = {r["impl"]: r for r in rows if (r["device"], r["op"], r["num_classes"]) == (device, op, n)}

        def ms(impl):
            return f"{group[impl]['median_ms']:.2f}" if impl in group else "-"

        def ratio(impl):
            return f"{group[impl]['ratio_to_ours']:.2f}x" if impl in group else "-"

        def mib(impl):
            return f"{group[impl]['peak_mib']:.1f}" if impl in group else "-"

        batch = group["ours"]["batch"]
        lines.append(
            f"{device:<6} {op:<19} {n:>7} {batch:>5} | {ms('ours'):>9} {ms('flat'):>10} {ms('unfused'):>10} "
            f"| {ratio('flat'):>9} {ratio('unfused'):>9} | {mib('ours'):>9} {mib('flat'):>8} {mib('unfused'):>8}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Part 2: accuracy on real data
# ---------------------------------------------------------------------------

SETTINGS = ("flat", "lmm", "lmm_p", "lmm_p_tc", "lmm_1level", "lmm_2level")
SETTING_LABELS = {
    "flat": "flat softmax",
    "lmm": "LMM (fixed hierarchy)",
    "lmm_p": "LMM w/P",
    "lmm_p_tc": "LMM w/P,TC",
    "lmm_1level": "one-level LMM (confusion Ψ)",
    "lmm_2level": "two-level LMM",
}
TABLE_I = ("flat", "lmm", "lmm_p", "lmm_p_tc")
TABLE_IV = ("flat", "lmm_1level", "lmm_2level")
TOPK = (1, 2, 5, 10)


def _label(setting: str) -> str:
    """The printed name of a setting of :data:`SETTINGS` or of the remedies."""
    from lmm_fast.compare_remedies import REMEDY_LABELS

    return SETTING_LABELS.get(setting) or REMEDY_LABELS[setting]


@dataclass(frozen=True)
class Protocol:
    """How the networks are trained and compared (docs/compare.md).

    Attributes:
        epochs: epochs per run, the warm-up included.
        warmup_epochs: epochs with Ψ fixed before the adaptation starts
            (Algorithm 1; settings ``lmm_p`` and ``lmm_p_tc``).
        seeds: one run per seed and setting; a seed fixes the network's
            initialisation, the batch order and the sampler, the same for every
            setting, so that differences are paired.
        batch_size, lr, hidden: Adam on an MLP ``d → hidden → ReLU → head``.
        level_sizes: upper levels of the visual hierarchy of Table I; ``None``:
            ``[round(N^(1/3)), round(N^(2/3))]``.
        coarse_groups: the upper level of the two-level LMM; ``None``: ``round(√N)``.
        beta: the Dirichlet prior of the adaptation (the library's default).
        curve_rows: test rows scored after every epoch for the training curves.
        settings: which of :data:`SETTINGS` to run.
        remedies: also run the variants of :mod:`lmm_fast.compare_remedies`
            (docs/remedies.md) for every seed: about 5 more minutes on 2 CPU
            cores (quick protocol), hence off in the quick protocol, on in ``--full``.
    """

    epochs: int = 6
    warmup_epochs: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 256
    lr: float = 3e-3
    hidden: int = 512
    level_sizes: tuple[int, ...] | None = None
    coarse_groups: int | None = None
    beta: float = 1.0
    curve_rows: int = 2000
    settings: tuple[str, ...] = SETTINGS
    remedies: bool = False

    def resolved_levels(self, num_classes: int) -> list[int]:
        if self.level_sizes is not None:
            return list(self.level_sizes)
        top = max(2, round(num_classes ** (1 / 3)))
        middle = max(top + 1, round(num_classes ** (2 / 3)))
        return [s for s in (top, middle) if s < num_classes] or [max(1, num_classes // 2)]

    def resolved_coarse(self, num_classes: int) -> int:
        if self.coarse_groups is not None:
            return self.coarse_groups
        return min(num_classes - 1, max(2, round(math.sqrt(num_classes))))


QUICK = Protocol()
FULL = Protocol(epochs=15, warmup_epochs=3, seeds=(0, 1, 2, 3, 4), remedies=True)


class _Batches:
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


def _build_model(dim: int, hidden: int, hierarchy, seed: int, device: str) -> torch.nn.Sequential:
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


def _fit(
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
    model = _build_model(task.dim, protocol.hidden, hierarchy, seed, device)
    loss_fn = FusedLMMLoss.from_hierarchy(hierarchy).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=protocol.lr)
    loader = _Batches(x_train, y_train, protocol.batch_size, seed)
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


def _confusion_hierarchy(task, protocol: Protocol, hierarchy, device: str, on_epoch=None):
    """The one-level LMM's hierarchy: Ψ = the flat model's confusion matrix,
    counted on out-of-fold predictions of the training set (two folds, so
    that no prediction is of an image the model was trained on)."""
    from lmm_fast.datasets import split_per_class
    from lmm_fast.hierarchy import Hierarchy

    n = task.num_classes
    labels = task.labels[task.train_index]
    folds = split_per_class(labels.numpy(), 0.5, seed=0)
    confusion = torch.zeros(n, n, dtype=torch.float64)
    for fit_rows, held_rows in (folds, folds[::-1]):
        sub = _SubTask(task, task.train_index[torch.from_numpy(fit_rows)])
        run = _fit("flat", hierarchy, sub, protocol, 0, device, task.train_index[:1], on_epoch)
        held = task.train_index[torch.from_numpy(held_rows)]
        proba = _predict(run["model"], run["loss_fn"], True, task.features[held].to(device)).cpu()
        predicted = proba.argmax(1)
        confusion.index_put_((task.labels[held], predicted), torch.ones(held.numel(), dtype=torch.float64), accumulate=True)
    return Hierarchy.from_confusion(confusion, class_names=task.class_names), confusion


@dataclass
class _SubTask:
    """A task restricted to some training rows (the folds of the confusion)."""

    task: Any
    train_index: Tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def _evaluate(run: dict[str, Any], task, setting: str, hierarchy, semantic, device: str) -> dict[str, Any]:
    from lmm_fast import metrics
    from lmm_fast.compare_remedies import class_views, distance_views, tail_classes

    test_x = task.features[task.test_index].to(device)
    test_y = task.labels[task.test_index].to(device)
    proba = _predict(run["model"], run["loss_fn"], run["flat"], test_x)
    per_class = metrics.per_class_accuracy(proba, test_y).cpu()
    summary = metrics.confidence_summary(proba, test_y)
    result: dict[str, Any] = {
        "topk_error": {str(k): v for k, v in metrics.topk_error(proba, test_y, TOPK).items()},
        "per_class_accuracy": per_class,
        "confidence": summary["mean"],
        "confidence_correct": summary["mean_correct"],
        "confidence_wrong": summary["mean_wrong"],
        "ece": metrics.expected_calibration_error(proba, test_y),
        "severity": metrics.mistake_severity(proba, test_y, semantic) if semantic is not None else math.nan,
        "curve": run["curve"],
        "epoch_loss": list(run["history"].epoch_losses),
        "seconds": run["seconds"],
    }
    # Where a hierarchy should help, if anywhere: macro top-1, the error on
    # the 20 % of classes with the fewest training rows, and the tree
    # distance of the top-1 / top-5 over all rows (docs/remedies.md).
    result.update(class_views(per_class, tail_classes(task.labels[task.train_index], task.num_classes)))
    result.update(distance_views(proba, test_y, semantic))
    if setting in ("lmm_p", "lmm_p_tc"):
        report = metrics.reassignment_report(hierarchy, run["loss_fn"])
        result["reassigned"] = [int(level.moved.numel()) for level in report.levels]
        # A class counts as reassigned when it left its group at any level.
        moved = torch.zeros(task.num_classes, dtype=torch.bool)
        for level in report.levels:
            moved[level.moved] = True
        result["reassigned_classes"] = int(moved.sum())
    return result


def accuracy_benchmark(
    task,
    protocol: Protocol = QUICK,
    *,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains every setting of ``protocol`` for every seed on ``task`` and
    evaluates on its test split.

    Returns:
        ``{"runs": {setting: [per-seed result dict]}, "hierarchies": {...},
        "protocol": {...}}``; a result holds ``topk_error`` (``{"1": err, …}``),
        ``per_class_accuracy`` (float64 ``[N]``), ``confidence``, ``ece``,
        ``severity``, ``curve`` (test top-1 error after each epoch on
        ``protocol.curve_rows`` test rows), ``epoch_loss``, ``seconds`` and, for
        the adapted settings, ``reassigned`` (classes moved per level) and
        ``reassigned_classes``.
    """
    from tqdm.auto import tqdm

    from lmm_fast.hierarchy import Hierarchy

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = [s for s in protocol.settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose among {list(SETTINGS)}")
    if protocol.warmup_epochs > protocol.epochs:
        raise ValueError(f"warmup_epochs ({protocol.warmup_epochs}) exceeds epochs ({protocol.epochs})")
    n = task.num_classes
    x_train = task.features[task.train_index]
    y_train = task.labels[task.train_index]
    levels = protocol.resolved_levels(n)
    visual = Hierarchy.from_features(x_train, y_train, levels, seed=0, class_names=task.class_names)
    log(f"visual hierarchy (Table I): {visual.summary()}")
    hierarchies: dict[str, Any] = {s: visual for s in ("flat", "lmm", "lmm_p", "lmm_p_tc")}
    if "lmm_2level" in protocol.settings:
        coarse = protocol.resolved_coarse(n)
        hierarchies["lmm_2level"] = Hierarchy.from_features(
            x_train, y_train, [coarse], seed=0, class_names=task.class_names
        )
        log(f"two-level hierarchy (Table IV): {coarse} groups over {n} classes")
    # Mistake severity is measured in the data's own semantic tree when it has
    # one; otherwise in the visual hierarchy, which the LMM settings train on.
    if task.semantic_tree is not None:
        semantic = Hierarchy.from_assignments(task.semantic_tree, class_names=task.class_names)
        severity_tree = " → ".join(task.semantic_level_names or []) + " → classes (semantic)"
    else:
        semantic = visual
        severity_tree = "the visual hierarchy of Table I (the data has no semantic tree)"
    gen = torch.Generator().manual_seed(0)
    curve_index = task.test_index[torch.randperm(task.test_index.numel(), generator=gen)[: protocol.curve_rows]]

    runs_total = len(protocol.seeds) * len(protocol.settings) + (2 if "lmm_1level" in protocol.settings else 0)
    if protocol.remedies:
        # Curriculum, learned θ, gated θ, guarded w/P,TC, two calibration runs
        # (the few-shot runs are not counted: they are short).
        runs_total += 6 * len(protocol.seeds)
    bar = tqdm(total=runs_total * protocol.epochs, desc="training", unit="epoch", disable=not progress, leave=False)

    def on_epoch(epoch: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{label}, epoch {epoch + 1}, loss {loss:.3f}")

    confusion_info = None
    if "lmm_1level" in protocol.settings:
        label = "confusion of the flat model (2 folds)"
        hierarchies["lmm_1level"], confusion = _confusion_hierarchy(task, protocol, visual, device, on_epoch)
        off_diagonal = float(confusion.sum() - confusion.diagonal().sum()) / float(confusion.sum())
        confusion_info = {"out_of_fold_error": off_diagonal}
        message = (f"one-level hierarchy (Table IV): Ψ = confusion of out-of-fold flat predictions "
                   f"(their error {100 * off_diagonal:.2f}%)")
        if progress and log is print:
            bar.write(message)
        else:
            log(message)

    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in protocol.settings}
    if protocol.remedies:
        from lmm_fast import compare_remedies as remedies

        tail = remedies.tail_classes(y_train, n)
        runs.update({s: [] for s in remedies.REMEDY_SETTINGS if s != "lmm_path" or "lmm" in protocol.settings})
    try:
        for seed in protocol.seeds:
            for setting in protocol.settings:
                label = f"{setting} seed {seed}"
                hierarchy = hierarchies[setting]
                run = _fit(setting, hierarchy, task, protocol, seed, device, curve_index, on_epoch)
                result = _evaluate(run, task, setting, hierarchy, semantic, device)
                result["seed"] = seed
                runs[setting].append(result)
                if protocol.remedies and setting == "lmm":
                    # The paper's LMM, scored by the product of its levels.
                    path = remedies.path_score_result(run, task, hierarchy, semantic, tail, TOPK, device)
                    path["seed"] = seed
                    runs["lmm_path"].append(path)
                del run
            if protocol.remedies:
                label = f"remedies seed {seed}"
                for setting, result in remedies.remedy_runs(task, protocol, visual, semantic, seed, device,
                                                            TOPK, on_epoch).items():
                    result["seed"] = seed
                    runs[setting].append(result)
    finally:
        bar.close()
    return {
        "runs": runs,
        "hierarchies": {
            "visual_levels": levels,
            "coarse_groups": protocol.resolved_coarse(n) if "lmm_2level" in protocol.settings else None,
            "confusion": confusion_info,
            "severity_tree": severity_tree,
        },
        "protocol": _protocol_dict(protocol, n),
    }


def _protocol_dict(protocol: Protocol, num_classes: int) -> dict[str, Any]:
    from lmm_fast.loss import default_theta

    levels = protocol.resolved_levels(num_classes)
    return {
        "epochs": protocol.epochs,
        "warmup_epochs": protocol.warmup_epochs,
        "seeds": list(protocol.seeds),
        "batch_size": protocol.batch_size,
        "optimizer": f"Adam lr={protocol.lr:g}",
        "network": f"MLP d -> {protocol.hidden} -> ReLU -> LMMHead",
        "visual_levels": levels,
        "theta": [round(float(t), 6) for t in default_theta(len(levels) + 1)],
        "beta": protocol.beta,
        "settings": list(protocol.settings),
        "remedies": protocol.remedies,
    }


# ---------------------------------------------------------------------------
# Summaries, tables, files
# ---------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    clean = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not clean:
        return {"mean": math.nan, "std": math.nan, "n": 0, "values": list(values)}
    mean = statistics.fmean(clean)
    std = statistics.stdev(clean) if len(clean) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(clean), "values": [float(v) for v in values]}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Means ± standard deviations over seeds, paired differences to the flat
    softmax, and the per-class comparison (Fig. 5) of every setting.

    The per-class shares compare the per-class top-1 accuracy averaged over
    seeds; ``flat_vs_flat`` is the same comparison between the flat runs of
    two halves of the seeds, the share that noise alone moves. ``views``:
    the class and distance views and the verdict of
    :func:`lmm_fast.compare_remedies.remedy_summary`.
    """
    from lmm_fast import metrics

    runs = result["runs"]
    out: dict[str, Any] = {}
    flat = runs.get("flat")
    for setting, seeds in runs.items():
        entry: dict[str, Any] = {"label": _label(setting)}
        for k in TOPK:
            entry[f"top{k}_error"] = _mean_std([r["topk_error"][str(k)] for r in seeds])
        for key in ("confidence", "confidence_correct", "confidence_wrong", "ece", "severity", "seconds",
                    "macro_error", "tail_error", "hdist1", "hdist5"):
            entry[key] = _mean_std([r.get(key, math.nan) for r in seeds])
        if "reassigned_classes" in seeds[0]:
            entry["reassigned_classes"] = _mean_std([r["reassigned_classes"] for r in seeds])
            entry["reassigned_per_level"] = [
                _mean_std([r["reassigned"][level] for r in seeds]) for level in range(len(seeds[0]["reassigned"]))
            ]
        if flat is not None and setting != "flat":
            by_seed = {r["seed"]: r for r in flat}
            pairs = [(r, by_seed[r["seed"]]) for r in seeds if r["seed"] in by_seed]
            for k in TOPK:
                entry[f"delta_top{k}_vs_flat"] = _mean_std(
                    [r["topk_error"][str(k)] - f["topk_error"][str(k)] for r, f in pairs]
                )
            mean_flat = torch.stack([f["per_class_accuracy"] for _, f in pairs]).mean(0)
            mean_new = torch.stack([r["per_class_accuracy"] for r, _ in pairs]).mean(0)
            comparison = metrics.compare_per_class(mean_flat, mean_new)
            entry["per_class"] = comparison.as_dict()
            entry["per_class_delta"] = comparison.delta.tolist()
        out[setting] = entry
    from lmm_fast.compare_remedies import remedy_summary

    for setting, views in remedy_summary(runs).items():
        out[setting]["views"] = views
    if flat is not None and len(flat) >= 2:
        half = len(flat) // 2
        a = torch.stack([r["per_class_accuracy"] for r in flat[:half]]).mean(0)
        b = torch.stack([r["per_class_accuracy"] for r in flat[half : 2 * half]]).mean(0)
        out["flat_vs_flat"] = metrics.compare_per_class(a, b).as_dict()
    return out


def _pct(stat: dict[str, Any], digits: int = 2) -> str:
    if stat["n"] == 0:
        return "-"
    return f"{100 * stat['mean']:.{digits}f} ± {100 * stat['std']:.{digits}f}"


def _num(stat: dict[str, Any], digits: int = 2) -> str:
    if stat["n"] == 0:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_accuracy_tables(summary: dict[str, Any], task_line: str, seeds: int) -> str:
    """Table I, Table IV and the per-class / confidence / severity table as text."""
    lines = []

    def error_table(title: str, settings: Sequence[str]) -> None:
        present = [s for s in settings if s in summary]
        if not present:
            return
        lines.append(title)
        head = f"{'method':<30}" + "".join(f"{f'top-{k} error %':>18}" for k in TOPK) + f"{'Δ top-1 vs flat (pts)':>24}"
        lines.append(head)
        lines.append("-" * len(head))
        for setting in present:
            entry = summary[setting]
            delta = entry.get("delta_top1_vs_flat")
            delta_text = "" if delta is None else f"{100 * delta['mean']:+.2f} ± {100 * delta['std']:.2f}"
            lines.append(
                f"{entry['label']:<30}" + "".join(f"{_pct(entry[f'top{k}_error']):>18}" for k in TOPK) + f"{delta_text:>24}"
            )
        lines.append("")

    lines.append(f"{task_line}; mean ± std over {seeds} seed(s); Δ = paired difference to the flat run of the same seed")
    lines.append("")
    error_table("Table I shape: flat softmax vs LMM (test error, %)", TABLE_I)
    error_table("Table IV shape: flat softmax vs one-level and two-level LMM (test error, %)", TABLE_IV)
    present = [s for s in SETTINGS if s in summary]
    head = (
        f"{'method':<30}{'improved/unchanged/worse %':>28}{'confidence %':>16}{'ECE %':>14}"
        f"{'severity':>14}{'reassigned':>14}"
    )
    lines.append("Per-class change vs flat (Fig. 5: ±1 pt, seed-mean accuracy), confidence, calibration, "
                 "mistake severity (mean tree distance of top-1 mistakes), classes reassigned by the adaptation")
    lines.append(head)
    lines.append("-" * len(head))
    for setting in present:
        entry = summary[setting]
        shares = entry.get("per_class")
        share_text = "-" if shares is None else (
            f"{100 * shares['improved']:.0f} / {100 * shares['unchanged']:.0f} / {100 * shares['worse']:.0f}"
        )
        reassigned = entry.get("reassigned_classes")
        lines.append(
            f"{entry['label']:<30}{share_text:>28}{_pct(entry['confidence'], 1):>16}{_pct(entry['ece'], 2):>14}"
            f"{_num(entry['severity'], 3):>14}{'-' if reassigned is None else _num(reassigned, 0):>14}"
        )
    if "flat_vs_flat" in summary:
        shares = summary["flat_vs_flat"]
        share_text = f"{100 * shares['improved']:.0f} / {100 * shares['unchanged']:.0f} / {100 * shares['worse']:.0f}"
        lines.append(f"{'flat vs flat (seed halves)':<30}{share_text:>28}   <- what noise alone moves")
    return "\n".join(lines)


def _plot_per_class(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [s for s in SETTINGS if s in summary and "per_class_delta" in summary[s]]
    columns = min(3, max(1, len(present)))
    rows = max(1, math.ceil(len(present) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(present) :]:
        ax.axis("off")
    for ax, setting in zip(axes.flat, present):
        delta = torch.tensor(summary[setting]["per_class_delta"], dtype=torch.float64)
        delta = 100 * delta[~torch.isnan(delta)].sort(descending=True).values
        colors = ["tab:green" if d > 1 else ("tab:red" if d < -1 else "tab:gray") for d in delta.tolist()]
        ax.bar(range(delta.numel()), delta.numpy(), width=1.0, color=colors)
        shares = summary[setting]["per_class"]
        ax.set_title(
            f"{SETTING_LABELS[setting]}\n+{100 * shares['improved']:.0f}% / ={100 * shares['unchanged']:.0f}% / "
            f"-{100 * shares['worse']:.0f}% of classes",
            fontsize=9,
        )
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("classes, sorted")
    for row in axes:
        row[0].set_ylabel("top-1 accuracy change (pts)")
    fig.suptitle("Per-class accuracy change vs the flat softmax (Fig. 5 shape; mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for setting, seeds in result["runs"].items():
        for ax, key, scale in ((ax_loss, "epoch_loss", 1.0), (ax_err, "curve", 100.0)):
            values = torch.tensor([r[key] for r in seeds], dtype=torch.float64) * scale
            if values.numel() == 0 or values.shape[1] == 0:
                continue
            epochs = torch.arange(1, values.shape[1] + 1)
            mean = values.mean(0)
            ax.plot(epochs, mean, marker=".", label=_label(setting))
            if values.shape[0] > 1:
                std = values.std(0)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    warmup = result["protocol"]["warmup_epochs"]
    for ax in (ax_loss, ax_err):
        ax.axvline(warmup + 0.5, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean over the epoch)")
    ax_loss.set_yscale("log")
    ax_err.set_ylabel("test top-1 error % (curve subsample)")
    ax_err.set_yscale("log")
    ax_err.legend(fontsize=8)
    fig.suptitle("Training curves (mean ± std over seeds; dotted: end of the Ψ-fixed warm-up)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(
    out_dir: str,
    meta: dict[str, Any],
    speed_rows: Sequence[dict[str, Any]] | None,
    accuracy: dict[str, Any] | None,
    summary: dict[str, Any] | None,
    class_names: Sequence[str] | None = None,
    plots: bool = True,
) -> list[str]:
    """Writes ``results.json`` (everything), ``speed.csv``, ``accuracy.csv``,
    ``per_class.csv`` and the PNG plots into ``out_dir``; returns the paths."""
    import csv
    import json

    os.makedirs(out_dir, exist_ok=True)
    written = []
    runs = None
    if accuracy is not None:
        runs = {
            setting: [{k: v for k, v in r.items() if k != "per_class_accuracy"} for r in seeds]
            for setting, seeds in accuracy["runs"].items()
        }
    document = {
        "meta": meta,
        "speed": list(speed_rows) if speed_rows is not None else None,
        "accuracy": None if accuracy is None else {
            "protocol": accuracy["protocol"],
            "hierarchies": accuracy["hierarchies"],
            "summary": {s: {k: v for k, v in e.items() if k != "per_class_delta"} if isinstance(e, dict) else e
                        for s, e in (summary or {}).items()},
            "runs": runs,
        },
    }
    path = os.path.join(out_dir, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(document), f, indent=1, allow_nan=False)
    written.append(path)
    if speed_rows:
        path = os.path.join(out_dir, "speed.csv")
        fields = ["device", "op", "impl", "num_classes", "batch", "median_ms", "ratio_to_ours", "peak_mib"]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(speed_rows)
        written.append(path)
    if accuracy is not None and summary is not None:
        path = os.path.join(out_dir, "accuracy.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["setting", "label", "metric", "mean", "std", "n_seeds", "per_seed"])
            for setting, entry in summary.items():
                if setting == "flat_vs_flat":
                    for key, value in entry.items():
                        writer.writerow([setting, "flat vs flat (seed halves)", f"per_class_{key}", value, "", "", ""])
                    continue
                for key, value in entry.items():
                    if isinstance(value, dict) and "mean" in value:
                        writer.writerow([setting, entry["label"], key, value["mean"], value["std"], value["n"],
                                         " ".join(f"{v:.6g}" for v in value["values"])])
                    elif key == "per_class":
                        for share, v in value.items():
                            writer.writerow([setting, entry["label"], f"per_class_{share}", v, "", "", ""])
        written.append(path)
        path = os.path.join(out_dir, "per_class.csv")
        settings = list(accuracy["runs"])
        means = {s: torch.stack([r["per_class_accuracy"] for r in accuracy["runs"][s]]).mean(0) for s in settings}
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "name"] + [f"top1_accuracy_{s}" for s in settings])
            for c in range(len(next(iter(means.values())))):
                name = class_names[c] if class_names is not None else str(c)
                writer.writerow([c, name] + [f"{float(means[s][c]):.6g}" for s in settings])
        written.append(path)
        if plots:
            try:
                path = os.path.join(out_dir, "per_class_change.png")
                _plot_per_class(summary, path)
                written.append(path)
                path = os.path.join(out_dir, "training_curves.png")
                _plot_curves(accuracy, path)
                written.append(path)
            except ImportError:
                print("matplotlib is not installed: no plots (pip install 'lmm_fast[plot]')", file=sys.stderr)
    return written


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    """CPU, cores, memory, GPU and versions, for the record of a run."""
    import datetime
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    memory = f"{int(line.split()[1]) / 2**20:.0f} GiB"
                    break
    except OSError:
        pass
    import lmm_fast

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": memory,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lmm_fast": lmm_fast.__version__,
        "kernels": lmm_fast.build_info()["backends"],
        "platform": platform.platform(),
    }


def _fit_threads_to_load() -> str:
    """Fewer torch threads when other processes already occupy the cores.

    OpenMP threads that wait for a descheduled sibling spin: on a 2-core
    machine running other work, 2 threads were measured 4x slower than 1, for
    PyTorch's own ops and ours alike. Returns a note for the output, or "".
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    cores = os.cpu_count() or 1
    current = torch.get_num_threads()
    free = max(1, int(cores - load + 0.5))
    if free >= current:
        return ""
    torch.set_num_threads(free)
    return (f"note: the machine is busy (load {load:.1f} on {cores} cores): using {free} torch thread(s) "
            f"instead of {current}; --threads N overrides")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _settings_list(text: str) -> list[str]:
    values = [v for v in text.replace(" ", "").split(",") if v]
    unknown = [v for v in values if v not in SETTINGS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"settings must be among {','.join(SETTINGS)}, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``lmm-fast compare`` (also ``python -m benchmarks.compare``)."""
    data = parser.add_argument_group("data (default: the ICD-10-CM task, needs the demo extra)")
    data.add_argument("--features", metavar="X", help="your own features: [M, d] in .npy, .npz or .pt")
    data.add_argument("--labels", metavar="Y",
                      help="your own labels: [M] integers or strings in .npy, .npz or .pt (may be omitted when "
                           "the --features .npz/.pt holds them under 'labels' or 'y')")
    data.add_argument("--test-fraction", type=float, default=0.3, help="share of each class held out (default 0.3)")
    data.add_argument("--min-per-class", "--min-codes", type=int, dest="min_per_class",
                      help="keep classes with at least this many rows (default: 8 codes per ICD category; "
                           "2 samples for your data)")
    data.add_argument("--include-extensions", action="store_true",
                      help="ICD: also use the 7th-character codes (more, near-duplicate descriptions)")
    proto = parser.add_argument_group("protocol (default: the quick protocol; --full the longer one)")
    proto.add_argument("--full", action="store_true",
                       help=f"the longer protocol: {FULL.epochs} epochs, {len(FULL.seeds)} seeds "
                            f"(quick: {QUICK.epochs} epochs, {len(QUICK.seeds)} seeds)")
    proto.add_argument("--seeds", type=int, metavar="S", help="number of seeds (0, 1, …, S-1)")
    proto.add_argument("--epochs", type=int, help="epochs per run, the warm-up included")
    proto.add_argument("--warmup-epochs", type=int, help="epochs with Ψ fixed before the adaptation")
    proto.add_argument("--lr", type=float, help=f"Adam learning rate (default {QUICK.lr:g})")
    proto.add_argument("--batch-size", type=int, help=f"default {QUICK.batch_size}")
    proto.add_argument("--hidden", type=int, help=f"hidden units of the MLP (default {QUICK.hidden})")
    proto.add_argument("--levels", type=_int_list, metavar="N1,N2",
                       help="groups per upper level of the visual hierarchy (default: N^(1/3), N^(2/3))")
    proto.add_argument("--coarse-groups", type=int, help="groups of the two-level LMM (default: √N)")
    proto.add_argument("--settings", type=_settings_list, metavar="LIST",
                       help=f"comma-separated subset of {','.join(SETTINGS)}")
    proto.add_argument("--remedies", action="store_true",
                       help="also run the remedies of docs/remedies.md (θ curriculum, learned and gated θ, "
                            "calibrated and path-score prediction, guarded adaptation, few-shot): about 5 more "
                            "minutes on 2 CPU cores; on in --full")
    proto.add_argument("--device", help="where to train (default: cuda when present, else cpu)")
    speed = parser.add_argument_group("speed and memory table")
    speed.add_argument("--speed-classes", type=_int_list, default=list(SPEED_CLASSES), metavar="N,…",
                       help="class counts (default 1000,10000,100000)")
    speed.add_argument("--speed-batch", type=int,
                       help="rows per call (default 512 on the CPU, 2048 with --full; 4096 on CUDA)")
    speed.add_argument("--speed-repeats", type=int, help="timed calls per median (default 3; --full 10)")
    what = parser.add_argument_group("what to run and where to write")
    what.add_argument("--skip-speed", action="store_true", help="no speed and memory table")
    what.add_argument("--skip-accuracy", action="store_true", help="no training (speed table only)")
    what.add_argument("--out", default=os.path.join("runs", "compare"),
                      help="folder for results.json, the CSV files and the PNG plots (default runs/compare)")
    what.add_argument("--no-plots", action="store_true", help="write no PNG")
    what.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    what.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _protocol_from_args(args: argparse.Namespace) -> Protocol:
    base = FULL if args.full else QUICK
    changes: dict[str, Any] = {}
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        changes["seeds"] = tuple(range(args.seeds))
    for name in ("epochs", "warmup_epochs", "lr", "batch_size", "hidden", "coarse_groups"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.levels is not None:
        changes["level_sizes"] = tuple(args.levels)
    if args.settings is not None:
        changes["settings"] = tuple(s for s in SETTINGS if s in args.settings)
    if getattr(args, "remedies", False):
        changes["remedies"] = True
    protocol = dataclasses.replace(base, **changes)
    if protocol.epochs < 1 or protocol.batch_size < 1 or protocol.hidden < 1 or not protocol.lr > 0:
        raise ValueError("--epochs, --batch-size and --hidden must be >= 1 and --lr > 0")
    if protocol.warmup_epochs < 0 or protocol.warmup_epochs > protocol.epochs:
        raise ValueError(f"--warmup-epochs must be in [0, epochs = {protocol.epochs}], got {protocol.warmup_epochs}")
    return protocol


def _load_task(args: argparse.Namespace, progress: bool):
    from lmm_fast import datasets

    if args.features is not None:
        return datasets.load_user_task(
            args.features, args.labels, test_fraction=args.test_fraction,
            min_per_class=args.min_per_class or 2,
        )
    if args.labels is not None:
        raise ValueError("--labels needs --features")
    return datasets.load_icd10cm_task(
        min_codes=args.min_per_class or 8, test_fraction=args.test_fraction,
        include_extensions=args.include_extensions, progress=progress,
    )


def _command_line(args: argparse.Namespace) -> str:
    """The options of ``args`` that differ from the defaults, as a command."""
    parser = add_arguments(argparse.ArgumentParser(add_help=False))
    words = ["lmm-fast", "compare"]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    """Runs ``lmm-fast compare`` with parsed ``args``; returns the exit code."""
    # Bars only for a person watching, not into a log file (as the rest of the CLI).
    progress = not args.no_progress and sys.stderr.isatty()
    thread_note = ""
    if args.threads is not None:
        if args.threads < 1:
            print(f"lmm-fast compare: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    else:
        thread_note = _fit_threads_to_load()
    try:
        protocol = _protocol_from_args(args)
    except ValueError as exc:
        print(f"lmm-fast compare: error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    meta = machine_description()
    meta["command"] = _command_line(args)
    meta["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if thread_note:
        meta["threads_note"] = thread_note
    print(f"lmm-fast compare — {meta['date']}")
    print(f"machine: {meta['cpu']}, {meta['cores']} cores ({meta['torch_threads']} torch threads), "
          f"{meta['memory']}, GPU: {meta['gpu'] or 'none'}; torch {meta['torch']}, lmm_fast {meta['lmm_fast']} "
          f"({meta['kernels']} kernels)")
    if thread_note:
        print(thread_note)
    speed_rows = None
    if not args.skip_speed:
        # The plain-PyTorch LMM at N = 100 000 takes seconds a call on a CPU:
        # the quick protocol keeps its batch and repeats small.
        batch = {"cpu": args.speed_batch or (2048 if args.full else 512), "cuda": args.speed_batch or 4096}
        repeats = args.speed_repeats or (10 if args.full else 3)
        t0 = time.perf_counter()
        speed_rows = speed_benchmark(class_counts=args.speed_classes, batch=batch, repeats=repeats, progress=progress)
        print()
        print(f"Speed and memory: median of {repeats} calls, upper levels {list(SPEED_UPPER_LEVELS)} + N classes, "
              f"float32; 'torch flat' = F.cross_entropy / softmax+topk on the N class logits, 'torch LMM' = the "
              f"same mixture in plain PyTorch (lmm_fast.reference); ratios > 1: we are faster; MiB = peak extra "
              f"memory of one call ({time.perf_counter() - t0:.0f} s)")
        print(format_speed_table(speed_rows))
    accuracy = summary = None
    task = None
    if not args.skip_accuracy:
        try:
            task = _load_task(args, progress)
        except (ImportError, ValueError, FileNotFoundError) as exc:
            print(f"lmm-fast compare: error: {exc}", file=sys.stderr)
            return 2
        meta["task"] = {"summary": task.summary(), **task.info}
        print()
        print(f"data: {task.summary()}")
        accuracy = accuracy_benchmark(task, protocol, device=args.device, progress=progress)
        summary = summarize(accuracy)
        print()
        line = f"{task.name}: {task.num_classes} classes, {task.train_index.numel()} train / {task.test_index.numel()} test rows"
        print(format_accuracy_tables(summary, line, len(protocol.seeds)))
        p = accuracy["protocol"]
        print(f"severity: height of the lowest common ancestor of the true and the predicted class in "
              f"{accuracy['hierarchies']['severity_tree']}")
        print(f"\nprotocol: {p['network']}, {p['optimizer']}, batch {p['batch_size']}, {p['epochs']} epochs "
              f"({p['warmup_epochs']} with Ψ fixed before adapting), θ = {p['theta']}, β = {p['beta']}, "
              f"seeds {p['seeds']}")
        from lmm_fast.compare_remedies import REMEDY_SETTINGS, format_remedy_tables

        views = {s: e["views"] for s, e in summary.items() if isinstance(e, dict) and "views" in e}
        print()
        print(format_remedy_tables(views, {s: _label(s) for s in views}, list(SETTINGS) + list(REMEDY_SETTINGS),
                                   len(protocol.seeds)))
    meta["seconds"] = time.perf_counter() - started
    written = write_outputs(
        args.out, meta, speed_rows, accuracy, summary,
        class_names=None if task is None else task.class_names, plots=not args.no_plots,
    )
    print(f"\nwrote {', '.join(written)} ({meta['seconds'] / 60:.1f} min in all)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmm_fast.compare`` / ``python -m benchmarks.compare``."""
    parser = argparse.ArgumentParser(
        prog="lmm-fast compare",
        description="The LMM against the flat softmax: speed and memory of the fused ops, then accuracy on "
                    "real data (ICD-10-CM by default, or --features/--labels), over several seeds.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
