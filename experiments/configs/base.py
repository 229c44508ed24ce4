"""The fields every experiment config has; the ``method`` section is the chosen method's own.

Every config file's ``get_config(arg)`` takes comma-separated words: ``smoke`` (seconds-long runs)
and ``method=<name>`` (default ``mcr``), which fills the ``method`` section with that method's
options and their defaults (``mcr_jax.methods.method_defaults``), so that each of them can be
overridden on the command line (``--config.method.alpha=0.5``). ``--config.method.name=<name>``
on the command line does the same: ``experiments.flags`` turns it into ``method=<name>``.
"""

import ml_collections

from mcr_jax.methods import method_defaults


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
    c.model = ml_collections.ConfigDict(dict(encoder="mlp", hidden=(128,), latent_dim=64, dropout=0.0,
                                             fusion="linear", ceb=False))
    c.method = method_config(method_name(arg))
    c.optim = ml_collections.ConfigDict(dict(name="adam_l2", learning_rate=1e-3, weight_decay=1e-4, eps=1e-7,
                                             schedule="constant", min_lr=0.0, constant_steps=780, t0=4, t_mult=2,
                                             grad_clip=0.0))
    c.train = ml_collections.ConfigDict(dict(batch_size=64, num_epochs=30, patience=10, select="",
                                             checkpoint=True))
    c.eval = ml_collections.ConfigDict(dict(batch_size=256, mipd_samples=8))
    # What is written beside the results: TensorBoard event files per run (needs tensorboardX).
    c.log = ml_collections.ConfigDict(dict(tensorboard=False))
    # Data parallelism: 0 = every visible device (all hosts); the global batch must divide evenly.
    c.parallel = ml_collections.ConfigDict({"num_devices": 0})
    # Start any method from unimodal runs' selected encoders and heads: {modality: workdir}.
    c.init = ml_collections.ConfigDict({"pretrained": {}})
    return c


def switches(arg) -> set[str]:
    """The plain words of a config argument (``smoke``); ``key=value`` words are options."""
    return {s.strip() for s in (arg or "").split(",") if s.strip() and "=" not in s}
