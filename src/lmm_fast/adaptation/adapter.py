"""Bayesian adaptation of the group-object matrix Ψ by collapsed Gibbs sampling
(paper Section IV, Eq. 4-6, and Algorithm 1).

Every training image ``i`` carries, per upper level, a latent group label
``t_i``; the counts ``Ω^l[t, y]`` (images of class ``y`` labelled ``t``) and
``n_t = Σ_y Ω^l[t, y]`` summarise them. :class:`GibbsAdapter` re-samples the
labels of each mini-batch from

    P(t_i = t | rest) ∝ (Ω^{¬i}[t, y_i] + β_{y_i}) / (n^{¬i}_t + β_0) · softmax(a^l(x_i))_t

updates Ω, and rewrites Ψ^l[t, y] = (Ω[t, y] + β_y) / (n_t + β_0) (Eq. 6) inside
the :class:`~lmm_fast.FusedLMMLoss` it adapts, so the next loss evaluation
sees the new Ψ. See docs/adaptation.md for the design and its measurements.

Storage mirrors the loss: Ω is held once, class-major, as ``counts_t``
``[N, Σ_upper N_l]`` int32, so that the sampler reads the column ``Ω^l[:, y]``
of an image's class contiguously; :attr:`GibbsAdapter.counts` gives
``[N_l, N]`` views.
"""
from __future__ import annotations

import functools
import itertools
import numbers
import operator
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from lmm_fast.ops import gibbs as gibbs_ops

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from lmm_fast.hierarchy import Hierarchy
    from lmm_fast.loss import FusedLMMLoss

__all__ = ["GibbsAdapter", "PRIORS", "run_eagerly"]

PRIORS = ("per_class", "total")
_STATE_VERSION = 1
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_INT64 = 2**63


def _state_int(value: Any, name: str, low: int) -> int:
    """An int of a saved state (Python or numpy integer, not bool) in ``[low, 2^63)``,
    the range of the kernels' int64 arguments."""
    if isinstance(value, bool):
        raise TypeError(f"state {name} must be an int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"state {name} must be an int, got {type(value).__name__} {value!r}") from None
    if not low <= value < _INT64:
        raise ValueError(f"state {name} = {value} is outside [{low}, 2^63)")
    return value


def run_eagerly(fn: Callable) -> Callable:
    """Keeps ``fn`` out of ``torch.compile`` graphs: called from compiled code
    it is one graph break and runs eagerly (``torch.compiler.disable``).

    Unlike decorating with ``torch.compiler.disable`` directly, this does not
    import ``torch._dynamo`` (seconds) when lmm_fast is imported or ``fn`` is
    called eagerly; only compiled code, which has loaded it, reaches it."""

    @functools.wraps(fn)
    def eager_only(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return eager_only


def _as_index_tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor of integer indices, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
    return value.long()


class GibbsAdapter:
    r"""Collapsed Gibbs adaptation of Ψ for a :class:`~lmm_fast.FusedLMMLoss`.

    Args:
        loss_fn: the loss whose Ψ is adapted (its ``psi_t`` buffer is
            rewritten in place; the adapter works on the loss's device).
        h: the hierarchy the loss was built from: anything with
            ``num_classes``, ``level_sizes`` (upper levels, top first) and
            ``assignments`` (one long ``[N]`` tensor per upper level: the group
            of each class; for a dense hierarchy its argmax group), e.g. a
            :class:`lmm_fast.Hierarchy`. Each image's labels start at its
            class's groups.
        train_targets: long ``[Ξ]``, the class of every training image (the
            dataset index of an image is its position here).
        beta: the Dirichlet prior, a positive float or a positive ``[N]``
            tensor.
        non_overlapping: apply the non-overlapping constraint ("TC" in the
            paper's Table I) when forming Ψ from the counts: each class is kept
            only in its best group ``argmax_t Ψ[t, y]`` (lowest ``t`` on ties)
            and every group's row is renormalised over the classes it keeps,
            ``Ψ[t, y] = (Ω[t, y] + β_y) / Σ_{y' kept in t} (Ω[t, y'] + β_{y'})``.
            A group that keeps no class at all keeps its unconstrained Eq. 6
            row ``(Ω[t, :] + β) / (n_t + β_0)`` (a distribution over the classes
            whose images still carry its label, smoothed by β), so every row of
            Ψ stays a distribution and ``P(y | x)`` stays normalised.
        seed: key of the counter-based random stream (Philox4x32-10); with the
            step counter, the image index and the level it fixes every draw.
        prior: ``"per_class"`` (the paper): ``β_y = beta`` and
            ``β_0 = Σ_y β_y``, so a constant β gives ``β_0 = N β``, which for
            large N outweighs the images of a small class; ``"total"``:
            ``β_y = beta / N``, so that a constant ``beta`` is the total
            pseudo-count ``β_0`` of each group's prior.
        distributed: under ``torch.distributed`` (``None``: whenever it is
            initialised with more than one process) every rank samples the
            images of its own batch and the changes are gathered and applied
            on every rank, so all ranks hold identical labels, Ω and Ψ after
            every step. Every rank must call :meth:`step` the same number of
            times (an empty batch is fine).
        process_group: the group for the collectives (default: the world).

    Shapes:
        :attr:`counts`: ``[N_l, N]`` int32 per upper level; :attr:`labels`:
        ``[Ξ, L-1]`` int64; :meth:`step` takes packed logits ``[B, ΣN_l]`` (or
        the per-level list, or just the upper levels ``[B, Σ_upper N_l]``),
        ``target`` ``[B]`` and ``indices`` ``[B]``.

    Until the first :meth:`step` (or :meth:`refresh_psi`) the loss keeps the
    Ψ it was built with (the warm-up epochs of Algorithm 1 use the
    pre-trained hierarchy); the first step rewrites all of Ψ from the counts,
    every later step only the groups whose counts changed.
    """

    def __init__(
        self,
        loss_fn: FusedLMMLoss,
        h: Hierarchy,
        train_targets: Tensor,
        beta: float | Tensor = 1.0,
        non_overlapping: bool = False,
        seed: int = 0,
        *,
        prior: str = "per_class",
        distributed: bool | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        for attr in ("num_classes", "level_sizes", "assignments"):
            if not hasattr(h, attr):
                raise TypeError(f"h must be a hierarchy with num_classes, level_sizes and assignments; it has no {attr!r}")
        psi_t = getattr(loss_fn, "psi_t", None)
        if not isinstance(psi_t, Tensor):
            raise TypeError("loss_fn must be a FusedLMMLoss (it has no psi_t buffer)")
        self.loss_fn = loss_fn
        self.num_classes = int(h.num_classes)
        self.level_sizes = [int(k) for k in h.level_sizes]
        if not self.level_sizes:
            raise ValueError("h has no upper level: there is nothing to adapt")
        if list(loss_fn.upper_sizes) != self.level_sizes or int(loss_fn.num_classes) != self.num_classes:
            raise ValueError(
                f"loss_fn (upper levels {list(loss_fn.upper_sizes)}, {loss_fn.num_classes} classes) does not "
                f"match h (upper levels {self.level_sizes}, {self.num_classes} classes)"
            )
        if psi_t.dim() != 2 or not psi_t.is_contiguous():
            raise ValueError("loss_fn.psi_t must be a contiguous [N, sum(upper level sizes)] tensor")
        psi_scale = getattr(loss_fn, "psi_scale", None)
        if not isinstance(psi_scale, Tensor) or tuple(psi_scale.shape) != (psi_t.shape[1],):
            raise TypeError("loss_fn must be a FusedLMMLoss with a psi_scale buffer [sum(upper level sizes)]: "
                            "the adapter keeps Ψ factored as psi_t * psi_scale")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if distributed not in (None, True, False):
            raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
        self.non_overlapping = bool(non_overlapping)
        self.prior = prior
        self.seed = int(seed)
        self.step_count = 0
        self._distributed = distributed
        self._group = process_group
        device = psi_t.device
        self.offsets = [0] + list(itertools.accumulate(self.level_sizes[:-1]))
        self.upper_width = sum(self.level_sizes)

        n = self.num_classes
        targets = _as_index_tensor(train_targets, "train_targets").detach()
        if targets.numel() == 0:
            raise ValueError("train_targets is empty: there are no training images to adapt on")
        if targets.numel() >= 2**31 - 1:
            raise ValueError(f"at most 2^31 - 2 training images are supported, got {targets.numel()}")
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= n:
            bad = int(((targets < 0) | (targets >= n)).nonzero()[0, 0])
            raise ValueError(f"train_targets[{bad}] = {int(targets[bad])} is not a class in [0, {n})")
        self.train_targets = targets.to(device)
        self.beta, self.beta0 = self._make_beta(beta, n, device, prior)

        assignments = [_as_index_tensor(a, f"h.assignments[{l}]") for l, a in enumerate(h.assignments)]
        if len(assignments) != len(self.level_sizes):
            raise ValueError(f"h has {len(self.level_sizes)} upper levels but {len(assignments)} assignments")
        for l, (a, k) in enumerate(zip(assignments, self.level_sizes)):
            if a.numel() != n or int(a.min()) < 0 or int(a.max()) >= k:
                raise ValueError(f"h.assignments[{l}] must give every one of the {n} classes a group in [0, {k})")
        groups = torch.stack([a.to(device) for a in assignments], dim=1)  # [N, L-1]
        self._labels = groups[self.train_targets].contiguous()
        self._offsets_t = torch.tensor(self.offsets, dtype=torch.long, device=device)
        self.counts_t = torch.zeros(n, self.upper_width, dtype=torch.int32, device=device)
        self.group_totals = torch.zeros(self.upper_width, dtype=torch.int32, device=device)
        self._recount()
        self._psi_synced = False
        # Identity and version counters of the loss's psi_t / psi_scale after
        # the adapter's last write: anything else writing them (set_psi, a
        # loss load_state_dict, .to()) breaks the factored form the
        # incremental updates maintain, and the next step then rebuilds Ψ.
        self._psi_key: tuple | None = None
        # Owner state of the constraint, per upper level: owner [N] int64,
        # numerator [N] float64, kept [N_l] int64, the nonzero bitmap
        # [N_l, ceil(N/64)] int64 and bound [N] float64 (see gibbs_update_owners).
        self._owner: list[Tensor] | None = None
        self._numerator: list[Tensor] | None = None
        self._kept: list[Tensor] | None = None
        self._nonzero: list[Tensor] | None = None
        self._bound: list[Tensor] | None = None

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _make_beta(beta: float | Tensor, n: int, device, prior: str) -> tuple[Tensor, float]:
        """The ``[N]`` float32 β in use and β_0, checked once: every value must
        be positive and finite *as the float32 the kernels read* (1e-46 is 0
        there, 1e39 is inf) and β_0 must be a finite float32 too."""
        if isinstance(beta, Tensor):
            if beta.dim() == 0:
                beta = beta.item()
            else:
                if beta.dim() != 1 or beta.numel() != n:
                    raise ValueError(f"beta must be a float or an [N] = [{n}] tensor, got shape {tuple(beta.shape)}")
                if beta.dtype == torch.bool or beta.is_complex():
                    raise TypeError(f"beta must hold real numbers, got dtype {beta.dtype}")
                vector = beta.detach().to(device=device, dtype=torch.float32)
        if not isinstance(beta, Tensor):
            if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
                raise TypeError(f"beta must be a positive float or an [N] tensor, got {type(beta).__name__} {beta!r}")
            value = float(beta)
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"beta must be positive and finite, got {value}")
            vector = torch.full((n,), value, dtype=torch.float32, device=device)
        if prior == "total":
            vector = vector / n
        bad = ~torch.isfinite(vector) | (vector <= 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            shown = float(beta[i]) if isinstance(beta, Tensor) else float(beta)
            raise ValueError(
                f"beta must be positive and finite: beta[{i}] = {shown:g} is {float(vector[i]):g} as the "
                f"float32 the sampler uses (prior={prior!r}); float32 holds about 1.2e-38 to 3.4e38"
            )
        beta0 = float(vector.double().sum())
        if not beta0 <= _FLOAT32_MAX:
            raise ValueError(f"beta0 = sum of beta = {beta0:g} is beyond float32 (3.4e38): choose a smaller beta")
        return vector, beta0

    def _histogram(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Ω (``counts_t``) and n (``group_totals``) of ``labels`` (Eq. 5), new tensors."""
        counts_t = torch.zeros(self.num_classes, self.upper_width, dtype=torch.int32, device=labels.device)
        totals = torch.zeros(self.upper_width, dtype=torch.int32, device=labels.device)
        cols = labels + self._offsets_t
        rows = self.train_targets[:, None].expand_as(cols)
        ones = torch.ones(cols.numel(), dtype=torch.int32, device=cols.device)
        counts_t.index_put_((rows.reshape(-1), cols.reshape(-1)), ones, accumulate=True)
        totals.index_add_(0, cols.reshape(-1), ones)
        return counts_t, totals

    def _recount(self) -> None:
        """Ω and n from the labels (Eq. 5), in place."""
        counts_t, totals = self._histogram(self._labels)
        self.counts_t.copy_(counts_t)
        self.group_totals.copy_(totals)

    @property
    def _empty(self) -> list[Tensor] | None:
        """Per upper level, ``[N_l]`` bool: the groups that own no class (constraint only)."""
        if self._kept is None:
            return None
        return [k == 0 for k in self._kept]

    # ------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.counts_t.device

    @property
    def num_images(self) -> int:
        """Ξ, the number of training images."""
        return self.train_targets.numel()

    @property
    def counts(self) -> list[Tensor]:
        """Ω^l per upper level: ``[N_l, N]`` int32 views of ``counts_t`` (read-only by convention)."""
        return [self.counts_t[:, o : o + k].t() for o, k in zip(self.offsets, self.level_sizes)]

    @property
    def labels(self) -> Tensor:
        """``[Ξ, L-1]`` int64: the current group label of every image at every
        upper level (level-local ids). Do not modify it; it is the adapter's state."""
        return self._labels

    @property
    def beta_vector(self) -> Tensor:
        """``[N]`` float32 β_y in use (after the ``prior`` scaling)."""
        return self.beta

    # -------------------------------------------------------------- devices
    def to(self, device: torch.device | str) -> "GibbsAdapter":
        """Move the adapter's state (not the loss) to ``device``."""
        device = torch.device(device)
        for name in ("train_targets", "beta", "_labels", "_offsets_t", "counts_t", "group_totals"):
            setattr(self, name, getattr(self, name).to(device))
        for name in ("_owner", "_numerator", "_kept", "_nonzero", "_bound"):
            if getattr(self, name) is not None:
                setattr(self, name, [t.to(device) for t in getattr(self, name)])
        return self

    def _check_devices(self, **tensors: Tensor) -> None:
        psi_device = self.loss_fn.psi_t.device
        if psi_device != self.device:
            raise ValueError(
                f"the loss's Ψ is on {psi_device} but the adapter's counts are on {self.device}; "
                f"move both to one device (adapter.to({str(psi_device)!r}))"
            )
        for name, t in tensors.items():
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the adapter and its loss are on {self.device}")

    # ----------------------------------------------------------------- step
    def _upper_logits(self, logits) -> Tensor:
        if isinstance(logits, (list, tuple)):
            logits = self.loss_fn.pack(logits)
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a tensor or a list of per-level tensors, got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        full = self.upper_width + self.num_classes
        if logits.dim() != 2 or logits.shape[1] not in (full, self.upper_width):
            raise ValueError(
                f"logits must be [B, {full}] (levels {self.level_sizes + [self.num_classes]} packed, top first) "
                f"or the upper levels only [B, {self.upper_width}], got shape {tuple(logits.shape)}"
            )
        return logits.detach()

    @property
    def ignore_index(self) -> int:
        """The loss's ``ignore_index``: batch rows with this target are skipped."""
        return int(getattr(self.loss_fn, "ignore_index", -100))

    def _validate(self, logits, target, indices) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Checks a batch without changing anything; returns (logits, target,
        indices, keep) without the rows whose target is the loss's
        ``ignore_index`` (``keep``: their [B] bool mask, or None when no row
        is ignored)."""
        logits = self._upper_logits(logits)
        target = _as_index_tensor(target, "target")
        indices = _as_index_tensor(indices, "indices")
        batch = logits.shape[0]
        if target.numel() != batch or indices.numel() != batch:
            raise ValueError(
                f"logits has {batch} rows but target has {target.numel()} and indices {indices.numel()}: "
                f"all three describe the same images"
            )
        self._check_devices(logits=logits, target=target, indices=indices)
        if batch == 0:
            return logits, target, indices, None
        # one op and one device sync for the three checks
        flags = gibbs_ops.gibbs_check_batch(indices, target, self.train_targets).tolist()
        keep = positions = None
        ignore = self.ignore_index
        # An ignored row fails the target check (unless ignore_index is a
        # class), so the mask costs nothing on batches without one.
        if max(flags) >= 0 or 0 <= ignore < self.num_classes:
            ignored = target == ignore
            if bool(ignored.any()):
                keep = ~ignored
                positions = keep.nonzero().squeeze(1)
                logits, target, indices = logits[keep], target[keep], indices[keep]
                flags = (gibbs_ops.gibbs_check_batch(indices, target, self.train_targets).tolist()
                         if indices.numel() else [-1, -1, -1])
        self._refuse_bad_batch(flags, target, indices, positions)
        return logits, target, indices, keep

    def _refuse_bad_batch(self, flags: list[int], target: Tensor, indices: Tensor, positions: Tensor | None) -> None:
        bad_index, repeated, bad_target = flags
        row = (lambda i: int(positions[i])) if positions is not None else (lambda i: i)
        if bad_index >= 0:
            raise ValueError(
                f"indices[{row(bad_index)}] = {int(indices[bad_index])} is not a training image index "
                f"in [0, {self.num_images})")
        if repeated >= 0:
            raise ValueError(f"indices holds image {repeated} more than once: each image of a batch is sampled once")
        if bad_target >= 0:
            image = int(indices[bad_target])
            at = row(bad_target)
            raise ValueError(
                f"target[{at}] = {int(target[bad_target])} but train_targets[indices[{at}]] = "
                f"train_targets[{image}] = {int(self.train_targets[image])}: "
                f"indices must be the dataset positions of the batch's images"
            )

    def _with_ignored(self, new: Tensor, keep: Tensor | None) -> Tensor:
        """The labels of the whole batch: -1 on the ignored rows."""
        if keep is None:
            return new
        out = new.new_full((keep.numel(), new.shape[1]), -1)
        out[keep] = new
        return out

    # The step reads batch values on the host (its checks, the moves, which
    # groups' Ψ to rewrite), so it always runs eagerly: under torch.compile it
    # is one deliberate graph break and the rest of a training step compiles.
    @run_eagerly
    @torch.no_grad()
    def step(self, logits: Tensor | Sequence[Tensor], target: Tensor, indices: Tensor, exact: bool = False) -> Tensor:
        """Sample the group labels of a mini-batch, update Ω and the loss's Ψ.

        Args:
            logits: the batch's logits, packed ``[B, ΣN_l]`` or a per-level list
                (detached here; only the upper levels are read).
            target: ``[B]`` classes (must equal ``train_targets[indices]``);
                rows whose target is the loss's ``ignore_index`` are skipped:
                not sampled, their labels unchanged, their ``indices`` not read.
            indices: ``[B]`` dataset indices of the images, distinct.
            exact: sample one image at a time in batch order (the exact
                sequential collapsed Gibbs sampler) instead of all at once.

        Non-finite logits are not checked (that would cost a pass over them):
        a NaN or -inf logit's group is never drawn, and an image whose level
        has no finite logit (or a +inf one) keeps its label there.

        Returns:
            ``[B, L-1]`` int64 new labels of the batch's images (-1 on the
            skipped rows).

        Under ``torch.compile`` the step is excluded from the graph
        (``torch.compiler.disable``) and runs eagerly: a graph break on
        purpose, so the rest of a compiled training step still compiles.

        A refused batch (a ``ValueError``/``TypeError`` naming the problem)
        changes nothing: not the labels, Ω, Ψ nor the step counter.
        """
        dist = self._dist()
        if dist is None:
            logits, target, indices, keep = self._validate(logits, target, indices)
            new = self._with_ignored(self._sample(logits, target, indices, exact), keep)
        else:
            new = self._step_distributed(dist, logits, target, indices, exact)
        self.step_count += 1
        return new

    def _sample(self, logits: Tensor, target: Tensor, indices: Tensor, exact: bool) -> Tensor:
        old = self._labels[indices]
        if indices.numel() == 0:
            new = old.clone()
        elif exact:
            new = gibbs_ops.gibbs_sample_exact(
                logits, target, old, self.counts_t, self.group_totals, self.beta, self.beta0,
                self.level_sizes + [self.num_classes], self.seed, self.step_count, indices,
            )
            self._labels[indices] = new
        else:
            new = self._draw(logits, target, indices, old)
            self._apply(target, indices, old, new)
        self._after_moves(indices, target, old, new)
        return new

    def _draw(self, logits: Tensor, target: Tensor, indices: Tensor, old: Tensor) -> Tensor:
        return gibbs_ops.gibbs_sample(
            logits, target, old, self.counts_t, self.group_totals, self.beta, self.beta0,
            self.level_sizes + [self.num_classes], self.seed, self.step_count, indices,
        )

    def _apply(self, target: Tensor, indices: Tensor, old: Tensor, new: Tensor) -> None:
        """Moves the images from their old to their new groups in Ω and n and
        records their new labels (one op; integer updates, order-independent)."""
        gibbs_ops.gibbs_apply_moves(self.counts_t, self.group_totals, self._labels, target, indices, old, new,
                                     self.level_sizes + [self.num_classes])

    def _after_moves(self, indices: Tensor, target: Tensor, old: Tensor, new: Tensor) -> None:
        """Updates Ψ after the images ``indices`` of classes ``target`` moved from
        the groups ``old`` to ``new`` (``[B, L-1]``, level-local) in the labels,
        Ω and n. Every step, local or distributed, ends here."""
        if not self._psi_synced or self._psi_key != self._current_psi_key():
            self.refresh_psi()
            return
        moved = old != new
        if not bool(moved.any()):
            return
        self._check_devices()
        if self.non_overlapping:
            # one op per level; it skips the images whose label did not move
            for level in range(len(self.level_sizes)):
                self._update_owners(level, target, old[:, level], new[:, level])
            self._psi_key = self._current_psi_key()
            return
        # Ω changed only at the (class, group) pairs of the moved labels.
        rows = target[:, None].expand_as(old)[moved]
        rows = torch.cat([rows, rows])
        cols = torch.cat([(old + self._offsets_t)[moved], (new + self._offsets_t)[moved]])
        # psi_t[y, t] = Ω[t, y] + β_y changes only at those pairs and
        # psi_scale[t] = 1 / (n_t + β_0) only for their groups.
        gibbs_ops.gibbs_refresh_psi_entries(self.loss_fn.psi_t, self.loss_fn.psi_scale, self.counts_t,
                                             self.group_totals, self.beta, self.beta0, rows, cols)
        self._psi_key = self._current_psi_key()

    def _current_psi_key(self) -> tuple:
        psi_t, psi_scale = self.loss_fn.psi_t, self.loss_fn.psi_scale
        return (psi_t.data_ptr(), psi_t._version, psi_scale.data_ptr(), psi_scale._version)

    # ----------------------------------------------------------- distributed
    def _dist(self):
        if self._distributed is False:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if self._distributed:
                raise RuntimeError("GibbsAdapter(distributed=True) needs torch.distributed to be initialised")
            return None
        if dist.get_world_size(self._group) == 1:
            return None
        return dist

    def _comm_device(self, dist) -> torch.device:
        if dist.get_backend(self._group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather(self, dist, tensor: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(parts, tensor.contiguous(), group=self._group)
        return parts

    def _step_distributed(self, dist, logits, target, indices, exact: bool) -> Tensor:
        comm = self._comm_device(dist)
        error: Exception | None = None
        keep = None
        try:
            logits, target, indices, keep = self._validate(logits, target, indices)
            batch = indices.numel()
        except (ValueError, TypeError) as exc:
            error, batch = exc, 0
        # Every rank learns whether all batches are valid before anything
        # changes, so that a refused batch is refused on every rank.
        header = torch.tensor([int(error is None), batch, int(bool(exact)), self.step_count],
                              dtype=torch.long, device=comm)
        headers = torch.stack(self._all_gather(dist, header)).cpu()
        if error is not None:
            raise error
        if not bool(headers[:, 0].all()):
            ranks = (headers[:, 0] == 0).nonzero().flatten().tolist()
            raise RuntimeError(f"GibbsAdapter.step: rank(s) {ranks} refused their batch; nothing was changed")
        if bool((headers[:, 2] != headers[0, 2]).any()) or bool((headers[:, 3] != headers[0, 3]).any()):
            raise RuntimeError(
                f"GibbsAdapter.step: ranks disagree on exact= or on the step counter "
                f"({headers[:, 2:].tolist()}); every rank must call step() alike"
            )
        sizes = headers[:, 1].tolist()
        most = max(sizes)
        lu = len(self.level_sizes)
        if exact:
            # The exact sampler is sequential over the whole (global) batch:
            # every rank replays it on the gathered batch, bit-identically. The
            # kernels read logits as float32, so gathering them as float32 is exact.
            payload = torch.zeros(most, 2 + self.upper_width, dtype=torch.float64, device=comm)
            payload[:batch, 0] = indices.to(comm, torch.float64)
            payload[:batch, 1] = target.to(comm, torch.float64)
            payload[:batch, 2:] = logits[:, : self.upper_width].to(comm, torch.float32).double()
            parts = [p[:s] for p, s in zip(self._all_gather(dist, payload), sizes)]
            gathered = torch.cat(parts).to(self.device)
            all_indices = gathered[:, 0].long()
            all_target = gathered[:, 1].long()
            all_logits = gathered[:, 2:].float()
        else:
            new_local = self._draw(logits, target, indices, self._labels[indices]) if batch else \
                torch.empty(0, lu, dtype=torch.long, device=self.device)
            payload = torch.zeros(most, 1 + lu, dtype=torch.long, device=comm)
            payload[:batch, 0] = indices.to(comm)
            payload[:batch, 1:] = new_local.to(comm)
            parts = [p[:s] for p, s in zip(self._all_gather(dist, payload), sizes)]
            gathered = torch.cat(parts).to(self.device)
            all_indices = gathered[:, 0]
            all_new = gathered[:, 1:]
            all_target = self.train_targets[all_indices]
        ordered = torch.sort(all_indices).values
        if bool((ordered[1:] == ordered[:-1]).any()):
            repeated = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
            raise ValueError(
                f"image {repeated} is in the batches of two ranks: each image of a step must be "
                f"sampled by one rank only (use a DistributedSampler)"
            )
        old = self._labels[all_indices]
        if exact:
            if all_indices.numel():
                new = gibbs_ops.gibbs_sample_exact(
                    all_logits, all_target, old, self.counts_t, self.group_totals, self.beta, self.beta0,
                    self.level_sizes + [self.num_classes], self.seed, self.step_count, all_indices,
                )
            else:
                new = old.clone()
        else:
            new = all_new
            self._apply(all_target, all_indices, old, new)
        if exact:
            self._labels[all_indices] = new
        self._after_moves(all_indices, all_target, old, new)
        rank = dist.get_rank(self._group)
        start = sum(sizes[:rank])
        return self._with_ignored(new[start : start + sizes[rank]], keep)

    # ------------------------------------------------------------------- Ψ
    @torch.no_grad()
    def refresh_psi(self) -> None:
        """Rewrite all of the loss's Ψ from the counts (Eq. 6, and the
        non-overlapping constraint if enabled), as ``psi_t`` (unnormalised
        Ω + β) times ``psi_scale`` (per-group normalisers). :meth:`step` calls
        it on the first step (and if something else wrote the loss's Ψ since
        the adapter's last update); afterwards it updates only what changed."""
        self._check_devices()
        if self.non_overlapping:
            n, dev = self.num_classes, self.device
            self._owner = [torch.zeros(n, dtype=torch.long, device=dev) for _ in self.level_sizes]
            self._numerator = [torch.zeros(n, dtype=torch.float64, device=dev) for _ in self.level_sizes]
            self._kept = [torch.zeros(k, dtype=torch.long, device=dev) for k in self.level_sizes]
            self._nonzero = [torch.zeros(k, (n + 63) // 64, dtype=torch.long, device=dev)
                             for k in self.level_sizes]
            self._bound = [torch.zeros(n, dtype=torch.float64, device=dev) for _ in self.level_sizes]
            none = torch.empty(0, dtype=torch.long, device=dev)
            for level in range(len(self.level_sizes)):
                self._update_owners(level, none, none, none, full=True)
        else:
            columns = torch.arange(self.upper_width, device=self.device)
            gibbs_ops.gibbs_refresh_psi(self.loss_fn.psi_t, self.loss_fn.psi_scale, self.counts_t,
                                         self.group_totals, self.beta, self.beta0, columns)
        self._psi_synced = True
        self._psi_key = self._current_psi_key()

    def _update_owners(self, level: int, classes: Tensor, old: Tensor, new: Tensor, full: bool = False) -> None:
        gibbs_ops.gibbs_update_owners(
            self.loss_fn.psi_t, self.loss_fn.psi_scale, self._owner[level], self._numerator[level],
            self._kept[level], self._nonzero[level], self._bound[level], self.counts_t, self.group_totals,
            self.beta, self.beta0,
            self.offsets[level], self.level_sizes[level], classes, old, new, full,
        )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to draw exactly what the uninterrupted
        run would have drawn (CPU tensors)."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "step": self.step_count,
            "level_sizes": list(self.level_sizes),
            "num_classes": self.num_classes,
            "beta": self.beta.cpu().clone(),
            "beta0": self.beta0,
            "prior": self.prior,
            "non_overlapping": self.non_overlapping,
            "train_targets": self.train_targets.cpu().clone(),
            "labels": self._labels.cpu().clone(),
            "counts_t": self.counts_t.cpu().clone(),
            "group_totals": self.group_totals.cpu().clone(),
            "psi_synced": self._psi_synced,
        }

    def _validated_state(self, state: Any) -> dict[str, Any]:
        """Checks a :meth:`state_dict` output against this adapter without
        changing anything; returns the values to apply (tensors on this
        adapter's device). ValueError/TypeError/KeyError name the entry."""
        if not isinstance(state, Mapping):
            raise TypeError(f"GibbsAdapter state must be a dict (from state_dict()), got {type(state).__name__}")
        missing = {"version", "seed", "step", "level_sizes", "num_classes", "beta", "beta0",
                   "non_overlapping", "train_targets", "labels", "counts_t", "group_totals",
                   "psi_synced"} - set(state)
        if missing:
            raise KeyError(f"GibbsAdapter state is missing {sorted(missing)}")
        if isinstance(state["version"], bool) or state["version"] != _STATE_VERSION:
            raise ValueError(f"GibbsAdapter state version {state['version']!r} is not {_STATE_VERSION}")
        sizes, n = state["level_sizes"], state["num_classes"]
        if not isinstance(sizes, (list, tuple)) or list(sizes) != self.level_sizes or n != self.num_classes:
            raise ValueError(
                f"state is for upper levels {sizes!r} over {n!r} classes, "
                f"this adapter has {self.level_sizes} over {self.num_classes}"
            )
        seed = _state_int(state["seed"], "seed", -_INT64)
        step = _state_int(state["step"], "step", 0)
        for key in ("non_overlapping", "psi_synced"):
            if not isinstance(state[key], bool):
                raise TypeError(f"state {key} must be True or False, got {type(state[key]).__name__} {state[key]!r}")
        if state["non_overlapping"] != self.non_overlapping:
            raise ValueError(
                f"state was saved by an adapter with non_overlapping={state['non_overlapping']} but this "
                f"adapter has non_overlapping={self.non_overlapping}: build it with "
                f"GibbsAdapter(..., non_overlapping={state['non_overlapping']}) to resume that run"
            )
        prior = state.get("prior", self.prior)
        if prior not in PRIORS:
            raise ValueError(f"state prior must be one of {PRIORS}, got {prior!r}")
        tensors = {}
        for key in ("train_targets", "labels", "counts_t", "group_totals", "beta"):
            value = state[key]
            if not isinstance(value, Tensor):
                raise TypeError(f"state {key} must be a tensor, got {type(value).__name__}")
            tensors[key] = value.detach()
        targets = tensors["train_targets"]
        if targets.shape != self.train_targets.shape or not torch.equal(targets.to(self.device), self.train_targets):
            raise ValueError("state has different train_targets than this adapter")
        labels = tensors["labels"]
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"state labels must hold integer group ids, got dtype {labels.dtype}")
        if tuple(labels.shape) != tuple(self._labels.shape):
            raise ValueError(f"state labels have shape {tuple(labels.shape)}, expected {tuple(self._labels.shape)}")
        labels = labels.to(self.device, torch.int64)
        limits = torch.tensor(self.level_sizes, device=self.device)
        if bool((labels < 0).any()) or bool((labels >= limits[None, :]).any()):
            raise ValueError("state labels hold group ids outside their level")
        counts_t, totals = self._histogram(labels)
        for key, expected in (("counts_t", counts_t), ("group_totals", totals)):
            given = tensors[key]
            if given.shape != expected.shape or given.is_floating_point() or not torch.equal(
                    given.to(self.device, torch.int32), expected):
                raise ValueError(f"state {key} is not the histogram of its labels (Eq. 5): the state is corrupt")
        beta = tensors["beta"]
        if tuple(beta.shape) != (self.num_classes,) or not beta.is_floating_point():
            raise ValueError(f"state beta must be a floating [N] = [{self.num_classes}] tensor, "
                             f"got {beta.dtype} of shape {tuple(beta.shape)}")
        beta = beta.to(self.device, torch.float32)
        bad = ~torch.isfinite(beta) | (beta <= 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"state beta must be positive and finite: beta[{i}] = {float(beta[i])}")
        beta0 = state["beta0"]
        if isinstance(beta0, bool) or not isinstance(beta0, numbers.Real) or not 0 < float(beta0) <= _FLOAT32_MAX:
            raise ValueError(f"state beta0 must be a positive finite number, got {beta0!r}")
        total = float(beta.double().sum())
        if abs(float(beta0) - total) > 1e-9 * total:
            raise ValueError(f"state beta0 = {float(beta0)!r} is not the sum of its beta ({total!r})")
        self._check_devices()
        return dict(seed=seed, step=step, non_overlapping=state["non_overlapping"], psi_synced=state["psi_synced"],
                    prior=prior, labels=labels, counts_t=counts_t, group_totals=totals, beta=beta,
                    beta0=float(beta0))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the tensors keep this adapter's
        device). The whole state is validated first: a refused state (a
        ValueError, TypeError or KeyError naming the entry) changes nothing,
        neither the adapter nor the loss's Ψ. If Ψ had been adapted, the
        loss's Ψ is rebuilt from the restored counts, so it matches the saved
        run's Ψ."""
        valid = self._validated_state(state)
        self._labels.copy_(valid["labels"])
        self.counts_t.copy_(valid["counts_t"])
        self.group_totals.copy_(valid["group_totals"])
        self.beta.copy_(valid["beta"])
        self.beta0 = valid["beta0"]
        self.prior = valid["prior"]
        self.non_overlapping = valid["non_overlapping"]
        self.seed = valid["seed"]
        self.step_count = valid["step"]
        self._owner = self._numerator = self._kept = self._nonzero = self._bound = None
        self._psi_synced = False
        if valid["psi_synced"]:
            self.refresh_psi()

    def extra_repr(self) -> str:
        return (f"images={self.num_images}, level_sizes={self.level_sizes}, classes={self.num_classes}, "
                f"beta0={self.beta0:g}, non_overlapping={self.non_overlapping}, step={self.step_count}")

    def __repr__(self) -> str:
        return f"GibbsAdapter({self.extra_repr()})"
