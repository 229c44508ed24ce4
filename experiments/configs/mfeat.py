"""UCI Multiple Features (handwritten digits, six views; two by default): MLP encoders, linear fusion."""

import ml_collections

from experiments.configs.base import base_config, set_mcr, switches
from mcr_jax.data.mfeat import default_config as mfeat_defaults


def get_config(arg=None):
    c = base_config(arg)
    c.data = ml_collections.ConfigDict(mfeat_defaults())  # views ("pix", "fou"): see docs/data.md
    c.model.hidden = (128,)
    c.model.latent_dim = 64
    c.train.batch_size = 64
    c.train.num_epochs = 40
    c.train.patience = 10
    if "smoke" in switches(arg):
        c.model.hidden = (16,)
        c.model.latent_dim = 8
        set_mcr(c, num_permutations=4)
        c.train.num_epochs = 2
    return c
