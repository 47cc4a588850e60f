"""The fused linear + LMM loss (``FusedLinearLMMLoss``), one training step
(forward + backward), beside what it replaces.

Rows of the table, all on the same features, weights and targets:

* ``unfused`` — ``LMMHead`` + ``FusedLMMLoss``: the head's GEMM makes all
  ``[B, ΣN_l]`` logits, the fused loss kernels their gradient;
* ``fused`` — ``FusedLinearLMMLoss`` (default memory budget);
* ``linear+cross_entropy`` — ``nn.Linear(d, N)`` + ``F.cross_entropy`` on the
  N class columns only: the flat softmax, unfused;
* ``chunked_torch`` — the fused op's chunking in plain PyTorch
  (``lmm_fast.reference.linear_loss.linear_lmm_loss_chunked_torch``);
* ``gemm_floor`` — the step's three GEMMs (``6 · B · d · ΣN_l`` FLOPs) at the
  GEMM rate measured on this machine: no implementation can beat it.

Time: median of interleaved rounds (each round runs every row once, so load
from other processes hits all alike). Memory: peak bytes allocated during one
step above what was allocated before it, less the gradients the step leaves
behind (``x.grad``, ``W.grad``, ``b.grad``): the extra memory beyond the
inputs, the weight and their gradients. On the CPU it is replayed from the
profiler's allocation events, in a child process with the loss kernel's CPU
gradient-storage cache off (``FusedLMMLoss.grad_cache = False``), since that cache
keeps the unfused gradient's storage alive between steps where the profiler
cannot see it; the times are taken with the cache on, as users run.

    PYTHONPATH=src python benchmarks/bench_linear_loss.py [--rounds 5] [--device cpu] [--scale] [--scale-verify]
    PYTHONPATH=src pytest benchmarks/bench_linear_loss.py --benchmark-disable     # quick smoke test

``--scale`` adds the largest N that trains at B = 4096, d = 512 within 8 GiB
(fused against unfused), from the memory measured at a few N;
``--scale-verify`` then runs one fused step at the fused bound and reports its
measured peak. The GPU table (B = 16384, d = 2048, levels (100, 1000, 131072),
bfloat16) runs only when CUDA is available.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from lmm_fast import FusedLinearLMMLoss, Hierarchy
from lmm_fast.linear_loss import chunk_rows_for_budget
from lmm_fast.ops import accumulate_dtype
from lmm_fast.ops import loss as loss_ops
from lmm_fast.profiling import measure_time, peak_extra_bytes, synchronize
from lmm_fast.reference.linear_loss import linear_lmm_loss_chunked_torch

CPU_CASE = dict(batch=2048, dim=256, level_sizes=(32, 1024, 32768), dtype="float32", device="cpu")
GPU_CASE = dict(batch=16384, dim=2048, level_sizes=(100, 1000, 131072), dtype="bfloat16", device="cuda")
# A small problem with a budget of 16 rows' logits and their gradient, so
# that it runs in 4 chunks.
SMOKE_CASE = dict(batch=64, dim=32, level_sizes=(4, 32, 512), dtype="float32", device="cpu",
                  memory_budget=2 * 16 * 548 * 4)
SCALE = dict(batch=4096, dim=512, upper=(32, 1024), budget_gib=8.0, probe_classes=(8192, 16384, 32768))
IMPLS = ("unfused", "fused", "linear+cross_entropy", "chunked_torch")
# Cut Cross-Entropy's published forward memory for a 256K vocabulary (Wijmans
# et al., 2024): about 1 MB. A figure from the paper, not measured here.
CCE_PUBLISHED_FORWARD_BYTES = 1 * 2**20


# ---------------------------------------------------------------------------
# Timing and memory helpers
# ---------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call (CUDA synchronised around it)."""
    return measure_time(fn, device, repeats=1, warmup=0)[0]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------
# Problems and steps
# ---------------------------------------------------------------------------


def random_tree(level_sizes, seed: int = 0) -> Hierarchy:
    """Nested random groups (none empty) for the upper levels of ``level_sizes``."""
    gen = torch.Generator().manual_seed(seed)
    n = level_sizes[-1]
    assignments, previous, lower = [], torch.arange(n), n
    for size in reversed(level_sizes[:-1]):
        parent = torch.cat([torch.arange(size), torch.randint(0, size, (lower - size,), generator=gen)])
        parent = parent[torch.randperm(lower, generator=gen)]
        previous = parent[previous]
        assignments.append(previous)
        lower = size
    return Hierarchy.from_assignments(list(reversed(assignments)))


@dataclass
class Problem:
    x: torch.Tensor
    target: torch.Tensor
    fused: FusedLinearLMMLoss
    flat: torch.nn.Linear
    device: str

    @property
    def leaves(self):
        return [self.x, self.fused.weight, self.fused.bias]


def make_problem(batch, dim, level_sizes, dtype, device, seed=0, **fused_kwargs) -> Problem:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)  # the layers' own initialisation
    gen = torch.Generator().manual_seed(seed)
    h = random_tree(list(level_sizes), seed)
    fused = FusedLinearLMMLoss(dim, h, init_std=0.05, device=device, dtype=dtype, **fused_kwargs)
    with torch.no_grad():
        fused.bias.normal_(0, 0.1)
    flat = torch.nn.Linear(dim, level_sizes[-1], device=device, dtype=dtype)
    x = torch.randn(batch, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, level_sizes[-1], (batch,), generator=gen).to(device)
    return Problem(x, target, fused, flat, device)


def fused_chunk_rows(problem: Problem) -> int:
    fused = problem.fused
    if fused.chunk_rows is not None:
        return fused.chunk_rows
    width = sum(fused.level_sizes)
    rows = min(problem.x.shape[0], chunk_rows_for_budget(fused.memory_budget, width, problem.x.dtype, problem.device))
    count = -(-problem.x.shape[0] // rows)
    return -(-problem.x.shape[0] // count)


def _clear(problem: Problem) -> None:
    """Drop every gradient (outside the measured calls: freeing the last
    step's gradients inside one would lower its baseline)."""
    for p in (problem.x, *problem.fused.parameters(), *problem.flat.parameters()):
        p.grad = None


def steps(problem: Problem) -> dict[str, Callable[[], None]]:
    """One training step per implementation, from cleared gradients."""
    x, target, fused, flat = problem.x, problem.target, problem.fused, problem.flat

    def unfused():
        fused.lmm_loss(fused.head(x), target).backward()

    def fused_step():
        fused(x, target).backward()

    def cross_entropy():
        F.cross_entropy(flat(x), target).backward()

    rows = fused_chunk_rows(problem)

    def chunked_torch():
        _, gx, gw, gb = linear_lmm_loss_chunked_torch(
            x, fused.weight, fused.bias, target, fused.lmm_loss.psi, fused.theta, rows
        )
        x.grad, fused.weight.grad, fused.bias.grad = gx, gw, gb

    return {"unfused": unfused, "fused": fused_step, "linear+cross_entropy": cross_entropy,
            "chunked_torch": chunked_torch}


def _grad_bytes(problem: Problem, impl: str) -> int:
    params = [problem.x, problem.flat.weight, problem.flat.bias] if impl == "linear+cross_entropy" else problem.leaves
    return _nbytes(*(p.grad for p in params))


def measure_memory(problem: Problem, impls=IMPLS, warmup: bool = True) -> dict[str, int]:
    """Peak extra bytes of one step of each implementation (after a warm-up
    step), less the gradients it leaves behind."""
    out = {}
    for name, step in steps(problem).items():
        if name not in impls:
            continue
        _clear(problem)
        if warmup:
            step()
            _clear(problem)
        peak = peak_extra_bytes(step, problem.device)
        out[name] = peak - _grad_bytes(problem, name)
    _clear(problem)
    return out


def gemms(problem: Problem) -> Callable[[], None]:
    """The step's three GEMMs alone, at full size into preallocated outputs:
    logits ``x Wᵀ``, ``grad_x = G W``, ``grad_W = Gᵀ x``."""
    x, weight = problem.x.detach(), problem.fused.weight.detach()
    logits = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    grad_x, grad_w = torch.empty_like(x), torch.empty_like(weight)

    def run():
        torch.mm(x, weight.t(), out=logits)
        torch.mm(logits, weight, out=grad_x)
        torch.mm(logits.t(), x, out=grad_w)

    return run


def measure_times(problem: Problem, rounds: int, impls=IMPLS) -> dict[str, list[float]]:
    """Seconds per step, rounds interleaved across the implementations (and
    the bare GEMMs, ``"gemms"``)."""
    fns = {k: v for k, v in steps(problem).items() if k in impls}
    fns["gemms"] = gemms(problem)
    for fn in fns.values():
        _clear(problem)
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _clear(problem)
            times[name].append(_timed(fn, problem.device))
    _clear(problem)
    return times


def _memory_in_child(case: dict, impls=IMPLS, warmup: bool = True) -> dict[str, int]:
    """measure_memory in a child process with the CPU gradient cache off
    (plus ``"resident"``: the bytes of the inputs, weight, bias, Ψ and θ, and
    ``"grads"``: of their gradients)."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-json", json.dumps(dict(case, impls=list(impls), warmup=warmup))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def main_table(case: dict, rounds: int, memory_in_child: bool = True) -> tuple[str, dict]:
    problem = make_problem(**case)
    width = sum(case["level_sizes"])
    batch, dim = case["batch"], case["dim"]
    memory = _memory_in_child(case) if memory_in_child else measure_memory(problem)
    samples = measure_times(problem, rounds)
    times = {k: statistics.median(v) for k, v in samples.items()}
    # The GEMM rate is the best of the rounds (the least disturbed by other
    # load): the floor is a lower bound, so it takes the fastest GEMMs seen.
    rate = 6 * batch * dim * width / min(samples["gemms"])
    floor = 6 * batch * dim * width / rate
    elem = problem.x.element_size()
    logits_and_grad = 2 * batch * width * elem
    with torch.no_grad():
        fused_loss = float(problem.fused(problem.x, problem.target))
        unfused_loss = float(problem.fused.lmm_loss(problem.fused.head(problem.x), problem.target))
    lines = [
        f"B={batch}, d={dim}, levels {tuple(case['level_sizes'])}, {case['dtype']}, {case['device']}, "
        f"chunk {fused_chunk_rows(problem)} rows (default budget), {rounds} interleaved rounds",
        f"unfused logits + gradient: 2 x B x sum(N_l) x {elem} B = {_mib(logits_and_grad)} MiB; "
        f"GEMM rate measured {rate / 1e9:,.0f} GFLOP/s (best round; median round "
        f"{6 * batch * dim * width / times['gemms'] / 1e9:,.0f}); loss fused {fused_loss:.6f} / unfused "
        f"{unfused_loss:.6f}",
        "",
        f"{'implementation':<22} {'median ms':>10} {'x unfused':>10} {'peak extra MiB':>15} {'% of unfused logits+grad':>25}",
    ]
    for name in IMPLS:
        lines.append(
            f"{name:<22} {times[name] * 1e3:>10.1f} {times[name] / times['unfused']:>10.3f} "
            f"{_mib(memory[name]):>15} {100 * memory[name] / logits_and_grad:>24.2f}%"
        )
    lines.append(f"{'gemm_floor':<22} {floor * 1e3:>10.1f} {floor / times['unfused']:>10.3f} {'':>15} {'':>25}")
    lines.append(f"(load average {os.getloadavg()[0]:.1f} after the rounds)")
    result = dict(case=case, times_s=times, samples_s=samples, memory_bytes=memory, gemm_flops_per_s=rate,
                  floor_s=floor, unfused_logits_and_grad_bytes=logits_and_grad, rounds=rounds,
                  chunk_rows=fused_chunk_rows(problem), load_average=os.getloadavg()[0])
    return "\n".join(lines), result


def _scale_memory(n: int, impls=("unfused", "fused"), warmup: bool = True) -> dict[str, int]:
    """Total bytes of one step at N classes: what stays allocated (features,
    weight, bias, Ψ, θ and the gradients) plus the measured peak extra."""
    case = dict(batch=SCALE["batch"], dim=SCALE["dim"], level_sizes=SCALE["upper"] + (n,), dtype="float32",
                device="cpu")
    measured = _memory_in_child(case, impls=impls, warmup=warmup)
    return {name: measured["resident"] + measured["grads"] + measured[name] for name in impls}


def scale_table(verify: bool) -> tuple[str, dict]:
    budget = SCALE["budget_gib"] * 2**30
    probes = SCALE["probe_classes"]
    measured = {n: _scale_memory(n) for n in probes}
    lines = [
        f"Largest N that trains at B={SCALE['batch']}, d={SCALE['dim']}, upper levels {SCALE['upper']}, float32, "
        f"within {SCALE['budget_gib']:g} GiB (one forward + backward: features, weight, bias, Ψ, θ, their "
        f"gradients and every temporary)",
        "",
        f"{'N':>8} {'unfused GiB':>12} {'fused GiB':>10}   (measured)",
    ]
    for n in probes:
        lines.append(f"{n:>8} {measured[n]['unfused'] / 2**30:>12.3f} {measured[n]['fused'] / 2**30:>10.3f}")
    result: dict[str, Any] = {"measured_bytes": {str(n): m for n, m in measured.items()}}
    lines.append("")
    for name in ("unfused", "fused"):
        # Bytes grow linearly in N (every term is per class, plus constants):
        # a least-squares line through the probes, solved for the budget.
        xs = torch.tensor(probes, dtype=torch.float64)
        ys = torch.tensor([measured[n][name] for n in probes], dtype=torch.float64)
        slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        intercept = float(ys.mean() - slope * xs.mean())
        residual = float((ys - (intercept + slope * xs)).abs().max())
        largest = int((budget - intercept) / slope)
        result[name] = dict(bytes_per_class=slope, constant_bytes=intercept, max_residual_bytes=residual,
                            largest_n=largest)
        lines.append(
            f"{name:<8} {slope:,.0f} B per class + {intercept / 2**20:,.1f} MiB (fit residual "
            f"{residual / 2**20:.2f} MiB) -> largest N = {largest:,} (extrapolated from the measured probes)"
        )
    ratio = result["fused"]["largest_n"] / result["unfused"]["largest_n"]
    lines.append(f"fused / unfused: {ratio:.1f}x the classes in the same memory")
    if verify:
        n = result["fused"]["largest_n"]
        # One step, no warm-up: at this size a step takes minutes on a CPU.
        step_bytes = _scale_memory(n, impls=("fused",), warmup=False)["fused"]
        result["verified"] = dict(n=n, fused_bytes=step_bytes)
        lines.append(f"verified: one fused step at N={n:,} measured {step_bytes / 2**30:.3f} GiB")
    return "\n".join(lines), result


def gpu_table(rounds: int, case: dict = GPU_CASE) -> tuple[str, dict]:
    """Times against the bare GEMMs + our fused loss kernels (cuBLAS on a GPU),
    memory against a Liger-style chunked cross-entropy (default case: B=16384,
    d=2048, levels (100, 1000, 131072), bfloat16)."""
    device = case["device"]
    problem = make_problem(**case)
    fused, x, target = problem.fused, problem.x, problem.target
    weight, bias = fused.weight.detach(), fused.bias.detach()
    sizes = list(case["level_sizes"])
    acc = accumulate_dtype(problem.x.dtype)
    psi_t, theta = fused.lmm_loss.psi_t.to(acc), fused.theta.to(acc)
    rows = fused_chunk_rows(problem)

    def gemms_and_loss():
        logits = torch.addmm(bias, x.detach(), weight.t())
        loss, lse, log_m = loss_ops.lmm_loss_forward(logits, target, psi_t, theta, sizes, -100)
        grad = loss_ops.lmm_loss_backward(torch.full_like(loss, 1 / len(loss)), logits, target, psi_t, theta,
                                          lse, log_m, sizes, -100)
        grad @ weight
        grad.t() @ x.detach()

    def liger_style_ce():
        # Liger's fused linear cross-entropy in plain PyTorch: per chunk, the
        # logits, the CE gradient in place of them, the two GEMMs.
        n = sizes[-1]
        w_n, b_n = weight[-n:], bias[-n:]
        grad_w = torch.zeros_like(w_n, dtype=torch.float32)
        grad_x = torch.empty_like(x)
        for start in range(0, x.shape[0], rows):
            xc = x.detach()[start:start + rows]
            logits = torch.addmm(b_n, xc, w_n.t()).float()
            grad = torch.softmax(logits, 1)
            grad[torch.arange(len(xc), device=x.device), target[start:start + rows]] -= 1
            grad = grad.to(x.dtype)
            grad_x[start:start + rows] = grad @ w_n
            grad_w += (grad.t() @ xc).float()

    fns = dict(steps(problem))
    fns = {"unfused": fns["unfused"], "fused": fns["fused"], "gemms+fused_loss": gemms_and_loss,
           "liger_style_ce": liger_style_ce}
    memory = {}
    for name, fn in fns.items():
        _clear(problem)
        fn()
        _clear(problem)
        memory[name] = peak_extra_bytes(fn, device) - (_grad_bytes(problem, name) if name in IMPLS else 0)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _clear(problem)
            times[name].append(_timed(fn, device))
    _clear(problem)
    times = {k: statistics.median(v) for k, v in times.items()}
    name = torch.cuda.get_device_name() if device == "cuda" else device
    lines = [
        f"B={case['batch']}, d={case['dim']}, levels {tuple(sizes)}, {case['dtype']}, {name}, chunk {rows} rows",
        "",
        f"{'implementation':<18} {'median ms':>10} {'x gemms+loss':>13} {'peak extra MiB':>15}",
    ]
    for name in fns:
        lines.append(f"{name:<18} {times[name] * 1e3:>10.2f} {times[name] / times['gemms+fused_loss']:>13.3f} "
                     f"{_mib(memory[name]):>15}")
    lines.append(f"Cut Cross-Entropy's published forward memory (256K vocabulary): about "
                 f"{_mib(CCE_PUBLISHED_FORWARD_BYTES)} MiB (from the paper, not measured here)")
    return "\n".join(lines), dict(times_s=times, memory_bytes=memory)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--scale", action="store_true", help="add the largest-N table (B=4096, d=512, 8 GiB)")
    parser.add_argument("--scale-verify", action="store_true", help="with --scale: run one fused step at the bound")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="which tables: cpu (and --scale), cuda, or all available")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--memory-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_json:
        case = json.loads(args.memory_json)
        impls = tuple(case.pop("impls"))
        warmup = case.pop("warmup", True)
        problem = make_problem(**case)
        problem.fused.lmm_loss.grad_cache = False  # so that the unfused gradient is seen
        out = measure_memory(problem, impls, warmup)
        fused = problem.fused
        out["resident"] = _nbytes(problem.x, problem.target, *fused.parameters(), *fused.lmm_loss.buffers())
        out["grads"] = _nbytes(problem.x, *fused.parameters())
        print(json.dumps(out))
        return 0
    print(f"torch {torch.__version__}, {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    results: dict[str, Any] = {}
    if args.device in ("all", "cpu"):
        text, results["cpu"] = main_table(CPU_CASE, args.rounds)
        print("\nCPU\n" + text)
        if args.scale or args.scale_verify:
            text, results["scale"] = scale_table(args.scale_verify)
            print("\n" + text)
    if args.device == "cpu":
        pass
    elif torch.cuda.is_available():
        text, results["gpu"] = gpu_table(args.rounds)
        print("\nGPU\n" + text)
    else:
        print("\nGPU: no CUDA device available, so the GPU table (B=16384, d=2048, levels (100, 1000, 131072), "
              "bfloat16) was not run.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


# ---------------------------------------------------------------------------
# pytest: a quick smoke test of every row on a small problem
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_loss_step(benchmark, impl):
    problem = make_problem(**SMOKE_CASE)
    step = steps(problem)[impl]
    step()
    if impl != "linear+cross_entropy":
        grads = [p.grad.clone() for p in problem.leaves]
        _clear(problem)
        steps(problem)["unfused"]()
        for grad, p in zip(grads, problem.leaves):
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)

    def run():
        _clear(problem)
        step()
        synchronize(problem.device)

    benchmark(run)


def test_tables_run_on_a_small_problem():
    text, result = main_table(SMOKE_CASE, rounds=1, memory_in_child=False)
    assert "fused" in text and result["floor_s"] > 0
    # the two chunk buffers (16 of 64 rows each: a quarter of the logits and
    # their gradient) and the B x L statistics
    assert SMOKE_CASE["memory_budget"] <= result["memory_bytes"]["fused"] < result["unfused_logits_and_grad_bytes"] / 3
    # the GPU table's code, on the CPU
    text, result = gpu_table(1, SMOKE_CASE)
    assert set(result["times_s"]) == {"unfused", "fused", "gemms+fused_loss", "liger_style_ce"}


if __name__ == "__main__":
    sys.exit(main())
