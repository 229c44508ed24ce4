"""Ensemble of separately trained unimodal models (SPEC.md §8).

No training of its own: the trainer trains one unimodal run per modality (or reuses finished
ones) and combines their predictions with :func:`combine_logits`.

- ``"standardized"`` (the reference's default): each model's logits are standardised by the mean
  and standard deviation of all its logit entries on the evaluated split, then summed;
- ``"probs"``: the models' softmax probabilities are averaged (log of the average is returned).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("standardized", "probs")


def combine_logits(logits: Sequence[np.ndarray], mode: str = "standardized") -> np.ndarray:
    """Combines ``M`` arrays ``[N, C]`` of unimodal logits into ensemble scores ``[N, C]``."""
    if len(logits) < 1:
        raise ValueError("combine_logits needs at least one model's logits.")
    shapes = {np.shape(x) for x in logits}
    if len(shapes) != 1:
        raise ValueError(f"every model's logits must have the same shape [N, C]; got {sorted(shapes)}.")
    arrays = [np.asarray(x, np.float64) for x in logits]
    if mode == "standardized":
        return sum((x - x.mean()) / max(x.std(), 1e-12) for x in arrays)
    if mode == "probs":
        probs = []
        for x in arrays:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            probs.append(e / e.sum(axis=-1, keepdims=True))
        return np.log(np.mean(probs, axis=0) + 1e-12)
    raise ValueError(f"unknown ensemble mode {mode!r}; use one of {MODES}.")
