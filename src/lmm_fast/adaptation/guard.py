"""Remedies for what the paper's LMM gets wrong on real data, as options.

The paper's model (:class:`~lmm_fast.FusedLMMLoss`, :func:`~lmm_fast.train.fit_lmm`,
:class:`~lmm_fast.GibbsAdapter`) is left exactly as specified; this module adds
what a practitioner would try on top of it (docs/remedies.md, with the
measurements of ``lmm-fast compare --remedies``):

1. θ over training: :class:`ThetaSchedule` / :func:`coarse_to_fine_theta`
   (a curriculum moving θ toward the bottom level), learned global θ
   (``FusedLMMLoss(learn_theta=True)``) and per-example θ(x) from
   :class:`ThetaGate`; :func:`fit_remedy` trains with any of them.
2. Prediction that is not capped by the upper levels: :func:`fit_temperature`
   / :func:`apply_temperature` and :func:`fit_test_theta` (fit on held-out
   data, never the test set), and :func:`path_score_proba`, the product of
   the levels along each class's path.
3. Adaptation that cannot wreck the tree: :func:`scaled_beta` (β per class
   from the class counts, ``beta="scaled"``) and :class:`GuardedGibbsAdapter`,
   which refuses a Gibbs step that would leave more than a set share of a
   level's groups empty.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmm_fast.adaptation import GibbsAdapter
from lmm_fast.loss import check_theta, default_theta
from lmm_fast.train import FitHistory, optimizer_step

__all__ = [
    "ThetaSchedule",
    "coarse_to_fine_theta",
    "ThetaGate",
    "fit_remedy",
    "fit_temperature",
    "apply_temperature",
    "fit_test_theta",
    "path_score_proba",
    "scaled_beta",
    "empty_groups",
    "GuardedGibbsAdapter",
]


# ---------------------------------------------------------------------------
# 1. θ over training
# ---------------------------------------------------------------------------


def _simplex(theta: Tensor | Sequence[float], num_levels: int, name: str) -> Tensor:
    try:
        return check_theta(theta, num_levels).to(torch.float32)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def coarse_to_fine_theta(
    epoch: int,
    epochs: int,
    num_levels: int,
    start: Tensor | Sequence[float] | None = None,
    end: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """θ ``[L]`` for ``epoch`` (0-based) of ``epochs``: a straight line on the
    simplex from ``start`` (default: uniform, every level ``1/L``) at epoch 0 to
    ``end`` (default: ``(0, …, 0, 1)``, the flat softmax) at the last epoch.

    Why this default: the upper levels get most of the weight while the bottom
    classifier is still poor (they have many examples per node), and by the end
    all of the weight is on the bottom level, whose gradient is then the plain
    cross-entropy's (no longer scaled by ``θ_L z^L_y / z_y``) and whose
    prediction is not capped by the mixture. A convex combination of two
    points of the simplex stays on it.
    """
    if not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be a positive int, got {num_levels!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(epoch, int) or not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be an int in [0, {epochs}), got {epoch!r}")
    first = torch.full((num_levels,), 1.0 / num_levels) if start is None else _simplex(start, num_levels, "start")
    if end is None:
        last = torch.zeros(num_levels)
        last[-1] = 1.0
    else:
        last = _simplex(end, num_levels, "end")
    w = epoch / (epochs - 1) if epochs > 1 else 1.0
    return ((1 - w) * first + w * last).to(torch.float32)


class ThetaSchedule:
    """θ per epoch, for :func:`fit_remedy` (``schedule(epoch) -> [L]``).

    Args:
        num_levels: ``L``.
        epochs: length of the schedule; epochs past it keep the last θ.
        start, end: θ at the first and last epoch (see :func:`coarse_to_fine_theta`).
    """

    def __init__(
        self,
        num_levels: int,
        epochs: int,
        start: Tensor | Sequence[float] | None = None,
        end: Tensor | Sequence[float] | None = None,
    ) -> None:
        # Validate once here, so a bad schedule fails before training starts.
        coarse_to_fine_theta(0, epochs, num_levels, start, end)
        self.num_levels, self.epochs, self.start, self.end = num_levels, epochs, start, end

    def __call__(self, epoch: int) -> Tensor:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        return coarse_to_fine_theta(min(epoch, self.epochs - 1), self.epochs, self.num_levels, self.start, self.end)

    def __repr__(self) -> str:
        return f"ThetaSchedule(L={self.num_levels}, epochs={self.epochs}, start={self(0).tolist()}, end={self(self.epochs - 1).tolist()})"


class ThetaGate(nn.Module):
    """Per-example level weights θ(x) = softmax(G x + c), a gating network.

    Starts at a fixed θ for every input (``G = 0``, ``c = log θ_init``), so
    training begins exactly at the paper's model and the gate learns from
    the loss's gradient where to move.

    Args:
        in_features: ``d`` of the features it reads (e.g. the backbone output).
        num_levels: ``L``.
        init_theta: ``[L]`` on the simplex (default :func:`~lmm_fast.default_theta`);
            zero weights start at 1e-6.

    Shapes: ``x [B, d]`` → θ ``[B, L]``, every row on the simplex.
    """

    def __init__(self, in_features: int, num_levels: int, init_theta: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
            raise ValueError(f"num_levels must be a positive int, got {num_levels!r}")
        theta = default_theta(num_levels) if init_theta is None else _simplex(init_theta, num_levels, "init_theta")
        self.in_features, self.num_levels = in_features, num_levels
        self.linear = nn.Linear(in_features, num_levels)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(theta.to(torch.float32).clamp_min(1e-6).log())

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, in_features] = [B, {self.in_features}], got {shape}")
        return torch.softmax(self.linear(x), dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_levels={self.num_levels}"


def fit_remedy(
    backbone: nn.Module,
    head: nn.Module,
    loader: Iterable,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    loss_fn,
    schedule: Callable[[int], Tensor] | None = None,
    gate: ThetaGate | None = None,
    device: torch.device | str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> FitHistory:
    """Train ``head(backbone(x))`` on the LMM loss with a θ schedule or a gate.

    Args:
        backbone: features ``[B, d]`` from inputs (``nn.Identity()`` for fixed features).
        head: packed logits ``[B, ΣN_l]`` from features (e.g. :class:`~lmm_fast.LMMHead`).
        loader: yields ``(inputs, targets [B], indices [B])`` (as :func:`~lmm_fast.train.fit_lmm`).
        optimizer: over the backbone's, head's, and the gate's or the loss's
            (``learn_theta=True``) parameters.
        epochs: number of epochs.
        loss_fn: a :class:`~lmm_fast.FusedLMMLoss`.
        schedule: ``epoch -> θ [L]``, written into the loss (``set_theta``)
            at the start of every epoch; not with a gate or a learned θ.
        gate: a :class:`ThetaGate` over the backbone's features: each row's
            loss uses its own θ(x) (the gate receives the gradient).
        device: where batches go (default: the head's parameters' device).
        on_step: called after every step with ``epoch``, ``step``, ``loss``, ``theta``.

    Without a schedule or a gate this is Algorithm 1 with Ψ fixed (the
    module's θ, learned if ``learn_theta``).
    """
    if schedule is not None and (gate is not None or getattr(loss_fn, "learn_theta", False)):
        raise ValueError("schedule sets θ per epoch; it cannot be combined with a gate or a learned θ")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if gate is not None and gate.num_levels != loss_fn.num_levels:
        raise ValueError(f"gate gives {gate.num_levels} level weights, the loss has {loss_fn.num_levels} levels")
    if device is None:
        device = next(iter(head.parameters())).device
    device = torch.device(device)
    history = FitHistory(setting="lmm")
    backbone.train()
    head.train()
    if gate is not None:
        gate.train()
    step = 0
    for epoch in range(epochs):
        if schedule is not None:
            loss_fn.set_theta(schedule(epoch))
        total, count = 0.0, 0
        for batch in loader:
            if not isinstance(batch, (list, tuple)) or len(batch) != 3:
                raise ValueError("the loader must yield (inputs, targets, indices)")
            inputs, targets, _ = batch
            inputs = inputs.to(device)
            targets = torch.as_tensor(targets).to(device).long()
            features = backbone(inputs)
            logits = head(features)
            theta = gate(features) if gate is not None else None
            loss = loss_fn(logits, targets, theta=theta)
            value = optimizer_step(loss, optimizer, epoch, step)
            history.step_losses.append(value)
            total += value * targets.numel()
            count += targets.numel()
            step += 1
            if on_step is not None:
                on_step({"epoch": epoch, "step": step, "loss": value,
                         "theta": (theta.detach().mean(0) if theta is not None else loss_fn.theta.detach())})
        history.epoch_losses.append(total / max(count, 1))
    return history


# ---------------------------------------------------------------------------
# 2. Prediction that is not capped
# ---------------------------------------------------------------------------


def _held_out(proba_or_logits: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(proba_or_logits, Tensor) or proba_or_logits.dim() != 2 or not proba_or_logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point [M, C] tensor")
    if not isinstance(target, Tensor) or target.dim() != 1 or target.shape[0] != proba_or_logits.shape[0]:
        raise ValueError(f"target must be [M] = [{proba_or_logits.shape[0]}] class indices")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.numel() == 0:
        raise ValueError("the held-out set is empty: fit on at least one row")
    return proba_or_logits, target.long().to(proba_or_logits.device)


def _log_proba(proba: Tensor) -> Tensor:
    if bool((proba < 0).any()):
        raise ValueError("proba must be non-negative probabilities (pass the model's predicted [M, N] distribution)")
    return proba.double().clamp_min(1e-12).log()


_LOG_T_BOUND = math.log(100.0)


def fit_temperature(proba: Tensor, target: Tensor, *, steps: int = 50) -> float:
    """Temperature ``T > 0`` minimising the held-out NLL of ``softmax(log p / T)``.

    Args:
        proba: ``[M, N]`` predicted distributions on held-out rows (a slice of
            the training split, never the test set).
        target: ``[M]`` their classes.

    Works for any model: for a softmax, ``softmax(log p / T) = softmax(a / T)``.
    ``T < 1`` sharpens (the LMM's mixture is under-confident), ``T > 1``
    softens. LBFGS on ``log T``, kept in ``[0.01, 100]`` (where the held-out
    rows carry no signal, e.g. random predictions, the NLL keeps falling
    as ``T → ∞`` and the bound stops it).
    """
    proba, target = _held_out(proba, target, "proba")
    log_p = _log_proba(proba)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(log_p / log_t.clamp(-_LOG_T_BOUND, _LOG_T_BOUND).exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    value = float(log_t.detach().clamp(-_LOG_T_BOUND, _LOG_T_BOUND).exp())
    if not math.isfinite(value) or value <= 0:
        raise FloatingPointError(f"temperature fit diverged (T = {value})")
    return value


def apply_temperature(proba: Tensor, temperature: float) -> Tensor:
    """``[M, N]`` ``softmax(log p / T)``, rows on the simplex (float32)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not isinstance(proba, Tensor) or proba.dim() != 2:
        raise ValueError("proba must be an [M, N] tensor")
    return torch.softmax(_log_proba(proba) / temperature, dim=1).to(torch.float32)


def fit_test_theta(logits: Tensor, target: Tensor, loss_fn, *, steps: int = 50) -> Tensor:
    """θ ``[L]`` minimising the held-out NLL of the LMM mixture (Ψ fixed).

    Args:
        logits: ``[M, ΣN_l]`` packed logits of held-out rows (a slice of the
            training split, never the test set).
        target: ``[M]`` their classes.
        loss_fn: the trained :class:`~lmm_fast.FusedLMMLoss` (its Ψ is used,
            its θ is not changed).

    Returns the fitted θ on the simplex (parametrised as a softmax, fit by
    LBFGS from the loss's θ); pass it as ``theta=`` to
    :func:`~lmm_fast.predict.mixture_proba` or :func:`~lmm_fast.predict_topk`.
    """
    logits = loss_fn.pack(logits)
    logits, target = _held_out(logits, target, "logits")
    logits = logits.detach().float()
    init = loss_fn.theta.detach().double().clamp_min(1e-6)
    phi = (init / init.sum()).log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([phi], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        theta = torch.softmax(phi, 0).float()
        losses = loss_fn(logits, target, theta=theta)
        loss = losses.mean() if losses.dim() else losses
        loss.backward()
        return loss

    opt.step(closure)
    theta = torch.softmax(phi.detach(), 0)
    if not bool(torch.isfinite(theta).all()):
        raise FloatingPointError("test-time θ fit diverged")
    return theta.to(torch.float32)


def path_score_proba(
    logits: Tensor | Sequence[Tensor],
    assignments: Sequence[Tensor],
    level_sizes: Sequence[int] | None = None,
) -> Tensor:
    """Product-of-levels scorer: ``P(y | x) ∝ Π_l softmax(a^l)[g_l(y)]``.

    Args:
        logits: packed ``[B, N_1 + … + N_{L-1} + N]`` or a per-level list.
        assignments: one long ``[N]`` tensor per upper level, the group
            ``g_l(y)`` of every class (``Hierarchy.assignments``: a tree).
        level_sizes: ``[N_1, …, N_{L-1}, N]`` (needed for packed logits;
            default: from the assignments, ``max + 1`` per level).

    Returns ``[B, N]`` float32, rows on the simplex (normalised over classes,
    in log space). Unlike the mixture it is not capped: a class can reach
    probability 1 when every level agrees; its argmax is the class whose
    whole path scores best.
    """
    if isinstance(assignments, Tensor) or len(assignments) == 0:
        raise ValueError("assignments must be a non-empty list of [N] group ids, one per upper level")
    groups = [torch.as_tensor(a).long() for a in assignments]
    n = groups[0].numel()
    for l, g in enumerate(groups):
        if g.dim() != 1 or g.numel() != n:
            raise ValueError(f"assignments[{l}] must be [N] = [{n}], got shape {tuple(g.shape)}")
        if int(g.min()) < 0:
            raise ValueError(f"assignments[{l}] has a negative group id: path scores need a tree (every class in one group)")
    if level_sizes is None:
        level_sizes = [int(g.max()) + 1 for g in groups] + [n]
    level_sizes = [int(s) for s in level_sizes]
    if len(level_sizes) != len(groups) + 1 or level_sizes[-1] != n:
        raise ValueError(f"level_sizes must list the {len(groups)} upper levels and N = {n} last, got {level_sizes}")
    if isinstance(logits, (list, tuple)):
        parts = list(logits)
    else:
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != sum(level_sizes):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be [B, {sum(level_sizes)}] (levels {level_sizes} packed), got {shape}")
        parts = list(torch.split(logits, level_sizes, dim=1))
    if len(parts) != len(level_sizes) or any(p.shape[1] != s for p, s in zip(parts, level_sizes)):
        raise ValueError(f"logits must hold levels of sizes {level_sizes}")
    for l, (g, s) in enumerate(zip(groups, level_sizes)):
        if int(g.max()) >= s:
            raise ValueError(f"assignments[{l}] has group {int(g.max())} but level {l} has {s} groups")
    score = F.log_softmax(parts[-1].float(), dim=1)
    for part, g in zip(parts[:-1], groups):
        score = score + F.log_softmax(part.float(), dim=1)[:, g.to(part.device)]
    return torch.softmax(score, dim=1)


# ---------------------------------------------------------------------------
# 3. Adaptation that cannot wreck the tree
# ---------------------------------------------------------------------------


def scaled_beta(train_targets: Tensor, h, strength: float = 0.1) -> Tensor:
    """β per class from the class counts: ``β_y = strength · Ξ_y / G``.

    ``Ξ_y`` is the number of training images of class ``y`` and ``G`` the
    number of groups of the finest upper level, so ``β_0 = Σ_y β_y =
    strength · Ξ / G``: ``strength`` times the mean image count of a group
    of that level (the smallest groups, the ones a large prior swamps). The
    prior spreads its mass like the data (a rare class gets a small β_y, so it
    is not outweighed in its own group), whatever N is, where the paper's
    constant β gives ``β_0 = N β``. ``strength = 0.1`` (the default): the
    prior is a tenth of a typical group's evidence. A class with no image
    gets the smallest positive β of the others (β must be positive).

    Returns a float32 ``[N]`` tensor for ``GibbsAdapter(beta=...)``
    (``prior="per_class"``).
    """
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive finite number, got {strength!r}")
    if not getattr(h, "level_sizes", None):
        raise ValueError("h must be a hierarchy with at least one upper level (level_sizes)")
    if not isinstance(train_targets, Tensor) or train_targets.dim() != 1 or train_targets.is_floating_point():
        raise TypeError("train_targets must be a 1-D integer tensor [Ξ]")
    n = int(h.num_classes)
    if train_targets.numel() == 0:
        raise ValueError("train_targets is empty")
    if int(train_targets.min()) < 0 or int(train_targets.max()) >= n:
        raise ValueError(f"train_targets must hold classes in [0, {n})")
    counts = torch.bincount(train_targets.long().cpu(), minlength=n).double()
    groups = int(h.level_sizes[-1])
    beta = strength * counts / groups
    if bool((beta == 0).any()):
        beta[beta == 0] = beta[beta > 0].min()
    return beta.to(torch.float32)


def empty_groups(adapter: GibbsAdapter) -> list[int]:
    """Per upper level, the number of groups that are *empty*: no image
    carries their label, or no class has them as its best group
    (``argmax_t Ψ^l[t, y]``), so that under the non-overlapping constraint
    they own no class."""
    out = []
    psi = adapter.loss_fn.psi
    for counts, p in zip(adapter.counts, psi):
        no_images = counts.sum(dim=1) == 0
        owned = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        owned[p.argmax(dim=0)] = True
        out.append(int((no_images.to(owned.device) | ~owned).sum()))
    return out


class GuardedGibbsAdapter(GibbsAdapter):
    """:class:`~lmm_fast.GibbsAdapter` with a guard against groups emptying
    en masse, and ``beta="scaled"``.

    Args (besides :class:`~lmm_fast.GibbsAdapter`'s):
        beta: as :class:`~lmm_fast.GibbsAdapter`, or ``"scaled"`` (the
            default): :func:`scaled_beta` with ``beta_strength``.
        beta_strength: ``strength`` of :func:`scaled_beta`.
        max_empty_share: a step is refused (undone: labels, Ω and Ψ restored,
            the step counter still advanced so the next draw differs) when
            after it some level has more than this share of its groups
            empty (:func:`empty_groups`) *and* more empty groups than before
            the step. Empties already there are tolerated; the guard only
            stops them from growing past the threshold. ``1.0`` disables it.

    Attributes: ``refused_steps`` (int), ``last_empty`` (empty groups per
    level after the last accepted step). The guard costs one copy of the
    adapter's state per step (labels and counts) and one of the loss's Ψ.
    """

    def __init__(self, loss_fn, h, train_targets: Tensor, beta: float | Tensor | str = "scaled",
                 non_overlapping: bool = False, seed: int = 0, *, beta_strength: float = 0.1,
                 max_empty_share: float = 0.25, **kwargs) -> None:
        if isinstance(beta, str):
            if beta != "scaled":
                raise ValueError(f"beta must be a positive float, an [N] tensor or 'scaled', got {beta!r}")
            beta = scaled_beta(torch.as_tensor(train_targets), h, beta_strength)
        if not (isinstance(max_empty_share, (int, float)) and 0 <= max_empty_share <= 1):
            raise ValueError(f"max_empty_share must be in [0, 1], got {max_empty_share!r}")
        super().__init__(loss_fn, h, train_targets, beta=beta, non_overlapping=non_overlapping, seed=seed, **kwargs)
        self.max_empty_share = float(max_empty_share)
        self.refused_steps = 0
        self.last_empty = empty_groups(self)

    @torch.no_grad()
    def step(self, logits, target: Tensor, indices: Tensor, exact: bool = False) -> Tensor:
        if self.max_empty_share >= 1.0:
            return super().step(logits, target, indices, exact=exact)
        before = self.state_dict()
        psi_t = self.loss_fn.psi_t.clone()
        psi_scale = self.loss_fn.psi_scale.clone()
        empty_before = empty_groups(self)
        new = super().step(logits, target, indices, exact=exact)
        empty_after = empty_groups(self)
        too_many = any(after > self.max_empty_share * size and after > prev
                       for after, prev, size in zip(empty_after, empty_before, self.level_sizes))
        if not too_many:
            self.last_empty = empty_after
            return new
        step = self.step_count
        self.load_state_dict(before)
        if not before["psi_synced"]:
            # The refused step was the first: the loss still had the hierarchy's Ψ.
            self.loss_fn.psi_t.copy_(psi_t)
            self.loss_fn.psi_scale.copy_(psi_scale)
        self.step_count = step
        self.refused_steps += 1
        return self.labels[torch.as_tensor(indices, device=self.device).long()].clone()
