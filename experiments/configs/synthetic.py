"""The synthetic benchmark of docs/data.md (the README's default): 2 modalities, MLP encoders,
linear late fusion. ``--config experiments/configs/synthetic.py:smoke`` runs in seconds."""

from experiments.configs.base import base_config, set_mcr, switches
from mcr_jax.data.synthetic import default_config as synthetic_defaults


def get_config(arg=None):
    c = base_config(arg)
    c.data = synthetic_defaults()
    c.model.hidden = (128,)
    c.model.latent_dim = 64
    c.optim.learning_rate = 1e-3
    c.train.batch_size = 50
    c.train.num_epochs = 40
    c.train.patience = 10
    if "smoke" in switches(arg):
        c.data.num_train, c.data.num_validation, c.data.num_test = 120, 60, 60
        c.model.hidden = (16,)
        c.model.latent_dim = 8
        set_mcr(c, num_permutations=4)
        c.train.batch_size = 24
        c.train.num_epochs = 2
        c.eval.batch_size = 32
    return c
