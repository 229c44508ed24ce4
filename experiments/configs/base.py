"""The fields every experiment config has, with the reference code's MCR defaults."""

import ml_collections

from mcr_jax.methods.mcr import DEFAULTS as MCR_DEFAULTS


def method_config(name: str = "mcr") -> ml_collections.ConfigDict:
    """The ``method`` section; MCR's defaults are those of mcr_jax/methods/mcr.py (documented there)."""
    if name != "mcr":
        return ml_collections.ConfigDict({"name": name})
    return ml_collections.ConfigDict(dict(name="mcr", **MCR_DEFAULTS))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict({"name": "synthetic"})
    c.model = ml_collections.ConfigDict(dict(encoder="mlp", hidden=(128,), latent_dim=64, dropout=0.0,
                                             fusion="linear", ceb=False))
    c.method = method_config("mcr")
    c.optim = ml_collections.ConfigDict(dict(name="adam_l2", learning_rate=1e-3, weight_decay=1e-4, eps=1e-7,
                                             schedule="constant", min_lr=0.0, constant_steps=780, t0=4, t_mult=2,
                                             grad_clip=0.0))
    c.train = ml_collections.ConfigDict(dict(batch_size=64, num_epochs=30, patience=10, select="",
                                             checkpoint=True))
    c.eval = ml_collections.ConfigDict(dict(batch_size=256, mipd_samples=8))
    # Data parallelism: 0 = every visible device (all hosts); the global batch must divide evenly.
    c.parallel = ml_collections.ConfigDict({"num_devices": 0})
    # Start any method from unimodal runs' selected encoders and heads: {modality: workdir}.
    c.init = ml_collections.ConfigDict({"pretrained": {}})
    return c


def switches(arg) -> set[str]:
    return {s.strip() for s in (arg or "").split(",") if s.strip()}
