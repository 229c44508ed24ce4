"""The run config: each section's options live once, beside the code that reads them, and
:func:`resolve_config` fills and checks them once at the start of a run.

===========  ======================================================================
section      defaults
===========  ======================================================================
``optim``    :data:`mcr_jax.optim.DEFAULTS`
``train``    :data:`TRAIN`
``eval``     :data:`EVAL`
``log``      :data:`mcr_jax.tensorboard.DEFAULTS`
``parallel`` :data:`mcr_jax.parallel.DEFAULTS`
``init``     :data:`INIT`
``method``   the method's module ``DEFAULTS`` (checked by the method: :func:`mcr_jax.methods.method_defaults`)
``data``     the dataset's own (checked by its loader)
``model``    encoder- and fusion-specific fields (:func:`mcr_jax.models.build_model`)
===========  ======================================================================

The experiment configs (``experiments/configs/base.py``) start from these same dicts, so a config
built in code with a few fields and one from the command line resolve to the same run.
"""

from __future__ import annotations

import ml_collections

from mcr_jax import optim, parallel, tensorboard
from mcr_jax.options import as_dict, merge_options

#: the ``train`` section: ``batch_size`` (global), ``num_epochs``, ``patience`` (epochs without a
#: better validation value before stopping; 0 = never), ``select`` (the validation metric that
#: selects the model; "" = the task's default), ``checkpoint`` (write checkpoints and resume),
#: ``checkpoint_every`` (epochs; 0 = automatic), ``compiled_epochs`` (a whole epoch as one program),
#: ``prefetch`` (streamed data: training batches prepared and transferred ahead on a background
#: thread; 0 = none).
TRAIN = dict(batch_size=64, num_epochs=30, patience=10, select="", checkpoint=True, checkpoint_every=0,
             compiled_epochs=True, prefetch=2)
#: the ``eval`` section: ``batch_size`` (0 = the training batch size), ``mipd_samples`` (permutations
#: per batch of the MIPD diagnostic; 0 = off), ``shapley`` (the Shapley modality-contribution
#: diagnostic on the selected model's validation and test splits, fused-head methods only; see
#: :func:`mcr_jax.evaluation.shapley`), ``shapley_absent`` (how an absent modality is replaced:
#: "zero_input" its input zeroed, as BalanceMM; "zero" its latent zeroed; "mean" its latent set to
#: the split's mean latent; the latter two through ``method.fuse``, as MIPD).
EVAL = dict(batch_size=256, mipd_samples=8, shapley=True, shapley_absent="zero_input")
#: the ``init`` section: ``pretrained`` ({modality: unimodal run's workdir}) starts any method from
#: those runs' selected encoders and heads.
INIT = dict(pretrained={})

SECTIONS: dict[str, dict] = {"optim": optim.DEFAULTS, "train": TRAIN, "eval": EVAL, "log": tensorboard.DEFAULTS,
                             "parallel": parallel.DEFAULTS, "init": INIT}
#: the top-level keys of a run config
TOP_LEVEL = ("seed", "data", "model", "method", *SECTIONS)


def section_defaults(name: str) -> ml_collections.ConfigDict:
    """A fresh ConfigDict of section ``name``'s defaults (what the experiment configs start from)."""
    return ml_collections.ConfigDict({k: (dict(v) if isinstance(v, dict) else v) for k, v in SECTIONS[name].items()})


def resolve_config(config) -> ml_collections.ConfigDict:
    """A locked copy of ``config`` with every section of :data:`SECTIONS` filled with its defaults.

    Raises ``ValueError`` for an unknown top-level key or section option (a typo), and when
    ``data``, ``model`` or ``method`` is missing. The copy is locked: code that sets a key the
    config does not have fails instead of adding it. Resolving a resolved config changes nothing.
    """
    given = as_dict(config)
    unknown = sorted(set(given) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; a run config has {list(TOP_LEVEL)}.")
    missing = [k for k in ("data", "model", "method") if k not in given]
    if missing:
        raise ValueError(f"the config has no {missing} section(s); start from an experiment config "
                         "(experiments/configs/*.py) or set them.")
    out = {"seed": int(given.get("seed", 0)), "data": given["data"], "model": given["model"],
           "method": given["method"]}
    for name, defaults in SECTIONS.items():
        out[name] = merge_options(defaults, given.get(name), where=name)
    resolved = ml_collections.ConfigDict(out)
    resolved.lock()
    return resolved


def flat_defaults() -> dict:
    """``{"train.patience": 10, ...}``: every section option's default, by dotted key (and the
    model section's common fields, :data:`mcr_jax.models.build.DEFAULTS`)."""
    from mcr_jax.models.build import DEFAULTS as MODEL

    out = {f"{s}.{k}": v for s, d in SECTIONS.items() for k, v in d.items()}
    out.update({f"model.{k}": v for k, v in MODEL.items()})
    return out


__all__ = ["EVAL", "INIT", "SECTIONS", "TOP_LEVEL", "TRAIN", "flat_defaults", "resolve_config", "section_defaults"]
