"""What a new user meets first: the example script runs end to end, the
public signatures are typed, and the loss shows its θ."""

from __future__ import annotations

import inspect
import pathlib
import runpy
import typing

import pytest
import torch
from torch import nn

import lmm_fast
from lmm_fast import FusedLMMLoss, GibbsAdapter, GuardedGibbsAdapter, Hierarchy, LMMHead

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_lmm.py"


def test_the_example_trains_adapts_saves_reloads_predicts_and_evaluates(tmp_path, capsys):
    example = runpy.run_path(str(EXAMPLE), run_name="example")
    result = example["main"](["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hierarchy.json", "run.pt"]
    assert Hierarchy.load(tmp_path / "hierarchy.json").num_classes == 40
    # 40 classes: chance is 97.5 % top-1 error; both models learn the task.
    assert 0.0 <= result["lmm_top1"] < 0.6 and 0.0 <= result["flat_top1"] < 0.6
    for step in ("flat softmax (the baseline", "warm-up epochs with Ψ fixed", "saved and reloaded the run",
                 "top-5 classes of the first test row", "LMM w/P,TC (reloaded)", "the adaptation moved"):
        assert step in printed, step
    assert "theta=[0.05, 0.05, 0.9]" in printed
    moved = [int(v) for v in printed.split("the adaptation moved [")[1].split("]")[0].split(",")]
    assert sum(moved) > 0  # Ψ was adapted


def test_theta_is_in_the_repr():
    h = Hierarchy.from_assignments([[0, 0, 1, 1, 1]])
    loss_fn = FusedLMMLoss.from_hierarchy(h, theta=[0.25, 0.75])
    assert repr(loss_fn) == ("FusedLMMLoss(level_sizes=[2, 5], theta=[0.25, 0.75], reduction='mean', "
                             "ignore_index=-100, learn_theta=False)")
    learned = FusedLMMLoss.from_hierarchy(h, learn_theta=True)
    with torch.no_grad():
        learned.theta_logits.copy_(torch.tensor([0.0, 1.0]))
    expected = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert f"theta=[{float(expected[0]):.4g}, {float(expected[1]):.4g}]" in repr(learned)
    assert "theta=[0.1, 0.9]" in repr(nn.Sequential(FusedLMMLoss.from_hierarchy(h)))


# The names that exist for type checkers only (imported under TYPE_CHECKING).
_CHECKER_NAMES = {"FusedLMMLoss": FusedLMMLoss, "Hierarchy": Hierarchy,
                  "ProcessGroup": getattr(torch.distributed, "ProcessGroup", object)}
TYPED = [
    GibbsAdapter.__init__, GibbsAdapter.step, GibbsAdapter.state_dict, GibbsAdapter.load_state_dict,
    GibbsAdapter.to, GibbsAdapter.refresh_psi,
    GuardedGibbsAdapter.__init__, GuardedGibbsAdapter.step,
    FusedLMMLoss.__init__, FusedLMMLoss.forward, FusedLMMLoss.predict_proba, FusedLMMLoss.from_hierarchy,
    FusedLMMLoss.pack, FusedLMMLoss.set_psi, FusedLMMLoss.set_theta, FusedLMMLoss.extra_repr,
    LMMHead.__init__, LMMHead.forward, LMMHead.split, LMMHead.predict_proba, LMMHead.predict_topk,
    LMMHead.from_flat,
    Hierarchy.from_parents, Hierarchy.from_assignments, Hierarchy.to_newick, Hierarchy.to_dot, Hierarchy.export,
    lmm_fast.train.fit_lmm, lmm_fast.predict_topk, lmm_fast.metrics.topk_error,
]


@pytest.mark.parametrize("fn", TYPED, ids=lambda f: f.__qualname__)
def test_public_signatures_are_typed(fn):
    signature = inspect.signature(fn)
    untyped = [name for name, p in signature.parameters.items()
               if name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    assert not untyped, f"{fn.__qualname__}: no annotation for {untyped}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{fn.__qualname__}: no return annotation"
    # Every annotation names something real (resolvable, not a typo).
    hints = typing.get_type_hints(inspect.unwrap(fn), localns=_CHECKER_NAMES)
    assert "return" in hints


def test_the_package_is_marked_typed():
    assert (pathlib.Path(lmm_fast.__file__).parent / "py.typed").exists()
