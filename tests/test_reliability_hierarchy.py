"""Hierarchy construction and loading on hostile inputs: overflowing class
means finish (under a timeout, in a child process) with a valid hierarchy or
a clear error; every iterative loop ends; files with duplicates, bad ids,
deep nesting or a large declared Ψ fail fast with an error that names the
problem."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import lmm_fast
from lmm_fast.cli import main
from lmm_fast.hierarchy import Hierarchy, class_means, self_tuning_sigma, similarity_matrix

TIMEOUT_S = 180


def child_env(**extra: str) -> dict:
    """The environment of a child interpreter: it imports the lmm_fast this
    test imported (installed, or an in-place build)."""
    import os

    parent = os.path.dirname(os.path.dirname(os.path.abspath(lmm_fast.__file__)))
    path = os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_child(code: str, timeout: float = TIMEOUT_S) -> str:
    """Runs ``code`` in a fresh interpreter; a hang, a signal or an exception fails the test."""
    try:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                                timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        pytest.fail(f"no result after {timeout} s (a hang); finished before it:\n{out}")
    assert result.returncode >= 0, f"killed by signal {-result.returncode}:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_overflowing_class_means_finish_with_a_valid_hierarchy():
    # Before: 1e30 * randn looped forever in _capacitated_assign, 1e18 * randn
    # raised a TypeError, a 1e19 row an "invalid multinomial distribution",
    # Ward on 1e30 means returned sigma = inf (then save failed).
    out = run_child("""
        import math, tempfile, os, torch
        from lmm_fast import Hierarchy
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(300, 8, generator=gen)
        # four tight, well separated clusters of 75 classes
        centres = 10 * torch.randn(4, 8, generator=gen)
        blobs = centres.repeat_interleave(75, 0) + 0.01 * torch.randn(300, 8, generator=gen)
        wide = lambda x: x.double()
        cases = {
            "1e30 float32": (1e30 * base, {}),
            "1e19 float32": (1e19 * base, {}),
            "1e18 float32": (1e18 * base, {}),
            "one 1e19 row": (torch.cat([base[:299], torch.full((1, 8), 1e19)]), {}),
            "one 3e38 row": (torch.cat([base[:299], torch.full((1, 8), 3e38)]), {}),
            "near 1e18": (1e18 * (1 + 1e-6 * base), {}),
            "1e-30": (1e-30 * base, {}),
            "1e160 float64": (1e160 * wide(base), {}),
            "ward 1e30": (1e30 * base, {"method": "ward"}),
            "average 1e30": (1e30 * base, {"method": "average"}),
            "complete 1e30 sigma": (1e30 * base, {"method": "complete", "sigma": 1e30}),
            "cosine 1e30": (1e30 * base, {"metric": "cosine"}),
            "blobs 1e30": (1e30 * blobs, {}),
            "blobs near 1e18": (1e18 + 1e12 * wide(blobs), {}),
        }
        folder = tempfile.mkdtemp()
        for name, (means, kw) in cases.items():
            h = Hierarchy.from_class_means(means, [4, 20], **kw)
            assert h.level_sizes == [4, 20] and h.is_tree, name
            assert math.isfinite(h.sigma) and h.sigma > 0, (name, h.sigma)
            sizes = h.group_sizes()
            assert all(bool((s > 0).all()) for s in sizes), name
            if kw.get("method", "balanced") == "balanced":
                assert int(sizes[0].min()) >= 300 // 8 and int(sizes[0].max()) <= 2 * 300 // 4, (name, sizes[0])
            if name.startswith("blobs"):
                top = h.assignments[0]
                for b in range(4):
                    assert top[75 * b : 75 * (b + 1)].unique().numel() == 1, (name, top)
            path = os.path.join(folder, "h.json")
            h.save(path)
            assert Hierarchy.load(path) == h, name
            print(name, "ok", flush=True)
    """)
    assert out.count(" ok") == 14, out


def test_sigma_and_similarity_scale_with_the_means():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    sigma = self_tuning_sigma(x)
    big = self_tuning_sigma(2.0**200 * x)
    assert big == sigma * 2.0**200  # a power of two: exact
    assert torch.equal(similarity_matrix(x, sigma=sigma), similarity_matrix(2.0**200 * x, sigma=big))
    s = similarity_matrix(1e30 * x.float())
    assert bool(torch.isfinite(s).all()) and bool((s.diagonal() == 1).all())


def test_too_large_means_and_infinite_sigma_are_refused():
    x = torch.randn(20, 4, dtype=torch.float64)
    x[3] = 1.7e308
    with pytest.raises(ValueError, match="means: entries up to 1.7e.308 are too large"):
        Hierarchy.from_class_means(x, [2, 5])
    levels = Hierarchy.from_assignments([[0, 0, 1, 1]]).assignments
    with pytest.raises(ValueError, match="sigma must be None or a finite number > 0, got inf"):
        Hierarchy(levels, [2], sigma=float("inf"))


def test_class_means_of_features_near_the_float32_limit():
    features = torch.full((6, 3), 3e38)
    features[1::2] = 2e38
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    means = class_means(features, labels)
    assert means.dtype == torch.float32 and bool(torch.isfinite(means).all())
    torch.testing.assert_close(means, torch.full((3, 3), 2.5e38))


def test_iterative_loops_are_bounded_for_any_input():
    # Before: NaN or inf costs made _capacitated_assign propose to a full
    # part forever; _allocate_children looped when no count could move.
    out = run_child("""
        import numpy as np, torch
        from lmm_fast.hierarchy.clustering import _allocate_children, _capacitated_assign
        gen = torch.Generator().manual_seed(0)
        for fill in (float("nan"), float("inf"), -float("inf")):
            for b in (1, 2, 5):
                cost = torch.randn(40, b, generator=gen)
                cost[torch.rand(40, b, generator=gen) < 0.5] = fill
                lo = torch.full((b,), 40 // (2 * b), dtype=torch.long)
                hi = torch.full((b,), -(-40 // b) + 2, dtype=torch.long)
                labels = _capacitated_assign(cost, lo, hi)
                counts = torch.bincount(labels, minlength=b)
                assert bool((labels >= 0).all()) and bool((counts >= lo).all()) and bool((counts <= hi).all())
        cost = torch.full((10, 3), float("nan"))
        try:
            _capacitated_assign(cost, torch.zeros(3, dtype=torch.long), torch.full((3,), 2, dtype=torch.long))
        except ValueError as error:
            assert "part sizes cannot be met" in str(error)
        else:
            raise AssertionError("10 points in 3 parts of at most 2 accepted")
        try:
            _allocate_children(np.array([1, 1]), 5, 1, 1)
        except ValueError as error:
            assert "cannot be split" in str(error)
        else:
            raise AssertionError("5 children for 2 parents of 1 class accepted")
        print("done")
    """, timeout=60)
    assert "done" in out


# ------------------------------------------------------------------ loading
def small_dict():
    return Hierarchy.from_assignments([[0, 0, 1, 1, 2]], class_names=list("abcde")).to_dict()


def test_duplicate_class_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"class_names\[3\] = 'b' repeats class_names\[1\]"):
        Hierarchy.from_assignments([[0, 0, 1, 1]], class_names=["a", "b", "c", "b"])
    data = small_dict()
    data["class_names"][4] = "a"
    with pytest.raises(ValueError, match=r"class_names\[4\] = 'a' repeats"):
        Hierarchy.from_dict(data)


def test_duplicate_json_keys_are_refused(tmp_path):
    text = json.dumps(small_dict())
    path = tmp_path / "dup.json"
    path.write_text(text[:-1] + ', "sigma": 2.0, "sigma": 3.0}')
    with pytest.raises(ValueError, match="key 'sigma' occurs more than once"):
        Hierarchy.load(path)
    path.write_text(text.replace('"info": {', '"info": {"x": 1, "x": 2, '))
    with pytest.raises(ValueError, match="key 'x' occurs more than once"):
        Hierarchy.load(path)
    path.write_text(text)
    assert Hierarchy.load(path) == Hierarchy.from_dict(small_dict())


def test_duplicate_psi_entries_are_refused():
    data = Hierarchy.from_confusion(torch.eye(3) + 0.1).to_dict()
    entry = data["psi"][0]
    # the same (row, col) twice, the values still summing to 1 per row
    entry["rows"].append(entry["rows"][0])
    entry["cols"].append(entry["cols"][0])
    half = entry["values"][0] / 2
    entry["values"][0] = half
    entry["values"].append(half)
    with pytest.raises(ValueError, match=r"psi\[0\] lists entry \(0, 0\) more than once"):
        Hierarchy.from_dict(data)


def test_dense_psi_roundtrip_keeps_values_and_argmax(tmp_path):
    gen = torch.Generator().manual_seed(3)
    confusion = torch.rand(7, 7, generator=gen) * (torch.rand(7, 7, generator=gen) < 0.5)
    h = Hierarchy.from_confusion(confusion)
    h.save(tmp_path / "d.json.gz")
    loaded = Hierarchy.load(tmp_path / "d.json.gz")
    assert loaded == h
    assert torch.equal(loaded.psi()[0], h.psi()[0])
    assert torch.equal(loaded.psi(sparse=True)[0].to_dense(), h.psi()[0])
    assert torch.equal(loaded.assignments[0], h.assignments[0])


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        Hierarchy.load(path)
    with gzip.open(tmp_path / "deep.json.gz", "wt") as f:
        f.write('{"info": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        Hierarchy.load(tmp_path / "deep.json.gz")


@pytest.mark.parametrize("bad", [10**30, 2**40, -(2**70), 150_000_000])
def test_huge_group_ids_in_a_file_are_clear_errors(bad):
    data = small_dict()
    data["assignments"][0][2] = bad
    with pytest.raises(ValueError, match=r"assignments\[0\]\[2\] = %d is out of range \[0, 3\)" % bad):
        Hierarchy.from_dict(data)
    dense = Hierarchy.from_confusion(torch.eye(3) + 0.1).to_dict()
    dense["psi"][0]["rows"][1] = bad
    with pytest.raises(ValueError, match=r"psi\[0\] has indices outside .*rows\[1\] = %d" % bad):
        Hierarchy.from_dict(dense)


def test_huge_ids_fail_fast_without_allocating():
    # Before: ids 2^40 asked the allocator for 8.8 TB, 1.5e8 took seconds and GBs.
    out = run_child("""
        import resource, time, torch
        from lmm_fast import Hierarchy
        from lmm_fast.hierarchy import class_means
        start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        for bad in (2**40, 150_000_000):
            try:
                Hierarchy.from_assignments([torch.tensor([0, 0, 1, bad])])
            except ValueError as error:
                assert "assignments[0][3] = %d is too large" % bad in str(error), error
            else:
                raise AssertionError("accepted")
            try:
                class_means(torch.randn(4, 2), torch.tensor([0, 1, 2, bad]))
            except ValueError as error:
                assert "labels holds class id %d but there are only 4 samples" % bad in str(error), error
            else:
                raise AssertionError("accepted")
            try:
                class_means(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), num_classes=bad)
            except ValueError as error:
                assert "num_classes = %d but there are only 4 samples" % bad in str(error), error
            else:
                raise AssertionError("accepted")
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss  # KiB
        print("seconds", time.perf_counter() - start, "grown_mib", grown / 1024)
    """, timeout=60)
    seconds, grown = float(out.split()[1]), float(out.split()[3])
    assert grown < 100 and seconds < 10, out


def test_dense_psi_file_loads_without_an_n_by_n_matrix(tmp_path):
    # Before: a 279 KB file of a dense Ψ over 20 000 classes cost 1.6 GB and
    # several seconds to load; the entries are now checked and kept sparse.
    n = 20_000
    data = {
        "format": "lmm_fast.hierarchy", "format_version": 1, "num_classes": n, "level_sizes": [n],
        "nested": True, "assignments": [list(range(n))], "class_names": None, "sigma": None, "info": {},
        "psi": [{"shape": [n, n], "rows": list(range(n)), "cols": list(range(n)), "values": [1.0] * n}],
    }
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(data, separators=(",", ":")))
    out = run_child(f"""
        import resource, time
        from lmm_fast import Hierarchy
        start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        h = Hierarchy.load({str(path)!r})
        seconds = time.perf_counter() - start
        psi = h.psi(sparse=True)[0]
        assert h.is_dense and psi.shape == ({n}, {n}) and psi._nnz() == {n}
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss
        print("seconds", seconds, "grown_mib", grown / 1024)
    """, timeout=120)
    seconds, grown = float(out.split()[1]), float(out.split()[3])
    assert grown < 200 and seconds < 10, out  # before: 1.6 GB


def test_cli_huge_class_ids_exit_2_with_one_line(tmp_path, capsys):
    np.save(tmp_path / "F.npy", np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    np.save(tmp_path / "L.npy", np.array([0, 1, 2, 3, 0, 1, 2, 2**40]))
    status = main(["hierarchy", "--features", str(tmp_path / "F.npy"), "--labels", str(tmp_path / "L.npy"),
                   "--levels", "2", "-o", str(tmp_path / "x.json"), "-q"])
    _, err = capsys.readouterr()
    assert status == 2
    assert "lmm-fast hierarchy: error: labels holds class id 1099511627776" in err
    assert "Traceback" not in err and not (tmp_path / "x.json").exists()
