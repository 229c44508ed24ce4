"""Batching and standardisation of in-memory splits, in plain numpy.

`batches` turns a split into a stream of fixed-size batches for training (shuffled by
``(seed, epoch)``, remainder dropped) or for evaluation (in order, every example exactly once, the
last batch padded and masked). In a multi-process job ``batch_size`` is the *global* batch and every
process yields its own contiguous block of rows of each global batch, so that concatenating the
processes' batches in process order gives exactly the single-process batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from mcr_jax.data.types import LABEL_KEY, MASK_KEY, ArraySplit


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    """Number of (global) batches `batches` yields for ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def example_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The order ``int64 [n]`` in which `batches` visits the examples.

    Shuffling draws a permutation from ``PCG64(SeedSequence([seed, epoch]))``: the same on every
    process and machine, different for every epoch.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0 for shuffling, got seed={seed}, epoch={epoch}.")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(n)


def _as_arrays(source) -> ArraySplit | None:
    """An `ArraySplit` for array-backed sources, ``None`` for other random-access sources."""
    if isinstance(source, ArraySplit):
        return source
    if isinstance(source, Mapping):
        return ArraySplit(source)
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            "batches() needs an ArraySplit, a dict of arrays, or a random-access source with "
            f"__len__ and __getitem__(int) -> dict; got {type(source).__name__}."
        )
    return None


def _stack_examples(source, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Gather ``source[i]`` for each index and stack them per key (the slow, general path)."""
    examples = [source[int(i)] for i in indices]
    keys = list(examples[0])
    for i, ex in zip(indices, examples, strict=True):
        if list(ex) != keys:
            raise ValueError(
                f"Example {int(i)} has keys {sorted(ex)} but example {int(indices[0])} has {sorted(keys)}; "
                "a source must return the same keys for every example."
            )
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in keys}


def batches(split, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_remainder: bool,
            process_index: int = 0, process_count: int = 1,
            index_key: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over the batches of one epoch of ``split``.

    Args:
      split: an `ArraySplit`, a dict of arrays with one leading length ``N``, or any random-access
        source (``len(source)`` and ``source[i] -> dict``; gathered per example and stacked).
      batch_size: the GLOBAL batch size ``B``; must be divisible by ``process_count``.
      shuffle: visit the examples in a random order drawn from ``(seed, epoch)``.
      seed, epoch: the shuffle's seed and epoch (ignored without shuffling).
      drop_remainder: drop the last incomplete batch (training). Otherwise the last batch is padded
        to ``B`` rows that copy example 0 and have ``mask`` 0 (evaluation).
      process_index, process_count: this process and the number of processes.
      index_key: if given, every batch also carries each row's example index (int64
        ``[B / process_count]``; padding rows carry the index of the example they copy, 0) under
        this key, e.g. to name the example behind a bad value or a prediction.

    Yields:
      dicts with every entry of the split (``[B / process_count, ...]``) plus ``"mask"``
      (float32 ``[B / process_count]``: 1 for real rows, 0 for padding). Process ``p`` gets rows
      ``[p·B/P, (p+1)·B/P)`` of each global batch.

    Raises:
      ValueError: bad sizes or indices, a split entry named ``"mask"`` (or ``index_key``), or (with
        ``drop_remainder``) a split smaller than one batch, which would give an empty epoch.
    """
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
    arrays = _as_arrays(split)
    if arrays is not None and MASK_KEY in arrays:
        raise ValueError(f"The split already has an entry {MASK_KEY!r}; batches() adds its own. Rename it.")
    if index_key is not None and (index_key == MASK_KEY or (arrays is not None and index_key in arrays)):
        raise ValueError(f"index_key {index_key!r} is already an entry of the split; choose another name.")
    n = len(arrays) if arrays is not None else len(split)
    if drop_remainder and n < batch_size:
        raise ValueError(
            f"The split has {n} examples, fewer than one batch of {batch_size}, so with "
            "drop_remainder=True the epoch would be empty; lower batch_size or use drop_remainder=False."
        )
    order = example_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    return _iterate(split, arrays, order, batch_size, drop_remainder, process_index, process_count, index_key)


def _iterate(split, arrays, order, batch_size, drop_remainder, process_index, process_count, index_key):
    n = order.shape[0]
    local = batch_size // process_count
    lo, hi = process_index * local, (process_index + 1) * local
    for b in range(num_batches(n, batch_size, drop_remainder)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        mask = np.ones((batch_size,), np.float32)
        if idx.shape[0] < batch_size:
            mask[idx.shape[0]:] = 0.0
            idx = np.concatenate([idx, np.zeros((batch_size - idx.shape[0],), idx.dtype)])
        idx, mask = idx[lo:hi], mask[lo:hi]
        if arrays is not None:
            batch = {k: v[idx] for k, v in arrays.items()}
        else:
            batch = _stack_examples(split, idx)
            if MASK_KEY in batch:
                raise ValueError(f"The source's examples have an entry {MASK_KEY!r}; batches() adds its own.")
            if index_key is not None and index_key in batch:
                raise ValueError(f"The source's examples have an entry {index_key!r}, the index_key; "
                                 "choose another index_key.")
        batch[MASK_KEY] = mask
        if index_key is not None:
            batch[index_key] = idx.astype(np.int64)
        yield batch


def _default_modalities(split: ArraySplit) -> list[str]:
    return [k for k, v in split.items() if k not in (LABEL_KEY, MASK_KEY) and np.issubdtype(v.dtype, np.floating)]


def standardize(splits: Mapping[str, ArraySplit], fit_split: str = "train", *,
                modalities: Sequence[str] | None = None, std_floor: float = 1e-6,
                ) -> tuple[dict[str, ArraySplit], dict[str, dict[str, np.ndarray]]]:
    """Per-feature standardisation of each modality, fitted on ``splits[fit_split]`` only.

    For each modality ``m`` with training array ``[N, *S]``, ``mean`` and ``std`` (both ``[*S]``)
    are computed over the ``N`` training rows in float64; every split becomes
    ``(x - mean) / std`` in float32. A feature whose training std is below ``std_floor`` (for
    example a constant pixel) is only centred (its std is taken as 1), so it cannot blow up on the
    other splits.

    Args:
      splits: ``{split name: ArraySplit}``.
      fit_split: the split the statistics come from.
      modalities: entries to standardise; default: every floating entry except ``"label"``.
      std_floor: threshold below which a feature is not scaled.

    Returns:
      ``(new_splits, stats)`` with ``stats[m] = {"mean": float32 [*S], "std": float32 [*S]}``;
      non-modality entries (labels, sample types) are passed through unchanged.
    """
    if fit_split not in splits:
        raise ValueError(f"fit_split {fit_split!r} is not among the splits {list(splits)}.")
    fit = ArraySplit(splits[fit_split]) if not isinstance(splits[fit_split], ArraySplit) else splits[fit_split]
    if len(fit) < 1:
        raise ValueError(f"Cannot fit standardisation on the empty split {fit_split!r}.")
    names = list(modalities) if modalities is not None else _default_modalities(fit)
    stats = {}
    for m in names:
        x = fit[m].astype(np.float64)
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std = np.where(std < std_floor, 1.0, std)
        stats[m] = {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
    return {k: apply_standardization(v, stats) for k, v in splits.items()}, stats


def apply_standardization(split, stats: Mapping[str, Mapping[str, np.ndarray]]) -> ArraySplit:
    """``(x - mean) / std`` for every modality in ``stats`` (from `standardize`), float32."""
    split = split if isinstance(split, ArraySplit) else ArraySplit(split)
    new = {}
    for m, s in stats.items():
        x = split[m]
        if x.shape[1:] != np.shape(s["mean"]):
            raise ValueError(
                f"Modality {m!r}: example shape {x.shape[1:]} does not match the statistics' shape "
                f"{np.shape(s['mean'])}."
            )
        new[m] = ((x.astype(np.float64) - s["mean"]) / s["std"]).astype(np.float32)
    return split.replace(**new)
