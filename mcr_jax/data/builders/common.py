"""Shared machinery of the manual-download TFDS builders: config naming, manual-dir checks.

Every builder here reads a directory the user downloaded (``manual_dir``); none of them ever
downloads anything. A missing or incomplete directory raises :class:`ManualDirError` naming the
directory, what is missing and the layout that was expected (see ``docs/datasets_manual.md``).

Builder options live in a dataclass config. They can be given as keyword arguments, e.g.
``CremaD(data_dir=d, frame_size=32, fold=1)``; the config is then named after the options that
differ from the defaults (``"fold1-frame_size32"``), so different options never share a directory
under ``data_dir``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

logger = logging.getLogger("mcr_jax.data")

DOCS = "docs/datasets_manual.md"


class ManualDirError(FileNotFoundError):
    """The manual-download directory is missing, empty or lacks expected files."""


def manual_dir_error(dataset: str, manual_dir: str | os.PathLike | None, problem: str, layout: str):
    """Builds a :class:`ManualDirError` that names the directory, the problem and the layout."""
    return ManualDirError(
        f"{dataset}: {problem}\n  manual directory: {manual_dir}\n"
        f"  expected layout:\n{_indent(layout.strip())}\n"
        f"  See {DOCS} for how to download and prepare these files."
    )


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def require_paths(
    dataset: str, manual_dir: str | os.PathLike | None, required: Iterable[str], layout: str
) -> None:
    """Raises :class:`ManualDirError` unless ``manual_dir`` exists and holds every ``required``
    relative path (files or directories; a trailing ``/`` means it must be a directory)."""
    if manual_dir is None or not os.path.isdir(manual_dir):
        raise manual_dir_error(dataset, manual_dir, "the manual directory does not exist.", layout)
    missing = []
    for rel in required:
        path = os.path.join(manual_dir, rel.rstrip("/"))
        ok = os.path.isdir(path) if rel.endswith("/") else os.path.isfile(path)
        if not ok:
            missing.append(rel)
    if missing:
        raise manual_dir_error(dataset, manual_dir, f"missing {', '.join(missing)}.", layout)


def config_name(config_cls: type, overrides: Mapping[str, Any]) -> str:
    """Deterministic config name from the options that differ from the defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    parts = []
    for key in sorted(overrides):
        value = overrides[key]
        if key in defaults and defaults[key] == value:
            continue
        if isinstance(value, (tuple, list)):
            value = "x".join(str(v) for v in value)
        text = str(value).replace(".", "p").replace("-", "m").replace("/", "_").replace(" ", "")
        parts.append(f"{key}{text}")
    return "-".join(parts) or "default"


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the manual-download builders.

    Subclasses set ``BUILDER_CONFIG_CLASS`` (a dataclass with defaults for every option),
    ``LAYOUT`` (the expected directory layout, shown in errors), ``DATASET`` (display name) and
    implement :meth:`check_manual_dir`, :meth:`_features` and :meth:`_make_splits`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First mcr_jax release."}
    DATASET = "dataset"
    LAYOUT = ""
    HOMEPAGE = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file. TFDS 4.9's own version needs the ``importlib_resources``
        backport (absent on Python >= 3.9) for builders defined inside a package."""
        return epath.Path(inspect.getfile(cls))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.LAYOUT:
            cls.MANUAL_DOWNLOAD_INSTRUCTIONS = f"Expected layout:\n{cls.LAYOUT}\nSee {DOCS}."

    def __init__(self, *, config: Any = None, **kwargs: Any):
        option_names = self.option_names()
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in option_names}
        if options:
            if config is not None:
                raise ValueError(
                    f"{type(self).__name__}: give either config= or options {sorted(options)}, not both"
                )
            config = self.BUILDER_CONFIG_CLASS(
                name=config_name(self.BUILDER_CONFIG_CLASS, options), **options
            )
        super().__init__(config=config, **kwargs)

    @classmethod
    def option_names(cls) -> set[str]:
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {f.name for f in dataclasses.fields(cls.BUILDER_CONFIG_CLASS)} - base

    # -- to implement --------------------------------------------------------------------------
    @classmethod
    def check_manual_dir(cls, manual_dir: str | os.PathLike | None, config: Any) -> None:
        """Raises :class:`ManualDirError` when ``manual_dir`` cannot be built from."""
        raise NotImplementedError

    def _features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def _make_splits(self, manual_dir: str) -> tuple[dict[str, list], dict[str, Any]]:
        """Returns ({split: [item, ...]}, metadata); items go to :meth:`_make_example`."""
        raise NotImplementedError

    def _make_example(self, item: Any) -> tuple[str, dict[str, Any]] | None:
        """Returns (key, example) for one item, or None to skip it."""
        raise NotImplementedError

    # -- TFDS hooks ----------------------------------------------------------------------------
    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(type(self).__doc__ or "").strip().split("\n\n")[0],
            features=self._features(),
            homepage=self.HOMEPAGE or None,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError as err:  # TFDS: "does not exist or is empty"
            raise manual_dir_error(
                self.DATASET, getattr(dl_manager, "_manual_dir", None), str(err).splitlines()[0], self.LAYOUT
            ) from None
        self.check_manual_dir(manual_dir, self.builder_config)
        splits, metadata = self._make_splits(manual_dir)
        metadata = dict(metadata)
        metadata.setdefault("options", self.options_dict())
        metadata["split_sizes_planned"] = {k: len(v) for k, v in splits.items()}
        self.info.metadata.update(metadata)
        for name, items in splits.items():
            logger.info("%s: split %s has %d examples", self.DATASET, name, len(items))
        return {name: self._generate_examples(items) for name, items in splits.items()}

    def _generate_examples(self, items: list) -> Iterator[tuple[str, dict[str, Any]]]:
        for item in items:
            out = self._make_example(item)
            if out is not None:
                yield out

    def options_dict(self) -> dict[str, Any]:
        cfg = self.builder_config
        return {name: _jsonable(getattr(cfg, name)) for name in sorted(self.option_names())}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
