"""Tests of the ``lmm-fast hierarchy`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmm_fast.cli import main
from lmm_fast.hierarchy import Hierarchy

NUM_CLASSES = 60


@pytest.fixture(scope="module")
def data():
    """Features of 60 classes in 3 well separated super-groups, 4 rows per class."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 20
    means = np.repeat(centres, NUM_CLASSES // 3, axis=0) + rng.normal(size=(NUM_CLASSES, 16))
    labels = np.repeat(np.arange(NUM_CLASSES), 4)
    features = (means[labels] + 0.1 * rng.normal(size=(labels.size, 16))).astype(np.float32)
    return features, labels, means.astype(np.float32)


@pytest.fixture
def files(tmp_path, data):
    features, labels, means = data
    np.save(tmp_path / "F.npy", features)
    np.save(tmp_path / "L.npy", labels)
    np.save(tmp_path / "M.npy", means)
    return tmp_path


def run(argv, capsys):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_npy_inputs_write_a_valid_tree_and_summary(files, data, capsys):
    out_path = files / "tree.json"
    status, out, err = run(
        ["hierarchy", "--features", files / "F.npy", "--labels", files / "L.npy", "--levels", "3,12", "-o", out_path],
        capsys,
    )
    assert status == 0, err
    h = Hierarchy.load(out_path)
    assert h.num_classes == NUM_CLASSES and h.level_sizes == [3, 12]
    # The three planted super-groups must come out as the top level.
    truth = np.repeat(np.arange(3), NUM_CLASSES // 3)
    top = h.assignments[0].numpy()
    assert all(len(set(top[truth == g])) == 1 for g in range(3))
    assert "sigma = " in out and "level 1:" in out and "level 2:" in out and "total" in out
    assert f"{h.sigma:.6g}" in out
    # Same result as the library call with the same seed.
    features, labels, _ = data
    assert h == Hierarchy.from_features(features, labels, [3, 12])


def test_npz_pt_and_means_inputs_agree(files, data, capsys):
    features, labels, means = data
    np.savez(files / "FL.npz", features=features, labels=labels)
    torch.save({"feats": torch.from_numpy(features), "y": torch.from_numpy(labels)}, files / "FL.pt")
    paths = {name: files / f"{name}.json" for name in ("npy", "npz", "pt")}
    common = ["--levels", "3,12", "-q"]
    assert main(["hierarchy", "--features", str(files / "F.npy"), "--labels", str(files / "L.npy"), "-o", str(paths["npy"]), *common]) == 0
    assert main(["hierarchy", "--features", str(files / "FL.npz"), "-o", str(paths["npz"]), *common]) == 0
    assert main(["hierarchy", "--features", str(files / "FL.pt"), "--features-key", "feats", "--labels",
                 str(files / "FL.pt"), "--labels-key", "y", "-o", str(paths["pt"]), *common]) == 0
    trees = [Hierarchy.load(p) for p in paths.values()]
    assert trees[0] == trees[1] == trees[2]
    out, _ = capsys.readouterr()
    assert out == "", "--quiet must print nothing"
    status, _, err = run(["hierarchy", "--means", files / "M.npy", "--levels", "3,12", "-o", files / "m.json", "-q"], capsys)
    assert status == 0, err
    assert Hierarchy.load(files / "m.json").level_sizes == [3, 12]


def test_class_names_method_and_plot(files, capsys):
    names = [f"class_{i}" for i in range(NUM_CLASSES)]
    (files / "names.txt").write_text("\n".join(names) + "\n")
    (files / "names.json").write_text(json.dumps(names))
    for names_file in ("names.txt", "names.json"):
        status, out, err = run(
            ["hierarchy", "--means", files / "M.npy", "--levels", "3,12", "--method", "average",
             "--class-names", files / names_file, "-o", files / "t.json.gz", "--plot", files / "t.png"],
            capsys,
        )
        assert status == 0, err
        h = Hierarchy.load(files / "t.json.gz")
        assert h.class_names == names and h.info["method"] == "average"
        png = (files / "t.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--levels", "12,3"], "strictly increasing"),
        (["--levels", "3,60"], "must be < the number of classes"),
        (["--levels", "3,12", "--num-classes", "70"], "no samples"),
        (["--levels", "3,12", "--method", "ward", "--sigma", "2"], None),
    ],
)
def test_bad_levels_and_labels_fail_with_one_line(files, capsys, extra, message):
    argv = ["hierarchy", "--features", files / "F.npy", "--labels", files / "L.npy", "-o", files / "x.json", "-q", *extra]
    status, _, err = run(argv, capsys)
    if message is None:  # the control case: the same call with good arguments works
        assert status == 0 and (files / "x.json").exists(), err
        return
    assert status == 2
    assert "lmm-fast hierarchy: error:" in err and message in err
    assert "Traceback" not in err
    assert not (files / "x.json").exists()


def test_input_file_problems(files, capsys):
    np.save(files / "bad_labels.npy", np.linspace(0, 1, 240))
    np.save(files / "nan.npy", np.full((240, 16), np.nan, dtype=np.float32))
    (files / "corrupt.npy").write_bytes(b"garbage")
    base = ["hierarchy", "--levels", "3,12", "-o", files / "x.json", "-q"]
    cases = [
        (["--features", files / "F.npy"], "--labels is required"),
        (["--features", files / "F.npy", "--labels", files / "bad_labels.npy"], "labels must be an integer"),
        (["--features", files / "nan.npy", "--labels", files / "L.npy"], "NaN"),
        (["--features", files / "missing.npy", "--labels", files / "L.npy"], "does not exist"),
        (["--features", files / "corrupt.npy", "--labels", files / "L.npy"], "cannot read features file"),
        (["--features", files / "F.npy", "--labels", files / "L.npy", "--means", files / "M.npy"], "not both"),
        (["--means", files / "M.npy", "--class-names", files / "missing.txt"], "cannot read class names"),
    ]
    for extra, message in cases:
        status, _, err = run([*base, *extra], capsys)
        assert status == 2, (extra, err)
        assert message in err, (message, err)


def test_no_subcommand_prints_help_and_usage_errors_exit_2(capsys):
    status, _, err = run([], capsys)
    assert status == 2 and "hierarchy" in err
    for argv in (["hierarchy", "--levels", "a,b", "-o", "x.json"], ["hierarchy", "--levels", "3", "-o", "x", "--bogus"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


def test_python_dash_m_entry_point(files):
    # The package this test imported (installed, or an in-place build): a
    # subprocess run from the checkout would import the bare source folder.
    import lmm_fast

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(lmm_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=package_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "lmm_fast", "hierarchy", "--means", str(files / "M.npy"), "--levels", "3,12",
         "-o", str(files / "sub.json")],
        capture_output=True, text=True, env=env, timeout=120, cwd=str(files),
    )
    assert result.returncode == 0, result.stderr
    assert "level 2:" in result.stdout
    # Not a terminal: no progress bar may leak into the captured output.
    assert "it/s" not in result.stderr and "\r" not in result.stderr
    assert Hierarchy.load(files / "sub.json").num_classes == NUM_CLASSES
