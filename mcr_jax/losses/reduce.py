"""Reductions over a batch with padding rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.losses._checks import assert_same_shape


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over the rows where ``mask`` is nonzero (all rows when ``mask`` is None).

    ``mask`` has ``values``' shape (usually ``[B]``; another shape, which would broadcast into a
    wrong mean, is a ``ValueError``) and acts as a weight; an all-zero mask gives 0.
    """
    if mask is None:
        return jnp.mean(values)
    w = jnp.asarray(mask, values.dtype)
    assert_same_shape(values, w, "values", "mask", "a weight per value, e.g. [B]")
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)
