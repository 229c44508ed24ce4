"""Small helpers shared by the baselines: option checks, which parameters belong to which modality,
per-modality gradient scaling."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mcr_jax.game import path_keys

# Where a modality's parameters live: <prefix>/<modality>/...
_PREFIXES = {"encoders": ("encoders",), "heads": ("heads",), "branches": ("fusion", "branches")}


def check_options(config, defaults: dict, method: str) -> dict:
    """``{option: value}`` from the method config, after rejecting unknown keys."""
    unknown = set(config.keys()) - set(defaults) - {"name"}
    if unknown:
        raise ValueError(f"unknown {method} options {sorted(unknown)}; known: {sorted(defaults)}.")
    return {k: config.get(k, v) for k, v in defaults.items()}


def modality_owners(params, modalities: Sequence[str], parts: Sequence[str] = ("encoders",)):
    """A pytree like ``params`` with int leaves: ``i`` for a leaf of modality ``modalities[i]`` that
    lives under one of ``parts`` (``"encoders"``: ``encoders/<m>/…``, ``"heads"``: ``heads/<m>/…``,
    ``"branches"``: ``fusion/branches/<m>/…``), ``-1`` for every other leaf."""
    unknown = set(parts) - set(_PREFIXES)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; use {sorted(_PREFIXES)}.")
    names = list(modalities)

    def owner(path, _leaf):
        keys = path_keys(path)
        for part in parts:
            prefix = _PREFIXES[part]
            n = len(prefix)
            if tuple(keys[:n]) == prefix and len(keys) > n and keys[n] in names:
                return names.index(keys[n])
        return -1

    return jax.tree_util.tree_map_with_path(owner, params)


def scale_by_owner(grads, owners, coeffs: jax.Array):
    """Multiplies every leaf owned by modality ``i`` by ``coeffs[i]`` (``[M]``); others unchanged."""
    return jax.tree.map(lambda g, o: g * coeffs[o].astype(g.dtype) if o >= 0 else g, grads, owners)


def others_mean(values: jax.Array) -> jax.Array:
    """``[M]`` → ``[M]``: entry ``m`` is the mean of the other entries (``M >= 2``)."""
    m = values.shape[0]
    return (jnp.sum(values) - values) / (m - 1)


def true_class_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[B, C]``, int ``[B]`` → ``softmax(logits)[i, y_i]`` ``[B]``."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.take_along_axis(probs, labels.astype(jnp.int32)[:, None], axis=1)[:, 0]
