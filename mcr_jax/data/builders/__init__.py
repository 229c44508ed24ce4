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

Build and read them with :func:`mcr_jax.data.tfds_source.load_tfds_dataset`; the layouts the user
must download are in ``docs/datasets_manual.md`` and in each builder's ``LAYOUT``.
"""

from mcr_jax.data.builders.ave import Ave
from mcr_jax.data.builders.cmu_mosi import CmuMosei, CmuMosi
from mcr_jax.data.builders.common import ManualBuilder, ManualDirError
from mcr_jax.data.builders.cremad import CremaD
from mcr_jax.data.builders.ucf101 import Ucf101

BUILDERS: dict[str, type[ManualBuilder]] = {
    "cremad": CremaD,
    "ave": Ave,
    "mosi": CmuMosi,
    "mosei": CmuMosei,
    "ucf101": Ucf101,
}


def get_builder_class(name: str) -> type[ManualBuilder]:
    """Builder class for a short name ("cremad", ...) or a registered name ("mcr_cremad", ...)."""
    key = name.lower().replace("-", "").replace("_", "")
    for short, cls in BUILDERS.items():
        if key in (short, cls.name.replace("_", "")):
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
