"""Part 2 of ``lmm-fast compare``, the protocol: an MLP over fixed features
trained with the flat softmax and with the LMM variants of the paper's Table I
(fixed hierarchy, with Ψ adaptation, with adaptation and the non-overlapping
constraint) and Table IV (one-level LMM whose Ψ is the flat model's confusion
matrix, two-level LMM), over several seeds; top-k errors, per-class changes
(Fig. 5), confidence, calibration, mistake severity and the adaptation's
reassignments. The default data is ICD-10-CM (:mod:`lmm_fast.compare.datasets`);
``--features`` and ``--labels`` take a user's own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

# No torch at import: `lmm-fast compare --help` shows QUICK and FULL without it.


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


def setting_label(setting: str) -> str:
    """The printed name of a setting of :data:`SETTINGS` or of the remedies."""
    from lmm_fast.compare.variants import REMEDY_LABELS

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
        remedies: also run the variants of :mod:`lmm_fast.compare.variants`
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
    import torch

    from lmm_fast._progress import progress_bar
    from lmm_fast.compare.decisions import DECISION_SETTINGS, NO_TREE_NOTE, decision_result
    from lmm_fast.compare.runs import TOPK, confusion_hierarchy, evaluate, fit_run, test_proba
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
        severity_tree = f"the visual hierarchy of Table I ({NO_TREE_NOTE})"
    # CRM and hedging (compare.decisions) in every tree the job knows.
    decision_trees = {"semantic": semantic, "visual": visual} if task.semantic_tree is not None else {"visual": visual}
    decision_info = {
        name: {"description": severity_tree if tree is semantic else f"the visual hierarchy of Table I {levels}"
               + ("" if task.semantic_tree is not None else f" ({NO_TREE_NOTE})"),
               "level_sizes": list(tree.level_sizes), "num_levels": tree.num_levels}
        for name, tree in decision_trees.items()
    }
    gen = torch.Generator().manual_seed(0)
    curve_index = task.test_index[torch.randperm(task.test_index.numel(), generator=gen)[: protocol.curve_rows]]

    runs_total = len(protocol.seeds) * len(protocol.settings) + (2 if "lmm_1level" in protocol.settings else 0)
    if protocol.remedies:
        # Curriculum, learned θ, gated θ, guarded w/P,TC, two calibration runs
        # (the few-shot runs are not counted: they are short).
        runs_total += 6 * len(protocol.seeds)
    bar = progress_bar(total=runs_total * protocol.epochs, desc="training", unit="epoch", disable=not progress,
                       leave=False)

    def on_epoch(epoch: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{label}, epoch {epoch + 1}, loss {loss:.3f}")

    confusion_info = None
    if "lmm_1level" in protocol.settings:
        label = "confusion of the flat model (2 folds)"
        hierarchies["lmm_1level"], confusion = confusion_hierarchy(task, protocol, visual, device, on_epoch)
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
        from lmm_fast.compare import variants as remedies

        tail = remedies.tail_classes(y_train, n)
        runs.update({s: [] for s in remedies.REMEDY_SETTINGS if s != "lmm_path" or "lmm" in protocol.settings})
    try:
        for seed in protocol.seeds:
            for setting in protocol.settings:
                label = f"{setting} seed {seed}"
                hierarchy = hierarchies[setting]
                run = fit_run(setting, hierarchy, task, protocol, seed, device, curve_index, on_epoch)
                result = evaluate(run, task, setting, hierarchy, semantic, device)
                result["seed"] = seed
                if setting in DECISION_SETTINGS:
                    result["decisions"] = decision_result(test_proba(run, task, device), task.labels[task.test_index],
                                                          decision_trees, seed)
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
            "decision_trees": decision_info,
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
