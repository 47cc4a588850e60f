"""The CUDA prediction kernels and their host code, run on the emulated
device (torch.ops.lmm_fast_emulated, CPU tensors): the twins of the CUDA
tests of test_predict.py, with their tolerances, plus the odd sizes and the
errors."""
import pytest
import torch

import lmm_fast
from lmm_fast import FusedLMMLoss
from lmm_fast.reference.loss import predict_proba_reference
from lmm_fast.ops import predict as predict_ops
from lmm_fast.reference.predict import gather_scores_reference
from lmm_fast.testing import random_problem, tolerances

import emulated_backend
from test_predict import _good, operands, per_row_reference, random_theta, reference, test_tree_ops_name_the_bad_argument

pytestmark = pytest.mark.cuda_emulated

PREDICT_OPS = ("lmm_predict_proba_tree", "lmm_predict_proba_dense", "lmm_topk_tree")


def launches(ops, *kernels):
    return [ops.control_launch_count(k) for k in kernels]


# twin of test_predict.py::test_cuda_matches_reference: FusedLMMLoss's own
# prediction code, with the ops it calls swapped for the emulated ones
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("batch,sizes", [(1, [2, 5]), (37, [3, 10, 1001]), (64, [10, 100, 10000]), (5, [13])])
def test_emulated_matches_reference(emulated, dtype, dense, batch, sizes):
    gen = torch.Generator().manual_seed(13)
    logits, _, psi = random_problem(batch, sizes, dense=dense, generator=gen)
    theta = random_theta(len(sizes), gen).float()
    ref = reference(logits, psi, theta)
    loss_fn = FusedLMMLoss(psi, theta, num_classes=sizes[-1])
    if dtype == torch.float64:
        loss_fn = loss_fn.to(torch.float64)
    x = logits.detach().to(dtype)
    kernels = ("upper_softmax_kernel", "add_bottom_kernel") if dense and len(sizes) > 1 else ("predict_tree_kernel",)
    before = launches(emulated, *kernels)
    with emulated_backend.package_ops_emulated(*PREDICT_OPS):
        proba = loss_fn.predict_proba(x)
        values, indices = lmm_fast.predict_topk(x, loss_fn, min(5, sizes[-1]))
    assert all(a > b for a, b in zip(launches(emulated, *kernels), before)), "the emulated kernels did not run"
    assert proba.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(proba.double(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(values.double(), torch.topk(ref, values.shape[1], 1).values, rtol=1e-4, atol=1e-6)
    else:
        torch_low = predict_proba_reference(x.float(), psi, theta).to(dtype)
        ours = (proba.double() - ref).abs().max()
        theirs = (torch_low.double() - ref).abs().max()
        assert ours <= 2 * theirs + 1e-6, (ours, theirs)
    torch.testing.assert_close(proba.gather(1, indices), values)


# twin of test_predict.py::test_cuda_opcheck_and_compile
def test_emulated_opcheck_and_compile(emulated):
    gen = torch.Generator().manual_seed(14)
    sizes = [4, 12, 97]
    logits, _, psi = random_problem(31, sizes, generator=gen)
    tree, psi_t, theta = operands(psi, torch.tensor([0.1, 0.2, 0.7]), sizes, torch.float32)
    x = logits.detach()
    index, value = tree.index, tree.value
    torch.library.opcheck(emulated.lmm_predict_proba_tree.default, (x, index, value, theta, sizes))
    torch.library.opcheck(emulated.lmm_predict_proba_dense.default, (x, psi_t, theta, sizes))
    torch.library.opcheck(emulated.lmm_topk_tree.default, (x, index, value, theta, sizes, 5))
    f = torch.compile(lambda a: emulated.lmm_predict_proba_tree(a, index, value, theta, sizes), fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(x), emulated.lmm_predict_proba_tree(x, index, value, theta, sizes))
    rows = torch.softmax(torch.randn(31, 3, generator=gen), 1)
    ref = per_row_reference(logits, psi, rows)
    for out in (emulated.lmm_predict_proba_tree(x, index, value, rows, sizes),
                emulated.lmm_predict_proba_dense(x, psi_t, rows, sizes)):
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dense", [False, True])
def test_emulated_max_levels_strides_and_empty_batch(emulated, dense):
    gen = torch.Generator().manual_seed(15)
    sizes = [2, 3, 4, 5, 6, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 300]  # 16 levels, the CUDA kernels' most
    logits, _, psi = random_problem(6, sizes, dense=dense, generator=gen)
    theta = random_theta(len(sizes), gen).float()
    tree, psi_t, theta = operands(psi, theta, sizes, torch.float32)
    x = torch.cat([logits.detach(), logits.detach()], 1)[:, : sum(sizes)]  # strided rows
    ref = reference(logits, psi, theta)
    out = (emulated.lmm_predict_proba_dense(x, psi_t, theta, sizes) if dense
           else emulated.lmm_predict_proba_tree(x, tree.index, tree.value, theta, sizes))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-6)
    too_many = list(range(2, 19))
    y, _, psi = random_problem(2, too_many, dense=True, generator=gen)
    _, psi_t17, theta17 = operands(psi, random_theta(17, gen).float(), too_many, torch.float32)
    with pytest.raises(RuntimeError, match="the CUDA prediction supports at most 16 levels, got 17"):
        emulated.lmm_predict_proba_dense(y.detach(), psi_t17, theta17, too_many)
    empty = x[:0]
    assert emulated.lmm_predict_proba_dense(empty, psi_t, theta, sizes).shape == (0, 300)
    if not dense:
        assert emulated.lmm_predict_proba_tree(empty, tree.index, tree.value, theta, sizes).shape == (0, 300)
        values, indices = emulated.lmm_topk_tree(empty, tree.index, tree.value, theta, sizes, 3)
        assert values.shape == indices.shape == (0, 3)
        values, indices = emulated.lmm_topk_tree(x, tree.index, tree.value, theta, sizes, 7)
        torch.testing.assert_close(values.double(), torch.topk(ref, 7, 1).values, rtol=1e-4, atol=1e-6)


# twin of test_predict.py::test_cuda_gather_scores
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_emulated_gather_scores(emulated, dtype):
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(33, 70, generator=gen).to(dtype)
    weight = torch.randn(300, 70, generator=gen).to(dtype)
    bias = torch.randn(300, generator=gen).to(dtype)
    rows = torch.randint(-1, 300, (33, 45), generator=gen)
    out = emulated.lmm_gather_scores(x, weight, bias, rows)
    ref = gather_scores_reference(x.double(), weight.double(), bias.double(), rows)
    tol = dict(rtol=1e-2, atol=5e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.library.opcheck(emulated.lmm_gather_scores.default, (x, weight, None, rows))
    for bad in (300, -2):
        r = rows.clone()
        r[3, 7] = bad
        lo, hi = (-2, 299) if bad < 0 else (-1, 300)
        message = rf"rows must hold weight rows in \[0, 300\) or -1, got values in \[{lo}, {hi}\]"
        for op in (predict_ops.lmm_gather_scores, emulated.lmm_gather_scores):
            with pytest.raises(RuntimeError, match=message):
                op(x, weight, bias, r)


# the CPU ops' bad-argument cases (test_predict.py), on the emulated CUDA ops
BAD_TREE_CASES = next(m for m in test_tree_ops_name_the_bad_argument.pytestmark if m.name == "parametrize").args[1]


@pytest.mark.parametrize("change,match", BAD_TREE_CASES)
def test_emulated_tree_ops_name_the_bad_argument(emulated, change, match):
    logits, index, value, _, theta, sizes = _good()
    a = change(dict(logits=logits, index=index, value=value, theta=theta, sizes=sizes))
    with pytest.raises(RuntimeError, match=match):
        emulated.lmm_predict_proba_tree(a["logits"], a["index"], a["value"], a["theta"], a["sizes"])
    with pytest.raises(RuntimeError, match=match):
        emulated.lmm_topk_tree(a["logits"], a["index"], a["value"], a["theta"], a["sizes"], 2)


# twin of test_predict.py::test_masked_and_extreme_logits[cuda]
def test_emulated_masked_and_extreme_logits(emulated):
    gen = torch.Generator().manual_seed(11)
    sizes = [3, 9, 50]
    for dense in (False, True):
        logits, _, psi = random_problem(16, sizes, dense=dense, generator=gen)
        masked = logits.detach().clone()
        masked[:, -10:] = float("-inf")
        masked[:, 0] = float("-inf")
        masked[:4] = torch.where(torch.rand(4, 62, generator=gen) < 0.5, -1e4, 1e4)
        theta = torch.tensor([0.3, 0.3, 0.4])
        loss_fn = FusedLMMLoss(psi, theta)
        with emulated_backend.package_ops_emulated(*PREDICT_OPS):
            proba = loss_fn.predict_proba(masked)
        assert torch.isfinite(proba).all()
        torch.testing.assert_close(proba.double(), reference(masked, psi, theta), **tolerances(torch.float32))


# twin of test_head.py::test_cuda_head_prediction: the head's full and beam
# top k (tree top k, gathered scores) on the emulated ops
def test_emulated_head_prediction(emulated):
    from test_head import randomised, tree_hierarchy

    sizes = [3, 11, 97]
    h = tree_hierarchy(sizes, 25)
    head = randomised(lmm_fast.LMMHead(16, h), 26)
    x = torch.randn(21, 16, generator=torch.Generator().manual_seed(27))
    loss_fn = FusedLMMLoss.from_hierarchy(h)
    before = launches(emulated, "predict_tree_kernel", "gather_scores_kernel")
    with emulated_backend.package_ops_emulated(*PREDICT_OPS, "lmm_gather_scores"):
        full = head.predict_topk(x, 5, loss_fn=loss_fn)
        beam = head.predict_topk(x, 5, beam=11, loss_fn=loss_fn)
    assert all(a > b for a, b in zip(launches(emulated, "predict_tree_kernel", "gather_scores_kernel"), before))
    torch.testing.assert_close(beam[0], full[0], rtol=1e-4, atol=1e-6)
    ref = head.predict_topk(x, 5)
    torch.testing.assert_close(full[0], ref[0], rtol=1e-4, atol=1e-6)
