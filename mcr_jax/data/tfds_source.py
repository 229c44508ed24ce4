"""Build (if needed) and read the real datasets: TFDS array_record files through grain.

Two entry points:

* :func:`load_tfds_dataset` builds a manual-download TFDS builder into ``data_dir`` (never
  downloading anything) and returns one random-access source per split plus an info dict.
* :func:`grain_batches` reads a source into dict batches of NumPy arrays with a float32
  ``"mask"`` ``[B]`` (1 real example, 0 padding) and an int32 ``"index"`` ``[B]`` (record index).

Batches are laid out for the **global** batch by :mod:`mcr_jax.data.layout`, the same layout as
the in-memory path (:func:`mcr_jax.data.pipeline.batches`): with ``process_count`` processes, the
global batch ``b`` is the slice ``order[b * B:(b + 1) * B]`` of one seeded order of the whole split
and process ``p`` yields its contiguous rows ``[p * B / P, (p + 1) * B / P)``. Every process
therefore yields the same number of batches, and the batches of all processes concatenated in
process order are the global batch. Training (``drop_remainder=True``) drops the last partial
global batch; evaluation (``drop_remainder=False``) pads it with copies of example 0 whose mask is
0, so every example is seen exactly once with mask 1.

Read-time conversion (:func:`to_model_inputs`): uint8 RGB frames (``"video"``) → float32
ImageNet-normalised, uint8 optical flow (``"flow"``) → float32 in [-1, 1], byte strings → ``str``,
integer scalars → int32, floats → float32. Training-only augmentation (:func:`make_augment_fn`,
random resized crop + horizontal flip of the frames) runs on the uint8 frames before the
conversion, seeded per example from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags as absl_flags

from mcr_jax.data.builders import audio_video as av
from mcr_jax.data.builders.common import ManualBuilder, ManualDirError, logger
from mcr_jax.data.layout import assemble, batch_layout

Example = dict[str, Any]
AugmentFn = Callable[[Example, np.random.Generator], Example]

__all__ = [
    "FrameAugment",
    "batch_layout",
    "dataset_info",
    "grain_batches",
    "load_tfds_dataset",
    "make_augment_fn",
    "split_batches",
    "to_model_inputs",
]


class _NeverRaised(Exception):
    """Stands for ``tf.errors.ResourceExhaustedError``, which local file writes never raise."""


@contextlib.contextmanager
def shuffle_buckets_without_tensorflow():
    """While building: TFDS's writer keeps a split's serialised examples in memory up to 1 GiB and
    then spills them to temporary shuffle-bucket files through ``tf.io.gfile``, which needs
    TensorFlow (this project does not install it): every split larger than 1 GiB (a real CREMA-D,
    AVE or UCF-101 training split) would fail with ``No module named 'tensorflow'``. Inside this
    context those bucket files are written and read with Python's own file functions (local paths;
    the open-file limit raised for TFDS's 1,000 buckets). With TensorFlow installed nothing changes."""
    import importlib.util

    from tensorflow_datasets.core import shuffle

    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    gfile = types.SimpleNamespace(GFile=lambda path, mode="r": open(path, mode), exists=os.path.exists,
                                  remove=os.remove)
    local = types.SimpleNamespace(io=types.SimpleNamespace(gfile=gfile),
                                  errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(soft, 4 * shuffle.BUCKETS_NUMBER)
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: TFDS's own limit stands
        pass
    saved = shuffle.tf
    shuffle.tf = local
    try:
        yield
    finally:
        shuffle.tf = saved


def load_tfds_dataset(
    builder_cls: type[ManualBuilder],
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    split_names: Sequence[str] = ("train", "validation", "test"),
    builder_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Builds ``builder_cls`` into ``data_dir`` if needed and returns ``({split: source}, info)``.

    Args:
      builder_cls: a :class:`~mcr_jax.data.builders.common.ManualBuilder` subclass, e.g.
        :class:`mcr_jax.data.builders.CremaD`; by registered name:
        ``mcr_jax.data.dataset.get_builder_class("cremad")``.
      data_dir: where the array_record files live (``<data_dir>/<builder>/<config>/<version>``).
      manual_dir: the user's downloaded files (layouts in docs/datasets_manual.md); only needed
        when the dataset is not built yet.
      split_names: the splits to return; unknown names raise ``ValueError`` listing the built ones.
      builder_kwargs: builder options, e.g. ``{"frame_size": 32, "fold": 1}``, or ``{"config": c}``.

    Returns:
      sources: ``{split: random-access source}`` (``len``, ``source[i]`` → example dict).
      info: see :func:`dataset_info`.
    """
    if not (isinstance(builder_cls, type) and issubclass(builder_cls, ManualBuilder)):
        raise TypeError(f"load_tfds_dataset takes a builder class (a ManualBuilder subclass, e.g. "
                        f"mcr_jax.data.builders.CremaD), got {builder_cls!r}; by registered name: "
                        "mcr_jax.data.dataset.get_builder_class(name).")
    cls = builder_cls
    data_dir = os.path.expanduser(os.fspath(data_dir))
    manual_dir = None if manual_dir is None else os.path.expanduser(os.fspath(manual_dir))
    builder = cls(data_dir=data_dir, file_format="array_record", **dict(builder_kwargs or {}))
    if not builder.is_prepared():
        if manual_dir is None:
            raise ManualDirError(
                f"{cls.DATASET} is not built in {builder.data_dir} and no manual_dir was given: pass "
                f"manual_dir=<directory with the downloaded files>. Expected layout:\n{cls.LAYOUT}"
            )
        cls.check_manual_dir(manual_dir, builder.builder_config)
        logger.info("Building %s into %s", cls.DATASET, builder.data_dir)
        with shuffle_buckets_without_tensorflow():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    manual_dir=manual_dir,
                    download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                ),
                file_format="array_record",
            )
    available = sorted(builder.info.splits.keys())
    unknown = [s for s in split_names if s not in available]
    if unknown:
        raise ValueError(f"{cls.DATASET}: unknown split(s) {unknown}; the built dataset has {available}")
    sources = {s: builder.as_data_source(s) for s in split_names}
    return sources, dataset_info(builder)


def dataset_info(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """The trainer-facing description of a built dataset.

    Keys: ``name``, ``config``, ``data_dir``, ``modalities`` (ordered list), ``input_shapes``
    (``{modality: tuple}``, the float32 shapes after :func:`to_model_inputs`, without batch),
    ``num_classes`` (1 for regression), ``task`` ("classification" or "regression"),
    ``class_names``, ``split_sizes`` and the builder's full ``metadata`` (split lists, counts).
    """
    meta = dict(builder.info.metadata or {})
    return {
        "name": builder.name,
        "config": builder.builder_config.name if builder.builder_config else None,
        "data_dir": os.fspath(builder.data_dir),
        "modalities": list(meta["modalities"]),
        "input_shapes": {m: tuple(int(d) for d in meta["input_shapes"][m]) for m in meta["modalities"]},
        "num_classes": int(meta["num_classes"]),
        "task": meta["task"],
        "class_names": list(meta.get("class_names", [])),
        "split_sizes": {s: int(v.num_examples) for s, v in builder.info.splits.items()},
        "metadata": meta,
    }


# ------------------------------------------------------------------------------------ conversion
def to_model_inputs(example: Mapping[str, Any]) -> Example:
    """One decoded TFDS example → model-ready NumPy values (see the module docstring)."""
    out = {}
    for key, value in example.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, (bool, np.bool_)):
            value = np.bool_(value)
        elif isinstance(value, (int, np.integer)):
            value = np.int32(value)
        elif isinstance(value, (float, np.floating)):
            value = np.float32(value)
        elif isinstance(value, np.ndarray):
            if key == "flow" and value.dtype == np.uint8:
                value = av.normalize_flow(value)
            elif value.dtype == np.uint8 and value.ndim >= 3 and value.shape[-1] == 3:
                value = av.normalize_frames(value)
            elif value.dtype == np.float64:
                value = value.astype(np.float32)
            elif value.dtype == np.int64:
                value = value.astype(np.int32)
        out[key] = value
    return out


class FrameAugment:
    """Training augmentation of uint8 frame arrays: random resized crop + horizontal flip.

    ``keys``: the frame entries to augment (``[T, H, W, C]`` uint8 each); ``"flow"`` is treated as
    optical flow (a flip mirrors the horizontal component). Picklable, for grain workers.
    """

    def __init__(self, keys: Sequence[str] = ("video",), *, per_frame: bool = True,
                 scale: tuple[float, float] = (0.08, 1.0), flip_prob: float = 0.5):
        self.keys = tuple(keys)
        self.per_frame = per_frame
        self.scale = tuple(scale)
        self.flip_prob = flip_prob

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        out = dict(example)
        for key in self.keys:
            if key in out:
                out[key] = av.augment_frames(
                    np.asarray(out[key]), rng, per_frame=self.per_frame, flip_prob=self.flip_prob,
                    scale=self.scale, is_flow=(key == "flow"))
        return out


def make_augment_fn(info: Mapping[str, Any], **kwargs: Any) -> FrameAugment | None:
    """The training augmentation for a dataset's frame modalities, or None when it has none.

    ``info`` is the dict of :func:`load_tfds_dataset`; ``kwargs`` go to :class:`FrameAugment`.
    """
    keys = [m for m in info["modalities"] if m in ("video", "flow")]
    return FrameAugment(keys, **kwargs) if keys else None


# ----------------------------------------------------------------------------------------- reader
class _Rows:
    """Random-access view: position ``i`` → (record index, mask) of ``source``."""

    def __init__(self, indices: np.ndarray, mask: np.ndarray):
        self.indices, self.mask = indices, mask

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return int(self.indices[i]), float(self.mask[i])


class _Prepare:
    """Reads one record, augments it (when an augment_fn is given) and converts it.

    Returns ``(example, record index, mask)``; :func:`_collate` makes the batch.
    """

    def __init__(self, source, augment_fn: AugmentFn | None, seed: int, epoch: int):
        self.source, self.augment_fn, self.seed, self.epoch = source, augment_fn, seed, epoch

    def __call__(self, row: tuple[int, float]) -> tuple[Example, int, float]:
        index, mask = row
        example = dict(self.source[index])
        if self.augment_fn is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            example = self.augment_fn(example, rng)
        return to_model_inputs(example), index, mask


def _collate(rows: Sequence[tuple[Example, int, float]]) -> dict[str, np.ndarray]:
    """The batch of prepared rows: :func:`mcr_jax.data.layout.assemble`, index int32 under ``"index"``."""
    return assemble([r[0] for r in rows], np.array([r[2] for r in rows], np.float32),
                    index=np.array([r[1] for r in rows], np.int32), index_key="index")


def grain_batches(
    source,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_remainder: bool,
    augment_fn: AugmentFn | None = None,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's slice ``[batch_size // process_count, ...]`` of every global batch.

    Args:
      source: a random-access source (``len`` and ``source[i]``), e.g. from :func:`load_tfds_dataset`.
      batch_size: the GLOBAL batch size B (divisible by ``process_count``).
      shuffle: permute the split with ``PCG64(SeedSequence([seed, epoch]))`` (see
        :func:`mcr_jax.data.layout.batch_layout`); else keep record order.
      drop_remainder: True for training (drop the last partial batch); False for evaluation (pad
        it; padding rows have ``mask`` 0).
      augment_fn: ``f(example, rng) -> example`` on the raw (uint8) example, e.g.
        :func:`make_augment_fn`; ``rng`` is ``default_rng([seed, epoch, index])``. Pass it for
        training only.
      worker_count: grain worker processes (0 = read in this process).

    Yields:
      ``{key: array [B / P, ...]}`` with every example field converted by :func:`to_model_inputs`,
      plus ``"index"`` int32 and ``"mask"`` float32.
    """
    indices, mask = batch_layout(len(source), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                 drop_remainder=drop_remainder, process_index=process_index,
                                 process_count=process_count)
    if indices.shape[0] == 0:
        logger.warning("grain_batches: %d examples give no full batch of %d", len(source), batch_size)
        return
    local = batch_size // process_count
    ds = (grain.MapDataset.source(_Rows(indices.reshape(-1), mask.reshape(-1)))
          .map(_Prepare(source, augment_fn, seed, epoch))
          .batch(local, batch_fn=_collate))
    if worker_count > 0:
        # grain's workers read absl flags, which nobody has parsed outside absl.app.run: mark them
        # parsed (their defaults) while this iterator lives, and put them back as they were after
        borrowed = not absl_flags.FLAGS.is_parsed()
        if borrowed:
            absl_flags.FLAGS.mark_as_parsed()
        it = iter(ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count)))
        try:
            yield from it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            if borrowed:
                absl_flags.FLAGS.unparse_flags()
    else:
        for i in range(len(ds)):
            yield ds[i]


def split_batches(
    source,
    info: Mapping[str, Any],
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    augment: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`grain_batches` with the training or evaluation settings.

    ``train=True``: shuffled by ``(seed, epoch)``, last partial batch dropped, frames augmented
    (:func:`make_augment_fn`, unless ``augment=False``). ``train=False``: record order, last batch
    padded and masked, no augmentation.
    """
    return grain_batches(
        source, batch_size, shuffle=train, seed=seed, epoch=epoch, drop_remainder=train,
        augment_fn=make_augment_fn(info) if (train and augment) else None,
        process_index=process_index, process_count=process_count, worker_count=worker_count)
