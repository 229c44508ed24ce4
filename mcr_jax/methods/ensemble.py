"""Ensemble of separately trained unimodal models.

No training of its own: the trainer trains one unimodal run per modality (or reuses finished
ones) and combines their predictions with :func:`combine_logits`.

- ``"standardized"`` (default): each model's logits are standardised by the mean and standard
  deviation of **all its logit entries on the whole evaluated split** (validation or test), then
  summed. The statistics therefore depend on the split, not on how it is batched.
- ``"standardized_per_batch"`` (the reference's evaluation): the same standardisation, but with
  the statistics of each evaluation batch of ``batch_size`` consecutive rows (the last batch may
  be smaller), as the reference standardises inside its evaluation loop. Population (ddof 0) and
  sample (ddof 1) standard deviations scale every model of a batch by the same factor, so the
  ensemble's predicted class does not depend on that choice.
- ``"probs"``: the models' softmax probabilities are averaged (log of the average is returned).
- ``"logits"``: the models' raw logits are averaged, unstandardised: UME, the Uni-Modal Ensemble of
  Du et al. (ICML 2023, "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning"), as the
  paper's text describes it (the uni-modal models' output logits averaged). No code release of the
  paper was found, so nothing confirms how the released experiments combined the models (logits or
  probabilities, weighted or not); the comparison label ``ume`` (``mcr_jax.report``) is this mode.
  The probability average, the other usual reading, is ``mode="probs"`` beside it (on the same
  unimodal runs; the two can rank classes differently when the models' logit scales differ).

Config (``method`` section): ``mode`` and, for the per-batch mode, ``batch_size`` (0 = the
config's ``eval.batch_size``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("standardized", "standardized_per_batch", "probs", "logits")
#: the ensemble's options (``method`` section); ``unimodal_workdirs``: ``{modality: workdir}`` to reuse.
DEFAULTS = dict(mode="standardized", batch_size=0, unimodal_workdirs={})


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(x.std(), 1e-12)


def combine_logits(logits: Sequence[np.ndarray], mode: str = "standardized", *,
                   batch_size: int | None = None) -> np.ndarray:
    """Combines ``M`` arrays ``[N, C]`` of unimodal logits into ensemble scores ``[N, C]``.

    ``batch_size`` is the evaluation batch of ``"standardized_per_batch"`` (required there)."""
    if len(logits) < 1:
        raise ValueError("combine_logits needs at least one model's logits.")
    shapes = {np.shape(x) for x in logits}
    if len(shapes) != 1:
        raise ValueError(f"every model's logits must have the same shape [N, C]; got {sorted(shapes)}.")
    arrays = [np.asarray(x, np.float64) for x in logits]
    if mode == "standardized":
        return sum(_standardize(x) for x in arrays)
    if mode == "standardized_per_batch":
        if not batch_size or int(batch_size) < 1:
            raise ValueError(f"ensemble mode 'standardized_per_batch' needs batch_size >= 1; got {batch_size!r}.")
        b = int(batch_size)
        return sum(np.concatenate([_standardize(x[i:i + b]) for i in range(0, len(x), b)]) for x in arrays)
    if mode == "probs":
        probs = []
        for x in arrays:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            probs.append(e / e.sum(axis=-1, keepdims=True))
        return np.log(np.mean(probs, axis=0) + 1e-12)
    if mode == "logits":
        return np.mean(arrays, axis=0)
    raise ValueError(f"unknown ensemble mode {mode!r}; use one of {MODES}.")
