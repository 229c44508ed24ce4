"""The registered names a run config or a command line refers to (methods, comparison labels,
datasets, fusion heads, encoders), and the one-line error for a name that is none of them: the
closest registered name, if one is close, and the whole list.

    check_method("mrc")  # UnknownName: unknown method 'mrc'; did you mean 'mcr'? methods: agm, amco, …

Each list is read from its registry when asked (a method, dataset or fusion head registered by the
user's own code counts).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnknownName(ValueError):
    """A name that is not registered; the message names the closest one and lists them all."""


def _edits(a: str, b: str) -> int:
    """The optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
    neighbours (``mrc`` → ``mcr`` is one edit)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def closest(name, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The registered name closest to ``name``: the largest difflib ratio (at least ``cutoff``), ties
    broken by the fewest edits (:func:`_edits`); None when none is that close."""
    name = str(name)
    scored = [(difflib.SequenceMatcher(None, name, c).ratio(), -_edits(name, c), c) for c in map(str, choices)]
    scored = [s for s in scored if s[0] >= cutoff]
    return max(scored)[2] if scored else None


def unknown(what: str, name, choices: Iterable[str], plural: str | None = None) -> UnknownName:
    """``unknown <what> '<name>'; did you mean '<closest>'? <plural>: a, b, …`` as an exception."""
    choices = list(choices)
    close = closest(name, choices)
    hint = f"; did you mean {close!r}?" if close else ";"
    return UnknownName(f"unknown {what} {name!r}{hint} {plural or what + 's'}: {', '.join(choices)}")


def check(what: str, name, choices: Iterable[str], plural: str | None = None) -> str:
    """``name`` when it is one of ``choices``, else :class:`UnknownName` (see :func:`unknown`)."""
    choices = list(choices)
    if name not in choices:
        raise unknown(what, name, choices, plural)
    return name


def method_names() -> list[str]:
    """The registered methods (:data:`mcr_jax.methods.METHODS`) and orchestrators (the ensemble):
    what ``method.name`` may be."""
    from mcr_jax.methods import METHODS, ORCHESTRATED

    return sorted({*METHODS, *ORCHESTRATED})


def comparison_labels() -> list[str]:
    """What a comparison's method list may hold: every method name and the comparison labels built
    on one (:data:`mcr_jax.report.METHOD_DEFAULTS`: ``ume``, ``uni_pre_frozen`` …)."""
    from mcr_jax.report import METHOD_DEFAULTS

    return sorted({*method_names(), *METHOD_DEFAULTS})


def dataset_names() -> list[str]:
    """The registered datasets (:data:`mcr_jax.data.dataset.DATASETS`): what ``data.name`` may be."""
    from mcr_jax.data.dataset import DATASETS

    return sorted(DATASETS)


def fusion_names() -> list[str]:
    """The fusion heads (:data:`mcr_jax.models.fusion.FUSIONS`) and their aliases: what
    ``model.fusion`` may be."""
    from mcr_jax.models.fusion import _ALIASES, FUSIONS

    return sorted({*FUSIONS, *_ALIASES})


def encoder_names() -> list[str]:
    """The encoders (:data:`mcr_jax.models.encoders.ENCODERS`): what ``model.encoder`` may be."""
    from mcr_jax.models.encoders import ENCODERS

    return sorted(ENCODERS)


def check_method(name) -> str:
    return check("method", name, method_names())


def check_label(name) -> str:
    return check("method", name, comparison_labels())


def check_dataset(name) -> str:
    return check("dataset", name, dataset_names())


def check_fusion(name) -> str:
    return check("fusion head", name, fusion_names(), "fusion heads (model.fusion)")


def check_encoder(name) -> str:
    return check("encoder", name, encoder_names(), "encoders (model.encoder)")


__all__ = ["UnknownName", "check", "check_dataset", "check_encoder", "check_fusion", "check_label", "check_method",
           "closest", "comparison_labels", "dataset_names", "encoder_names", "fusion_names", "method_names",
           "unknown"]
