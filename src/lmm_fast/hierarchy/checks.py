"""Checks of the inputs of hierarchy construction, with errors that name the argument."""
from __future__ import annotations

import operator
from typing import Any, Iterable, Sequence

import numpy as np
import torch

ArrayLike = Any  # torch.Tensor | np.ndarray | nested sequences


# ---------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------


def to_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got a numpy object array")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} could not be converted to a tensor: {exc}") from None
    raise TypeError(
        f"{name} must be a torch.Tensor, numpy array or sequence, got {type(value).__name__}"
    )


def as_float_matrix(value: ArrayLike, name: str) -> torch.Tensor:
    """A finite real [rows, cols] tensor in float32 (float64 kept), same device."""
    x = to_tensor(value, name)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}")
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_row = int((~finite).any(dim=1).nonzero()[0, 0])
        kind = "NaN" if bool(torch.isnan(x[bad_row]).any()) else "inf"
        raise ValueError(f"{name} contains {kind} values (first in row {bad_row})")
    return x


def as_index_vector(value: ArrayLike, name: str) -> torch.Tensor:
    """A 1-D int64 tensor; floating or boolean input is rejected, not rounded."""
    x = to_tensor(value, name)
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor/array, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x.to(torch.int64)


def check_level_sizes(level_sizes: Any, num_classes: int, allow_full: bool = False) -> list[int]:
    if isinstance(level_sizes, (str, bytes)) or not isinstance(level_sizes, Iterable):
        raise TypeError(
            f"level_sizes must be a sequence of ints (top level first), got {level_sizes!r}"
        )
    sizes = []
    for i, size in enumerate(level_sizes):
        if isinstance(size, bool):
            raise TypeError(f"level_sizes[{i}] must be an int, got bool")
        try:
            sizes.append(operator.index(size))
        except TypeError:
            if isinstance(size, torch.Tensor) and size.numel() == 1 and not size.is_floating_point():
                sizes.append(int(size))
            else:
                raise TypeError(
                    f"level_sizes[{i}] must be an int, got {type(size).__name__} {size!r}"
                ) from None
    if not sizes:
        raise ValueError("level_sizes must name at least one upper level, got []")
    for i, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"level_sizes[{i}] = {size} must be >= 1")
        limit_ok = size <= num_classes if allow_full else size < num_classes
        if not limit_ok:
            bound = "<=" if allow_full else "<"
            raise ValueError(
                f"level_sizes[{i}] = {size} must be {bound} the number of classes "
                f"N = {num_classes} (the bottom level, the classes themselves, is implicit)"
            )
    for i in range(1, len(sizes)):
        if sizes[i] <= sizes[i - 1]:
            raise ValueError(
                f"level_sizes must be strictly increasing (top level first), got {sizes}"
            )
    return sizes


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_class_names(class_names: Any, num_classes: int) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)):
        raise TypeError("class_names must be a sequence of strings, got a single string")
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} entries but there are {num_classes} classes"
        )
    first_at: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class_names[{i}] must be a str, got {type(name).__name__}")
        if name in first_at:
            raise ValueError(
                f"class_names[{i}] = {name!r} repeats class_names[{first_at[name]}]: every class needs "
                f"its own name (disambiguate, e.g. {name + ' (2)'!r})"
            )
        first_at[name] = i
    return names


def nesting_violation(coarse: torch.Tensor, fine: torch.Tensor, num_fine: int) -> str | None:
    """Describes the first fine group whose classes span several coarse groups."""
    lo = torch.full((num_fine,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    hi = torch.full((num_fine,), -1, dtype=torch.int64)
    lo = lo.scatter_reduce(0, fine, coarse, reduce="amin")
    hi = hi.scatter_reduce(0, fine, coarse, reduce="amax")
    bad = (lo != hi).nonzero()
    if bad.numel() == 0:
        return None
    group = int(bad[0, 0])
    members = (fine == group).nonzero().flatten()
    first = int(members[0])
    other = int(members[(coarse[members] != coarse[first]).nonzero()[0, 0]])
    return (
        f"group {group} contains classes {first} and {other}, which lie in different "
        f"groups ({int(coarse[first])} and {int(coarse[other])}) of the level above"
    )


def check_assignment(groups: torch.Tensor, num_groups: int, name: str) -> None:
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        bad = int(((groups < 0) | (groups >= num_groups)).nonzero()[0, 0])
        raise ValueError(
            f"{name}[{bad}] = {int(groups[bad])} is out of range [0, {num_groups})"
        )
    counts = torch.bincount(groups, minlength=num_groups)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} leaves {int((counts == 0).sum())} of its {num_groups} groups empty "
            f"(e.g. groups {empty}); group ids must be 0..{num_groups - 1}, all used"
        )
