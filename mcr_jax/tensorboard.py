"""Per-epoch metrics as TensorBoard event files, next to ``metrics.jsonl`` (optional).

Switched on by ``config.log.tensorboard = True``; needs ``tensorboardX`` (no TensorFlow). Every
run writes ``<workdir>/tensorboard/``: the epoch's training means as ``train/<name>`` and its
validation metrics as ``val/<name>`` (every head's accuracy, MIPD per modality, …), step = epoch.
Watch a study or a comparison with ``tensorboard --logdir <workdir>``: each run is its own curve.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

#: open writers, one per run folder (closed by :func:`close`)
_WRITERS: dict[str, object] = {}


#: the ``log`` section's options: what is written beside the results (never the results themselves).
DEFAULTS = dict(tensorboard=False)


def enabled(config) -> bool:
    """Whether the (resolved, :func:`mcr_jax.config.resolve_config`) config asks for TensorBoard event
    files (``log.tensorboard``)."""
    return bool(config.log.tensorboard)


def _writer(workdir: str):
    folder = os.path.join(os.path.abspath(workdir), "tensorboard")
    if folder not in _WRITERS:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboardX is in requirements.txt
            raise ImportError("log.tensorboard = True needs tensorboardX: python -m pip install tensorboardX "
                              "(no TensorFlow needed), or set log.tensorboard = False.") from e
        _WRITERS[folder] = SummaryWriter(logdir=folder)
    return _WRITERS[folder]


def log_epoch(workdir: str, record: Mapping) -> None:
    """Writes one epoch record (``{"epoch", "train": {...}, "val": {...}}``) as scalars."""
    w = _writer(workdir)
    step = int(record["epoch"])
    for group in ("train", "val"):
        for name, value in record.get(group, {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                w.add_scalar(f"{group}/{name}", float(value), step)
    w.flush()


def close(workdir: str) -> None:
    """Closes the run's writer (a later :func:`log_epoch` reopens one)."""
    w = _WRITERS.pop(os.path.join(os.path.abspath(workdir), "tensorboard"), None)
    if w is not None:
        w.close()


__all__ = ["close", "enabled", "log_epoch"]
