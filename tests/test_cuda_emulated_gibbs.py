"""The CUDA Gibbs kernels and their host code, run on the emulated device
(torch.ops.lmm_fast_emulated, CPU tensors): the twins of the CUDA tests of
test_gibbs.py, bit for bit against the CPU ops, plus the odd sizes and the
value errors (the same messages as the CPU ops', nothing written)."""
import pytest
import torch

from lmm_fast import FusedLMMLoss, GibbsAdapter
from lmm_fast.ops import gibbs as ops

import emulated_backend
from test_gibbs import (apply_moves_inputs, args_of, check_batch_cases, check_op_bad_inputs, make_adapter,
                        op_inputs, random_batch)

pytestmark = pytest.mark.cuda_emulated

DTYPES = (torch.float16, torch.bfloat16, torch.float64)


# twin of test_gibbs.py::test_cuda_kernels_equal_cpu
@pytest.mark.parametrize("sizes,batch", [([1, 4], 1), ([3, 7, 11], 37), ([10, 100, 1000, 10000], 129),
                                         ([33, 257, 40], 5)])
def test_emulated_kernels_equal_cpu(emulated, sizes, batch):
    d = op_inputs(21 + batch, sizes, batch)
    assert torch.equal(emulated.gibbs_sample(*args_of(d)), ops.gibbs_sample(*args_of(d)))
    for dtype in DTYPES:
        dd = {**d, "logits": d["logits"].to(dtype)}
        assert torch.equal(emulated.gibbs_sample(*args_of(dd)), ops.gibbs_sample(*args_of(dd)))
    # rows with a stride, and the upper levels only
    wide = torch.cat([d["logits"], d["logits"]], 1)[:, : sum(sizes)]
    upper = d["logits"][:, : sum(sizes[:-1])]
    for logits in (wide, upper):
        dd = {**d, "logits": logits}
        assert torch.equal(emulated.gibbs_sample(*args_of(dd)), ops.gibbs_sample(*args_of(dd)))
    em = {**d, "counts_t": d["counts_t"].clone(), "group_totals": d["group_totals"].clone()}
    got = emulated.gibbs_sample_exact(*args_of(em))
    want = ops.gibbs_sample_exact(*args_of(d))
    assert torch.equal(got, want)
    assert torch.equal(em["counts_t"], d["counts_t"]) and torch.equal(em["group_totals"], d["group_totals"])
    width = sum(sizes[:-1])
    columns = torch.randperm(width)[: max(1, width // 3)]
    psi_cpu, scale_cpu = torch.zeros(sizes[-1], width), torch.zeros(width)
    psi_em, scale_em = psi_cpu.clone(), scale_cpu.clone()
    refresh = (d["counts_t"], d["group_totals"], d["beta"], d["beta0"])
    ops.gibbs_refresh_psi(psi_cpu, scale_cpu, *refresh, columns)
    emulated.gibbs_refresh_psi(psi_em, scale_em, *refresh, columns)
    assert torch.equal(psi_em, psi_cpu) and torch.equal(scale_em, scale_cpu)
    rows = torch.randint(0, sizes[-1], (300,))
    cols = torch.randint(0, width, (300,))
    for t in (psi_cpu, scale_cpu, psi_em, scale_em):
        t.fill_(-1)
    ops.gibbs_refresh_psi_entries(psi_cpu, scale_cpu, *refresh, rows, cols)
    emulated.gibbs_refresh_psi_entries(psi_em, scale_em, *refresh, rows, cols)
    assert torch.equal(psi_em, psi_cpu) and torch.equal(scale_em, scale_cpu)
    for kind in (torch.float64,):  # Ψ in float64 too
        p, s = torch.zeros(sizes[-1], width, dtype=kind), torch.zeros(width, dtype=kind)
        q, r = p.clone(), s.clone()
        ops.gibbs_refresh_psi(p, s, *refresh, columns)
        emulated.gibbs_refresh_psi(q, r, *refresh, columns)
        assert torch.equal(p, q) and torch.equal(s, r)


def test_emulated_level_limits_and_empty_batch(emulated):
    sizes = [2] * 32 + [9]  # 32 upper levels: the most the CUDA sampler takes
    d = op_inputs(5, sizes, 6)
    assert torch.equal(emulated.gibbs_sample(*args_of(d)), ops.gibbs_sample(*args_of(d)))
    em = {**d, "counts_t": d["counts_t"].clone(), "group_totals": d["group_totals"].clone()}
    assert torch.equal(emulated.gibbs_sample_exact(*args_of(em)), ops.gibbs_sample_exact(*args_of(d)))
    d = op_inputs(5, [2] * 33 + [9], 3)
    with pytest.raises(RuntimeError, match="the CUDA Gibbs sampler supports at most 32 upper levels, got 33"):
        emulated.gibbs_sample(*args_of(d))
    d = op_inputs(6, [3, 7, 11], 0)
    assert emulated.gibbs_sample(*args_of(d)).shape == (0, 2)
    assert emulated.gibbs_sample_exact(*args_of(d)).shape == (0, 2)


# twin of test_gibbs.py::test_cuda_adapter_equals_cpu: the adapter itself,
# with its ops swapped for the emulated ones
@pytest.mark.parametrize("non_overlapping", [False, True])
def test_emulated_adapter_equals_cpu(non_overlapping):
    h, loss_cpu, targets, cpu = make_adapter(n=29, sizes=(3, 11), images=300, seed=3, beta=0.4,
                                             non_overlapping=non_overlapping)
    loss_em = FusedLMMLoss.from_hierarchy(h)
    with emulated_backend.package_ops_emulated():
        em = GibbsAdapter(loss_em, h, targets.clone(), beta=0.4, non_overlapping=non_overlapping)
    gen = torch.Generator().manual_seed(0)
    launches = emulated_backend.load().control_launch_count()
    for step in range(10):
        logits, target, idx = random_batch(gen, cpu, 50, scale=3.0)
        a = cpu.step(logits, target, idx, exact=step % 4 == 1)
        with emulated_backend.package_ops_emulated():
            b = em.step(logits, target, idx, exact=step % 4 == 1)
        assert torch.equal(a, b)
    assert emulated_backend.load().control_launch_count() > launches + 10  # the emulated kernels did the work
    assert torch.equal(cpu.counts_t, em.counts_t) and torch.equal(cpu.labels, em.labels)
    torch.testing.assert_close(loss_em.psi_t, loss_cpu.psi_t, rtol=0, atol=0)
    torch.testing.assert_close(loss_em.psi_scale, loss_cpu.psi_scale, rtol=0, atol=0)


# twin of test_gibbs.py::test_cuda_apply_moves_equals_cpu
@pytest.mark.parametrize("sizes,images,batch", [([1, 4], 9, 5), ([10, 100, 1000], 3000, 256)])
def test_emulated_apply_moves_equals_cpu(emulated, sizes, images, batch):
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(8, sizes, images, batch)
    em = [t.clone() for t in (counts_t, totals, labels)]
    emulated.gibbs_apply_moves(*em, classes[idx], idx, old, new, sizes)
    ops.gibbs_apply_moves(counts_t, totals, labels, classes[idx], idx, old, new, sizes)
    for got, want in zip(em, (counts_t, totals, labels)):
        assert torch.equal(got, want)
    torch.library.opcheck(emulated.gibbs_apply_moves.default, (*em, classes[idx], idx, new, old, sizes))
    before = [t.clone() for t in em]
    none = torch.empty(0, dtype=torch.long)
    emulated.gibbs_apply_moves(*em, none, none, old[:0], new[:0], sizes)
    assert all(torch.equal(a, b) for a, b in zip(before, em))


@pytest.mark.parametrize("field,value,message", [
    ("target", 11, "target\\[2\\] = 11 is out of range"),
    ("target", -1, "target\\[2\\] = -1 is out of range"),
    ("idx", 200, "image_ids\\[2\\] = 200 is out of range"),
    ("old", 3, "old_labels\\[2, 0\\] = 3 is out of range"),
    ("new", 7, "new_labels\\[2, 0\\] = 7 is out of range"),
])
def test_emulated_apply_moves_refuses_bad_values_and_writes_nothing(emulated, field, value, message):
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(6, [3, 7, 11], 200, 8)
    args = {"target": classes[idx].clone(), "idx": idx.clone(), "old": old.clone(), "new": new.clone()}
    if field in ("old", "new"):
        args[field][2, 0] = value
    else:
        args[field][2] = value
    before = (counts_t.clone(), totals.clone(), labels.clone())
    for op in (ops.gibbs_apply_moves, emulated.gibbs_apply_moves):
        with pytest.raises(RuntimeError, match=message):
            op(counts_t, totals, labels, args["target"], args["idx"], args["old"], args["new"], [3, 7, 11])
        assert all(torch.equal(a, b) for a, b in zip(before, (counts_t, totals, labels)))


def test_emulated_sample_and_refresh_refuse_bad_values(emulated):
    # the CPU op's cases and messages, on the emulated CUDA ops
    check_op_bad_inputs(emulated.gibbs_sample_exact, emulated.gibbs_refresh_psi,
                        emulated.gibbs_refresh_psi_entries)
    d = op_inputs(14, [3, 7, 11], 4)
    for change, message in [({"target": torch.tensor([0, 1, 11, 2])}, r"target\[2\] = 11 is out of range"),
                            ({"image_ids": torch.tensor([0, 1, 2**32, 3])}, r"image_ids\[2\] = 4294967296"),
                            ({"old_labels": d["old_labels"] + torch.tensor([0, 7])}, r"old_labels\[0, 1\]")]:
        for op in (ops.gibbs_sample, emulated.gibbs_sample):
            with pytest.raises(RuntimeError, match=message):
                op(*args_of({**d, **change}))


# twin of test_gibbs.py::test_check_batch_finds_each_problem[cuda]
def test_emulated_check_batch_finds_each_problem(emulated):
    train = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    for indices, target, expected in check_batch_cases():
        assert emulated.gibbs_check_batch(indices, target, train).tolist() == expected
        assert ops.gibbs_check_batch(indices, target, train).tolist() == expected
    torch.library.opcheck(emulated.gibbs_check_batch.default,
                          (torch.tensor([4, 2, 9]), torch.tensor([5, 1, 0]), train))


def test_emulated_sample_opcheck(emulated):
    d = op_inputs(9, [3, 7, 11], 5)
    torch.library.opcheck(emulated.gibbs_sample.default, args_of(d))
