"""A user's own taxonomy as LMM levels: parent → child edges (a list, a dict or
a CSV file) and per-level group names.

How a tree of any depth becomes levels (docs/hierarchy.md, "Your own
taxonomy"):

* the **classes are the leaves**; the class index of a leaf is its position
  in ``classes`` (default: the order in which the leaves first appear in the
  edges);
* the **root** is the one node without a parent; with several such nodes
  (a forest), or a root that is itself a leaf, a virtual root holds them;
* **upper level k** is depth k (the root's children are depth 1), for
  ``k = 1 … D-1``, ``D`` the depth of the deepest class;
* a class shallower than ``D`` (an unbalanced tree) keeps, at every level at
  or below its own depth, the group of the leaves of its parent: the parent
  continues down as a chain of single-child nodes (padding), the way a group
  of a dendrogram cut that does not split stays one group at a finer cut;
* a level that refines nothing is dropped: one group, as many groups as the
  level above (the same partition), or as many as there are classes (the
  classes themselves). ``info["depths"]`` keeps the depth of every kept level.

Group names: a real node's id; a padding node carries its parent's id (so
``"vehicles"`` at level 2 is the group of the leaves right under
``vehicles``).
"""
from __future__ import annotations

import csv
import operator
import os
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import torch

NodeId = Union[int, str]

__all__ = ["read_edges", "taxonomy_levels", "check_group_names", "encode_names"]

# A node's place in an error message: "edges[3]", "parents['dog']", "tax.csv line 4".
_Edge = tuple[Union[NodeId, None], NodeId, str]


# ---------------------------------------------------------------------------
# Reading the edges
# ---------------------------------------------------------------------------


def _node_id(value: Any, where: str, role: str) -> NodeId:
    if isinstance(value, (str, np.str_)):
        text = str(value)
        if not text.strip():
            raise ValueError(f"{where}: the {role} id is empty")
        return text
    if isinstance(value, (bool, np.bool_)) or value is None:
        raise TypeError(f"{where}: node ids must be strings or integers, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{where}: node ids must be strings or integers, got {type(value).__name__} {value!r}"
        ) from None


def read_edges(path: str | os.PathLike) -> list[tuple[str | None, str]]:
    """The ``(parent, child)`` pairs of a CSV file (a ``.tsv`` or ``.tab`` file is tab-separated).

    One edge per row, two columns ``parent,child``; or a header row naming a
    ``parent`` and a ``child`` column among others. An empty parent marks a
    top-level node. Blank rows and rows starting with ``#`` are skipped; ids
    are stripped of surrounding spaces and kept as strings.

    Raises:
        ValueError naming the file and line of a malformed row.
    """
    return [(p, c) for p, c, _ in _read_edges(os.fspath(path))]


def _read_edges(path: str) -> list[_Edge]:
    delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    edges: list[_Edge] = []
    columns: tuple[int, int] | None = None
    first = True
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            for row in reader:
                fields = [field.strip() for field in row]
                if not any(fields) or fields[0].startswith("#"):
                    continue
                where = f"{path} line {reader.line_num}"
                if first:
                    first = False
                    lowered = [field.lower() for field in fields]
                    if "parent" in lowered and "child" in lowered:
                        columns = (lowered.index("parent"), lowered.index("child"))
                        continue
                if columns is None:
                    if len(fields) != 2:
                        raise ValueError(
                            f"{where}: expected 2 fields (parent{delimiter}child), got {len(fields)}: {row!r}"
                        )
                    parent, child = fields
                else:
                    if len(fields) <= max(columns):
                        raise ValueError(f"{where}: expected at least {max(columns) + 1} fields, got {len(fields)}")
                    parent, child = fields[columns[0]], fields[columns[1]]
                if not child:
                    raise ValueError(f"{where}: the child id is empty")
                edges.append((parent or None, child, where))
    except UnicodeDecodeError as exc:
        raise ValueError(f"taxonomy file {path!r} is not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise ValueError(f"taxonomy file {path!r}: {exc}") from None
    return edges


def _edges(edges: Any) -> list[_Edge]:
    if isinstance(edges, (str, os.PathLike)):
        return _read_edges(os.fspath(edges))
    if isinstance(edges, Mapping):
        items: Iterable[tuple[Any, Any, str]] = (
            (parent, child, f"parents[{child!r}]") for child, parent in edges.items()
        )
    elif isinstance(edges, Iterable) and not isinstance(edges, (bytes, torch.Tensor)):
        items = []
        for i, pair in enumerate(edges):
            if isinstance(pair, (str, bytes)) or not isinstance(pair, (Sequence, np.ndarray)) or len(pair) != 2:
                raise TypeError(f"edges[{i}] must be a (parent, child) pair, got {pair!r}")
            items.append((pair[0], pair[1], f"edges[{i}]"))
    else:
        raise TypeError(
            "edges must be a CSV path, a dict child -> parent or an iterable of (parent, child) pairs, "
            f"got {type(edges).__name__}"
        )
    out: list[_Edge] = []
    for parent, child, where in items:
        child_id = _node_id(child, where, "child")
        parent_id = None if parent is None or (isinstance(parent, str) and not parent.strip()) else _node_id(
            parent, where, "parent"
        )
        out.append((parent_id, child_id, where))
    return out


# ---------------------------------------------------------------------------
# Edges → levels
# ---------------------------------------------------------------------------


def taxonomy_levels(edges: Any, classes: Sequence[Any] | None = None) -> dict[str, Any]:
    """The constructor arguments of a :class:`~lmm_fast.Hierarchy` from a tree's edges.

    Args:
        edges: a CSV path (:func:`read_edges`), a dict ``child -> parent`` or
            an iterable of ``(parent, child)`` pairs; ids are strings or
            integers (``None`` or ``""`` as the parent: a top-level node).
        classes: the leaves in class-index order (default: first appearance).

    Raises:
        ValueError naming the edge: a node that is its own parent, an edge
        given twice, a node with two parents, a cycle, two ids with the same
        text (``1`` and ``"1"``), an unknown, repeated or non-leaf entry of
        ``classes``, a leaf missing from it, fewer than 2 classes, or a
        taxonomy with no level between the root and the classes.
    """
    pairs = _edges(edges)
    if not pairs:
        raise ValueError("the taxonomy has no edges")
    parent_of: dict[NodeId, NodeId | None] = {}
    where_of: dict[NodeId, str] = {}
    by_text: dict[str, NodeId] = {}
    order: dict[NodeId, None] = {}  # every node, in order of first appearance
    children: dict[NodeId, list[NodeId]] = {}

    def register(node: NodeId, where: str) -> None:
        if node in order:
            return
        other = by_text.setdefault(str(node), node)
        if other != node or type(other) is not type(node):
            raise ValueError(
                f"{where}: ids {other!r} and {node!r} are different nodes with the same name; "
                f"use one type for the ids"
            )
        order[node] = None

    for parent, child, where in pairs:
        if parent is not None:
            register(parent, where)
        register(child, where)
        if parent is not None and parent == child:
            raise ValueError(f"{where}: node {child!r} is its own parent")
        if child in where_of:
            if parent_of[child] == parent:
                raise ValueError(f"{where}: the edge {parent!r} -> {child!r} is given twice (also {where_of[child]})")
            if parent_of[child] is None or parent is None:
                raise ValueError(
                    f"{where}: node {child!r} is both a top-level node and a child of "
                    f"{parent_of[child] if parent is None else parent!r} (also {where_of[child]})"
                )
            raise ValueError(
                f"{where}: node {child!r} has two parents, {parent_of[child]!r} ({where_of[child]}) and "
                f"{parent!r}; a taxonomy must be a tree"
            )
        parent_of[child] = parent
        where_of[child] = where
        if parent is not None:
            children.setdefault(parent, []).append(child)
    roots = [node for node in order if parent_of.get(node) is None]

    depth: dict[NodeId, int] = {}
    virtual_root = len(roots) != 1 or roots[0] not in children
    stack = [(r, 1 if virtual_root else 0) for r in reversed(roots)]
    while stack:
        node, d = stack.pop()
        depth[node] = d
        stack.extend((c, d + 1) for c in reversed(children.get(node, ())))
    if len(depth) < len(order):
        raise ValueError(_describe_cycle(next(n for n in order if n not in depth), parent_of, where_of))

    leaves = [node for node in order if node not in children]
    class_ids = leaves if classes is None else _check_classes(classes, leaves, order, children, by_text)
    n = len(class_ids)
    if n < 2:
        raise ValueError(f"a hierarchy needs at least 2 classes (leaves), the taxonomy has {n}")

    root_name = None if virtual_root else str(roots[0])
    padding_name = root_name
    if padding_name is None:
        padding_name = "root"
        while padding_name in by_text:
            padding_name += "_"
    deepest = max(depth[c] for c in class_ids)
    # Groups of every class at every depth 1 … deepest-1: its ancestor there,
    # or, below its own depth, the padding node of its parent.
    keys: list[list[Any]] = [[None] * n for _ in range(deepest - 1)]
    for y, leaf in enumerate(class_ids):
        d = depth[leaf]
        parent = parent_of[leaf]
        padded = ("pad", parent)
        for k in range(d, deepest):
            keys[k - 1][y] = padded
        node = parent
        for k in range(d - 1, 0, -1):
            keys[k - 1][y] = node
            node = parent_of.get(node)

    assignments, sizes, names, depths = [], [], [], []
    for k, level in enumerate(keys, start=1):
        ids: dict[Any, int] = {}
        groups = [ids.setdefault(key, len(ids)) for key in level]
        count = len(ids)
        if count <= 1 or count >= n or (sizes and count <= sizes[-1]):
            continue
        assignments.append(torch.tensor(groups, dtype=torch.int64))
        sizes.append(count)
        names.append([_group_name(key, padding_name) for key in ids])
        depths.append(k)
    if not sizes:
        raise ValueError(
            f"the taxonomy has no level of groups between the root and its {n} classes (each depth holds one "
            f"group, or one class per group): the LMM needs at least one upper level"
        )
    info: dict[str, Any] = {"source": "parents", "depths": depths, "deepest_class": deepest}
    if root_name is not None:
        info["root"] = root_name
    return dict(
        assignments=assignments,
        level_sizes=sizes,
        class_names=[str(c) for c in class_ids],
        group_names=names,
        info=info,
    )


def _group_name(key: Any, padding_name: str) -> str:
    if isinstance(key, tuple):  # ("pad", parent)
        return padding_name if key[1] is None else str(key[1])
    return str(key)


def _check_classes(
    classes: Sequence[Any],
    leaves: list[NodeId],
    order: Mapping[NodeId, None],
    children: Mapping[NodeId, list[NodeId]],
    by_text: Mapping[str, NodeId],
) -> list[NodeId]:
    if isinstance(classes, (str, bytes)):
        raise TypeError("classes must be a sequence of node ids, got a single string")
    out: list[NodeId] = []
    seen: dict[NodeId, int] = {}
    for i, value in enumerate(classes):
        node = _node_id(value, f"classes[{i}]", "class")
        if node not in order:
            hint = ""
            if str(node) in by_text:
                hint = f" (the taxonomy has {by_text[str(node)]!r}: ids read from a file are strings)"
            raise ValueError(f"classes[{i}] = {node!r} is not a node of the taxonomy{hint}")
        if node in seen:
            raise ValueError(f"classes[{i}] = {node!r} repeats classes[{seen[node]}]")
        if node in children:
            kids = children[node]
            raise ValueError(
                f"classes[{i}] = {node!r} is not a leaf (it has {len(kids)} children, e.g. {kids[0]!r}); "
                f"the classes are the leaves of the taxonomy"
            )
        seen[node] = i
        out.append(node)
    missing = [leaf for leaf in leaves if leaf not in seen]
    if missing:
        raise ValueError(
            f"{len(missing)} leaves of the taxonomy are not in classes, e.g. {missing[:5]}; every leaf is a class"
        )
    return out


def _describe_cycle(start: NodeId, parent_of: Mapping[NodeId, NodeId | None], where_of: Mapping[NodeId, str]) -> str:
    path = [start]
    seen = {start: 0}
    node = parent_of[start]
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = parent_of[node]
    cycle = path[seen[node]:]
    # Listed from ancestor to descendant, back to the first.
    cycle = list(reversed(cycle))
    text = " -> ".join(repr(c) for c in cycle + [cycle[0]])
    return f"the taxonomy has a cycle: {text} (edges at {', '.join(where_of[c] for c in cycle)})"


# ---------------------------------------------------------------------------
# Group names
# ---------------------------------------------------------------------------


def encode_names(values: Any, name: str) -> tuple[torch.Tensor, list[str]] | None:
    """Group ids and names of one level given as strings (sorted order), or None if not strings."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "USO":
            return None
        values = values.tolist()
    if isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)) or not values:
        return None
    strings = [isinstance(v, (str, np.str_)) for v in values]
    if not any(strings):
        return None
    if not all(strings):
        bad = strings.index(False)
        raise TypeError(f"{name} mixes group names (strings) and other values, e.g. {name}[{bad}] = {values[bad]!r}")
    names = sorted({str(v) for v in values})
    index = {g: i for i, g in enumerate(names)}
    return torch.tensor([index[str(v)] for v in values], dtype=torch.int64), names


def check_group_names(group_names: Any, level_sizes: Sequence[int]) -> list[list[str]] | None:
    """None, or one list of ``N_l`` distinct strings per upper level."""
    if group_names is None:
        return None
    if isinstance(group_names, (str, bytes)) or not isinstance(group_names, Sequence):
        raise TypeError(f"group_names must be a list with one list of names per level, got {type(group_names).__name__}")
    if len(group_names) != len(level_sizes):
        raise ValueError(f"group_names has {len(group_names)} levels but there are {len(level_sizes)} upper levels")
    out = []
    for level, (names, k) in enumerate(zip(group_names, level_sizes)):
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or len(names) != k:
            got = len(names) if isinstance(names, Sequence) else type(names).__name__
            raise ValueError(f"group_names[{level}] must list the level's {k} group names, got {got}")
        for g, text in enumerate(names):
            if not isinstance(text, str):
                raise TypeError(f"group_names[{level}][{g}] must be a str, got {type(text).__name__}")
        if len(set(names)) != k:
            seen: dict[str, int] = {}
            for g, text in enumerate(names):
                if text in seen:
                    raise ValueError(f"group_names[{level}][{g}] = {text!r} repeats group {seen[text]}")
                seen[text] = g
        out.append(list(names))
    return out
