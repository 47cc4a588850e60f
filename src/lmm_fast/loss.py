"""``FusedLMMLoss``: the level-wise mixture loss as a drop-in for
``nn.CrossEntropyLoss``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from lmm_fast.ops import accumulate_dtype
from lmm_fast.ops import loss as loss_ops

if TYPE_CHECKING:  # pragma: no cover
    from lmm_fast.hierarchy import Hierarchy

__all__ = ["FusedLMMLoss", "default_theta", "check_psi", "check_theta", "check_row_theta", "check_label_smoothing",
           "check_class_weight"]

_REDUCTIONS = ("none", "mean", "sum")


def default_theta(num_levels: int, bottom: float = 0.9) -> Tensor:
    """θ with weight ``bottom`` on the class level and the rest shared equally
    by the upper levels. Bottom-heavy, because the bottom level is the only
    one that separates the classes of a group; ``θ = (0, …, 0, 1)`` is the
    flat softmax."""
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    if num_levels == 1:
        return torch.ones(1)
    upper = (1.0 - bottom) / (num_levels - 1)
    return torch.tensor([upper] * (num_levels - 1) + [bottom])


def check_psi(psi: Sequence[Tensor], num_classes: int | None = None, atol: float = 1e-4) -> list[Tensor]:
    """Validate Ψ (one ``[N_l, N]`` matrix per upper level, rows on the simplex).

    Returns the matrices as float tensors; raises ``ValueError``/``TypeError``
    naming the level and the problem.
    """
    if isinstance(psi, Tensor):
        raise TypeError("psi must be a list of [N_l, N] tensors, one per upper level, not a single tensor")
    out = []
    for level, p in enumerate(psi):
        p = torch.as_tensor(p)
        if not (p.is_floating_point()):
            p = p.to(torch.float32)
        if p.dim() != 2:
            raise ValueError(f"psi[{level}] must be 2-D [N_l, N], got shape {tuple(p.shape)}")
        if p.shape[0] < 1:
            raise ValueError(f"psi[{level}] must have at least one group (row), got shape {tuple(p.shape)}")
        if num_classes is None:
            num_classes = p.shape[1]
        if p.shape[1] != num_classes:
            raise ValueError(
                f"psi[{level}] has {p.shape[1]} columns but there are {num_classes} classes "
                f"(every Ψ^l is [N_l, N])"
            )
        if not torch.isfinite(p).all():
            raise ValueError(f"psi[{level}] contains NaN or infinite entries")
        if (p < 0).any():
            raise ValueError(f"psi[{level}] has negative entries: Ψ^l[t, y] = P(y | t) must be >= 0")
        sums = p.sum(dim=1, dtype=torch.float64)
        bad = (sums - 1).abs() > atol
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"psi[{level}] row {row} sums to {float(sums[row]):.6g}, not 1: every row of Ψ^l "
                f"is a distribution over classes ({int(bad.sum())} bad rows in all)"
            )
        out.append(p)
    return out


def check_theta(theta: Tensor | Sequence[float], num_levels: int, atol: float = 1e-5) -> Tensor:
    """Validate θ (``num_levels`` non-negative weights summing to one)."""
    theta = torch.as_tensor(theta, dtype=torch.float64).detach()
    if theta.dim() != 1 or theta.numel() != num_levels:
        raise ValueError(
            f"theta must have one weight per level ({num_levels}: the upper levels and the bottom), "
            f"got shape {tuple(theta.shape)}"
        )
    if not torch.isfinite(theta).all() or (theta < 0).any():
        raise ValueError(f"theta must be finite and non-negative, got {theta.tolist()}")
    total = float(theta.sum())
    if abs(total - 1.0) > atol * max(1, num_levels):
        raise ValueError(f"theta must lie on the simplex (sum to 1), got sum {total:.8g}: {theta.tolist()}")
    return theta / total


def check_label_smoothing(label_smoothing: float) -> float:
    """Validate ``label_smoothing`` (a float in ``[0, 1]``)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def check_class_weight(weight: Tensor | Sequence[float] | None, num_classes: int) -> Tensor | None:
    """Validate per-class weights (``None``, or ``[N]`` finite floats)."""
    if weight is None:
        return None
    weight = torch.as_tensor(weight).detach()
    if not weight.is_floating_point():
        weight = weight.to(torch.float32)
    if weight.shape != (num_classes,):
        raise ValueError(f"weight must be [N] = [{num_classes}] (one weight per class), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or infinite entries")
    return weight


def check_row_theta(theta: Tensor, num_levels: int, batch: int | None = None, atol: float = 1e-4) -> Tensor:
    """Validate a θ override of the loss or of prediction: ``[L]``, or ``[B, L]``
    (one θ per row), floating point, every row finite, non-negative and
    summing to 1 (within ``atol``). Returns ``theta`` unchanged.

    The values are not read while ``torch.compile`` traces, nor for a θ on
    the meta device, which holds none.
    """
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise TypeError(
            f"theta must be a floating-point tensor [L] or [B, L], got "
            f"{theta.dtype if isinstance(theta, Tensor) else type(theta).__name__}"
        )
    rows = "B" if batch is None else str(batch)
    if theta.dim() not in (1, 2) or theta.shape[-1] != num_levels or (
        theta.dim() == 2 and batch is not None and theta.shape[0] != batch
    ):
        raise ValueError(
            f"theta must be [{num_levels}] or [B, {num_levels}] = [{rows}, {num_levels}], "
            f"got shape {tuple(theta.shape)}"
        )
    if torch.compiler.is_compiling() or theta.device.type == "meta" or theta.numel() == 0:
        return theta
    with torch.no_grad():
        t = theta.detach().reshape(-1, num_levels).double()
        good = torch.isfinite(t).all(1) & (t >= 0).all(1) & ((t.sum(1) - 1).abs() <= atol)
        if not bool(good.all()):
            row = int((~good).nonzero()[0, 0])
            where = "" if theta.dim() == 1 else f" (row {row} of {theta.shape[0]})"
            raise ValueError(
                f"theta must lie on the simplex (finite, non-negative, summing to 1) in every row; "
                f"got {t[row].tolist()}{where}"
            )
    return theta


class FusedLMMLoss(nn.Module):
    r"""Level-wise mixture loss over a class hierarchy, a drop-in for
    ``nn.CrossEntropyLoss``.

    For each row, level ``l`` contributes the vote
    ``m^l_y = Σ_t softmax(a^l)_t Ψ^l[t, y]``; the class probability is
    ``z_y = Σ_l θ_l m^l_y`` and the loss ``−log z_y``. Forward and backward run
    in fused C++/CUDA kernels that never build a ``[B, N]`` tensor besides the
    gradient of the logits.

    Args:
        psi: one ``[N_l, N]`` matrix per upper level (top first), rows on the
            simplex; the bottom level's Ψ is the identity and is not given.
        theta: ``L = len(psi) + 1`` level weights on the simplex, top first
            (``None``: :func:`default_theta`).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``, as ``nn.CrossEntropyLoss``.
        ignore_index: target value whose rows are skipped (and left out of the mean).
        learn_theta: make θ a learned parameter, kept on the simplex by a
            softmax parametrisation (zero weights start at 1e-12).
        num_classes: ``N``; needed only when ``psi`` is empty (flat softmax).
        weight: ``[N]`` class weights, as ``nn.CrossEntropyLoss``'s: row ``b``
            weighs ``weight[target[b]]``, and ``"mean"`` divides by the sum of
            the weights of the rows not ignored. A buffer (moved by ``.to()``).
        label_smoothing: ``ε ∈ [0, 1]``, as ``nn.CrossEntropyLoss``'s, for the
            mixture: the row's loss is ``(1−ε)·w_y·(−log z_y) +
            (ε/N)·Σ_c w_c·(−log z_c)`` with ``z_c = Σ_l θ_l m^l_c``. Fused: the
            kernels visit every class of a row (``O(N·ΣN_upper)`` per row, no
            ``[B, N]`` temporary); ``ε = 0`` costs nothing.
        grad_cache: keep the storage of the last CPU gradient of the logits
            and reuse it in the next backward once that gradient is freed
            (a fresh allocation that large costs more in page faults than the
            fused backward; a gradient still referenced is never written).
            Holds one gradient, ``B × ΣN_l`` elements of the logits' dtype
            (158 MiB at B = 4096, ΣN_l = 10 110, float32) from the first
            backward until the module is deleted, :meth:`release_grad_cache`
            is called or ``grad_cache`` is set to False. No effect on CUDA
            (the caching allocator does the same there).

    Shapes:
        logits: ``[B, N_1 + … + N_{L-1} + N]`` packed (top level first), or a
        list of ``[B, N_l]``; target: ``[B]`` integer classes; output: scalar,
        or ``[B]`` for ``reduction="none"``. Probability targets ``[B, N]``
        are refused (they need the whole ``[B, N]`` mixture): use
        ``label_smoothing``, or for arbitrary soft targets
        ``-(target * predict_proba_reference(...).log()).sum(1)`` from
        :mod:`lmm_fast.reference.loss`.
        Under ``torch.autocast`` the loss is computed and returned in float32,
        as ``F.cross_entropy``'s.

    Ψ, its factors and θ are held in float64 if Ψ or θ is given in float64,
    else in float32 (``.double()`` / ``.float()`` convert them later); a loss
    of float64 logits is computed in float64 throughout.

    Ψ is held class-major in the buffer ``psi_t`` ``[N, ΣN_upper]`` (the loss
    reads one column of every Ψ^l per row), times per-group factors in the
    buffer ``psi_scale`` ``[ΣN_upper]`` (all one unless the Gibbs adaptation
    keeps unnormalised counts there); :attr:`psi` returns the effective
    ``[N_l, N]`` matrices.
    """

    psi_t: Tensor

    def __init__(
        self,
        psi: Sequence[Tensor],
        theta: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        learn_theta: bool = False,
        *,
        num_classes: int | None = None,
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        grad_cache: bool = True,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        psi = check_psi(list(psi), num_classes)
        if num_classes is None:
            if not psi:
                raise ValueError("num_classes is required when psi is empty (a single, flat level)")
            num_classes = psi[0].shape[1]
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.level_sizes = [int(p.shape[0]) for p in psi] + [self.num_classes]
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.learn_theta = bool(learn_theta)
        if not isinstance(grad_cache, bool):
            raise TypeError(f"grad_cache must be True or False, got {grad_cache!r}")
        self._grad_storage = loss_ops.GradientStorage()
        self._grad_cache = grad_cache
        # Ψ, its factors and θ are held in float64 when Ψ or θ is given in
        # float64 (rounding them to float32 would cost a float64 loss its
        # precision for good), else in float32; .double() converts them later.
        wide = any(p.dtype == torch.float64 for p in psi) or (
            isinstance(theta, Tensor) and theta.dtype == torch.float64
        )
        dtype = torch.float64 if wide else torch.float32
        if psi:
            psi_t = torch.cat([p.to(dtype).t() for p in psi], dim=1).contiguous()
        else:
            psi_t = torch.zeros(self.num_classes, 0, dtype=dtype)
        self.register_buffer("psi_t", psi_t)
        # Per-group factors of Ψ: the effective Ψ^l[t, y] is
        # psi_t[y, off_l + t] * psi_scale[off_l + t]. All ones unless the
        # Gibbs adaptation keeps unnormalised counts in psi_t, so that a
        # group whose size changed is renormalised by writing one number.
        self.register_buffer("psi_scale", torch.ones(psi_t.shape[1], dtype=dtype))
        self._effective_key = None
        self._effective = None
        theta = default_theta(self.num_levels) if theta is None else theta
        theta = check_theta(theta, self.num_levels).to(dtype)
        if self.learn_theta:
            self.theta_logits = nn.Parameter(theta.clamp_min(1e-12).log())
        else:
            self.register_buffer("theta_fixed", theta)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.register_buffer("weight", check_class_weight(weight, self.num_classes))

    # ------------------------------------------------------------------ state
    @property
    def grad_cache(self) -> bool:
        """Whether the CPU backward keeps and reuses its gradient's storage
        (see the constructor); setting it to False releases what is held."""
        return self._grad_cache

    @grad_cache.setter
    def grad_cache(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"grad_cache must be True or False, got {value!r}")
        self._grad_cache = value
        if not value:
            self._grad_storage.release()

    @property
    def grad_cache_nbytes(self) -> int:
        """Bytes of gradient storage held for reuse now (0 when nothing is)."""
        return self._grad_storage.nbytes

    def release_grad_cache(self) -> None:
        """Drop the kept gradient storage (freed once no gradient shares it)."""
        self._grad_storage.release()

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def upper_sizes(self) -> list[int]:
        return self.level_sizes[:-1]

    @property
    def psi(self) -> list[Tensor]:
        """Current Ψ per upper level, ``[N_l, N]`` each (read-only: replace Ψ
        with :meth:`set_psi`)."""
        effective = self.effective_psi_t()
        views, offset = [], 0
        for size in self.upper_sizes:
            views.append(effective[:, offset : offset + size].t())
            offset += size
        return views

    def effective_psi_t(self) -> Tensor:
        """Class-major Ψ ``[N, ΣN_upper]`` with the per-group factors
        ``psi_scale`` applied: ``psi_t`` itself while they are all one, else a
        product cached until either buffer changes (under ``torch.compile`` /
        ``torch.export``, where neither can be inspected, always the product)."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.psi_t * self.psi_scale
        key = self._psi_source_key()
        if key != self._effective_key:
            with torch.no_grad():
                unit = bool((self.psi_scale == 1).all())
                self._effective = self.psi_t if unit else self.psi_t * self.psi_scale
            self._effective_key = key
        return self._effective

    def _psi_source_key(self) -> tuple:
        """Identity and version of Ψ's buffers: changes whenever Ψ may have."""
        return (
            self.psi_t._version, self.psi_scale._version, self.psi_t.data_ptr(),
            self.psi_scale.data_ptr(), self.psi_t.device, self.psi_t.dtype, tuple(self.psi_t.shape),
        )

    # ------------------------------------------------------------ inference
    def prepare_for_inference(self) -> "FusedLMMLoss":
        """Works out, eagerly, how prediction reads the current Ψ (tree or
        dense, the class → group map, the coarse-to-fine tables) and keeps it
        in the submodule ``prediction`` (non-persistent buffers: moved by
        ``.to()``, not in ``state_dict``). Returns ``self``.

        Needed before ``torch.compile``, ``torch.export`` or ONNX export of
        prediction, which cannot inspect Ψ's values; traced prediction uses
        the structure as of this call, so call it again after Ψ changes
        (adaptation steps, :meth:`set_psi`, ``load_state_dict``). Eager
        prediction refreshes it by itself whenever Ψ was written since.
        """
        self._refresh_prediction(search=True)
        return self

    def prediction_structure(self):
        """The :class:`~lmm_fast.predict.PredictionStructure` prediction reads:
        refreshed first if Ψ changed since it was made (eagerly), or as
        prepared (under tracing, where an unprepared loss raises)."""
        from lmm_fast.predict import NOT_PREPARED, is_tracing

        current = getattr(self, "prediction", None)
        if is_tracing():
            if current is None:
                raise RuntimeError(NOT_PREPARED.format(owner="FusedLMMLoss", call="loss_fn.prepare_for_inference()"))
            return current
        if current is None or current.source != self._psi_source_key():
            self._refresh_prediction(search=False)
        return self.prediction

    @torch.no_grad()
    def _refresh_prediction(self, search: bool) -> None:
        from lmm_fast.predict import PredictionStructure

        key = self._psi_source_key()
        fresh = PredictionStructure.from_psi_t(self.effective_psi_t(), self.level_sizes, source=key)
        current = getattr(self, "prediction", None)
        # once prepared in full, an eager refresh keeps it so (coarse-to-fine
        # tables included), ready for traced prediction
        if search or (current is not None and current.search_ready):
            fresh.prepare_search()
        if current is None:
            self.prediction = fresh
        else:
            current.update_(fresh)

    @property
    def theta(self) -> Tensor:
        """Current θ ``[L]`` (differentiable when ``learn_theta``)."""
        if self.learn_theta:
            return torch.softmax(self.theta_logits, dim=0)
        return self.theta_fixed

    @torch.no_grad()
    def set_psi(self, psi: Sequence[Tensor]) -> None:
        """Replace Ψ (validated, same shapes) in place."""
        psi = check_psi(list(psi), self.num_classes)
        if [p.shape[0] for p in psi] != self.upper_sizes:
            raise ValueError(
                f"psi must keep the level sizes {self.upper_sizes}, got {[p.shape[0] for p in psi]}"
            )
        offset = 0
        for p in psi:
            self.psi_t[:, offset : offset + p.shape[0]].copy_(p.t())
            offset += p.shape[0]
        self.psi_scale.fill_(1.0)

    @torch.no_grad()
    def set_theta(self, theta: Tensor | Sequence[float]) -> None:
        """Replace θ (validated) in place."""
        theta = check_theta(theta, self.num_levels)
        if self.learn_theta:
            self.theta_logits.copy_(theta.clamp_min(1e-12).log())
        else:
            self.theta_fixed.copy_(theta)

    def validate(self) -> None:
        """Re-check Ψ (e.g. after writing into :attr:`psi` by hand)."""
        check_psi(self.psi, self.num_classes)

    @classmethod
    def from_hierarchy(
        cls, hierarchy: "Hierarchy", theta: Tensor | Sequence[float] | None = None, **kwargs: Any
    ) -> "FusedLMMLoss":
        """Loss over ``hierarchy`` with its initial Ψ (``Ψ[t, y] = 1/C_t``) and θ
        (``None``: :func:`default_theta`)."""
        return cls(hierarchy.psi(), theta, num_classes=hierarchy.num_classes, **kwargs)

    # -------------------------------------------------------------- compute
    def pack(self, logits: Tensor | Sequence[Tensor]) -> Tensor:
        """Check ``logits`` and return them packed ``[B, ΣN_l]``."""
        if isinstance(logits, (list, tuple)):
            if len(logits) != self.num_levels:
                raise ValueError(f"logits: expected {self.num_levels} per-level tensors, got {len(logits)}")
            for level, (a, n) in enumerate(zip(logits, self.level_sizes)):
                if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[1] != n:
                    shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                    raise ValueError(f"logits[{level}] must be [B, {n}], got {shape}")
                if a.shape[0] != logits[0].shape[0]:
                    raise ValueError(f"logits[{level}] has {a.shape[0]} rows, logits[0] has {logits[0].shape[0]}")
            return torch.cat(list(logits), dim=1)
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a tensor or a list of tensors, got {type(logits).__name__}")
        width = sum(self.level_sizes)
        if logits.dim() != 2 or logits.shape[1] != width:
            raise ValueError(
                f"logits must be [B, {width}] (levels {self.level_sizes} packed, top first), "
                f"got shape {tuple(logits.shape)}"
            )
        return logits

    def _row_theta(self, theta: Tensor, device: torch.device, batch: int) -> Tensor:
        theta = check_row_theta(theta, self.num_levels, batch)
        if theta.device.type == "meta" and device.type != "meta":
            raise ValueError(
                f"theta is on the meta device (it holds no values) but the logits are on {device}"
            )
        return theta

    def _operands(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if logits.device != self.psi_t.device:
            raise ValueError(
                f"logits are on {logits.device} but the loss's Ψ is on {self.psi_t.device}; "
                f"move the loss with .to({str(logits.device)!r})"
            )
        acc = accumulate_dtype(logits.dtype)
        return self.psi_t.to(acc), self.theta.to(acc)

    def _psi_scale(self, logits: Tensor) -> Tensor:
        return self.psi_scale.to(accumulate_dtype(logits.dtype))

    def _target(self, target: Tensor, batch: int) -> Tensor:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a tensor of class indices, got {type(target).__name__}")
        if target.is_floating_point() and target.dim() == 2:
            raise ValueError(
                f"target must be [B] class indices; probability targets {tuple(target.shape)} are not "
                f"supported (they would need the whole [B, N] mixture). For smoothed one-hot targets pass "
                f"label_smoothing=ε; for arbitrary soft targets compute "
                f"-(target * lmm_fast.reference.loss.predict_proba_reference(logits, psi, theta).log()).sum(1)"
            )
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        if target.dim() != 1 or target.shape[0] != batch:
            raise ValueError(f"target must be [B] = [{batch}], got shape {tuple(target.shape)}")
        if target.device != self.psi_t.device:
            raise ValueError(f"target is on {target.device} but the logits and the loss are on {self.psi_t.device}")
        return target.long()

    def forward(
        self, logits: Tensor | Sequence[Tensor], target: Tensor, theta: Tensor | None = None
    ) -> Tensor:
        """Loss of ``logits`` (packed ``[B, ΣN_l]`` or a list) for ``target`` ``[B]``.

        ``theta`` overrides the module's θ for this call: ``[L]``, or ``[B, L]``
        for one θ per row (e.g. the softmax output of a gating network, which
        then receives the gradient).
        """
        logits = self.pack(logits)
        target = self._target(target, logits.shape[0])
        psi_t, module_theta = self._operands(logits)
        if theta is None:
            theta = module_theta
        else:
            theta = self._row_theta(theta, logits.device, logits.shape[0]).to(
                device=logits.device, dtype=module_theta.dtype
            )
        weight = None if self.weight is None else self.weight.to(module_theta.dtype)
        return loss_ops.lmm_loss(
            logits, target, psi_t, theta, self.level_sizes, self.ignore_index, self._psi_scale(logits),
            weight, self.label_smoothing, self.reduction,
            grad_storage=self._grad_storage if self._grad_cache else None,
        )

    def predict_proba(self, logits: Tensor | Sequence[Tensor]) -> Tensor:
        """``[B, N]`` class probabilities ``Σ_l θ_l softmax(a^l) Ψ^l``; rows sum to 1.

        Under ``torch.compile`` / ``torch.export`` / ONNX export the loss must
        have been prepared (:meth:`prepare_for_inference`, or any eager
        prediction since Ψ last changed)."""
        # Fused kernels (lmm_fast.predict): a gather through the class -> group
        # map when Ψ is a tree (detected once, kept in self.prediction until
        # psi_t changes), else one GEMM for all upper levels.
        # predict_proba_reference is the oracle of the tests.
        from lmm_fast.predict import prepared_proba

        logits = self.pack(logits)
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if logits.device != self.psi_t.device:
            raise ValueError(
                f"logits are on {logits.device} but Ψ is on {self.psi_t.device}; "
                f"move the loss (or head) with .to({str(logits.device)!r})"
            )
        structure = self.prediction_structure()
        dense = None if structure.kind == "tree" else self.effective_psi_t()
        return prepared_proba(logits, structure, self.theta.to(accumulate_dtype(logits.dtype)), dense)

    def extra_repr(self) -> str:
        with torch.no_grad():
            theta = ", ".join(f"{float(t):.4g}" for t in self.theta.detach().cpu())
        extra = f", label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        extra += ", weight=[N]" if self.weight is not None else ""
        return (
            f"level_sizes={self.level_sizes}, theta=[{theta}], reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, learn_theta={self.learn_theta}{extra}"
        )
