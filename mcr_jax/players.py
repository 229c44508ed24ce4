"""Players: which parameter leaf belongs to which modality.

One module answers it for the game (:func:`assign_players`: a leaf belongs to modality ``m`` when
``m`` is a key on its path), for the baselines that scale or mask per modality
(:func:`modality_owners`: only the leaves under named groups, ``encoders/<m>``, ``heads/<m>``,
``fusion/branches/<m>``) and for the helpers built on them (:func:`scale_by_owner`,
:func:`leaf_ids`, :func:`in_group`). A separable fusion head keeps each modality's own parameters
under ``branches/<m>`` (see :class:`mcr_jax.models.fusion.FusionHead`), so its branches follow
their modality here without being named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

SHARED = -1




def path_keys(path) -> list[str]:
    """The keys of a pytree path as strings (``DictKey``/``GetAttrKey``/``SequenceKey`` alike)."""
    keys = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                keys.append(str(getattr(entry, attr)))
                break
        else:
            keys.append(str(entry))
    return keys


def assign_players(
    params: Any,
    modalities: Sequence[str],
    *,
    patterns: Mapping[str, Sequence[str]] | None = None,
    require_all: bool = True,
) -> Any:
    """Labels every parameter leaf with its owning modality's index, or ``SHARED``.

    By default a leaf belongs to modality ``m`` when ``modalities[m]`` is one of the keys on its
    path (``encoders/audio/...``, ``fusion/branches/audio/kernel``; exact, case-sensitive match).
    ``patterns`` maps a modality to regular expressions matched (``re.search``) against the
    ``/``-joined path instead; modalities absent from ``patterns`` then own nothing, by choice.

    Args:
      params: a parameter pytree, or an ``nnx.Module`` (its ``nnx.Param`` state is used).
      modalities: ordered modality names; the index is the player id.
      patterns: optional ``{modality: [regex, ...]}``.
      require_all: raise when a modality (every one of ``modalities``, or every one named in
        ``patterns``) owns no leaf. A misspelt name would otherwise silently make that modality's
        parameters shared, so that e.g. the greedy game zeroes their MIPD gradient. Pass
        ``False`` for parameter subsets where a modality may legitimately own nothing (the
        layers of a non-separable fusion head).

    Returns:
      a pytree like ``params`` with int leaves.
    """
    if len(modalities) < 2:
        raise ValueError(f"the game needs at least 2 modalities; got {list(modalities)}.")
    try:
        from flax import nnx

        if isinstance(params, nnx.Module):
            params = nnx.as_pure(nnx.state(params, nnx.Param))
    except ImportError:  # pragma: no cover - flax is a dependency
        pass
    compiled = None
    if patterns is not None:
        unknown = set(patterns) - set(modalities)
        if unknown:
            raise ValueError(f"patterns name unknown modalities {sorted(unknown)}; modalities are {list(modalities)}.")
        compiled = {m: [re.compile(p) for p in patterns[m]] for m in patterns}

    def owner(path, _leaf):
        keys = path_keys(path)
        joined = "/".join(keys)
        if compiled is not None:
            hits = [i for i, m in enumerate(modalities) if any(r.search(joined) for r in compiled.get(m, ()))]
        else:
            hits = [i for i, m in enumerate(modalities) if m in keys]
        if len(hits) > 1:
            raise ValueError(f"parameter {joined!r} matches several modalities {[modalities[i] for i in hits]}.")
        return hits[0] if hits else SHARED

    players = jax.tree_util.tree_map_with_path(owner, params)
    if require_all:
        required = list(modalities) if patterns is None else [m for m in modalities if m in patterns]
        owned = {modalities[i] for i in jax.tree.leaves(players) if i != SHARED}
        missing = [m for m in required if m not in owned]
        if missing:
            raise ValueError(_no_leaf_message(params, modalities, missing, patterns))
    return players


def _no_leaf_message(params: Any, modalities: Sequence[str], missing: list[str], patterns) -> str:
    paths = [path_keys(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    top = sorted({keys[0] for keys in paths if keys})
    second = sorted({keys[1] for keys in paths if len(keys) > 1})
    all_keys = {key for keys in paths for key in keys}
    lines = [
        f"modalit{'y' if len(missing) == 1 else 'ies'} {missing} own{'s' if len(missing) == 1 else ''} no "
        f"parameter leaf, so {'its' if len(missing) == 1 else 'their'} parameters would be treated as shared "
        f"(modalities: {list(modalities)})."
    ]
    if patterns is not None:
        lines.append(f"No path matched their patterns {({m: list(patterns[m]) for m in missing})}.")
    else:
        lines.append("A modality owns the leaves whose path holds its name as a key (exact, case-sensitive).")
    lines.append(f"Top-level keys: {top}; keys one level below: {second}.")
    close = {m: k for m in missing for k in sorted(all_keys) if k.lower() == m.lower() and k != m}
    if close:
        lines.append(f"Did you mean {close}?")
    lines.append("Pass require_all=False if a modality legitimately owns no parameter here.")
    return " ".join(lines)


# Where a modality's parameters live: <prefix>/<modality>/...
_PREFIXES = {"encoders": ("encoders",), "heads": ("heads",), "branches": ("fusion", "branches")}


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


def scale_by_owner(grads, owners, coeffs: jax.Array, shared: float | jax.Array = 1.0):
    """Multiplies every leaf owned by modality ``i`` by ``coeffs[i]`` (``[M]``) and every leaf owned by
    none (label ``SHARED``) by ``shared`` (default: unchanged)."""
    coeffs = jnp.asarray(coeffs)

    def scale(g, o):
        if o >= 0:
            return g * coeffs[o].astype(g.dtype)
        return g if isinstance(shared, (int, float)) and shared == 1.0 else g * jnp.asarray(shared, g.dtype)

    return jax.tree.map(scale, grads, owners)


def scale_by_player(owners) -> optax.GradientTransformationExtraArgs:
    """A stateless optax transformation: the updates of modality ``i``'s leaves times
    ``player_scales[i]``, the others' times ``shared_scale``.

    ``update(updates, state, params=None, *, player_scales, shared_scale=1.0, **extra)``; ``owners`` is
    a static pytree like the parameters with int leaves (a modality index, or ``SHARED`` = -1; e.g.
    from :func:`modality_owners` or :func:`assign_players`). Chain it after an optimizer for
    per-modality learning rates (MSLR), or use 0/1 scales to freeze players (ReconBoost's stages);
    ``optax.chain`` forwards the keywords.
    """

    def update_fn(updates, state, params=None, *, player_scales=None, shared_scale=1.0, **extra):
        del params, extra
        if player_scales is None:
            raise ValueError("scale_by_player's update needs player_scales=: one scale per modality ([M]).")
        return scale_by_owner(updates, owners, player_scales, shared_scale), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def in_group(path, group: str) -> bool:
    """Whether a pytree path lies under a parameter group (``"encoders"``, ``"heads"``, ``"branches"``)."""
    if group not in _PREFIXES:
        raise ValueError(f"unknown parameter group {group!r}; use {sorted(_PREFIXES)}.")
    prefix = _PREFIXES[group]
    return tuple(path_keys(path)[: len(prefix)]) == prefix


def leaf_ids(params, modalities: Sequence[str], group: str = "encoders") -> dict[str, list[int]]:
    """``{modality: [leaf index, ...]}``: the leaves (in flatten order) :func:`modality_owners`
    gives to each modality within ``group``; raises if a modality has none."""
    owners = jax.tree.leaves(modality_owners(params, modalities, (group,)))
    ids = {m: [k for k, o in enumerate(owners) if o == i] for i, m in enumerate(modalities)}
    empty = [m for m, v in ids.items() if not v]
    if empty:
        raise ValueError(f"no parameters under {'/'.join(_PREFIXES[group])}/<m> for modalities {empty}.")
    return ids


__all__ = ["SHARED", "assign_players", "in_group", "leaf_ids", "modality_owners", "path_keys", "scale_by_owner",
           "scale_by_player"]
