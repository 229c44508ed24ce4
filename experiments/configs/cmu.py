"""CMU-MOSI / CMU-MOSEI from the aligned-feature pickles: transformer encoders over feature
sequences, regression (L1 task loss, squared-difference MIPD), vision + text as in the paper's
V-T tables (``--config.data.modalities='("vision","audio","text")'`` for all three)."""

from experiments.configs.base import base_config, set_mcr, switches


def cmu_config(name: str, arg, *, mipd_weight: float, uni_weight: float, ceb_weight: float):
    c = base_config(arg)
    c.data = base_config().data
    c.data.name = name
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.manual_dir = ""
    c.data.builder_kwargs = {}
    c.data.modalities = ("vision", "text")
    c.data.worker_count = 0  # grain reader processes (docs/data.md)
    c.model.encoder = "transformer"
    c.model.latent_dim = 64
    c.model.ceb = ceb_weight > 0
    set_mcr(c, mipd_weight=mipd_weight, uni_weight=uni_weight, ceb_weight=ceb_weight, con_labels="binary")
    c.optim.learning_rate = 1e-4
    c.train.batch_size = 32
    c.train.num_epochs = 50
    c.train.patience = 10
    c.train.select = "loss"
    if "smoke" in switches(arg):
        c.model.latent_dim = 8
        set_mcr(c, num_permutations=4)
        c.train.batch_size = 4
        c.train.num_epochs = 1
        c.eval.batch_size = 4
    return c
