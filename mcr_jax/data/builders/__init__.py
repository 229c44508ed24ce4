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

They are entries of the one dataset registry, :data:`mcr_jax.data.dataset.DATASETS`
(:data:`mcr_jax.data.dataset.BUILDERS` is a view of its TFDS entries; this package knows nothing of
the registry). Load them with :func:`mcr_jax.data.load` (build and read a builder class:
:func:`mcr_jax.data.tfds_source.load_tfds_dataset`; build from the command line:
``python -m mcr_jax.data.build``); the layouts the user must download are in
``docs/datasets_manual.md`` and in each builder's ``LAYOUT``.
"""

from mcr_jax.data.builders.ave import Ave
from mcr_jax.data.builders.cmu_mosi import CmuMosei, CmuMosi
from mcr_jax.data.builders.common import ManualBuilder, ManualDirError
from mcr_jax.data.builders.cremad import CremaD
from mcr_jax.data.builders.ucf101 import Ucf101

__all__ = [
    "Ave",
    "CmuMosei",
    "CmuMosi",
    "CremaD",
    "ManualBuilder",
    "ManualDirError",
    "Ucf101",
]
