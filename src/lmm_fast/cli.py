"""The ``lmm-fast`` command line.

Every subcommand is one ``_add_<name>_parser(subparsers)`` function that builds
its parser and sets ``handler`` to a ``_run_<name>(args) -> int`` function; to
add a subcommand, write those two and append the first to ``SUBCOMMANDS``.
A handler reports bad input by raising ``CommandError`` (or ValueError,
TypeError, OSError): ``main`` prints one line and returns 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

PROG = "lmm-fast"


class CommandError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: not with --quiet, not into a pipe or log."""
    return not args.quiet and sys.stderr.isatty()


def _load_array(path: str, key: str | None, role: str) -> Any:
    """An array from .npy, .npz or .pt/.pth; ``key`` selects an entry of an archive or dict.

    Returns a numpy array or a torch tensor (left on the CPU).
    """
    import numpy as np
    import torch

    if not os.path.exists(path):
        raise CommandError(f"{role} file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return _pick(dict(archive.items()), key, role, path)
        if suffix in (".pt", ".pth"):
            # weights_only: a tensor file must not be able to run code on load.
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                return obj
            if isinstance(obj, dict):
                return _pick(obj, key, role, path)
            raise CommandError(f"{role} file {path!r} holds a {type(obj).__name__}, not a tensor or dict of tensors")
    except CommandError:
        raise
    except Exception as exc:  # numpy/torch raise many types for corrupt files
        raise CommandError(f"cannot read {role} file {path!r}: {exc}") from None
    raise CommandError(f"{role} file {path!r}: unsupported extension {suffix!r} (use .npy, .npz, .pt or .pth)")


def _pick(entries: dict, key: str | None, role: str, path: str) -> Any:
    if key is not None:
        if key not in entries:
            raise CommandError(f"{role} file {path!r} has no entry {key!r} (entries: {sorted(entries)})")
        return entries[key]
    if role in entries:
        return entries[role]
    if len(entries) == 1:
        return next(iter(entries.values()))
    raise CommandError(
        f"{role} file {path!r} has several entries {sorted(entries)}: choose one with --{role}-key"
    )


def _load_class_names(path: str) -> list[str]:
    import json

    try:
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                names = json.load(f)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CommandError(f"class names file {path!r} must hold a JSON list of strings")
            return names
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"cannot read class names file {path!r}: {exc}") from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 10,100, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one level size")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


# ---------------------------------------------------------------------------
# hierarchy
# ---------------------------------------------------------------------------


# The choices of --method and --metric, kept here so that `lmm-fast --help`
# does not import torch; tests/test_taxonomy.py checks them against
# lmm_fast.hierarchy.METHODS and METRICS.
_METHODS = ("balanced", "ward", "average", "complete")
_METRICS = ("euclidean", "cosine")
# Output extensions of -o, as lmm_fast.hierarchy.EXPORT_FORMATS (checked by the same test).
_OUTPUT_EXTENSIONS = (".json", ".json.gz", ".nwk", ".newick", ".tre", ".tree", ".dot", ".gv")


def _add_hierarchy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "hierarchy",
        help="build a hierarchy (from deep features, class means or your own taxonomy) and save it",
        description=(
            "Build a visual hierarchy (paper Section IV): class means of deep features, "
            "the similarity S = exp(-d/sigma) of Eq. 3 with a self-tuned sigma, and nested "
            "clustering with exactly the requested number of groups per level. Or read your own "
            "taxonomy (--parents). Writes JSON, Newick or Graphviz DOT by the extension of -o."
        ),
        epilog="examples: lmm-fast hierarchy --features F.npy --labels L.npy --levels 10,100 -o tree.json | "
               "lmm-fast hierarchy --parents taxonomy.csv -o tree.json -o tree.nwk --plot-tree tree.png",
    )
    source = parser.add_argument_group("input")
    source.add_argument("--features", metavar="FILE", help="features [M, d] (.npy, .npz, .pt)")
    source.add_argument("--labels", metavar="FILE", help="class of every feature row, integers [M] or strings "
                        "(classes in sorted order, or in the order of --class-names); "
                        "optional if the --features archive has a 'labels' entry")
    source.add_argument("--means", metavar="FILE", help="class representations [N, d] instead of "
                        "features and labels (class means, or a classifier's weight rows)")
    source.add_argument("--parents", metavar="CSV", help="your own taxonomy instead: parent,child rows (a header "
                        "row naming 'parent' and 'child' is optional; .tsv: tab-separated); the leaves are the classes")
    source.add_argument("--features-key", metavar="KEY", help="entry of a .npz/.pt archive holding the features")
    source.add_argument("--labels-key", metavar="KEY", help="entry of a .npz/.pt archive holding the labels")
    source.add_argument("--means-key", metavar="KEY", help="entry of a .npz/.pt archive holding the class means")
    source.add_argument("--num-classes", type=int, metavar="N", help="number of classes (default: max label + 1)")
    source.add_argument("--class-names", metavar="FILE", help="class names: a text file with one per line, or a JSON "
                        "list; with --parents, the leaves in class-index order")
    clustering = parser.add_argument_group("clustering")
    clustering.add_argument("--levels", type=_int_list, metavar="N1,N2,...",
                            help="groups per upper level, top first, strictly increasing, each < N "
                            "(required, except with --parents)")
    clustering.add_argument("--method", default="balanced", choices=_METHODS,
                            help="balanced: recursive balanced k-means (any N, default); ward/average/complete: "
                            "dendrogram cuts (N <= 20000)")
    clustering.add_argument("--metric", default="euclidean", choices=_METRICS, help="distance d of Eq. 3")
    clustering.add_argument("--balance", type=float, default=2.0,
                            help="balanced method: group sizes within [N/(b N_l), b N/N_l] (default 2)")
    clustering.add_argument("--sigma", type=_positive_float, help="sigma of Eq. 3 (default: self-tuned)")
    clustering.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    clustering.add_argument("--device", default="cpu", help="torch device to cluster on, e.g. cuda (default cpu)")
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", required=True, action="append", metavar="FILE",
                        help="hierarchy file, format by extension: .json or .json.gz (the hierarchy), "
                        ".nwk/.newick/.tre/.tree (Newick) or .dot/.gv (Graphviz DOT); repeat for several")
    output.add_argument("--plot", metavar="PNG", help="also draw group sizes and the tree-ordered similarity matrix")
    output.add_argument("--plot-tree", metavar="PNG", help="also draw the tree: a dendrogram of the levels")
    output.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no summary")
    parser.set_defaults(handler=_run_hierarchy)
    return parser


def _check_outputs(paths: Sequence[str]) -> None:
    for path in paths:
        name = path.lower()
        if not any(name.endswith(ext) for ext in _OUTPUT_EXTENSIONS):
            raise CommandError(
                f"-o {path}: unknown extension; use {', '.join(_OUTPUT_EXTENSIONS)} "
                f"(JSON: the hierarchy; Newick or DOT: the tree)"
            )


def _class_ids(labels: Any, names: list[str] | None) -> tuple[Any, list[str] | None, bool]:
    """Integer class ids of ``labels``, the class names, and whether the labels were strings.

    String labels are numbered in sorted order, which gives the class names,
    or by their position in ``names`` (``--class-names``).
    """
    import numpy as np

    if not isinstance(labels, (np.ndarray, list, tuple)):
        return labels, names, False  # a tensor holds numbers
    array = np.asarray(labels)
    if array.dtype.kind not in "US" and not (array.dtype == object and array.size and isinstance(array.flat[0], str)):
        return labels, names, False
    if array.ndim != 1:
        raise CommandError(f"labels must be 1-D [M], got shape {array.shape}")
    array = array.astype(str)
    if names is None:
        unique, ids = np.unique(array, return_inverse=True)
        return ids.astype(np.int64), [str(n) for n in unique], True
    index = {name: i for i, name in enumerate(names)}
    missing = [value for value in dict.fromkeys(array.tolist()) if value not in index]
    if missing:
        raise CommandError(f"labels {missing[:5]} are not in --class-names ({len(missing)} such labels)")
    return np.fromiter((index[v] for v in array.tolist()), dtype=np.int64, count=array.size), names, True


def _run_hierarchy(args: argparse.Namespace) -> int:
    _check_outputs(args.output)
    if args.parents is not None:
        return _run_taxonomy(args)
    if args.levels is None:
        raise CommandError("--levels is required (or give a taxonomy with --parents)")

    import torch

    from lmm_fast.hierarchy import Hierarchy, class_means, self_tuning_sigma
    from lmm_fast.hierarchy.checks import check_level_sizes

    if args.means is not None and (args.features is not None or args.labels is not None):
        raise CommandError("give either --means or --features/--labels, not both")
    if args.means is None and args.features is None:
        raise CommandError("give --features and --labels (or --means, or --parents)")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise CommandError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available")
    verbose = not args.quiet
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def log(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr, flush=True)

    log("loading inputs ...")
    names = _load_class_names(args.class_names) if args.class_names else None
    if args.means is not None:
        means = torch.as_tensor(_load_array(args.means, args.means_key, "means"))
        samples = None
    else:
        features = _load_array(args.features, args.features_key, "features")
        if args.labels is not None:
            labels = _load_array(args.labels, args.labels_key, "labels")
        elif os.path.splitext(args.features)[1].lower() in (".npz", ".pt", ".pth"):
            labels = _load_array(args.features, args.labels_key or "labels", "labels")
        else:
            raise CommandError("--labels is required unless --features is a .npz/.pt archive with a 'labels' entry")
        labels, names, named = _class_ids(labels, names)
        if named and args.num_classes is None:
            args.num_classes = len(names)
        features = torch.as_tensor(features)
        samples = features.shape[0] if features.dim() else 0
    timings["load"] = time.perf_counter() - start

    tick = time.perf_counter()
    if args.means is None:
        log("computing class means ...")
        means = class_means(features.to(device), torch.as_tensor(labels).to(device), args.num_classes)
        del features
    else:
        means = means.to(device)
        if args.num_classes is not None and means.shape[0] != args.num_classes:
            raise CommandError(f"--num-classes {args.num_classes} but the means have {means.shape[0]} rows")
    timings["class means"] = time.perf_counter() - tick
    # Fail on bad level sizes now rather than after the sigma search.
    check_level_sizes(args.levels, means.shape[0])

    tick = time.perf_counter()
    sigma = args.sigma
    if sigma is None:
        log("self-tuning sigma ...")
        sigma = self_tuning_sigma(means, metric=args.metric, seed=args.seed)
    timings["sigma"] = time.perf_counter() - tick

    tick = time.perf_counter()
    log(f"clustering {means.shape[0]} classes into levels {args.levels} ({args.method}) ...")
    extra = {"balance": args.balance} if args.method == "balanced" else {}
    h = Hierarchy.from_class_means(
        means,
        args.levels,
        method=args.method,
        metric=args.metric,
        sigma=sigma,
        seed=args.seed,
        class_names=names,
        progress=_show_progress(args),
        **extra,
    )
    timings["clustering"] = time.perf_counter() - tick

    written = _write_outputs(h, args, timings, means.cpu())
    total = time.perf_counter() - start

    if verbose:
        dim = means.shape[1]
        source = f"{samples} feature rows" if samples is not None else "class means"
        print(f"{PROG} hierarchy: {h.num_classes} classes, d = {dim}, from {source}")
        print(f"method {args.method}, metric {args.metric}, seed {args.seed}"
              + (f", balance {args.balance:g}" if args.method == "balanced" else ""))
        rule = "given" if args.sigma is not None else "self-tuned: median distance to the 7th nearest class"
        print(f"sigma = {h.sigma:.6g} ({rule})")
        for line in h.summary().splitlines()[1:]:
            print(line.strip())
        steps = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items())
        print(f"time: {steps}; total {total:.2f} s")
        print(f"wrote {' and '.join(written)}")
    return 0


def _run_taxonomy(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--features", args.features), ("--labels", args.labels),
                                      ("--means", args.means), ("--levels", args.levels)) if value is not None]
    if given:
        raise CommandError(f"--parents gives the levels itself: drop {', '.join(given)}")
    from lmm_fast.hierarchy import Hierarchy

    start = time.perf_counter()
    if not os.path.exists(args.parents):
        raise CommandError(f"taxonomy file {args.parents!r} does not exist")
    classes = _load_class_names(args.class_names) if args.class_names else None
    h = Hierarchy.from_parents(args.parents, classes=classes)
    if args.num_classes is not None and args.num_classes != h.num_classes:
        raise CommandError(f"--num-classes {args.num_classes} but the taxonomy has {h.num_classes} leaves")
    timings = {"read": time.perf_counter() - start}
    if args.plot:
        raise CommandError("--plot needs class means (features); with --parents use --plot-tree")
    written = _write_outputs(h, args, timings, None)
    if not args.quiet:
        depths = h.info["depths"]
        print(f"{PROG} hierarchy: {h.num_classes} classes (the leaves of {args.parents}), deepest class at depth "
              f"{h.info['deepest_class']}; upper levels = tree depths {depths}")
        for line in h.summary().splitlines()[1:]:
            print(line.strip())
        steps = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items())
        print(f"time: {steps}")
        print(f"wrote {' and '.join(written)}")
    return 0


def _write_outputs(h: Any, args: argparse.Namespace, timings: dict[str, float], means: Any) -> list[str]:
    from lmm_fast.hierarchy import plot_hierarchy, plot_tree

    tick = time.perf_counter()
    for path in args.output:
        h.export(path)
    timings["save"] = time.perf_counter() - tick
    written = list(args.output)
    if args.plot or args.plot_tree:
        tick = time.perf_counter()
        if args.plot:
            plot_hierarchy(h, args.plot, means, metric=args.metric)
            written.append(args.plot)
        if args.plot_tree:
            plot_tree(h, args.plot_tree)
            written.append(args.plot_tree)
        timings["plot"] = time.perf_counter() - tick
    return written


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------


def _add_compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from lmm_fast.compare import add_arguments

    parser = subparsers.add_parser(
        "compare",
        help="the LMM against the flat softmax: speed and memory, then accuracy on real data",
        description=(
            "Speed and memory of the fused loss, prediction and adaptation step against PyTorch "
            "(N = 1000, 10000, 100000), then the paper's Table I / Table IV comparisons, per-class "
            "changes, confidence, calibration and mistake severity over several seeds, on ICD-10-CM "
            "(pip install 'lmm_fast[demo]') or on your own --features/--labels. Writes JSON, CSV "
            "and PNG files to --out."
        ),
        epilog="examples: lmm-fast compare | lmm-fast compare --full | "
               "lmm-fast compare --features X.npy --labels y.npy --skip-speed",
    )
    add_arguments(parser)
    parser.set_defaults(handler=_run_compare)
    return parser


def _run_compare(args: argparse.Namespace) -> int:
    from lmm_fast.compare import run

    return run(args)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    _add_hierarchy_parser,
    _add_compare_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="lmm_fast: level-wise mixture model tools.")
    try:
        from lmm_fast import __version__ as version
    except ImportError:
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``lmm-fast``; returns the exit status (0 ok, 2 bad input or usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except (CommandError, ValueError, TypeError, OSError) as exc:
        # Input problems get one clear line, not a traceback.
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
