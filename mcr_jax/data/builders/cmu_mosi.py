"""CMU-MOSI and CMU-MOSEI aligned-feature pickles as manual-download TFDS builders.

The widely shared aligned pickles (MulT / MultiBench style) hold one dict per split (``train``,
``valid``, ``test``) with arrays ``vision`` ``[N, L, Fv]``, ``audio`` ``[N, L, Fa]``, ``text``
``[N, L, Ft]``, ``labels`` (``[N]``, ``[N, 1]`` or ``[N, 1, 1]``; sentiment in [-3, 3]) and
optionally ``id``. L is 50 and the sizes are MOSI 20 / 5 / 300, MOSEI 35 / 74 / 300 (check): the
builder reads L and the sizes from the file, checks that the splits agree, warns when they differ
from these documented values and records them in the metadata (``feature_dims``).

Example: ``vision``, ``audio``, ``text`` float32 ``[L, F_m]``; ``vision_mask``, ``audio_mask``,
``text_mask`` bool ``[L]`` (True = real step); ``label`` float32 sentiment; ``clip_id`` string.

* Non-finite values (NaN, ±inf; some audio rows have them) are set to 0 and COUNTED per split and
  modality (values and examples touched), in the metadata (``nonfinite``) and in the log.
* Masks (``mask_mode``): ``"joint"`` (default): a step is padding when all its features are zero
  in every modality (after sanitising), the same mask for all modalities; ``"per_modality"``: a
  step is padding for a modality when all of that modality's features are zero.
* Splits: ``train``, ``validation`` (the pickle's ``valid``), ``test``.
* Pickles: unpickling runs code from the file. The pickle must lie inside the manual directory
  (real paths compared, so ``..``, absolute ``pickle_name`` values and symbolic links pointing out
  of it are refused before the file is opened); reading it logs a one-line warning naming the file,
  and a file that cannot be unpickled raises ``ValueError("could not unpickle <path>: <cause>")``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mcr_jax.data.builders.common import ManualBuilder, logger, manual_dir_error, require_paths

MODALITIES = ("vision", "audio", "text")
SPLIT_KEYS = {"train": ("train",), "validation": ("valid", "val", "validation"), "test": ("test",)}


@dataclasses.dataclass(eq=False, kw_only=True)
class CmuConfig(tfds.core.BuilderConfig):
    """Options of the MOSI / MOSEI builders (see the module docstring)."""

    pickle_name: str = ""
    mask_mode: str = "joint"


def _layout(candidates: tuple[str, ...]) -> str:
    return (f"<manual_dir>/{candidates[0]}   (or {', '.join(candidates[1:])}, or pickle_name=...)\n"
            "  a pickled dict {'train'|'valid'|'test': {'vision': [N, 50, Fv], 'audio': [N, 50, Fa],\n"
            "                   'text': [N, 50, Ft], 'labels': [N, 1, 1], 'id': [N, ...] (optional)}}")


def inside_manual_dir(path: str | os.PathLike, manual_dir: str | os.PathLike | None) -> str:
    """The real path of ``path``; ``ValueError`` unless it lies inside ``manual_dir``.

    Both paths are resolved first (``os.path.realpath``), so ``..`` and symbolic links pointing out
    of the directory count as outside; a manual directory that is itself a link is fine.
    """
    real = os.path.realpath(path)
    root = os.path.realpath(manual_dir) if manual_dir is not None else None
    if root is None or os.path.commonpath([real, root]) != root:
        raise ValueError(
            f"refusing to read {real} (given as {os.fspath(path)}): it is outside the manual directory "
            f"{root if root is not None else manual_dir} (symbolic links are resolved). Unpickling runs "
            "code from the file, so only pickles inside the configured manual directory are read: "
            "copy the file you trust there."
        )
    return real


def load_pickle(path: str | os.PathLike, *, manual_dir: str | os.PathLike | None) -> Any:
    """Unpickles ``path`` (latin-1 strings for Python 2 pickles). Only load files you trust.

    Unpickling runs code from the file: a warning says so, naming the file; a file outside
    ``manual_dir`` (after resolving links) is refused with ``ValueError`` before it is opened, and
    a file that cannot be unpickled raises ``ValueError("could not unpickle <path>: <cause>")``.
    """
    real = inside_manual_dir(path, manual_dir)
    name = os.fspath(path) if os.path.abspath(path) == real else f"{os.fspath(path)} (-> {real})"
    logger.warning("Reading pickle %s: unpickling runs code from the file; only read files you trust.", name)
    try:
        with open(real, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except Exception as err:  # any failure of a foreign pickle: name the file
        raise ValueError(f"could not unpickle {name}: {type(err).__name__}: {err}") from err


def sanitize(x: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``[N, ...]`` → (float32 copy with non-finite values set to 0, #values fixed, #rows touched)."""
    x = np.asarray(x, np.float32)
    bad = ~np.isfinite(x)
    n_values = int(bad.sum())
    n_rows = int(bad.reshape(len(x), -1).any(axis=1).sum()) if x.size else 0
    return np.where(bad, np.float32(0), x), n_values, n_rows


def step_masks(features: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Real-step masks ``{m: bool [N, L]}`` from ``{m: [N, L, F_m]}`` (see ``mask_mode``)."""
    nonzero = {m: np.any(x != 0, axis=-1) for m, x in features.items()}
    if mode == "per_modality":
        return nonzero
    if mode != "joint":
        raise ValueError(f"mask_mode must be 'joint' or 'per_modality', got {mode!r}")
    joint = np.logical_or.reduce(list(nonzero.values()))
    return {m: joint for m in features}


def _id_to_str(value: Any, fallback: str) -> str:
    if value is None:
        return fallback
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple, np.ndarray)):
        return "_".join(_id_to_str(v, "") for v in np.asarray(value, dtype=object).reshape(-1))
    return str(value)


class _CmuBase(ManualBuilder, skip_registration=True):
    CANDIDATES: tuple[str, ...] = ()
    EXPECTED_DIMS: dict[str, int] = {}
    EXPECTED_LEN = 50
    BUILDER_CONFIG_CLASS = CmuConfig
    BUILDER_CONFIGS = [CmuConfig(name="default")]

    def __init_subclass__(cls, **kwargs):
        cls.LAYOUT = _layout(cls.CANDIDATES)
        super().__init_subclass__(**kwargs)

    @classmethod
    def pickle_path(cls, manual_dir, config) -> str:
        names = (config.pickle_name,) if config.pickle_name else cls.CANDIDATES
        for name in names:
            if manual_dir is not None and os.path.isfile(os.path.join(manual_dir, name)):
                path = os.path.join(manual_dir, name)
                inside_manual_dir(path, manual_dir)  # refuse a file outside before any build starts
                return path
        require_paths(cls.DATASET, manual_dir, [], cls.LAYOUT)  # names a missing directory first
        raise manual_dir_error(cls.DATASET, manual_dir, f"none of {list(names)} found.", cls.LAYOUT)

    @classmethod
    def check_manual_dir(cls, manual_dir, config) -> None:
        cls.pickle_path(manual_dir, config)

    def _features(self):
        feats: dict[str, Any] = {}
        for m in MODALITIES:
            feats[m] = tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                            encoding=tfds.features.Encoding.BYTES)
            feats[f"{m}_mask"] = tfds.features.Tensor(shape=(None,), dtype=np.bool_)
        feats["label"] = tfds.features.Scalar(dtype=np.float32)
        feats["clip_id"] = tfds.features.Text()
        return tfds.features.FeaturesDict(feats)

    def _make_splits(self, manual_dir):
        path = self.pickle_path(manual_dir, self.builder_config)
        data = load_pickle(path, manual_dir=manual_dir)
        problem = lambda msg: manual_dir_error(self.DATASET, manual_dir, f"{os.path.basename(path)}: {msg}",
                                               self.LAYOUT)
        if not isinstance(data, dict):
            raise problem(f"expected a dict of splits, got {type(data).__name__}.")
        splits, nonfinite, dims, lengths, labels_out_of_range = {}, {}, {}, set(), 0
        for split, keys in SPLIT_KEYS.items():
            key = next((k for k in keys if k in data), None)
            if key is None:
                raise problem(f"no split {keys[0]!r}; it holds {sorted(data)}.")
            part = data[key]
            missing = [k for k in (*MODALITIES, "labels") if k not in part]
            if missing:
                raise problem(f"split {key!r} lacks {missing}; it holds {sorted(part)}.")
            feats, nonfinite[split] = {}, {}
            for m in MODALITIES:
                arr = np.asarray(part[m])
                if arr.ndim != 3:
                    raise problem(f"{key}/{m} must be [N, L, F], got shape {arr.shape}.")
                feats[m], n_vals, n_rows = sanitize(arr)
                nonfinite[split][m] = {"values": n_vals, "examples": n_rows}
                if n_vals:
                    logger.warning("%s: %s/%s had %d non-finite values in %d examples; set to 0",
                                   self.DATASET, split, m, n_vals, n_rows)
                dims.setdefault(m, set()).add(arr.shape[2])
                lengths.add(arr.shape[1])
            labels = np.asarray(part["labels"], np.float32)
            n = len(feats["vision"])
            if any(len(x) != n for x in feats.values()) or len(labels) != n:
                raise problem(f"split {key!r} has different numbers of rows per array.")
            labels = labels.reshape(n, -1)
            if labels.shape[1] != 1:
                logger.warning("%s: labels have %d values per example; using the first (sentiment)",
                               self.DATASET, labels.shape[1])
            labels = labels[:, 0]
            if not np.all(np.isfinite(labels)):
                raise problem(f"split {key!r} has non-finite labels.")
            labels_out_of_range += int(np.sum(np.abs(labels) > 3.0))
            ids = part.get("id")
            masks = step_masks(feats, self.builder_config.mask_mode)
            splits[split] = [
                {"key": f"{split}-{i:06d}",
                 "clip_id": _id_to_str(None if ids is None else ids[i], f"{split}-{i}"),
                 "label": labels[i], **{m: feats[m][i] for m in MODALITIES},
                 **{f"{m}_mask": masks[m][i] for m in MODALITIES}}
                for i in range(n)
            ]
        if any(len(v) != 1 for v in dims.values()) or len(lengths) != 1:
            raise problem(f"splits disagree on sequence length {sorted(lengths)} or feature sizes "
                          f"{ {m: sorted(v) for m, v in dims.items()} }.")
        feature_dims = {m: next(iter(v)) for m, v in dims.items()}
        seq_len = next(iter(lengths))
        if feature_dims != self.EXPECTED_DIMS or seq_len != self.EXPECTED_LEN:
            logger.warning("%s: file has length %d and feature sizes %s; documented: %d and %s",
                           self.DATASET, seq_len, feature_dims, self.EXPECTED_LEN, self.EXPECTED_DIMS)
        if labels_out_of_range:
            logger.warning("%s: %d labels outside [-3, 3]", self.DATASET, labels_out_of_range)
        meta = {
            "modalities": list(MODALITIES),
            "input_shapes": {m: [seq_len, feature_dims[m]] for m in MODALITIES},
            "feature_dims": feature_dims,
            "seq_len": seq_len,
            "num_classes": 1,
            "task": "regression",
            "class_names": [],
            "nonfinite": nonfinite,
            "nonfinite_total": sum(c["values"] for s in nonfinite.values() for c in s.values()),
            "labels_out_of_range": labels_out_of_range,
            "source_file": os.path.basename(path),
        }
        return splits, meta

    def _make_example(self, item):
        example = {k: v for k, v in item.items() if k != "key"}
        example["label"] = np.float32(item["label"])
        return item["key"], example


class CmuMosi(_CmuBase):
    """CMU-MOSI sentiment (regression in [-3, 3]) from the aligned-feature pickle.

    About 2,199 clips (1,284 / 229 / 686). See mcr_jax.data.builders.cmu_mosi.
    """

    name = "mcr_mosi"
    DATASET = "CMU-MOSI"
    HOMEPAGE = "http://multicomp.cs.cmu.edu/resources/cmu-mosi-dataset/"
    CANDIDATES = ("mosi_data.pkl", "mosi_raw.pkl", "mosi.pkl")
    EXPECTED_DIMS = {"vision": 20, "audio": 5, "text": 300}


class CmuMosei(_CmuBase):
    """CMU-MOSEI sentiment (regression in [-3, 3]) from the aligned-feature pickle.

    About 22,856 clips (16,326 / 1,871 / 4,659). See mcr_jax.data.builders.cmu_mosi.
    """

    name = "mcr_mosei"
    DATASET = "CMU-MOSEI"
    HOMEPAGE = "http://multicomp.cs.cmu.edu/resources/cmu-mosei-dataset/"
    CANDIDATES = ("mosei_senti_data.pkl", "mosei_raw.pkl", "mosei.pkl")
    EXPECTED_DIMS = {"vision": 35, "audio": 74, "text": 300}
