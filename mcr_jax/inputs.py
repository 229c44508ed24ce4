"""Compatibility module: the dataset and model entry points, now in :mod:`mcr_jax.data` and :mod:`mcr_jax.models`.

* :func:`load` / :class:`Dataset`: :mod:`mcr_jax.data.dataset` (one registry, one loader, for
  in-memory and TFDS datasets alike; the input checks run there);
* :func:`build_model`: :mod:`mcr_jax.models.build`.

New code should import them from there; this module only re-exports them.
"""

from __future__ import annotations

from mcr_jax.data.dataset import DATASETS, TFDS, Dataset, DatasetSpec, load, register_dataset
from mcr_jax.models.build import build_model

__all__ = ["DATASETS", "TFDS_DATASETS", "Dataset", "DatasetSpec", "build_model", "load", "register_dataset"]

# The built-in TFDS datasets (a snapshot; the registry DATASETS is the live list).
TFDS_DATASETS = tuple(name for name, spec in DATASETS.items() if spec.kind == TFDS)
