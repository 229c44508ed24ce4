"""Datasets for mcr_jax: in-memory splits, a loader registry and batching (plain numpy).

    splits, info = load_dataset(ml_collections.ConfigDict({"name": "synthetic"}))
    for batch in batches(splits["train"], 64, shuffle=True, seed=0, epoch=0, drop_remainder=True):
        ...

See docs/data.md for every dataset's config fields and defaults.
"""

from __future__ import annotations

from collections.abc import Callable

from mcr_jax.data.checks import check_split
from mcr_jax.data.mfeat import load_mfeat
from mcr_jax.data.pipeline import apply_standardization, batches, num_batches, standardize
from mcr_jax.data.synthetic import load_synthetic, sweep_unique_ratio
from mcr_jax.data.types import ArraySplit, DatasetInfo

__all__ = [
    "DATASETS",
    "ArraySplit",
    "DatasetInfo",
    "apply_standardization",
    "batches",
    "check_split",
    "load_dataset",
    "load_mfeat",
    "load_synthetic",
    "num_batches",
    "register_dataset",
    "standardize",
    "sweep_unique_ratio",
]

Loader = Callable[..., "tuple[dict[str, ArraySplit], DatasetInfo]"]

# name -> fn(config) -> (splits, info). Other modules add theirs with `register_dataset`.
DATASETS: dict[str, Loader] = {"synthetic": load_synthetic, "mfeat": load_mfeat}


def register_dataset(name: str, fn: Loader, *, overwrite: bool = False) -> Loader:
    """Register ``fn(config) -> (splits, info)`` under ``name`` for `load_dataset`.

    Raises ``ValueError`` if ``name`` is taken, unless ``overwrite=True``. Returns ``fn``.
    """
    if not callable(fn):
        raise TypeError(f"register_dataset({name!r}, ...) needs a callable loader, got {fn!r}.")
    if name in DATASETS and not overwrite and DATASETS[name] is not fn:
        raise ValueError(f"A dataset named {name!r} is already registered; pass overwrite=True to replace it.")
    DATASETS[name] = fn
    return fn


def load_dataset(config) -> tuple[dict[str, ArraySplit], DatasetInfo]:
    """Load the dataset ``config.name`` with the registered loader.

    Args:
      config: an ``ml_collections.ConfigDict`` or a dict with ``name`` and that dataset's fields
        (unknown fields raise ``ValueError``; see docs/data.md).

    Returns:
      ``({"train": ArraySplit, "validation": ArraySplit, "test": ArraySplit}, DatasetInfo)``.
    """
    name = config.get("name") if hasattr(config, "get") else None
    if name is None:
        raise ValueError(f"The dataset config needs a 'name' field, one of {sorted(DATASETS)}.")
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; registered datasets: {sorted(DATASETS)}.")
    return DATASETS[name](config)
