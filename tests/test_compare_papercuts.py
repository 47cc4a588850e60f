"""`lmm-fast compare` as a person meets it: one seed reads as single values
with a verdict that asks for more seeds, --settings prints only the tables
it ran, --epochs 1 works alone, progress bars show on a terminal (also one
that reports no size) and can be forced."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import lmm_fast
from lmm_fast.compare import main
from lmm_fast.compare.report import format_accuracy_tables


def blobs(n_classes: int, per_class: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    features = rng.normal(size=(n_classes, dim))[labels] * 3 + rng.normal(size=(labels.size, dim))
    return features.astype(np.float32), labels


@pytest.fixture(scope="module")
def one_seed_run(tmp_path_factory):
    """One seed, Table I settings only, --epochs 1 without --warmup-epochs, bars forced."""
    root = tmp_path_factory.mktemp("one_seed")
    x, y = blobs(n_classes=12, per_class=6, dim=5)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    out = root / "out"
    printed, bars = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(bars):
        code = main(["--features", str(root / "x.npy"), "--labels", str(root / "y.npy"), "--out", str(out),
                     "--seeds", "1", "--epochs", "1", "--settings", "flat,lmm,lmm_p", "--hidden", "8",
                     "--batch-size", "32", "--skip-speed", "--no-plots", "--threads", "1", "--progress"])
    return code, out, printed.getvalue(), bars.getvalue()


def test_one_seed_shows_single_values_and_asks_for_more_seeds(one_seed_run):
    code, _, printed, _ = one_seed_run
    assert code == 0
    # No fake spread: no "± 0.00" (nor any "mean ± std" cell) anywhere in the tables.
    assert not re.search(r"\d ± \d", printed), printed
    assert "1 seed: single values, no spread" in printed
    paired = printed.split("Paired difference to the baseline")[1].splitlines()[3:]
    paired = paired[: paired.index("")] if "" in paired else paired  # that table only
    rows = [line for line in paired if line.startswith("LMM")]
    assert len(rows) == 2 and all(line.rstrip().endswith("needs >= 2 seeds (--seeds)") for line in rows), rows
    assert "no win" not in printed


def test_settings_without_table_iv_print_no_table_iv(one_seed_run):
    _, out, printed, _ = one_seed_run
    assert "Table I shape" in printed and "Table IV" not in printed
    # The same tables from the saved summary: Table IV appears once one of its settings ran.
    summary = json.loads((out / "results.json").read_text())["accuracy"]["summary"]
    both = dict(summary, lmm_2level=dict(summary["lmm"], label="two-level LMM"))
    text = format_accuracy_tables(both, "task", 1)
    assert "Table I shape" in text and "Table IV shape" in text
    text = format_accuracy_tables({"flat": summary["flat"], "lmm_2level": both["lmm_2level"]}, "task", 1)
    assert "Table IV shape" in text and "Table I shape" not in text
    text = format_accuracy_tables({"flat": summary["flat"]}, "task", 1)
    assert "Table I shape" in text and "Table IV" not in text


def test_epochs_alone_gets_a_warmup_that_fits(one_seed_run):
    code, out, printed, _ = one_seed_run
    protocol = json.loads((out / "results.json").read_text())["accuracy"]["protocol"]
    assert code == 0 and protocol["epochs"] == 1 and protocol["warmup_epochs"] == 0
    runs = json.loads((out / "results.json").read_text())["accuracy"]["runs"]
    assert "reassigned" in runs["lmm_p"][0]  # the one epoch adapted
    assert "1 epochs (0 with Ψ fixed before adapting)" in printed


def test_progress_is_forced_by_the_flag_and_off_otherwise(one_seed_run, tmp_path):
    _, _, _, bars = one_seed_run
    assert "training:" in bars and "epoch" in bars  # stderr was not a terminal, --progress forced the bar
    x, y = blobs(n_classes=6, per_class=4, dim=3)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["--features", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                     "--out", str(tmp_path / "o"), "--seeds", "1", "--epochs", "1", "--settings", "flat",
                     "--hidden", "4", "--skip-speed", "--no-plots", "--threads", "1"]) == 0
    assert "training" not in err.getvalue() and "\r" not in err.getvalue()
    with pytest.raises(SystemExit):
        main(["--progress", "--no-progress"])


def _run_on_a_terminal(argv, cwd):
    """Runs argv with stderr on a fresh pseudo-terminal (which reports 0 x 0); returns (status, stderr text)."""
    master, slave = pty.openpty()
    assert os.get_terminal_size(slave) == os.terminal_size((0, 0))
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(lmm_fast.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run([sys.executable, "-m", "lmm_fast", *argv], stdout=subprocess.PIPE, stderr=slave,
                              stdin=subprocess.DEVNULL, env=env, cwd=cwd, timeout=300)
    finally:
        os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    return done.returncode, b"".join(chunks).decode("utf-8", "replace")


def test_bars_show_on_a_terminal_that_reports_no_size(tmp_path):
    status, err = _run_on_a_terminal(
        ["compare", "--skip-accuracy", "--speed-classes", "20", "--speed-batch", "4", "--speed-repeats", "1",
         "--threads", "1", "--out", str(tmp_path / "o")], tmp_path)
    assert status == 0, err
    assert "speed and memory:" in err and "case" in err and "%|" in err
    # The hierarchy command's per-level bars too.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "M.npy", rng.normal(size=(40, 4)).astype(np.float32))
    status, err = _run_on_a_terminal(["hierarchy", "--means", str(tmp_path / "M.npy"), "--levels", "3,10",
                                      "-o", str(tmp_path / "t.json")], tmp_path)
    assert status == 0, err
    assert "level 1/2 (3 groups)" in err and "%|" in err
