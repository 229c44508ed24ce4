"""UCI Multiple Features (handwritten digits, six views; two by default): MLP encoders, linear fusion."""

from experiments.configs.base import base_config, switches


def get_config(arg=None):
    c = base_config()
    c.data = base_config().data
    c.data.name = "mfeat"
    c.data.views = ("fou", "kar")
    c.data.seed = 0
    c.model.hidden = (128,)
    c.model.latent_dim = 64
    c.train.batch_size = 64
    c.train.num_epochs = 40
    c.train.patience = 10
    if "smoke" in switches(arg):
        c.model.hidden = (16,)
        c.model.latent_dim = 8
        c.method.num_permutations = 4
        c.train.num_epochs = 2
    return c
