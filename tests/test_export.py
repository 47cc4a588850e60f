"""Deploying prediction: ``torch.compile(fullgraph=True)``, ``torch.export`` and
ONNX export (run in plain onnxruntime) of ``FusedLMMLoss.predict_proba``,
``lmm_fast.predict_topk`` and ``LMMHead.predict_proba`` / ``predict_topk``
(full and coarse-to-fine), checked against eager; the prepared structure they
read; ``GibbsAdapter.step`` as a deliberate graph break in a compiled training
step."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lmm_fast
from lmm_fast import FusedLMMLoss, GibbsAdapter, Hierarchy, LMMHead
from lmm_fast.reference.loss import predict_proba_reference
from lmm_fast.testing import dense_psi

N = 30
SIZES = [3, 9, N]
FEATURES = 8


def build(kind: str, seed: int = 0):
    """(hierarchy, head, loss) with a tree Ψ or a dense one (as after adaptation
    without the non-overlapping constraint)."""
    torch.manual_seed(seed)
    classes = torch.arange(N)
    h = Hierarchy.from_assignments([classes % 3, classes % 9])  # nested: (y % 9) % 3 == y % 3
    head = LMMHead(FEATURES, h, init_std=1.0)
    loss_fn = FusedLMMLoss.from_hierarchy(h, theta=[0.2, 0.3, 0.5])
    if kind == "dense":
        loss_fn.set_psi(dense_psi(SIZES, torch.Generator().manual_seed(seed)))
    return h, head, loss_fn


class Classifier(nn.Module):
    """A model as deployed: a backbone, the LMM head and its prediction."""

    def __init__(self, head: LMMHead, loss_fn: FusedLMMLoss, beam: bool) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, FEATURES), nn.Tanh())
        self.head = head
        self.loss_fn = loss_fn
        self.beam = beam

    def forward(self, x):
        features = self.backbone(x)
        logits = self.head(features)
        out = (self.loss_fn.predict_proba(logits), lmm_fast.predict_topk(logits, self.loss_fn, k=4),
               self.head.predict_proba(features, self.loss_fn), self.head.predict_topk(features, 4, loss_fn=self.loss_fn))
        if self.beam:
            out += (self.head.predict_topk(features, 4, beam=2, loss_fn=self.loss_fn),)
        return out  # nested as the calls return them (a saved program keeps that structure)


def model_and_input(kind: str, batch: int = 6):
    _, head, loss_fn = build(kind)
    model = Classifier(head, loss_fn, beam=kind == "tree").eval()
    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(1))
    return model, x


def flat(outputs):
    return [leaf for item in outputs for leaf in (item if isinstance(item, (tuple, list)) else (item,))]


def assert_same_outputs(got, expected):
    got, expected = flat(got), flat(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        a = torch.as_tensor(a)
        if b.dtype == torch.int64:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def recording_backend(targets: list):
    """A torch.compile backend that records the ops of every graph it gets and
    runs them through AOTAutograd (fake kernels, functionalisation)."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return aot_eager(gm, example_inputs)

    return backend


# ---------------------------------------------------------------- compile


@pytest.mark.parametrize("kind", ["tree", "dense"])
def test_compile_fullgraph_prediction_matches_eager(kind):
    torch._dynamo.reset()
    model, x = model_and_input(kind)
    lmm_fast.prepare_for_inference(model)
    expected = model(x)
    targets: list = []
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend(targets))
    assert_same_outputs(compiled(x), expected)
    # compile keeps the fused kernels (only export writes them as standard ops)
    fused = {t for t in targets if t.startswith("lmm_fast.")}
    if kind == "tree":
        assert {"lmm_fast.lmm_predict_proba_tree.default", "lmm_fast.lmm_topk_tree.default",
                "lmm_fast.lmm_gather_scores.default"} <= fused
    else:
        assert fused == {"lmm_fast.lmm_predict_proba_dense.default"}
    torch.testing.assert_close(expected[0], predict_proba_reference(model.head(model.backbone(x)),
                                                                    model.loss_fn.psi, model.loss_fn.theta))


def test_compile_fullgraph_per_row_theta_and_functional_forms():
    torch._dynamo.reset()
    _, head, loss_fn = build("tree")
    x = torch.randn(5, FEATURES)
    gate = torch.softmax(torch.randn(5, 3), dim=1)
    head.prepare_for_inference(loss_fn)

    def predict(features, theta):
        logits = head(features)
        return (head.predict_proba(features, loss_fn, theta=theta), *lmm_fast.predict_topk(logits, loss_fn, k=3, theta=theta),
                head.predict_proba(features), *head.predict_topk(features, 3, beam=1))

    assert_same_outputs(torch.compile(predict, fullgraph=True, backend="aot_eager")(x, gate), predict(x, gate))


def test_traced_prediction_needs_the_prepared_structure():
    torch._dynamo.reset()
    _, head, loss_fn = build("tree")
    logits = head(torch.randn(4, FEATURES)).detach()
    with pytest.raises(Exception, match=r"loss_fn\.prepare_for_inference\(\)"):
        torch.compile(loss_fn.predict_proba, fullgraph=True, backend="eager")(logits)
    with pytest.raises(Exception, match=r"head\.prepare_for_inference\(\)"):
        torch.compile(head.predict_proba, fullgraph=True, backend="eager")(torch.randn(4, FEATURES))
    model = Classifier(head, loss_fn, beam=False)
    with pytest.raises(RuntimeError, match="prepare_for_inference"):
        torch.export.export(model, (torch.randn(4, 5),))
    # any eager prediction prepares it as well
    loss_fn.predict_proba(logits)
    compiled = torch.compile(loss_fn.predict_proba, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(logits), loss_fn.predict_proba(logits))


def test_the_prepared_structure_follows_psi_and_stays_out_of_state_dict():
    torch._dynamo.reset()
    h, head, loss_fn = build("tree")
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    logits = head(torch.randn(6, FEATURES)).detach()
    loss_fn.prepare_for_inference()
    assert loss_fn.prediction.kind == "tree"
    assert loss_fn.state_dict().keys() == state.keys()
    assert not any("prediction" in key for key in head.prepare_for_inference().state_dict())

    # Eager prediction re-detects after any write to Ψ (here a dense Ψ).
    dense = dense_psi(SIZES, torch.Generator().manual_seed(3))
    loss_fn.set_psi(dense)
    torch.testing.assert_close(loss_fn.predict_proba(logits), predict_proba_reference(logits, dense, loss_fn.theta))
    assert loss_fn.prediction.kind == "dense"

    # Compiled prediction reads the structure as last prepared: re-preparing
    # after a change of Ψ updates its buffers in place, without a recompile.
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    loss_fn.load_state_dict(state)  # the tree again
    loss_fn.prepare_for_inference()
    compiled = torch.compile(loss_fn.predict_proba, fullgraph=True, backend=counting)
    torch.testing.assert_close(compiled(logits), loss_fn.predict_proba(logits))
    permuted = [p[:, torch.randperm(N, generator=torch.Generator().manual_seed(4))] for p in h.psi()]
    loss_fn.set_psi(permuted)
    loss_fn.prepare_for_inference()
    torch.testing.assert_close(compiled(logits), predict_proba_reference(logits, permuted, loss_fn.theta))
    assert len(compiles) == 1
    # a change of kind (tree -> dense) is a recompile, on the GEMM kernel
    loss_fn.set_psi(dense)
    loss_fn.prepare_for_inference()
    torch.testing.assert_close(compiled(logits), predict_proba_reference(logits, dense, loss_fn.theta))
    assert len(compiles) == 2
    # once prepared in full, an eager refresh keeps the coarse-to-fine tables
    loss_fn.set_psi(permuted)
    loss_fn.predict_proba(logits)
    fresh = lmm_fast.predict.PredictionStructure.from_psi_t(loss_fn.psi_t, loss_fn.level_sizes)
    fresh.prepare_search()
    assert loss_fn.prediction.kind == "tree" and loss_fn.prediction.search_ready
    assert torch.equal(loss_fn.prediction.search().members, fresh.search().members)

    # .to() moves it with the loss (float64 values for float64 Ψ).
    moved = loss_fn.to(torch.float64)
    assert moved.prediction.value.dtype == torch.float64 and moved.prediction.index.dtype == torch.int32
    torch.testing.assert_close(moved.predict_proba(logits.double()),
                               predict_proba_reference(logits.double(), [p.double() for p in permuted], moved.theta))


def test_coarse_to_fine_refusal_under_tracing_names_the_reason():
    torch._dynamo.reset()
    classes = torch.arange(N)
    h = Hierarchy.from_assignments([classes % 3, classes % 5], nested=False)
    head = LMMHead(FEATURES, h)
    head.prepare_for_inference()
    x = torch.randn(3, FEATURES)
    with pytest.raises(ValueError, match="nested"):
        head.predict_topk(x, 3, beam=2)
    with pytest.raises(Exception, match="nested"):
        torch.compile(lambda a: head.predict_topk(a, 3, beam=2), fullgraph=True, backend="eager")(x)


# ----------------------------------------------------------------- export


def batch_dim():
    return {"x": {0: torch.export.Dim("batch", min=2, max=1024)}}


@pytest.mark.parametrize("kind", ["tree", "dense"])
def test_torch_export_matches_eager_and_holds_standard_ops_only(kind):
    model, x = model_and_input(kind)
    lmm_fast.prepare_for_inference(model)
    program = torch.export.export(model, (x,), dynamic_shapes=batch_dim())
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "lmm_fast" in t], targets
    other = torch.randn(11, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_same_outputs(program.module()(other), model(other))


def test_a_saved_exported_program_runs_where_lmm_fast_cannot_be_imported(tmp_path):
    model, x = model_and_input("tree")
    lmm_fast.prepare_for_inference(model)
    program = torch.export.export(model, (x,), dynamic_shapes=batch_dim())
    torch.export.save(program, str(tmp_path / "classifier.pt2"))
    other = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    torch.save(other, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['lmm_fast'] = None\n"  # any import of lmm_fast now fails
        "import torch\n"
        f"program = torch.export.load({str(tmp_path / 'classifier.pt2')!r})\n"
        f"out = program.module()(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save([list(o) if isinstance(o, tuple) else o for o in out], {str(tmp_path / 'out.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        assert_same_outputs(torch.load(tmp_path / "out.pt"), model(other))


@pytest.mark.parametrize("kind", ["tree", "dense"])
def test_onnx_export_runs_in_plain_onnxruntime(kind, tmp_path):
    import onnx
    import onnxruntime

    model, x = model_and_input(kind)
    lmm_fast.prepare_for_inference(model)
    path = tmp_path / "classifier.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=batch_dim(), verbose=False)
    graph = onnx.load(str(path))
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert not graph.functions
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(9, 5, generator=torch.Generator().manual_seed(2))
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        assert_same_outputs([torch.from_numpy(a) for a in got], model(other))


# ------------------------------------------------------- a training step


def training_run(compiled: bool, non_overlapping: bool, steps: int = 3):
    _, head, loss_fn = build("tree", seed=5)
    gen = torch.Generator().manual_seed(6)
    x_all = torch.randn(48, FEATURES, generator=gen)
    y_all = torch.randint(0, N, (48,), generator=gen)
    h = Hierarchy.from_assignments([torch.arange(N) % 3, torch.arange(N) % 9])
    adapter = GibbsAdapter(loss_fn, h, y_all, non_overlapping=non_overlapping, seed=1)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)

    def step(x, target, indices):
        logits = head(x)
        loss = loss_fn(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        adapter.step(logits, target, indices)
        return loss.detach()

    run = torch.compile(step, backend="aot_eager") if compiled else step
    losses = []
    for i in range(steps):
        indices = torch.arange(16 * i, 16 * i + 16)
        losses.append(run(x_all[indices], y_all[indices], indices))
    return torch.stack(losses), adapter.labels.clone(), loss_fn.psi_t.clone(), loss_fn.psi_scale.clone()


@pytest.mark.parametrize("non_overlapping", [False, True])
def test_a_compiled_training_step_with_the_adapter_matches_eager(non_overlapping):
    torch._dynamo.reset()
    eager = training_run(False, non_overlapping)
    compiled = training_run(True, non_overlapping)
    # the compiled loss reads the Ψ the adapter rewrote outside the graph
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1:], eager[1:]):
        assert torch.equal(a, b)


def test_adapter_step_is_one_deliberate_graph_break_and_the_loss_compiles_fullgraph():
    torch._dynamo.reset()
    h, head, loss_fn = build("tree")
    train_targets = torch.randint(0, N, (32,), generator=torch.Generator().manual_seed(7))
    adapter = GibbsAdapter(loss_fn, h, train_targets, non_overlapping=True)
    x, indices = torch.randn(16, FEATURES), torch.arange(16)
    target = train_targets[indices]

    def step(features, y, idx):
        logits = head(features)
        loss = loss_fn(logits, y)
        adapter.step(logits, y, idx)
        return loss

    explanation = torch._dynamo.explain(step)(x, target, indices)
    # the head and the loss compile as one graph, then one break: the step is
    # not traced (traced, its host-side reads would break it up a dozen times)
    assert explanation.graph_count == 1 and len(explanation.break_reasons) == 1
    assert "torch.compiler.disable" in str(explanation.break_reasons[0].reason)
    # ... and it did run (eagerly): labels moved
    assert not torch.equal(adapter.labels, GibbsAdapter(loss_fn, h, train_targets, non_overlapping=True).labels)

    # `import lmm_fast` and eager steps do not load torch._dynamo for this
    code = ("import sys, torch, lmm_fast\n"
            "h = lmm_fast.Hierarchy.from_assignments([torch.arange(6) % 2, torch.arange(6) % 4])\n"
            "loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)\n"
            "y = torch.arange(6)\n"
            "lmm_fast.GibbsAdapter(loss_fn, h, y).step(torch.randn(6, 12), y, torch.arange(6))\n"
            "assert 'torch._dynamo' not in sys.modules, 'dynamo was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    # the loss part alone compiles as one graph, forward and backward
    loss_part = torch.compile(lambda features, y: loss_fn(head(features), y), fullgraph=True, backend="aot_eager")
    loss = loss_part(x, target)
    loss.backward()
    grad = head.linear.weight.grad.clone()
    head.linear.weight.grad = None
    expected = loss_fn(head(x), target)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, head.linear.weight.grad)
