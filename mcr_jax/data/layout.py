"""The one batch layout, shared by the in-memory path and the grain (TFDS) path.

Two questions, answered once for every source:

* **Which rows make each batch** (:func:`batch_layout`): one seeded order of the whole split
  (``PCG64(SeedSequence([seed, epoch]))`` when shuffling, record order otherwise) cut into global
  batches of ``B`` rows. Training (``drop_remainder=True``) drops the last partial batch;
  evaluation pads it to ``B`` rows that copy example 0 and have mask 0, so that every example is
  seen exactly once with mask 1. With ``P`` processes, process ``p`` takes the contiguous rows
  ``[p·B/P, (p+1)·B/P)`` of every global batch: every process yields the same number of batches,
  and the processes' batches concatenated in process order are the global batch.
* **How rows become a batch** (:func:`assemble`): columns gathered from arrays, or a list of
  example dicts stacked per key, plus ``"mask"`` (float32 ``[b]``) and, when asked, each row's
  record index.

:mod:`mcr_jax.data.pipeline` (arrays and random-access sources) and
:mod:`mcr_jax.data.tfds_source` (grain) both call these two functions; a model-facing batch is
then ``{modality: [b, ...], "<modality>_mask": [b, ...]?, "label": [b], "mask": [b]}`` (the
selection is :meth:`mcr_jax.data.dataset.Dataset.batches`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mcr_jax.data.types import MASK_KEY

__all__ = ["assemble", "batch_layout", "check_batch_arguments", "check_weights", "example_order", "num_batches"]


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    """Number of (global) batches of one epoch over ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def check_weights(weights, n: int) -> np.ndarray:
    """Per-example sampling weights as float64 ``[n]``; ``ValueError`` unless they are finite,
    nonnegative, of length ``n`` and not all zero."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"sampling weights must have shape ({n},) (one per example), got {w.shape}.")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"sampling weights must be finite; {int(np.sum(~np.isfinite(w)))} are NaN or Inf.")
    if np.any(w < 0):
        raise ValueError(f"sampling weights must be >= 0; the smallest is {float(w.min())}.")
    if not np.any(w > 0):
        raise ValueError("sampling weights are all zero; at least one example must have a positive weight.")
    return w


def example_order(n: int, *, shuffle: bool, seed: int, epoch: int, weights=None) -> np.ndarray:
    """The order ``int64 [n]`` in which an epoch visits the examples.

    Shuffling draws a permutation from ``PCG64(SeedSequence([seed, epoch]))``: the same on every
    process and machine, different for every epoch. With ``weights`` (float ``[n]``, nonnegative,
    not all zero; see :func:`check_weights`) the epoch is instead ``n`` independent draws, with
    replacement, of example ``i`` with probability ``weights[i] / sum(weights)``, from the same
    generator (so equally reproducible); examples of weight 0 are never drawn. ``weights=None``
    is exactly the unweighted order. Weights need ``shuffle=True`` (they are a training-time choice).
    """
    if weights is not None and not shuffle:
        raise ValueError("sampling weights need shuffle=True (training batches); evaluation visits every "
                         "example once, in order.")
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0 for shuffling, got seed={seed}, epoch={epoch}.")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    if weights is None:
        return rng.permutation(n)
    w = check_weights(weights, n)
    return rng.choice(n, size=n, replace=True, p=w / w.sum()).astype(np.int64)


def check_batch_arguments(batch_size: int, process_index: int, process_count: int) -> None:
    """``ValueError`` unless ``batch_size >= 1``, ``0 <= process_index < process_count`` and ``P | B``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got process_index={process_index}, "
            f"process_count={process_count}."
        )
    if batch_size % process_count:
        raise ValueError(
            f"The global batch_size {batch_size} is not divisible by process_count {process_count}; "
            f"choose a batch_size that is a multiple of {process_count}."
        )


def batch_layout(num_examples: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                 drop_remainder: bool, process_index: int = 0, process_count: int = 1, weights=None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of every batch of one epoch.

    Args:
      num_examples: ``N``, the size of the split.
      batch_size: the GLOBAL batch size ``B``, divisible by ``process_count``.
      shuffle, seed, epoch: visit the examples in :func:`example_order`.
      drop_remainder: drop the last partial batch; otherwise pad it with example 0 (mask 0).
      process_index, process_count: this process ``p`` and the number of processes ``P``.
      weights: optional per-example sampling weights (float ``[num_examples]``): the epoch's
        ``num_examples`` rows are then drawn with replacement, ``∝ weights`` (see
        :func:`example_order`); None (the default) is the unweighted layout, unchanged.

    Returns:
      ``(indices, mask)``: the record index (int64) and the mask (float32, 1 real, 0 padding) of
      each row, both ``[num_batches, B / P]``. ``num_batches`` may be 0 (a split smaller than one
      batch with ``drop_remainder``); what to do about an empty epoch is the caller's decision.
    """
    check_batch_arguments(batch_size, process_index, process_count)
    order = example_order(num_examples, shuffle=shuffle, seed=seed, epoch=epoch,
                          weights=weights).astype(np.int64, copy=False)
    count = num_batches(num_examples, batch_size, drop_remainder)
    mask = np.ones((count * batch_size,), np.float32)
    if count * batch_size <= num_examples:
        order = order[:count * batch_size]
    else:  # pad the last batch with copies of example 0, masked out
        mask[num_examples:] = 0.0
        order = np.concatenate([order, np.zeros((count * batch_size - num_examples,), np.int64)])
    local = batch_size // process_count
    cols = slice(process_index * local, (process_index + 1) * local)
    return (np.ascontiguousarray(order.reshape(count, batch_size)[:, cols]),
            np.ascontiguousarray(mask.reshape(count, batch_size)[:, cols]))


def assemble(rows: Mapping[str, Any] | Sequence[Mapping[str, Any]], mask: np.ndarray, *,
             index: np.ndarray | None = None, index_key: str | None = None) -> dict[str, np.ndarray]:
    """One batch from its rows: the entries, then ``"mask"``, then (optionally) the record index.

    Args:
      rows: either the columns already gathered (``{key: array [b, ...]}``, e.g. ``arrays[k][idx]``),
        or the examples (a sequence of ``b`` dicts with the same keys), stacked here per key.
      mask: ``[b]``, 1 for a real row and 0 for padding; stored as float32 under ``"mask"``.
      index: each row's record index ``[b]`` (names the examples in errors).
      index_key: if given, a copy of ``index`` (its dtype kept) is stored under this key.

    Raises:
      ValueError: the examples do not all have the same keys, or an entry is already named
        ``"mask"`` or ``index_key``.
    """
    if isinstance(rows, Mapping):
        batch = dict(rows)
    else:
        batch = _stack(rows, index)
    if MASK_KEY in batch:
        raise ValueError(f"The examples already have an entry {MASK_KEY!r}; the batch adds its own. Rename it.")
    if index_key is not None and index_key in batch:
        raise ValueError(f"The examples have an entry {index_key!r}, the index_key; choose another index_key.")
    batch[MASK_KEY] = np.asarray(mask, np.float32)
    if index_key is not None:
        batch[index_key] = np.array(index)
    return batch


def _stack(examples: Sequence[Mapping[str, Any]], index: np.ndarray | None) -> dict[str, np.ndarray]:
    """Stack the examples per key; every example must have the keys of the first."""
    if not len(examples):
        raise ValueError("A batch needs at least one example.")
    keys = list(examples[0])
    name = (lambda r: int(index[r])) if index is not None else (lambda r: r)
    for r, ex in enumerate(examples):
        if list(ex) != keys:
            raise ValueError(
                f"Example {name(r)} has keys {sorted(ex)} but example {name(0)} has {sorted(keys)}; "
                "a source must return the same keys for every example."
            )
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in keys}
