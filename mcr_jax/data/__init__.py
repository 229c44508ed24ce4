"""Datasets for mcr_jax: one registry, one loader, batching (plain numpy; TFDS imported on demand).

    dataset = load(ml_collections.ConfigDict({"name": "synthetic"}))   # or "cremad", "mosi", ...
    for batch in dataset.batches("train", 64, train=True, seed=0, epoch=0):
        ...
    splits, info = load_dataset({"name": "synthetic"})   # an in-memory dataset's own splits
    for batch in batches(splits["train"], 64, shuffle=True, seed=0, epoch=0, drop_remainder=True):
        ...

The registry :data:`DATASETS` (in :mod:`mcr_jax.data.dataset`) lists in-memory and TFDS datasets
alike. See docs/data.md for every dataset's config fields and defaults.
"""

from __future__ import annotations

from mcr_jax.data.checks import check_split
from mcr_jax.data.dataset import (
    DATASETS,
    IN_MEMORY,
    TFDS,
    Dataset,
    DatasetSpec,
    load,
    load_dataset,
    register_dataset,
)
from mcr_jax.data.layout import assemble, batch_layout
from mcr_jax.data.mfeat import load_mfeat
from mcr_jax.data.pipeline import apply_standardization, batches, num_batches, standardize
from mcr_jax.data.synthetic import load_synthetic, sweep_unique_ratio
from mcr_jax.data.types import ArraySplit, DatasetInfo

__all__ = [
    "DATASETS",
    "IN_MEMORY",
    "TFDS",
    "ArraySplit",
    "Dataset",
    "DatasetInfo",
    "DatasetSpec",
    "apply_standardization",
    "assemble",
    "batch_layout",
    "batches",
    "check_split",
    "load",
    "load_dataset",
    "load_mfeat",
    "load_synthetic",
    "num_batches",
    "register_dataset",
    "standardize",
    "sweep_unique_ratio",
]
