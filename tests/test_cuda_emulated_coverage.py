"""Every __global__ kernel of csrc/cuda (and every phase of the owner update's
kernel) runs on the emulated device: the list is read from the sources, so a
new kernel without an emulated run fails here."""
import glob
import os
import re

import pytest
import torch

from lmm_fast.ops import gibbs as ops
from lmm_fast.testing import random_problem

from test_gibbs import apply_moves_inputs, args_of, op_inputs
from test_gibbs_owners_parallel import apply_moves, call, empty_state, make_problem, random_moves
from test_loss import make_loss, random_theta
from test_predict import operands

pytestmark = pytest.mark.cuda_emulated

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def kernel_names():
    names = set()
    for path in glob.glob(os.path.join(CSRC, "cuda", "*.cuh")):
        text = open(path).read()
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    assert "owners_phase_kernel" in names
    names.discard("owners_phase_kernel")
    phases = re.findall(r"struct (\w+Phase) \{", open(os.path.join(CSRC, "gibbs_owners_parallel.h")).read())
    for phase in phases:
        if phase == "ChallengePhase":
            names |= {f"owners_phase_kernel<ChallengePhase<{k}>>" for k in (1, 2, 3)}
        else:
            names.add(f"owners_phase_kernel<{phase}>")
    return sorted(names)


def run_every_op(em):
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 10, 300]
    logits, target, psi = random_problem(5, sizes, generator=gen)
    loss_fn = make_loss(psi, random_theta(3, gen).float(), 300)  # float32 state, as the float32 logits
    x = logits.detach()
    loss, lse, log_m = em.lmm_loss_forward(x, target, loss_fn.psi_t, loss_fn.theta, sizes, -100, None)
    em.lmm_loss_backward(torch.ones(5), x, target, loss_fn.psi_t, loss_fn.theta, lse, log_m, sizes, -100, None)
    tree, psi_t, theta = operands(psi, loss_fn.theta, sizes, torch.float32)
    em.lmm_predict_proba_tree(x, tree.index, tree.value, theta, sizes)
    em.lmm_predict_proba_dense(x, psi_t, theta, sizes)
    em.lmm_topk_tree(x, tree.index, tree.value, theta, sizes, 3)
    em.lmm_gather_scores(torch.randn(4, 8), torch.randn(20, 8), None, torch.randint(-1, 20, (4, 3)))
    d = op_inputs(3, [3, 7, 11], 6)
    em.gibbs_sample(*args_of(d))
    em.gibbs_sample_exact(*args_of({**d, "counts_t": d["counts_t"].clone(), "group_totals": d["group_totals"].clone()}))
    width = 10
    refresh = (d["counts_t"], d["group_totals"], d["beta"], d["beta0"])
    em.gibbs_refresh_psi(torch.zeros(11, width), torch.zeros(width), *refresh, torch.tensor([1, 4]))
    em.gibbs_refresh_psi_entries(torch.zeros(11, width), torch.zeros(width), *refresh, torch.tensor([0, 5]),
                                 torch.tensor([2, 9]))
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(1, [3, 7, 11], 50, 9)
    em.gibbs_apply_moves(counts_t, totals, labels, classes[idx], idx, old, new, [3, 7, 11])
    # the owner update: a rebuild, then moves that empty the low groups
    n, k = 70, 6
    classes, labels, counts_t, totals, beta, offset, width = make_problem(gen, n, k, 200, "vector")
    state = empty_state(n, width, k)
    none = torch.empty(0, dtype=torch.long)
    call(em.gibbs_update_owners, state, counts_t, totals, beta, 2.0, offset, k, none, none, none, full=True)
    for step in range(3):
        idx, old, new = random_moves(gen, classes, labels, k, 60, 1)
        y = classes[idx]
        apply_moves(counts_t, totals, y, old, new, offset)
        labels[idx] = new
        call(em.gibbs_update_owners, state, counts_t, totals, beta, 2.0, offset, k, y, old, new)
    ref = empty_state(n, width, k)
    call(ops.gibbs_update_owners, ref, counts_t, totals, beta, 2.0, offset, k, none, none, none, full=True)
    assert torch.equal(state["owner"], ref["owner"]) and torch.equal(state["psi_t"], ref["psi_t"])


def test_every_kernel_runs_in_emulation(emulated):
    names = kernel_names()
    assert len(names) >= 11 + 16, names
    before = {name: emulated.control_launch_count(name) for name in names}
    run_every_op(emulated)
    missing = [name for name in names if emulated.control_launch_count(name) == before[name]]
    assert not missing, f"kernels that did not run on the emulated device: {missing}"
