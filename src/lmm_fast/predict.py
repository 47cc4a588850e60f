"""Prediction with a level-wise mixture: class probabilities and top-k classes.

``P(y | x) = Σ_l θ_l softmax(a^l) Ψ^l`` (the bottom Ψ is the identity) needs
the whole ``[B, N]`` row, unlike the loss. Two fused kernels compute it
without forming a ``[B, N]`` tensor per level:

* **tree Ψ** (every column of every upper Ψ^l has at most one non-zero: a
  hierarchy's initial Ψ, or Ψ after adaptation with the non-overlapping
  constraint): the upper levels' ``θ_l z^l`` are gathered through the
  class → group map (:func:`lmm_predict_proba_tree`, :func:`lmm_topk_tree`);
* **dense Ψ**: one GEMM for all upper levels (:func:`lmm_predict_proba_dense`).

:func:`lmm_gather_scores` scores a few weight rows per sample in place, for the
coarse-to-fine search of :meth:`lmm_fast.LMMHead.predict_topk`.

:func:`tree_index` detects the tree structure of the loss's class-major
``psi_t`` once and caches it until ``psi_t`` is written to (``psi_t._version``)
or replaced. :func:`mixture_proba` and :func:`predict_topk` pick the kernel.

**Prepared for inference.** Whether Ψ is a tree, and its class → group map,
depend on Ψ's values, which ``torch.compile``, ``torch.export`` and ONNX
export cannot inspect. A :class:`PredictionStructure` holds that structure as
non-persistent buffers (moved by ``.to()``, not in ``state_dict``), worked
out eagerly: ``FusedLMMLoss.prepare_for_inference()``,
``LMMHead.prepare_for_inference()`` or :func:`prepare_for_inference` on a
whole model. Eager prediction keeps it up to date by itself (it re-detects
whenever Ψ was written since); traced code (:func:`is_tracing`) only reads
it, so compiled and exported prediction uses Ψ's structure as of the last
preparation (or eager prediction). At export the operators are written as
standard ATen ops (:mod:`lmm_fast.ops.predict`), so an exported program runs
without this library (docs/deploy.md).

The operators' wrappers live in :mod:`lmm_fast.ops.predict`; their
pure-PyTorch oracles (any dtype) in :mod:`lmm_fast.reference.predict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from lmm_fast.ops import accumulate_dtype
from lmm_fast.ops.predict import lmm_predict_proba_dense, lmm_predict_proba_tree, lmm_topk_tree

__all__ = [
    "PredictionStructure",
    "is_tracing",
    "prepare_for_inference",
    "TreeIndex",
    "tree_index",
    "tree_index_from_assignments",
    "SearchTables",
    "search_tables",
    "mixture_proba",
    "prepared_proba",
    "prepared_topk",
    "predict_topk",
    "path_score_proba",
]


# ---------------------------------------------------------------------------
# Tree form of Ψ
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class TreeIndex:
    """Ψ with at most one non-zero per column and upper level, level-major.

    Attributes:
        index: int32 ``[L-1, N]``, the group of every class per upper level
            (0 for a class in no group of that level; its value is then 0).
        value: ``[L-1, N]``, ``Ψ^l[index[l, y], y]``: float64 when Ψ is held
            in float64 (or built from assignments, exact to float64), else
            float32; :meth:`value_as` gives it in the dtype a kernel needs.
        level_sizes: ``[N_1, …, N_{L-1}, N]``.
    """

    index: Tensor
    value: Tensor
    level_sizes: list[int]
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return self.level_sizes[-1]

    def value_as(self, dtype: torch.dtype) -> Tensor:
        """``value`` in ``dtype`` (kept, as prediction asks for it per call)."""
        if dtype == self.value.dtype:
            return self.value
        key = ("value", dtype)
        if key not in self._cache:
            self._cache[key] = self.value.to(dtype)
        return self._cache[key]

    def to_psi(self, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """The dense ``[N_l, N]`` matrices this index stands for."""
        classes = torch.arange(self.num_classes, device=self.index.device)
        out = []
        for level, size in enumerate(self.level_sizes[:-1]):
            p = torch.zeros(size, self.num_classes, dtype=dtype, device=self.index.device)
            p[self.index[level].long(), classes] = self.value[level].to(dtype)
            out.append(p)
        return out


_TREE_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _detect_tree(psi_t: Tensor, level_sizes: Sequence[int], chunk: int = 8192) -> TreeIndex | None:
    num_classes = psi_t.shape[0]
    upper = list(level_sizes[:-1])
    index = torch.zeros(len(upper), num_classes, dtype=torch.int32, device=psi_t.device)
    # float64 Ψ keeps its values (a float64 prediction must not round Ψ to float32)
    dtype = torch.float64 if psi_t.dtype == torch.float64 else torch.float32
    value = torch.zeros(len(upper), num_classes, dtype=dtype, device=psi_t.device)
    offset = 0
    for level, size in enumerate(upper):
        # Chunks of classes bound the boolean temporary for large N.
        for start in range(0, num_classes, chunk):
            block = psi_t[start : start + chunk, offset : offset + size]
            nonzero = block != 0
            if bool((nonzero.sum(dim=1) > 1).any()):
                return None
            where = nonzero.to(torch.uint8).argmax(dim=1, keepdim=True)
            index[level, start : start + chunk] = where.squeeze(1).to(torch.int32)
            value[level, start : start + chunk] = block.gather(1, where).squeeze(1).to(dtype)
        offset += size
    return TreeIndex(index, value, [int(s) for s in level_sizes])


def tree_index(psi_t: Tensor, level_sizes: Sequence[int]) -> TreeIndex | None:
    """The tree form of a class-major ``psi_t`` ``[N, ΣN_upper]``, or ``None``
    when some column of some Ψ^l has more than one non-zero (dense Ψ).

    Cached per ``psi_t`` tensor; an in-place write (``psi_t._version``), a new
    storage or a new device makes it recompute. ``level_sizes`` lists all
    levels, bottom (N) last.
    """
    sizes = [int(s) for s in level_sizes]
    key = (psi_t._version, psi_t.data_ptr(), psi_t.device, psi_t.dtype, tuple(psi_t.shape), tuple(sizes))
    hit = _TREE_CACHE.get(psi_t)
    if hit is not None and hit[0] == key:
        return hit[1]
    found = _detect_tree(psi_t.detach(), sizes)
    _TREE_CACHE[psi_t] = (key, found)
    return found


def tree_index_from_assignments(
    assignments: Sequence[Tensor], num_classes: int, device: torch.device | str | None = None
) -> TreeIndex:
    """The tree index of a hierarchy's initial Ψ (``Ψ[t, y] = 1/C_t``) straight
    from its assignments (one long ``[N]`` per upper level), without forming Ψ."""
    index, value, sizes = [], [], []
    for groups in assignments:
        groups = torch.as_tensor(groups).to(torch.int64).cpu()
        size = int(groups.max()) + 1 if groups.numel() else 0
        counts = torch.bincount(groups, minlength=size).to(torch.float64)
        index.append(groups.to(torch.int32))
        value.append((1.0 / counts)[groups])  # float64: value_as rounds it once per dtype
        sizes.append(size)
    if index:
        idx, val = torch.stack(index), torch.stack(value)
    else:
        idx = torch.zeros(0, num_classes, dtype=torch.int32)
        val = torch.zeros(0, num_classes, dtype=torch.float64)
    return TreeIndex(idx.to(device), val.to(device), sizes + [int(num_classes)])


# ---------------------------------------------------------------------------
# Coarse-to-fine tables of a nested tree
# ---------------------------------------------------------------------------


@dataclass
class SearchTables:
    """Padded child tables of a nested tree (-1 pads), read by the
    coarse-to-fine search of :meth:`lmm_fast.LMMHead.predict_topk`."""

    children: list[Tensor]  # per upper level l < L-2: [N_l + 1, max children] groups of level l+1
    members: Tensor  # [N_{L-1} + 1, max members] classes of each last-upper-level group
    index: Tensor  # long [L-1, N]
    value: Tensor  # [L-1, N]


def _padded_groups(owner: Tensor, num_owners: int) -> Tensor:
    """Items (positions in ``owner``) of each owner, padded with -1:
    ``[num_owners + 1, max]``; the extra last row is all -1, the children of
    an empty beam slot (kept id -1)."""
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=num_owners)
    width = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(owner.numel(), device=owner.device) - starts[owner[order]]
    table = torch.full((num_owners + 1, max(width, 1)), -1, dtype=torch.long, device=owner.device)
    table[owner[order], rank] = order
    return table


def search_tables(tree: TreeIndex) -> SearchTables:
    """The coarse-to-fine tables of a tree index (cached on it).

    Raises:
        ValueError: when the tree has no upper level, a class is in no group
        of some level, the levels are not nested, or a group is empty.
    """
    cached = tree._cache.get("search")
    if cached is not None:
        return cached
    index = tree.index.long()
    upper = tree.level_sizes[:-1]
    if not upper:
        raise ValueError("coarse-to-fine prediction needs at least one upper level; use beam=None")
    missing = (tree.value == 0).nonzero()
    if missing.numel():
        level, cls = missing[0].tolist()
        raise ValueError(
            f"coarse-to-fine prediction needs every class in one group of every upper level, but class "
            f"{cls} has no group at level {level + 1} (its column of Ψ^{level + 1} is zero); use beam=None"
        )
    children = []
    for level in range(1, len(upper)):
        parent = torch.full((upper[level],), -1, dtype=torch.long, device=index.device)
        parent[index[level]] = index[level - 1]
        bad = (parent[index[level]] != index[level - 1]).nonzero()
        if bad.numel():
            cls = int(bad[0])
            group = int(index[level, cls])
            raise ValueError(
                f"coarse-to-fine prediction needs nested levels (a tree), but group {group} of level "
                f"{level + 1} holds classes of several level-{level} groups (e.g. class {cls}); use beam=None"
            )
        if bool((parent < 0).any()):
            empty = int((parent < 0).nonzero()[0])
            raise ValueError(f"group {empty} of level {level + 1} has no classes; coarse-to-fine needs none empty")
        children.append(_padded_groups(parent, upper[level - 1]))
    members = _padded_groups(index[-1], upper[-1])
    search = SearchTables(children, members, index, tree.value)
    tree._cache["search"] = search
    return search


# ---------------------------------------------------------------------------
# Prepared for inference
# ---------------------------------------------------------------------------


def is_tracing() -> bool:
    """True while ``torch.compile``, ``torch.export``, ONNX export or TorchScript
    tracing runs the calling code. Prediction then reads prepared structures
    only and never inspects tensor values."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


NOT_PREPARED = (
    "{owner}: prediction under torch.compile / torch.export / ONNX export needs Ψ's structure worked "
    "out beforehand, eagerly (traced code cannot inspect tensor values): call {call} once before "
    "compiling or exporting, and again whenever Ψ changes (adaptation, set_psi, load_state_dict), "
    "or lmm_fast.prepare_for_inference(model) for a whole model"
)


class PredictionStructure(nn.Module):
    """How prediction reads Ψ, worked out once, eagerly, and held as
    non-persistent buffers (moved by ``.to()``, left out of ``state_dict``).

    Attributes:
        kind: ``"tree"`` (every column of every upper Ψ^l has at most one
            non-zero) or ``"dense"``.
        level_sizes: ``[N_1, …, N_{L-1}, N]``.
        index: int32 ``[L-1, N]``, the group of every class per upper level
            (tree only).
        value: ``[L-1, N]`` ``Ψ^l[index[l, y], y]`` (tree only; float64 for a
            float64 Ψ, else float32).
        psi_t: dense class-major Ψ ``[N, ΣN_upper]`` when this structure owns
            it (a head's hierarchy default); ``None`` when it is read live from
            a loss.
        theta: θ ``[L]`` when this structure owns it (a head's default), else
            ``None``.
        source: the version key of the Ψ it was prepared from (eager staleness
            check of the owner).

    The coarse-to-fine tables (``children_0 …``, ``members``) are built by
    :meth:`prepare_search` (``prepare_for_inference`` calls it) or, eagerly,
    on the first beam search.
    """

    def __init__(
        self,
        kind: str,
        level_sizes: Sequence[int],
        *,
        index: Tensor | None = None,
        value: Tensor | None = None,
        psi_t: Tensor | None = None,
        theta: Tensor | None = None,
        source: Any = None,
    ) -> None:
        super().__init__()
        if kind not in ("tree", "dense"):
            raise ValueError(f"kind must be 'tree' or 'dense', got {kind!r}")
        if kind == "tree" and (index is None or value is None):
            raise ValueError("a tree structure needs index and value")
        self.kind = kind
        self.level_sizes = [int(s) for s in level_sizes]
        self.source = source
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("value", value, persistent=False)
        self.register_buffer("psi_t", psi_t, persistent=False)
        self.register_buffer("theta", theta, persistent=False)
        self.register_buffer("members", None, persistent=False)
        self.search_ready = False
        self.search_error: str | None = None
        self.num_children = 0

    @classmethod
    @torch.no_grad()
    def from_psi_t(cls, psi_t: Tensor, level_sizes: Sequence[int], source: Any = None) -> "PredictionStructure":
        """The structure of a class-major ``psi_t`` ``[N, ΣN_upper]`` (its tree
        form when it is one; else dense, read live from the owner)."""
        with torch.inference_mode(False):
            found = _detect_tree(psi_t.detach(), level_sizes)
            if found is None:
                return cls("dense", level_sizes, source=source)
            # float64 Ψ keeps its values exactly (the detection stores float32)
            value = (_detect_tree_values(psi_t.detach(), found.index, level_sizes)
                     if psi_t.dtype == torch.float64 else found.value)
            return cls("tree", level_sizes, index=found.index, value=value, source=source)

    @classmethod
    @torch.no_grad()
    def from_hierarchy(cls, hierarchy: Any, theta: Tensor, device: torch.device | str | None = None) -> "PredictionStructure":
        """A hierarchy's initial Ψ (a tree straight from its assignments, or its
        dense Ψ) and a θ, both held here."""
        sizes = [int(s) for s in hierarchy.level_sizes] + [int(hierarchy.num_classes)]
        with torch.inference_mode(False):
            theta = theta.detach().to(device).clone()
            if getattr(hierarchy, "is_dense", False):
                psi_t = torch.cat([p.t() for p in hierarchy.psi(device=device)], dim=1).contiguous()
                return cls("dense", sizes, psi_t=psi_t, theta=theta)
            tree = tree_index_from_assignments(hierarchy.assignments, sizes[-1], device=device)
            return cls("tree", sizes, index=tree.index, value=tree.value, theta=theta)

    def tree(self) -> TreeIndex:
        """The tree form (``kind == "tree"`` only)."""
        if self.kind != "tree":
            raise ValueError("Ψ is dense: it has no tree form")
        return TreeIndex(self.index, self.value, list(self.level_sizes))

    @torch.no_grad()
    def prepare_search(self) -> None:
        """Builds the coarse-to-fine tables now (tree only); a Ψ that does
        not admit them (not nested, a class without a group) is remembered,
        and :meth:`search` raises its reason."""
        if self.kind != "tree":
            self.search_ready, self.search_error = True, None
            return
        with torch.inference_mode(False):
            try:
                tables = search_tables(TreeIndex(self.index, self.value, list(self.level_sizes)))
            except ValueError as error:
                self.search_error = str(error)
                tables = None
            else:
                self.search_error = None
            count = len(tables.children) if tables is not None else 0
            for level in range(max(count, self.num_children)):
                tensor = tables.children[level] if level < count else None
                _assign_buffer(self, f"children_{level}", tensor)
            _assign_buffer(self, "members", tables.members if tables is not None else None)
            self.num_children = count
            self.search_ready = True

    def search(self) -> SearchTables:
        """The coarse-to-fine tables (built eagerly if not yet; under tracing
        they must have been prepared)."""
        if not self.search_ready:
            if is_tracing():
                raise RuntimeError(NOT_PREPARED.format(owner="coarse-to-fine prediction",
                                                       call="prepare_for_inference()"))
            self.prepare_search()
        if self.search_error is not None:
            raise ValueError(self.search_error)
        children = [getattr(self, f"children_{level}") for level in range(self.num_children)]
        return SearchTables(children, self.members, self.index.long(), self.value)

    @torch.no_grad()
    def update_(self, other: "PredictionStructure") -> None:
        """Takes ``other``'s contents, in place where the shapes allow (so that
        compiled graphs reading these buffers see the new values without a
        recompile)."""
        with torch.inference_mode(False):
            self.kind = other.kind
            self.level_sizes = list(other.level_sizes)
            self.source = other.source
            for name in ("index", "value", "psi_t", "theta", "members"):
                _assign_buffer(self, name, getattr(other, name))
            for level in range(max(other.num_children, self.num_children)):
                tensor = getattr(other, f"children_{level}") if level < other.num_children else None
                _assign_buffer(self, f"children_{level}", tensor)
            self.num_children = other.num_children
            self.search_ready = other.search_ready
            self.search_error = other.search_error

    def extra_repr(self) -> str:
        search = "ready" if self.search_ready and self.search_error is None else (
            "unavailable" if self.search_ready else "not built")
        return f"kind={self.kind!r}, level_sizes={self.level_sizes}, coarse_to_fine={search}"


def _assign_buffer(module: nn.Module, name: str, tensor: Tensor | None) -> None:
    old = module._buffers.get(name)
    if (old is not None and tensor is not None and old.shape == tensor.shape
            and old.dtype == tensor.dtype and old.device == tensor.device):
        old.copy_(tensor)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        module.register_buffer(name, tensor, persistent=False)


def _detect_tree_values(psi_t: Tensor, index: Tensor, level_sizes: Sequence[int]) -> Tensor:
    """``Ψ^l[index[l, y], y]`` in ``psi_t``'s dtype ``[L-1, N]``."""
    rows, offset = [], 0
    for level, size in enumerate(level_sizes[:-1]):
        rows.append(psi_t[:, offset : offset + size].gather(1, index[level].long().unsqueeze(1)).squeeze(1))
        offset += size
    if not rows:
        return torch.zeros(0, psi_t.shape[0], dtype=psi_t.dtype, device=psi_t.device)
    return torch.stack(rows)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Prepares every :class:`~lmm_fast.FusedLMMLoss` and
    :class:`~lmm_fast.LMMHead` inside ``model`` (``model`` itself included)
    for compiled or exported prediction (their ``prepare_for_inference()``),
    and returns ``model``. Call it eagerly, after the last change of Ψ and
    before ``torch.compile`` / ``torch.export`` / ``torch.onnx.export``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):
        if isinstance(module, PredictionStructure):
            continue
        prepare = getattr(type(module), "prepare_for_inference", None)
        if callable(prepare):
            module.prepare_for_inference()
    return model


# ---------------------------------------------------------------------------
# Dispatch from the loss's state
# ---------------------------------------------------------------------------


def _check_logits(logits: Tensor, psi_t: Tensor) -> torch.dtype:
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.device != psi_t.device:
        raise ValueError(
            f"logits are on {logits.device} but Ψ is on {psi_t.device}; "
            f"move the loss (or head) with .to({str(logits.device)!r})"
        )
    return accumulate_dtype(logits.dtype)


def mixture_proba(logits: Tensor, psi_t: Tensor, theta: Tensor, level_sizes: Sequence[int]) -> Tensor:
    """``[B, N]`` class probabilities from packed ``logits`` ``[B, ΣN_l]``, the
    loss's class-major ``psi_t`` ``[N, ΣN_upper]`` and θ ``[L]`` or ``[B, L]``:
    the gather kernel when Ψ is a tree (detected once, cached), else the GEMM
    kernel. Under tracing (:func:`is_tracing`) Ψ's values cannot be inspected,
    so the GEMM kernel is used; ``FusedLMMLoss.predict_proba`` of a prepared
    loss keeps the gather kernel there."""
    acc = _check_logits(logits, psi_t)
    theta = theta.to(acc)
    if is_tracing():
        return lmm_predict_proba_dense(logits, psi_t.to(acc), theta, level_sizes)
    tree = tree_index(psi_t, level_sizes)
    if tree is not None:
        return lmm_predict_proba_tree(logits, tree.index, tree.value_as(acc), theta, level_sizes)
    return lmm_predict_proba_dense(logits, psi_t.to(acc), theta, level_sizes)


def prepared_proba(
    logits: Tensor, structure: PredictionStructure, theta: Tensor, psi_t: Tensor | None = None
) -> Tensor:
    """``[B, N]`` probabilities through a :class:`PredictionStructure`: the
    gather kernel for a tree, else the GEMM kernel on ``psi_t`` (the owner's
    dense Ψ; default: the structure's own). ``theta`` in the accumulation
    dtype of ``logits``. Reads no tensor values on the host (traceable)."""
    acc = accumulate_dtype(logits.dtype)
    if structure.kind == "tree":
        return lmm_predict_proba_tree(logits, structure.index, structure.value.to(acc), theta, structure.level_sizes)
    dense = structure.psi_t if psi_t is None else psi_t
    return lmm_predict_proba_dense(logits, dense.to(acc), theta, structure.level_sizes)


def prepared_topk(
    logits: Tensor, structure: PredictionStructure, theta: Tensor, k: int, psi_t: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The top ``k`` through a :class:`PredictionStructure`: the partial-selection
    kernel for a tree, else the GEMM kernel and ``torch.topk`` (arguments as
    :func:`prepared_proba`)."""
    acc = accumulate_dtype(logits.dtype)
    if structure.kind == "tree":
        return lmm_topk_tree(logits, structure.index, structure.value.to(acc), theta, structure.level_sizes, k)
    values, indices = torch.topk(prepared_proba(logits, structure, theta, psi_t), k, dim=1)
    return values, indices  # a plain tuple, as the tree op's


def predict_topk(
    logits: Tensor | Sequence[Tensor], loss_fn: Any, k: int = 5, *, theta: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable classes under a loss's mixture (its Ψ and θ).

    Args:
        logits: ``[B, ΣN_l]`` packed or a list of ``[B, N_l]``.
        loss_fn: a :class:`~lmm_fast.FusedLMMLoss` (Ψ and θ are read from it).
        k: ``0 <= k <= N``.
        theta: overrides the loss's θ: ``[L]``, or ``[B, L]`` one per row
            (e.g. from a gating network).

    Returns:
        ``(values [B, k], indices [B, k])``, best first. A tree Ψ uses the
        partial-selection kernel; a dense Ψ the GEMM kernel and ``torch.topk``.

    Under ``torch.compile`` / ``torch.export`` the loss must have been
    prepared (``loss_fn.prepare_for_inference()``, or any eager prediction).
    """
    logits = loss_fn.pack(logits)
    n = loss_fn.level_sizes[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, N] = [0, {n}], got {k!r}")
    acc = _check_logits(logits, loss_fn.psi_t)
    if theta is not None:  # checked as the loss checks its own override (lmm_fast.loss.check_row_theta)
        theta = loss_fn._row_theta(theta, logits.device, logits.shape[0])
    theta = (loss_fn.theta if theta is None else theta).to(device=logits.device, dtype=acc)
    structure = loss_fn.prediction_structure()
    dense = None if structure.kind == "tree" else loss_fn.effective_psi_t()
    return prepared_topk(logits, structure, theta, k, dense)


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
