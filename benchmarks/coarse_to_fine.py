"""Coarse-to-fine prediction (``LMMHead.predict_topk(x, k, beam=b)``) against
the full prediction: its speed-up and the top-1 / top-5 accuracy it gives up.

Synthetic data with a planted hierarchy, so that accuracy means something:
every class mean is the sum of a random vector per ancestor group (levels
weighted 3 : 2 : 1 from the top) and one of its own, each ``N(0, I_d)``, and a
sample is its class mean plus ``N(0, noise² I_d)``. The flat classifier is the
Bayes rule of these unit-variance classes (``w_y = μ_y``,
``b_y = −|μ_y|²/2``); ``LMMHead.from_flat`` turns it into a head over the
planted tree (group rows = the members' mean), predicted with the
hierarchy's Ψ and the default θ. Both predictions start from the features:
the full one is the head's GEMM over all ``ΣN_l`` rows and the fused top-k
kernel, the coarse-to-fine one scores ``N_1 + b·(children)`` rows per sample.

    python benchmarks/coarse_to_fine.py [--classes 10000 100000] [--beams 1 2 4 8 16]

Times are medians over ``--rounds`` interleaved rounds (the machine may be
shared: every method sees the same load).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from lmm_fast import LMMHead
from lmm_fast.hierarchy import Hierarchy

# N -> upper level sizes (a balanced tree of about 20 children per node)
LEVELS = {10_000: (25, 500), 100_000: (100, 2_000)}


def planted_tree(num_classes: int, level_sizes, gen: torch.Generator) -> Hierarchy:
    """A random balanced nested tree: classes dealt to the leaves, leaves to their parents."""
    assignments = []
    child = torch.randperm(num_classes, generator=gen) % level_sizes[-1]  # class -> last-level group
    assignments.append(child)
    for size in reversed(level_sizes[:-1]):
        lower = int(assignments[-1].max()) + 1
        parent = torch.randperm(lower, generator=gen) % size
        assignments.append(parent[assignments[-1]])
    return Hierarchy.from_assignments(list(reversed(assignments)))


def planted_problem(num_classes: int, dim: int, samples: int, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    level_sizes = LEVELS.get(num_classes) or (max(2, round(num_classes ** (1 / 3))), max(4, round(num_classes ** (2 / 3))))
    h = planted_tree(num_classes, list(level_sizes), gen)
    means = torch.randn(num_classes, dim, generator=gen)
    for level, groups in enumerate(h.assignments):
        weight = 3.0 - level
        means += weight * torch.randn(h.level_sizes[level], dim, generator=gen)[groups]
    target = torch.randint(0, num_classes, (samples,), generator=gen)
    x = means[target] + noise * torch.randn(samples, dim, generator=gen)
    flat = nn.Linear(dim, num_classes)
    with torch.no_grad():
        flat.weight.copy_(means)
        flat.bias.copy_(-0.5 * means.square().sum(1))
    return h, flat, x, target


def accuracy(indices: torch.Tensor, target: torch.Tensor, k: int) -> float:
    return float((indices[:, :k] == target.unsqueeze(1)).any(1).double().mean())


def run(num_classes: int, beams, dim: int, samples: int, noise: float, rounds: int, seed: int) -> list[dict]:
    h, flat, x, target = planted_problem(num_classes, dim, samples, noise, seed)
    head = LMMHead.from_flat(flat, h)
    methods = {"full": lambda: head.predict_topk(x, 5)}
    for b in beams:
        methods[f"beam={b}"] = (lambda b=b: head.predict_topk(x, 5, beam=b))
    results = {name: fn() for name, fn in methods.items()}  # warm-up, and the predictions
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    full_time = statistics.median(times["full"])
    full_top1 = accuracy(results["full"][1], target, 1)
    full_top5 = accuracy(results["full"][1], target, 5)
    rows = []
    for name in methods:
        _, indices = results[name]
        median = statistics.median(times[name])
        top1, top5 = accuracy(indices, target, 1), accuracy(indices, target, 5)
        rows.append(
            dict(
                N=num_classes,
                levels=h.level_sizes + [num_classes],
                method=name,
                median_ms=1e3 * median,
                speedup=full_time / median,
                top1=top1,
                top5=top5,
                top1_lost=full_top1 - top1,
                top5_lost=full_top5 - top5,
                same_top1=float((indices[:, 0] == results["full"][1][:, 0]).double().mean()),
            )
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1024, help="test samples (one batch)")
    parser.add_argument("--noise", type=float, default=3.0, help="feature noise (3: flat top-1 0.74 / 0.62 at N = 1e4 / 1e5)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's choice); 1 avoids waiting on a busy core at every parallel op",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"d = {args.dim}, {args.samples} samples in one batch, {args.rounds} rounds, k = 5"
    )
    print(
        f"{'N':>7} {'levels':<20} {'method':<8} {'median ms':>10} {'speed-up':>9} "
        f"{'top-1':>6} {'top-5':>6} {'top-1 lost':>10} {'top-5 lost':>10} {'same top-1':>10}"
    )
    for n in args.classes:
        for row in run(n, args.beams, args.dim, args.samples, args.noise, args.rounds, args.seed):
            print(
                f"{row['N']:>7} {str(row['levels']):<20} {row['method']:<8} {row['median_ms']:>10.2f} "
                f"{row['speedup']:>9.2f} {row['top1']:>6.3f} {row['top5']:>6.3f} "
                f"{row['top1_lost']:>+10.3f} {row['top5_lost']:>+10.3f} {row['same_top1']:>10.3f}"
            )


if __name__ == "__main__":
    main()
