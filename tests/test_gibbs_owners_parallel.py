"""The parallel owner update of the non-overlapping Ψ (the CUDA op's phases):
the CUDA op, run on the emulated device (tests/emulated_backend.py), equals
the sequential CPU op and a full rebuild bit for bit over sequences of random
moves; on a GPU the CUDA op equals the CPU op. Value checks, opcheck."""
import pytest
import torch

from lmm_fast.ops import gibbs as ops

import emulated_backend

STATE = ("psi_t", "psi_scale", "owner", "numerator", "kept", "nonzero")
TWO40 = float(2**40)


def empty_state(n, width, k, device="cpu", dtype=torch.float32):
    return dict(psi_t=torch.full((n, width), -1.0, dtype=dtype, device=device),
                psi_scale=torch.full((width,), -1.0, dtype=dtype, device=device),
                owner=torch.zeros(n, dtype=torch.long, device=device),
                numerator=torch.zeros(n, dtype=torch.float64, device=device),
                kept=torch.zeros(k, dtype=torch.long, device=device),
                nonzero=torch.zeros(k, (n + 63) // 64, dtype=torch.long, device=device),
                bound=torch.zeros(n, dtype=torch.float64, device=device))


def call(op, s, counts_t, totals, beta, beta0, offset, k, classes, old, new, full=False):
    op(s["psi_t"], s["psi_scale"], s["owner"], s["numerator"], s["kept"], s["nonzero"], s["bound"], counts_t, totals,
       beta, beta0, offset, k, classes, old, new, full=full)


def clone(s):
    return {key: v.clone() for key, v in s.items()}


def assert_same(got, want, what):
    for key in STATE:
        g, w = got[key].cpu(), want[key].cpu()
        assert g.dtype == w.dtype and torch.equal(g, w), f"{what}: {key} differs"


def assert_bound_valid(s, counts_t, totals, beta, beta0, offset, k):
    omega = counts_t[:, offset:offset + k].t().double().cpu()
    values = (omega + beta.double().cpu()) / (totals[offset:offset + k].double().cpu()[:, None] + beta0)
    values[s["owner"].cpu(), torch.arange(omega.shape[1])] = -float("inf")
    assert bool((s["bound"].cpu() >= values.max(0).values).all()), "bound below the runner-up"


def make_problem(gen, n, k, images, beta_kind, pad=(1, 2)):
    """Class-major counts of a level of k groups between other columns (offset
    pad[0], pad[1] columns after), as GibbsAdapter keeps them."""
    classes = torch.randint(0, n, (images,), generator=gen)
    labels = torch.randint(0, k, (images,), generator=gen)
    width = pad[0] + k + pad[1]
    counts_t = torch.zeros(n, width, dtype=torch.int32)
    counts_t.index_put_((classes, labels + pad[0]), torch.ones(images, dtype=torch.int32), accumulate=True)
    counts_t[:, : pad[0]] = torch.randint(0, 3, (n, pad[0]), generator=gen, dtype=torch.int32)
    counts_t[:, pad[0] + k:] = torch.randint(0, 3, (n, pad[1]), generator=gen, dtype=torch.int32)
    totals = counts_t.sum(0).to(torch.int32)
    if beta_kind == "constant":
        beta = torch.full((n,), 0.5)
    elif beta_kind == "dyadic":
        beta = torch.randint(1, 4, (n,), generator=gen).float() / 4
    elif beta_kind == "wide":  # magnitudes 2^-40 .. 1: sums round, so their order shows
        beta = (0.5 + torch.rand(n, generator=gen)) * torch.exp2(-torch.randint(0, 41, (n,), generator=gen).float())
    else:  # non-dyadic per-class values
        beta = 0.1 + torch.rand(n, generator=gen)
    return classes, labels, counts_t, totals, beta, pad[0], width


def random_moves(gen, classes, labels, k, batch, step):
    idx = torch.randint(0, classes.numel(), (batch,), generator=gen)  # repeats allowed
    idx = torch.unique(idx)  # one label change per image
    old = labels[idx].clone()
    kind = step % 4
    if kind == 0:
        new = torch.randint(0, k, (idx.numel(),), generator=gen)
    elif kind == 1:  # towards low groups: others empty
        new = torch.randint(0, max(1, k // 3), (idx.numel(),), generator=gen)
    elif kind == 2:  # back towards high groups: refill
        new = torch.randint(max(0, k - 1 - k // 3), k, (idx.numel(),), generator=gen)
    else:  # mostly no-op entries
        new = torch.where(torch.rand(idx.numel(), generator=gen) < 0.7, old,
                          torch.randint(0, k, (idx.numel(),), generator=gen))
    return idx, old, new


def apply_moves(counts_t, totals, y, old, new, offset):
    # as GibbsAdapter._apply
    cols_old, cols_new = old + offset, new + offset
    counts_t.index_put_((y, cols_old), torch.full_like(y, -1, dtype=torch.int32), accumulate=True)
    counts_t.index_put_((y, cols_new), torch.ones_like(y, dtype=torch.int32), accumulate=True)
    totals.index_add_(0, cols_old, torch.full_like(y, -1, dtype=torch.int32))
    totals.index_add_(0, cols_new, torch.ones_like(y, dtype=torch.int32))


def emulated_op():
    """The CUDA op's host code and kernels on the emulated device (CPU tensors)."""
    return emulated_backend.load().gibbs_update_owners


def run_sequence(n, k, beta_kind, beta0_kind, dtype, steps, seed, device=None):
    """Random move sequence; the emulated CUDA op (or, with device, the CUDA
    op) against the CPU op and a rebuild after every call."""
    gen = torch.Generator().manual_seed(seed)
    images = max(3, (3 * n) // max(1, k // 4 + 1))
    classes, labels, counts_t, totals, beta, offset, width = make_problem(gen, n, k, images, beta_kind)
    beta0 = TWO40 * 1.5 if beta0_kind == "huge" else float(beta.double().sum()) / 3
    other = emulated_op() if device is None else ops.gibbs_update_owners
    dev = "cpu" if device is None else device
    to = (lambda t: t.to(dev))
    none = torch.empty(0, dtype=torch.long)
    ref = empty_state(n, width, k, dtype=dtype)
    got = {key: to(v) for key, v in clone(ref).items()}
    call(ops.gibbs_update_owners, ref, counts_t, totals, beta, beta0, offset, k, none, none, none, full=True)
    call(other, got, to(counts_t), to(totals), to(beta), beta0, offset, k, to(none), to(none), to(none), full=True)
    assert_same(got, ref, "rebuild")
    for step in range(steps):
        batch = [1, 3, max(4, images // 4), images, 0][step % 5]
        idx, old, new = random_moves(gen, classes, labels, k, batch, step)
        y = classes[idx]
        apply_moves(counts_t, totals, y, old, new, offset)
        labels[idx] = new
        if step % 3 == 0 and y.numel() > 0:  # no-op entries of a moved class
            y, old, new = torch.cat([y[:1], y, y[:1]]), torch.cat([old[:1], old, new[:1]]), torch.cat([old[:1], new, new[:1]])
        call(ops.gibbs_update_owners, ref, counts_t, totals, beta, beta0, offset, k, y, old, new)
        call(other, got, to(counts_t), to(totals), to(beta), beta0, offset, k, to(y), to(old), to(new))
        assert_same(got, ref, f"step {step}")
        assert_bound_valid(got, counts_t, totals, beta, beta0, offset, k)
        fresh = empty_state(n, width, k, dtype=dtype)
        fresh["psi_t"].copy_(ref["psi_t"])  # the other levels' columns
        fresh["psi_scale"].copy_(ref["psi_scale"])
        call(ops.gibbs_update_owners, fresh, counts_t, totals, beta, beta0, offset, k, none, none, none, full=True)
        assert_same(ref, fresh, f"step {step}: CPU op vs rebuild")
    # the untouched columns of the other levels
    assert bool((ref["psi_t"][:, :offset] == -1).all()) and bool((ref["psi_t"][:, offset + k:] == -1).all())


CASES = [(1, 1), (1, 7), (63, 2), (64, 7), (65, 64), (517, 7), (517, 64), (130, 1), (64, 2), (300, 2)]


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("n,k", CASES)
@pytest.mark.parametrize("beta_kind", ["constant", "vector", "dyadic", "wide"])
def test_emulated_equals_cpu_op(n, k, beta_kind):
    for dtype, beta0_kind in [(torch.float32, "small"), (torch.float64, "small"), (torch.float32, "huge")]:
        run_sequence(n, k, beta_kind, beta0_kind, dtype, steps=12 if n < 500 else 6, seed=n * 131 + k)


@pytest.mark.cuda_emulated
def test_emulated_exact_ties_and_emptied_groups():
    # every class in every group once: all values tie, the lowest group owns
    # everything; then groups are emptied one by one and refilled
    n, k = 70, 5
    counts_t = torch.ones(n, k, dtype=torch.int32)
    totals = counts_t.sum(0).to(torch.int32)
    beta = torch.full((n,), 0.25)
    none = torch.empty(0, dtype=torch.long)
    ref, got = empty_state(n, k, k), empty_state(n, k, k)
    for s, op in ((ref, ops.gibbs_update_owners), (got, emulated_op())):
        call(op, s, counts_t, totals, beta, 3.0, 0, k, none, none, none, full=True)
    assert_same(got, ref, "ties")
    assert bool((ref["owner"] == 0).all())
    for g in list(range(k - 1)) + list(range(k - 2, -1, -1)):
        src = g
        dst = (g + 1) % k
        if int(counts_t[:, src].sum()) == 0:
            src, dst = dst, src
        y = torch.nonzero(counts_t[:, src] > 0).flatten()
        old, new = torch.full_like(y, src), torch.full_like(y, dst)
        apply_moves(counts_t, totals, y, old, new, 0)
        for s, op in ((ref, ops.gibbs_update_owners), (got, emulated_op())):
            call(op, s, counts_t, totals, beta, 3.0, 0, k, y, old, new)
        assert_same(got, ref, f"emptying {g}")
    assert bool((ref["kept"] == 0).any())


@pytest.mark.cuda_emulated
def test_emulated_no_moves_is_a_no_op():
    n, k = 9, 3
    gen = torch.Generator().manual_seed(0)
    _, _, counts_t, totals, beta, offset, width = make_problem(gen, n, k, 20, "vector")
    s = empty_state(n, width, k)
    before = clone(s)
    # never built (owner 0 is in range), entries with old == new only: nothing is written
    op = emulated_op()
    op(*s.values(), counts_t, totals, beta, 2.0, offset, k, torch.tensor([1, 2]), torch.tensor([0, 2]),
       torch.tensor([0, 2]), False)
    op(*s.values(), counts_t, totals, beta, 2.0, offset, k, *(torch.empty(0, dtype=torch.long),) * 3, False)
    for key in s:
        assert torch.equal(s[key], before[key])


def bad_value_cases(n, k):
    t = torch.tensor
    return [
        ((t([0, n]), t([0, 1]), t([1, 0])), r"classes\[1\] = %d is out of range \[0, %d\)" % (n, n)),
        ((t([0, -1]), t([0, 1]), t([1, 0])), r"classes\[1\] = -1 is out of range"),
        ((t([0, 1]), t([0, 1]), t([1, k])), r"old_groups\[1\] = 1 or new_groups\[1\] = %d is out of range \[0, %d\)"
         % (k, k)),
        ((t([0, 1]), t([-1, 1]), t([1, 0])), r"old_groups\[0\] = -1"),
        # the first offending entry is reported, as by the CPU op
        ((t([0, n]), t([k, 0]), t([1, 0])), r"old_groups\[0\] = %d" % k),
        ((t([0, n]), t([0, k]), t([1, 0])), r"classes\[1\]"),  # the class first within an entry
        ((t([n, 0]), t([0, k]), t([1, 0])), r"classes\[0\]"),
    ]


def check_bad_values(op, device):
    n, k = 11, 4
    gen = torch.Generator().manual_seed(3)
    _, _, counts_t, totals, beta, offset, width = make_problem(gen, n, k, 40, "vector")
    to = (lambda x: x.to(device))
    counts_t, totals, beta = to(counts_t), to(totals), to(beta)
    s = {key: to(v) for key, v in empty_state(n, width, k).items()}
    none = to(torch.empty(0, dtype=torch.long))
    call(op, s, counts_t, totals, beta, 5.0, offset, k, none, none, none, full=True)
    before = clone(s)
    for (c, o, w), message in bad_value_cases(n, k):
        with pytest.raises(RuntimeError, match=message):
            call(op, s, counts_t, totals, beta, 5.0, offset, k, to(c), to(o), to(w))
        for key in s:
            assert torch.equal(s[key], before[key]), f"a refused call changed {key}"
    # a state that was never built: owner out of range
    s["owner"][3] = k
    with pytest.raises(RuntimeError, match=r"owner\[3\] = %d is out of range \[0, %d\): the state was never built"
                       % (k, k)):
        call(op, s, counts_t, totals, beta, 5.0, offset, k, to(torch.tensor([1])), to(torch.tensor([0])),
             to(torch.tensor([1])))
    s["owner"][3] = -1
    with pytest.raises(RuntimeError, match=r"owner\[3\] = -1"):  # also when beta0 forces a rebuild
        call(op, s, counts_t, totals, beta, 2 * TWO40, offset, k, to(torch.tensor([1])), to(torch.tensor([0])),
             to(torch.tensor([1])))
    s["owner"][3] = before["owner"][3]
    for key in s:
        assert torch.equal(s[key], before[key]), f"a refused call changed {key}"
    # shapes and dtypes as the CPU op
    with pytest.raises(RuntimeError, match="nonzero"):
        op(*list(s.values())[:5], to(torch.zeros(k, 2, dtype=torch.long)), s["bound"], counts_t, totals, beta, 5.0,
           offset, k, none, none, none, full=True)
    with pytest.raises(RuntimeError, match="level columns"):
        call(op, s, counts_t, totals, beta, 5.0, width - k + 1, k, none, none, none, full=True)
    for key in s:
        assert torch.equal(s[key], before[key]), f"a refused call changed {key}"


@pytest.mark.cuda_emulated
def test_emulated_bad_values():
    check_bad_values(emulated_op(), "cpu")
    check_bad_values(ops.gibbs_update_owners, "cpu")  # the same messages as the CPU op


def opcheck_args(device):
    n, k = 13, 5
    gen = torch.Generator().manual_seed(5)
    _, _, counts_t, totals, beta, offset, width = make_problem(gen, n, k, 50, "vector")
    s = empty_state(n, width, k)
    none = torch.empty(0, dtype=torch.long)
    call(ops.gibbs_update_owners, s, counts_t, totals, beta, 4.0, offset, k, none, none, none, full=True)
    state = [v.to(device) for v in s.values()]
    rest = [counts_t.to(device), totals.to(device), beta.to(device), 4.0, offset, k]
    moves = [torch.tensor(x, device=device) for x in ([2, 0, 7], [1, 4, 3], [4, 4, 0])]
    return state, rest, moves, none.to(device)


@pytest.mark.cuda_emulated
def test_emulated_opcheck():
    state, rest, moves, none = opcheck_args("cpu")
    op = emulated_op().default
    torch.library.opcheck(op, (*state, *rest, none, none, none, True))
    torch.library.opcheck(op, (*state, *rest, *moves, False))


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(1, 1), (65, 7), (517, 64), (300, 2)])
@pytest.mark.parametrize("beta_kind", ["constant", "vector", "wide"])
def test_cuda_op_equals_cpu_op(n, k, beta_kind):
    for dtype, beta0_kind in [(torch.float32, "small"), (torch.float64, "small"), (torch.float32, "huge")]:
        run_sequence(n, k, beta_kind, beta0_kind, dtype, steps=10, seed=n * 7 + k, device="cuda")


@pytest.mark.cuda
def test_cuda_op_bad_values():
    check_bad_values(ops.gibbs_update_owners, "cuda")


@pytest.mark.cuda
def test_cuda_op_opcheck():
    state, rest, moves, none = opcheck_args("cuda")
    op = torch.ops.lmm_fast.gibbs_update_owners.default
    torch.library.opcheck(op, (*state, *rest, none, none, none, True))
    torch.library.opcheck(op, (*state, *rest, *moves, False))
