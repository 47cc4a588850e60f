"""The structure of the package, checked on its sources: the arrows of the
imports run one way (no import circle), the comparison job stays apart from
the library, the tests and benchmarks use public names only, and every
Python snippet of the README and the docs runs as written."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "lmm_fast"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: pathlib.Path) -> set[str]:
    """The lmm_fast modules a file imports, at any depth (lazy imports
    inside functions included, ``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for block in ast.walk(tree) if _type_checking_block(block) for n in ast.walk(block)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "lmm_fast")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "lmm_fast":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES or sub == "lmm_fast._C" else node.module)
    return out


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_layout_is_the_documented_one():
    for name in ("lmm_fast.ops.loss", "lmm_fast.ops.predict", "lmm_fast.ops.gibbs",
                 "lmm_fast.reference.loss", "lmm_fast.reference.predict", "lmm_fast.reference.gibbs",
                 "lmm_fast.loss", "lmm_fast.head", "lmm_fast.predict", "lmm_fast.theta", "lmm_fast.calibration",
                 "lmm_fast.adaptation.adapter", "lmm_fast.adaptation.guard", "lmm_fast.hierarchy.tree",
                 "lmm_fast.train", "lmm_fast.metrics", "lmm_fast.cli", "lmm_fast.compare.command"):
        assert name in MODULES, f"{name} is missing from src/"
    assert not (ROOT / "lmm_fast").exists(), "a top-level lmm_fast/ folder would shadow the installed package"
    assert not (ROOT / "benchmarks" / "__init__.py").exists(), "benchmarks/ must not be a package"


def test_no_import_circle():
    circles = [c for c in strongly_connected(GRAPH) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def test_the_graph_sees_lazy_imports():
    # The check above would pass vacuously if it missed imports inside functions.
    assert "lmm_fast.compare" in GRAPH["lmm_fast.cli"]
    assert "lmm_fast.compare.variants" in GRAPH["lmm_fast.compare.protocol"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_the_comparison_job():
    for name, imports in GRAPH.items():
        if name.startswith("lmm_fast.compare") or name == "lmm_fast.cli":
            continue
        bad = sorted(m for m in imports if m.startswith("lmm_fast.compare"))
        assert not bad, f"{name} imports the comparison job: {bad}"


def test_production_ops_never_import_the_oracles():
    for name, imports in GRAPH.items():
        if name.startswith(("lmm_fast.reference", "lmm_fast.compare")) or name == "lmm_fast.testing":
            continue
        bad = sorted(m for m in imports if m.startswith("lmm_fast.reference"))
        assert not bad, f"{name} imports the test oracles: {bad}"


@pytest.mark.parametrize("folder", ["tests", "benchmarks", "examples"])
def test_tests_and_benchmarks_use_public_names(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmm_fast"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                hidden = [p for p in node.module.split(".") if p.startswith("_")]
                assert not private and not hidden, f"{path.name}:{node.lineno} imports a private name"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not any(p.startswith("_") for p in alias.name.split(".")), \
                        f"{path.name}:{node.lineno} imports a private module"


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text[: match.start()].count("\n") + 1, match.group(1)))
    return blocks


SNIPPETS = [(path, line, code) for path in DOCS for line, code in python_blocks(path)]


def test_the_docs_have_snippets():
    assert len(SNIPPETS) >= 5
    assert any(path.name == "README.md" for path, _, _ in SNIPPETS)


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code", SNIPPETS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in SNIPPETS])
def test_snippet_runs_as_written(path, line, code, tmp_path):
    # Fed to `python -` from the checkout root, as a reader pasting it there
    # would run it (the checkout root first on sys.path: the source folder
    # must not shadow the installed package).
    done = subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{path.name}:{line} failed:\n{done.stderr[-3000:]}"
