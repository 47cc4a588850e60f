"""Time and peak memory of one call, on the CPU and on CUDA: what the
benchmarks (``benchmarks/``) and the speed table of ``lmm-fast compare``
measure with."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable

import torch

__all__ = ["measure_time", "peak_extra_bytes", "synchronize"]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(fn: Callable[[], Any], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls,
    synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Peak memory allocated by one call of ``fn`` above what was allocated
    before it (tensors it frees again included, its inputs not).

    CUDA reads the caching allocator's peak counter; the CPU has none, so the
    allocations and frees recorded by ``torch.profiler`` are replayed in order.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side logs its start and stop (and a failed GPU probe)
    # straight to file descriptor 2, which would garble the tables.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

