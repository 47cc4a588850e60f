"""Every operator refuses tensors on different devices, naming the argument:
the fake (meta) kernel, which a meta tensor among CPU ones dispatches to
(before: it returned uninitialised CPU tensors as the loss), and the C++ CPU
kernel itself, reached directly (a C++ kernel that read a meta tensor's
pointer would crash: that part runs in a child process)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lmm_fast
import lmm_fast.ops  # noqa: F401  (registers the ops)


def child_env(**extra: str) -> dict:
    """The environment of a child interpreter: it imports the lmm_fast this
    test imported (installed, or an in-place build)."""
    import os

    parent = os.path.dirname(os.path.dirname(os.path.abspath(lmm_fast.__file__)))
    path = os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def cases():
    """(op name, positional args, names of the tensor args by position) of
    valid all-CPU calls of every operator."""
    sizes = [2, 5]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=gen)
    target = torch.tensor([0, 3, 4])
    psi_t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]) / torch.tensor([2.0, 3.0])
    theta = torch.tensor([0.3, 0.7])
    psi_scale = torch.ones(2)
    loss, lse, log_m = torch.ops.lmm_fast.lmm_loss_forward(logits, target, psi_t, theta, sizes, -100, psi_scale)
    group_index = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.int32)
    group_value = torch.tensor([[0.5, 0.5, 1 / 3, 1 / 3, 1 / 3]])
    images = torch.tensor([0, 1, 2, 3, 4, 3])  # class of each training image
    labels = torch.tensor([[0], [0], [1], [1], [1], [1]])
    counts_t = torch.zeros(5, 2, dtype=torch.int32)
    counts_t.index_put_((images, labels[:, 0]), torch.ones(6, dtype=torch.int32), accumulate=True)
    totals = counts_t.sum(0).to(torch.int32)
    beta = torch.full((5,), 0.5)
    ids = torch.tensor([0, 3, 4])
    old = labels[ids].clone()
    new = torch.tensor([[1], [1], [0]])
    owner = torch.tensor([0, 0, 1, 1, 1])
    numerator = torch.tensor([1.5, 1.5, 1.5, 2.5, 1.5], dtype=torch.float64)
    kept = torch.tensor([2, 3])
    nonzero = torch.tensor([[0b00011], [0b11100]])
    bound = torch.ones(5, dtype=torch.float64)
    x, weight, bias, rows = torch.randn(3, 4), torch.randn(6, 4), torch.randn(6), torch.tensor([[0, 5], [1, -1], [2, 3]])
    psi = lambda: psi_t.clone()  # noqa: E731  (written in place by some ops)
    lin_x, lin_w, lin_b = torch.randn(3, 4, generator=gen), torch.randn(7, 4, generator=gen), torch.randn(7)
    linear = [lin_x, lin_w, lin_b, target, psi_t, theta, psi_scale, None, 0.0, sizes, -100, 2]
    linear_names = ["x", "weight", "bias", "target", "psi_t", "theta", "psi_scale", None, None, None, None, None]
    _, lin_lse, lin_log_m = torch.ops.lmm_fast.linear_lmm_loss(*linear)
    return [
        ("linear_lmm_loss", linear, linear_names),
        ("linear_lmm_loss_reduced", linear + ["mean", [True, True, True, True]], linear_names + [None, None]),
        ("linear_lmm_loss_backward",
         [torch.ones(3)] + linear[:9] + [lin_lse, lin_log_m, sizes, -100, 2, [True, True, True]],
         ["grad_loss", "x", "weight", "bias", "target", "psi_t", "theta", "psi_scale", None, None, "lse", "log_m",
          None, None, None, None]),
        ("lmm_loss_forward", [logits, target, psi_t, theta, sizes, -100, psi_scale],
         ["logits", "target", "psi_t", "theta", None, None, "psi_scale"]),
        ("lmm_loss_backward", [torch.ones(3), logits, target, psi_t, theta, lse, log_m, sizes, -100, psi_scale],
         ["grad_loss", "logits", "target", "psi_t", "theta", "lse", "log_m", None, None, "psi_scale"]),
        ("lmm_predict_proba_tree", [logits, group_index, group_value, theta, sizes],
         ["logits", "group_index", "group_value", "theta", None]),
        ("lmm_predict_proba_dense", [logits, psi_t, theta, sizes], ["logits", "psi_t", "theta", None]),
        ("lmm_topk_tree", [logits, group_index, group_value, theta, sizes, 2],
         ["logits", "group_index", "group_value", "theta", None, None]),
        ("lmm_gather_scores", [x, weight, bias, rows], ["x", "weight", "bias", "rows"]),
        ("gibbs_sample", [logits, target, old, counts_t, totals, beta, 2.5, sizes, 1, 2, ids],
         ["logits", "target", "old_labels", "counts_t", "group_totals", "beta", None, None, None, None,
          "image_ids"]),
        ("gibbs_sample_exact", [logits, target, old, counts_t.clone(), totals.clone(), beta, 2.5, sizes, 1, 2, ids],
         ["logits", "target", "old_labels", "counts_t", "group_totals", "beta", None, None, None, None,
          "image_ids"]),
        ("gibbs_refresh_psi", [psi(), psi_scale.clone(), counts_t, totals, beta, 2.5, torch.tensor([0, 1])],
         ["psi_t", "psi_scale", "counts_t", "group_totals", "beta", None, "columns"]),
        ("gibbs_refresh_psi_entries", [psi(), psi_scale.clone(), counts_t, totals, beta, 2.5, torch.tensor([1]),
                                       torch.tensor([0])],
         ["psi_t", "psi_scale", "counts_t", "group_totals", "beta", None, "rows", "columns"]),
        ("gibbs_check_batch", [ids, target, images], ["indices", "target", "train_targets"]),
        ("gibbs_apply_moves", [counts_t.clone(), totals.clone(), labels.clone(), target, ids, old, new, sizes],
         ["counts_t", "group_totals", "labels", "target", "image_ids", "old_labels", "new_labels", None]),
        ("gibbs_update_owners", [psi(), psi_scale.clone(), owner, numerator, kept, nonzero, bound, counts_t, totals,
                                 beta, 2.5, 0, 2, target, old[:, 0], new[:, 0], False],
         ["psi_t", "psi_scale", "owner", "numerator", "kept", "nonzero", "bound", "counts_t", "group_totals",
          "beta", None, None, None, "classes", "old_groups", "new_groups", None]),
    ]


def with_meta(args, position):
    out = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out[position] = out[position].to("meta")
    return out


def test_every_op_is_covered():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("lmm_fast::")}
    assert "lmm_loss_forward" in registered
    registered.discard("gibbs_update_owners_emulated")  # the emulated CUDA op: the owner update's own tests
    registered.discard("_offer_grad_storage")  # no tensor but the offered one
    covered = {name for name, _, _ in cases()}
    assert registered == covered, registered ^ covered


@pytest.mark.parametrize("op_name", [name for name, _, _ in cases()])
def test_a_meta_tensor_among_cpu_tensors_is_refused_by_name(op_name):
    name, args, names = next(c for c in cases() if c[0] == op_name)
    op = getattr(torch.ops.lmm_fast, name).default
    op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])  # the control: valid on the CPU
    for position, arg_name in enumerate(names):
        if arg_name is None:
            continue
        with pytest.raises(RuntimeError, match="all tensor arguments must be on one device") as info:
            op(*with_meta(args, position))
        assert f"{arg_name} is on meta" in str(info.value) or (position == 0 and "is on cpu" in str(info.value))


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_reliability_devices import cases, with_meta
cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
for name, args, names in cases():
    op = getattr(torch.ops.lmm_fast, name).default
    for position, arg_name in enumerate(names):
        if arg_name is None:
            continue
        print(name, arg_name, file=sys.stderr, flush=True)
        try:
            op.redispatch(cpu, *with_meta(args, position))
        except RuntimeError as error:
            message = str(error).splitlines()[0]
            assert "device" in message and "meta" in message, (name, arg_name, message)
            named = [n for n in names if n is not None and n in message]
            assert named, (name, arg_name, message)
            print("refused", name, arg_name, "|", message, flush=True)
        else:
            raise AssertionError(f"{{name}}: the CPU kernel accepted {{arg_name}} on meta")
"""


def test_the_cpu_kernels_check_devices_themselves(tmp_path):
    import os

    code = CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=child_env())
    last = "\n".join(result.stderr.splitlines()[-15:])
    assert result.returncode >= 0, f"a CPU kernel crashed (signal {-result.returncode}) at:\n{last}"
    assert result.returncode == 0, last
    expected = sum(1 for _, _, names in cases() for n in names if n is not None)
    assert result.stdout.count("refused") == expected, result.stdout
