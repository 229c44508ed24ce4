"""The fields every experiment config has; the ``method`` section is the chosen method's own.

Every config file's ``get_config(arg)`` takes comma-separated words: ``smoke`` (seconds-long runs)
and ``method=<name>`` (default ``mcr``), which fills the ``method`` section with that method's
options and their defaults (``mcr_jax.methods.method_defaults``), so that each of them can be
overridden on the command line (``--config.method.alpha=0.5``). ``--config.method.name=<name>``
on the command line does the same: ``experiments.flags`` turns it into ``method=<name>``.
"""

import ml_collections

from mcr_jax.config import SECTIONS, section_defaults
from mcr_jax.methods import method_defaults
from mcr_jax.models.build import DEFAULTS as MODEL_DEFAULTS


def method_config(name: str = "mcr") -> ml_collections.ConfigDict:
    """The ``method`` section: ``name`` and that method's options at their defaults."""
    return ml_collections.ConfigDict(dict(name=name, **method_defaults(name)))


def method_name(arg) -> str:
    """The ``method=<name>`` word of a config argument (``mcr`` when absent)."""
    for word in (arg or "").split(","):
        key, sep, value = word.strip().partition("=")
        if sep and key == "method" and value:
            return value
    return "mcr"


def set_mcr(c, **values) -> None:
    """Dataset-specific MCR settings (λ's, S …): applied when the config's method is MCR, skipped for
    the other methods, which have options of their own."""
    if c.method.name == "mcr":
        for k, v in values.items():
            c.method[k] = v


def base_config(arg=None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict({"name": "synthetic"})
    c.model = ml_collections.ConfigDict(dict(encoder="mlp", **MODEL_DEFAULTS))
    c.method = method_config(method_name(arg))
    # The run's sections start from the library's defaults (mcr_jax.config: defined once there).
    for name in SECTIONS:
        c[name] = section_defaults(name)
    return c


def switches(arg) -> set[str]:
    """The plain words of a config argument (``smoke``); ``key=value`` words are options."""
    return {s.strip() for s in (arg or "").split(",") if s.strip() and "=" not in s}
