"""A user's own taxonomy: Hierarchy.from_parents (edges, dict, CSV; any depth,
unbalanced), named groups in from_assignments, Newick and DOT export, the
tree plot, and `lmm-fast hierarchy --parents` / string labels / -o by extension."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from lmm_fast import Hierarchy
from lmm_fast.cli import main
from lmm_fast.hierarchy import EXPORT_FORMATS, METHODS, METRICS, export, plot_tree, read_edges, to_dot, to_newick
from lmm_fast.hierarchy.plot import tree_layout

# life ─┬─ animals ─┬─ dog
#       │           └─ cat
#       └─ vehicles ┬─ car ─┬─ sedan
#                   │       └─ suv
#                   └─ bike
EDGES = [
    ("life", "animals"), ("life", "vehicles"), ("animals", "dog"), ("animals", "cat"),
    ("vehicles", "car"), ("car", "sedan"), ("car", "suv"), ("vehicles", "bike"),
]
NEWICK = "((dog:2,cat:2)animals:1,((sedan:1,suv:1)car:1,bike:2)vehicles:1)life;"


@pytest.fixture
def tree():
    return Hierarchy.from_parents(EDGES)


# ---------------------------------------------------------------------------
# from_parents: levels of an unbalanced tree
# ---------------------------------------------------------------------------


def test_unbalanced_tree_becomes_padded_levels(tree):
    assert tree.is_tree and tree.num_classes == 5 and tree.level_sizes == [2, 3]
    assert tree.class_names == ["dog", "cat", "sedan", "suv", "bike"]  # leaves in order of appearance
    assert [a.tolist() for a in tree.assignments] == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 2]]
    # Level 2 = depth 2: the shallow leaves keep their parent's group (padding).
    assert tree.group_names == [["animals", "vehicles"], ["animals", "car", "vehicles"]]
    assert tree.info == {"source": "parents", "depths": [1, 2], "deepest_class": 3, "root": "life"}
    # Distances follow the tree: dog-cat share level 2, sedan-bike only level 1.
    assert tree.lca_height(torch.tensor([0, 2, 0]), torch.tensor([1, 4, 4])).tolist() == [1, 2, 3]


def test_every_input_form_gives_the_same_tree(tree, tmp_path):
    assert Hierarchy.from_parents({child: parent for parent, child in EDGES}) == tree
    assert Hierarchy.from_parents(iter(EDGES)) == tree
    (tmp_path / "plain.csv").write_text("\n".join(f"{p},{c}" for p, c in EDGES) + "\n")
    (tmp_path / "header.csv").write_text(
        "# my taxonomy\nid,child, Parent \n\n" + "".join(f"{i}, {c} ,{p}\n" for i, (p, c) in enumerate(EDGES))
    )
    (tmp_path / "tabs.tsv").write_text("parent\tchild\n" + "".join(f"{p}\t{c}\n" for p, c in EDGES))
    for name in ("plain.csv", "header.csv", "tabs.tsv"):
        assert Hierarchy.from_parents(tmp_path / name) == tree, name
        assert Hierarchy.from_parents(str(tmp_path / name)) == tree, name
    assert read_edges(tmp_path / "header.csv")[:2] == [("life", "animals"), ("life", "vehicles")]


def test_integer_ids_and_the_virtual_root_name():
    h = Hierarchy.from_parents([(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6), (np.int64(2), 8)])
    assert h.class_names == ["3", "4", "5", "6", "8"] and h.group_names == [["1", "2"]] and h.info["root"] == "0"
    # A real node named "root" keeps its name; the virtual root's padding takes another.
    h = Hierarchy.from_parents([("root", "a"), ("root", "b"), ("x", "c"), ("x", "d"), (None, "e")])
    assert h.group_names == [["root", "x", "root_"]] and "root" not in h.info


def test_a_forest_hangs_from_a_virtual_root():
    # Two roots (0 and 10) and a top-level leaf (7), which joins the root's padding group.
    edges = [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6), (None, 10), (10, 11), (10, 12), (None, 7)]
    h = Hierarchy.from_parents(edges, classes=[7, 3, 4, 5, 6, 11, 12])
    # depth 1: the virtual root's padding {7}, 0 {3,4,5,6}, 10 {11,12};
    # depth 2: {7}, 1 {3,4}, 2 {5,6}, 10 padded {11,12}.
    assert [a.tolist() for a in h.assignments] == [[0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 3, 3]]
    assert h.group_names == [["root", "0", "10"], ["root", "1", "2", "10"]]
    assert h.class_names == ["7", "3", "4", "5", "6", "11", "12"] and h.info["depths"] == [1, 2]


def test_levels_that_refine_nothing_are_dropped():
    # A unary chain (A -> B) and a level where nothing splits (depth 2 = depth 1).
    edges = [("r", "A"), ("r", "C"), ("A", "B"), ("B", "a1"), ("B", "a2"), ("C", "c1"), ("C", "c2"),
             ("a2", "deep1"), ("a2", "deep2")]
    h = Hierarchy.from_parents(edges)
    assert h.class_names == ["a1", "c1", "c2", "deep1", "deep2"]
    # depths: 1 {A, C}, 2 {B, C'} (same partition: dropped), 3 {B', a2, C''}.
    assert h.info["depths"] == [1, 3] and h.level_sizes == [2, 3]
    assert h.group_names == [["A", "C"], ["B", "C", "a2"]]
    # A root over leaves only gives no upper level at all.
    with pytest.raises(ValueError, match="no level of groups"):
        Hierarchy.from_parents([("r", "x"), ("r", "y"), ("r", "z")])
    # Every bottom group holding one class is the class level itself: dropped.
    with pytest.raises(ValueError, match="no level of groups"):
        Hierarchy.from_parents([("r", "A"), ("r", "B"), ("A", "a"), ("B", "b")])


def test_a_deep_chain_does_not_recurse():
    edges = [(f"n{i}", f"n{i + 1}") for i in range(3000)] + [("n3000", "x"), ("n3000", "y"), ("n0", "z")]
    h = Hierarchy.from_parents(edges)
    assert h.num_classes == 3 and h.level_sizes == [2]
    assert h.to_newick(branch_lengths=False).count("(") == 2


@pytest.mark.parametrize(
    "edges, message",
    [
        ([("a", "b"), ("b", "b")], "node 'b' is its own parent"),
        ([("a", "b"), ("a", "c"), ("a", "b")], r"edges\[2\]: the edge 'a' -> 'b' is given twice \(also edges\[0\]\)"),
        ([("a", "b"), ("c", "b"), ("a", "d")], r"node 'b' has two parents, 'a' \(edges\[0\]\) and 'c'"),
        ([("a", "b"), (None, "b"), ("a", "c")], "'b' is both a top-level node and a child of 'a'"),
        ([("a", "b"), ("b", "c"), ("c", "a")], "cycle: 'a' -> 'b' -> 'c' -> 'a'|cycle: 'b' -> 'c' -> 'a' -> 'b'|cycle: 'c' -> 'a' -> 'b' -> 'c'"),
        ([("r", "x"), ("r", "y"), ("p", "q"), ("q", "p")], "cycle"),
        ([("r", 1), ("r", "1"), ("r", 2)], "ids 1 and '1' are different nodes with the same name"),
        ([("r", " "), ("r", "b")], "the child id is empty"),
        ([("r", True), ("r", "b")], "node ids must be strings or integers"),
        ([("r", 1.5), ("r", "b")], "node ids must be strings or integers, got float"),
        ([("r", "a", "b")], r"edges\[0\] must be a \(parent, child\) pair"),
        (["ab"], r"edges\[0\] must be a \(parent, child\) pair"),
        ([], "no edges"),
        ([("r", "only")], "at least 2 classes"),
    ],
)
def test_bad_taxonomies_are_refused_with_the_edge_named(edges, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Hierarchy.from_parents(edges)


def test_class_order_is_checked():
    with pytest.raises(ValueError, match=r"classes\[1\] = 'horse' is not a node"):
        Hierarchy.from_parents(EDGES, classes=["dog", "horse"])
    with pytest.raises(ValueError, match=r"classes\[1\] = 'dog' repeats classes\[0\]"):
        Hierarchy.from_parents(EDGES, classes=["dog", "dog"])
    with pytest.raises(ValueError, match=r"'car' is not a leaf \(it has 2 children, e.g. 'sedan'\)"):
        Hierarchy.from_parents(EDGES, classes=["dog", "car"])
    with pytest.raises(ValueError, match=r"3 leaves of the taxonomy are not in classes, e.g. \['sedan', 'suv', 'bike'\]"):
        Hierarchy.from_parents(EDGES, classes=["cat", "dog"])
    with pytest.raises(ValueError, match="ids read from a file are strings"):
        Hierarchy.from_parents([("0", "1"), ("0", "2"), ("1", "3"), ("1", "4"), ("2", "5")], classes=[3, 4, 5])
    h = Hierarchy.from_parents(EDGES, classes=["bike", "suv", "sedan", "cat", "dog"])
    assert h.class_names == ["bike", "suv", "sedan", "cat", "dog"]
    assert h.group_names[1][int(h.assignments[1][0])] == "vehicles"


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\nb,c,d\n")
    with pytest.raises(ValueError, match=r"bad\.csv line 2: expected 2 fields"):
        read_edges(tmp_path / "bad.csv")
    (tmp_path / "two.csv").write_text("a,b\nc,b\n")
    with pytest.raises(ValueError, match=r"two\.csv line 2: node 'b' has two parents, 'a' \(.*two\.csv line 1\)"):
        Hierarchy.from_parents(tmp_path / "two.csv")
    (tmp_path / "latin.csv").write_bytes("r,\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_edges(tmp_path / "latin.csv")


# ---------------------------------------------------------------------------
# Names: from_assignments with strings, the file format
# ---------------------------------------------------------------------------


def test_from_assignments_with_group_names():
    top = ["vehicles", "animals", "animals", "vehicles", "vehicles"]
    fine = np.array(["car", "dog", "dog", "bike", "car"])
    h = Hierarchy.from_assignments([top, fine], class_names=["sedan", "rex", "tom", "bmx", "suv"])
    # Names are numbered in sorted order and kept.
    assert h.group_names == [["animals", "vehicles"], ["bike", "car", "dog"]]
    assert [a.tolist() for a in h.assignments] == [[1, 0, 0, 1, 1], [1, 2, 2, 0, 1]]
    # An integer level beside a named one is named by its ids.
    h = Hierarchy.from_assignments([top, [0, 1, 2, 0, 2]], nested=False)
    assert h.group_names == [["animals", "vehicles"], ["0", "1", "2"]]
    # Nesting is still checked on named levels.
    with pytest.raises(ValueError, match="not nested"):
        Hierarchy.from_assignments([["a", "a", "b", "b", "b"], ["x", "y", "y", "z", "z"]])
    with pytest.raises(TypeError, match=r"mixes group names \(strings\) and other values"):
        Hierarchy.from_assignments([["a", 1, "b", "b"]])
    assert Hierarchy.from_assignments([[0, 0, 1, 1]]).group_names is None


def test_group_names_survive_save_and_load(tree, tmp_path):
    tree.save(tmp_path / "t.json")
    again = Hierarchy.load(tmp_path / "t.json")
    assert again == tree and again.group_names == tree.group_names and again.info["root"] == "life"
    data = json.loads((tmp_path / "t.json").read_text())
    # Files without names are written as before (no key).
    assert "group_names" not in Hierarchy.from_assignments([[0, 0, 1, 1]]).to_dict()
    for bad, message in (
        ([["a", "b"]], "group_names has 1 levels but there are 2"),
        ([["a", "b"], ["x", "y"]], r"group_names\[1\] must list the level's 3 group names, got 2"),
        ([["a", "a"], ["x", "y", "z"]], r"group_names\[0\]\[1\] = 'a' repeats group 0"),
        ([["a", 2], ["x", "y", "z"]], r"group_names\[0\]\[1\] must be a str"),
        ("ab", "group_names must be a list"),
    ):
        broken = dict(data, group_names=bad)
        with pytest.raises((ValueError, TypeError), match=message):
            Hierarchy.from_dict(broken, source="f.json")


# ---------------------------------------------------------------------------
# Newick, DOT, export by extension
# ---------------------------------------------------------------------------


def test_newick_is_the_taxonomy_it_was_read_from(tree):
    assert tree.to_newick() == NEWICK == to_newick(tree)
    assert tree.to_newick(branch_lengths=False) == "((dog,cat)animals,((sedan,suv)car,bike)vehicles)life;"
    # Without collapsing: every level drawn, the padding included.
    assert tree.to_newick(collapse=False, branch_lengths=False) == \
        "(((dog,cat)animals)animals,((sedan,suv)car,(bike)vehicles)vehicles)life;"


def test_newick_quotes_labels_and_names_unnamed_groups():
    h = Hierarchy.from_parents([("big cats", "lion's mane"), ("big cats", "tiger,x"), ("dogs", "a_b"),
                                ("dogs", "c:d")])
    assert h.to_newick(branch_lengths=False) == "(('lion''s mane','tiger,x')'big cats',('a_b','c:d')dogs)root;"
    clustered = Hierarchy.from_assignments([[0, 0, 1, 1, 1], [0, 1, 2, 2, 3]])
    text = clustered.to_newick(collapse=False)
    assert text == "(((0:1)L2.G0:1,(1:1)L2.G1:1)L1.G0:1,((2:1,3:1)L2.G2:1,(4:1)L2.G3:1)L1.G1:1)root;"
    # Collapsed: single-class groups give way to their class, lengths keep every class at depth L = 3.
    assert clustered.to_newick() == "((0:2,1:2)L1.G0:1,((2:1,3:1)L2.G2:1,4:2)L1.G1:1)root;"
    for bad in (Hierarchy.from_confusion(torch.eye(3) + 0.1),
                Hierarchy.from_assignments([[0, 0, 1, 1], [0, 1, 1, 2]], nested=False)):
        with pytest.raises(ValueError, match="only a tree exports"):
            bad.to_newick()
        with pytest.raises(ValueError, match="only a tree exports"):
            bad.to_dot()


def test_dot_has_every_node_once_and_keeps_levels_as_ranks(tree):
    text = tree.to_dot()
    assert text.startswith("digraph hierarchy {") and text.rstrip().endswith("}") and text == to_dot(tree)
    nodes = re.findall(r"^  (\w+) \[label=", text, flags=re.M)
    edges = re.findall(r"^  (\w+) -> (\w+)", text, flags=re.M)
    assert sorted(nodes) == sorted(["root", "g1_0", "g1_1", "g2_1", "c0", "c1", "c2", "c3", "c4"])
    assert len(edges) == len(nodes) - 1 and {child for _, child in edges} == set(nodes) - {"root"}
    assert "g1_0 -> c0 [minlen=2];" in text and "g1_1 -> c4 [minlen=2];" in text and "g2_1 -> c2;" in text
    assert 'root [label="life"];' in text and 'c4 [label="bike", shape=ellipse];' in text
    full = tree.to_dot(collapse=False, rankdir="LR")
    assert "minlen" not in full and "rankdir=LR" in full and len(re.findall(r" -> ", full)) == 10
    h = Hierarchy.from_parents([('say "hi"', "a\\b"), ('say "hi"', "c"), ("d", "e"), ("d", "f")])
    assert r'[label="say \"hi\""]' in h.to_dot() and r'[label="a\\b", shape=ellipse]' in h.to_dot()
    with pytest.raises(ValueError, match="rankdir"):
        tree.to_dot(rankdir="UP")


def test_export_writes_what_the_extension_says(tree, tmp_path):
    assert export(tree, tmp_path / "t.nwk") == "newick"
    assert (tmp_path / "t.nwk").read_text() == NEWICK + "\n"
    assert tree.export(tmp_path / "t.GV") == "dot" and (tmp_path / "t.GV").read_text() == tree.to_dot()
    assert tree.export(tmp_path / "t.json.gz") == "json" and Hierarchy.load(tmp_path / "t.json.gz") == tree
    assert tree.export(tmp_path / "t.tree", collapse=False).startswith("newick")
    assert (tmp_path / "t.tree").read_text().count("animals") == 2
    for bad in ("t.csv", "t.txt", "t"):
        with pytest.raises(ValueError, match="cannot tell the format"):
            tree.export(tmp_path / bad)
        assert not (tmp_path / bad).exists()
    with pytest.raises(TypeError, match="JSON export takes no options"):
        tree.export(tmp_path / "t.json", collapse=False)
    assert set(EXPORT_FORMATS.values()) == {"json", "newick", "dot"}


# ---------------------------------------------------------------------------
# The tree plot
# ---------------------------------------------------------------------------


def test_tree_layout_puts_every_node_above_its_children(tree):
    layout = tree_layout(tree)
    class_x = layout["class_x"]
    assert sorted(class_x.tolist()) == [0, 1, 2, 3, 4]
    assert layout["heights"] == [2.0, 1.0]
    for level, xs in enumerate(layout["group_x"]):
        groups = tree.assignments[level].numpy()
        for g, x in enumerate(xs):
            members = class_x[groups == g]
            assert members.min() <= x <= members.max()
    # vehicles sits midway between car (2.5) and its padding group over bike (4).
    assert layout["group_x"][1].tolist() == [0.5, 2.5, 4.0] and layout["group_x"][0].tolist() == [0.5, 3.25]
    assert layout["root_x"] == 1.875
    segments = layout["segments"]
    # One vertical per node below the root, one horizontal per node above the classes.
    assert segments.shape == (5 + 3 + 2 + 3 + 2 + 1, 2, 2)
    horizontal = segments[:, 0, 1] == segments[:, 1, 1]
    assert horizontal.sum() == 3 + 2 + 1
    assert (segments[~horizontal, 0, 0] == segments[~horizontal, 1, 0]).all()
    assert (segments[~horizontal, 1, 1] > segments[~horizontal, 0, 1]).all()
    assert segments[:, :, 1].min() == 0.0 and segments[:, :, 1].max() == 3.0


def test_plot_tree_writes_a_picture(tree, tmp_path):
    pytest.importorskip("matplotlib")
    plot_tree(tree, tmp_path / "t.png")
    png = (tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    big = Hierarchy.from_class_means(torch.randn(300, 4, generator=torch.Generator().manual_seed(0)), [4, 30])
    plot_tree(big, tmp_path / "big.png")  # no labels: 300 classes
    assert (tmp_path / "big.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="nested hierarchy"):
        plot_tree(Hierarchy.from_confusion(torch.eye(3) + 0.1), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------
# lmm-fast hierarchy: --parents, -o by extension, string labels
# ---------------------------------------------------------------------------


def run(argv, capsys):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_choices_match_the_library():
    from lmm_fast import cli

    assert cli._METHODS == METHODS and cli._METRICS == METRICS
    assert set(cli._OUTPUT_EXTENSIONS) == set(EXPORT_FORMATS)


def test_cli_reads_a_taxonomy_and_writes_every_format(tmp_path, capsys, tree):
    (tmp_path / "tax.csv").write_text("parent,child\n" + "".join(f"{p},{c}\n" for p, c in EDGES))
    outputs = [tmp_path / "t.json", tmp_path / "t.nwk", tmp_path / "t.dot"]
    argv = ["hierarchy", "--parents", tmp_path / "tax.csv", "--plot-tree", tmp_path / "t.png"]
    for path in outputs:
        argv += ["-o", path]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert Hierarchy.load(outputs[0]) == tree
    assert outputs[1].read_text() == NEWICK + "\n" and outputs[2].read_text() == tree.to_dot()
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert "5 classes (the leaves of" in out and "upper levels = tree depths [1, 2]" in out and "level 2:" in out
    # The class order from --class-names.
    (tmp_path / "order.txt").write_text("bike\nsuv\nsedan\ncat\ndog\n")
    status, _, err = run(["hierarchy", "--parents", tmp_path / "tax.csv", "--class-names", tmp_path / "order.txt",
                          "-o", tmp_path / "o.json", "-q"], capsys)
    assert status == 0, err
    assert Hierarchy.load(tmp_path / "o.json").class_names == ["bike", "suv", "sedan", "cat", "dog"]


def test_cli_taxonomy_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "cycle.csv").write_text("a,b\nb,c\nc,a\n")
    (tmp_path / "tax.csv").write_text("".join(f"{p},{c}\n" for p, c in EDGES))
    cases = [
        (["--parents", tmp_path / "cycle.csv"], "the taxonomy has a cycle"),
        (["--parents", tmp_path / "missing.csv"], "does not exist"),
        (["--parents", tmp_path / "tax.csv", "--levels", "2,3"], "--parents gives the levels itself: drop --levels"),
        (["--parents", tmp_path / "tax.csv", "--plot", tmp_path / "p.png"], "with --parents use --plot-tree"),
        (["--parents", tmp_path / "tax.csv", "--num-classes", "9"], "the taxonomy has 5 leaves"),
    ]
    for extra, message in cases:
        status, _, err = run(["hierarchy", *extra, "-o", tmp_path / "x.json", "-q"], capsys)
        assert status == 2 and message in err and "Traceback" not in err, (extra, err)
        assert err.startswith("lmm-fast hierarchy: error:") and err.count("\n") == 1
        assert not (tmp_path / "x.json").exists()


def test_cli_refuses_an_unknown_output_extension_before_any_work(tmp_path, capsys):
    np.save(tmp_path / "M.npy", np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32))
    status, _, err = run(["hierarchy", "--means", tmp_path / "M.npy", "--levels", "2,4", "-o", tmp_path / "t.json",
                          "-o", tmp_path / "x.csv"], capsys)
    assert status == 2 and "-o " in err and "x.csv: unknown extension" in err and ".nwk" in err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "t.json").exists()
    status, _, err = run(["hierarchy", "--means", tmp_path / "M.npy", "--levels", "2,4", "-o", tmp_path / "t.nwk",
                          "-q"], capsys)
    assert status == 0, err
    assert (tmp_path / "t.nwk").read_text().endswith(")root;\n")
    status, _, err = run(["hierarchy", "--means", tmp_path / "M.npy", "-o", tmp_path / "t.json", "-q"], capsys)
    assert status == 2 and "--levels is required (or give a taxonomy with --parents)" in err


def test_cli_takes_string_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = np.array(["zebra", "ant", "mole", "bee", "cod", "eel"])
    labels = np.repeat(words, 5)
    centres = {w: rng.normal(size=4) * (5 if i < 3 else -5) for i, w in enumerate(words)}
    features = np.stack([centres[w] + 0.1 * rng.normal(size=4) for w in labels]).astype(np.float32)
    np.save(tmp_path / "F.npy", features)
    np.save(tmp_path / "L.npy", labels)
    status, _, err = run(["hierarchy", "--features", tmp_path / "F.npy", "--labels", tmp_path / "L.npy",
                          "--levels", "2", "-o", tmp_path / "t.json", "-q"], capsys)
    assert status == 0, err
    h = Hierarchy.load(tmp_path / "t.json")
    assert h.class_names == sorted(words.tolist())
    ids = {w: i for i, w in enumerate(sorted(words.tolist()))}
    means = np.stack([features[labels == w].mean(0) for w in sorted(words.tolist())])
    assert h == Hierarchy.from_features(features, np.array([ids[w] for w in labels]), [2],
                                        class_names=sorted(words.tolist()))
    assert Hierarchy.from_class_means(means, [2]).assignments[0].tolist() == h.assignments[0].tolist()
    # With --class-names, the labels are numbered in that order; unknown labels are named.
    (tmp_path / "names.json").write_text(json.dumps(words.tolist()))
    status, _, err = run(["hierarchy", "--features", tmp_path / "F.npy", "--labels", tmp_path / "L.npy",
                          "--class-names", tmp_path / "names.json", "--levels", "2", "-o", tmp_path / "n.json",
                          "-q"], capsys)
    assert status == 0, err
    assert Hierarchy.load(tmp_path / "n.json").class_names == words.tolist()
    (tmp_path / "few.json").write_text(json.dumps(words.tolist()[:4]))
    status, _, err = run(["hierarchy", "--features", tmp_path / "F.npy", "--labels", tmp_path / "L.npy",
                          "--class-names", tmp_path / "few.json", "--levels", "2", "-o", tmp_path / "f.json"], capsys)
    assert status == 2 and "labels ['cod', 'eel'] are not in --class-names" in err
