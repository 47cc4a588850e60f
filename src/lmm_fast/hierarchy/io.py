"""The hierarchy file format: validation of the serialised form (JSON), with
errors that name the file and the problem."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from lmm_fast.hierarchy.checks import check_assignment, check_class_names, check_level_sizes, nesting_violation
from lmm_fast.hierarchy.taxonomy import check_group_names

FORMAT_NAME = "lmm_fast.hierarchy"
FORMAT_VERSION = 1




# ---------------------------------------------------------------------------
# Validation of the serialised form
# ---------------------------------------------------------------------------


def unique_keys(pairs: list[tuple[str, Any]], source: str = "JSON") -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.load`: a JSON object as a dict,
    refusing a key that occurs twice (plain ``json`` keeps the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{source}: key {key!r} occurs more than once in one JSON object")
        out[key] = value
    return out


def _first_outside(values: list, low: int, high: int) -> int | None:
    """Position of the first entry that is not an int in ``[low, high)``, or None."""
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
            return position
    return None

_REQUIRED_KEYS = ("format", "format_version", "num_classes", "level_sizes", "nested", "assignments")


def parse_hierarchy(data: Any, source: str) -> dict[str, Any]:
    """The validated constructor arguments of a :class:`~lmm_fast.Hierarchy`
    from its serialised form (ValueError naming ``source`` on any problem)."""
    def fail(message: str) -> ValueError:
        return ValueError(f"{source}: {message}")

    if not isinstance(data, Mapping):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
        raise fail(f"'format' must be {FORMAT_NAME!r}, got {data.get('format')!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise fail(f"unsupported format_version {version!r} (this version reads {FORMAT_VERSION})")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise fail(f"missing keys {missing}")

    n = data["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise fail(f"num_classes must be an int >= 2, got {n!r}")
    nested = data["nested"]
    if not isinstance(nested, bool):
        raise fail(f"nested must be true or false, got {nested!r}")
    psi_data = data.get("psi")
    dense = psi_data is not None
    raw_sizes = data["level_sizes"]
    if not isinstance(raw_sizes, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in raw_sizes):
        raise fail(f"level_sizes must be a list of ints, got {raw_sizes!r}")
    try:
        sizes = check_level_sizes(raw_sizes, n, allow_full=dense)
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from None

    raw_levels = data["assignments"]
    if not isinstance(raw_levels, list) or len(raw_levels) != len(sizes):
        got = len(raw_levels) if isinstance(raw_levels, list) else type(raw_levels).__name__
        raise fail(f"assignments must be a list of {len(sizes)} lists (one per level size), got {got}")
    levels = []
    for i, (raw, k) in enumerate(zip(raw_levels, sizes)):
        if not isinstance(raw, list) or len(raw) != n:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise fail(f"assignments[{i}] must be a list of num_classes = {n} ints, got {got}")
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in raw):
            raise fail(f"assignments[{i}] must contain only ints")
        # Ids are checked as Python ints, before any tensor: one beyond int64
        # would not convert, and a large one must not size an allocation.
        bad = _first_outside(raw, 0, k)
        if bad is not None:
            raise fail(f"assignments[{i}][{bad}] = {raw[bad]} is out of range [0, {k})")
        groups = torch.tensor(raw, dtype=torch.int64)
        if not dense:
            try:
                check_assignment(groups, k, f"assignments[{i}]")
            except ValueError as exc:
                raise fail(str(exc)) from None
        levels.append(groups)

    psi = None
    if dense:
        psi = parse_psi(psi_data, sizes, n, fail)
        for i, (p, groups) in enumerate(zip(psi, levels)):
            if not torch.equal(sparse_argmax(p), groups):
                raise fail(f"assignments[{i}] is not the argmax group of every class under psi[{i}]")
    elif nested:
        for i in range(1, len(levels)):
            problem = nesting_violation(levels[i - 1], levels[i], sizes[i])
            if problem:
                raise fail(f"nested is true but assignments[{i}] is not nested in assignments[{i - 1}]: {problem}")

    try:
        names = check_class_names(data.get("class_names"), n)
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from None
    sigma = data.get("sigma")
    if sigma is not None and (
        not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0
    ):
        raise fail(f"sigma must be null or a finite number > 0, got {sigma!r}")
    info = data.get("info") or {}
    if not isinstance(info, Mapping):
        raise fail(f"info must be an object, got {type(info).__name__}")
    try:
        group_names = check_group_names(data.get("group_names"), sizes)
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from None
    return dict(assignments=levels, level_sizes=sizes, nested=nested, psi=psi, class_names=names, sigma=sigma, info=info,
                group_names=group_names)


def parse_psi(psi_data: Any, sizes: Sequence[int], n: int, fail) -> list[torch.Tensor]:
    """The Ψ of a dense hierarchy from its listed non-zeros, one coalesced
    sparse COO float32 ``[N_l, N]`` tensor per level (zero entries dropped).

    Everything is checked on the entries themselves (O(entries + N_l + N)
    memory): indices, duplicates, values, row sums; no ``N_l x N`` matrix is
    formed, so a small file cannot cost gigabytes.
    """
    if not isinstance(psi_data, list) or len(psi_data) != len(sizes):
        raise fail(f"psi must be null or a list of {len(sizes)} sparse matrices")
    out = []
    for i, (entry, k) in enumerate(zip(psi_data, sizes)):
        if not isinstance(entry, Mapping) or not all(key in entry for key in ("shape", "rows", "cols", "values")):
            raise fail(f"psi[{i}] must be an object with keys shape, rows, cols, values")
        if entry["shape"] != [k, n]:
            raise fail(f"psi[{i}] shape must be [{k}, {n}], got {entry['shape']!r}")
        rows, cols, values = entry["rows"], entry["cols"], entry["values"]
        if not all(isinstance(v, list) for v in (rows, cols, values)) or not len(rows) == len(cols) == len(values):
            raise fail(f"psi[{i}] rows, cols and values must be lists of equal length")
        for name, indices, bound in (("rows", rows, k), ("cols", cols, n)):
            bad = _first_outside(indices, 0, bound)
            if bad is not None:
                raise fail(f"psi[{i}] has indices outside [0, {k}) x [0, {n}): "
                           f"{name}[{bad}] = {indices[bad]!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise fail(f"psi[{i}] values must be numbers")
        r = torch.tensor(rows, dtype=torch.int64)
        c = torch.tensor(cols, dtype=torch.int64)
        try:
            v = torch.tensor(values, dtype=torch.float64)
        except (OverflowError, RuntimeError) as exc:
            raise fail(f"psi[{i}] has values out of range ({exc})") from None
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise fail(f"psi[{i}] values must be finite and non-negative")
        keys = r * n + c
        ordered, order = torch.sort(keys, stable=True)
        repeated = (ordered[1:] == ordered[:-1]).nonzero().flatten()
        if repeated.numel():
            first = int(order[int(repeated[0]) + 1])
            raise fail(f"psi[{i}] lists entry ({rows[first]}, {cols[first]}) more than once (position {first})")
        v = v.to(torch.float32)
        row_sums = torch.zeros(k, dtype=torch.float64).index_add_(0, r, v.double())
        bad = ((row_sums - 1.0).abs() > 1e-4).nonzero().flatten()
        if bad.numel():
            t = int(bad[0])
            raise fail(f"psi[{i}] row {t} sums to {float(row_sums[t]):.6g}, not 1")
        keep = v != 0
        p = torch.sparse_coo_tensor(torch.stack([r[keep], c[keep]]), v[keep], (k, n), check_invariants=True).coalesce()
        out.append(p)
    return out


def sparse_argmax(p: torch.Tensor) -> torch.Tensor:
    """``p.to_dense().argmax(dim=0)`` (first maximum) of a coalesced sparse
    non-negative ``[K, N]`` matrix, without forming it: a column without a
    positive entry has its maximum, 0, first in row 0."""
    k, n = p.shape
    rows, cols = p.indices()
    values = p.values()
    col_max = torch.zeros(n, dtype=values.dtype).scatter_reduce(0, cols, values, reduce="amax")
    at_max = (values == col_max[cols]) & (values > 0)
    first = torch.full((n,), k, dtype=torch.int64).scatter_reduce(0, cols[at_max], rows[at_max], reduce="amin")
    return torch.where(col_max > 0, first, torch.zeros_like(first))
