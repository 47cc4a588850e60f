"""A hierarchy as a tree for other tools: Newick (tree viewers, phylogenetics
libraries) and Graphviz DOT, and :func:`export`, which writes the format
that the file name's extension says.

Both draw the tree the LMM uses: a root, the groups of every upper level
(named by ``group_names``, else ``L<level>.G<group>``, levels 1-based), and
the classes (``class_names``, else their index). With ``collapse=True`` (the
default) no group with a single child is drawn: a group whose only child is
a group (the padding of a shallow branch of a taxonomy, or a cluster that
does not split) takes over that child's children under its own, coarser
name, and a group of one class gives way to the class. Branch lengths
(Newick) and minimum edge lengths (DOT) count the levels an edge spans, so
every class stays at distance L from the root and every group at its own
level: a taxonomy read by :meth:`~lmm_fast.Hierarchy.from_parents` exports
as the tree it was read from.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmm_fast.hierarchy.tree import Hierarchy

__all__ = ["to_newick", "to_dot", "export", "EXPORT_FORMATS"]

# Extension → format, for export() and ``lmm-fast hierarchy -o``.
EXPORT_FORMATS = {
    ".json": "json",
    ".json.gz": "json",
    ".nwk": "newick",
    ".newick": "newick",
    ".tre": "newick",
    ".tree": "newick",
    ".dot": "dot",
    ".gv": "dot",
}


# ---------------------------------------------------------------------------
# The tree of the levels
# ---------------------------------------------------------------------------


class _Node:
    __slots__ = ("label", "children", "length", "kind", "key")

    def __init__(self, label: str, kind: str, key: Any) -> None:
        self.label = label
        self.kind = kind  # "root", "group" or "class"
        self.key = key  # (level, group) for a group, the class index for a class
        self.children: list[_Node] = []
        self.length = 1  # levels between this node and its parent


def _tree(h: Hierarchy, collapse: bool) -> _Node:
    if not h.is_tree:
        raise ValueError(
            "only a tree exports as Newick or DOT (nested hard partitions); this hierarchy is "
            + ("dense (from_confusion)" if h.is_dense else "non-nested partitions")
        )
    group_names = h.group_names
    class_names = h.class_names
    root = _Node(str(h.info.get("root", "root")), "root", None)
    level_nodes: list[list[_Node]] = []
    for level, size in enumerate(h.level_sizes):
        names = group_names[level] if group_names is not None else [f"L{level + 1}.G{g}" for g in range(size)]
        level_nodes.append([_Node(names[g], "group", (level + 1, g)) for g in range(size)])
    parents = h.parents
    for g, node in enumerate(level_nodes[0]):
        root.children.append(node)
    for level in range(1, len(level_nodes)):
        up = parents[level - 1].tolist()
        for g, node in enumerate(level_nodes[level]):
            level_nodes[level - 1][up[g]].children.append(node)
    for y, g in enumerate(h.assignments[-1].tolist()):
        label = class_names[y] if class_names is not None else str(y)
        level_nodes[-1][g].children.append(_Node(label, "class", y))
    if collapse:
        _collapse(root)
    return root


def _collapse(root: _Node) -> None:
    stack = [root]
    while stack:
        node = stack.pop()
        for i, child in enumerate(node.children):
            while child.kind == "group" and len(child.children) == 1:
                only = child.children[0]
                if only.kind == "group":
                    # The same classes one level down: keep the coarser node, lengthen the edges below.
                    for grandchild in only.children:
                        grandchild.length += only.length
                    child.children = only.children
                else:
                    # A group of one class: the class hangs from the group's parent.
                    only.length += child.length
                    child = only
            node.children[i] = child
            stack.append(child)


def _walk(root: _Node):
    """Nodes in depth-first order, each with its parent (None for the root)."""
    stack: list[tuple[_Node, _Node | None]] = [(root, None)]
    while stack:
        node, parent = stack.pop()
        yield node, parent
        stack.extend((child, node) for child in reversed(node.children))


# ---------------------------------------------------------------------------
# Newick
# ---------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9.\-+]+")


def _newick_label(text: str) -> str:
    if _PLAIN.fullmatch(text):
        return text
    return "'" + text.replace("'", "''") + "'"


def to_newick(h: Hierarchy, *, collapse: bool = True, branch_lengths: bool = True) -> str:
    """The hierarchy as one Newick string, ending in ``;``.

    Internal nodes are labelled (the group names); labels that are not plain
    (letters, digits, ``.``, ``-``, ``+``) are single-quoted with ``'``
    doubled. ``branch_lengths`` writes ``:k``, the number of levels an edge
    spans (1 unless collapsed).

    Raises:
        ValueError if the hierarchy is not a tree.
    """
    root = _tree(h, collapse)
    out: list[str] = []
    # Iterative post-order: a deep taxonomy must not hit the recursion limit.
    stack: list[tuple[_Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if node.children and not done:
            out.append("(")
            stack.append((node, True))
            for i, child in enumerate(reversed(node.children)):
                stack.append((child, False))
                if i < len(node.children) - 1:
                    stack.append((_COMMA, False))
            continue
        if node is _COMMA:
            out.append(",")
            continue
        if node.children:
            out.append(")")
        out.append(_newick_label(node.label))
        if branch_lengths and node.kind != "root":
            out.append(f":{node.length}")
    return "".join(out) + ";"


_COMMA = _Node(",", "comma", None)


# ---------------------------------------------------------------------------
# Graphviz DOT
# ---------------------------------------------------------------------------


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(h: Hierarchy, *, collapse: bool = True, rankdir: str = "TB") -> str:
    """The hierarchy as a Graphviz ``digraph`` (render with ``dot -Tsvg``).

    Node ids are ``root``, ``g<level>_<group>`` and ``c<class>``; labels are
    the names. Groups are boxes, classes ellipses; an edge that spans several
    levels (``collapse``) has ``minlen`` set so that the ranks are the levels.

    Raises:
        ValueError if the hierarchy is not a tree, or for an unknown ``rankdir``.
    """
    if rankdir not in ("TB", "LR", "BT", "RL"):
        raise ValueError(f"rankdir must be one of TB, LR, BT, RL, got {rankdir!r}")
    root = _tree(h, collapse)

    def node_id(node: _Node) -> str:
        if node.kind == "root":
            return "root"
        if node.kind == "group":
            return f"g{node.key[0]}_{node.key[1]}"
        return f"c{node.key}"

    lines = [
        "digraph hierarchy {",
        f"  graph [rankdir={rankdir}];",
        "  node [shape=box, fontsize=10];",
    ]
    edges = []
    for node, parent in _walk(root):
        shape = ", shape=ellipse" if node.kind == "class" else ""
        lines.append(f"  {node_id(node)} [label={_dot_string(node.label)}{shape}];")
        if parent is not None:
            span = f" [minlen={node.length}]" if node.length != 1 else ""
            edges.append(f"  {node_id(parent)} -> {node_id(node)}{span};")
    return "\n".join(lines + edges + ["}"]) + "\n"


# ---------------------------------------------------------------------------
# Files by extension
# ---------------------------------------------------------------------------


def export_format(path: str | os.PathLike) -> str:
    """``"json"``, ``"newick"`` or ``"dot"`` from the name's extension (ValueError if unknown)."""
    name = os.fspath(path).lower()
    for ext in sorted(EXPORT_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return EXPORT_FORMATS[ext]
    raise ValueError(
        f"cannot tell the format of {os.fspath(path)!r} from its extension: use "
        f"{', '.join(EXPORT_FORMATS)} (JSON: the hierarchy file; Newick or Graphviz DOT: the tree)"
    )


def export(h: Hierarchy, path: str | os.PathLike, **options: Any) -> str:
    """Writes ``h`` in the format of the extension of ``path``; returns the format.

    ``.json``/``.json.gz``: :meth:`Hierarchy.save`; ``.nwk``/``.newick``/
    ``.tre``/``.tree``: :func:`to_newick`; ``.dot``/``.gv``: :func:`to_dot`.
    ``options`` go to the writer (e.g. ``collapse=False``). Newick and DOT
    are written next to ``path`` and renamed, like :meth:`Hierarchy.save`.

    Raises:
        ValueError for another extension (nothing is written).
    """
    fmt = export_format(path)
    if fmt == "json":
        if options:
            raise TypeError(f"JSON export takes no options, got {sorted(options)}")
        h.save(path)
        return fmt
    text = to_newick(h, **options) + "\n" if fmt == "newick" else to_dot(h, **options)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return fmt
