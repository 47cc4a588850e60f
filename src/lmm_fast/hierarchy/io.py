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
        groups = torch.tensor(raw, dtype=torch.int64)
        try:
            if dense:
                if int(groups.min()) < 0 or int(groups.max()) >= k:
                    check_assignment(groups, k, f"assignments[{i}]")
            else:
                check_assignment(groups, k, f"assignments[{i}]")
        except ValueError as exc:
            raise fail(str(exc)) from None
        levels.append(groups)

    psi = None
    if dense:
        psi = parse_psi(psi_data, sizes, n, fail)
        for i, (p, groups) in enumerate(zip(psi, levels)):
            if not torch.equal(p.argmax(dim=0), groups):
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
        try:
            r = torch.tensor(rows, dtype=torch.int64)
            c = torch.tensor(cols, dtype=torch.int64)
            v = torch.tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise fail(f"psi[{i}] has non-numeric entries ({exc})") from None
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= k or int(c.min()) < 0 or int(c.max()) >= n):
            raise fail(f"psi[{i}] has indices outside [0, {k}) x [0, {n})")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise fail(f"psi[{i}] values must be finite and non-negative")
        p = torch.zeros(k, n, dtype=torch.float32)
        p[r, c] = v.to(torch.float32)
        row_sums = p.double().sum(1)
        bad = ((row_sums - 1.0).abs() > 1e-4).nonzero().flatten()
        if bad.numel():
            t = int(bad[0])
            raise fail(f"psi[{i}] row {t} sums to {float(row_sums[t]):.6g}, not 1")
        out.append(p)
    return out
