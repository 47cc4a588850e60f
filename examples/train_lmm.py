"""Train, adapt, save, reload, predict and evaluate an LMM on a synthetic task.

A 200-class problem whose classes come in 8 hidden super-classes: the flat
softmax and the level-wise mixture model (a visual hierarchy from the class
means, Ψ adapted by collapsed Gibbs sampling after a warm-up) are trained in
an ordinary PyTorch loop on the same batches, the LMM run is saved and
reloaded, and both are evaluated on held-out rows (top-k error, mistake
severity). About 4 s on 2 CPU cores (8 s with Python and torch starting),
also with other jobs on the cores; ``--quick`` is a smaller run (tests).

    python examples/train_lmm.py [--quick] [--out DIR] [--epochs E] [--seed S] [--threads T]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import nn

import lmm_fast


def make_task(num_super: int, per_super: int, train_per_class: int, test_per_class: int, dim: int, seed: int):
    """Gaussian classes around super-class centres: ``(x_train, y_train, x_test, y_test)``."""
    gen = torch.Generator().manual_seed(seed)
    n = num_super * per_super
    centres = 4.0 * torch.randn(num_super, dim, generator=gen)
    means = centres.repeat_interleave(per_super, 0) + 1.5 * torch.randn(n, dim, generator=gen)

    def sample(per_class: int):
        y = torch.arange(n).repeat_interleave(per_class)
        return means[y] + 2.0 * torch.randn(y.numel(), dim, generator=gen), y

    x_train, y_train = sample(train_per_class)
    x_test, y_test = sample(test_per_class)
    return x_train, y_train, x_test, y_test


class Classifier(nn.Module):
    """An MLP backbone and the LMM head (packed logits of every level)."""

    def __init__(self, dim: int, hidden: int, hierarchy: lmm_fast.Hierarchy) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.head = lmm_fast.LMMHead(hidden, hierarchy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def train(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
          warmup_epochs: int, batch_size: int, seed: int, adapter: lmm_fast.GibbsAdapter | None = None) -> None:
    """Algorithm 1: Ψ fixed for ``warmup_epochs``, then one Gibbs step per mini-batch before the SGD step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        total = 0.0
        for indices in torch.randperm(y.numel(), generator=gen).split(batch_size):
            logits = model(x[indices])
            if adapter is not None and epoch >= warmup_epochs:
                # The dataset positions of the batch's images tell the sampler whose labels to redraw.
                adapter.step(logits, y[indices], indices)
            loss = loss_fn(logits, y[indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * indices.numel()
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / y.numel():.4f}")


@torch.no_grad()
def evaluate(name: str, proba: torch.Tensor, y: torch.Tensor, h: lmm_fast.Hierarchy) -> dict[int, float]:
    errors = lmm_fast.metrics.topk_error(proba, y, ks=(1, 5))
    wrong = proba.argmax(1) != y
    severity = float(h.lca_height(proba.argmax(1)[wrong], y[wrong]).double().mean()) if bool(wrong.any()) else 0.0
    print(f"{name:<26} top-1 error {100 * errors[1]:5.2f} %   top-5 error {100 * errors[5]:5.2f} %   "
          f"mistake severity {severity:.3f}")
    return errors


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller task and fewer epochs (a few seconds)")
    parser.add_argument("--epochs", type=int, help="epochs per model (default 5; --quick 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the saved run (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small matrices gain nothing from more, and "
                             "with other jobs on the cores 2 threads were measured 15x slower than 1)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, float]:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    sizes = dict(num_super=4, per_super=10, train_per_class=20, test_per_class=10, dim=16) if args.quick else \
        dict(num_super=8, per_super=25, train_per_class=30, test_per_class=20, dim=32)
    epochs = args.epochs or (3 if args.quick else 5)
    warmup = min(2, epochs - 1)
    x_train, y_train, x_test, y_test = make_task(seed=args.seed, **sizes)
    n = int(y_train.max()) + 1
    print(f"task: {n} classes, {y_train.numel()} training / {y_test.numel()} test rows, d = {x_train.shape[1]}")

    # The visual hierarchy (paper Section IV): class means, then balanced clustering.
    h = lmm_fast.Hierarchy.from_features(x_train, y_train, level_sizes=[sizes["num_super"], n // 5])
    print(h.summary())

    print("flat softmax (the baseline: the same backbone, nn.Linear and nn.CrossEntropyLoss):")
    flat = nn.Sequential(nn.Linear(x_train.shape[1], 128), nn.ReLU(), nn.Linear(128, n))
    train(flat, nn.CrossEntropyLoss(), x_train, y_train, epochs=epochs, warmup_epochs=epochs, batch_size=128,
          seed=args.seed)

    print(f"LMM ({warmup} warm-up epochs with Ψ fixed, then Ψ adapted by collapsed Gibbs sampling):")
    model = Classifier(x_train.shape[1], 128, h)
    loss_fn = lmm_fast.FusedLMMLoss.from_hierarchy(h)  # θ = (0.05, 0.05, 0.9)
    adapter = lmm_fast.GibbsAdapter(loss_fn, h, y_train, beta=1.0, non_overlapping=True, seed=args.seed)
    train(model, loss_fn, x_train, y_train, epochs=epochs, warmup_epochs=warmup, batch_size=128, seed=args.seed,
          adapter=adapter)
    print(f"  {loss_fn}")

    # Save the run: the hierarchy (JSON), the network, the loss (Ψ, θ) and the sampler's state.
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        os.makedirs(out, exist_ok=True)
        h.save(os.path.join(out, "hierarchy.json"))
        torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict(), "adapter": adapter.state_dict()},
                   os.path.join(out, "run.pt"))

        # Reload it as a new process would.
        h2 = lmm_fast.Hierarchy.load(os.path.join(out, "hierarchy.json"))
        state = torch.load(os.path.join(out, "run.pt"), weights_only=True)
        model2 = Classifier(x_train.shape[1], 128, h2)
        model2.load_state_dict(state["model"])
        loss2 = lmm_fast.FusedLMMLoss.from_hierarchy(h2)
        loss2.load_state_dict(state["loss"])
        adapter2 = lmm_fast.GibbsAdapter(loss2, h2, y_train, beta=1.0, non_overlapping=True, seed=args.seed)
        adapter2.load_state_dict(state["adapter"])
        print(f"saved and reloaded the run ({', '.join(sorted(os.listdir(out)))} in {out if args.out else 'a temporary folder'})")

    with torch.no_grad():
        proba = loss2.predict_proba(model2(x_test))  # [B, N] = Σ_l θ_l softmax(a^l) Ψ^l
        if not torch.equal(proba, loss_fn.predict_proba(model(x_test))):
            raise RuntimeError("the reloaded model predicts differently from the trained one")
        features = model2.backbone(x_test[:8])
        values, classes = model2.head.predict_topk(features, k=5, loss_fn=loss2)
        print(f"top-5 classes of the first test row: {classes[0].tolist()} (true class {int(y_test[0])}), "
              f"probabilities {[round(float(v), 3) for v in values[0]]}")
        flat_proba = torch.softmax(flat(x_test), dim=1)

    print()
    flat_errors = evaluate("flat softmax", flat_proba, y_test, h2)
    lmm_errors = evaluate("LMM w/P,TC (reloaded)", proba, y_test, h2)
    moved = [int((a != b).sum()) for a, b in zip(adapter2.labels.T, torch.stack(h2.assignments)[:, y_train])]
    print(f"the adaptation moved {moved} of {y_train.numel()} training images away from their initial group "
          f"(per upper level); total {time.perf_counter() - started:.1f} s")
    return {"flat_top1": flat_errors[1], "lmm_top1": lmm_errors[1], "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main()
