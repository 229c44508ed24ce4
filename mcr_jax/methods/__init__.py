"""Training strategies behind one interface (:class:`~mcr_jax.methods.base.Method`) and a registry.

``"ensemble"`` is not a :class:`Method`: the trainer runs one ``"unimodal"`` run per modality and
combines their predictions (:mod:`mcr_jax.methods.ensemble`).
"""

from mcr_jax.methods.base import Method, ModelHandle
from mcr_jax.methods.ensemble import combine_logits
from mcr_jax.methods.joint import Joint
from mcr_jax.methods.mcr import MCR
from mcr_jax.methods.multiloss import MultiLoss
from mcr_jax.methods.unimodal import Unimodal
from mcr_jax.methods.unipre import UniPre

METHODS: dict[str, type[Method] | str] = {
    "joint": Joint,
    "multiloss": MultiLoss,
    "unimodal": Unimodal,
    "uni_pre": UniPre,
    "mcr": MCR,
    # The baselines, imported when first used ("module:Class").
    "ogm_ge": "mcr_jax.methods.ogm_ge:OGMGE",
    "agm": "mcr_jax.methods.agm:AGM",
    "mlb": "mcr_jax.methods.mlb:MLB",
    "mslr": "mcr_jax.methods.mslr:MSLR",
    "mmcosine": "mcr_jax.methods.mmcosine:MMCosine",
    "mmpareto": "mcr_jax.methods.mmpareto:MMPareto",
    "reconboost": "mcr_jax.methods.reconboost:ReconBoost",
    "dnr": "mcr_jax.methods.dnr:DnR",
    # More balancing methods of the field, each from its authors' (or a cited) released code.
    "greedy": "mcr_jax.methods.greedy:Greedy",
    "gblending": "mcr_jax.methods.gblending:GBlending",
    "pmr": "mcr_jax.methods.pmr:PMR",
    "umt": "mcr_jax.methods.umt:UMT",
    "opm": "mcr_jax.methods.opm:OPM",
    "mla": "mcr_jax.methods.mla:MLA",
    "valuation": "mcr_jax.methods.valuation:Valuation",
    "lfm": "mcr_jax.methods.lfm:LFM",
    "inforeg": "mcr_jax.methods.inforeg:InfoReg",
    "cml": "mcr_jax.methods.cml:CML",
    "amco": "mcr_jax.methods.amco:AMCo",
    "mbsd": "mcr_jax.methods.mbsd:MBSD",
}
#: the names of :data:`mcr_jax.train.ORCHESTRATORS` (runs combined, not one trained model; the trainer
#: owns the functions), each with the module holding its options (``DEFAULTS``) and tuning grid (``GRID``).
ORCHESTRATED = {"ensemble": "mcr_jax.methods.ensemble"}


def _orchestrator_module(name: str):
    import importlib

    return importlib.import_module(ORCHESTRATED[name])


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (importing it on first use)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS) + list(ORCHESTRATED)}.")
    entry = METHODS[name]
    if isinstance(entry, str):
        import importlib

        module, cls = entry.split(":")
        entry = METHODS[name] = getattr(importlib.import_module(module), cls)
    return entry


def method_defaults(name: str) -> dict:
    """The options of method ``name`` with their defaults (its module's ``DEFAULTS``): what a config's
    ``method`` section holds for it, besides ``name``."""
    if name in ORCHESTRATED:
        return dict(getattr(_orchestrator_module(name), "DEFAULTS", {}))
    return method_class(name).option_defaults()


def method_grid(name: str) -> dict[str, list]:
    """The tuning grid of method ``name`` (its module's ``GRID``: option → values; ``{}``: nothing
    to tune), used by :mod:`mcr_jax.study`."""
    import sys

    if name in ORCHESTRATED:
        return {k: list(v) for k, v in getattr(_orchestrator_module(name), "GRID", {}).items()}
    cls = method_class(name)
    return {k: list(v) for k, v in getattr(sys.modules[cls.__module__], "GRID", {}).items()}


def register_method(name: str, cls: type[Method]) -> type[Method]:
    """Adds a method class to the registry (used by the baselines and by users' own methods)."""
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered.")
    METHODS[name] = cls
    return cls


def get_method(config, info) -> Method:
    """Instantiates ``METHODS[config.name]`` with the method config and the dataset info."""
    return method_class(config.get("name", None))(config, info)


__all__ = ["METHODS", "MCR", "method_class", "method_defaults", "method_grid", "Joint", "Method", "ModelHandle",
           "MultiLoss", "UniPre", "Unimodal", "combine_logits", "get_method", "register_method"]
