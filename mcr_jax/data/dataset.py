"""One registry and one ``load(config) -> Dataset`` for every dataset, in memory or TFDS.

    dataset = load({"name": "synthetic"})          # or an ml_collections.ConfigDict
    for batch in dataset.batches("train", 64, train=True, seed=0, epoch=3):
        batch["x1"], batch["label"], batch["mask"]  # [64, 100], [64], [64]
    dataset.arrays("train")                        # whole columns, in-memory splits only

The registry :data:`DATASETS` maps a name to a :class:`DatasetSpec`, which says what kind of
dataset it is:

- ``"in_memory"``: a loader ``fn(config) -> (splits, info)`` returning NumPy splits
  (:class:`~mcr_jax.data.types.ArraySplit`, a dict of arrays, or any random-access source) and a
  :class:`~mcr_jax.data.types.DatasetInfo`. Built in: ``"synthetic"``, ``"mfeat"``; users add
  theirs with ``register_dataset(name, loader)``.
- ``"tfds"``: a manual-download TFDS builder (``"cremad"``, ``"ave"``, ``"mosi"``, ``"mosei"``,
  ``"ucf101"``), built from the user's files into ``config.data_dir`` and read through grain
  (:mod:`mcr_jax.data.tfds_source`, with read-time augmentation in training). Config fields:
  ``data_dir`` (required), ``manual_dir``, ``builder_kwargs``, ``modalities`` (a subset, in order).

Either way a batch is ``{modality: [B, ...], "<modality>_mask": [B, ...]?, "label": [B],
"mask": [B]}``, laid out by :mod:`mcr_jax.data.layout` (the same order, padding and per-process
slices for both kinds).

Every dataset is checked here, once (:mod:`mcr_jax.data.checks`): classification labels must be
integers in ``[0, num_classes)``, regression labels and every floating input finite. In-memory
splits are scanned in full when the :class:`Dataset` is made (vectorised NumPy: milliseconds);
sources read example by example (TFDS/grain, or a registered loader's random-access source) are
checked batch by batch as they are read, so a bad example stops the run at the first batch that
holds it. Either way the ``ValueError`` names the split, the entry and the example's index.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mcr_jax.data.checks import check_split
from mcr_jax.data.layout import batch_layout, check_batch_arguments
from mcr_jax.data.mfeat import load_mfeat
from mcr_jax.data.pipeline import batches as array_batches
from mcr_jax.data.pipeline import check_not_empty
from mcr_jax.data.synthetic import load_synthetic
from mcr_jax.data.types import INDEX_KEY, LABEL_KEY, MASK_KEY, ArraySplit, DatasetInfo

__all__ = [
    "DATASETS",
    "IN_MEMORY",
    "TFDS",
    "Dataset",
    "DatasetSpec",
    "load",
    "load_dataset",
    "register_dataset",
]

IN_MEMORY = "in_memory"
TFDS = "tfds"
_KINDS = (IN_MEMORY, TFDS)

Loader = Callable[..., "tuple[dict[str, Any], DatasetInfo]"]



@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One entry of :data:`DATASETS`.

    Attributes:
      name: the name ``config.name`` selects.
      kind: ``"in_memory"`` (``loader`` set) or ``"tfds"`` (``builder`` set).
      loader: ``fn(config) -> (splits, info)`` for an in-memory dataset.
      builder: for a TFDS dataset, a :class:`mcr_jax.data.builders.common.ManualBuilder` subclass
        or ``"module:Class"``, imported on first use (TensorFlow Datasets is only imported then).
    """

    name: str
    kind: str
    loader: Loader | None = None
    builder: type | str | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"DatasetSpec.kind must be one of {_KINDS}, got {self.kind!r}.")
        if (self.kind == IN_MEMORY) != (self.loader is not None) or (self.kind == TFDS) != (self.builder is not None):
            raise ValueError(f"Dataset {self.name!r}: an in-memory dataset needs a loader and no builder, "
                             "a TFDS dataset a builder and no loader.")

    @property
    def in_memory(self) -> bool:
        return self.kind == IN_MEMORY

    def builder_class(self) -> type:
        """The TFDS builder class (imported now if it was given as ``"module:Class"``)."""
        if self.kind != TFDS:
            raise ValueError(f"Dataset {self.name!r} is an in-memory dataset; it has no TFDS builder.")
        if isinstance(self.builder, str):
            module, _, attr = self.builder.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.builder


_BUILTIN_BUILDERS = "mcr_jax.data.builders"

# name -> DatasetSpec: THE registry, for in-memory and TFDS datasets alike.
DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec("synthetic", IN_MEMORY, loader=load_synthetic),
    "mfeat": DatasetSpec("mfeat", IN_MEMORY, loader=load_mfeat),
    "cremad": DatasetSpec("cremad", TFDS, builder=f"{_BUILTIN_BUILDERS}:CremaD"),
    "ave": DatasetSpec("ave", TFDS, builder=f"{_BUILTIN_BUILDERS}:Ave"),
    "mosi": DatasetSpec("mosi", TFDS, builder=f"{_BUILTIN_BUILDERS}:CmuMosi"),
    "mosei": DatasetSpec("mosei", TFDS, builder=f"{_BUILTIN_BUILDERS}:CmuMosei"),
    "ucf101": DatasetSpec("ucf101", TFDS, builder=f"{_BUILTIN_BUILDERS}:Ucf101"),
}


class _Builders(Mapping):
    """``{name: builder class}`` of the TFDS entries of :data:`DATASETS`.

    A read-only, live view: the registry is the one list of datasets, so a builder registered
    with ``register_dataset(name, builder=...)`` appears here too.
    """

    def _names(self) -> list[str]:
        return [name for name, spec in DATASETS.items() if spec.kind == TFDS]

    def __getitem__(self, name: str) -> type:
        if name not in self._names():
            raise KeyError(f"{name!r} is not a TFDS dataset; the TFDS datasets are {sorted(self._names())}.")
        return DATASETS[name].builder_class()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"BUILDERS({dict(self.items())!r})"


BUILDERS: Mapping[str, type] = _Builders()


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_builder_class(name: str) -> type:
    """The TFDS builder class of a registered name ("cremad", "UCF-101", ...) or of a builder's
    own TFDS name ("mcr_cremad", ...)."""
    key = _norm(name)
    for short, cls in BUILDERS.items():
        if key in (_norm(short), cls.name.replace("_", "")):
            return cls
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")


def register_dataset(name: str, loader: Loader | None = None, *, builder: type | str | None = None,
                     overwrite: bool = False):
    """Register a dataset under ``name`` in :data:`DATASETS`, for :func:`load`.

    ``register_dataset(name, loader)`` registers an in-memory dataset, ``loader(config) ->
    (splits, info)``; ``register_dataset(name, builder=MyBuilder)`` a manual-download TFDS builder
    (a :class:`~mcr_jax.data.builders.common.ManualBuilder` subclass, or ``"module:Class"``).

    Raises ``ValueError`` if ``name`` is taken, unless ``overwrite=True`` (registering the same
    loader again is fine). Returns ``loader`` (or ``builder``), so it works as a decorator's body.
    """
    if (loader is None) == (builder is None):
        raise TypeError(f"register_dataset({name!r}, ...) needs either a loader or builder=..., not both.")
    if loader is not None and not callable(loader):
        raise TypeError(f"register_dataset({name!r}, ...) needs a callable loader, got {loader!r}.")
    spec = (DatasetSpec(name, IN_MEMORY, loader=loader) if loader is not None
            else DatasetSpec(name, TFDS, builder=builder))
    if name in DATASETS and not overwrite and _spec(name) != spec:
        raise ValueError(f"A dataset named {name!r} is already registered; pass overwrite=True to replace it.")
    DATASETS[name] = spec
    return loader if loader is not None else builder


def _spec(name: str) -> DatasetSpec:
    entry = DATASETS[name]
    if not isinstance(entry, DatasetSpec) and callable(entry):  # DATASETS[name] = fn, the old way
        return DatasetSpec(name, IN_MEMORY, loader=entry)
    return entry


def _lookup(config) -> DatasetSpec:
    name = config.get("name", None) if hasattr(config, "get") else None
    if name is None:
        raise ValueError(f"The dataset config needs a 'name' field, one of {sorted(DATASETS)}.")
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; registered datasets: {sorted(DATASETS)}.")
    return _spec(name)


def load(config, *, check: bool = True) -> Dataset:
    """The dataset named by ``config.name``, in memory or TFDS, as a :class:`Dataset`.

    Args:
      config: an ``ml_collections.ConfigDict`` or a dict: ``name`` and that dataset's fields
        (docs/data.md for the in-memory ones, docs/datasets_manual.md for the TFDS ones).
      check: validate the inputs (see the module docstring).
    """
    spec = _lookup(config)
    if spec.in_memory:
        splits, info = spec.loader(config)
        return Dataset(splits, info, check=check)
    return _load_tfds(spec.name, config, check=check)


def load_dataset(config) -> tuple[dict[str, Any], DatasetInfo]:
    """``(splits, info)`` of an in-memory dataset: the registered loader's own output.

    Returns:
      ``({"train": ArraySplit, "validation": ArraySplit, "test": ArraySplit}, DatasetInfo)``.

    Raises:
      ValueError: for an unknown name, or for a TFDS dataset (``"cremad"``, ...), whose splits
        only make sense through :func:`load` (decoding, augmentation, checks).
    """
    spec = _lookup(config)
    if not spec.in_memory:
        raise ValueError(
            f"Dataset {spec.name!r} is a TFDS dataset read through grain, not an in-memory one: "
            "load it with mcr_jax.data.load(config) (a Dataset; iterate with .batches(split, ...)). "
            "load_dataset returns the splits of in-memory datasets only.")
    return spec.loader(config)


def _load_tfds(name: str, config, *, check: bool) -> Dataset:
    data_dir = config.get("data_dir", None)
    if not data_dir:
        raise ValueError(f"config.data.data_dir must be set for dataset {name!r} (where the built files go).")
    from mcr_jax.data.tfds_source import load_tfds_dataset  # imports TensorFlow Datasets and grain

    kwargs = config.get("builder_kwargs", None)
    manual_dir = config.get("manual_dir", None) or None
    sources, tinfo = load_tfds_dataset(
        DATASETS[name].builder_class(),
        data_dir=os.path.expanduser(data_dir),
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
        builder_kwargs=dict(kwargs) if kwargs else None,
    )
    modalities = _select(tuple(tinfo["modalities"]), config.get("modalities", None))
    tinfo = dict(tinfo, modalities=list(modalities),
                 input_shapes={m: tinfo["input_shapes"][m] for m in modalities})
    info = DatasetInfo(name=name, modalities=modalities,
                       input_shapes={m: tuple(s) for m, s in tinfo["input_shapes"].items()},
                       num_classes=int(tinfo["num_classes"]), task=tinfo["task"],
                       extra={k: v for k, v in tinfo.items() if k not in ("modalities", "input_shapes")})
    workers = config.get("worker_count", 0) or 0
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ValueError(f"config.data.worker_count must be an integer >= 0 (0 = read in this process); "
                         f"got {workers!r}.")
    return Dataset(sources, info, tfds_info=tinfo, check=check, worker_count=workers)


def _select(available: tuple[str, ...], wanted) -> tuple[str, ...]:
    """The configured subset of modalities (in the configured order), or all of them."""
    if not wanted:
        return available
    wanted = tuple(wanted)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ValueError(f"config.data.modalities names {unknown}, but the dataset has {list(available)}.")
    if len(wanted) < 2:
        raise ValueError(f"config.data.modalities needs at least 2 modalities; got {list(wanted)}.")
    return wanted


class Dataset:
    """Splits plus :class:`DatasetInfo`, and the one way to iterate batches over them.

    Args:
      splits: ``{split: source}``: ``ArraySplit`` or dicts of arrays (in memory; a dict becomes an
        ``ArraySplit``), or random-access sources (``len``, ``source[i] -> dict``; streamed).
      info: the dataset's :class:`DatasetInfo`.
      tfds_info: for a TFDS dataset, the info dict of
        :func:`mcr_jax.data.tfds_source.load_tfds_dataset`; its splits are read through grain.
      check: validate the inputs (see the module docstring): in-memory splits here, in full;
        streamed ones as their batches are read in :meth:`batches`.
      worker_count: for a TFDS dataset, the grain worker processes that read, decode and augment
        the examples (``config.data.worker_count``; 0 = in this process). The batches are the same
        for every count (grain keeps their order); more workers read faster
        (``benchmarks/pipeline.py`` measures it).
    """

    def __init__(self, splits: Mapping[str, Any], info: DatasetInfo, *, tfds_info: dict | None = None,
                 check: bool = True, worker_count: int = 0):
        self.splits = {name: (ArraySplit(source) if tfds_info is None and isinstance(source, Mapping)
                              and not isinstance(source, ArraySplit) else source)
                       for name, source in splits.items()}
        self.info = info
        self.tfds_info = tfds_info
        self.check = check
        self.worker_count = int(worker_count)
        if check:
            for name, source in self.splits.items():
                if self.in_memory(name):
                    self._check(source, split=name, scope="split")

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}: {self.size(s)}{'' if self.in_memory(s) else ' (streamed)'}" for s in self.splits)
        return f"Dataset({self.info.name!r}, modalities={list(self.info.modalities)}, {parts})"

    def in_memory(self, split: str) -> bool:
        """Whether ``split`` is held as NumPy arrays (else it is streamed: TFDS/grain or a source)."""
        return self.tfds_info is None and isinstance(self.splits[split], (ArraySplit, Mapping))

    def _keys(self) -> tuple[str, ...]:
        """The model-facing entries, in order: the modalities, their ``<m>_mask`` entries, ``label``."""
        mods = self.info.modalities
        return (*mods, *(f"{m}_mask" for m in mods), LABEL_KEY)

    def _check(self, arrays, *, split: str, scope: str, index=None, valid=None) -> None:
        check_split(arrays, split=split, keys=(*self.info.modalities, LABEL_KEY), task=self.info.task,
                    num_classes=self.info.num_classes, index=index, valid=valid, scope=scope)

    def size(self, split: str) -> int:
        """The number of examples of ``split``."""
        source = self.splits[split]
        if isinstance(source, Mapping) and not isinstance(source, ArraySplit):
            source = ArraySplit(source)
        return len(source)

    def arrays(self, split: str) -> dict[str, np.ndarray] | None:
        """The whole of an in-memory split as NumPy columns, or None for a streamed split.

        Returns ``{modality: [N, ...], "<modality>_mask": [N, ...] (if present), "label": [N]}``:
        the split's own arrays (not copies; treat them as read-only), in the layout of a batch
        without ``"mask"``. Row ``i`` is example ``i``, so ``arrays[k][indices]`` with the
        ``indices`` of :meth:`batch_layout` is exactly the entry ``k`` of :meth:`batches`' batches.
        """
        if not self.in_memory(split):
            return None
        source = self.splits[split]
        if not isinstance(source, ArraySplit):
            source = ArraySplit(source)
        required = (*self.info.modalities, LABEL_KEY)  # a missing one raises, naming the split's entries
        return {k: np.asarray(source[k]) for k in self._keys() if k in required or k in source}

    def batch_layout(self, split: str, batch_size: int, *, train: bool, seed: int, epoch: int,
                     process_index: int = 0, process_count: int = 1,
                     weights=None) -> tuple[np.ndarray, np.ndarray]:
        """The rows of every batch :meth:`batches` yields with the same arguments.

        Returns ``(indices, mask)``, both ``[num_batches, batch_size / process_count]``: each row's
        example index (int64) and mask (float32, 0 for padding); see
        :func:`mcr_jax.data.layout.batch_layout`. With :meth:`arrays`, an epoch over an in-memory
        split can be run on the device from these indices alone. ``weights`` (float ``[N]``,
        training only): rows drawn with replacement ``∝ weights``; None is the unweighted layout.
        """
        check_batch_arguments(batch_size, process_index, process_count)
        if weights is not None and not train:
            raise ValueError("sampling weights are for training batches (train=True) only.")
        if weights is not None and self.tfds_info is not None:
            raise NotImplementedError("sampling weights are not supported by the TFDS (grain) reader; "
                                      "use an in-memory dataset.")
        n = self.size(split)
        if self.tfds_info is None:
            check_not_empty(n, batch_size, drop_remainder=train)
        return batch_layout(n, batch_size, shuffle=train, seed=seed, epoch=epoch, drop_remainder=train,
                            process_index=process_index, process_count=process_count, weights=weights)

    def batches(self, split: str, batch_size: int, *, train: bool, seed: int, epoch: int,
                process_index: int = 0, process_count: int = 1,
                weights=None) -> Iterator[dict[str, np.ndarray]]:
        """This process's slice of every batch of one epoch of ``split``.

        ``train=True``: shuffled by ``(seed, epoch)``, the last partial batch dropped (and, for
        TFDS datasets, frames augmented). ``train=False``: in order, the last batch padded with
        rows of ``mask`` 0. ``batch_size`` is the global batch; each batch is
        ``{modality, "<modality>_mask"?, "label", "mask", "index"}``, ``[batch_size / process_count, ...]``
        (``"index"``: each row's example index in the split, int32). ``weights`` (float ``[N]``,
        ``train=True``, in-memory / array splits only): the rows are drawn with replacement
        ``∝ weights`` (:meth:`batch_layout`); None is the unweighted epoch.
        """
        if weights is not None and not train:
            raise ValueError("sampling weights are for training batches (train=True) only.")
        source = self.splits[split]
        streamed = self.check and not self.in_memory(split)  # checked here, batch by batch
        if self.tfds_info is not None:
            from mcr_jax.data.tfds_source import split_batches

            if weights is not None:
                raise NotImplementedError("sampling weights are not supported by the TFDS (grain) reader; "
                                          "use an in-memory dataset.")

            it = split_batches(source, self.tfds_info, batch_size, train=train, seed=seed, epoch=epoch,
                               process_index=process_index, process_count=process_count,
                               worker_count=self.worker_count)
        else:
            it = array_batches(source, batch_size, shuffle=train, seed=seed, epoch=epoch, drop_remainder=train,
                               process_index=process_index, process_count=process_count, index_key=INDEX_KEY,
                               weights=weights)
        keep = {*self._keys(), MASK_KEY}
        for batch in it:
            if streamed:
                self._check(batch, split=split, scope="batch", index=batch[INDEX_KEY], valid=batch[MASK_KEY] > 0)
            out = {k: v for k, v in batch.items() if k in keep}
            out[INDEX_KEY] = np.asarray(batch[INDEX_KEY], np.int32)  # grain batches carry it too
            yield out

    def scan(self, splits: Sequence[str] | None = None, *, batch_size: int = 256) -> None:
        """Reads every example of ``splits`` (default: all) once, so that the checks run now.

        In-memory splits were checked when the dataset was made; for streamed (TFDS) splits this
        reads and decodes everything, which takes as long as one evaluation pass over them.
        """
        for split in splits if splits is not None else list(self.splits):
            for _ in self.batches(split, batch_size, train=False, seed=0, epoch=0):
                pass

    def split_arrays(self, split: str, key: str) -> np.ndarray | None:
        """A whole column of an in-memory split (e.g. ``"sample_type"``), or None."""
        source = self.splits[split]
        if isinstance(source, ArraySplit) and key in source:
            return np.asarray(source[key])
        return None
