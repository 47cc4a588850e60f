"""GibbsAdapter under torch.distributed: two processes on the gloo backend (CPU).

Each rank steps with its own share of every global batch (uneven shares, an
empty one too, batched and exact steps). Afterwards both ranks must hold the
same labels, Ω and Ψ, equal to one process stepping the whole batches (the
draws are keyed by image, so who samples an image does not matter). A batch
refused on one rank must be refused on both, with nothing changed.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmm_fast import FusedLMMLoss, GibbsAdapter
from lmm_fast.hierarchy import Hierarchy

WORLD = 2
CLASSES = 19
SIZES = [3, 8]


def make_problem():
    gen = torch.Generator().manual_seed(0)
    finest = torch.randperm(CLASSES, generator=gen) % SIZES[1]
    h = Hierarchy.from_assignments([finest % SIZES[0], finest])
    targets = torch.randint(0, CLASSES, (240,), generator=gen)
    steps = []
    for step in range(9):
        batch = [40, 17, 64, 5, 33][step % 5]
        idx = torch.randperm(240, generator=gen)[:batch]
        logits = 3 * torch.randn(batch, sum(SIZES) + CLASSES, generator=gen)
        cut = [batch // 2, 0, batch, 3, 20][step % 5]  # rank 0 takes [:cut], rank 1 the rest
        steps.append((logits, idx, cut, step in (2, 6)))
    return h, targets, steps


def adapters(h, targets, **kwargs):
    out = []
    for non_overlapping in (False, True):
        loss_fn = FusedLMMLoss.from_hierarchy(h)
        out.append((loss_fn, GibbsAdapter(loss_fn, h, targets, beta=0.3, non_overlapping=non_overlapping,
                                          seed=4, **kwargs)))
    return out


def state_of(pairs):
    return [(a.labels.clone(), a.counts_t.clone(), loss_fn.psi_t.clone(), a.step_count, loss_fn.psi_scale.clone())
            for loss_fn, a in pairs]


def worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        h, targets, steps = make_problem()
        pairs = adapters(h, targets)
        returned = []
        for logits, idx, cut, exact in steps:
            part = slice(0, cut) if rank == 0 else slice(cut, None)
            for _, adapter in pairs:
                returned.append(adapter.step(logits[part], targets[idx[part]], idx[part], exact=exact))
        final = state_of(pairs)

        errors = []
        logits, idx, _, _ = steps[0]
        adapter = pairs[1][1]
        # rank 1 sends an index outside the dataset: both ranks refuse
        bad = idx[20:].clone()
        if rank == 1:
            bad[0] = 10_000
        part = slice(0, 20) if rank == 0 else slice(20, None)
        try:
            adapter.step(logits[part], targets[idx[part]], bad if rank == 1 else idx[part])
        except (ValueError, RuntimeError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        # the same image in both ranks' batches: both refuse
        shared = idx[:4]
        try:
            adapter.step(logits[:4], targets[shared], shared)
        except ValueError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        torch.save({"returned": returned, "final": final, "after_errors": state_of(pairs), "errors": errors},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_ranks_hold_the_single_process_state(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    h, targets, steps = make_problem()
    pairs = adapters(h, targets, distributed=False)
    expected_returned = []
    for logits, idx, cut, exact in steps:
        for _, adapter in pairs:
            new = adapter.step(logits, targets[idx], idx, exact=exact)
            expected_returned.append((new[:cut], new[cut:]))
    expected = state_of(pairs)

    for rank, result in enumerate(ranks):
        for got, want in zip(result["final"], expected):
            assert torch.equal(got[0], want[0]), f"rank {rank}: labels differ from one process"
            assert torch.equal(got[1], want[1]), f"rank {rank}: Ω differs"
            assert torch.equal(got[2], want[2]), f"rank {rank}: Ψ differs"
            assert got[3] == want[3]
            assert torch.equal(got[4], want[4]), f"rank {rank}: Ψ's normalisers differ"
        for got, want in zip(result["returned"], expected_returned):
            assert torch.equal(got, want[rank]), f"rank {rank}: step() returned other labels"
    moved = (expected[0][0] != torch.stack([g[targets] for g in h.assignments], 1)).any()
    assert bool(moved), "no image changed group: the test exercised nothing"

    for rank, result in enumerate(ranks):
        assert len(result["errors"]) == 2, result["errors"]
        assert ("10000" in result["errors"][0]) == (rank == 1)
        assert "rank(s) [1] refused" in result["errors"][0] or rank == 1
        assert "in the batches of two ranks" in result["errors"][1]
        for got, want in zip(result["after_errors"], result["final"]):
            assert all(torch.equal(g, w) if isinstance(g, torch.Tensor) else g == w for g, w in zip(got, want))
