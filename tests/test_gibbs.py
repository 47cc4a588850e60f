"""Collapsed Gibbs adaptation of Ψ: the sampling kernels against their bit-exact
and mathematical references, the exact sampler against the closed-form joint
posterior, and GibbsAdapter's invariants, determinism, resumption and errors."""
import io
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from lmm_fast import FusedLMMLoss, GibbsAdapter
from lmm_fast.ops import gibbs as ops
from lmm_fast.reference import gibbs as ref
from lmm_fast.hierarchy import Hierarchy


# --------------------------------------------------------------- helpers
def consistent_state(gen, sizes, images):
    """Random labels of `images` training images and the counts they imply."""
    n = sizes[-1]
    classes = torch.randint(0, n, (images,), generator=gen)
    labels = torch.stack([torch.randint(0, k, (images,), generator=gen) for k in sizes[:-1]], 1)
    counts = ref.counts_from_labels(labels, classes, sizes)
    counts_t = torch.cat([c.t() for c in counts], 1).to(torch.int32).contiguous()
    totals = torch.cat([c.sum(1) for c in counts]).to(torch.int32)
    return classes, labels, counts_t, totals


def op_inputs(seed, sizes, batch, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    classes, labels, counts_t, totals = consistent_state(gen, sizes, max(4 * batch, 40))
    ids = torch.randperm(classes.numel(), generator=gen)[:batch]
    logits = (scale * torch.randn(batch, sum(sizes), generator=gen)).to(dtype)
    beta = 0.1 + torch.rand(sizes[-1], generator=gen)
    beta0 = float(beta.double().sum())
    return dict(logits=logits, target=classes[ids], old_labels=labels[ids].contiguous(), counts_t=counts_t,
                group_totals=totals, beta=beta, beta0=beta0, level_sizes=list(sizes), seed=seed + 11,
                step=seed * 7 + 3, image_ids=ids)


def args_of(d):
    return (d["logits"], d["target"], d["old_labels"], d["counts_t"], d["group_totals"], d["beta"], d["beta0"],
            d["level_sizes"], d["seed"], d["step"], d["image_ids"])


def tree_hierarchy(n, sizes, seed=0):
    """A nested tree over n classes with the given upper level sizes (top first)."""
    gen = torch.Generator().manual_seed(seed)
    finest = torch.arange(n) % sizes[-1]
    finest = finest[torch.randperm(n, generator=gen)]
    levels = [finest]
    for k in reversed(sizes[:-1]):
        levels.insert(0, levels[0] % k)
    return Hierarchy.from_assignments(levels)


def make_adapter(n=13, sizes=(2, 5), images=150, seed=0, **kwargs):
    h = tree_hierarchy(n, list(sizes), seed)
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, n, (images,), generator=gen)
    return h, loss_fn, targets, GibbsAdapter(loss_fn, h, targets, **kwargs)


def random_batch(gen, adapter, batch, scale=2.0):
    idx = torch.randperm(adapter.num_images, generator=gen)[:batch]
    width = sum(adapter.level_sizes) + adapter.num_classes
    return scale * torch.randn(batch, width, generator=gen), adapter.train_targets[idx], idx


def check_invariants(adapter, loss_fn):
    sizes = adapter.level_sizes + [adapter.num_classes]
    expected = ref.counts_from_labels(adapter.labels, adapter.train_targets, sizes)
    per_class = torch.bincount(adapter.train_targets, minlength=adapter.num_classes)
    for level, (omega, hist) in enumerate(zip(adapter.counts, expected)):
        assert torch.equal(omega.long(), hist), f"level {level}: Ω is not the histogram of the labels"
        assert torch.equal(omega.long().sum(0), per_class), f"level {level}: column sums"
        assert torch.equal(adapter.group_totals[adapter.offsets[level]:][: omega.shape[0]].long(), hist.sum(1))
    for level, psi in enumerate(loss_fn.psi):
        sums = psi.double().sum(1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5), f"level {level}: rows off the simplex"
        assert bool((psi >= 0).all())
    reference = ref.psi_from_counts_reference(adapter.counts, adapter.beta, adapter.beta0, adapter.non_overlapping)
    for got, want in zip(loss_fn.psi, reference):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
    # the stored factors: unnormalised Ω + β in psi_t, one normaliser per group in psi_scale
    factors = ref.psi_factors_reference(adapter.counts, adapter.beta, adapter.beta0, adapter.non_overlapping)
    for (numerator, scale), offset in zip(factors, adapter.offsets):
        size = scale.numel()
        assert torch.equal(loss_fn.psi_t[:, offset : offset + size].t().double(), numerator.float().double())
        torch.testing.assert_close(loss_fn.psi_scale[offset : offset + size].double(), scale, rtol=1e-7, atol=0)
    if adapter.non_overlapping:
        for psi, omega in zip(loss_fn.psi, adapter.counts):
            dense = (omega.double() + adapter.beta.double()) / (omega.double().sum(1, keepdim=True) + adapter.beta0)
            owner = dense.argmax(0)
            owning = torch.bincount(owner, minlength=psi.shape[0]) > 0
            # every class sits in exactly one group among those that own classes ...
            assert torch.equal(((psi > 0) & owning[:, None]).sum(0), torch.ones(psi.shape[1], dtype=torch.long))
            assert torch.equal(owning.nonzero().flatten()[(psi[owning] > 0).float().argmax(0)], owner)
            # ... and a group left without classes keeps its Eq. 6 row
            torch.testing.assert_close(psi[~owning].double(), dense[~owning], rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------ philox / math
def test_philox_known_answers():
    # Random123's published known-answer vectors for Philox4x32-10.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        got = ref.philox4x32_10(np.array([counter], dtype=np.uint64), key)[0]
        assert tuple(int(v) for v in got) == expected


def test_label_draws_are_uniform_bits():
    bits = ref.label_draw(5, 2, np.arange(20000), 1)
    top = (bits >> np.uint64(60)).astype(np.int64)  # 16 equiprobable buckets
    chi2 = stats.chisquare(np.bincount(top, minlength=16))
    assert chi2.pvalue > 1e-3
    assert len(np.unique(bits)) == bits.size


def test_exp_negated_accuracy_and_edges():
    y = np.concatenate([np.linspace(0, 87, 100001), np.random.default_rng(0).exponential(5, 5000)])
    y = y[y < 87].astype(np.float32)
    got = ref.exp_negated(y).astype(np.float64)
    want = np.exp(-y.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 4e-7
    edge = ref.exp_negated(np.array([88.5, np.inf, np.nan, -1.0, -np.inf, 0.0, -0.0], dtype=np.float32))
    assert edge.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # a -0 maximum with a +0 logit beside it: both are maxima, both drawable
    w = ref.candidate_weights(np.array([-0.0, 0.0, -1.0], np.float32), np.float32(-0.0), np.array([1, 1, 1]),
                              np.array([3, 3, 3]), np.float32(1), np.float32(3))
    assert w[0] == w[1] > w[2] > 0


# ------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("sizes,batch", [([1, 4], 1), ([3, 7, 11], 7), ([7, 130, 1031, 1100], 37)])
def test_batched_kernel_is_bit_exact(sizes, batch):
    d = op_inputs(len(sizes) * 100 + batch, sizes, batch)
    before = (d["counts_t"].clone(), d["group_totals"].clone())
    got = ops.gibbs_sample(*args_of(d))
    want = ref.gibbs_sample_reference(*args_of(d))
    assert got.dtype == torch.long and got.shape == (batch, len(sizes) - 1)
    assert torch.equal(got, want)
    assert torch.equal(d["counts_t"], before[0]) and torch.equal(d["group_totals"], before[1])


@pytest.mark.parametrize("sizes,batch", [([1, 4], 1), ([3, 7, 11], 9), ([5, 97, 101], 23)])
def test_exact_kernel_is_bit_exact(sizes, batch):
    d = op_inputs(len(sizes) * 1000 + batch, sizes, batch, scale=1.0)
    want, counts, totals = ref.gibbs_sample_exact_reference(*args_of(d))
    got = ops.gibbs_sample_exact(*args_of(d))
    assert torch.equal(got, want)
    assert torch.equal(d["counts_t"], counts.to(torch.int32))
    assert torch.equal(d["group_totals"], totals.to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_logit_dtypes(dtype):
    d = op_inputs(3, [4, 9, 20], 17, dtype=dtype)
    assert torch.equal(ops.gibbs_sample(*args_of(d)), ref.gibbs_sample_reference(*args_of(d)))


def test_strided_upper_only_and_extreme_logits():
    d = op_inputs(4, [3, 8, 15], 11, scale=40.0)
    d["logits"][0, :3] = torch.tensor([float("-inf"), 2.0, float("-inf")])  # one finite candidate
    d["logits"][1, 3:11] = -1e4
    d["logits"][2, 3:11] = torch.arange(8.0) * 1e3
    d["logits"][3, :3] = torch.tensor([-0.0, 0.0, -30.0])
    want = ops.gibbs_sample(*args_of(d))
    assert torch.equal(want, ref.gibbs_sample_reference(*args_of(d)))
    assert int(want[0, 0]) == 1
    # rows strided inside a wider buffer, columns strided (transposed copy), upper levels only
    wide = torch.full((11, 40), float("nan"))
    wide[:, 2:28] = d["logits"]
    column_strided = d["logits"].t().contiguous().t()
    for logits in (wide[:, 2:28], column_strided, d["logits"][:, :11]):
        assert torch.equal(ops.gibbs_sample(*args_of({**d, "logits": logits})), want)


def test_empty_batch():
    d = op_inputs(5, [2, 6], 0)
    assert ops.gibbs_sample(*args_of(d)).shape == (0, 1)
    assert ops.gibbs_sample_exact(*args_of(d)).shape == (0, 1)


def test_batch_of_one_is_the_exact_sampler():
    for seed in range(40):
        d = op_inputs(seed, [3, 7, 11], 1, scale=1.5)
        batched = ops.gibbs_sample(*args_of(d))
        counts = d["counts_t"].clone()
        exact = ops.gibbs_sample_exact(*args_of(d))
        assert torch.equal(batched, exact)
        # the exact sampler moved the image from its old to its new groups
        y = int(d["target"][0])
        offsets = torch.tensor([0, 3])
        counts[y, d["old_labels"][0] + offsets] -= 1
        counts[y, exact[0] + offsets] += 1
        assert torch.equal(counts, d["counts_t"])


def test_one_draw_follows_eq4():
    """Many i.i.d. draws of one image (distinct Philox streams, same counts)
    against the float64 conditional of Eq. 4; and the same test rejects the
    conditional that forgets to exclude the image itself."""
    gen = torch.Generator().manual_seed(8)
    sizes, draws = [6, 9], 60000
    classes, labels, counts_t, totals = consistent_state(gen, sizes, 30)
    i = 3
    y, old = int(classes[i]), int(labels[i, 0])
    logits = torch.randn(1, 15, generator=gen).expand(draws, 15).contiguous()
    beta = torch.full((9,), 0.3)
    got = ops.gibbs_sample(logits, classes[i].repeat(draws), labels[i].repeat(draws, 1), counts_t, totals,
                           beta, 2.7, sizes, 1, 0, torch.arange(draws))
    observed = np.bincount(got[:, 0].numpy(), minlength=6)
    p = ref.conditional_probabilities(logits[0, :6], counts_t[y, :6], totals[:6], 0.3, 2.7, old).numpy()
    assert stats.chisquare(observed, draws * p).pvalue > 1e-3
    plain = ref.gibbs_sample_torch(logits, classes[i].repeat(draws), labels[i].repeat(draws, 1), counts_t, totals,
                                   beta, 2.7, sizes, torch.Generator().manual_seed(0))
    assert stats.chisquare(np.bincount(plain[:, 0].numpy(), minlength=6), draws * p).pvalue > 1e-3
    wrong = ref.conditional_probabilities(logits[0, :6], counts_t[y, :6] + torch.eye(6)[old].int(),
                                          totals[:6] + torch.eye(6)[old].int(), 0.3, 2.7, old).numpy()
    assert stats.chisquare(observed, draws * wrong).pvalue < 1e-6


def test_exact_sampler_matches_the_joint_posterior():
    """The exact sampler's long-run frequencies over all 3^4 label
    configurations of a tiny problem against the closed-form posterior.

    16 independent chains run side by side as 16 upper levels of one call;
    one call is one systematic sweep. Thinning by 3 sweeps makes the samples
    nearly independent (the sweep operator's second eigenvalue, computed
    exactly here, is ~0.13, 0.13^3 ~ 2e-3), so the chi-square test applies.
    The batched (AD-LDA) sampler is run on the same problem as a power check:
    its stationary distribution is not the posterior and the test must see it.
    """
    groups, n, classes, beta = 3, 3, [0, 0, 1, 2], 0.5
    z = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.25, 0.35, 0.4]], dtype=torch.float64)
    posterior = ref.joint_posterior(z, classes, n, beta)
    configs = list(itertools.product(range(groups), repeat=len(classes)))
    p = np.array([posterior[c] for c in configs])

    # exact mixing rate of the systematic-scan chain
    def conditional(config, i):
        omega = np.zeros((groups, n))
        for j, t in enumerate(config):
            omega[t, classes[j]] += 1
        omega[config[i], classes[i]] -= 1
        w = z[i].numpy() * (omega[:, classes[i]] + beta) / (omega.sum(1) + n * beta)
        return w / w.sum()

    index = {c: k for k, c in enumerate(configs)}
    sweep = np.eye(len(configs))
    for i in range(len(classes)):
        site = np.zeros_like(sweep)
        for c in configs:
            for t, prob in enumerate(conditional(c, i)):
                site[index[c], index[c[:i] + (t,) + c[i + 1:]]] += prob
        sweep = sweep @ site
    np.testing.assert_allclose(p @ sweep, p, atol=1e-12)  # the posterior is stationary
    thin = 3
    assert np.sort(np.abs(np.linalg.eigvals(sweep)))[-2] ** thin < 5e-3

    chains = 16
    sizes = [groups] * chains + [n]
    logits = torch.log(z.float()).repeat(1, chains + 1)
    target = torch.tensor(classes)
    offsets = torch.arange(chains) * groups
    codes = torch.tensor([27, 9, 3, 1])[:, None]

    def run(exact, sweeps):
        labels = torch.zeros(len(classes), chains, dtype=torch.long)
        counts_t = torch.zeros(n, groups * chains, dtype=torch.int32)
        totals = torch.zeros(groups * chains, dtype=torch.int32)
        rows = target[:, None].expand_as(labels).reshape(-1)
        ones = torch.ones(labels.numel(), dtype=torch.int32)
        counts_t.index_put_((rows, (labels + offsets).reshape(-1)), ones, accumulate=True)
        totals.index_add_(0, (labels + offsets).reshape(-1), ones)
        beta_t, ids = torch.full((n,), beta), torch.arange(len(classes))
        hist = np.zeros(len(configs))
        for s in range(sweeps):
            args = (logits, target, labels, counts_t, totals, beta_t, n * beta, sizes, 11, s, ids)
            if exact:
                new = ops.gibbs_sample_exact(*args)
            else:
                new = ops.gibbs_sample(*args)
                counts_t.index_put_((rows, (labels + offsets).reshape(-1)), -ones, accumulate=True)
                counts_t.index_put_((rows, (new + offsets).reshape(-1)), ones, accumulate=True)
                totals.index_add_(0, (labels + offsets).reshape(-1), -ones)
                totals.index_add_(0, (new + offsets).reshape(-1), ones)
            labels = new
            if s >= 20 and s % thin == 0:
                hist += np.bincount((labels * codes).sum(0).numpy(), minlength=len(configs))
        return hist

    hist = run(True, 20000)
    samples = hist.sum()
    assert samples > 100000 and (samples * p).min() > 100
    assert stats.chisquare(hist, samples * p).pvalue > 1e-3
    batched = run(False, 4000)
    assert stats.chisquare(batched, batched.sum() * p).pvalue < 1e-6


# --------------------------------------------------------------- refresh op
def test_refresh_psi_columns_only():
    gen = torch.Generator().manual_seed(9)
    sizes = [4, 9, 23]
    _, _, counts_t, totals = consistent_state(gen, sizes, 200)
    beta = 0.1 + torch.rand(23, generator=gen)
    psi_t = torch.full((23, 13), -1.0)
    scale = torch.full((13,), -1.0)
    columns = torch.tensor([0, 5, 12, 7])
    version = psi_t._version
    ops.gibbs_refresh_psi(psi_t, scale, counts_t, totals, beta, 3.5, columns)
    assert psi_t._version > version, "the wrapper must bump the version (the loss caches on it)"
    numerator = counts_t.double() + beta.double()[:, None]
    factor = 1.0 / (totals.double() + 3.5)
    assert torch.equal(psi_t[:, columns], numerator[:, columns].float())
    assert torch.equal(scale[columns], factor[columns].float())
    untouched = torch.ones(13, dtype=torch.bool)
    untouched[columns] = False
    assert bool((psi_t[:, untouched] == -1).all()) and bool((scale[untouched] == -1).all())
    # the product is Eq. 6
    want = numerator / (totals.double() + 3.5)
    torch.testing.assert_close((psi_t * scale)[:, columns].double(), want[:, columns], rtol=3e-7, atol=0)
    psi64, scale64 = torch.zeros(23, 13, dtype=torch.float64), torch.zeros(13, dtype=torch.float64)
    ops.gibbs_refresh_psi(psi64, scale64, counts_t, totals, beta, 3.5, torch.arange(13))
    assert torch.equal(psi64, numerator) and torch.equal(scale64, factor)


def test_refresh_psi_entries_only():
    gen = torch.Generator().manual_seed(10)
    sizes = [4, 9, 23]
    _, _, counts_t, totals = consistent_state(gen, sizes, 200)
    beta = 0.1 + torch.rand(23, generator=gen)
    psi_t = torch.full((23, 13), -1.0)
    scale = torch.full((13,), -1.0)
    rows = torch.tensor([3, 0, 22, 3, 7])
    columns = torch.tensor([5, 12, 0, 5, 12])  # (3, 5) twice
    ops.gibbs_refresh_psi_entries(psi_t, scale, counts_t, totals, beta, 2.25, rows, columns)
    numerator = (counts_t.double() + beta.double()[:, None]).float()
    factor = (1.0 / (totals.double() + 2.25)).float()
    touched = torch.zeros(23, 13, dtype=torch.bool)
    touched[rows, columns] = True
    assert torch.equal(psi_t[touched], numerator[touched])
    assert bool((psi_t[~touched] == -1).all())
    assert torch.equal(scale[columns], factor[columns])
    assert int((scale != -1).sum()) == 3
    ops.gibbs_refresh_psi_entries(psi_t, scale, counts_t, totals, beta, 2.25, rows[:0], columns[:0])  # no-op
    assert torch.equal(psi_t[touched], numerator[touched])


# ------------------------------------------------------------------ opcheck
def test_opcheck():
    d = op_inputs(12, [3, 7, 11], 6)
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_sample.default, args_of(d))
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_sample_exact.default, args_of(d))
    psi_t, psi_scale = torch.zeros(11, 10), torch.ones(10)
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_refresh_psi.default,
                          (psi_t, psi_scale, d["counts_t"], d["group_totals"], d["beta"], d["beta0"],
                           torch.tensor([1, 4])))
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_refresh_psi_entries.default,
                          (psi_t, psi_scale, d["counts_t"], d["group_totals"], d["beta"], d["beta0"],
                           torch.tensor([0, 10, 10]), torch.tensor([9, 2, 2])))

    state = owner_state(11, [3, 7])
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_update_owners.default,
                          (psi_t, psi_scale, *state[1], d["counts_t"], d["group_totals"], d["beta"], d["beta0"],
                           3, 7, torch.tensor([2]), torch.tensor([1]), torch.tensor([4]), True))
    ops.gibbs_update_owners(psi_t, psi_scale, *state[1], d["counts_t"], d["group_totals"], d["beta"],
                            d["beta0"], 3, 7, torch.tensor([2]), torch.tensor([1]), torch.tensor([4]), full=True)
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_update_owners.default,
                          (psi_t, psi_scale, *state[1], d["counts_t"], d["group_totals"], d["beta"], d["beta0"],
                           3, 7, torch.tensor([2, 0]), torch.tensor([1, 6]), torch.tensor([4, 6]), False))


def owner_state(n, sizes):
    """Empty owner state of every upper level for gibbs_update_owners."""
    states = [(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64),
               torch.zeros(k, dtype=torch.long), torch.zeros(k, (n + 63) // 64, dtype=torch.long),
               torch.zeros(n, dtype=torch.float64))
              for k in sizes]
    return states


@pytest.mark.parametrize("n,sizes,beta_kind", [(23, [4, 9], "vector"), (70, [3, 31], "constant"),
                                                (130, [2, 50], "constant")])
def test_update_owners_incremental_equals_rebuild_and_reference(n, sizes, beta_kind):
    # Random moves (many, few, none; constant β makes exact ties common, and
    # small images counts empty groups): after every call the incremental
    # state and Ψ equal a rebuild bit for bit, and Ψ equals the reference.
    gen = torch.Generator().manual_seed(n)
    full_sizes = sizes + [n]
    classes, labels, counts_t, totals = consistent_state(gen, full_sizes, 3 * n)
    beta = 0.1 + torch.rand(n, generator=gen) if beta_kind == "vector" else torch.full((n,), 0.5)
    beta0 = float(beta.double().sum())
    width = sum(sizes)
    offsets = [0, sizes[0]]
    psi_t, psi_scale = torch.full((n, width), -1.0), torch.full((width,), -1.0)
    states = owner_state(n, sizes)
    none = torch.empty(0, dtype=torch.long)
    for level, k in enumerate(sizes):
        ops.gibbs_update_owners(psi_t, psi_scale, *states[level], counts_t, totals, beta, beta0, offsets[level], k,
                                none, none, none, full=True)
    for step in range(30):
        batch = [0, 1, 3, 40, classes.numel()][step % 5]
        idx = torch.randperm(classes.numel(), generator=gen)[:batch]
        old = labels[idx].clone()
        new = old.clone()
        for level, k in enumerate(sizes):
            # bias towards low groups so that some groups empty and refill
            new[:, level] = torch.randint(0, max(1, k // (1 + step % 3)), (batch,), generator=gen)
        y = classes[idx]
        for level, k in enumerate(sizes):
            cols_old, cols_new = old[:, level] + offsets[level], new[:, level] + offsets[level]
            counts_t.index_put_((y, cols_old), torch.full_like(y, -1, dtype=torch.int32), accumulate=True)
            counts_t.index_put_((y, cols_new), torch.ones_like(y, dtype=torch.int32), accumulate=True)
            totals.index_add_(0, cols_old, torch.full_like(y, -1, dtype=torch.int32))
            totals.index_add_(0, cols_new, torch.ones_like(y, dtype=torch.int32))
        labels[idx] = new
        for level, k in enumerate(sizes):
            moved = old[:, level] != new[:, level]
            ops.gibbs_update_owners(psi_t, psi_scale, *states[level], counts_t, totals, beta, beta0, offsets[level],
                                    k, y[moved], old[moved, level], new[moved, level])
        rebuilt_psi, rebuilt_scale = torch.full_like(psi_t, -1.0), torch.full_like(psi_scale, -1.0)
        for level, k in enumerate(sizes):
            fresh = [t.clone().fill_(-7) for t in owner_state(n, sizes)[level]]
            ops.gibbs_update_owners(rebuilt_psi, rebuilt_scale, *fresh, counts_t, totals, beta, beta0,
                                    offsets[level], k, none, none, none, full=True)
            # bound is only an upper bound of the runner-up (it depends on the history)
            for got, want in zip(states[level][:4], fresh[:4]):
                assert torch.equal(got, want), f"step {step} level {level}: state differs from a rebuild"
            omega = counts_t[:, offsets[level] : offsets[level] + k].t().double()
            values = (omega + beta.double()) / (totals[offsets[level] : offsets[level] + k].double()[:, None] + beta0)
            values[states[level][0], torch.arange(n)] = -float("inf")
            assert bool((states[level][4] >= values.max(0).values).all()), "bound below the runner-up"
        assert torch.equal(psi_t, rebuilt_psi) and torch.equal(psi_scale, rebuilt_scale), f"step {step}"
        counts = [counts_t[:, o : o + k].t() for o, k in zip(offsets, sizes)]
        factors = ref.psi_factors_reference(counts, beta, beta0, True)
        for (numerator, scale), o in zip(factors, offsets):
            k = scale.numel()
            assert torch.equal(psi_t[:, o : o + k].t().double(), numerator.float().double())
            torch.testing.assert_close(psi_scale[o : o + k].double(), scale, rtol=1e-7, atol=0)


@pytest.mark.parametrize("prior", ["per_class", "total"])
def test_owner_update_equals_reference_and_rebuild(prior):
    # The incremental owner update through many steps with many moves, exact
    # steps and emptied groups: against the float64 reference from the counts
    # (check_invariants) and, bit for bit, against a rebuild from scratch.
    h, loss_fn, targets, adapter = make_adapter(n=41, sizes=(3, 11), images=300, seed=21, beta=0.3,
                                                non_overlapping=True, prior=prior)
    *_, fresh_loss, _, fresh = make_adapter(n=41, sizes=(3, 11), images=300, seed=21, beta=0.3,
                                            non_overlapping=True, prior=prior)
    gen = torch.Generator().manual_seed(8)
    emptied = False
    for step in range(30):
        logits, target, idx = random_batch(gen, adapter, [5, 40, 120][step % 3], scale=4.0)
        if step % 7 == 6:
            logits[:, 3] += 10.0  # pull towards one group: empties others
        adapter.step(logits, target, idx, exact=step % 5 == 4)
        check_invariants(adapter, loss_fn)
        emptied |= any(bool(e.any()) for e in adapter._empty)
        fresh.load_state_dict(adapter.state_dict())  # rebuilds Ψ from the counts
        assert torch.equal(fresh_loss.psi_t, loss_fn.psi_t), f"step {step}: psi_t differs from a rebuild"
        assert torch.equal(fresh_loss.psi_scale, loss_fn.psi_scale), f"step {step}: psi_scale differs from a rebuild"
        assert all(torch.equal(a, b) for a, b in zip(fresh._owner, adapter._owner)), f"step {step}: owners differ"
    assert emptied, "no group was ever emptied"


def test_update_owners_bad_inputs():
    n, sizes = 9, [2, 4]
    gen = torch.Generator().manual_seed(2)
    _, _, counts_t, totals = consistent_state(gen, sizes + [n], 30)
    beta = torch.ones(n)
    psi_t, psi_scale = torch.zeros(n, 6), torch.zeros(6)
    state = owner_state(n, sizes)[1]
    none = torch.empty(0, dtype=torch.long)
    ops.gibbs_update_owners(psi_t, psi_scale, *state, counts_t, totals, beta, float(n), 2, 4, none, none, none,
                            full=True)
    before = psi_t.clone()
    with pytest.raises(RuntimeError, match="new_groups"):
        ops.gibbs_update_owners(psi_t, psi_scale, *state, counts_t, totals, beta, float(n), 2, 4,
                                torch.tensor([0]), torch.tensor([1]), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="classes"):
        ops.gibbs_update_owners(psi_t, psi_scale, *state, counts_t, totals, beta, float(n), 2, 4,
                                torch.tensor([9]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="level columns"):
        ops.gibbs_update_owners(psi_t, psi_scale, *state, counts_t, totals, beta, float(n), 3, 4, none, none, none,
                                full=True)
    with pytest.raises(RuntimeError, match="nonzero"):
        ops.gibbs_update_owners(psi_t, psi_scale, *state[:3], torch.zeros(4, 2, dtype=torch.long), state[4], counts_t,
                                totals, beta, float(n), 2, 4, none, none, none, full=True)
    assert torch.equal(psi_t, before), "a refused call must change nothing"


def test_torch_compile_fullgraph():
    d = op_inputs(13, [3, 7, 11], 5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def draw(logits, target, old, counts_t, totals, beta, ids):
        return ops.gibbs_sample(logits, target, old, counts_t, totals, beta, d["beta0"], d["level_sizes"],
                                d["seed"], d["step"], ids)

    got = draw(d["logits"], d["target"], d["old_labels"], d["counts_t"], d["group_totals"], d["beta"],
               d["image_ids"])
    assert torch.equal(got, ops.gibbs_sample(*args_of(d)))


def test_op_bad_inputs():
    check_op_bad_inputs(ops.gibbs_sample_exact, ops.gibbs_refresh_psi, ops.gibbs_refresh_psi_entries)


def check_op_bad_inputs(sample_exact, refresh_psi, refresh_psi_entries):
    """Bad shapes, dtypes and values raise, naming the argument, and change nothing."""
    d = op_inputs(14, [3, 7, 11], 4)
    cases = [
        ({"counts_t": d["counts_t"].long()}, "counts_t must be int32"),
        ({"group_totals": d["group_totals"][:-1]}, "group_totals must be"),
        ({"beta": d["beta"].double()}, "beta must be float32"),
        ({"beta0": 0.0}, "beta0 must be positive"),
        ({"logits": d["logits"][:, :-1]}, "logits must be"),
        ({"target": d["target"].int()}, "target must be int64"),
        ({"target": torch.tensor([0, 1, 11, 2])}, "target[2] = 11 is out of range"),
        ({"old_labels": d["old_labels"] + torch.tensor([0, 7])}, "old_labels[0, 1]"),
        ({"image_ids": torch.tensor([0, 1, -2, 3])}, "image_ids[2] = -2"),
        ({"level_sizes": [3, 7]}, "must be"),
    ]
    for change, message in cases:
        counts = d["counts_t"].clone()
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            sample_exact(*args_of({**d, "counts_t": counts, **change}))
        if "counts_t" not in change:
            assert torch.equal(counts, d["counts_t"]), "a refused exact call changed the counts"
    refresh = (d["counts_t"], d["group_totals"], d["beta"], 1.0)
    with pytest.raises(RuntimeError, match=r"columns\[0\] = 10 is out of range"):
        refresh_psi(torch.zeros(11, 10), torch.ones(10), *refresh, torch.tensor([10]))
    with pytest.raises(RuntimeError, match="psi_scale must be"):
        refresh_psi(torch.zeros(11, 10), torch.ones(9), *refresh, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="psi_scale must have psi_t's dtype"):
        refresh_psi(torch.zeros(11, 10), torch.ones(10, dtype=torch.float64), *refresh, torch.tensor([1]))
    psi_t, psi_scale = torch.full((11, 10), -1.0), torch.full((10,), -1.0)
    for rows, cols, message in [([0, 11], [1, 1], r"rows\[1\] = 11 is out of range"),
                                ([0, 1], [1, -1], r"columns\[1\] = -1 is out of range"),
                                ([0, 1], [1], "the same length")]:
        with pytest.raises(RuntimeError, match=message):
            refresh_psi_entries(psi_t, psi_scale, *refresh, torch.tensor(rows), torch.tensor(cols))
        assert bool((psi_t == -1).all()) and bool((psi_scale == -1).all()), "a refused call wrote Ψ"


# ------------------------------------------------------------------ adapter
def test_adapter_starts_at_the_hierarchy():
    h, loss_fn, targets, adapter = make_adapter()
    psi_before, scale_before = loss_fn.psi_t.clone(), loss_fn.psi_scale.clone()
    for level, groups in enumerate(h.assignments):
        assert torch.equal(adapter.labels[:, level], groups[targets])
    check_labels_and_counts = ref.counts_from_labels(adapter.labels, targets, h.level_sizes + [h.num_classes])
    assert all(torch.equal(a.long(), b) for a, b in zip(adapter.counts, check_labels_and_counts))
    assert torch.equal(loss_fn.psi_t, psi_before) and torch.equal(loss_fn.psi_scale, scale_before), \
        "the constructor must not touch Ψ (warm-up uses it)"
    assert adapter.counts[0].dtype == torch.int32 and adapter.labels.dtype == torch.long
    assert adapter.counts[1].shape == (5, 13) and adapter.labels.shape == (150, 2)


@pytest.mark.parametrize("non_overlapping", [False, True])
def test_adapter_invariants_after_many_steps(non_overlapping):
    h, loss_fn, targets, adapter = make_adapter(n=17, sizes=(3, 7), images=211, seed=2, beta=0.4,
                                                non_overlapping=non_overlapping)
    gen = torch.Generator().manual_seed(5)
    for step in range(25):
        batch = [1, 7, 31, 64][step % 4]
        logits, target, idx = random_batch(gen, adapter, batch, scale=3.0)
        adapter.step(logits, target, idx, exact=step % 3 == 0)
        check_invariants(adapter, loss_fn)
    # the incremental updates equal a rebuild from scratch, bit for bit
    incremental = (loss_fn.psi_t.clone(), loss_fn.psi_scale.clone())
    adapter.refresh_psi()
    assert torch.equal(loss_fn.psi_t, incremental[0]) and torch.equal(loss_fn.psi_scale, incremental[1])
    assert adapter.step_count == 25
    moved = (adapter.labels != torch.stack([g[targets] for g in h.assignments], 1)).any(1)
    assert bool(moved.any()), "no image ever changed group: the test exercised nothing"


def test_non_overlapping_emptied_group_keeps_its_eq6_row():
    # All images pulled towards group 0 of the lower level empties other groups.
    h, loss_fn, targets, adapter = make_adapter(n=12, sizes=(2, 4), images=120, seed=3, beta=0.05,
                                                non_overlapping=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        idx = torch.randperm(120, generator=gen)[:60]
        logits = torch.zeros(60, 2 + 4 + 12)
        logits[:, 2] = 8.0
        adapter.step(logits, targets[idx], idx)
        check_invariants(adapter, loss_fn)
    psi = loss_fn.psi[1]
    omega = adapter.counts[1].double()
    dense = (omega + 0.05) / (omega.sum(1, keepdim=True) + adapter.beta0)
    owning = torch.bincount(dense.argmax(0), minlength=4) > 0
    assert not bool(owning.all()), "no group was emptied: the scenario did not exercise the rule"
    torch.testing.assert_close(psi[~owning].double(), dense[~owning], rtol=2e-6, atol=1e-7)
    assert bool((psi[~owning] > 0).all())


def test_first_step_rewrites_psi_then_only_changed_entries():
    h, loss_fn, targets, adapter = make_adapter(n=13, sizes=(2, 5), images=100, seed=4)
    gen = torch.Generator().manual_seed(2)
    logits, target, idx = random_batch(gen, adapter, 1)
    adapter.step(logits, target, idx)
    expected = ref.psi_from_counts_reference(adapter.counts, adapter.beta, adapter.beta0)
    for got, want in zip(loss_fn.psi, expected):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
    # Poison Ψ behind the adapter's back (.data: no version bump, so the
    # adapter does not see a foreign write), then take steps that move images:
    # only the (class, group) entries of their old and new groups are written.
    offsets = torch.tensor(adapter.offsets)
    for batch in (1, 9):
        loss_fn.psi_t.data.fill_(-1.0)
        loss_fn.psi_scale.data.fill_(-1.0)
        for step in range(50):
            logits, target, idx = random_batch(gen, adapter, batch, scale=6.0)
            old = adapter.labels[idx].clone()
            new = adapter.step(logits, target, idx)
            if bool((new != old).any()):
                break
        moved = new != old
        assert bool(moved.any()), "no image moved in 50 steps: the test exercised nothing"
        rows = target[:, None].expand_as(old)[moved]
        want = torch.zeros_like(loss_fn.psi_t, dtype=torch.bool)
        want[rows, (old + offsets)[moved]] = True
        want[rows, (new + offsets)[moved]] = True
        assert torch.equal(loss_fn.psi_t != -1, want)
        assert torch.equal(loss_fn.psi_scale != -1, want.any(0))
        numerator = (adapter.counts_t.double() + adapter.beta.double()[:, None]).float()
        assert torch.equal(loss_fn.psi_t[want], numerator[want])


def test_non_overlapping_step_writes_few_entries():
    # With the constraint a step writes the changed pairs and, per class whose
    # owner changed, its old and new owner's entries; whole columns only when
    # a group becomes or stops being empty.
    h, loss_fn, targets, adapter = make_adapter(n=40, sizes=(4, 12), images=160, seed=12, beta=0.2,
                                                non_overlapping=True)
    gen = torch.Generator().manual_seed(3)
    adapter.step(*random_batch(gen, adapter, 20))
    offsets = torch.tensor(adapter.offsets)
    checked = switches = 0
    for _ in range(20):
        owners = [o.clone() for o in adapter._owner]
        empties = [e.clone() for e in adapter._empty]
        loss_fn.psi_t.data.fill_(-1.0)
        logits, target, idx = random_batch(gen, adapter, 16, scale=3.0)
        old = adapter.labels[idx].clone()
        new = adapter.step(logits, target, idx)
        if any(not torch.equal(e, f) for e, f in zip(empties, adapter._empty)):
            continue
        moved = new != old
        allowed = torch.zeros_like(loss_fn.psi_t, dtype=torch.bool)
        rows = target[:, None].expand_as(old)[moved]
        allowed[rows, (old + offsets)[moved]] = True
        allowed[rows, (new + offsets)[moved]] = True
        for level, (before, after) in enumerate(zip(owners, adapter._owner)):
            switched = (before != after).nonzero().flatten()
            allowed[switched, before[switched] + adapter.offsets[level]] = True
            allowed[switched, after[switched] + adapter.offsets[level]] = True
        written = loss_fn.psi_t != -1
        assert not bool((written & ~allowed).any())
        checked += 1
        switches += sum(int((b != a).sum()) for b, a in zip(owners, adapter._owner))
        adapter.refresh_psi()  # restore the true Ψ
        check_invariants(adapter, loss_fn)
    assert checked >= 5 and switches > 0, (checked, switches)


@pytest.mark.parametrize("non_overlapping", [False, True])
def test_foreign_write_to_psi_triggers_a_rebuild(non_overlapping):
    # set_psi (or loading the loss's state) replaces the factored Ψ the
    # incremental updates maintain: the next step must rebuild it.
    h, loss_fn, targets, adapter = make_adapter(seed=11, beta=0.5, non_overlapping=non_overlapping)
    gen = torch.Generator().manual_seed(9)
    adapter.step(*random_batch(gen, adapter, 30, scale=3.0))
    loss_fn.set_psi(h.psi())  # normalised Ψ, factors reset to one
    adapter.step(*random_batch(gen, adapter, 30, scale=3.0))
    check_invariants(adapter, loss_fn)
    loss_fn.load_state_dict(FusedLMMLoss.from_hierarchy(h).state_dict())
    adapter.step(*random_batch(gen, adapter, 30, scale=3.0))
    check_invariants(adapter, loss_fn)


def test_same_seed_same_labels_other_seed_differs():
    runs = []
    for seed in (7, 7, 8):
        _, loss_fn, _, adapter = make_adapter(seed=1, beta=0.3)
        adapter.seed = seed
        gen = torch.Generator().manual_seed(0)
        for step in range(8):
            adapter.step(*random_batch(gen, adapter, 40, scale=3.0), exact=step == 4)
        runs.append((adapter.labels.clone(), loss_fn.effective_psi_t().clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("non_overlapping", [False, True])
def test_resume_from_state_dict_equals_uninterrupted(non_overlapping):
    gen = torch.Generator().manual_seed(3)
    h, loss_a, targets, a = make_adapter(seed=5, beta=0.5, non_overlapping=non_overlapping)
    batches = [random_batch(gen, a, 29, scale=3.0) for _ in range(12)]
    for i, batch in enumerate(batches[:6]):
        a.step(*batch, exact=i == 2)
    state = a.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # plain tensors and numbers: serialisable
    buffer.seek(0)
    state = torch.load(buffer)
    loss_b = FusedLMMLoss.from_hierarchy(h)  # a fresh loss: Ψ must be rebuilt from the counts
    b = GibbsAdapter(loss_b, h, targets, beta=0.5, non_overlapping=non_overlapping)
    b.load_state_dict(state)
    assert torch.equal(loss_b.psi_t, loss_a.psi_t) and torch.equal(loss_b.psi_scale, loss_a.psi_scale)
    for i, batch in enumerate(batches[6:]):
        new_a = a.step(*batch, exact=i == 3)
        new_b = b.step(*batch, exact=i == 3)
        assert torch.equal(new_a, new_b)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.counts_t, b.counts_t)
    assert torch.equal(loss_a.psi_t, loss_b.psi_t) and torch.equal(loss_a.psi_scale, loss_b.psi_scale)
    corrupt = dict(state, counts_t=state["counts_t"] + 1)
    with pytest.raises(ValueError, match="not the histogram"):
        b.load_state_dict(corrupt)
    assert torch.equal(a.labels, b.labels), "a refused load changed the labels"


def test_batch_order_does_not_change_batched_draws():
    _, loss_a, _, a = make_adapter(seed=6)
    _, loss_b, _, b = make_adapter(seed=6)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        logits, target, idx = random_batch(gen, a, 33, scale=3.0)
        perm = torch.randperm(33, generator=gen)
        new_a = a.step(logits, target, idx)
        new_b = b.step(logits[perm], target[perm], idx[perm])
        assert torch.equal(new_a[perm], new_b)
    assert torch.equal(a.labels, b.labels) and torch.equal(loss_a.psi_t, loss_b.psi_t)
    assert torch.equal(loss_a.psi_scale, loss_b.psi_scale)


def test_logits_as_list_and_upper_only():
    _, _, _, a = make_adapter(seed=8)
    _, _, _, b = make_adapter(seed=8)
    gen = torch.Generator().manual_seed(6)
    logits, target, idx = random_batch(gen, a, 21)
    new_a = a.step(list(torch.split(logits, [2, 5, 13], dim=1)), target, idx)
    new_b = b.step(logits[:, :7], target, idx)
    assert torch.equal(new_a, new_b)


def test_beta_vector_and_total_prior():
    h, loss_fn, targets, adapter = make_adapter(beta=torch.linspace(0.1, 2.0, 13))
    assert adapter.beta0 == pytest.approx(float(torch.linspace(0.1, 2.0, 13).sum()), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        adapter.step(*random_batch(gen, adapter, 30))
    check_invariants(adapter, loss_fn)
    h, loss_fn, targets, total = make_adapter(beta=2.0, prior="total")
    assert total.beta0 == pytest.approx(2.0) and torch.allclose(total.beta, torch.full((13,), 2.0 / 13))
    total.step(*random_batch(gen, total, 30))
    check_invariants(total, loss_fn)


def test_dense_hierarchy_starts_at_argmax_groups():
    confusion = torch.eye(6) * 5 + torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    h = Hierarchy.from_confusion(confusion)
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    targets = torch.arange(6).repeat(5)
    adapter = GibbsAdapter(loss_fn, h, targets, non_overlapping=True)
    assert torch.equal(adapter.labels[:, 0], h.assignments[0][targets])
    adapter.step(torch.randn(6, 12), targets[:6], torch.arange(6))
    check_invariants(adapter, loss_fn)


def test_adapter_bad_inputs_change_nothing():
    h, loss_fn, targets, adapter = make_adapter(seed=9)
    gen = torch.Generator().manual_seed(7)
    adapter.step(*random_batch(gen, adapter, 10))
    snapshot = (adapter.labels.clone(), adapter.counts_t.clone(), adapter.group_totals.clone(),
                loss_fn.psi_t.clone(), adapter.step_count, loss_fn.psi_scale.clone())
    logits, target, idx = random_batch(gen, adapter, 6)
    bad = [
        ((logits, target, torch.tensor([0, 1, 2, 3, 4, 150])), ValueError, r"indices\[5\] = 150 is not a training image"),
        ((logits, target, torch.tensor([0, 1, -1, 3, 4, 5])), ValueError, r"indices\[2\] = -1"),
        ((logits, target, torch.tensor([9, 1, 9, 3, 4, 5])), ValueError, "image 9 more than once"),
        ((logits, (target + 1) % 13, idx), ValueError, r"target\[0\] = .* but train_targets"),
        ((logits, target.float(), idx), TypeError, "target must hold integers"),
        ((logits, target, idx[:5]), ValueError, "logits has 6 rows"),
        ((logits[:, :-1], target, idx), ValueError, "logits must be"),
        ((logits.to("meta"), target, idx), ValueError, "logits is on meta"),
        ((logits, target.to("meta"), idx), ValueError, "target is on meta"),
    ]
    for (lg, tg, ix), kind, message in bad:
        with pytest.raises(kind, match=message):
            adapter.step(lg, tg, ix)
        assert torch.equal(adapter.labels, snapshot[0]) and torch.equal(adapter.counts_t, snapshot[1])
        assert torch.equal(adapter.group_totals, snapshot[2]) and torch.equal(loss_fn.psi_t, snapshot[3])
        assert adapter.step_count == snapshot[4] and torch.equal(loss_fn.psi_scale, snapshot[5])


def test_non_finite_logits_are_never_drawn():
    _, loss_fn, _, adapter = make_adapter(seed=10, beta=0.5)
    gen = torch.Generator().manual_seed(8)
    logits, target, idx = random_batch(gen, adapter, 8)
    logits[0, :2] = float("nan")                                     # level 0 of image 0: nothing finite
    logits[1, 2:7] = torch.tensor([float("nan"), float("-inf"), 0.0, float("nan"), float("-inf")])
    logits[2, :2] = torch.tensor([float("inf"), 0.0])                # +inf: no weight can be formed
    before = adapter.labels[idx].clone()
    new = adapter.step(logits, target, idx)
    assert int(new[0, 0]) == int(before[0, 0]) and int(new[2, 0]) == int(before[2, 0])
    assert int(new[1, 1]) == 2  # the only finite logit of level 1
    check_invariants(adapter, loss_fn)


def test_adapter_constructor_errors():
    h = tree_hierarchy(13, [2, 5])
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    targets = torch.randint(0, 13, (50,), generator=torch.Generator().manual_seed(0))
    for beta, message in [(0.0, "beta must be positive"), (-1.0, "beta must be positive"),
                          (float("nan"), "beta must be positive"),
                          (torch.cat([torch.ones(12), torch.zeros(1)]), r"beta\[12\] = 0"),
                          (torch.ones(5), r"\[N\] = \[13\]")]:
        with pytest.raises(ValueError, match=message):
            GibbsAdapter(loss_fn, h, targets, beta=beta)
    with pytest.raises(ValueError, match=r"train_targets\[3\] = 13"):
        GibbsAdapter(loss_fn, h, torch.tensor([0, 1, 2, 13]))
    with pytest.raises(TypeError, match="train_targets must hold integers"):
        GibbsAdapter(loss_fn, h, targets.float())
    with pytest.raises(ValueError, match="does not match h"):
        GibbsAdapter(FusedLMMLoss.from_hierarchy(tree_hierarchy(13, [3, 5])), h, targets)
    with pytest.raises(ValueError, match="prior must be one of"):
        GibbsAdapter(loss_fn, h, targets, prior="flat")
    with pytest.raises(TypeError, match="hierarchy"):
        GibbsAdapter(loss_fn, object(), targets)


def test_duck_typed_hierarchy():
    class Tree:
        num_classes = 6
        level_sizes = [2]
        assignments = [torch.tensor([0, 0, 0, 1, 1, 1])]

    loss_fn = FusedLMMLoss([torch.tensor([[1 / 3] * 3 + [0] * 3, [0] * 3 + [1 / 3] * 3])])
    adapter = GibbsAdapter(loss_fn, Tree(), torch.arange(6).repeat(3))
    adapter.step(torch.randn(4, 8), torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1, 4, 5]))
    check_invariants(adapter, loss_fn)


# --------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("sizes,batch", [([1, 4], 1), ([3, 7, 11], 37), ([10, 100, 1000, 10000], 129)])
def test_cuda_kernels_equal_cpu(sizes, batch):
    d = op_inputs(21 + batch, sizes, batch)
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
    assert torch.equal(ops.gibbs_sample(*args_of(cuda)).cpu(), ops.gibbs_sample(*args_of(d)))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        dd = {**d, "logits": d["logits"].to(dtype)}
        cc = {**cuda, "logits": cuda["logits"].to(dtype)}
        assert torch.equal(ops.gibbs_sample(*args_of(cc)).cpu(), ops.gibbs_sample(*args_of(dd)))
    got = ops.gibbs_sample_exact(*args_of(cuda)).cpu()
    want = ops.gibbs_sample_exact(*args_of(d))
    assert torch.equal(got, want)
    assert torch.equal(cuda["counts_t"].cpu(), d["counts_t"]) and torch.equal(cuda["group_totals"].cpu(), d["group_totals"])
    columns = torch.randperm(sum(sizes[:-1]))[: max(1, sum(sizes[:-1]) // 3)]
    psi_cpu, scale_cpu = torch.zeros(sizes[-1], sum(sizes[:-1])), torch.zeros(sum(sizes[:-1]))
    psi_cuda, scale_cuda = psi_cpu.cuda(), scale_cpu.cuda()
    ops.gibbs_refresh_psi(psi_cpu, scale_cpu, d["counts_t"], d["group_totals"], d["beta"], d["beta0"], columns)
    ops.gibbs_refresh_psi(psi_cuda, scale_cuda, cuda["counts_t"], cuda["group_totals"], cuda["beta"],
                          cuda["beta0"], columns.cuda())
    assert torch.equal(psi_cuda.cpu(), psi_cpu) and torch.equal(scale_cuda.cpu(), scale_cpu)
    rows = torch.randint(0, sizes[-1], (300,))
    cols = torch.randint(0, sum(sizes[:-1]), (300,))
    psi_cpu.fill_(-1), scale_cpu.fill_(-1), psi_cuda.fill_(-1), scale_cuda.fill_(-1)
    ops.gibbs_refresh_psi_entries(psi_cpu, scale_cpu, d["counts_t"], d["group_totals"], d["beta"], d["beta0"],
                                  rows, cols)
    ops.gibbs_refresh_psi_entries(psi_cuda, scale_cuda, cuda["counts_t"], cuda["group_totals"], cuda["beta"],
                                  cuda["beta0"], rows.cuda(), cols.cuda())
    assert torch.equal(psi_cuda.cpu(), psi_cpu) and torch.equal(scale_cuda.cpu(), scale_cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("non_overlapping", [False, True])
def test_cuda_adapter_equals_cpu(non_overlapping):
    h, loss_cpu, targets, cpu = make_adapter(n=29, sizes=(3, 11), images=300, seed=3, beta=0.4,
                                             non_overlapping=non_overlapping)
    loss_gpu = FusedLMMLoss.from_hierarchy(h).cuda()
    gpu = GibbsAdapter(loss_gpu, h, targets.cuda(), beta=0.4, non_overlapping=non_overlapping)
    gen = torch.Generator().manual_seed(0)
    for step in range(10):
        logits, target, idx = random_batch(gen, cpu, 50, scale=3.0)
        a = cpu.step(logits, target, idx, exact=step % 4 == 1)
        b = gpu.step(logits.cuda(), target.cuda(), idx.cuda(), exact=step % 4 == 1)
        assert torch.equal(a, b.cpu())
    assert torch.equal(cpu.counts_t, gpu.counts_t.cpu())
    torch.testing.assert_close(loss_gpu.psi_t.cpu(), loss_cpu.psi_t, rtol=0, atol=0)
    # the constraint's normalisers are summed with atomics on CUDA: last bit only
    torch.testing.assert_close(loss_gpu.psi_scale.cpu(), loss_cpu.psi_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_gpu.effective_psi_t().cpu(), loss_cpu.effective_psi_t(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="is on cpu"):
        gpu.step(logits, target.cuda(), idx.cuda())


# ------------------------------------------------------------ apply moves
def apply_moves_inputs(seed, sizes, images, batch):
    gen = torch.Generator().manual_seed(seed)
    classes, labels, counts_t, totals = consistent_state(gen, sizes, images)
    idx = torch.randperm(images, generator=gen)[:batch]
    old = labels[idx].clone()
    new = torch.stack([torch.randint(0, k, (batch,), generator=gen) for k in sizes[:-1]], 1)
    new[::3] = old[::3]  # some labels stay
    return classes, labels.contiguous(), counts_t, totals, idx, old, new


@pytest.mark.parametrize("sizes,images,batch", [([1, 4], 9, 5), ([3, 7, 11], 200, 37), ([10, 100, 1000], 3000, 256)])
def test_apply_moves_equals_histogram_of_new_labels(sizes, images, batch):
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(sizes[-1] + batch, sizes, images, batch)
    ops.gibbs_apply_moves(counts_t, totals, labels, classes[idx], idx, old, new, sizes)
    expected = labels.clone()
    expected[idx] = new
    assert torch.equal(labels, expected)
    counts = ref.counts_from_labels(labels, classes, sizes)
    assert torch.equal(counts_t, torch.cat([c.t() for c in counts], 1).to(torch.int32))
    assert torch.equal(totals, torch.cat([c.sum(1) for c in counts]).to(torch.int32))


def test_apply_moves_opcheck_and_empty_batch():
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(5, [3, 7, 11], 200, 37)
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_apply_moves.default,
                          (counts_t, totals, labels, classes[idx], idx, old, new, [3, 7, 11]))
    before = (counts_t.clone(), totals.clone(), labels.clone())
    none = torch.empty(0, dtype=torch.long)
    ops.gibbs_apply_moves(counts_t, totals, labels, none, none, old[:0], new[:0], [3, 7, 11])
    assert all(torch.equal(a, b) for a, b in zip(before, (counts_t, totals, labels)))


@pytest.mark.parametrize("field,value,message", [
    ("target", 11, "target\\[2\\] = 11 is out of range"),
    ("target", -1, "target\\[2\\] = -1 is out of range"),
    ("idx", 200, "image_ids\\[2\\] = 200 is out of range"),
    ("old", 3, "old_labels\\[2, 0\\] = 3 is out of range"),
    ("new", 7, "new_labels\\[2, 0\\] = 7 is out of range"),
])
def test_apply_moves_refuses_bad_values_and_writes_nothing(field, value, message):
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(6, [3, 7, 11], 200, 8)
    args = {"target": classes[idx].clone(), "idx": idx.clone(), "old": old.clone(), "new": new.clone()}
    if field in ("old", "new"):
        args[field][2, 0] = value
    else:
        args[field][2] = value
    before = (counts_t.clone(), totals.clone(), labels.clone())
    with pytest.raises(RuntimeError, match=message):
        ops.gibbs_apply_moves(counts_t, totals, labels, args["target"], args["idx"], args["old"], args["new"],
                              [3, 7, 11])
    assert all(torch.equal(a, b) for a, b in zip(before, (counts_t, totals, labels)))


def test_apply_moves_refuses_bad_shapes():
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(7, [3, 7, 11], 200, 8)
    y = classes[idx]
    with pytest.raises(RuntimeError, match="counts_t must be a contiguous int32"):
        ops.gibbs_apply_moves(counts_t.long(), totals, labels, y, idx, old, new, [3, 7, 11])
    with pytest.raises(RuntimeError, match="labels must be a contiguous int64"):
        ops.gibbs_apply_moves(counts_t, totals, labels.t(), y, idx, old, new, [3, 7, 11])
    with pytest.raises(RuntimeError, match="new_labels must be int64 \\[batch, upper levels\\]"):
        ops.gibbs_apply_moves(counts_t, totals, labels, y, idx, old, new[:, :1], [3, 7, 11])
    with pytest.raises(RuntimeError, match="image_ids must be int64"):
        ops.gibbs_apply_moves(counts_t, totals, labels, y, idx[:-1], old, new, [3, 7, 11])


@pytest.mark.cuda
def test_cuda_apply_moves_equals_cpu():
    classes, labels, counts_t, totals, idx, old, new = apply_moves_inputs(8, [10, 100, 1000], 3000, 256)
    gpu = [t.cuda() for t in (counts_t, totals, labels)]
    ops.gibbs_apply_moves(*gpu, classes[idx].cuda(), idx.cuda(), old.cuda(), new.cuda(), [10, 100, 1000])
    ops.gibbs_apply_moves(counts_t, totals, labels, classes[idx], idx, old, new, [10, 100, 1000])
    for got, want in zip(gpu, (counts_t, totals, labels)):
        assert torch.equal(got.cpu(), want)
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_apply_moves.default,
                          (*gpu, classes[idx].cuda(), idx.cuda(), new.cuda(), old.cuda(), [10, 100, 1000]))


# ------------------------------------------------------------ batch checks
def check_batch_cases():
    train = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    yield torch.tensor([0, 5, 7]), torch.tensor([3, 9, 6]), [-1, -1, -1]
    yield torch.tensor([0, 8, 7, -1]), torch.tensor([3, 9, 6, 0]), [1, -1, -1]
    yield torch.tensor([4, 2, 4, 2]), torch.tensor([5, 4, 5, 4]), [-1, 2, -1]
    yield torch.tensor([4, 2, 9, 1]), torch.tensor([5, 1, 0, 7]), [2, -1, 1]
    yield torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), [-1, -1, -1]
    yield torch.tensor([6]), torch.tensor([2]), [-1, -1, -1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_check_batch_finds_each_problem(device):
    train = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6], device=device)
    for indices, target, expected in check_batch_cases():
        got = ops.gibbs_check_batch(indices.to(device), target.to(device), train)
        assert got.tolist() == expected, (indices.tolist(), target.tolist())
    torch.library.opcheck(torch.ops.lmm_fast.gibbs_check_batch.default,
                          (torch.tensor([4, 2, 9], device=device), torch.tensor([5, 1, 0], device=device), train))


def test_check_batch_refuses_bad_inputs():
    train = torch.tensor([3, 1, 4])
    with pytest.raises(RuntimeError, match="indices must be a 1-D int64 tensor"):
        ops.gibbs_check_batch(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3, 1]), train)
    with pytest.raises(RuntimeError, match="target must have indices' length 2"):
        ops.gibbs_check_batch(torch.tensor([0, 1]), torch.tensor([3]), train)
    with pytest.raises(RuntimeError, match="train_targets must be a 1-D int64 tensor"):
        ops.gibbs_check_batch(torch.tensor([0, 1]), torch.tensor([3, 1]), train[None])
