"""Hierarchy-aware decisions in ``lmm-fast compare``: the rows "flat + CRM"
and "LMM + CRM" (conditional risk minimisation, :func:`lmm_fast.decide.crm`)
and the hedged answers at 90 / 95 / 99 % target accuracy
(:class:`lmm_fast.decide.HedgePolicy`), for the flat softmax and the LMM
settings of Table I, in every tree the job knows (the data's semantic tree,
when it has one, and the visual hierarchy of Table I), plus the
accuracy–specificity plot.

No training: both rules act on the test posteriors of the runs the job
already made. The hedging threshold is fit on a random half of the test rows
(:func:`lmm_fast.decide.calibration_split`, seeded by the training seed) and
every hedging number is reported on the other half, so the rows that choose
the threshold never score it. CRM needs no fitting and is reported on the
whole test split, like the other tables.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from lmm_fast.compare.runs import spread_note

__all__ = [
    "DECISION_SETTINGS",
    "HEDGE_TARGETS",
    "CALIBRATION_SHARE",
    "NO_TREE_NOTE",
    "decision_result",
    "decision_summary",
    "format_decision_tables",
    "write_decision_outputs",
]

# The flat softmax and the LMM settings trained on the visual hierarchy of Table I.
DECISION_SETTINGS = ("flat", "lmm", "lmm_p", "lmm_p_tc")
HEDGE_TARGETS = (0.90, 0.95, 0.99)
CALIBRATION_SHARE = 0.5
CRM_METRICS = ("top1_error", "severity", "hdist1", "hdist5")
HEDGE_METRICS = ("accuracy", "class_share", "mean_depth", "root_share", "threshold", "guaranteed")
RULE_LABELS = {"hedge": "hedge", "top_class": "top class", "top_class_coarse": "top class/coarse"}
# Targets of the issue: flat + CRM keeps top-1 within this many points...
TOP1_TOLERANCE = 0.002
# ...and hedging lands within this many points of the requested accuracy.
HEDGE_TOLERANCE = 0.005
NO_TREE_NOTE = "no semantic tree given: distances in the visual hierarchy the LMM trained on"


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


def _curve_dict(curve) -> dict[str, Any]:
    return {key: getattr(curve, key) for key in ("threshold", "accuracy", "class_share", "mean_depth", "root_share")}


def decision_result(
    proba: Tensor,
    target: Tensor,
    trees: Mapping[str, Any],
    seed: int,
    *,
    targets: Sequence[float] = HEDGE_TARGETS,
    calibration_share: float = CALIBRATION_SHARE,
) -> dict[str, Any]:
    """CRM and hedging of one run's test posteriors ``proba`` ``[M, N]``.

    Returns ``{"calibration_rows", "evaluation_rows", "trees": {name: {"crm":
    decide.crm_report(...) on all M rows, "hedge": decide.hedge_report(...)
    fit on the calibration half and evaluated on the other, "curves": {rule:
    accuracy–specificity curve on the evaluation half}, "at_accuracy": {rule:
    [the most specific curve point with accuracy >= each target]}}}}``. The
    halves come from ``decide.calibration_split(M, calibration_share,
    seed=seed)``, the same for every setting of a seed, so settings are
    paired on the same rows.
    """
    from lmm_fast import decide

    proba = proba.detach().float().cpu()
    target = target.detach().long().cpu()
    calibration, evaluation = decide.calibration_split(target.numel(), calibration_share, seed=seed)
    out: dict[str, Any] = {
        "calibration_rows": int(calibration.numel()),
        "evaluation_rows": int(evaluation.numel()),
        "trees": {},
    }
    proba_cal, y_cal = proba[calibration], target[calibration]
    proba_eval, y_eval = proba[evaluation], target[evaluation]
    for name, tree in trees.items():
        curves = {rule: decide.hedge_curve(proba_eval, y_eval, tree, rule=rule) for rule in decide.RULES}
        out["trees"][name] = {
            "crm": decide.crm_report(proba, target, tree, ks=(1, min(5, proba.shape[1]))),
            "hedge": decide.hedge_report(proba_cal, y_cal, proba_eval, y_eval, tree, accuracies=tuple(targets)),
            "curves": {rule: _curve_dict(curve) for rule, curve in curves.items()},
            "at_accuracy": {rule: [curve.at_accuracy(a) for a in targets] for rule, curve in curves.items()},
        }
    return out


# ---------------------------------------------------------------------------
# Over seeds
# ---------------------------------------------------------------------------


def _stat(values: Sequence[float]) -> dict[str, Any]:
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    if not all(math.isfinite(v) for v in clean):  # a threshold of ±inf: always or never the root
        return {"mean": statistics.fmean(clean), "std": math.nan, "n": len(clean)}
    return {"mean": statistics.fmean(clean), "std": statistics.stdev(clean) if len(clean) > 1 else 0.0,
            "n": len(clean)}


def _hdist5(report: Mapping[str, float]) -> float:
    # With fewer than 5 classes the job reports dist@N under the dist@5 name.
    return report.get("hdist5", next((v for k, v in report.items() if k.startswith("hdist") and k != "hdist1"),
                                     math.nan))


def _crm_value(report: Mapping[str, float], key: str) -> float:
    return _hdist5(report) if key == "hdist5" else report[key]


def _hedge_rows(result: Mapping[str, Any], tree: str, rule: str, t: int, target: float):
    """(the fitted policy's row of ``hedge_report``, the curve's point at equal accuracy)."""
    tree_result = result["trees"][tree]
    row = next(x for x in tree_result["hedge"] if x["rule"] == rule and x["target"] == target)
    return row, tree_result["at_accuracy"][rule][t]


def decision_summary(accuracy: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Means ± std over seeds of the decision rows of ``accuracy`` (the output
    of :func:`lmm_fast.compare.protocol.accuracy_benchmark`), paired
    differences to the flat softmax ranked by probability, and the verdicts
    on the issue's targets. Empty when no run carries decisions. ``labels``:
    the printed name of each setting (default: the setting itself).

    Per tree: ``crm[(setting, ranking)]`` with ranking ``"argmax"`` or
    ``"crm"``: each metric of :data:`CRM_METRICS` and ``delta_<metric>`` (to
    flat argmax, same seed), ``wins`` (metrics whose mean paired difference
    is below −2 std of the differences) and ``top1_within`` (|Δ top-1| <=
    0.2 points); ``hedge[(setting, rule, target)]``: each metric of
    :data:`HEDGE_METRICS` on the evaluation half, ``equal_class_share`` /
    ``equal_mean_depth`` (the curve's most specific point at accuracy >=
    target), ``delta_vs_flat_*`` of those two (paired); ``verdict``.
    """
    runs = accuracy.get("runs", {})
    present = [s for s in DECISION_SETTINGS if runs.get(s) and "decisions" in runs[s][0]]
    if not present:
        return {}
    info = accuracy.get("hierarchies", {}).get("decision_trees", {})
    first = runs[present[0]][0]["decisions"]
    targets = [row["target"] for row in first["trees"][next(iter(first["trees"]))]["hedge"] if row["rule"] == "hedge"]
    flat = {r["seed"]: r["decisions"] for r in runs.get("flat", []) if "decisions" in r}
    out: dict[str, Any] = {"settings": present, "targets": targets, "trees": {},
                           "labels": {s: (labels or {}).get(s, s) for s in present}}
    for tree in first["trees"]:
        crm_rows: dict[tuple[str, str], dict[str, Any]] = {}
        hedge_rows: dict[tuple[str, str, float], dict[str, Any]] = {}
        for setting in present:
            seeds = runs[setting]
            for ranking in ("argmax", "crm"):
                entry: dict[str, Any] = {}
                for key in CRM_METRICS:
                    entry[key] = _stat([_crm_value(r["decisions"]["trees"][tree]["crm"][ranking], key) for r in seeds])
                pairs = [(r["decisions"]["trees"][tree]["crm"][ranking], flat[r["seed"]]["trees"][tree]["crm"]["argmax"])
                         for r in seeds if r["seed"] in flat]
                if pairs and (setting, ranking) != ("flat", "argmax"):
                    entry["wins"] = []
                    for key in CRM_METRICS:
                        delta = _stat([_crm_value(a, key) - _crm_value(b, key) for a, b in pairs])
                        entry[f"delta_{key}"] = delta
                        if delta["n"] >= 2 and delta["mean"] < -2 * delta["std"]:
                            entry["wins"].append(key)
                    entry["top1_within"] = bool(abs(entry["delta_top1_error"]["mean"]) <= TOP1_TOLERANCE)
                crm_rows[(setting, ranking)] = entry
            for rule in RULE_LABELS:
                for t, target in enumerate(targets):
                    fitted = [_hedge_rows(r["decisions"], tree, rule, t, target) for r in seeds]
                    entry = {key: _stat([row[key] for row, _ in fitted]) for key in HEDGE_METRICS}
                    entry["equal_class_share"] = _stat([point["class_share"] for _, point in fitted])
                    entry["equal_mean_depth"] = _stat([point["mean_depth"] for _, point in fitted])
                    if setting != "flat":
                        pairs = [(mine, _hedge_rows(flat[r["seed"]], tree, rule, t, target))
                                 for r, mine in zip(seeds, fitted) if r["seed"] in flat]
                        for key in ("class_share", "mean_depth"):
                            entry[f"delta_vs_flat_equal_{key}"] = _stat([a[1][key] - b[1][key] for a, b in pairs])
                            entry[f"delta_vs_flat_{key}"] = _stat([a[0][key] - b[0][key] for a, b in pairs])
                    hedge_rows[(setting, rule, target)] = entry
        tree_info = info.get(tree, {})
        out["trees"][tree] = {
            "description": tree_info.get("description", tree),
            "num_levels": tree_info.get("num_levels"),
            "crm": crm_rows,
            "hedge": hedge_rows,
            "verdict": _verdict(crm_rows, hedge_rows, present, targets),
        }
    out["calibration_rows"] = first["calibration_rows"]
    out["evaluation_rows"] = first["evaluation_rows"]
    return out


def _verdict(crm_rows, hedge_rows, present, targets) -> dict[str, Any]:
    verdict: dict[str, Any] = {}
    flat_crm = crm_rows.get(("flat", "crm"))
    if flat_crm and "wins" in flat_crm:
        verdict["flat_crm"] = {
            "severity_lower": "severity" in flat_crm["wins"],
            "hdist5_lower": "hdist5" in flat_crm["wins"],
            "top1_within": flat_crm["top1_within"],
            "met": "severity" in flat_crm["wins"] and "hdist5" in flat_crm["wins"] and flat_crm["top1_within"],
        }
    target = 0.95 if 0.95 in targets else targets[len(targets) // 2]
    verdict["hedge_target"] = target
    for setting in present:
        hedge = hedge_rows[(setting, "hedge", target)]
        top = hedge_rows[(setting, "top_class", target)]
        verdict[f"hedge_{setting}"] = {
            "accuracy": hedge["accuracy"]["mean"],
            "within": bool(abs(hedge["accuracy"]["mean"] - target) <= HEDGE_TOLERANCE),
            "class_share": hedge["class_share"]["mean"],
            "top_class_accuracy": top["accuracy"]["mean"],
            "top_class_share": top["class_share"]["mean"],
            "equal_class_share": hedge["equal_class_share"]["mean"],
            "equal_top_class_share": top["equal_class_share"]["mean"],
            "beats_top_class": bool(hedge["equal_class_share"]["mean"] > top["equal_class_share"]["mean"]),
            "equal_mean_depth": hedge["equal_mean_depth"]["mean"],
            "equal_top_class_depth": top["equal_mean_depth"]["mean"],
        }
        if setting != "flat":
            delta = hedge["delta_vs_flat_equal_mean_depth"]
            share = hedge["delta_vs_flat_equal_class_share"]
            if delta["n"] >= 2 and abs(delta["mean"]) > 2 * delta["std"]:
                word = "better" if delta["mean"] > 0 else "worse"
            else:
                word = "no different (within 2 std)"
            verdict[f"hedge_{setting}"]["vs_flat"] = {"mean_depth": delta, "class_share": share, "word": word}
    return verdict


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _cell(stat: Mapping[str, Any], scale: float, digits: int, sign: bool = False, mark: bool = False) -> str:
    if not stat or stat["n"] == 0:
        return "-"
    mean = f"{scale * stat['mean']:+.{digits}f}" if sign else f"{scale * stat['mean']:.{digits}f}"
    suffix = "*" if mark else (" " if sign else "")
    if stat["n"] < 2:  # one seed: the value alone, no spread to show
        return mean + suffix
    return f"{mean} ± {scale * stat['std']:.{digits}f}" + suffix


def format_decision_tables(summary: Mapping[str, Any], seeds: int) -> str:
    """The CRM and hedging tables of every tree, then the verdicts, as text."""
    if not summary:
        return ""
    labels = summary["labels"]
    lines: list[str] = []
    scales = {"top1_error": (100, 2), "severity": (1, 3), "hdist1": (1, 3), "hdist5": (1, 3)}
    titles = {"top1_error": "top-1 err %", "severity": "severity", "hdist1": "dist@1", "hdist5": "dist@5"}
    for tree, block in summary["trees"].items():
        lines.append(f"Better mistakes (CRM: rank classes by expected tree distance, Karthik et al. 2021) in "
                     f"{block['description']}; whole test split; {spread_note(seeds)}; Δ = paired "
                     f"difference to flat softmax ranked by probability, same seed; * = beyond 2 std of the "
                     f"differences")
        head = (f"{'method':<36}" + "".join(f"{titles[k]:>16}" for k in CRM_METRICS)
                + "".join(f"{'Δ ' + titles[k]:>18}" for k in CRM_METRICS))
        lines.append(head)
        lines.append("-" * len(head))
        for (setting, ranking), entry in block["crm"].items():
            label = labels[setting] + (" + CRM" if ranking == "crm" else "")
            row = f"{label:<36}" + "".join(f"{_cell(entry[k], *scales[k]):>16}" for k in CRM_METRICS)
            if "wins" in entry:
                row += "".join(f"{_cell(entry[f'delta_{k}'], *scales[k], sign=True, mark=k in entry['wins']):>18}"
                               for k in CRM_METRICS)
            lines.append(row)
        lines.append("")
        depth = block["num_levels"]
        lines.append(f"Hedged answers (Deng et al. 2012) in {block['description']}: the deepest node whose "
                     f"probability clears a threshold fit for the target on {summary['calibration_rows']} test rows "
                     f"(a random half), reported on the other {summary['evaluation_rows']}; 'top class' = uniform "
                     f"threshold on the top class, else the root; 'top class/coarse' = else the top node of the "
                     f"deepest upper level; depth 0 = root .. {depth} = class; 'at equal acc.' = the most specific "
                     f"point of the curve with accuracy >= target on the evaluation rows")
        head = (f"{'method':<30}{'rule':<18}{'target':>7}{'accuracy %':>16}{'class level %':>16}"
                f"{'mean depth':>16}{'guaranteed %':>14}{'class % at equal acc.':>24}{'depth at equal acc.':>22}")
        lines.append(head)
        lines.append("-" * len(head))
        for target in summary["targets"]:
            for setting in summary["settings"]:
                for rule, rule_label in RULE_LABELS.items():
                    e = block["hedge"][(setting, rule, target)]
                    lines.append(
                        f"{labels[setting]:<30}{rule_label:<18}{100 * target:>6.0f}%{_cell(e['accuracy'], 100, 2):>16}"
                        f"{_cell(e['class_share'], 100, 1):>16}{_cell(e['mean_depth'], 1, 2):>16}"
                        f"{100 * e['guaranteed']['mean']:>13.2f}%{_cell(e['equal_class_share'], 100, 1):>24}"
                        f"{_cell(e['equal_mean_depth'], 1, 2):>22}"
                    )
        lines.append("")
        lines.append(f"Targets in {block['description']}:")
        lines.extend("  " + line for line in _verdict_lines(block["verdict"], summary["settings"], labels))
        lines.append("")
    return "\n".join(lines).rstrip()


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _verdict_lines(verdict: Mapping[str, Any], settings: Sequence[str], labels: Mapping[str, str]) -> list[str]:
    lines = []
    flat_crm = verdict.get("flat_crm")
    if flat_crm:
        lines.append(f"flat + CRM vs flat: severity lower beyond 2 std: {_yes(flat_crm['severity_lower'])}; "
                     f"dist@5 lower beyond 2 std: {_yes(flat_crm['hdist5_lower'])}; top-1 within "
                     f"{100 * TOP1_TOLERANCE:.1f} pts: {_yes(flat_crm['top1_within'])} -> "
                     f"{'met' if flat_crm['met'] else 'NOT met'}")
    target = verdict["hedge_target"]
    for setting in settings:
        v = verdict[f"hedge_{setting}"]
        line = (f"{labels[setting]}, hedging at {100 * target:.0f} %: accuracy {100 * v['accuracy']:.2f} % "
                f"(within ±{100 * HEDGE_TOLERANCE:.1f} pts: {_yes(v['within'])}), class level {100 * v['class_share']:.1f} % "
                f"(top class: {100 * v['top_class_share']:.1f} % at {100 * v['top_class_accuracy']:.2f} %); at equal "
                f"accuracy {100 * v['equal_class_share']:.1f} % vs {100 * v['equal_top_class_share']:.1f} % for the "
                f"top class: {'more' if v['beats_top_class'] else 'NOT more'} (mean depth {v['equal_mean_depth']:.3f} "
                f"vs {v['equal_top_class_depth']:.3f})")
        lines.append(line)
        if "vs_flat" in v:
            d, s = v["vs_flat"]["mean_depth"], v["vs_flat"]["class_share"]
            lines.append(f"{labels[setting]} vs flat posterior, hedging at equal accuracy ({100 * target:.0f} %): "
                         f"Δ mean depth {_cell(d, 1, 3, sign=True).strip()}, Δ class level "
                         f"{_cell(s, 100, 2, sign=True).strip()} pts -> hedges {v['vs_flat']['word']}")
    return lines


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def write_decision_outputs(
    out_dir: str, summary: Mapping[str, Any], accuracy: Mapping[str, Any], plots: bool = True
) -> list[str]:
    """``decisions.csv`` (every row of the tables, mean and std over seeds)
    and, with ``plots``, ``accuracy_specificity.png`` (the first tree: the
    semantic one when the data has one) and ``accuracy_specificity_<tree>.png``
    for the others: the hedge and top-class curves of the first seed, flat
    against the LMM, on the evaluation half of the test rows."""
    if not summary:
        return []
    os.makedirs(out_dir, exist_ok=True)
    labels = summary["labels"]
    written = []
    path = os.path.join(out_dir, "decisions.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tree", "setting", "label", "rule", "target", "metric", "mean", "std", "n_seeds"])
        for tree, block in summary["trees"].items():
            for (setting, ranking), entry in block["crm"].items():
                label = labels[setting] + (" + CRM" if ranking == "crm" else "")
                for key, stat in entry.items():
                    if isinstance(stat, dict) and "mean" in stat:
                        writer.writerow([tree, setting, label, ranking, "", key, stat["mean"], stat["std"], stat["n"]])
            for (setting, rule, target), entry in block["hedge"].items():
                for key, stat in entry.items():
                    writer.writerow([tree, setting, labels[setting], rule, target, key, stat["mean"], stat["std"],
                                     stat["n"]])
    written.append(path)
    if plots:
        try:
            written += _plot_curves(out_dir, summary, accuracy)
        except ImportError:
            pass  # the main report already says that matplotlib is missing
    return written


def _plot_curves(out_dir: str, summary: Mapping[str, Any], accuracy: Mapping[str, Any]) -> list[str]:
    from lmm_fast import decide
    from lmm_fast.decide import HedgeCurve

    runs = accuracy["runs"]
    lmm = next((s for s in summary["settings"] if s != "flat"), None)
    shown = [s for s in ("flat", lmm) if s is not None]
    written = []
    for i, (tree, block) in enumerate(summary["trees"].items()):
        curves, points = {}, {}
        target = block["verdict"]["hedge_target"]
        for setting in shown:
            result = runs[setting][0]["decisions"]["trees"][tree]
            name = "flat" if setting == "flat" else "LMM"
            for rule in ("hedge", "top_class"):
                c = result["curves"][rule]
                curves[f"{name}, {RULE_LABELS[rule]}"] = HedgeCurve(rule, block["num_levels"] or 0, *(
                    torch.as_tensor(c[key], dtype=torch.float64)
                    for key in ("threshold", "accuracy", "class_share", "mean_depth", "root_share")))
            fitted = next(r for r in result["hedge"] if r["rule"] == "hedge" and r["target"] == target)
            points[f"{name}, hedge fit for {100 * target:.0f} %"] = (fitted["mean_depth"], fitted["accuracy"])
        path = os.path.join(out_dir, "accuracy_specificity.png" if i == 0 else f"accuracy_specificity_{tree}.png")
        seed = runs[shown[0]][0]["seed"]
        decide.plot_accuracy_specificity(
            curves, path, points=points, targets=summary["targets"],
            title=f"{'Semantic tree' if tree == 'semantic' else 'Visual hierarchy'}: flat vs LMM "
                  f"(seed {seed}, held-out half of the test rows)",
        )
        written.append(path)
    return written
