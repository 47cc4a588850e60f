"""Hierarchy-aware decisions (``lmm_fast.decide``) beside the prediction they follow.

Implementations on the same problem (B rows, upper levels, N classes):

* ``softmax`` — ``torch.softmax`` over ``[B, N]`` logits: the flat model's
  prediction, a lower bound on any posterior;
* ``predict_proba`` — ``FusedLMMLoss.predict_proba`` on packed logits of the
  hierarchy (the LMM's posterior);
* ``crm`` — ``decide.crm(proba, h, k=5)``;
* ``hedge`` — a fitted ``HedgePolicy`` answering every row;
* ``expected_distance`` — ``decide.expected_distance`` (the full ``[B, N]`` risk);
* ``crm_reference`` — the explicit ``N × N`` reference (small N only).

The target of the issue: ``crm`` and ``hedge`` cost at most 3 x ``predict_proba``
at N = 100 000, B = 1024 on the CPU.

One table of medians and ratios measured in one run (rounds interleaved, so
that load from other processes hits every implementation alike)::

    python benchmarks/bench_decide.py [--rounds 9] [--threads 2] [--case ...]

The hedging rules on a known posterior (accuracy, share at the class level,
mean depth and share answered with the root, per rule and target)::

    python benchmarks/bench_decide.py --hedging

pytest-benchmark (a smoke test with ``--benchmark-disable``)::

    pytest benchmarks/bench_decide.py --benchmark-disable
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any, Callable

import pytest
import torch

from lmm_fast import FusedLMMLoss
from lmm_fast.profiling import peak_extra_bytes, synchronize
from lmm_fast.decide import RULES, HedgePolicy, crm, expected_distance, hedge_report
from lmm_fast.reference.decide import crm_reference
from lmm_fast.hierarchy import Hierarchy

# name -> (batch, upper level sizes top first, N)
CASES = {
    "B1024-100,1000,100000": (1024, (100, 1000), 100_000),
    "B1024-10,100,10000": (1024, (10, 100), 10_000),
    "B256-10,100,2000": (256, (10, 100), 2_000),
}
SMOKE_CASE = "B256-10,100,2000"
IMPLS = ("softmax", "predict_proba", "crm", "hedge", "expected_distance", "crm_reference")
REFERENCE_MAX_N = 5_000
K = 5


# ---------------------------------------------------------------------------
# Timing (memory: lmm_fast.profiling)
# ---------------------------------------------------------------------------


def interleaved_medians(steps: dict[str, Callable[[], Any]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds of each step, one call of every step per round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------


def random_tree(upper: tuple[int, ...], num_classes: int, seed: int = 0) -> Hierarchy:
    """Nested random levels, every group non-empty (group sizes vary, as in real trees)."""
    gen = torch.Generator().manual_seed(seed)
    levels = []
    below = torch.arange(num_classes)
    lower = num_classes
    for size in reversed(upper):
        parent = torch.cat([torch.arange(size), torch.randint(0, size, (lower - size,), generator=gen)])
        parent = parent[torch.randperm(lower, generator=gen)]
        below = parent[below]
        levels.insert(0, below)
        lower = size
    return Hierarchy.from_assignments(levels)


def make_steps(case: str, device: str, impls=IMPLS) -> dict[str, Callable[[], Any]]:
    """No-argument callables, one per implementation, on one fixed problem."""
    batch, upper, n = CASES[case]
    h = random_tree(upper, n)
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(batch, sum(upper) + n, generator=gen)).to(device)
    loss_fn = FusedLMMLoss.from_hierarchy(h).to(device)
    bottom = logits[:, -n:].contiguous()
    proba = loss_fn.predict_proba(logits)
    target = torch.multinomial(proba.cpu().double(), 1, generator=gen).squeeze(1).to(device)
    policy = HedgePolicy.fit(proba, target, h, accuracy=0.9)
    steps = {
        "softmax": lambda: torch.softmax(bottom, dim=1),
        "predict_proba": lambda: loss_fn.predict_proba(logits),
        "crm": lambda: crm(proba, h, K),
        "hedge": lambda: policy(proba),
        "expected_distance": lambda: expected_distance(proba, h),
    }
    if n <= REFERENCE_MAX_N:
        steps["crm_reference"] = lambda: crm_reference(proba, h, K)
    return {name: step for name, step in steps.items() if name in impls}


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_decide(benchmark, impl):
    steps = make_steps(SMOKE_CASE, "cpu")
    step = steps[impl]
    if impl in ("crm", "crm_reference"):
        # The benchmark doubles as a check: CRM agrees with its N x N reference here.
        assert torch.equal(steps["crm"](), steps["crm_reference"]())
    benchmark.extra_info["peak_extra_mib"] = round(peak_extra_bytes(step, "cpu") / 2**20, 2)
    benchmark(step)


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def table(rounds: int, device: str, cases=None) -> list[dict]:
    rows = []
    for case in cases or CASES:
        steps = make_steps(case, device)
        medians = interleaved_medians(steps, rounds, device)
        for impl, seconds in medians.items():
            rows.append(
                dict(
                    case=case,
                    impl=impl,
                    median_ms=1e3 * seconds,
                    vs_softmax=seconds / medians["softmax"],
                    vs_predict_proba=seconds / medians["predict_proba"],
                    peak_mib=peak_extra_bytes(steps[impl], device) / 2**20,
                )
            )
    return rows


def hierarchical_posterior(rows: int, h: Hierarchy, concentration: float = 0.4, seed: int = 0) -> torch.Tensor:
    """Posteriors sure of a subtree more often than of a class: Dirichlet
    weights among the children of every node, multiplied down the tree."""
    gen = torch.Generator().manual_seed(seed)
    groups = h.assignments + [torch.arange(h.num_classes)]
    sizes = h.level_sizes + [h.num_classes]
    p = torch.ones(rows, h.num_classes, dtype=torch.float64)
    parent, parent_size = torch.zeros(h.num_classes, dtype=torch.int64), 1
    for g, k in zip(groups, sizes):
        w = torch._standard_gamma(torch.full((rows, k), concentration, dtype=torch.float64), generator=gen)
        node_parent = torch.zeros(k, dtype=torch.int64).scatter_(0, g, parent)
        norm = torch.zeros(rows, parent_size, dtype=torch.float64).index_add_(1, node_parent, w)
        p = p * (w / norm[:, node_parent])[:, g]
        parent, parent_size = g, k
    return p / p.sum(dim=1, keepdim=True)


def hedging_table(num_val: int = 5000, num_test: int = 20000, seed: int = 0) -> list[dict]:
    """The three rules fitted on ``num_val`` rows of a known, calibrated
    posterior over a 24-class tree (levels 3, 8), evaluated on ``num_test``."""
    h = random_tree((3, 8), 24, seed=15)
    proba = hierarchical_posterior(num_val + num_test, h, seed=seed)
    y = torch.multinomial(proba, 1, generator=torch.Generator().manual_seed(seed + 1)).squeeze(1)
    val, test = slice(0, num_val), slice(num_val, None)
    return hedge_report(proba[val], y[val], proba[test], y[test], h, accuracies=(0.90, 0.95, 0.99), rules=RULES)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", action="append", choices=list(CASES), help="repeatable; default all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--hedging", action="store_true", help="the hedging table on a known posterior instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hedging:
        print("# known calibrated posterior, 24 classes, levels (3, 8); fitted on 5000 rows, tested on 20000")
        print(f"{'rule':<18} {'target':>7} {'threshold':>10} {'accuracy':>9} {'class':>7} {'depth':>6} {'root':>6}")
        for row in hedging_table():
            print(
                f"{row['rule']:<18} {row['target']:>7.2f} {row['threshold']:>10.4f} {row['accuracy']:>9.4f} "
                f"{row['class_share']:>7.3f} {row['mean_depth']:>6.3f} {row['root_share']:>6.3f}"
            )
        return
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, {args.rounds} rounds, k = {K}"
    )
    print(f"{'case':<24} {'impl':<18} {'median ms':>10} {'x softmax':>10} {'x predict':>10} {'peak MiB':>9}")
    for row in table(args.rounds, args.device, args.case):
        print(
            f"{row['case']:<24} {row['impl']:<18} {row['median_ms']:>10.2f} {row['vs_softmax']:>10.2f} "
            f"{row['vs_predict_proba']:>10.2f} {row['peak_mib']:>9.1f}"
        )


if __name__ == "__main__":
    main()
