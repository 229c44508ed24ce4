"""Batching and standardisation of in-memory splits, in plain numpy.

`batches` turns a split into a stream of fixed-size batches for training (shuffled by
``(seed, epoch)``, remainder dropped) or for evaluation (in order, every example exactly once, the
last batch padded and masked). In a multi-process job ``batch_size`` is the *global* batch and every
process yields its own contiguous block of rows of each global batch, so that concatenating the
processes' batches in process order gives exactly the single-process batch. The layout (order,
padding, per-process rows) is :mod:`mcr_jax.data.layout`'s, shared with the grain reader.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from mcr_jax.data.layout import assemble, batch_layout, check_batch_arguments, example_order, num_batches
from mcr_jax.data.types import LABEL_KEY, MASK_KEY, ArraySplit

__all__ = [
    "apply_standardization",
    "batches",
    "check_not_empty",
    "example_order",
    "num_batches",
    "standardize",
]


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


def check_not_empty(n: int, batch_size: int, drop_remainder: bool) -> None:
    """``ValueError`` when dropping the remainder of ``n`` examples would leave an empty epoch."""
    if drop_remainder and n < batch_size:
        raise ValueError(
            f"The split has {n} examples, fewer than one batch of {batch_size}, so with "
            "drop_remainder=True the epoch would be empty; lower batch_size or use drop_remainder=False."
        )


def batches(split, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_remainder: bool,
            process_index: int = 0, process_count: int = 1,
            index_key: str | None = None, weights=None) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over the batches of one epoch of ``split``.

    The rows of each batch come from :func:`mcr_jax.data.layout.batch_layout` and are put together
    by :func:`mcr_jax.data.layout.assemble`, as in the grain reader.

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
      weights: optional per-example sampling weights (float ``[N]``, needs ``shuffle``): the epoch's
        rows are drawn with replacement ``∝ weights`` (:func:`mcr_jax.data.layout.example_order`).

    Yields:
      dicts with every entry of the split (``[B / process_count, ...]``) plus ``"mask"``
      (float32 ``[B / process_count]``: 1 for real rows, 0 for padding). Process ``p`` gets rows
      ``[p·B/P, (p+1)·B/P)`` of each global batch.

    Raises:
      ValueError: bad sizes or indices, a split entry named ``"mask"`` (or ``index_key``), or (with
        ``drop_remainder``) a split smaller than one batch, which would give an empty epoch.
    """
    check_batch_arguments(batch_size, process_index, process_count)
    arrays = _as_arrays(split)
    if arrays is not None and MASK_KEY in arrays:
        raise ValueError(f"The split already has an entry {MASK_KEY!r}; batches() adds its own. Rename it.")
    if index_key is not None and (index_key == MASK_KEY or (arrays is not None and index_key in arrays)):
        raise ValueError(f"index_key {index_key!r} is already an entry of the split; choose another name.")
    n = len(arrays) if arrays is not None else len(split)
    check_not_empty(n, batch_size, drop_remainder)
    indices, mask = batch_layout(n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                 drop_remainder=drop_remainder, process_index=process_index,
                                 process_count=process_count, weights=weights)
    return _iterate(split, arrays, indices, mask, index_key)


def _iterate(split, arrays, indices, mask, index_key):
    for idx, row_mask in zip(indices, mask, strict=True):
        if arrays is not None:
            rows = {k: v[idx] for k, v in arrays.items()}
        else:
            rows = [split[int(i)] for i in idx]
        yield assemble(rows, row_mask.copy(), index=idx, index_key=index_key)


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
