"""Fuzz tests of the owner update of the non-overlapping Ψ
(``lmm_fast.ops.gibbs.gibbs_update_owners``): whatever state and moves it is
given, it raises a clean ``RuntimeError`` or returns a state whose every index
is in range, and padding bits of the nonzero bitmap (the bits of classes
``N .. 64 * ceil(N / 64) - 1``) change nothing.

Every index a kernel uses comes from the caller (classes, groups, owners) or
from its own bitmaps and argmax passes; a bad one would be an out-of-bounds
read or write, which may crash the process. So each property runs under
hypothesis in a child process (this file run as a script), and the test
demands a clean exit: a signal, a hang or a failed example fails it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lmm_fast
import lmm_fast.ops.gibbs  # noqa: F401  (registers the ops)

# The ops under test. The parallel algorithm (the CUDA op's phases) is also
# reachable on the CPU through its emulation while that op exists.
OPS = ["gibbs_update_owners"]
if hasattr(torch.ops.lmm_fast, "gibbs_update_owners_emulated"):
    OPS.append("gibbs_update_owners_emulated")

PROPERTIES = ("garbage", "padding")
EXAMPLES = 60
TIMEOUT_S = 240


def child_env(**extra: str) -> dict:
    """The environment of a child interpreter: it imports the lmm_fast this
    test imported (installed, or an in-place build)."""
    import os

    parent = os.path.dirname(os.path.dirname(os.path.abspath(lmm_fast.__file__)))
    path = os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


# ---------------------------------------------------------------- child side
def _state(n, width, k, dtype):
    return dict(psi_t=torch.full((n, width), -1.0, dtype=dtype),
                psi_scale=torch.full((width,), -1.0, dtype=dtype),
                owner=torch.zeros(n, dtype=torch.long),
                numerator=torch.zeros(n, dtype=torch.float64),
                kept=torch.zeros(k, dtype=torch.long),
                nonzero=torch.zeros(k, (n + 63) // 64, dtype=torch.long),
                bound=torch.zeros(n, dtype=torch.float64))


def _call(op, s, counts_t, totals, beta, beta0, offset, k, classes, old, new, full=False):
    op(s["psi_t"], s["psi_scale"], s["owner"], s["numerator"], s["kept"], s["nonzero"], s["bound"],
       counts_t, totals, beta, beta0, offset, k, classes, old, new, full)


def _problem(gen, n, k, images, offset=1, after=2):
    """Counts of one level of k groups between other columns, as the adapter keeps them."""
    classes = torch.randint(0, n, (images,), generator=gen)
    labels = torch.randint(0, k, (images,), generator=gen)
    width = offset + k + after
    counts_t = torch.zeros(n, width, dtype=torch.int32)
    counts_t.index_put_((classes, labels + offset), torch.ones(images, dtype=torch.int32), accumulate=True)
    totals = counts_t.sum(0).to(torch.int32)
    beta = 0.1 + torch.rand(n, generator=gen)
    return classes, labels, counts_t, totals, beta, width


def _moves(gen, classes, labels, k, batch):
    idx = torch.unique(torch.randint(0, classes.numel(), (batch,), generator=gen))
    old = labels[idx].clone()
    new = torch.randint(0, k, (idx.numel(),), generator=gen)
    return idx, old, new


def _apply(counts_t, totals, y, old, new, offset):
    counts_t.index_put_((y, old + offset), torch.full_like(y, -1, dtype=torch.int32), accumulate=True)
    counts_t.index_put_((y, new + offset), torch.ones_like(y, dtype=torch.int32), accumulate=True)
    totals.index_add_(0, old + offset, torch.full_like(y, -1, dtype=torch.int32))
    totals.index_add_(0, new + offset, torch.ones_like(y, dtype=torch.int32))


def _bits(t):
    """The tensor's bit patterns (NaN equals itself)."""
    if t.is_floating_point():
        return t.view(torch.int32 if t.element_size() == 4 else torch.int64)
    return t


def _padding_mask(n: int) -> int:
    """The padding bits of the last bitmap word, as a signed int64."""
    used = n % 64
    if used == 0:
        return 0
    return ((1 << 64) - (1 << used)) - (1 << 64)


def _garbage(op, n, k, seed, corrupt, dtype, full):
    """Any values in the state and the moves: a clean error or an in-range state."""
    gen = torch.Generator().manual_seed(seed)
    classes, labels, counts_t, totals, beta, width = _problem(gen, n, k, 3 * n)
    offset = 1
    s = _state(n, width, k, dtype)
    none = torch.empty(0, dtype=torch.long)
    _call(op, s, counts_t, totals, beta, 0.5 * n, offset, k, none, none, none, full=True)
    idx, old, new = _moves(gen, classes, labels, k, max(1, n // 2))
    y = classes[idx]
    _apply(counts_t, totals, y, old, new, offset)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e308])
    pick = lambda size: special[torch.randint(0, special.numel(), (size,), generator=gen)]  # noqa: E731
    some = lambda size: torch.rand(size, generator=gen) < 0.5  # noqa: E731
    if "numerator" in corrupt:
        s["numerator"] = torch.where(some(n), pick(n).double(), s["numerator"])
    if "bound" in corrupt:
        s["bound"] = torch.where(some(n), pick(n).double(), s["bound"])
    if "beta" in corrupt:
        beta = torch.where(some(n), pick(n).float(), beta)
    if "kept" in corrupt:
        s["kept"] = torch.randint(-3, n + 3, (k,), generator=gen)
    if "bitmap" in corrupt:
        s["nonzero"] = torch.randint(-(2**62), 2**62, s["nonzero"].shape, generator=gen) * 2 - 1
    if "owner" in corrupt:
        s["owner"] = torch.randint(-2, k + 2, (n,), generator=gen)
    if "counts" in corrupt:
        counts_t = torch.randint(-3, 4, counts_t.shape, generator=gen, dtype=torch.int32)
        totals = torch.randint(-5, 6, totals.shape, generator=gen, dtype=torch.int32)
    if "moves" in corrupt:
        y = torch.randint(-1, n + 2, (y.numel(),), generator=gen)
        old = torch.randint(-1, k + 2, (y.numel(),), generator=gen)
        new = torch.randint(-1, k + 2, (y.numel(),), generator=gen)
    if full:
        y = old = new = none
    before = {key: v.clone() for key, v in s.items()}
    try:
        _call(op, s, counts_t, totals, beta, 0.5 * n, offset, k, y, old, new, full=full)
    except RuntimeError as error:
        assert "lmm_fast" in str(error), f"an error that does not name the op's check: {error}"
        return
    if all(torch.equal(_bits(s[key]), _bits(before[key])) for key in s):
        return  # no entry moved: a no-op, whatever the state
    owner = s["owner"]
    assert bool(((owner >= 0) & (owner < k)).all()), f"owner out of [0, {k}) after the update: {owner.tolist()}"


def _padding(op, n, k, seed, dtype, full):
    """A valid state whose bitmap has its padding bits set: the same result as with them clear."""
    gen = torch.Generator().manual_seed(seed)
    classes, labels, counts_t, totals, beta, width = _problem(gen, n, k, 3 * n)
    offset = 1
    none = torch.empty(0, dtype=torch.long)
    clean = _state(n, width, k, dtype)
    _call(op, clean, counts_t, totals, beta, 0.5 * n, offset, k, none, none, none, full=True)
    padded = {key: v.clone() for key, v in clean.items()}
    mask = _padding_mask(n)
    padded["nonzero"][:, -1] |= mask
    padded["nonzero"][:, -1] |= torch.randint(0, 2, (k,), generator=gen) << 63 if mask else 0
    idx, old, new = _moves(gen, classes, labels, k, max(1, n // 3))
    y = classes[idx]
    _apply(counts_t, totals, y, old, new, offset)
    if full:
        y = old = new = none
    _call(op, clean, counts_t, totals, beta, 0.5 * n, offset, k, y, old, new, full=full)
    _call(op, padded, counts_t, totals, beta, 0.5 * n, offset, k, y, old, new, full=full)
    for key in ("psi_t", "psi_scale", "owner", "numerator", "kept"):
        assert torch.equal(padded[key], clean[key]), f"padding bits changed {key}"
    real = ~torch.tensor(mask, dtype=torch.long)
    assert torch.equal(padded["nonzero"][:, :-1], clean["nonzero"][:, :-1])
    assert torch.equal(padded["nonzero"][:, -1] & real, clean["nonzero"][:, -1] & real)
    # and the state is the one a rebuild from the counts gives
    fresh = _state(n, width, k, dtype)
    fresh["psi_t"].copy_(clean["psi_t"])
    fresh["psi_scale"].copy_(clean["psi_scale"])
    _call(op, fresh, counts_t, totals, beta, 0.5 * n, offset, k, none, none, none, full=True)
    for key in ("psi_t", "psi_scale", "owner", "numerator", "kept"):
        assert torch.equal(fresh[key], clean[key]), f"{key} differs from a rebuild"


def _child(op_name: str, prop: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    op = getattr(torch.ops.lmm_fast, op_name).default
    corruptions = st.sets(st.sampled_from(["numerator", "bound", "beta", "kept", "bitmap", "owner", "counts",
                                           "moves"]), min_size=1)
    common = dict(n=st.integers(1, 200), k=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
                  dtype=st.sampled_from([torch.float32, torch.float64]), full=st.booleans())

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(corrupt=corruptions, **common)
    def garbage(n, k, seed, dtype, full, corrupt):
        print(f"garbage n={n} k={k} seed={seed} corrupt={sorted(corrupt)} {dtype} full={full}",
              file=sys.stderr, flush=True)
        _garbage(op, n, k, seed, corrupt, dtype, full)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(**common)
    def padding(n, k, seed, dtype, full):
        print(f"padding n={n} k={k} seed={seed} {dtype} full={full}", file=sys.stderr, flush=True)
        _padding(op, n, k, seed, dtype, full)

    {"garbage": garbage, "padding": padding}[prop]()


# ---------------------------------------------------------------- parent side
@pytest.mark.parametrize("prop", PROPERTIES)
@pytest.mark.parametrize("op_name", OPS)
def test_owner_update_fuzz(op_name, prop):
    env = child_env(OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, __file__, op_name, prop], capture_output=True, text=True,
                                timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as expired:  # pragma: no cover - only on a hang
        tail = (expired.stderr or b"")[-2000:]
        pytest.fail(f"{op_name} {prop}: no result after {TIMEOUT_S} s; last examples:\n{tail}")
    last = "\n".join(result.stderr.splitlines()[-25:])
    if result.returncode < 0:
        pytest.fail(f"{op_name} {prop}: killed by signal {-result.returncode}; last lines:\n{last}")
    assert result.returncode == 0, f"{op_name} {prop} failed:\n{last}"


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
