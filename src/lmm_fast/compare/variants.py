"""The remedies (:mod:`lmm_fast.theta`, :mod:`lmm_fast.calibration`, the path score of
:mod:`lmm_fast.predict`, :mod:`lmm_fast.adaptation.guard`) in ``lmm-fast compare --remedies``.

Runs, for one training seed, the variants of docs/remedies.md beside the flat
softmax and the paper's LMM of :mod:`lmm_fast.compare` (same split, same seed,
same network, optimiser and epochs), evaluates them on the same test set, and
formats the remedy tables and the verdict. The class views (macro top-1 and
tail-class error) are computed for every setting of the main job.

Nothing here is tuned on the test set: the calibration (temperature and
test-time θ) is fit on a held-out slice of the training split, and every
hyper-parameter of the remedies is the library default, fixed before the
first run.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from lmm_fast.compare.runs import TAIL_SHARE, evaluate_proba, tail_classes

__all__ = [
    "REMEDY_SETTINGS",
    "REMEDY_LABELS",
    "FEWSHOT_SETTINGS",
    "path_score_result",
    "remedy_runs",
    "remedy_summary",
    "format_remedy_tables",
]

# Variants trained on the whole training split, paired with flat by seed.
TRAINED = ("lmm_curriculum", "lmm_learned_theta", "lmm_gated", "lmm_p_tc_guarded")
# Prediction variants: the paper's LMM run, scored differently.
PREDICTION = ("lmm_path",)
# Calibrated prediction: models trained on the training split minus a held-out
# slice, calibrated on that slice (the flat one for a fair comparison).
CALIBRATED = ("flat_cal_t", "lmm_cal_t", "lmm_cal_theta")
FEWSHOT_SETTINGS = ("fewshot_flat", "fewshot_lmm")
REMEDY_SETTINGS = TRAINED + PREDICTION + CALIBRATED + FEWSHOT_SETTINGS
REMEDY_LABELS = {
    "lmm_curriculum": "LMM + θ curriculum",
    "lmm_learned_theta": "LMM + learned θ",
    "lmm_gated": "LMM + gated θ(x)",
    "lmm_p_tc_guarded": "LMM w/P,TC guard+β scaled",
    "lmm_path": "LMM, path-score predict",
    "flat_cal_t": "flat + temperature*",
    "lmm_cal_t": "LMM + temperature*",
    "lmm_cal_theta": "LMM + test-time θ*",
    "fewshot_flat": "few-shot flat",
    "fewshot_lmm": "few-shot LMM",
}
CALIBRATION_FRACTION = 0.1
FEWSHOT_K = 4
GUARD_SHARE = 0.25


@torch.no_grad()
def _logits(model, features: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(backbone features ``[M, h]``, packed logits ``[M, ΣN_l]``)."""
    hidden, logits = [], []
    for start in range(0, features.shape[0], chunk):
        h = model[0](features[start : start + chunk])
        hidden.append(h)
        logits.append(model[1](h))
    return torch.cat(hidden), torch.cat(logits)


@torch.no_grad()
def path_score_result(run: dict[str, Any], task, hierarchy, semantic, tail: Tensor, topk, device: str) -> dict[str, Any]:
    """The paper's LMM run (``run`` of ``compare.fit_run``) scored by the product
    of levels (:func:`lmm_fast.predict.path_score_proba`) instead of the mixture."""
    from lmm_fast.predict import path_score_proba

    test_x = task.features[task.test_index].to(device)
    test_y = task.labels[task.test_index].to(device)
    _, logits = _logits(run["model"], test_x)
    proba = path_score_proba(logits, [a.to(device) for a in hierarchy.assignments], run["loss_fn"].level_sizes)
    return evaluate_proba(proba, test_y, semantic, tail, topk)


def _train_loop(model, loss_fn, params, task_rows: Tensor, task, protocol, seed: int, device: str,
                schedule=None, gate=None, epochs: int | None = None, on_epoch=None, flat: bool = False):
    """Adam on ``params`` over the rows ``task_rows`` of the task, by
    :func:`lmm_fast.train.fit_lmm` (setting ``"flat"`` or ``"lmm"``)."""
    from lmm_fast.compare.runs import Batches
    from lmm_fast.train import fit_lmm

    x = task.features[task_rows].to(device)
    y = task.labels[task_rows].to(device)
    loader = Batches(x, y, protocol.batch_size, seed)
    optimizer = torch.optim.Adam(params, lr=protocol.lr)
    epochs = protocol.epochs if epochs is None else epochs
    steps = len(loader)

    def on_step(info):
        if on_epoch is not None and info["step"] % steps == 0:
            on_epoch(info["epoch"], info["loss"])

    history = fit_lmm(model[0], loader, head=model[1], optimizer=optimizer, epochs=epochs,
                      setting="flat" if flat else "lmm", loss_fn=loss_fn, schedule=schedule, gate=gate,
                      device=device, on_step=on_step)
    return history.epoch_losses


def _fewshot_rows(task, k: int) -> Tensor:
    """``k`` training rows per class (fewer when a class has fewer), drawn
    once with seed 0 so that every training seed sees the same rows."""
    labels = task.labels[task.train_index]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(labels.numel(), generator=gen)
    ranked = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, random within
    sorted_labels = labels[ranked]
    first = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    keep = (torch.arange(ranked.numel()) - first) < k
    return task.train_index[torch.sort(ranked[keep]).values]


def remedy_runs(
    task,
    protocol,
    visual,
    semantic,
    seed: int,
    device: str,
    topk: Sequence[int],
    on_epoch: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """All remedy variants except the path score (which reuses the paper's
    LMM run) for one seed: ``{setting: result}`` with the keys of
    ``compare.evaluate`` plus ``macro_error`` and ``tail_error``."""
    from lmm_fast.compare.runs import Batches, SubTask, build_model, fit_run
    from lmm_fast.compare.datasets import split_per_class
    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.loss import FusedLMMLoss
    from lmm_fast.predict import mixture_proba
    from lmm_fast.adaptation.guard import GuardedGibbsAdapter, empty_groups
    from lmm_fast.calibration import apply_temperature, fit_temperature, fit_test_theta
    from lmm_fast.theta import ThetaGate, ThetaSchedule
    from lmm_fast.train import fit_lmm

    n = task.num_classes
    tail = tail_classes(task.labels[task.train_index], n)
    test_x = task.features[task.test_index].to(device)
    test_y = task.labels[task.test_index].to(device)
    num_levels = len(visual.level_sizes) + 1
    out: dict[str, dict[str, Any]] = {}

    def finish(name: str, proba: Tensor, started: float, epoch_loss=(), extra=None) -> None:
        result = evaluate_proba(proba, test_y, semantic, tail, topk)
        result["epoch_loss"] = list(epoch_loss)
        result["seconds"] = time.perf_counter() - started
        if extra:
            result.update(extra)
        out[name] = result

    def mixture(model, loss_fn, gate=None) -> Tensor:
        hidden, logits = _logits(model, test_x)
        theta = loss_fn.theta.detach() if gate is None else gate(hidden)
        return mixture_proba(logits, loss_fn.effective_psi_t(), theta, loss_fn.level_sizes).float()

    # 1. θ over training -----------------------------------------------------
    for name in ("lmm_curriculum", "lmm_learned_theta", "lmm_gated"):
        started = time.perf_counter()
        model = build_model(task.dim, protocol.hidden, visual, seed, device)
        loss_fn = FusedLMMLoss.from_hierarchy(visual, learn_theta=(name == "lmm_learned_theta")).to(device)
        params = list(model.parameters()) + list(loss_fn.parameters())
        gate = schedule = None
        if name == "lmm_gated":
            torch.manual_seed(seed)
            gate = ThetaGate(protocol.hidden, num_levels).to(device)
            params += list(gate.parameters())
        if name == "lmm_curriculum":
            schedule = ThetaSchedule(num_levels, protocol.epochs)
        losses = _train_loop(model, loss_fn, params, task.train_index, task, protocol, seed, device,
                             schedule=schedule, gate=gate, on_epoch=on_epoch)
        with torch.no_grad():
            if gate is not None:
                theta_used = gate(_logits(model, test_x)[0]).mean(0)
            else:
                theta_used = loss_fn.theta.detach()
            finish(name, mixture(model, loss_fn, gate), started, losses,
                   {"theta": [round(float(t), 4) for t in theta_used]})

    # 3. Adaptation that cannot wreck the tree ---------------------------------
    started = time.perf_counter()
    model = build_model(task.dim, protocol.hidden, visual, seed, device)
    loss_fn = FusedLMMLoss.from_hierarchy(visual).to(device)
    y_train = task.labels[task.train_index].to(device)
    adapter = GuardedGibbsAdapter(loss_fn, visual, y_train, beta="scaled", non_overlapping=True, seed=seed,
                                  max_empty_share=GUARD_SHARE)
    loader = Batches(task.features[task.train_index].to(device), y_train, protocol.batch_size, seed)
    steps = len(loader)
    history = fit_lmm(model, loader, optimizer=torch.optim.Adam(model.parameters(), lr=protocol.lr),
                      epochs=protocol.epochs, setting="lmm_p_tc", loss_fn=loss_fn,
                      warmup_epochs=protocol.warmup_epochs, adapter=adapter, seed=seed,
                      on_step=(lambda info: on_epoch(info["epoch"], info["loss"])
                               if on_epoch is not None and info["step"] % steps == 0 else None))
    finish("lmm_p_tc_guarded", mixture(model, loss_fn), started, history.epoch_losses,
           {"refused_steps": adapter.refused_steps, "adapted_steps": history.adapted_steps,
            "empty_groups": empty_groups(adapter), "beta0": adapter.beta0})

    # 2. Calibrated prediction (fit on a held-out slice of the training split) --
    labels = task.labels[task.train_index]
    fit_pos, held_pos = split_per_class(labels.numpy(), CALIBRATION_FRACTION, seed=0)
    fit_rows = task.train_index[torch.from_numpy(fit_pos)]
    held_rows = task.train_index[torch.from_numpy(held_pos)]
    sub = SubTask(task, fit_rows)
    held_x = task.features[held_rows].to(device)
    held_y = task.labels[held_rows].to(device)
    for base in ("flat", "lmm"):
        started = time.perf_counter()
        run = fit_run(base, visual, sub, protocol, seed, device, task.train_index[:1], on_epoch)
        model, loss_fn = run["model"], run["loss_fn"]
        _, held_logits = _logits(model, held_x)
        _, test_logits = _logits(model, test_x)
        if base == "flat":
            held_p = torch.softmax(held_logits[:, -n:], 1)
            test_p = torch.softmax(test_logits[:, -n:], 1)
        else:
            held_p = loss_fn.predict_proba(held_logits).float()
            test_p = loss_fn.predict_proba(test_logits).float()
        temperature = fit_temperature(held_p, held_y)
        finish(f"{base}_cal_t", apply_temperature(test_p, temperature), started, run["history"].epoch_losses,
               {"temperature": temperature, "calibration_rows": int(held_rows.numel())})
        if base == "lmm":
            theta = fit_test_theta(held_logits, held_y, loss_fn)
            proba = mixture_proba(test_logits, loss_fn.effective_psi_t(), theta.to(device), loss_fn.level_sizes)
            finish("lmm_cal_theta", proba.float(), started, (),
                   {"theta": [round(float(t), 4) for t in theta], "calibration_rows": int(held_rows.numel())})

    # 4. Few-shot: k training rows per class -----------------------------------
    rows = _fewshot_rows(task, FEWSHOT_K)
    x_k, y_k = task.features[rows], task.labels[rows]
    fewshot_tree = Hierarchy.from_features(x_k, y_k, list(visual.level_sizes), seed=0,
                                           class_names=getattr(task, "class_names", None))
    # The same number of optimiser steps as a full run (a few-shot set is
    # ~7x smaller than the training split), so neither model is undertrained.
    full_steps = protocol.epochs * math.ceil(task.train_index.numel() / protocol.batch_size)
    epochs = max(1, round(full_steps / math.ceil(rows.numel() / protocol.batch_size)))
    for name in FEWSHOT_SETTINGS:
        started = time.perf_counter()
        model = build_model(task.dim, protocol.hidden, fewshot_tree, seed, device)
        loss_fn = FusedLMMLoss.from_hierarchy(fewshot_tree).to(device)
        flat = name == "fewshot_flat"
        losses = _train_loop(model, loss_fn, list(model.parameters()), rows, task, protocol, seed, device,
                             epochs=epochs, flat=flat)
        if flat:
            proba = torch.softmax(_logits(model, test_x)[1][:, -n:], 1)
        else:
            proba = mixture(model, loss_fn)
        finish(name, proba, started, (), {"k": FEWSHOT_K, "train_rows": int(rows.numel()), "epochs": epochs})
    return out


# ---------------------------------------------------------------------------
# Summary, tables and the verdict
# ---------------------------------------------------------------------------

_VIEW_METRICS = (
    ("top1", "top-1 err %"),
    ("macro_error", "macro err %"),
    ("tail_error", "tail err %"),
    ("severity", "severity"),
    ("hdist1", "dist@1"),
    ("hdist5", "dist@5"),
    ("ece", "ECE %"),
)


_SHORT = {"top1": "top-1", "macro_error": "macro", "tail_error": "tail", "severity": "severity",
          "hdist1": "dist@1", "hdist5": "dist@5", "ece": "ECE"}


def _metric(run: dict[str, Any], key: str) -> float:
    return run["topk_error"]["1"] if key == "top1" else run.get(key, math.nan)


def _stats(values: Sequence[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = sum(clean) / len(clean)
    std = math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1)) if len(clean) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(clean)}


def remedy_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per setting, mean ± std over seeds of top-1, macro top-1, tail-class
    error, severity, ECE and confidence; the paired difference of each to its
    baseline (the flat softmax; the few-shot LMM to the few-shot flat), and
    the verdict of the rule in docs/remedies.md:

    *beats* the baseline on a metric when the mean paired difference is
    below minus two standard deviations of the paired differences (lower is
    better for all five), and *keeps top-1* when its mean paired top-1
    difference is at most one standard deviation of the baseline's top-1.
    """
    out: dict[str, Any] = {}
    for setting, seeds in runs.items():
        if not seeds or "macro_error" not in seeds[0]:
            continue
        baseline = "fewshot_flat" if setting in FEWSHOT_SETTINGS else "flat"
        entry: dict[str, Any] = {"baseline": baseline}
        for key, _ in _VIEW_METRICS + (("confidence", ""),):
            entry[key] = _stats([_metric(r, key) for r in seeds])
        base = {r["seed"]: r for r in runs.get(baseline, [])}
        if setting != baseline and base:
            pairs = [(r, base[r["seed"]]) for r in seeds if r["seed"] in base]
            wins = []
            for key, _ in _VIEW_METRICS:
                delta = _stats([_metric(r, key) - _metric(b, key) for r, b in pairs])
                entry[f"delta_{key}"] = delta
                if delta["n"] >= 2 and delta["mean"] < -2 * delta["std"]:
                    wins.append(key)
            base_top1 = _stats([_metric(b, "top1") for _, b in pairs])
            keeps = entry["delta_top1"]["mean"] <= base_top1["std"]
            entry["wins"] = wins
            entry["keeps_top1"] = bool(keeps)
            entry["beats"] = bool(wins) and bool(keeps)
        out[setting] = entry
    return out


def format_remedy_tables(summary: dict[str, Any], labels: dict[str, str], order: Sequence[str], seeds: int) -> str:
    """The class views of every setting, then the remedies' paired
    differences to flat and the verdict."""
    lines = []
    present = [s for s in order if s in summary]
    head = f"{'method':<30}" + "".join(f"{title:>16}" for _, title in _VIEW_METRICS) + f"{'confidence %':>16}"
    spread = "1 seed: single values, no spread" if seeds < 2 else f"mean ± std over {seeds} seeds"
    lines.append(f"Views where hierarchy should help ({spread}; tail = the "
                 f"{int(100 * TAIL_SHARE)}% of classes with the fewest training rows; severity = mean tree "
                 f"distance over the mistakes, dist@k = over all rows (correct = 0) of the top-k; * = calibrated "
                 f"on {int(100 * CALIBRATION_FRACTION)}% of the training split held out, trained on the rest)")
    lines.append(head)
    lines.append("-" * len(head))

    def cell(stat, key, sign=""):
        # One seed has no spread: the value alone, not a fake "± 0.00".
        if stat["n"] == 0:
            return "-"
        scale, digits = (1, 3) if key in ("severity", "hdist1", "hdist5") else (100, 2)
        text = f"{scale * stat['mean']:{sign}.{digits}f}"
        return text if stat["n"] < 2 else f"{text} ± {scale * stat['std']:.{digits}f}"

    for s in present:
        e = summary[s]
        lines.append(f"{labels[s]:<30}" + "".join(f"{cell(e[k], k):>16}" for k, _ in _VIEW_METRICS)
                     + f"{cell(e['confidence'], 'confidence'):>16}")
    lines.append("")
    lines.append("Paired difference to the baseline (flat softmax; few-shot LMM: few-shot flat), same seed; "
                 "negative = better; beats = mean < -2 std of the differences, keeps top-1 = Δ top-1 <= 1 std "
                 "of the baseline's top-1")
    head = f"{'method':<30}" + "".join(f"{'Δ ' + title:>18}" for _, title in _VIEW_METRICS) + "  verdict"
    lines.append(head)
    lines.append("-" * len(head))

    def dcell(stat, key, won):
        if stat["n"] == 0:
            return "-"
        return cell(stat, key, "+") + ("*" if won else " ")

    for s in present:
        e = summary[s]
        if "wins" not in e:
            continue
        wins = ", ".join(_SHORT[k] for k in e["wins"])
        if e["delta_top1"]["n"] < 2:
            verdict = "needs >= 2 seeds (--seeds)"
        else:
            verdict = f"BEATS flat on {wins}" if e["beats"] else (
                f"wins {wins} but loses top-1" if wins else "no win")
        lines.append(f"{labels[s]:<30}" + "".join(f"{dcell(e[f'delta_{k}'], k, k in e['wins']):>18}"
                                                  for k, _ in _VIEW_METRICS) + f"  {verdict}")
    return "\n".join(lines)
