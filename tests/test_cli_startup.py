"""The command line answers at once: `--help` of every entry point without
importing torch, while `import lmm_fast` in a program still imports
everything (and registers the operators) as before."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

import lmm_fast

PACKAGE = pathlib.Path(lmm_fast.__file__).resolve().parent
# The console script pip writes for `lmm-fast = "lmm_fast.cli:main"`.
CONSOLE_SCRIPT = """\
import re
import sys
from lmm_fast.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""
HELP_SECONDS = 2.0  # measured 0.06-0.13 s on the 2-core machine; torch alone takes 1.3 s


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _timed(argv, cwd):
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=120)
    return done, time.perf_counter() - started


def _imported(importtime_log: str) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", importtime_log, flags=re.M)}


@pytest.mark.parametrize("argv", [
    ["-m", "lmm_fast", "--help"],
    ["-m", "lmm_fast", "hierarchy", "--help"],
    ["-m", "lmm_fast", "compare", "--help"],
    ["-m", "lmm_fast.compare", "--help"],
    ["-m", "lmm_fast", "--version"],
], ids=lambda a: " ".join(a[1:]))
def test_help_answers_without_torch(argv, tmp_path):
    done, seconds = _timed([sys.executable, "-X", "importtime", *argv], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout or "lmm-fast" in done.stdout
    imported = _imported(done.stderr)
    assert "lmm_fast" in imported and "torch" not in imported and "numpy" not in imported, sorted(imported)
    assert seconds < HELP_SECONDS, f"{' '.join(argv)} took {seconds:.2f} s"


def test_the_console_script_answers_without_torch(tmp_path):
    script = tmp_path / "lmm-fast"
    script.write_text(CONSOLE_SCRIPT)
    scripts = [[sys.executable, "-X", "importtime", str(script)]]
    installed = pathlib.Path(sys.executable).with_name("lmm-fast")
    if installed.exists():  # an installed package (CI): the real script too
        scripts.append([sys.executable, "-X", "importtime", str(installed)])
    for command in scripts:
        for extra in (["--help"], ["compare", "--help"], ["hierarchy", "--help"]):
            done, seconds = _timed(command + extra, tmp_path)
            assert done.returncode == 0, done.stderr[-2000:]
            assert "torch" not in _imported(done.stderr), (command, extra)
            assert seconds < HELP_SECONDS, f"{command} {extra} took {seconds:.2f} s"


def test_a_usage_error_is_quick_too(tmp_path):
    done, seconds = _timed([sys.executable, "-X", "importtime", "-m", "lmm_fast", "compare", "--settings", "bogus"],
                           tmp_path)
    assert done.returncode == 2 and "settings must be among" in done.stderr
    assert "torch" not in _imported(done.stderr) and seconds < HELP_SECONDS


def test_import_lmm_fast_still_loads_everything(tmp_path):
    code = ("import sys, lmm_fast, torch; "
            "print('lmm_fast.loss' in sys.modules, 'FusedLMMLoss' in vars(lmm_fast), "
            "hasattr(torch.ops.lmm_fast, 'gibbs_sample'))")
    done, _ = _timed([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True", "True"], done.stderr[-2000:]


def test_names_load_on_first_use_when_the_command_line_starts(tmp_path):
    code = ("import sys; sys.argv[0] = '/usr/bin/lmm-fast'; import lmm_fast; "
            "print('torch' in sys.modules); lmm_fast.Hierarchy; print('torch' in sys.modules); "
            "from lmm_fast import FusedLMMLoss, metrics; import torch; "
            "print(FusedLMMLoss.__module__, metrics.__name__, hasattr(torch.ops.lmm_fast, 'gibbs_sample'), "
            "sorted(lmm_fast.__all__) == sorted(set(lmm_fast.__all__)), lmm_fast.build_info()['version'])")
    done, _ = _timed([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "lmm_fast.loss", "lmm_fast.metrics", "True", "True",
                                   lmm_fast.__version__]
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        lmm_fast.bogus  # noqa: B018


def test_every_public_name_is_visible_to_type_checkers():
    """The names of the lazy table and of the ``if TYPE_CHECKING:`` imports agree."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    table = next(node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", None) == "_EXPORTS")
    exported = {key.value for key in table.keys}
    checked = {alias.asname or alias.name for node in tree.body
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for imp in node.body for alias in imp.names}
    assert exported == checked
    assert set(lmm_fast.__all__) == exported | {"build_info"}
    for name in exported:
        assert getattr(lmm_fast, name) is not None
