"""The fused LMM loss, forward + backward, beside PyTorch.

Three implementations on the same problem: ours (``FusedLMMLoss``),
``F.cross_entropy`` on the bottom N columns (the flat softmax the LMM
replaces) and the unfused PyTorch reference of the mixture
(``lmm_fast.reference.lmm_loss_unfused``, the model as one would write it).
Each benchmark records the peak extra memory of one call in ``extra_info``
and prints it; compare within a case with

    pytest benchmarks/bench_loss.py --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds
"""
import pytest
import torch
import torch.nn.functional as F

from lmm_fast import FusedLMMLoss, default_theta
from lmm_fast.profiling import peak_extra_bytes
from lmm_fast.reference.loss import lmm_loss_unfused
from lmm_fast.testing import devices, tree_psi

# (batch, level sizes top first, bottom N last)
CASES = {
    "B4096-10,100,10000": (4096, (10, 100, 10_000)),
    "B1024-10,100,1000": (1024, (10, 100, 1_000)),
    "B256-32,1000": (256, (32, 1_000)),
    "B64-10,100,100000": (64, (10, 100, 100_000)),
}
IMPLS = ("lmm_fast", "cross_entropy", "unfused")


def _problem(batch, level_sizes, device):
    gen = torch.Generator().manual_seed(0)
    n = level_sizes[-1]
    psi = [p.to(device) for p in tree_psi(level_sizes, gen)]
    theta = default_theta(len(level_sizes)).to(device)
    logits = (3 * torch.randn(batch, sum(level_sizes), generator=gen)).to(device).requires_grad_()
    target = torch.randint(0, n, (batch,), generator=gen).to(device)
    return logits, target, psi, theta


def _step(impl, batch, level_sizes, device):
    logits, target, psi, theta = _problem(batch, level_sizes, device)
    n = level_sizes[-1]
    if impl == "lmm_fast":
        loss_fn = FusedLMMLoss(psi, theta, num_classes=n).to(device)

        def step():
            logits.grad = None
            loss_fn(logits, target).backward()

    elif impl == "cross_entropy":
        flat = logits.detach()[:, -n:].clone().requires_grad_()

        def step():
            flat.grad = None
            F.cross_entropy(flat, target).backward()

    else:

        def step():
            logits.grad = None
            lmm_loss_unfused(logits, target, psi, theta, reduction="mean").backward()

    return step


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_loss_forward_backward(benchmark, case, impl, device):
    batch, level_sizes = CASES[case]
    step = _step(impl, batch, level_sizes, device)
    step()  # warm-up: first-call allocations and kernel selection
    peak = peak_extra_bytes(step, device) / 2**20
    benchmark.extra_info["peak_extra_mib"] = round(peak, 2)
    benchmark.extra_info["batch"] = batch
    benchmark.extra_info["level_sizes"] = list(level_sizes)
    print(f"\n{case} {impl} {device}: peak extra memory {peak:.1f} MiB")

    def run():
        step()
        _sync(device)

    benchmark(run)
