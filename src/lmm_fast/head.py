"""``LMMHead``: the node classifiers of every level as one linear layer, and
prediction from features (full, or coarse-to-fine along the tree)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmm_fast.ops import accumulate_dtype
from lmm_fast.loss import check_row_theta, default_theta
from lmm_fast.ops.predict import lmm_gather_scores
from lmm_fast.predict import NOT_PREPARED, PredictionStructure, SearchTables, is_tracing, prepared_proba, prepared_topk

if TYPE_CHECKING:  # pragma: no cover
    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.loss import FusedLMMLoss

__all__ = ["LMMHead"]


class LMMHead(nn.Module):
    r"""One ``nn.Linear`` producing the packed logits of every level of a hierarchy.

    Row block ``l`` of the weight is level ``l``'s node classifier
    (``a^l = W_l x + b_l``), top level first, the ``N`` class rows last, so
    ``head(x)`` is exactly the packed layout :class:`~lmm_fast.FusedLMMLoss`
    takes, computed in a single GEMM.

    Args:
        in_features: ``d``, the feature size.
        hierarchy: a :class:`~lmm_fast.Hierarchy` (its level sizes, and the
            structure and initial Ψ used by prediction when no loss is given).
        bias: learn a bias per node.
        init_std: weights start ``N(0, init_std²)`` and biases at zero, so every
            level starts near uniform and the mixture near ``1/N`` (the loss
            starts at ``log N`` whatever θ is) instead of one level's random
            logits dominating.
        device, dtype: of the parameters.

    Shapes:
        ``x``: ``[*, d]`` → ``head(x)``: ``[*, N_1 + … + N_{L-1} + N]``.

    Prediction reads Ψ and θ from ``loss_fn`` when given (pass the loss you
    trained with: its adapted Ψ and learned θ); without one it uses the
    hierarchy's initial Ψ and :func:`~lmm_fast.default_theta`. A ``theta``
    argument (``[L]``, or ``[B, L]`` one per row, e.g. from a gating network)
    overrides θ.
    """

    def __init__(
        self,
        in_features: int,
        hierarchy: "Hierarchy",
        *,
        bias: bool = True,
        init_std: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        for name in ("num_classes", "level_sizes", "assignments", "psi"):
            if not hasattr(hierarchy, name):
                raise TypeError(
                    f"hierarchy must be a lmm_fast.Hierarchy (missing .{name}), got {type(hierarchy).__name__}"
                )
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        self.hierarchy = hierarchy
        self.in_features = in_features
        self.level_sizes = [int(s) for s in hierarchy.level_sizes] + [int(hierarchy.num_classes)]
        self.linear = nn.Linear(in_features, sum(self.level_sizes), bias=bias, device=device, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, float(init_std))
            if self.linear.bias is not None:
                self.linear.bias.zero_()

    # ------------------------------------------------------------------ layout
    @property
    def num_classes(self) -> int:
        return self.level_sizes[-1]

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def offsets(self) -> list[int]:
        """Column offset of each level in the packed logits."""
        out, offset = [], 0
        for size in self.level_sizes:
            out.append(offset)
            offset += size
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def split(self, logits: Tensor) -> list[Tensor]:
        """Packed ``[*, ΣN_l]`` logits → per-level ``[*, N_l]`` views, top first."""
        return list(torch.split(logits, self.level_sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, level_sizes={self.level_sizes}"

    # -------------------------------------------------------------- from flat
    @classmethod
    @torch.no_grad()
    def from_flat(cls, linear: nn.Linear, hierarchy: "Hierarchy") -> "LMMHead":
        r"""A head that starts from a trained flat ``nn.Linear(d, N)`` classifier.

        The class rows are copied, so with ``θ = (0, …, 0, 1)`` the head gives
        the flat model's outputs exactly. Each group ``t`` of an upper level gets
        ``w_t = Σ_y Ψ[t, y] w_y`` (the mean of its members' rows for a tree) and
        ``b_t = Σ_y Ψ[t, y] b_y + H(Ψ[t])``, where the entropy ``H`` is
        ``log C_t`` for a group of ``C_t`` classes: the flat model gives the
        group ``Σ_{y∈t} e^{a_y} ≈ C_t e^{\bar a}``, so its logit is the members'
        mean plus ``log C_t``. The group classifiers thus start as the flat
        model's view of the groups, and fine-tuning starts at its accuracy.

        The head always has a bias (zero for the classes when ``linear`` has
        none); its device and dtype are those of ``linear.weight``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear(d, N), got {type(linear).__name__}")
        num_classes = int(hierarchy.num_classes)
        if linear.out_features != num_classes:
            raise ValueError(
                f"linear has {linear.out_features} outputs but the hierarchy has {num_classes} classes"
            )
        weight = linear.weight.detach()
        head = cls(linear.in_features, hierarchy, bias=True, device=weight.device, dtype=weight.dtype)
        acc = torch.float64
        w = weight.to(acc)
        b = linear.bias.detach().to(acc) if linear.bias is not None else torch.zeros(num_classes, dtype=acc, device=w.device)
        rows, biases = [], []
        if getattr(hierarchy, "is_dense", False):
            for p in hierarchy.psi(dtype=acc, device=w.device):
                rows.append(p @ w)
                safe = torch.where(p > 0, p, torch.ones_like(p))
                entropy = -(p * safe.log()).sum(dim=1)
                biases.append(p @ b + entropy)
        else:
            # Hard groups: sums over the members, without forming Ψ (N may be large).
            for groups, size in zip(hierarchy.assignments, hierarchy.level_sizes):
                groups = groups.to(w.device)
                count = torch.bincount(groups, minlength=size).to(acc).unsqueeze(1)
                rows.append(torch.zeros(size, w.shape[1], dtype=acc, device=w.device).index_add_(0, groups, w) / count)
                mean_bias = torch.zeros(size, 1, dtype=acc, device=w.device).index_add_(0, groups, b.unsqueeze(1)) / count
                biases.append((mean_bias + count.log()).squeeze(1))
        rows.append(w)
        biases.append(b)
        head.linear.weight.copy_(torch.cat(rows).to(weight.dtype))
        head.linear.bias.copy_(torch.cat(biases).to(weight.dtype))
        return head

    # --------------------------------------------------------------- mixture
    def prepare_for_inference(self, loss_fn: "FusedLMMLoss | None" = None) -> "LMMHead":
        """Works out, eagerly, the structure prediction reads (see
        :meth:`FusedLMMLoss.prepare_for_inference`): the head's own default
        (the hierarchy's initial Ψ and :func:`~lmm_fast.default_theta`, kept
        in the submodule ``prediction``) and, when given, ``loss_fn``'s.
        Needed before ``torch.compile`` / ``torch.export`` / ONNX export of
        :meth:`predict_proba` and :meth:`predict_topk`. Returns ``self``."""
        structure = self.prediction_structure()
        if not structure.search_ready:
            structure.prepare_search()
        if loss_fn is not None:
            loss_fn.prepare_for_inference()
        return self

    def prediction_structure(self) -> PredictionStructure:
        """The head's default :class:`~lmm_fast.predict.PredictionStructure`
        (built on first use, eagerly; under tracing it must exist)."""
        current = getattr(self, "prediction", None)
        if current is None:
            if is_tracing():
                raise RuntimeError(NOT_PREPARED.format(owner="LMMHead (no loss_fn)", call="head.prepare_for_inference()"))
            theta = default_theta(self.num_levels).to(torch.float32)
            self.prediction = PredictionStructure.from_hierarchy(self.hierarchy, theta, device=self.linear.weight.device)
            current = self.prediction
        return current

    def _mixture(
        self, loss_fn: "FusedLMMLoss | None", device: torch.device, theta: Tensor | None = None
    ) -> tuple[PredictionStructure, Tensor | None, Tensor]:
        """(structure, dense Ψ or None, θ) on ``device``; the dense Ψ is
        ``None`` when the structure is a tree or holds it itself."""
        structure, dense, default = self._psi_and_theta(loss_fn, device)
        if theta is None:
            return structure, dense, default
        if not isinstance(theta, Tensor):
            theta = torch.as_tensor(theta, dtype=torch.float64)
        if theta.device.type == "meta" and device.type != "meta":
            raise ValueError(f"theta is on the meta device (it holds no values) but the features are on {device}")
        if not is_tracing():
            check_row_theta(theta, self.num_levels)
        return structure, dense, theta.to(device)

    def _psi_and_theta(
        self, loss_fn: "FusedLMMLoss | None", device: torch.device
    ) -> tuple[PredictionStructure, Tensor | None, Tensor]:
        if loss_fn is not None:
            if list(loss_fn.level_sizes) != self.level_sizes:
                raise ValueError(
                    f"loss_fn has level sizes {list(loss_fn.level_sizes)} but the head {self.level_sizes}"
                )
            if loss_fn.psi_t.device != device:
                raise ValueError(
                    f"the features are on {device} but loss_fn's Ψ is on {loss_fn.psi_t.device}; move it with .to()"
                )
            structure = loss_fn.prediction_structure()
            dense = None if structure.kind == "tree" else loss_fn.effective_psi_t()
            return structure, dense, loss_fn.theta
        structure = self.prediction_structure()
        return structure, None, structure.theta

    def _features(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor of features, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be [B, in_features] = [B, {self.in_features}], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        return x

    def predict_proba(
        self, x: Tensor, loss_fn: "FusedLMMLoss | None" = None, *, theta: Tensor | None = None
    ) -> Tensor:
        """``[B, N]`` class probabilities ``Σ_l θ_l softmax(a^l) Ψ^l`` of features ``x`` ``[B, d]``."""
        logits = self(self._features(x))
        structure, dense, theta = self._mixture(loss_fn, logits.device, theta)
        return prepared_proba(logits, structure, theta.to(accumulate_dtype(logits.dtype)), dense)

    @torch.no_grad()
    def predict_topk(
        self,
        x: Tensor,
        k: int = 5,
        beam: int | None = None,
        *,
        loss_fn: "FusedLMMLoss | None" = None,
        theta: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` most probable classes of features ``x`` ``[B, d]``, best first.

        ``beam=None`` scores all ``N`` classes (one GEMM, then the fused top-k
        kernel). ``beam=b`` predicts coarse to fine: all groups of the top level
        are scored, and at each lower level only the children of the ``b`` best
        groups kept from the level above (best by the product of the levels'
        probabilities along the path), down to the classes of the ``b`` best
        groups of the last upper level; the cost is ``O(N_1 + b·branching)``
        dot products per row instead of ``O(ΣN_l)``. The mixture of the scored
        classes is returned, with each softmax below the top normalised over
        the nodes scored at its level, so once the beam covers every group the
        result equals the full prediction.

        Returns:
            ``(values [B, k], indices [B, k])``: probabilities (float32, or
            float64 for float64 features) and int64 classes. When a row's beam
            holds fewer than ``k`` classes, the missing entries have index -1
            and probability 0.

        Raises:
            ValueError: for a beam below 1, ``k`` outside ``[0, N]``, or a Ψ
            that is not a tree (coarse-to-fine needs nested levels and every
            class in exactly one group per level).
        """
        x = self._features(x)
        n = self.num_classes
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
            raise ValueError(f"k must be an int in [0, N] = [0, {n}], got {k!r}")
        structure, dense, theta = self._mixture(loss_fn, x.device, theta)
        acc = accumulate_dtype(x.dtype)
        if theta.dim() == 2 and theta.shape[0] != x.shape[0]:
            raise ValueError(f"theta has {theta.shape[0]} rows but x has {x.shape[0]}")
        if beam is None:
            return prepared_topk(self(x), structure, theta.to(acc), k, dense)
        if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
            raise ValueError(f"beam must be a positive int (groups kept per level) or None, got {beam!r}")
        if structure.kind != "tree":
            raise ValueError(
                "coarse-to-fine prediction needs a tree Ψ (every class in exactly one group per upper "
                "level, nested levels), but Ψ is dense (e.g. adapted without the non-overlapping "
                "constraint, or a confusion hierarchy); use beam=None"
            )
        return _coarse_to_fine(self, x, k, beam, structure.search(), theta.to(acc))


# ---------------------------------------------------------------------------
# Coarse-to-fine search
# ---------------------------------------------------------------------------


def _gathered_scores(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """``scores[b, j] = x[b] · weight[rows[b, j]] + bias[rows[b, j]]`` (rows ``-1`` → ``-inf``)."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach().to(x.dtype)
    return lmm_gather_scores(x, weight.to(x.dtype), bias, rows)


def _keep(scores: Tensor, beam: int) -> tuple[Tensor, Tensor]:
    """The ``beam`` best entries per row (fewer if the row has fewer)."""
    kept = min(beam, scores.shape[1])
    return torch.topk(scores, kept, dim=1)


def _expand(table: Tensor, kept: Tensor) -> Tensor:
    """Rows of ``table`` for the kept ids ``[B, b]`` (-1: an empty slot, the pad row) → ``[B, b * width]``."""
    pad_row = table.shape[0] - 1
    return table[torch.where(kept >= 0, kept, pad_row)].reshape(kept.shape[0], -1)


def _level_weight(theta: Tensor, level: int) -> Tensor:
    """θ_l as a scalar, or ``[B, 1]`` for a per-row θ."""
    return theta[:, level : level + 1] if theta.dim() == 2 else theta[level]


def _coarse_to_fine(head: LMMHead, x: Tensor, k: int, beam: int, search: SearchTables, theta: Tensor):
    acc = theta.dtype
    weight = head.linear.weight
    bias = head.linear.bias
    offsets = head.offsets
    sizes = head.level_sizes
    upper = len(sizes) - 1
    batch = x.shape[0]
    if batch == 0:  # nothing to search (and [0, -1] reshapes below are ambiguous)
        return x.new_zeros(0, k, dtype=acc), torch.zeros(0, k, dtype=torch.int64, device=x.device)

    # Level 1: every group.
    top = x @ weight[: sizes[0]].t()
    if bias is not None:
        top = top + bias[: sizes[0]]
    log_z = torch.log_softmax(top.to(acc), dim=1)
    path, kept = _keep(log_z, beam)  # [B, b]
    ancestors = (_level_weight(theta, 0) * path.exp()).unsqueeze(2)  # θ_l ẑ^l of each kept node's ancestors, [B, b, levels]

    for level in range(1, upper):
        table = search.children[level - 1]  # [N_{l-1}, C]
        cand = _expand(table, kept)  # [B, b*C] groups of this level
        slot = torch.arange(kept.shape[1], device=x.device).repeat_interleave(table.shape[1]).expand(batch, -1)
        rows = torch.where(cand >= 0, cand + offsets[level], cand)
        scores = _gathered_scores(x, weight, bias, rows).to(acc)
        log_z = torch.log_softmax(scores, dim=1)
        total = path.gather(1, slot) + log_z
        path, pick = _keep(total, beam)
        parent_slot = slot.gather(1, pick)
        kept = cand.gather(1, pick)
        mass = _level_weight(theta, level) * log_z.gather(1, pick).exp()
        ancestors = torch.cat(
            [ancestors.gather(1, parent_slot.unsqueeze(2).expand(-1, -1, ancestors.shape[2])), mass.unsqueeze(2)], dim=2
        )

    # Bottom: the classes of the kept groups of the last upper level.
    table = search.members
    cand = _expand(table, kept)  # [B, b*M] classes
    slot = torch.arange(kept.shape[1], device=x.device).repeat_interleave(table.shape[1]).expand(batch, -1)
    valid = cand >= 0
    rows = torch.where(valid, cand + offsets[upper], cand)
    scores = _gathered_scores(x, weight, bias, rows).to(acc)
    proba = _level_weight(theta, upper) * torch.softmax(scores, dim=1)
    safe = cand.clamp_min(0)
    for level in range(upper):
        proba = proba + ancestors[:, :, level].gather(1, slot) * search.value[level].to(acc)[safe]
    proba = proba.masked_fill(~valid, float("-inf"))
    width = min(k, proba.shape[1])
    values, pick = torch.topk(proba, width, dim=1)
    indices = cand.gather(1, pick)
    missing = torch.isinf(values)
    values = values.masked_fill(missing, 0.0)
    indices = indices.masked_fill(missing, -1)
    if width < k:
        values = torch.cat([values, values.new_zeros(batch, k - width)], dim=1)
        indices = torch.cat([indices, indices.new_full((batch, k - width), -1)], dim=1)
    return values, indices
