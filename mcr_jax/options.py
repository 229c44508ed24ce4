"""The one helper that turns a config section into resolved options: defaults updated by what the
section sets, unknown keys refused (a typo is an error, not a silently ignored option).

Used for every section: a method's options (its module's ``DEFAULTS``), a dataset's
(``mcr_jax.data.synthetic.DEFAULTS`` …) and the run's sections (``mcr_jax.config``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def as_dict(config) -> dict[str, Any]:
    """A plain ``dict`` (top level) of an ``ml_collections.ConfigDict``, a mapping or ``None``."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"expected a ConfigDict or a dict, got {type(config).__name__}.")


def merge_options(defaults: Mapping[str, Any], config, *, where: str, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """``defaults`` updated by the section ``config``; a key of ``config`` that is neither a default
    nor in ``ignore`` raises ``ValueError`` naming it and the known keys. ``ignore``d keys are
    accepted and left out of the result (e.g. a method section's ``name``)."""
    given = {k: v for k, v in as_dict(config).items() if k not in set(ignore)}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {where} options {unknown}; the known options are {sorted(defaults)}.")
    return {**defaults, **given}


__all__ = ["as_dict", "merge_options"]
