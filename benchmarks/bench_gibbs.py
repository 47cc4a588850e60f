"""Collapsed Gibbs adaptation of Ψ: sampler throughput and the cost of a step.

* **sampler**: the batched op (``gibbs_sample``) beside the same sampler in
  plain PyTorch (``lmm_fast.reference.gibbs.gibbs_sample_torch``: softmax, gathered
  counts, ``torch.multinomial``), in candidate evaluations per second
  (images × Σ_upper N_l per second). Target: >= 2e8/s on 2 CPU cores.
* **step vs loss**: one ``GibbsAdapter.step`` (sampling, count update and the
  Ψ update, validation included) against one fused loss forward + backward on
  the same batches, B = 256, levels (10, 100, 1000, N = 10 000). Target:
  <= 25 %. Both go round the same 4 batches (44 MB of logits, more than the
  last-level cache), so both read cold logits, as each other would in a
  training loop; the sampling op alone repeats one (cached) batch.
  Two kinds of logits: ``trained`` (each image's class group leads by 8 at
  every level, as after warm-up: few images change group) and ``random``
  (3·randn: most labels move; the worst case, above all for the
  non-overlapping constraint, whose owner bookkeeping grows with the number
  of changed groups).
* **bandwidth** (CUDA only): the sampler's effective read bandwidth of logits
  and counts against the copy bandwidth torch measures on the same device.
  Target: >= 50 %.

Printed tables (medians of repeated runs in one process):

    python benchmarks/bench_gibbs.py [--repeats 15] [--device cpu|cuda] [--threads 1]

pytest-benchmark: ``pytest benchmarks/bench_gibbs.py --benchmark-columns=median,iqr,rounds``.
"""
from __future__ import annotations

import argparse
import statistics

import pytest
import torch

from lmm_fast import FusedLMMLoss, GibbsAdapter
from lmm_fast.ops import gibbs as ops
from lmm_fast.profiling import measure_time
from lmm_fast.hierarchy import Hierarchy
from lmm_fast.reference.gibbs import gibbs_sample_torch
from lmm_fast.testing import devices

LEVELS = (10, 100, 1000, 10_000)
IMAGES_PER_CLASS = 50
SAMPLER_BATCHES = (256, 4096)
REGIMES = ("trained", "random")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def tree(levels=LEVELS):
    """Nested tree: class y's group at a level of size k is y * k // N."""
    n = levels[-1]
    return Hierarchy.from_assignments([torch.arange(n) * k // n for k in levels[:-1]])


class Problem:
    """A training set of IMAGES_PER_CLASS images per class, its adapter and loss,
    and a few batches of logits of the given regime."""

    def __init__(self, batch, device, regime="trained", non_overlapping=False, levels=LEVELS, batches=4):
        gen = torch.Generator().manual_seed(0)
        self.h = tree(levels)
        n = levels[-1]
        self.targets = torch.arange(n).repeat(IMAGES_PER_CLASS)
        self.loss_fn = FusedLMMLoss.from_hierarchy(self.h).to(device)
        self.adapter = GibbsAdapter(self.loss_fn, self.h, self.targets.to(device), beta=1.0,
                                    non_overlapping=non_overlapping)
        width = sum(levels)
        self.batches = []
        groups = torch.stack(self.h.assignments, 1)
        offsets = torch.tensor([0] + list(torch.tensor(levels[:-2]).cumsum(0)))
        for _ in range(batches):
            idx = torch.randperm(self.targets.numel(), generator=gen)[:batch]
            target = self.targets[idx]
            logits = 3 * torch.randn(batch, width, generator=gen)
            if regime == "trained":
                logits = torch.randn(batch, width, generator=gen)
                rows = torch.arange(batch)[:, None]
                logits[rows, groups[target] + offsets] += 8.0
                logits[torch.arange(batch), width - n + target] += 8.0
            self.batches.append((logits.to(device), target.to(device), idx.to(device)))
        self.device = device
        self.turn = 0

    def next_batch(self):
        self.turn = (self.turn + 1) % len(self.batches)
        return self.batches[self.turn]

    def sampler_args(self, batch_index=0):
        logits, target, idx = self.batches[batch_index]
        a = self.adapter
        return (logits, target, a.labels[idx], a.counts_t, a.group_totals, a.beta, a.beta0,
                a.level_sizes + [a.num_classes])

    @property
    def candidates(self):
        return self.batches[0][0].shape[0] * sum(self.adapter.level_sizes)


def sampler_fn(problem, impl):
    args = problem.sampler_args()
    idx = problem.batches[0][2]
    if impl == "lmm_fast":
        return lambda: ops.gibbs_sample(*args, 0, 0, idx)
    gen = torch.Generator(device=problem.device).manual_seed(0)
    return lambda: gibbs_sample_torch(*args, generator=gen)


def step_fn(problem):
    problem.adapter.step(*problem.next_batch())  # the first step rewrites all of Ψ: keep it out

    def run():
        problem.adapter.step(*problem.next_batch())

    return run


def loss_fn_step(problem):
    """The loss forward + backward on the step's batches, in the same rotation,
    so that both see their logits equally cold or warm in the caches."""
    batches = [(logits.clone().requires_grad_(), target) for logits, target, _ in problem.batches]
    turn = [0]

    def run():
        turn[0] = (turn[0] + 1) % len(batches)
        logits, target = batches[turn[0]]
        logits.grad = None
        problem.loss_fn(logits, target).backward()

    return run


# ------------------------------------------------------------ pytest-benchmark
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", ["lmm_fast", "torch"])
@pytest.mark.parametrize("batch", SAMPLER_BATCHES)
def test_gibbs_sampler(benchmark, batch, impl, device):
    problem = Problem(batch, device, batches=1)
    fn = sampler_fn(problem, impl)
    fn()
    benchmark.extra_info["candidates"] = problem.candidates

    def run():
        fn()
        _sync(device)

    benchmark(run)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("non_overlapping", [False, True])
@pytest.mark.parametrize("regime", REGIMES)
def test_adapter_step(benchmark, regime, non_overlapping, device):
    problem = Problem(256, device, regime, non_overlapping)
    fn = step_fn(problem)

    def run():
        fn()
        _sync(device)

    benchmark(run)


@pytest.mark.parametrize("device", devices())
def test_loss_forward_backward_same_batch(benchmark, device):
    fn = loss_fn_step(Problem(256, device))  # the step test's 4 batches, in turn
    fn()

    def run():
        fn()
        _sync(device)

    benchmark(run)


# -------------------------------------------------------------------- tables
def median_ms(fn, device, repeats):
    return 1e3 * statistics.median(measure_time(fn, device, repeats=repeats, warmup=2))


def sampler_table(device, repeats):
    print(f"\nsampler, levels {LEVELS} ({device}); candidates = B x {sum(LEVELS[:-1])}")
    print(f"{'B':>6} {'impl':>9} {'median ms':>10} {'cand/s':>10} {'torch/ours':>10}")
    for batch in SAMPLER_BATCHES:
        problem = Problem(batch, device, batches=1)
        times = {impl: median_ms(sampler_fn(problem, impl), device, repeats) for impl in ("lmm_fast", "torch")}
        for impl, ms in times.items():
            ratio = f"{times['torch'] / times['lmm_fast']:10.1f}" if impl == "lmm_fast" else ""
            print(f"{batch:>6} {impl:>9} {ms:10.3f} {problem.candidates / ms * 1e3:10.3g} {ratio}")


def step_table(device, repeats):
    print(f"\nadapter.step vs fused loss fwd+bwd, B=256, levels {LEVELS} ({device}); "
          f"'sample' is the sampling op alone, 'moved' the share of (image, level) labels that changed")
    print(f"{'regime':>8} {'TC':>5} {'step ms':>8} {'sample ms':>9} {'loss ms':>8} {'step/loss':>9} "
          f"{'sample/loss':>11} {'moved':>6}")
    for regime in REGIMES:
        for non_overlapping in (False, True):
            problem = Problem(256, device, regime, non_overlapping)
            step = step_fn(problem)
            loss = loss_fn_step(problem)
            sample = sampler_fn(problem, "lmm_fast")
            # interleave the three so that load from other processes hits all alike
            times = {"step": [], "sample": [], "loss": []}
            for _ in range(3):
                for name, fn in (("step", step), ("sample", sample), ("loss", loss)):
                    times[name].append(median_ms(fn, device, max(3, repeats // 3)))
            st, sa, lo = (statistics.median(times[k]) for k in ("step", "sample", "loss"))
            logits, target, idx = problem.batches[0]
            old = problem.adapter.labels[idx].clone()
            moved = (problem.adapter.step(logits, target, idx) != old).float().mean().item()
            print(f"{regime:>8} {str(non_overlapping):>5} {st:8.2f} {sa:9.2f} {lo:8.2f} {st / lo:9.1%} "
                  f"{sa / lo:11.1%} {moved:6.1%}")


def bandwidth_table(repeats):
    device = "cuda"
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, repeats)
    copy_bw = 2 * src.numel() * 4 / copy_ms * 1e3
    del src, dst
    print(f"\nCUDA copy bandwidth: {copy_bw / 1e9:.0f} GB/s; sampler reading float32 upper-level logits "
          f"and int32 counts, levels {LEVELS}")
    print(f"{'B':>6} {'median ms':>10} {'cand/s':>10} {'GB/s read':>10} {'of copy':>8}")
    problem = Problem(256, device, batches=1)
    a = problem.adapter
    gen = torch.Generator(device=device).manual_seed(0)
    for batch in (4096, 16384, 65536):
        idx = torch.randint(0, a.num_images, (batch,), device=device, generator=gen)
        logits = 3 * torch.randn(batch, a.upper_width, device=device, generator=gen)
        args = (logits, a.train_targets[idx], a.labels[idx], a.counts_t, a.group_totals, a.beta, a.beta0,
                a.level_sizes + [a.num_classes], 0, 0, idx)
        ms = median_ms(lambda: ops.gibbs_sample(*args), device, repeats)
        candidates = batch * a.upper_width
        bw = candidates * (4 + 4) / ms * 1e3  # one float32 logit and one int32 count per candidate
        print(f"{batch:>6} {ms:10.3f} {candidates / ms * 1e3:10.3g} {bw / 1e9:10.0f} {bw / copy_bw:8.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = [args.device] if args.device else devices()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in chosen:
        sampler_table(device, args.repeats)
        step_table(device, args.repeats)
        if device == "cuda":
            bandwidth_table(args.repeats)


if __name__ == "__main__":
    main()
