"""Small helpers shared by the baselines: scores; which parameters belong to which
modality lives in :mod:`mcr_jax.players`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def others_mean(values: jax.Array) -> jax.Array:
    """``[M]`` → ``[M]``: entry ``m`` is the mean of the other entries (``M >= 2``)."""
    m = values.shape[0]
    return (jnp.sum(values) - values) / (m - 1)


def true_class_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[B, C]``, int ``[B]`` → ``softmax(logits)[i, y_i]`` ``[B]``."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.take_along_axis(probs, labels.astype(jnp.int32)[:, None], axis=1)[:, 0]
