"""Input checks: labels and non-finite values, reported by split, key and example index.

A bad input rarely fails where it is: a label equal to ``num_classes`` turns the loss into NaN
(and the error then blames the learning rate), a label of -1 trains silently against nothing, a
NaN target in a regression validation split makes the validation metric NaN so that model
selection never improves and the untrained epoch-0 model is reported. These checks stop such data
at the door, with a message that names the split, the entry and the first bad example.

* classification labels: an integer dtype, every value in ``[0, num_classes)``;
* regression labels: finite (NaN and ±inf rejected);
* every floating input (each modality, the label): finite.

:func:`check_split` works on whole in-memory splits (vectorised, in chunks so that a large array
is never copied whole) and on single batches (``index`` gives the record index of each row,
``valid`` leaves padding rows out). :class:`mcr_jax.data.dataset.Dataset` calls it for every
in-memory split when a dataset is loaded, and on every batch of the sources read example by example.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from mcr_jax.data.types import LABEL_KEY, TASKS

__all__ = ["check_split"]

# Elements per chunk of the finiteness scan of an in-memory array (bounds the temporary bool array).
_CHUNK_ELEMENTS = 1 << 22


def check_split(arrays: Mapping[str, np.ndarray], *, split: str, keys: Iterable[str], task: str,
                num_classes: int, label_key: str = LABEL_KEY, index: np.ndarray | None = None,
                valid: np.ndarray | None = None, scope: str = "split") -> None:
    """Raises ``ValueError`` at the first bad label or non-finite value among ``keys``.

    Args:
      arrays: ``{key: array [N, ...]}``: a whole split (an ``ArraySplit`` or a dict) or one batch.
      split: the split's name, for the message.
      keys: the entries to check; each must be present. Floating entries are checked for NaN and
        ±inf; ``label_key`` (when listed) is checked against ``task`` and ``num_classes``.
      task: ``"classification"`` or ``"regression"``.
      num_classes: ``C``; classification labels must lie in ``[0, C)``.
      index: ``int [N]``, the example index reported for each row (default: the row number).
      valid: ``bool [N]``, the rows to check (default: all; padding rows are left out).
      scope: what the rows are ("split" or "batch"), for the count in the message.

    Raises:
      ValueError: naming the split, the key, the first bad example's index and value, and how
        many of the checked rows are bad.
    """
    for key in keys:
        if key not in arrays:
            raise ValueError(f"split {split!r} has no entry {key!r}; it has {sorted(arrays)}.")
        x = np.asarray(arrays[key])
        if x.ndim == 0:
            raise ValueError(f"split {split!r}, key {key!r}: expected an array [N, ...], got a scalar.")
        if x.shape[0] == 0 and scope == "split":
            raise ValueError(f"split {split!r} is empty ({key!r} has 0 rows): a run needs examples in train, "
                             "validation and test; check the config.data split sizes or the dataset files.")
        if key == label_key and task == "classification" and x.ndim != 1:
            raise ValueError(f"split {split!r}: classification labels must be one integer per example, shape "
                             f"[N]; got shape {x.shape} (squeeze a trailing axis of size 1).")
        where = _Rows(split, key, x.shape[0], index, valid, scope)
        if key == label_key:
            _check_labels(x, where, task=task, num_classes=num_classes)
        elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating):
            _check_finite(x, where, what="value")


class _Rows:
    """Which rows are checked and how a row is named in a message."""

    def __init__(self, split, key, n, index, valid, scope):
        self.split, self.key, self.n, self.scope = split, key, n, scope
        self.index = None if index is None else np.asarray(index).reshape(-1)
        self.valid = None if valid is None else np.asarray(valid, bool).reshape(-1)
        for name, arr in (("index", self.index), ("valid", self.valid)):
            if arr is not None and arr.shape[0] != n:
                raise ValueError(f"check_split: {name} has {arr.shape[0]} rows, {key!r} has {n}.")
        self.checked = n if self.valid is None else int(self.valid.sum())

    def bad_rows(self, bad: np.ndarray) -> np.ndarray:
        """Row numbers of the bad rows (``bad``: bool [N]) among the checked ones."""
        if self.valid is not None:
            bad = bad & self.valid
        return np.flatnonzero(bad)

    def name(self, row: int) -> int:
        return int(row) if self.index is None else int(self.index[row])

    def prefix(self) -> str:
        return f"split {self.split!r}, key {self.key!r}"

    def count(self, n_bad: int) -> str:
        return f"{n_bad} of {self.checked} examples of this {self.scope}"


def _check_finite(x: np.ndarray, where: _Rows, *, what: str) -> None:
    n = x.shape[0]
    per_row = max(1, int(np.prod(x.shape[1:], dtype=np.int64)))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    bad = np.zeros(n, bool)
    for lo in range(0, n, step):
        chunk = x[lo:lo + step]
        bad[lo:lo + step] = ~np.isfinite(chunk.reshape(chunk.shape[0], -1)).all(axis=1)
    if not bad.any():
        return
    rows = where.bad_rows(bad)
    if rows.size == 0:
        return
    first = int(rows[0])
    example = np.asarray(x[first])
    pos = tuple(int(i) for i in np.argwhere(~np.isfinite(example))[0]) if example.ndim else ()
    at = f" at position {pos}" if pos else ""
    raise ValueError(
        f"{where.prefix()}: non-finite {what} {example[pos] if pos else example} at index "
        f"{where.name(first)}{at} ({where.count(rows.size)} have NaN or ±inf). {_HINTS[what]}"
    )


_HINTS = {
    "value": ("A NaN or ±inf input makes the loss (or the validation metric) NaN: repair these values "
              "in the loader (e.g. np.nan_to_num, counting what you changed) or drop the examples."),
    "label": ("A NaN or ±inf target makes the loss NaN, or, in validation, the selection metric NaN so "
              "that no epoch is ever selected over the untrained model: drop these examples in the loader."),
}


def _check_labels(y: np.ndarray, where: _Rows, *, task: str, num_classes: int) -> None:
    if task not in LABEL_CHECKS:
        raise ValueError(f"check_split: task must be one of {sorted(LABEL_CHECKS)}, got {task!r}.")
    LABEL_CHECKS[task](y, where, num_classes)


def _check_real_labels(y: np.ndarray, where: _Rows, num_classes: int) -> None:
    if not (np.issubdtype(y.dtype, np.number) and not np.issubdtype(y.dtype, np.bool_)):
        raise ValueError(f"{where.prefix()}: regression labels must be numbers, got dtype {y.dtype}.")
    if np.issubdtype(y.dtype, np.inexact):
        _check_finite(y, where, what="label")


def _check_class_labels(y: np.ndarray, where: _Rows, num_classes: int) -> None:
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating):
            whole = np.isfinite(y) & (y == np.round(y))
            rows = where.bad_rows((~whole).reshape(y.shape[0], -1).any(axis=1))
            if rows.size:
                first = int(rows[0])
                raise ValueError(
                    f"{where.prefix()}: classification labels must be integers in [0, {num_classes}), "
                    f"got dtype {y.dtype} with the value {y[first]} at index {where.name(first)} "
                    f"({where.count(rows.size)} are not whole numbers). Is this a regression "
                    "dataset (DatasetInfo.task='regression')?"
                )
            rows = where.bad_rows(np.ones(y.shape[0], bool))
            first = int(rows[0]) if rows.size else 0
            raise ValueError(
                f"{where.prefix()}: classification labels must have an integer dtype, got {y.dtype} "
                f"(first label at index {where.name(first)}: {y[first]}); the values are whole "
                "numbers: cast them in the loader with labels.astype(np.int32)."
            )
        raise ValueError(
            f"{where.prefix()}: classification labels must have an integer dtype, got {y.dtype} "
            f"(first label at index {where.name(0)}: {y[0] if y.shape[0] else None}); give int32 "
            f"class ids in [0, {num_classes})."
        )
    out = (y < 0) | (y >= num_classes)
    rows = where.bad_rows(out.reshape(y.shape[0], -1).any(axis=1))
    if rows.size:
        first = int(rows[0])
        raise ValueError(
            f"{where.prefix()}: label {y[first]} at index {where.name(first)} is outside [0, "
            f"{num_classes}) (num_classes={num_classes}; {where.count(rows.size)} are outside). "
            "A label >= num_classes makes the loss NaN and a negative one (e.g. -1 for 'unlabelled') "
            "trains silently against nothing: drop or remap these examples, or fix num_classes."
        )


#: the label check of each task (``DatasetInfo.task``): ``fn(labels, rows, num_classes)`` raises
#: ``ValueError`` at the first bad label. ``mcr_jax.tasks`` has one task per entry.
LABEL_CHECKS = {"classification": _check_class_labels, "regression": _check_real_labels}
assert set(LABEL_CHECKS) == set(TASKS), "every task in mcr_jax.data.types.TASKS needs a label check"

