"""The command line of ``lmm-fast compare``: the LMM against the flat softmax, on speed and on real data.

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
default data is ICD-10-CM (:mod:`lmm_fast.compare.datasets`); ``--features`` and
``--labels`` take a user's own.

Everything printed is also written to ``--out`` (JSON, CSV, PNG).
docs/compare.md describes the protocol.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from typing import Any, Sequence

# Only what the options need: torch and the job are imported by run(), so
# that `lmm-fast compare --help` answers at once.
from lmm_fast._progress import progress_wanted
from lmm_fast.compare.protocol import FULL, QUICK, SETTINGS, Protocol, setting_label
from lmm_fast.compare.speed import SPEED_CLASSES, SPEED_UPPER_LEVELS


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    """CPU, cores, memory, GPU and versions, for the record of a run."""
    import datetime
    import platform

    import torch

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
    import torch

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
    """The options of ``lmm-fast compare`` (also ``python -m lmm_fast.compare``)."""
    data = parser.add_argument_group("data (default: the ICD-10-CM task, needs the demo extra)")
    data.add_argument("--features", metavar="X", help="your own features: [M, d] in .npy, .npz or .pt")
    data.add_argument("--labels", metavar="Y",
                      help="your own labels: [M] integers or strings in .npy, .npz or .pt (may be omitted when "
                           "the --features .npz/.pt holds them under 'labels' or 'y')")
    data.add_argument("--tree", metavar="T",
                      help="the semantic tree of your classes (with --features), for severity, dist@k, CRM and "
                           "hedging: a Hierarchy JSON file (Hierarchy.save, `lmm-fast hierarchy` output) or a CSV "
                           "with a header, one row per class: its label, then its group at each level, top first "
                           "(docs/compare.md)")
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
    proto.add_argument("--warmup-epochs", type=int,
                       help=f"epochs with Ψ fixed before the adaptation (default {QUICK.warmup_epochs}, "
                            f"--full {FULL.warmup_epochs}; with --epochs E at most E-1, so that the adaptation "
                            f"runs: --epochs 1 adapts from the first epoch)")
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
    bars = what.add_mutually_exclusive_group()
    bars.add_argument("--progress", action="store_true",
                      help="progress bars even when stderr is not a terminal (default: only on a terminal)")
    bars.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    if args.epochs is not None and args.warmup_epochs is None:
        # The default warm-up fits: at least one epoch adapts (none fixed for --epochs 1).
        changes["warmup_epochs"] = min(base.warmup_epochs, max(0, args.epochs - 1))
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
    from lmm_fast.compare import datasets

    if args.features is not None:
        task = datasets.load_user_task(
            args.features, args.labels, test_fraction=args.test_fraction,
            min_per_class=args.min_per_class or 2,
        )
        return task if args.tree is None else datasets.attach_tree(task, args.tree)
    if args.labels is not None:
        raise ValueError("--labels needs --features")
    if args.tree is not None:
        raise ValueError("--tree needs --features (ICD-10-CM brings its own tree)")
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
    import torch

    from lmm_fast.compare.protocol import accuracy_benchmark
    from lmm_fast.compare.report import format_accuracy_tables, summarize, write_outputs
    from lmm_fast.compare.speed import format_speed_table, speed_benchmark

    # Bars only for a person watching, not into a log file (as the rest of the
    # CLI), unless --progress asks for them.
    progress = progress_wanted(True if getattr(args, "progress", False) else (False if args.no_progress else None))
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
              f"same mixture in plain PyTorch (lmm_fast.reference); 'linear+loss' rows start from features and "
              f"include the head's GEMMs (ours: FusedLinearLMMLoss); ratios > 1: we are faster; MiB = peak extra "
              f"memory of one call ({time.perf_counter() - t0:.0f} s)")
        print(format_speed_table(speed_rows))
    accuracy = summary = None
    decisions: dict[str, Any] = {}
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
        from lmm_fast.compare.variants import REMEDY_SETTINGS, format_remedy_tables

        views = {s: e["views"] for s, e in summary.items() if isinstance(e, dict) and "views" in e}
        print()
        print(format_remedy_tables(views, {s: setting_label(s) for s in views}, list(SETTINGS) + list(REMEDY_SETTINGS),
                                   len(protocol.seeds)))
        from lmm_fast.compare.decisions import NO_TREE_NOTE, decision_summary, format_decision_tables

        decisions = decision_summary(accuracy, {s: setting_label(s) for s in SETTINGS})
        if decisions:
            print()
            if task.semantic_tree is None:
                print(f"note: {NO_TREE_NOTE} (it favours the LMM; pass --tree for your taxonomy)")
            print(format_decision_tables(decisions, len(protocol.seeds)))
    meta["seconds"] = time.perf_counter() - started
    written = write_outputs(
        args.out, meta, speed_rows, accuracy, summary,
        class_names=None if task is None else task.class_names, plots=not args.no_plots,
    )
    if accuracy is not None:
        from lmm_fast.compare.decisions import write_decision_outputs

        written += write_decision_outputs(args.out, decisions, accuracy, plots=not args.no_plots)
    print(f"\nwrote {', '.join(written)} ({meta['seconds'] / 60:.1f} min in all)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lmm-fast compare`` / ``python -m lmm_fast.compare``."""
    parser = argparse.ArgumentParser(
        prog="lmm-fast compare",
        description="The LMM against the flat softmax: speed and memory of the fused ops, then accuracy on "
                    "real data (ICD-10-CM by default, or --features/--labels), over several seeds.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
