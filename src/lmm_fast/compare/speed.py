"""Part 1 of ``lmm-fast compare``: speed and memory of the fused loss (forward
+ backward), the fused linear layer + loss (from features, forward +
backward), top-5 prediction and the adaptation step against PyTorch's own
ops on the flat N-way problem and against the unfused PyTorch reference of
the mixture, for N = 1 000, 10 000 and 100 000 classes; medians and ratios
from one run, on the CPU and on CUDA when present."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

# No torch at import: `lmm-fast compare --help` shows these defaults without it.
SPEED_CLASSES = (1_000, 10_000, 100_000)
SPEED_UPPER_LEVELS = (10, 100)
# Feature size of the fused linear + loss case (the head's input).
SPEED_FEATURES = 256


# ---------------------------------------------------------------------------
# Part 1: speed and memory
# ---------------------------------------------------------------------------


@dataclass
class SpeedCase:
    """One op at one size: our implementation and the baselines, as closures."""

    op: str
    impls: dict[str, Callable[[], Any]]


def _loss_case(batch: int, level_sizes: Sequence[int], device: str, gen: torch.Generator) -> SpeedCase:
    import torch
    import torch.nn.functional as F

    from lmm_fast.loss import FusedLMMLoss, default_theta
    from lmm_fast.reference.loss import lmm_loss_unfused
    from lmm_fast.testing import tree_psi

    n = level_sizes[-1]
    psi = [p.to(device) for p in tree_psi(level_sizes, gen)]
    theta = default_theta(len(level_sizes)).to(device)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=n).to(device)
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device).requires_grad_()
    flat_logits = logits.detach()[:, -n:].clone().requires_grad_()
    target = torch.randint(0, n, (batch,), generator=gen).to(device)

    def fused():
        logits.grad = None
        loss_fn(logits, target).backward()

    def flat():
        flat_logits.grad = None
        F.cross_entropy(flat_logits, target).backward()

    def unfused():
        logits.grad = None
        lmm_loss_unfused(logits, target, psi, theta, reduction="mean").backward()

    return SpeedCase("loss fwd+bwd", {"ours": fused, "flat": flat, "unfused": unfused})


def _linear_loss_case(batch: int, level_sizes: Sequence[int], device: str, gen: torch.Generator) -> SpeedCase:
    import torch
    import torch.nn.functional as F

    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.linear_loss import FusedLinearLMMLoss
    from lmm_fast.reference.loss import lmm_loss_unfused
    from lmm_fast.testing import tree_psi

    n = level_sizes[-1]
    psi = tree_psi(level_sizes, gen)
    hierarchy = Hierarchy.from_assignments([p.argmax(0) for p in psi])
    ours = FusedLinearLMMLoss(SPEED_FEATURES, hierarchy, device=device)
    head = ours.head
    flat = torch.nn.Linear(SPEED_FEATURES, n, device=device)
    x = torch.randn(batch, SPEED_FEATURES, generator=gen).to(device).requires_grad_()
    target = torch.randint(0, n, (batch,), generator=gen).to(device)
    psi = [p.to(device) for p in psi]

    def clear(*params):
        for p in params:
            p.grad = None

    def fused():
        clear(x, *ours.parameters())
        ours(x, target).backward()

    def flat_ce():
        clear(x, *flat.parameters())
        F.cross_entropy(flat(x), target).backward()

    def unfused():
        clear(x, *head.parameters())
        lmm_loss_unfused(head(x), target, psi, ours.theta, reduction="mean").backward()

    return SpeedCase(f"linear+loss d={SPEED_FEATURES}", {"ours": fused, "flat": flat_ce, "unfused": unfused})


def _predict_case(batch: int, level_sizes: Sequence[int], device: str, gen: torch.Generator, k: int = 5) -> SpeedCase:
    import torch

    from lmm_fast.loss import FusedLMMLoss, default_theta
    from lmm_fast.predict import predict_topk
    from lmm_fast.reference.loss import predict_proba_reference
    from lmm_fast.testing import tree_psi

    n = level_sizes[-1]
    psi = [p.to(device) for p in tree_psi(level_sizes, gen)]
    theta = default_theta(len(level_sizes)).to(device)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=n).to(device)
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device)
    flat_logits = logits[:, -n:].contiguous()

    @torch.no_grad()
    def ours():
        predict_topk(logits, loss_fn, k)

    @torch.no_grad()
    def flat():
        torch.softmax(flat_logits, dim=1).topk(k, dim=1)

    @torch.no_grad()
    def unfused():
        predict_proba_reference(logits, psi, theta).topk(k, dim=1)

    return SpeedCase(f"predict top-{k}", {"ours": ours, "flat": flat, "unfused": unfused})


def _adapt_case(batch: int, level_sizes: Sequence[int], device: str, gen: torch.Generator) -> SpeedCase:
    import torch

    from lmm_fast.adaptation import GibbsAdapter
    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.loss import FusedLMMLoss
    from lmm_fast.testing import tree_psi

    n = level_sizes[-1]
    upper = list(level_sizes[:-1])
    hierarchy = Hierarchy.from_assignments([p.argmax(0) for p in tree_psi(level_sizes, gen)])
    loss_fn = FusedLMMLoss.from_hierarchy(hierarchy).to(device)
    reference_loss = FusedLMMLoss.from_hierarchy(hierarchy).to(device)
    # A training set of 4 images per class; one batch of it is re-sampled.
    train_targets = torch.arange(n).repeat(4).to(device)
    adapter = GibbsAdapter(loss_fn, hierarchy, train_targets, seed=0)
    indices = torch.randperm(train_targets.numel(), generator=gen)[:batch].to(device)
    target = train_targets[indices]
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device)
    beta, beta0 = 1.0, float(n)
    labels = torch.stack([a.to(device) for a in hierarchy.assignments], dim=1)[train_targets]
    counts = [
        torch.bincount(labels[:, level] * n + train_targets, minlength=size * n).reshape(size, n)
        for level, size in enumerate(upper)
    ]
    rows = torch.arange(batch, device=device)
    torch_gen = torch.Generator(device=device).manual_seed(0)

    def ours():
        adapter.step(logits, target, indices)

    def unfused():
        # Eq. 4-6 as plain PyTorch: the batch's conditionals from dense counts,
        # then the counts and the whole of every Ψ^l recomputed.
        offset = 0
        for level, size in enumerate(upper):
            omega = counts[level]
            old = labels[indices, level]
            column = omega[:, target].t().double()
            totals = omega.sum(1).double().expand(batch, -1).clone()
            column[rows, old] -= 1
            totals[rows, old] -= 1
            log_w = torch.log_softmax(logits[:, offset : offset + size].double(), 1)
            log_w = log_w + (column + beta).log() - (totals + beta0).log()
            new = torch.multinomial(torch.softmax(log_w, 1), 1, generator=torch_gen).squeeze(1)
            omega.index_put_((old, target), torch.full_like(old, -1), accumulate=True)
            omega.index_put_((new, target), torch.ones_like(new), accumulate=True)
            labels[indices, level] = new
            psi = (omega + beta) / (omega.sum(1, keepdim=True) + beta0)
            reference_loss.psi[level].copy_(psi)
            offset += size

    return SpeedCase("adapt step (Gibbs)", {"ours": ours, "unfused": unfused})


def speed_benchmark(
    devices: Sequence[str] | None = None,
    class_counts: Sequence[int] = SPEED_CLASSES,
    batch: int | dict[str, int] = 1024,
    repeats: int = 5,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Median time and peak extra memory of every op, implementation and size.

    Args:
        devices: default ``["cpu"]`` plus ``"cuda"`` when available.
        class_counts: the N of the bottom level; the upper levels are
            ``SPEED_UPPER_LEVELS`` (10 and 100 groups).
        batch: rows per call, or a dict device type → rows.
        repeats: timed calls per measurement (after one warm-up call).
        progress: tqdm bar.

    Returns:
        one dict per (device, N, op, implementation) with ``median_ms``,
        ``times_ms``, ``peak_mib`` and ``ratio_to_ours`` (its median over ours).
    """
    import torch

    from lmm_fast._progress import progress_bar
    from lmm_fast.profiling import measure_time, peak_extra_bytes

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    builders: tuple[Callable[..., SpeedCase], ...] = (_loss_case, _linear_loss_case, _predict_case, _adapt_case)
    rows: list[dict[str, Any]] = []
    jobs = [(d, n, b) for d in devices for n in class_counts for b in builders]
    with progress_bar(jobs, desc="speed and memory", unit="case", disable=not progress, leave=False) as bar:
        for device, n, build in bar:
            rows_per_call = batch[torch.device(device).type] if isinstance(batch, dict) else batch
            sizes = [s for s in SPEED_UPPER_LEVELS if s < n] + [n]
            gen = torch.Generator().manual_seed(n)
            case = build(rows_per_call, sizes, device, gen)
            bar.set_postfix_str(f"{device} N={n} {case.op}")
            medians = {}
            for impl, fn in case.impls.items():
                peak = peak_extra_bytes(fn, device)
                times = measure_time(fn, device, repeats=repeats)
                medians[impl] = statistics.median(times)
                rows.append(
                    {
                        "device": device,
                        "op": case.op,
                        "impl": impl,
                        "num_classes": n,
                        "level_sizes": sizes,
                        "batch": rows_per_call,
                        "median_ms": 1e3 * medians[impl],
                        "times_ms": [1e3 * t for t in times],
                        "peak_mib": peak / 2**20,
                    }
                )
            for row in rows[-len(case.impls) :]:
                row["ratio_to_ours"] = medians[row["impl"]] / medians["ours"]
            del case
    return rows


def format_speed_table(rows: Sequence[dict[str, Any]]) -> str:
    """The speed rows as a fixed-width table, one line per (device, op, N)."""
    head = (
        f"{'device':<6} {'op':<19} {'N':>7} {'B':>5} | {'lmm_fast':>9} {'torch flat':>10} {'torch LMM':>10} "
        f"| {'flat/ours':>9} {'LMM/ours':>9} | {'MiB ours':>9} {'flat':>8} {'LMM':>8}"
    )
    lines = [head, "-" * len(head)]
    keys = []
    for row in rows:
        key = (row["device"], row["op"], row["num_classes"])
        if key not in keys:
            keys.append(key)
    for device, op, n in keys:
        group = {r["impl"]: r for r in rows if (r["device"], r["op"], r["num_classes"]) == (device, op, n)}

        def ms(impl):
            return f"{group[impl]['median_ms']:.2f}" if impl in group else "-"

        def ratio(impl):
            return f"{group[impl]['ratio_to_ours']:.2f}x" if impl in group else "-"

        def mib(impl):
            return f"{group[impl]['peak_mib']:.1f}" if impl in group else "-"

        batch = group["ours"]["batch"]
        lines.append(
            f"{device:<6} {op:<19} {n:>7} {batch:>5} | {ms('ours'):>9} {ms('flat'):>10} {ms('unfused'):>10} "
            f"| {ratio('flat'):>9} {ratio('unfused'):>9} | {mib('ours'):>9} {mib('flat'):>8} {mib('unfused'):>8}"
        )
    return "\n".join(lines)
