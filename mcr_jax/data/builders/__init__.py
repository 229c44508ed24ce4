"""Manual-download TFDS builders of the paper's real datasets (array_record, read with grain).

===========  ======================  =========================================================
name         builder                 modalities (float32 at read time) → label
===========  ======================  =========================================================
cremad       :class:`CremaD`         audio [257, 188], video [3, S, S, 3] → 6 emotions
ave          :class:`Ave`            audio [257, 1004], video [4, S, S, 3] → 28 events
mosi         :class:`CmuMosi`        vision [50, 20], audio [50, 5], text [50, 300] → sentiment
mosei        :class:`CmuMosei`       vision [50, 35], audio [50, 74], text [50, 300] → sentiment
ucf101       :class:`Ucf101`         video [4, S, S, 3] + audio [257, 136] (51 classes) or
                                     + flow [4, S, S, 2] (101 classes) → action
===========  ======================  =========================================================

They are entries of the one dataset registry, :data:`mcr_jax.data.dataset.DATASETS` (``BUILDERS``
here is a view of its TFDS entries). Load them with :func:`mcr_jax.data.load` (build and read:
:func:`mcr_jax.data.tfds_source.load_tfds_dataset`); the layouts the user
must download are in ``docs/datasets_manual.md`` and in each builder's ``LAYOUT``.
"""

from collections.abc import Iterator, Mapping

from mcr_jax.data.builders.ave import Ave
from mcr_jax.data.builders.cmu_mosi import CmuMosei, CmuMosi
from mcr_jax.data.builders.common import ManualBuilder, ManualDirError
from mcr_jax.data.builders.cremad import CremaD
from mcr_jax.data.builders.ucf101 import Ucf101
from mcr_jax.data.dataset import DATASETS, TFDS


class _Builders(Mapping):
    """``{name: builder class}`` of the TFDS entries of :data:`mcr_jax.data.dataset.DATASETS`.

    A read-only, live view: the registry is the one list of datasets, so a builder registered
    with ``register_dataset(name, builder=...)`` appears here too.
    """

    def _names(self) -> list[str]:
        return [name for name, spec in DATASETS.items() if getattr(spec, "kind", None) == TFDS]

    def __getitem__(self, name: str) -> type[ManualBuilder]:
        if name not in self._names():
            raise KeyError(f"{name!r} is not a TFDS dataset; the TFDS datasets are {sorted(self._names())}.")
        return DATASETS[name].builder_class()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"BUILDERS({dict(self.items())!r})"


BUILDERS: Mapping[str, type[ManualBuilder]] = _Builders()


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_builder_class(name: str) -> type[ManualBuilder]:
    """Builder class for a short name ("cremad", ...) or a registered name ("mcr_cremad", ...)."""
    key = _norm(name)
    for short, cls in BUILDERS.items():
        if key in (_norm(short), cls.name.replace("_", "")):
            return cls
    raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")


__all__ = [
    "BUILDERS",
    "Ave",
    "CmuMosei",
    "CmuMosi",
    "CremaD",
    "ManualBuilder",
    "ManualDirError",
    "Ucf101",
    "get_builder_class",
]
