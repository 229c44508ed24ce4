"""From a config to data and a model: dataset loading, batch iteration, model construction.

Two kinds of dataset come through one interface:

- in-memory datasets registered in :mod:`mcr_jax.data` (``"synthetic"``, ``"mfeat"``): NumPy
  splits, batched by :func:`mcr_jax.data.pipeline.batches`;
- TFDS datasets built from the user's manual download (``"cremad"``, ``"ave"``, ``"mosi"``,
  ``"mosei"``, ``"ucf101"``): array_record files read through grain
  (:func:`mcr_jax.data.tfds_source.split_batches`, with read-time augmentation in training).

Either way a batch is ``{modality: array, "<modality>_mask": array?, "label": [B], "mask": [B]}``.

Every dataset is checked here, once (:mod:`mcr_jax.data.checks`): classification labels must be
integers in ``[0, num_classes)``, regression labels and every floating input finite. In-memory
splits are scanned in full when the :class:`Dataset` is made (vectorised NumPy: milliseconds);
sources read example by example (TFDS/grain, or a registered loader's random-access source) are
checked batch by batch as they are read, so a bad example stops the run at the first batch that
holds it. Either way the ``ValueError`` names the split, the entry and the example's index.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from mcr_jax.data import load_dataset
from mcr_jax.data.checks import check_split
from mcr_jax.data.pipeline import batches as array_batches
from mcr_jax.data.types import ArraySplit, DatasetInfo
from mcr_jax.models import MultimodalModel

TFDS_DATASETS = ("cremad", "ave", "mosi", "mosei", "ucf101")

_INDEX = "__example_index__"  # record indices of streamed in-memory-pipeline batches (internal)


class Dataset:
    """Splits plus :class:`DatasetInfo`, and the one way to iterate batches over them.

    With ``check=True`` (the default) the inputs are validated (see the module docstring): array
    splits here, in full; other sources as their batches are read in :meth:`batches`.
    """

    def __init__(self, splits: Mapping[str, Any], info: DatasetInfo, *, tfds_info: dict | None = None,
                 check: bool = True):
        self.splits = dict(splits)
        self.info = info
        self.tfds_info = tfds_info
        self.check = check
        if check:
            for name, source in self.splits.items():
                if self._in_memory(name):
                    self._check(source, split=name, scope="split")

    def _in_memory(self, split: str) -> bool:
        return self.tfds_info is None and isinstance(self.splits[split], (ArraySplit, Mapping))

    def _check(self, arrays, *, split: str, scope: str, index=None, valid=None) -> None:
        check_split(arrays, split=split, keys=(*self.info.modalities, "label"), task=self.info.task,
                    num_classes=self.info.num_classes, index=index, valid=valid, scope=scope)

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, batch_size: int, *, train: bool, seed: int, epoch: int,
                process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        source = self.splits[split]
        streamed = self.check and not self._in_memory(split)  # checked here, batch by batch
        if self.tfds_info is not None:
            from mcr_jax.data.tfds_source import split_batches

            index_key = "index"  # grain_batches carries each row's record index
            it = split_batches(source, self.tfds_info, batch_size, train=train, seed=seed, epoch=epoch,
                               process_index=process_index, process_count=process_count)
        else:
            index_key = _INDEX if streamed else None
            it = array_batches(source, batch_size, shuffle=train, seed=seed, epoch=epoch, drop_remainder=train,
                               process_index=process_index, process_count=process_count, index_key=index_key)
        keep = set(self.info.modalities) | {f"{m}_mask" for m in self.info.modalities} | {"label", "mask"}
        for batch in it:
            if streamed:
                self._check(batch, split=split, scope="batch", index=batch[index_key], valid=batch["mask"] > 0)
            yield {k: v for k, v in batch.items() if k in keep}

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


def load(data_config) -> Dataset:
    """The dataset named by ``config.data.name`` (see :mod:`mcr_jax.data` and docs/)."""
    name = data_config.get("name", None)
    if name in TFDS_DATASETS:
        from mcr_jax.data.tfds_source import load_tfds_dataset

        kwargs = data_config.get("builder_kwargs", None)
        data_dir = data_config.get("data_dir", None)
        if not data_dir:
            raise ValueError(f"config.data.data_dir must be set for dataset {name!r} (where the built files go).")
        manual_dir = data_config.get("manual_dir", None) or None
        sources, tinfo = load_tfds_dataset(
            name,
            data_dir=os.path.expanduser(data_dir),
            manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
            builder_kwargs=dict(kwargs) if kwargs else None,
        )
        modalities = _select(tuple(tinfo["modalities"]), data_config.get("modalities", None))
        tinfo = dict(tinfo, modalities=list(modalities),
                     input_shapes={m: tinfo["input_shapes"][m] for m in modalities})
        info = DatasetInfo(name=name, modalities=modalities,
                           input_shapes={m: tuple(s) for m, s in tinfo["input_shapes"].items()},
                           num_classes=int(tinfo["num_classes"]), task=tinfo["task"],
                           extra={k: v for k, v in tinfo.items() if k not in ("modalities", "input_shapes")})
        return Dataset(sources, info, tfds_info=tinfo)
    splits, info = load_dataset(data_config)
    return Dataset(splits, info)


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


def _encoder_spec(modality: str, shape: tuple[int, ...], model_cfg) -> dict:
    """The encoder config for one modality: ``model.encoders[modality]`` or a default by input rank."""
    per = model_cfg.get("encoders", None) or {}
    spec = dict(per.get(modality, {})) if modality in per else {}
    kind = spec.get("kind", None) or model_cfg.get("encoder", None) or _default_kind(shape)
    spec["kind"] = kind
    latent = int(model_cfg.get("latent_dim", 64))
    if kind == "mlp":
        spec.setdefault("in_features", int(np.prod(shape)))
        spec.setdefault("hidden", tuple(model_cfg.get("hidden", (128,))))
        spec.setdefault("out_dim", latent)
        spec.setdefault("dropout", float(model_cfg.get("dropout", 0.0)))
    elif kind == "transformer":
        spec.setdefault("in_features", int(shape[-1]))
        spec.setdefault("dim", latent)
        spec.setdefault("max_len", max(int(shape[0]), 8))
    elif kind == "resnet18":
        spec.setdefault("in_channels", int(shape[-1]) if len(shape) >= 3 else 1)
        spec.setdefault("widths", tuple(model_cfg.get("widths", (64, 128, 256, 512))))
        spec.setdefault("blocks", tuple(model_cfg.get("blocks", (2, 2, 2, 2))))
        spec.setdefault("out_dim", latent)
    return spec


def _default_kind(shape) -> str:
    if len(shape) == 1:
        return "mlp"
    if len(shape) == 2:
        return "resnet18"  # a spectrogram [F, T]; sequences should name "transformer" explicitly
    return "resnet18"


def build_model(model_cfg, info: DatasetInfo, *, seed: int) -> MultimodalModel:
    """The :class:`MultimodalModel` for a dataset, from ``config.model``.

    ``model`` fields: ``encoder`` (kind for every modality) or ``encoders.<modality>`` (full spec),
    ``latent_dim``, ``hidden`` (MLP), ``widths``/``blocks`` (ResNet), ``dropout``, ``fusion``
    (``linear``, ``concat_mlp``, ``film``, ``gated``, ``transformer``), ``fusion_kwargs``, ``ceb``.
    """
    encoders = {m: _encoder_spec(m, info.input_shapes[m], model_cfg) for m in info.modalities}
    fusion_kwargs = model_cfg.get("fusion_kwargs", None)
    return MultimodalModel(
        info.modalities,
        encoders,
        num_classes=info.num_classes,
        fusion=model_cfg.get("fusion", "linear"),
        fusion_kwargs=dict(fusion_kwargs) if fusion_kwargs else None,
        ceb=bool(model_cfg.get("ceb", False)),
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )
