"""Summaries, tables and files of ``lmm-fast compare``: seed means and
paired differences, the printed tables, and what is written to ``--out``
(JSON, CSV, PNG)."""
from __future__ import annotations

import math
import os
import statistics
import sys
from typing import Any, Sequence

import torch
from torch import Tensor

from lmm_fast.compare.protocol import SETTING_LABELS, SETTINGS, TABLE_I, TABLE_IV, setting_label
from lmm_fast.compare.runs import TOPK, spread_note


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
    :func:`lmm_fast.compare.variants.remedy_summary`.
    """
    from lmm_fast import metrics

    runs = result["runs"]
    out: dict[str, Any] = {}
    flat = runs.get("flat")
    for setting, seeds in runs.items():
        entry: dict[str, Any] = {"label": setting_label(setting)}
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
    from lmm_fast.compare.variants import remedy_summary

    for setting, views in remedy_summary(runs).items():
        out[setting]["views"] = views
    if flat is not None and len(flat) >= 2:
        half = len(flat) // 2
        a = torch.stack([r["per_class_accuracy"] for r in flat[:half]]).mean(0)
        b = torch.stack([r["per_class_accuracy"] for r in flat[half : 2 * half]]).mean(0)
        out["flat_vs_flat"] = metrics.compare_per_class(a, b).as_dict()
    return out


def _pct(stat: dict[str, Any], digits: int = 2, sign: str = "") -> str:
    """``mean ± std`` in percent; the value alone from one seed (no spread to show)."""
    if stat["n"] == 0:
        return "-"
    if stat["n"] < 2:
        return f"{100 * stat['mean']:{sign}.{digits}f}"
    return f"{100 * stat['mean']:{sign}.{digits}f} ± {100 * stat['std']:.{digits}f}"


def _num(stat: dict[str, Any], digits: int = 2) -> str:
    if stat["n"] == 0:
        return "-"
    if stat["n"] < 2:
        return f"{stat['mean']:.{digits}f}"
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
            delta_text = "" if delta is None else _pct(delta, sign="+")
            lines.append(
                f"{entry['label']:<30}" + "".join(f"{_pct(entry[f'top{k}_error']):>18}" for k in TOPK) + f"{delta_text:>24}"
            )
        lines.append("")

    lines.append(f"{task_line}; {spread_note(seeds)}; Δ = paired difference to the flat run of the same seed")
    lines.append("")
    # A table is printed when one of its LMM settings ran (the flat row alone:
    # Table I), so that --settings without Table IV's prints no empty Table IV.
    table_iv = any(s in summary for s in TABLE_IV if s != "flat")
    if any(s in summary for s in TABLE_I if s != "flat") or not table_iv:
        error_table("Table I shape: flat softmax vs LMM (test error, %)", TABLE_I)
    if table_iv:
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
            ax.plot(epochs, mean, marker=".", label=setting_label(setting))
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
