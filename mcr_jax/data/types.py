"""The two types every loader returns: `DatasetInfo` and `ArraySplit`.

A loader returns ``(splits, info)`` with ``splits = {"train": ArraySplit, "validation": ...,
"test": ...}``. An `ArraySplit` holds one numpy array per entry, all with the same leading length
``N``: one ``float32 [N, *input_shapes[m]]`` array per modality ``m``, ``"label"`` (``int32 [N]``
for classification, ``float32 [N]`` for regression) and optional extra per-example entries (for
example the synthetic benchmark's ``"sample_type"``, ``int8 [N]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

TASKS = ("classification", "regression")

# Split entries that are never model inputs (standardisation and the like skip them).
LABEL_KEY = "label"
MASK_KEY = "mask"
#: every batch's int32 ``[B]`` column: each row's example index in its split (padding rows: 0).
INDEX_KEY = "index"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset.

    Attributes:
      name: dataset name, e.g. ``"synthetic"`` or ``"mfeat"``.
      modalities: ordered modality names; the model's encoders follow this order.
      input_shapes: per-example shape of each modality (no batch dimension), e.g. ``{"fou": (76,)}``.
      num_classes: number of classes (1 for regression).
      task: ``"classification"`` or ``"regression"``.
      extra: free metadata (feature names, split sizes, seed, file locations, ...).
    """

    name: str
    modalities: tuple[str, ...]
    input_shapes: dict[str, tuple[int, ...]]
    num_classes: int
    task: str = "classification"
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"DatasetInfo.task must be one of {TASKS}, got {self.task!r}.")
        modalities = tuple(self.modalities)
        object.__setattr__(self, "modalities", modalities)
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"DatasetInfo.modalities has duplicates: {modalities}.")
        if set(self.input_shapes) != set(modalities):
            raise ValueError(
                f"DatasetInfo.input_shapes keys {sorted(self.input_shapes)} must equal the "
                f"modalities {list(modalities)}."
            )
        shapes = {m: tuple(int(d) for d in self.input_shapes[m]) for m in modalities}
        object.__setattr__(self, "input_shapes", shapes)
        if self.num_classes < 1:
            raise ValueError(f"DatasetInfo.num_classes must be >= 1, got {self.num_classes}.")


class ArraySplit:
    """A split held in memory: named numpy arrays with one shared leading length ``N``.

    Dict-like by key (``split["label"]``, ``split.keys()``, ``"label" in split``, ``dict(split)``,
    iteration yields the keys), with two differences from a dict:

    * ``len(split)`` is the number of examples ``N`` (not the number of keys);
    * ``split[i]`` with an integer ``i`` returns example ``i`` as a dict of per-example arrays,
      so an `ArraySplit` is also a random-access source.

    Arrays are stored as given (no copy); treat them as read-only.
    """

    def __init__(self, arrays: Mapping[str, Any]):
        arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
        if not arrays:
            raise ValueError("ArraySplit needs at least one array.")
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
        if any(n is None for n in lengths.values()) or len(set(lengths.values())) != 1:
            raise ValueError(
                f"All arrays of an ArraySplit need the same leading length; got {lengths}."
            )
        self._arrays = arrays
        self._n = next(iter(lengths.values()))

    # -- dict-like access by key ------------------------------------------------------------
    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -self._n <= i < self._n:
                raise IndexError(f"Example index {i} out of range for a split of {self._n}.")
            return {k: v[i] for k, v in self._arrays.items()}
        try:
            return self._arrays[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in this split; it has {list(self._arrays)}.") from None

    def __contains__(self, key) -> bool:
        return key in self._arrays

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return self._n

    def keys(self):
        return self._arrays.keys()

    def values(self):
        return self._arrays.values()

    def items(self):
        return self._arrays.items()

    def get(self, key, default=None):
        return self._arrays.get(key, default)

    @property
    def num_examples(self) -> int:
        return self._n

    def as_dict(self) -> dict[str, np.ndarray]:
        """A plain ``dict`` of the arrays (shallow: the arrays themselves are shared)."""
        return dict(self._arrays)

    def take(self, indices) -> ArraySplit:
        """A new split with the rows ``indices`` (an int array ``[K]`` or boolean mask ``[N]``)."""
        idx = np.asarray(indices)
        return ArraySplit({k: v[idx] for k, v in self._arrays.items()})

    def replace(self, **arrays) -> ArraySplit:
        """A new split with some entries replaced or added (same leading length required)."""
        return ArraySplit({**self._arrays, **arrays})

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._arrays.items())
        return f"ArraySplit(n={self._n}, {parts})"
