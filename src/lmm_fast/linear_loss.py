"""``FusedLinearLMMLoss``: the head's linear layer and the LMM loss in one op
that never holds the ``[B, ΣN_l]`` logits.

``LMMHead`` + ``FusedLMMLoss`` keep the logits and their gradient, ``2 · B ·
ΣN_l`` numbers (6.6 GB in float32 at B = 8192 and levels (100, 1000, 10^5)).
Here the rows go through in chunks: per chunk one GEMM makes its logits in a
``[chunk, ΣN_l]`` buffer, the fused loss kernels (``lmm_loss_forward``, then
``lmm_loss_backward``) read them and write their gradient to a second
chunk-sized buffer, and two GEMMs add that chunk's share to ``grad_x`` and
``grad_W``. With the ``"mean"``/``"sum"`` reductions the gradient is computed
during the forward (the logits are made once); ``"none"`` recomputes them in
the backward. Extra memory: the two chunk buffers, together sized by
``memory_budget``, plus ``O(B · L)`` statistics.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from lmm_fast.head import LMMHead
from lmm_fast.loss import _REDUCTIONS, FusedLMMLoss, check_label_smoothing
from lmm_fast.ops import accumulate_dtype
from lmm_fast.ops import linear_loss as linear_ops

if TYPE_CHECKING:  # pragma: no cover
    from lmm_fast.hierarchy import Hierarchy

__all__ = ["FusedLinearLMMLoss", "linear_lmm_loss", "chunk_rows_for_budget", "DEFAULT_MEMORY_BUDGET"]

# Bytes of the two chunk buffers (the chunk's logits and their gradient)
# when no budget is given, per device type. The chunk's GEMMs stream the whole
# weight once per chunk, so a chunk needs enough rows to be compute-bound:
# ~64-128 rows on a CPU (the measured GEMM rate is flat from there on), ~1000
# on a GPU. 16 MiB holds 62 rows of 33 824 float32 logits and their gradient
# (measured: as fast as the unfused head at 3 % of its memory; 32 MiB was
# 0.87x the time at 5.9 %); 512 MiB ~1000 rows of 132 172 bfloat16 logits and
# their gradient.
DEFAULT_MEMORY_BUDGET = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}
_FALLBACK_MEMORY_BUDGET = 128 * 2**20


def chunk_rows_for_budget(
    memory_budget: int | None, width: int, dtype: torch.dtype, device: torch.device | str
) -> int:
    """Most rows whose ``width`` logits of ``dtype`` and their gradient (the
    two chunk buffers) fit in ``memory_budget`` bytes (``None``:
    :data:`DEFAULT_MEMORY_BUDGET` of the device type).

    Raises:
        ValueError: if the budget is below one row of logits and its gradient.
    """
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET.get(torch.device(device).type, _FALLBACK_MEMORY_BUDGET)
    if not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    row_bytes = linear_ops.BUFFERS_PER_ROW * width * torch.empty((), dtype=dtype).element_size()
    if memory_budget < row_bytes:
        raise ValueError(
            f"memory_budget={memory_budget} bytes is smaller than one row of logits and its gradient: "
            f"2 x sum(level_sizes) = 2 x {width} {dtype} values take {row_bytes} bytes; give at least "
            f"{row_bytes} bytes (or chunk_rows=1)"
        )
    return memory_budget // row_bytes


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _max_rows(memory_budget, chunk_rows, width: int, x: Tensor) -> int:
    if chunk_rows is not None:
        if memory_budget is not None:
            raise ValueError("give memory_budget or chunk_rows, not both")
        return _check_positive_int(chunk_rows, "chunk_rows")
    return chunk_rows_for_budget(memory_budget, width, x.dtype, x.device)


def _check_linear(x: Tensor, weight: Tensor, bias: Tensor | None, width: int) -> None:
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("x and weight must be tensors")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, d] features, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if weight.dim() != 2 or weight.shape != (width, x.shape[1]):
        raise ValueError(
            f"weight must be [sum(level_sizes), d] = [{width}, {x.shape[1]}], got shape {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight is {weight.dtype} but x is {x.dtype}: they must have the same dtype")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (width,):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be [sum(level_sizes)] = [{width}] or None, got {shape}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")


def _requires_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


def linear_lmm_loss(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    level_sizes: Sequence[int],
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    psi_scale: Tensor | None = None,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    memory_budget: int | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """LMM loss of the logits ``x @ weightᵀ + bias`` without forming them.

    Args:
        x: ``[B, d]`` features (float32/64; float16/bfloat16 on CUDA).
        weight: ``[ΣN_l, d]``, the node classifiers of every level, top level
            first (``LMMHead.linear.weight``); bias: ``[ΣN_l]`` or None.
        target: ``[B]`` int64 classes in ``[0, N)`` or ``ignore_index``.
        psi_t: ``[N, Σ_upper N_l]`` class-major Ψ (``FusedLMMLoss.psi_t``).
        theta: ``[L]`` level weights on the simplex, or ``[B, L]`` per row.
        level_sizes: ``[N_1, …, N_{L-1}, N]``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        psi_scale: ``[Σ_upper N_l]`` per-group factors of Ψ, or None.
        class_weight: ``[N]`` class weights (``FusedLMMLoss``'s ``weight``,
            ``F.cross_entropy``'s), or None; ``"mean"`` then divides by
            ``Σ w_{y_b}`` over the rows not ignored.
        label_smoothing: ``ε ∈ [0, 1]``, as ``FusedLMMLoss``'s.
        memory_budget: bytes of the two chunk buffers, the logits and their
            gradient (None: by device, :data:`DEFAULT_MEMORY_BUDGET`);
            ``chunk_rows``: the chunk's rows instead (give one of the two).

    Returns:
        the loss: a scalar, or ``[B]`` for ``"none"``. Differentiable in
        ``x``, ``weight``, ``bias`` and ``theta``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    level_sizes = [int(s) for s in level_sizes]
    width = sum(level_sizes)
    _check_linear(x, weight, bias, width)
    max_rows = _max_rows(memory_budget, chunk_rows, width, x)
    levels = len(level_sizes)
    if not isinstance(theta, Tensor) or theta.shape not in ((levels,), (x.shape[0], levels)):
        shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"theta must be [{levels}] or [B, {levels}] = [{x.shape[0]}, {levels}], got {shape}")
    label_smoothing = check_label_smoothing(label_smoothing)
    acc = accumulate_dtype(x.dtype)
    psi_t = psi_t.to(acc)
    theta = theta.to(acc)
    psi_scale = None if psi_scale is None else psi_scale.to(acc)
    class_weight = None if class_weight is None else class_weight.to(acc)
    target = target.long() if isinstance(target, Tensor) else target
    ignore_index = int(ignore_index)
    mask = [_requires_grad(x), _requires_grad(weight), _requires_grad(bias), _requires_grad(theta)]
    if reduction in linear_ops.REDUCED and torch.is_grad_enabled() and any(mask):
        loss, *_ = linear_ops.linear_lmm_loss_reduced(
            x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, level_sizes,
            ignore_index, max_rows, reduction, mask,
        )
        return loss
    loss, _, _ = linear_ops.linear_lmm_loss_rows(
        x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, level_sizes,
        ignore_index, max_rows,
    )
    if reduction == "none":
        return loss
    total = loss.sum(dtype=acc)
    if reduction == "mean":
        total = total / linear_ops.mean_denominator(target, ignore_index, class_weight, acc)
    return total.to(loss.dtype)


class FusedLinearLMMLoss(nn.Module):
    r"""The linear head and the level-wise mixture loss fused: ``loss_fn(x, target)``
    takes features, never logits, and never holds the ``[B, ΣN_l]`` logits.

    The same model as ``LMMHead`` + ``FusedLMMLoss`` (same parameters, same
    loss and gradients); only the memory differs: one chunk of rows' logits
    and their gradient (at most ``memory_budget`` bytes together) instead of
    all of them.

    Args:
        in_features: ``d``.
        hierarchy: a :class:`~lmm_fast.Hierarchy` (level sizes, initial Ψ).
        theta: ``L`` level weights, top first (None:
            :func:`~lmm_fast.default_theta`).
        bias: learn a bias per node.
        reduction, ignore_index, learn_theta: as :class:`~lmm_fast.FusedLMMLoss`.
        class_weight: ``[N]`` class weights, ``FusedLMMLoss``'s ``weight``
            (held by :attr:`lmm_loss`; here ``weight`` is the head's).
        label_smoothing: ``ε ∈ [0, 1]``, as :class:`~lmm_fast.FusedLMMLoss`.
        memory_budget: bytes of the two chunk buffers, the chunk's logits and
            their gradient (None: per device type,
            :data:`DEFAULT_MEMORY_BUDGET`: 16 MiB on a CPU, 512 MiB on CUDA).
            A budget below one row of logits and its gradient raises
            ``ValueError``.
        chunk_rows: rows per chunk instead of a budget.
        init_std, device, dtype: of the head's parameters, as :class:`~lmm_fast.LMMHead`.

    Attributes:
        head: an :class:`~lmm_fast.LMMHead` holding the weight ``[ΣN_l, d]``
            and bias (this module's only parameters besides a learned θ), for
            prediction (``head.predict_topk(x, beam=…, loss_fn=lmm_loss)``),
            ``state_dict`` and the like.
        lmm_loss: the :class:`~lmm_fast.FusedLMMLoss` holding Ψ and θ; the
            Gibbs adapter adapts it: ``GibbsAdapter(loss_fn.lmm_loss, h, …)``.

    Shapes:
        ``x``: ``[B, d]``; ``target``: ``[B]``; output: scalar, or ``[B]`` for
        ``reduction="none"``.

    Memory beyond the features, the weight and their gradients: the two chunk
    buffers, ``O(B · L)`` statistics and, for float16/bfloat16 weights, the
    float32 accumulator of ``grad_W`` (held during the forward, then cast to
    the weight's dtype).

    Gibbs adaptation reads only the upper levels' logits of the batch
    (``GibbsAdapter.step`` accepts ``[B, Σ_upper N_l]``); :meth:`upper_logits`
    computes just those, ``(Σ_upper N_l) / ΣN_l`` of the head's GEMM::

        loss = loss_fn(x, target)
        adapter.step(loss_fn.upper_logits(x), target, indices)
    """

    def __init__(
        self,
        in_features: int,
        hierarchy: "Hierarchy",
        theta: Tensor | Sequence[float] | None = None,
        bias: bool = True,
        reduction: str = "mean",
        ignore_index: int = -100,
        learn_theta: bool = False,
        *,
        class_weight: Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        memory_budget: int | None = None,
        chunk_rows: int | None = None,
        init_std: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        head = LMMHead(in_features, hierarchy, bias=bias, init_std=init_std, device=device, dtype=dtype)
        super().__init__()
        self._setup(head, theta, reduction, ignore_index, learn_theta, class_weight, label_smoothing,
                    memory_budget, chunk_rows)
        if device is not None:
            self.lmm_loss.to(device)

    def _setup(
        self, head, theta, reduction, ignore_index, learn_theta, class_weight, label_smoothing, memory_budget,
        chunk_rows,
    ) -> None:
        if memory_budget is not None and chunk_rows is not None:
            raise ValueError("give memory_budget or chunk_rows, not both")
        if memory_budget is not None:
            _check_positive_int(memory_budget, "memory_budget")
        if chunk_rows is not None:
            _check_positive_int(chunk_rows, "chunk_rows")
        self.head = head
        self.lmm_loss = FusedLMMLoss.from_hierarchy(
            head.hierarchy, theta, reduction=reduction, ignore_index=ignore_index, learn_theta=learn_theta,
            weight=class_weight, label_smoothing=label_smoothing,
        )
        self.memory_budget = memory_budget
        self.chunk_rows = chunk_rows

    @classmethod
    def from_head(
        cls,
        head: LMMHead,
        theta: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        learn_theta: bool = False,
        *,
        class_weight: Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        memory_budget: int | None = None,
        chunk_rows: int | None = None,
    ) -> "FusedLinearLMMLoss":
        """A fused loss over an existing head (its parameters are shared, not
        copied), e.g. ``from_head(LMMHead.from_flat(linear, h))``; Ψ and θ
        start from the head's hierarchy."""
        if not isinstance(head, LMMHead):
            raise TypeError(f"head must be an LMMHead, got {type(head).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(head, theta, reduction, ignore_index, learn_theta, class_weight, label_smoothing,
                    memory_budget, chunk_rows)
        self.lmm_loss.to(head.linear.weight.device)
        return self

    @classmethod
    def from_flat(cls, linear: nn.Linear, hierarchy: "Hierarchy", **kwargs) -> "FusedLinearLMMLoss":
        """Start from a trained flat ``nn.Linear(d, N)`` (see :meth:`LMMHead.from_flat`)."""
        return cls.from_head(LMMHead.from_flat(linear, hierarchy), **kwargs)

    # ------------------------------------------------------------------ state
    @property
    def level_sizes(self) -> list[int]:
        return self.head.level_sizes

    @property
    def weight(self) -> Tensor:
        return self.head.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.head.linear.bias

    @property
    def reduction(self) -> str:
        return self.lmm_loss.reduction

    @property
    def ignore_index(self) -> int:
        return self.lmm_loss.ignore_index

    @property
    def theta(self) -> Tensor:
        return self.lmm_loss.theta

    @property
    def class_weight(self) -> Tensor | None:
        return self.lmm_loss.weight

    @property
    def label_smoothing(self) -> float:
        return self.lmm_loss.label_smoothing

    # -------------------------------------------------------------- compute
    def forward(self, x: Tensor, target: Tensor, theta: Tensor | None = None) -> Tensor:
        """Loss of features ``x`` ``[B, d]`` for ``target`` ``[B]``; ``theta``
        (``[L]`` or ``[B, L]``) overrides the module's θ, as in
        :meth:`FusedLMMLoss.forward`."""
        x = self.head._features(x)
        loss = self.lmm_loss
        if x.device != loss.psi_t.device:
            raise ValueError(
                f"x is on {x.device} but the loss's Ψ is on {loss.psi_t.device}; "
                f"move the loss with .to({str(x.device)!r})"
            )
        target = loss._target(target, x.shape[0])
        psi_t, module_theta = loss._operands(x)
        if theta is None:
            theta = module_theta
        else:
            theta = loss._row_theta(theta, x.device, x.shape[0]).to(device=x.device, dtype=module_theta.dtype)
        class_weight = None if loss.weight is None else loss.weight.to(module_theta.dtype)
        return linear_lmm_loss(
            x, self.weight, self.bias, target, psi_t, theta, self.level_sizes,
            ignore_index=loss.ignore_index, reduction=loss.reduction, psi_scale=loss._psi_scale(x),
            class_weight=class_weight, label_smoothing=loss.label_smoothing,
            memory_budget=self.memory_budget, chunk_rows=self.chunk_rows,
        )

    @torch.no_grad()
    def upper_logits(self, x: Tensor) -> Tensor:
        """The upper levels' logits ``[B, Σ_upper N_l]`` of features ``x``
        (packed top first, detached): all that ``GibbsAdapter.step`` reads."""
        x = self.head._features(x)
        upper = sum(self.level_sizes[:-1])
        weight = self.weight[:upper]
        if self.bias is None:
            return x @ weight.t()
        return torch.addmm(self.bias[:upper], x, weight.t())

    def predict_proba(self, x: Tensor, *, theta: Tensor | None = None) -> Tensor:
        """``[B, N]`` class probabilities with this loss's Ψ and θ (``head.predict_proba``)."""
        return self.head.predict_proba(x, self.lmm_loss, theta=theta)

    def predict_topk(self, x: Tensor, k: int = 5, beam: int | None = None, *, theta: Tensor | None = None):
        """The ``k`` most probable classes, full or coarse to fine (``head.predict_topk``)."""
        return self.head.predict_topk(x, k, beam, loss_fn=self.lmm_loss, theta=theta)

    def extra_repr(self) -> str:
        if self.chunk_rows is not None:
            return f"chunk_rows={self.chunk_rows}"
        return f"memory_budget={self.memory_budget}"
