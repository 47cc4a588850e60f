"""Prediction, ``P(y | x) = Σ_l θ_l softmax(a^l) Ψ^l`` and its top k, beside PyTorch.

Implementations on the same logits:

* ``softmax_bottom`` — ``torch.softmax`` over the bottom N columns alone
  (contiguous): the flat model's prediction, the yardstick;
* ``lmm_fast`` — ``FusedLMMLoss.predict_proba`` (the gather kernel for a tree
  Ψ, the GEMM kernel for a dense one);
* ``reference`` — ``lmm_fast.reference.predict_proba_reference``, the model
  as one writes it in PyTorch (one ``[B, N]`` product per level);
* ``topk_lmm_fast`` — ``lmm_fast.predict_topk`` (k = 5, partial selection,
  no ``[B, N]`` output);
* ``topk_reference`` — the reference, then ``torch.topk``.

pytest-benchmark::

    pytest benchmarks/bench_predict.py --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds

One table of medians and ratios measured in one run (rounds interleaved, so
that load from other processes hits every implementation alike)::

    python benchmarks/bench_predict.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import pytest
import torch

import lmm_fast
from lmm_fast import FusedLMMLoss, default_theta
from lmm_fast.profiling import peak_extra_bytes
from lmm_fast.reference.loss import predict_proba_reference
from lmm_fast.testing import dense_psi, devices, tree_psi

# name -> (batch, level sizes top first with N last, dense Ψ)
CASES = {
    "B1024-10,100,10000-tree": (1024, (10, 100, 10_000), False),
    "B1024-10,100,10000-dense": (1024, (10, 100, 10_000), True),
    "B256-10,100,1000-tree": (256, (10, 100, 1_000), False),
    "B64-32,1000,100000-tree": (64, (32, 1_000, 100_000), False),
}
IMPLS = ("softmax_bottom", "lmm_fast", "reference", "topk_lmm_fast", "topk_reference")
K = 5


def _problem(batch, level_sizes, dense, device):
    gen = torch.Generator().manual_seed(0)
    psi = (dense_psi if dense else tree_psi)(level_sizes, gen)
    theta = default_theta(len(level_sizes))
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=level_sizes[-1]).to(device)
    return logits, loss_fn


def make_step(impl, batch, level_sizes, dense, device):
    """A no-argument callable running ``impl`` once on a fixed problem."""
    logits, loss_fn = _problem(batch, level_sizes, dense, device)
    n = level_sizes[-1]
    psi = [p.clone() for p in loss_fn.psi]
    theta = loss_fn.theta
    if impl == "softmax_bottom":
        bottom = logits[:, -n:].contiguous()
        return lambda: torch.softmax(bottom, dim=1)
    if impl == "lmm_fast":
        return lambda: loss_fn.predict_proba(logits)
    if impl == "reference":
        return lambda: predict_proba_reference(logits, psi, theta)
    if impl == "topk_lmm_fast":
        return lambda: lmm_fast.predict_topk(logits, loss_fn, K)
    if impl == "topk_reference":
        return lambda: torch.topk(predict_proba_reference(logits, psi, theta), K, dim=1)
    raise ValueError(impl)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_predict(benchmark, case, impl, device):
    batch, level_sizes, dense = CASES[case]
    step = make_step(impl, batch, level_sizes, dense, device)
    step()  # warm-up: tree detection, first-call allocations
    peak = peak_extra_bytes(step, device) / 2**20
    benchmark.extra_info["peak_extra_mib"] = round(peak, 2)
    benchmark.extra_info["batch"] = batch
    benchmark.extra_info["level_sizes"] = list(level_sizes)

    def run():
        step()
        _sync(device)

    benchmark(run)


def table(rounds: int, device: str, cases=None) -> list[dict]:
    """Median wall time of every implementation per case, rounds interleaved."""
    rows = []
    for case in cases or CASES:
        batch, level_sizes, dense = CASES[case]
        steps = {impl: make_step(impl, batch, level_sizes, dense, device) for impl in IMPLS}
        times = {impl: [] for impl in IMPLS}
        for step in steps.values():
            step()
        for _ in range(rounds):
            for impl, step in steps.items():
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                times[impl].append(time.perf_counter() - start)
        medians = {impl: statistics.median(t) for impl, t in times.items()}
        for impl in IMPLS:
            rows.append(
                dict(
                    case=case,
                    impl=impl,
                    median_ms=1e3 * medians[impl],
                    vs_softmax=medians[impl] / medians["softmax_bottom"],
                    peak_mib=peak_extra_bytes(steps[impl], device) / 2**20,
                )
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", action="append", choices=list(CASES), help="repeatable; default all")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's choice); 1 avoids waiting on a busy core at every parallel op",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, {args.rounds} rounds, k = {K}"
    )
    print(f"{'case':<28} {'impl':<16} {'median ms':>10} {'x softmax':>10} {'peak MiB':>9}")
    for row in table(args.rounds, args.device, args.case):
        print(
            f"{row['case']:<28} {row['impl']:<16} {row['median_ms']:>10.2f} "
            f"{row['vs_softmax']:>10.2f} {row['peak_mib']:>9.1f}"
        )


if __name__ == "__main__":
    main()
